"""Checkpoints written atomically, kept in rotation, found again on resume.

Layout: ``OUTPUT/checkpoints/step_00001234/`` holding
  - ``model.safetensors``: the model's full state dict (what stage 2's ``model.init_from`` reads),
  - ``train_state.pt``: optimiser, scheduler, step, RNG states, data position, counters,
  - ``config.yaml``: the resolved config,
  - ``manifest.json``: written last, with every file's size; a directory without a manifest
    that matches is treated as damaged.
Each checkpoint is first written into ``step_XXXXXXXX.tmp-PID`` and renamed into place only
when complete (rename is atomic on POSIX), so a process killed while saving never replaces
or damages the previous good checkpoint. Leftovers of killed writers are removed by the next
save.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ivfast.config import Config, save_config

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    pass


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, model_state: dict, train_state: dict,
                    cfg: Config, keep_last: int = 3) -> Path:
    """Write one checkpoint atomically and drop the oldest beyond ``keep_last``."""
    root = Path(ckpt_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    _remove_orphans(root)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # safetensors refuses shared storage and non-contiguous tensors: store plain copies.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model_state.items()}
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"step": str(step), "format": "ivfast"})
    torch.save(train_state, tmp / STATE_FILE)
    save_config(cfg, tmp / "config.yaml")
    files = {p.name: p.stat().st_size for p in tmp.iterdir()}
    for name in files:
        _fsync(tmp / name)
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}))
    _fsync(tmp / MANIFEST)
    old = None
    if final.exists():
        # The same step again (a run resumed from an older checkpoint reaches it anew): the new
        # state wins. A directory cannot be replaced atomically, so the old one is moved aside
        # first; if we die in between, find_latest() falls back to the step before.
        old = root / f"{final.name}.old-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for stale in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_orphans(root: Path) -> None:
    """Half-written (``.tmp-PID``) and set-aside (``.old-PID``) directories of dead processes."""
    for p in root.glob("step_*"):
        name, sep, pid = p.name.rpartition("-")
        if sep and (".tmp" in name or ".old" in name) and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def is_valid(path: Path) -> bool:
    """A checkpoint is valid when its manifest exists and every listed file has its size."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all((path / n).stat().st_size == size for n, size in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Completed checkpoint directories, oldest first (unfinished ``.tmp-*`` ones excluded)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and "-" not in p.name)


def find_latest(ckpt_dir: str | os.PathLike) -> Path | None:
    """Newest valid checkpoint; damaged ones are skipped with a warning naming them."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        if is_valid(path):
            return path
        warnings.warn(f"skipping damaged checkpoint {path} (manifest missing or file sizes differ)")
    return None


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """(model_state, train_state) of a checkpoint directory; clear errors when it is not one."""
    path = Path(path)
    if not path.is_dir() or not (path / MODEL_FILE).exists():
        raise CheckpointError(f"{path} is not an ivfast checkpoint directory (no {MODEL_FILE}); "
                              f"pass a checkpoints/step_XXXXXXXX directory or --resume auto")
    if not is_valid(path):
        raise CheckpointError(f"checkpoint {path} is damaged (manifest missing or sizes differ); "
                              f"use an older one in {path.parent}")
    model_state = load_file(str(path / MODEL_FILE))
    train_state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    return model_state, train_state
