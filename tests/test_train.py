"""The training loop end to end on CPU: demo, exact resume, two ranks, pre-emption, guards."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ivfast import checkpoint as ckpt
from ivfast.config import load_config
from ivfast.trainer import NonFiniteLossError, NonFiniteSteps, Trainer, lr_at
from utils import tiny_cfg, tiny_overrides

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_lr_schedule_shape():
    lrs = [lr_at(s, 1.0, 0.1, 5, 20) for s in range(21)]
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(1.0) and lrs[20] == pytest.approx(0.1)
    assert all(a <= b for a, b in zip(lrs[:5], lrs[1:6])) and all(a >= b for a, b in zip(lrs[5:], lrs[6:]))


@pytest.mark.parametrize("workers, global_batch", [(0, 2), (1, 4)], ids=["inline", "worker+accum2"])
def test_resume_matches_uninterrupted_run(clip_list, tmp_path, workers, global_batch):
    """Stop at step n (its checkpoint), resume elsewhere: step m equals the uninterrupted run's."""
    extra = [f"data.num_workers={workers}", f"optim.global_batch={global_batch}", "runtime.ckpt_every=1",
             "runtime.keep_last=10"]
    full = tiny_cfg(clip_list, tmp_path / "full", *extra)
    trainer = Trainer(full)
    trainer.fit()
    m = trainer.total_steps
    n = m // 2
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "full" / "checkpoints")]
    assert names == [f"step_{s:08d}" for s in range(1, m + 1)]
    resumed = tiny_cfg(clip_list, tmp_path / "resumed", *extra)
    shutil.copytree(tmp_path / "full" / "checkpoints" / f"step_{n:08d}",
                    tmp_path / "resumed" / "checkpoints" / f"step_{n:08d}")
    trainer = Trainer(resumed, resume="auto")
    assert trainer.step == n and trainer.loader.state_dict()["position"] == n * trainer.accum
    trainer.fit()
    a = load_file(str(tmp_path / "full" / "checkpoints" / f"step_{m:08d}" / ckpt.MODEL_FILE))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / f"step_{m:08d}" / ckpt.MODEL_FILE))
    start = load_file(str(tmp_path / "full" / "checkpoints" / f"step_{n:08d}" / ckpt.MODEL_FILE))
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], start[k]) for k in a), "training must change the weights"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, m + 1))
    for key in ("loss", "lr", "grad_norm", "clips_per_s_per_gpu", "tokens_per_s_per_gpu", "time/forward",
                "time/backward", "time/optimizer", "time/data"):
        assert key in lines[-1], key
    assert {"loss_diffusion", "loss_middle", "loss_final"} <= lines[-1].keys()
    assert list((tmp_path / "full" / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_from_a_checkpoint_at_an_epoch_end(clip_list, tmp_path):
    """A checkpoint taken at the last step of an epoch (pre-emption lands there as often as
    anywhere) resumes into the next epoch and equals the uninterrupted run."""
    extra = ["optim.epochs=2", "runtime.ckpt_every=1", "runtime.keep_last=10"]
    trainer = Trainer(tiny_cfg(clip_list, tmp_path / "full", *extra))
    trainer.fit()
    m = trainer.total_steps
    n = len(trainer.loader)                        # the last step of epoch 0
    assert 0 < n < m
    shutil.copytree(tmp_path / "full" / "checkpoints" / f"step_{n:08d}",
                    tmp_path / "resumed" / "checkpoints" / f"step_{n:08d}")
    trainer = Trainer(tiny_cfg(clip_list, tmp_path / "resumed", *extra), resume="auto")
    assert trainer.step == n
    trainer.fit()
    a = load_file(str(tmp_path / "full" / "checkpoints" / f"step_{m:08d}" / ckpt.MODEL_FILE))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / f"step_{m:08d}" / ckpt.MODEL_FILE))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")


def test_nonfinite_loss_skips_update_and_stops(clip_list, tmp_path):
    cfg = tiny_cfg(clip_list, tmp_path, "runtime.max_nonfinite=2")
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    real_forward = trainer.model.forward

    def poisoned(video, seed):
        out = real_forward(video, seed)
        out["loss"] = out["loss"] * float("nan")
        return out

    trainer.model.forward = poisoned
    with pytest.raises(NonFiniteLossError, match="2 steps in a row"):
        trainer.fit()
    assert trainer.nonfinite.total == 2
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed although every update was skipped"


def test_nonfinite_steps_counts_runs_and_a_resumed_total():
    """A finite step ends the run in a row, the longest run is kept, the total carries the resumed
    run's count, and read() reports the bad steps since the last read."""
    nf = NonFiniteSteps(torch.device("cpu"), total_before=3)
    for bad in (True, True, False, True):
        nf.add(torch.tensor(bad))
    assert nf.read() == (3, 2) and (nf.in_row, nf.total) == (1, 6)
    nf.add(torch.tensor(False))
    assert nf.read() == (0, 2) and (nf.in_row, nf.total) == (0, 6)


def test_bad_videos_over_the_limit_stop_training(clip_list, tmp_path):
    from ivfast.data import DataError

    trainer = Trainer(tiny_cfg(clip_list, tmp_path, "data.max_bad_fraction=0.2"))
    real = trainer.loader.bad_summary

    def two_bad_of_eight():
        return dict(real(), decode_bad_files=2, examples={"decode_error": ["a.mp4", "b.mp4"]})

    trainer.loader.bad_summary = two_bad_of_eight
    with pytest.raises(DataError, match="2 of 8 videos are bad over all ranks"):
        trainer.fit()
    assert trainer.step == 1, "checked at the first logging step"


def test_profile_window_writes_a_trace(clip_list, tmp_path):
    cfg = tiny_cfg(clip_list, tmp_path, "runtime.profile_steps=1:3", "runtime.max_steps=3")
    trainer = Trainer(cfg)
    trainer.fit()
    assert trainer.step == 3 and trainer.total_steps == 4, "max_steps stops early; the schedule keeps its length"
    assert (tmp_path / "profile" / "trace_steps_1_3.json").stat().st_size > 0
    assert "Name" in (tmp_path / "profile" / "top_ops.txt").read_text()


def test_bad_setups_fail_clearly(clip_list, tmp_path):
    with pytest.raises(Exception, match="model.init_from"):
        Trainer(tiny_cfg(clip_list, tmp_path, "stage=2", "masking.kind=multiblock"))
    with pytest.raises(Exception, match="nowhere.csv"):
        Trainer(tiny_cfg(tmp_path / "nowhere.csv", tmp_path))
    with pytest.raises(Exception, match="global_batch"):
        Trainer(tiny_cfg(clip_list, tmp_path, "optim.global_batch=64"))


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(clip_list, tmp_path):
    cmd = [sys.executable, "-m", "ivfast.train", "--config", "demo",
           *tiny_overrides(clip_list, tmp_path, "optim.epochs=50", "runtime.log_every=1")]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM received" in out
    latest = ckpt.find_latest(tmp_path / "checkpoints")
    _, state = ckpt.load_checkpoint(latest)
    assert 1 <= state["step"] < 50 * 4
    # ... and the pre-empted run continues from there
    step = state["step"]
    res = subprocess.run(cmd + ["--resume", "auto", f"runtime.max_steps={step + 1}"], env=ENV,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"resumed from {latest}" in res.stderr and f"at step {step}" in res.stderr
    _, state = ckpt.load_checkpoint(ckpt.find_latest(tmp_path / "checkpoints"))
    assert state["step"] == step + 1


def _two_rank_run(clip_list, out, strategy, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "ivfast.train", "--config", "demo",
           *tiny_overrides(clip_list, out, "optim.global_batch=4", "runtime.log_every=1", "runtime.ckpt_every=2",
                           f"runtime.distributed={strategy}")]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return ckpt.find_latest(out / "checkpoints")


@pytest.mark.slow
def test_two_ranks_ddp_and_fsdp_agree(clip_list, tmp_path):
    """gloo, 2 ranks; the last step is also a checkpoint step (every rank must agree to save once)."""
    from ivfast.models.epd import build_model

    last = {s: _two_rank_run(clip_list, tmp_path / s, s, port) for s, port in (("ddp", 29533), ("fsdp", 29534))}
    for strategy, path in last.items():
        _, state = ckpt.load_checkpoint(path)
        assert state["step"] == 2, "8 clips / (2 ranks x 2 per rank) = 2 steps per epoch"
        assert isinstance(state["data"], list) and len(state["data"]) == 2, "every rank's data position is saved"
        lines = (tmp_path / strategy / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 2, "only rank 0 writes metrics"
    ddp = load_file(str(last["ddp"] / ckpt.MODEL_FILE))
    fsdp = load_file(str(last["fsdp"] / ckpt.MODEL_FILE))
    plain = build_model(load_config(str(tmp_path / "ddp" / "config.yaml"))).state_dict()
    assert {k: tuple(v.shape) for k, v in fsdp.items()} == {k: tuple(v.shape) for k, v in plain.items()}
    # Same seed, data and maths: FSDP2 shards must start from the same weights as DDP's replicas.
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-4, atol=1e-5, msg=f"{k}: FSDP and DDP disagree")


@pytest.mark.slow
def test_demo_command_end_to_end(tmp_path):
    """The README's first command, reduced: generated clips, stage 1, then stage 2 from it."""
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "ivfast.train", "--config", "demo", f"runtime.output_dir={out}",
                          "optim.batch_per_gpu=2", "optim.global_batch=2", "optim.epochs=1"],
                         env=ENV, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "done. Output in" in res.stdout
    s1 = ckpt.find_latest(out / "stage1" / "checkpoints")
    s2 = ckpt.find_latest(out / "stage2" / "checkpoints")
    assert s1 is not None and s2 is not None
    assert load_config(str(s2 / "config.yaml")).model.init_from == str(s1)
    for stage in ("stage1", "stage2"):
        assert (out / stage / "metrics.jsonl").read_text().strip()
        assert list((out / stage / "tensorboard").glob("events.out.tfevents.*"))


def test_batch_rounding_and_lr_scaling_are_logged(clip_list, tmp_path, caplog):
    """The global batch becomes per-GPU x GPUs x accumulation (the multiple of per-GPU x world
    nearest optim.global_batch); the log says how, and how the lr was scaled."""
    import logging
    caplog.set_level(logging.INFO, logger="ivfast.train")
    trainer = Trainer(tiny_cfg(clip_list, tmp_path, "optim.global_batch=7"))
    assert (trainer.accum, trainer.global_batch) == (4, 8)
    msg = "\n".join(r.getMessage() for r in caplog.records)
    assert "global batch 8 = 2 per GPU x 1 GPUs x 4 accumulation (asked 7)" in msg, msg
    assert "lr x 0.03125 (global batch / 256)" in msg, msg
    assert trainer.peak_lr == pytest.approx(trainer.cfg.optim.base_lr * 8 / 256)


def test_stage2_reinterpolated_tables_train_save_and_resume(clip_list, tmp_path):
    """Stage 2 with the release's 16->32-style position tables (here 4 -> 8 frames): the small
    tables train, checkpoints hold them, and a resumed run matches the uninterrupted one."""
    s1 = Trainer(tiny_cfg(clip_list, tmp_path / "s1", "runtime.max_steps=1"))
    last1 = s1.fit()
    extra = ["stage=2", "masking.kind=multiblock", f"model.init_from={last1}", "model.num_frames=8",
             "model.stage2_pos_frames=4", "runtime.ckpt_every=1", "runtime.keep_last=10",
             "masking.blocks=[{num_blocks: 2, spatial_scale: [0.15, 0.15]}]", "runtime.max_steps=2"]
    full = Trainer(tiny_cfg(clip_list, tmp_path / "full", *extra))
    full.fit()
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step_00000002" / ckpt.MODEL_FILE))
    small = a["stage2_pos_tables.encoder.pos_embed"]
    assert small.shape[0] == 4 + 4 * 16 and a["encoder.pos_embed"].shape[0] == 4 + 8 * 16
    s1_table = load_file(str(last1 / ckpt.MODEL_FILE))["encoder.pos_embed"]
    assert not torch.equal(small, s1_table), "the small table must be trained"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000001",
                    tmp_path / "resumed" / "checkpoints" / "step_00000001")
    Trainer(tiny_cfg(clip_list, tmp_path / "resumed", *extra), resume="auto").fit()
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / "step_00000002" / ckpt.MODEL_FILE))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")
    # evaluation reads the full-size table of the stage-2 checkpoint
    from ivfast.models.release_weights import load_encoder
    enc = load_encoder(tmp_path / "full" / "checkpoints" / "step_00000002", config=full.cfg)
    torch.testing.assert_close(enc.pos_embed, a["encoder.pos_embed"])


@pytest.mark.slow
def test_training_survives_a_decoder_segfault_in_a_worker(clip_list, tmp_path, monkeypatch):
    """SIGSEGV in a DataLoader worker while the trainer runs: the file is counted, the run finishes."""
    from ivfast.data import loader as loader_mod

    crash = clip_list.read_text().splitlines()[3]
    real = loader_mod.decode_frames
    monkeypatch.setattr(loader_mod, "decode_frames", lambda source, *a, **k: (
        os.kill(os.getpid(), signal.SIGSEGV) if str(source) == crash else real(source, *a, **k)))
    trainer = Trainer(tiny_cfg(clip_list, tmp_path, "data.num_workers=1", "data.max_bad_fraction=0.2"))
    last = trainer.fit()
    assert trainer.step == trainer.stop_step == 4 and ckpt.is_valid(last)
    s = trainer.loader.bad_summary()
    assert s["examples"] == {"decoder_crash": [crash]} and s["decode_bad_files"] == 1, s


def _worker_pid(agent_pid: int, local_rank: int) -> int | None:
    """The torchrun worker process with this LOCAL_RANK (a child of the agent), from /proc."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent_pid and f"LOCAL_RANK={local_rank}".encode() in env:
            return int(d.name)
    return None


@pytest.mark.slow
def test_torchrun_restart_after_a_killed_rank_resumes_exactly(clip_list, tmp_path):
    """gloo, 2 ranks, --max-restarts 1: SIGKILL rank 1 after a checkpoint; the restarted group
    resumes by itself (no --resume on the command line), says from which step, and ends with
    weights bitwise equal to an uninterrupted run's."""
    def cmd(out, port):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
                "--master-port", str(port), "-m", "ivfast.train", "--config", "demo",
                *tiny_overrides(clip_list, out, "optim.global_batch=4", "optim.epochs=20", "runtime.log_every=1",
                                "runtime.ckpt_every=2", "runtime.keep_last=40")]

    ref = subprocess.run(cmd(tmp_path / "ref", 29541), env=ENV, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = subprocess.Popen(cmd(tmp_path / "killed", 29542), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        first = tmp_path / "killed" / "checkpoints" / "step_00000002"
        deadline = time.time() + 300
        while time.time() < deadline and not (first / ckpt.MANIFEST).exists():
            time.sleep(0.05)
        victim = _worker_pid(proc.pid, 1)
        assert victim is not None and (first / ckpt.MANIFEST).exists(), "no checkpoint or no rank 1 to kill"
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:      # the agent and its workers: no process outlives the test
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    assert "elastic restart 1: resuming from the newest valid checkpoint" in out, out[-4000:]
    resumed = [line for line in out.splitlines() if "resumed from" in line]
    assert resumed and " at step " in resumed[0], out[-4000:]
    step = int(resumed[0].rsplit(" at step ", 1)[1].split()[0])
    assert 2 <= step < 40, resumed
    a = load_file(str(tmp_path / "ref" / "checkpoints" / "step_00000040" / ckpt.MODEL_FILE))
    b = load_file(str(tmp_path / "killed" / "checkpoints" / "step_00000040" / ckpt.MODEL_FILE))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after the elastic restart"


def test_elastic_restart_resumes_by_itself(clip_list, tmp_path, monkeypatch, caplog):
    """TORCHELASTIC_RESTART_COUNT > 0 (torchrun restarted the group): the newest checkpoint of the
    output directory wins over the command line's --resume; with none saved yet, that path stays."""
    import logging

    from ivfast import train

    seen = []
    monkeypatch.setattr(train, "run", lambda cfg, resume: seen.append(resume) or tmp_path)
    caplog.set_level(logging.WARNING, logger="ivfast.train")
    args = ["--config", "demo", f"data.train_list={clip_list}", "demo=false", f"runtime.output_dir={tmp_path}"]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert train.main(args) == 0 and train.main(args + ["--resume", "/elsewhere/step_1"]) == 0
    assert seen == ["auto", "/elsewhere/step_1"]
    ckpt.save_checkpoint(tmp_path / "checkpoints", 1, {"w": torch.ones(1)}, {"step": 1}, load_config("demo"))
    assert train.main(args + ["--resume", "/elsewhere/step_1"]) == 0 and seen[-1] == "auto"
    assert "elastic restart 1: resuming from the newest valid checkpoint" in caplog.text
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert train.main(args) == 0 and seen[-1] == ""
