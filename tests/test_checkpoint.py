"""Checkpoints: atomic writes, rotation, damaged ones skipped, a killed writer loses nothing."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from ivfast import checkpoint as ckpt
from ivfast.config import load_config


def _write(tmp_path, step, keep_last=3, value=1.0):
    cfg = load_config("demo")
    return ckpt.save_checkpoint(tmp_path, step, {"w": torch.full((3, 4), value), "b": torch.zeros(2)},
                                {"step": step, "optimizer": {}}, cfg, keep_last=keep_last)


def test_same_step_again_replaces_it(tmp_path):
    """A run resumed from an older checkpoint that reaches a saved step again writes its own state."""
    first = _write(tmp_path, 7, value=1.0)
    again = _write(tmp_path, 7, value=2.0)
    assert again == first and torch.equal(ckpt.load_checkpoint(first)[0]["w"], torch.full((3, 4), 2.0))
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000007"]


def test_orphans_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / f"step_00000003.tmp-{dead}").mkdir()
    (tmp_path / f"step_00000002.old-{dead}").mkdir()
    mine = tmp_path / f"step_00000004.tmp-{os.getpid()}"
    mine.mkdir()
    _write(tmp_path, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["step_00000005", mine.name])


def test_roundtrip_and_rotation(tmp_path):
    for s in (5, 10, 15, 20):
        _write(tmp_path, s, keep_last=2, value=float(s))
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step_00000015", "step_00000020"]
    model, state = ckpt.load_checkpoint(ckpt.find_latest(tmp_path))
    assert state["step"] == 20 and torch.equal(model["w"], torch.full((3, 4), 20.0))
    assert load_config(str(tmp_path / "step_00000020" / "config.yaml")) == load_config("demo")


def test_damaged_newest_is_skipped(tmp_path):
    _write(tmp_path, 1)
    newest = _write(tmp_path, 2)
    with open(newest / ckpt.MODEL_FILE, "r+b") as f:
        f.truncate(10)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*step_00000002"):
        assert ckpt.find_latest(tmp_path).name == "step_00000001"
    with pytest.raises(ckpt.CheckpointError, match="damaged"):
        ckpt.load_checkpoint(newest)
    with pytest.raises(ckpt.CheckpointError, match="not an ivfast checkpoint"):
        ckpt.load_checkpoint(tmp_path / "nowhere")


def test_failure_while_writing_keeps_previous(tmp_path):
    _write(tmp_path, 1)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, {"w": torch.ones(2)}, {"bad": Unpicklable()}, load_config("demo"))
    assert ckpt.find_latest(tmp_path).name == "step_00000001"


def test_sigkill_while_writing_never_replaces_good_checkpoint(tmp_path):
    _write(tmp_path, 1)
    child = textwrap.dedent(f"""
        import torch
        from ivfast import checkpoint as ckpt
        from ivfast.config import load_config
        big = {{"w": torch.randn(64, 1024, 1024)}}   # 256 MB: slow enough to be killed mid-write
        for step in range(2, 100):
            ckpt.save_checkpoint({str(tmp_path)!r}, step, big, {{"step": step}}, load_config("demo"), keep_last=100)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child])
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(".tmp-" in p.name for p in tmp_path.iterdir()):
            time.sleep(0.01)
        assert any(".tmp-" in p.name for p in tmp_path.iterdir()), "the writer never started"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done = ckpt.list_checkpoints(tmp_path)
    assert done and all(ckpt.is_valid(p) for p in done), "a completed-looking checkpoint is damaged"
    model, state = ckpt.load_checkpoint(ckpt.find_latest(tmp_path))
    assert state["step"] == int(done[-1].name.split("_")[1])
