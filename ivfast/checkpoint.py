"""Checkpoints written atomically, kept in rotation, found again on resume.

Layout: ``OUTPUT/checkpoints/step_00001234/`` holding
  - ``model.safetensors``: the model's full state dict (what stage 2's ``model.init_from`` reads),
  - ``train_state.pt``: optimiser, scheduler, step, RNG states, data position, counters; only
    tensors and plain Python data, loaded with ``torch.load(weights_only=True)`` so that a
    checkpoint from someone else cannot run code,
  - ``config.yaml``: the resolved config,
  - ``manifest.json``: written last, with every file's size and BLAKE2b content hash; a
    directory whose files do not match it is damaged (a truncated copy, or bit rot that keeps
    the size) and is never loaded.
Each checkpoint is first written into ``step_XXXXXXXX.tmp-PID`` and renamed into place only
when complete (rename is atomic on POSIX), so a process killed while saving never replaces
or damages the previous good checkpoint. Leftovers of killed writers are removed by the next
save.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ivfast.config import Config, save_config

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
MANIFEST = "manifest.json"
# stdlib; measured 1.1-1.2 GB/s on one CPU core, 16-20 % of a 0.94 GB save including the hash
# (bench/bench_checkpoint_hash.py, bench/results/checkpoint_hash_cpu.json)
HASH = "blake2b"
_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
    pass


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files do not match its manifest (size or content hash)."""

    def __init__(self, path: Path, detail: str, hint: str = ""):
        self.path, self.detail = path, detail
        super().__init__(f"checkpoint {path} is damaged: {detail}{hint}")


class DiskFullError(CheckpointError):
    """No space left while saving; the partial copy is gone and earlier checkpoints are intact."""


_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an exception behind it is ENOSPC/EDQUOT. torch.save reports it as a
    RuntimeError with the OSError as its context, safetensors as its own error with the OS text."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return True
        if any(os.strerror(code) in str(exc) for code in _FULL):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def state_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) state: about what saving it writes."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def file_digest(path: Path) -> str:
    h = hashlib.new(HASH)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


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
    try:
        _write_files(tmp, step, model_state, train_state, cfg)
    except BaseException as e:
        # nothing half-written stays behind; the checkpoints already in place are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        if not _disk_full(e):
            raise
        need = state_bytes(model_state) + state_bytes(train_state)
        prev = list_checkpoints(root)
        raise DiskFullError(
            f"no space left in {root} while saving step {step}: it needs about {need} bytes "
            f"({need / 2**30:.2f} GiB), {free_bytes(root)} are free. The partial copy was removed and the saved "
            f"checkpoints were not touched (newest: {prev[-1].name if prev else 'none'}). Free space, lower "
            f"runtime.keep_last, or point runtime.output_dir at a larger disk, then --resume auto") from None
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


def _write_files(tmp: Path, step: int, model_state: dict, train_state: dict, cfg: Config) -> None:
    """The checkpoint's files, fsynced, and last its manifest, into the directory ``tmp``."""
    tmp.mkdir()
    # safetensors refuses shared storage and non-contiguous tensors: store plain copies.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model_state.items()}
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"step": str(step), "format": "ivfast"})
    with open(tmp / STATE_FILE, "wb") as f:    # our file object: a failed write keeps its OSError
        torch.save(train_state, f)
    save_config(cfg, tmp / "config.yaml")
    files = {p.name: p.stat().st_size for p in tmp.iterdir()}
    for name in files:
        _fsync(tmp / name)
    # read back from the page cache after fsync: the hash covers the bytes as stored
    digests = {name: file_digest(tmp / name) for name in files}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files, "hash": HASH, "digests": digests}))
    _fsync(tmp / MANIFEST)


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


def verify(path: Path) -> None:
    """Raise :class:`CorruptCheckpointError` naming the first file that does not match the manifest.

    Checkpoints written before content hashes were recorded are checked by size only, with a
    warning."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(path, f"{MANIFEST} is missing or unreadable ({e})") from None
    for name, size in files.items():
        try:
            actual = (path / name).stat().st_size
        except OSError:
            raise CorruptCheckpointError(path, f"{name} is missing") from None
        if actual != size:
            raise CorruptCheckpointError(path, f"{name} has {actual} bytes, the manifest lists {size}")
    digests = manifest.get("digests")
    if not digests:
        warnings.warn(f"checkpoint {path} has no content hashes (written by an older ivfast): checked by size only")
        return
    if manifest.get("hash") != HASH or set(digests) != set(files):
        raise CorruptCheckpointError(path, f"{MANIFEST} lists hashes that do not fit its files")
    for name, want in digests.items():
        if file_digest(path / name) != want:
            raise CorruptCheckpointError(path, f"{name} does not match its {HASH} hash "
                                         f"(corrupted at rest or in a copy)")


def is_valid(path: Path) -> bool:
    """Whether every file of the manifest is present with its size and content hash."""
    try:
        verify(path)
    except CorruptCheckpointError:
        return False
    return True


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Completed checkpoint directories, oldest first (unfinished ``.tmp-*`` ones excluded)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and "-" not in p.name)


def find_latest(ckpt_dir: str | os.PathLike) -> Path | None:
    """Newest valid checkpoint; damaged ones are skipped with a warning naming them and the file."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            verify(path)
            return path
        except CorruptCheckpointError as e:
            warnings.warn(f"skipping damaged checkpoint {e.path}: {e.detail}")
    return None


def _check_dir(path: Path) -> None:
    if not path.is_dir() or not (path / MODEL_FILE).exists():
        raise CheckpointError(f"{path} is not an ivfast checkpoint directory (no {MODEL_FILE}); "
                              f"pass a checkpoints/step_XXXXXXXX directory or --resume auto")


def _numpy_array_globals() -> list:
    """What unpickling a plain NumPy array needs: the array type, dtypes and numpy's array
    constructor. They build arrays of numbers and call nothing else; an object array would need
    further globals, which stay refused."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:              # numpy < 2
        from numpy.core.multiarray import _reconstruct
    numeric = [type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"]     # bool, ints, floats, complex
    return [np.ndarray, np.dtype, _reconstruct, *numeric]


def load_plain(path: Path, numpy_arrays: bool = False):
    """``torch.load`` of tensors and plain data only; anything else is refused unread.

    ``numpy_arrays``: also accept plain NumPy arrays, which train states written by ivfast
    before its RNG states were stored as tensors hold (NumPy's generator key)."""
    try:
        if numpy_arrays:
            with torch.serialization.safe_globals(_numpy_array_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
        why = next((x for x in lines if "GLOBAL" in x or "global" in x), lines[0])[:200]
        raise CheckpointError(f"{path} holds pickled objects other than tensors and plain data ({why}): refused "
                              f"unread, since loading them could run code. ivfast writes none; take the file "
                              f"from its maker again, or start from the model weights alone") from None


def _read(path: Path) -> tuple[dict, dict]:
    model_state = load_file(str(path / MODEL_FILE))
    return model_state, load_plain(path / STATE_FILE, numpy_arrays=True)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """(model_state, train_state) of a verified checkpoint directory; one-line errors otherwise."""
    path = Path(path)
    _check_dir(path)
    try:
        verify(path)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(path, e.detail,
                                     f"; use an older one in {path.parent} or --resume auto") from None
    return _read(path)


def load_latest(ckpt_dir: str | os.PathLike) -> tuple[Path, dict, dict] | None:
    """(path, model_state, train_state) of the newest checkpoint that verifies, each file hashed
    once; damaged ones are skipped with a warning naming them and the file. None when none is left."""
    path = find_latest(ckpt_dir)
    return None if path is None else (path, *_read(path))
