"""A hung rank is named: which ranks hold up the one that waits, and the end-to-end run on gloo."""
import os
import subprocess
import sys
import textwrap
import time

import pytest

from ivfast.watchdog import culprits
from utils import tiny_overrides


def _beat(phase, step, micro=0, since=0.0, beat=100.0):
    return {"phase": phase, "step": step, "micro": micro, "since": since, "beat": beat}


def test_ranks_behind_or_silent_are_named_and_equals_are_not():
    now, stall = 100.0, 20.0
    beats = {0: _beat("backward", 5, since=70.0), 1: _beat("data", 5, since=60.0), 2: _beat("backward", 5),
             3: _beat("forward", 5, beat=50.0), 4: None, 5: _beat("data", 6)}
    got = culprits(beats, 0, now, stall)
    assert set(got) == {1, 3, 4}
    assert got[1] == "stuck in phase data of step 5 for 40 s"
    assert got[3].startswith("no heartbeat for 50 s (last in phase forward of step 5)")
    assert got[4] == "no heartbeat at all"
    # all in the same place (a long first compile, a slow save everyone waits for): nobody to name
    same = {r: _beat("forward", 0, since=0.0) for r in range(4)}
    assert culprits(same, 2, now, stall) == {}
    # rank 0 still writing its checkpoint while the others wait for it
    save = {0: _beat("checkpoint", 9), 1: _beat("after checkpoint", 9)}
    assert culprits(save, 1, now, stall) == {0: "stuck in phase checkpoint of step 9 for 100 s"}
    # micro-steps order within a step (gradient accumulation)
    acc = {0: _beat("backward", 3, micro=1), 1: _beat("data", 3, micro=1), 2: _beat("backward", 3, micro=0)}
    assert set(culprits(acc, 0, now, stall)) == {1, 2}


@pytest.mark.slow
def test_a_rank_sleeping_in_its_data_step_is_named(clip_list, tmp_path):
    """gloo, 2 ranks: rank 1 sleeps inside its data step at step 2. Rank 0 ends the run within
    runtime.collective_timeout_s with one line naming rank 1 and the phase, not after 30 minutes."""
    script = tmp_path / "hang_rank1.py"
    script.write_text(textwrap.dedent("""
        import sys
        import time

        from ivfast import train, trainer

        real = trainer.Trainer._next_batch

        def next_batch(self):
            if self.rank == 1 and self.step == 2:
                time.sleep(3600)                 # a stuck file system read
            return real(self)

        trainer.Trainer._next_batch = next_batch
        sys.exit(train.main(sys.argv[1:]))
    """))
    timeout = 20
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29551",
           str(script), "--config", "demo",
           *tiny_overrides(clip_list, tmp_path / "run", "optim.global_batch=4", "optim.epochs=5",
                           "runtime.log_every=1", f"runtime.collective_timeout_s={timeout}")]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.monotonic() - t0
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    lines = [x for x in out.splitlines() if x.startswith("ivfast.train: hung rank:")]
    assert lines, out[-4000:]
    assert lines[0].startswith("ivfast.train: hung rank: rank 1 stuck in phase data of step 2 for "), lines
    assert "Rank 0 waited" in lines[0] and f"runtime.collective_timeout_s={timeout}" in lines[0], lines
    waited = int(lines[0].split("Rank 0 waited ")[1].split()[0])
    assert waited < timeout, lines[0]
    assert wall < 300, wall
