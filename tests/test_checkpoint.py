"""Checkpoints: atomic writes, rotation, damaged ones skipped, a killed writer loses nothing."""
import errno
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
from ivfast.train import main
from ivfast.trainer import Trainer, set_rng_state
from utils import tiny_overrides


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
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000002 is damaged: model\.safetensors has 10 bytes"):
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


# --------------------------------------------------------------------------- content hashes
def _flip_tensor_byte(path, name):
    """Flip one byte in the middle of tensor ``name``'s data in a safetensors file (size unchanged)."""
    import json
    import struct

    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    raw[8 + n + (begin + end) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def test_same_size_corruption_is_found(tmp_path):
    """Bit rot that keeps the size: the newest is skipped by name and file, an explicit load stops."""
    _write(tmp_path, 1)
    newest = _write(tmp_path, 2, value=2.0)
    size = (newest / ckpt.MODEL_FILE).stat().st_size
    _flip_tensor_byte(newest / ckpt.MODEL_FILE, "w")
    assert (newest / ckpt.MODEL_FILE).stat().st_size == size
    assert not ckpt.is_valid(newest)
    with pytest.warns(UserWarning, match=r"step_00000002: model\.safetensors does not match its blake2b hash"):
        assert ckpt.find_latest(tmp_path).name == "step_00000001"
    with pytest.warns(UserWarning, match="step_00000002"):
        path, model, state = ckpt.load_latest(tmp_path)
    assert path.name == "step_00000001" and state["step"] == 1
    with pytest.raises(ckpt.CorruptCheckpointError,
                       match=r"step_00000002 is damaged: model\.safetensors does not match .*use an older one"):
        ckpt.load_checkpoint(newest)


def test_checkpoint_without_hashes_loads_with_a_warning(tmp_path):
    """One written before hashes were recorded: sizes checked, loaded, and the user told so."""
    import json

    path = _write(tmp_path, 1)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    del manifest["digests"], manifest["hash"]
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="no content hashes"):
        assert ckpt.load_checkpoint(path)[1]["step"] == 1


def test_corrupt_train_state_is_found(tmp_path):
    path = _write(tmp_path, 1)
    raw = bytearray((path / ckpt.STATE_FILE).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (path / ckpt.STATE_FILE).write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match=r"train_state\.pt does not match"):
        ckpt.load_checkpoint(path)


@pytest.mark.slow
def test_resume_auto_skips_corrupt_newest_and_named_one_stops(clip_list, tmp_path, capsys):
    """Training: --resume auto falls back to the previous checkpoint with one warning naming the
    file; the corrupt checkpoint named on the command line ends the run with one line."""
    args = tiny_overrides(clip_list, tmp_path, "runtime.ckpt_every=1", "runtime.max_steps=2")
    Trainer(load_config("demo", args)).fit()
    newest = tmp_path / "checkpoints" / "step_00000002"
    _flip_tensor_byte(newest / ckpt.MODEL_FILE, "encoder.patch_embed.weight")
    with pytest.warns(UserWarning) as seen:
        trainer = Trainer(load_config("demo", args), resume="auto")
    assert trainer.step == 1
    damaged = [str(w.message) for w in seen if "damaged" in str(w.message)]
    assert len(damaged) == 1 and "step_00000002: model.safetensors does not match" in damaged[0], damaged
    capsys.readouterr()
    assert main(["--config", "demo", *args, "--resume", str(newest)]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "ivfast.train" in x]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ivfast.train: checkpoint error: checkpoint {newest} is damaged: "), err
    assert "model.safetensors does not match" in lines[0] and "Traceback" not in err


# --------------------------------------------------------------------------- data, not code
class _Payload:
    """What a hostile checkpoint carries: unpickling it calls os.mkdir(marker)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _plant(path, payload):
    """Replace train_state.pt and re-hash the manifest, as its maker could: the hashes match."""
    import json

    torch.save({"step": 1, "optimizer": {}, "rng": payload}, path / ckpt.STATE_FILE)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    manifest["files"][ckpt.STATE_FILE] = (path / ckpt.STATE_FILE).stat().st_size
    manifest["digests"][ckpt.STATE_FILE] = ckpt.file_digest(path / ckpt.STATE_FILE)
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("wrap", ["plain", "numpy_object_array"])
def test_hostile_train_state_is_refused_and_never_runs(tmp_path, wrap):
    """A __reduce__ payload, bare or inside a NumPy object array (NumPy arrays of numbers are
    accepted for older train states; objects inside them are not)."""
    import numpy as np

    path = _write(tmp_path / "ck", 1)
    marker = tmp_path / "payload_ran"
    payload = _Payload(marker)
    _plant(path, payload if wrap == "plain" else np.array([payload], dtype=object))
    assert ckpt.is_valid(path)
    with pytest.raises(ckpt.CheckpointError, match=r"train_state\.pt holds pickled objects other than tensors") as e:
        ckpt.load_checkpoint(path)
    assert "\n" not in str(e.value)
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        ckpt.load_latest(tmp_path / "ck")
    assert not marker.exists(), "the pickled payload ran"


def test_train_state_of_a_real_run_is_plain_data(clip_list, tmp_path, capsys):
    """A trainer's train_state.pt loads with weights_only=True; a planted one stops the resume in one line."""
    args = tiny_overrides(clip_list, tmp_path / "run", "runtime.max_steps=1")
    last = Trainer(load_config("demo", args)).fit()
    state = torch.load(last / ckpt.STATE_FILE, map_location="cpu", weights_only=True)
    assert state["step"] == 1 and torch.is_tensor(state["rng"]["numpy"]["key"])
    marker = tmp_path / "payload_ran"
    _plant(last, _Payload(marker))
    capsys.readouterr()
    assert main(["--config", "demo", *args, "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "ivfast.train" in x]
    assert len(lines) == 1 and "holds pickled objects other than tensors" in lines[0], err
    assert "Traceback" not in err and not marker.exists()


# --------------------------------------------------------------------------- full disks
@pytest.fixture
def small_fs(tmp_path):
    """mount(size) -> a directory on a real tmpfs of that many bytes (root only; unmounted after)."""
    mounted = []

    def mount(size: int):
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}); the injected-ENOSPC tests cover it")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _check_disk_full(err, root, step):
    msg = str(err)
    assert "\n" not in msg and f"no space left in {root} while saving step {step}: it needs about " in msg, msg
    assert not [p for p in root.iterdir() if ".tmp-" in p.name], "the partial copy was left behind"
    latest = ckpt.find_latest(root)
    assert latest is not None and latest.name == "step_00000001"
    model, state = ckpt.load_checkpoint(latest)
    assert state["step"] == 1 and torch.equal(model["w"], torch.ones(256, 1024))


def _save_w(root, step, big="model"):
    """A 1 MiB checkpoint whose bulk is in model.safetensors or in train_state.pt."""
    mib = torch.ones(256, 1024)
    model = {"w": mib if big == "model" else mib[:1].clone()}
    state = {"step": step, "moments": mib.clone() if big == "state" else torch.zeros(1)}
    return ckpt.save_checkpoint(root, step, model, state, load_config("demo"))


@pytest.mark.parametrize("big", ["model", "state"])
def test_full_tmpfs_keeps_the_last_good_checkpoint(small_fs, big):
    """A real file system with room for one 1 MiB checkpoint only: the second save fails cleanly,
    in safetensors' write or in torch.save's."""
    root = small_fs(1536 * 1024) / "checkpoints"
    _save_w(root, 1)
    with pytest.raises(ckpt.CheckpointError, match="no space left") as e:
        _save_w(root, 2, big)
    _check_disk_full(e.value, root, 2)


@pytest.mark.parametrize("where", [ckpt.STATE_FILE, ckpt.MODEL_FILE])
def test_injected_enospc_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, where):
    """ENOSPC from the write of train_state.pt (torch.save: a RuntimeError around the OSError) or
    of model.safetensors (safetensors' own error carrying the OS text)."""
    import builtins

    root = tmp_path / "checkpoints"
    _save_w(root, 1)
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    def full_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return Full(f) if "w" in mode and str(path).endswith(where) else f

    if where == ckpt.STATE_FILE:
        monkeypatch.setattr(ckpt, "open", full_open, raising=False)     # the module's own open()
    else:
        from safetensors import SafetensorError

        def full_save(tensors, path, metadata=None):
            with real_open(path, "wb") as f:
                f.write(b"\0" * 4096)      # a partial file, as a real full disk leaves
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(ckpt, "save_file", full_save)
    with pytest.raises(ckpt.CheckpointError, match="no space left") as e:
        _save_w(root, 2)
    _check_disk_full(e.value, root, 2)


@pytest.mark.slow
def test_run_on_a_full_disk_says_so_at_start_and_ends_in_one_line(clip_list, tmp_path, small_fs, caplog, capsys):
    """Training on a real tmpfs with room for one checkpoint: a warning at start-up, then the
    second save ends the run with one line, and step 1 still resumes."""
    import logging

    def args(out, steps):
        return tiny_overrides(clip_list, out, "runtime.ckpt_every=1", f"runtime.max_steps={steps}")

    Trainer(load_config("demo", args(tmp_path / "probe", 1))).fit()
    one = sum(f.stat().st_size for f in (tmp_path / "probe" / "checkpoints" / "step_00000001").iterdir())
    out = small_fs(one + one // 2 + 256 * 1024)
    caplog.set_level(logging.WARNING, logger="ivfast.train")
    assert main(["--config", "demo", *args(out, 2)]) == 2
    assert not any("bytes are free for" in r.getMessage() for r in caplog.records), "room for one: no warning"
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "ivfast.train" in x]
    assert len(lines) == 1 and "no space left in" in lines[0] and "while saving step 2" in lines[0], err
    root = out / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step_00000001"]
    assert ckpt.load_checkpoint(root / "step_00000001")[1]["step"] == 1
    caplog.clear()
    Trainer(load_config("demo", args(out, 2)), resume="auto")
    assert any("bytes are free for" in r.getMessage() and "the next checkpoint needs about" in r.getMessage()
               for r in caplog.records), "start-up must say the next save does not fit"
    # before any checkpoint exists the estimate comes from the model and AdamW's moments
    need = Trainer(load_config("demo", args(tmp_path / "fresh", 1)))._next_save_bytes()
    assert one * 0.9 <= need <= one * 1.1, (need, one)


def test_train_state_of_an_older_ivfast_still_resumes(tmp_path):
    """Before RNG states were stored as tensors, train_state.pt held NumPy's state tuple (a plain
    uint32 array): it still loads as data, and its RNG states restore."""
    import json
    import random

    import numpy as np

    path = _write(tmp_path, 1)
    np.random.seed(5)
    random.seed(5)
    old = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    want = (np.random.rand(3), random.random(), torch.rand(2))
    torch.save({"step": 1, "optimizer": {}, "rng": old}, path / ckpt.STATE_FILE)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    manifest["files"][ckpt.STATE_FILE] = (path / ckpt.STATE_FILE).stat().st_size
    manifest["digests"][ckpt.STATE_FILE] = ckpt.file_digest(path / ckpt.STATE_FILE)
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    _, state = ckpt.load_checkpoint(path)
    np.random.seed(0)
    set_rng_state(state["rng"])
    got = (np.random.rand(3), random.random(), torch.rand(2))
    assert np.array_equal(got[0], want[0]) and got[1] == want[1] and torch.equal(got[2], want[2])
