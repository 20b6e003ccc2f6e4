"""The clip loader the training loop iterates: sharded epoch plan, decoding backends, bad-input
accounting, output on the training device.

Lengths and short videos: a video's length is the number of frames that decode (the index's
full probe counts them). Where only the quick probe ran and a stream ends before the
container's count, that video's length is clamped to what decoded, the index cache is
updated, and the clip is planned again from the same video: a *repair*, counted in
``bad_summary()['repaired']``, not a loss. Videos shorter than a clip are sampled with
repeated frames (as the released code does) and counted as ``short``; only those with fewer
than ``data.min_frames`` frames are dropped (as 'too_few_frames').

Output contract (both backends): each batch is ``{'video': [B, 3, T, S, S], 'index': [B] int64}``
on the requested device; ``video`` is uint8, or ImageNet-normalised float when
``data.output='normalized'`` (``data.norm_dtype``: bf16 on CUDA / fp32 on CPU by default);
``index`` holds dataset ids (row numbers of the list, ``loader.path_of(i)`` gives the file).

Epochs and shards: the usable ids are permuted with (seed, epoch); rank r takes every
world_size-th id. So that every rank runs the same number of full batches, the epoch is
rounded to a multiple of world_size x batch: with ``data.drop_last`` False (default) the
permutation is extended by repeating its first ids (every sample is seen at least once; the
repeats get fresh augmentation and are counted as ``padded``); with True the remainder is
dropped (counted as ``dropped``, a different remainder each epoch). No partial batch is ever
yielded, so ``len(loader)`` is exact.

Bad input: files that fail the index probe are left out of the plan and counted by reason;
a file that fails while decoding is counted by reason, logged with its path, and replaced in
its batch by another sample (chosen deterministically), so the batch keeps its shape. Any
exception decoding or cropping one file raises (not only the decoder's) counts as
'decode_error' for that file. When the
bad files exceed ``data.max_bad_fraction`` of the list, loading stops with :class:`DataError`.

Decoder crashes and hangs (PyAV with ``data.num_workers`` >= 1): each worker notes the file it
is decoding in shared memory. A worker killed by a signal (a segfault in FFmpeg, which no
``except`` catches) costs that file, not the run: it is counted as 'decoder_crash', the
workers are restarted, and loading goes on from the batch that was not delivered, the file
replaced like any other bad one (so a resumed run that meets it again gets the same batch). A
decode running past ``data.decode_timeout_s`` has its worker killed and counts as
'decode_timeout'. Inline decoding (``num_workers=0``) and the DALI backend's threads share the
training process and are not covered.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import math
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import torch

from ivfast.ops import channel_constant

from . import dali as dali_mod
from .index import DataError, DatasetIndex, build_index, save_cache
from .pyav import BadSample, decode_frames, resize_flip
from .sampling import ClipPlan, plan_clip, sample_rng
from .sources import read_array

log = logging.getLogger("ivfast.data")

MAX_ATTEMPTS = 16   # replacements tried for one slot before giving up on the batch
MAX_BLIND_RESTARTS = 3   # worker deaths in a row with no file being decoded before giving up
MAX_TIMEOUT_RESTARTS = 3   # restarts in a row for time-outs only: the workers hang, not the files


def normalize(video: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [B, 3, ...] -> ImageNet mean/std normalised ``dtype`` (computed in fp32, cast at the end).

    The fp32 mean/std live on the device once (``ivfast.ops.channel_constant``): no per-batch
    host-to-device copy that would block the host.
    """
    shape = (1, 3) + (1,) * (video.ndim - 2)
    mean = channel_constant(dali_mod.IMAGENET_MEAN, video.device).view(shape)
    std = channel_constant(dali_mod.IMAGENET_STD, video.device).view(shape)
    return ((video.float() / 255.0 - mean) / std).to(dtype)


# --------------------------------------------------------------------------- epoch plan
def epoch_counts(n: int, per_step: int, drop_last: bool) -> dict:
    """How many of an epoch's ``n`` usable samples are used, padded (repeated) and dropped."""
    if drop_last:
        used = (n // per_step) * per_step
        return {"samples": n, "padded": 0, "dropped": n - used}
    return {"samples": n, "padded": math.ceil(n / per_step) * per_step - n, "dropped": 0}


def shard_epoch(ids: np.ndarray, *, seed: int, epoch: int, rank: int, world_size: int,
                batch_size: int, drop_last: bool) -> tuple[np.ndarray, np.ndarray, dict]:
    """This rank's batches for one epoch: (ids [nb, B], repeat [nb, B], stats).

    ``repeat`` is 0 for a sample's first appearance in the epoch and k > 0 for its k-th
    repeat (padding), so padded copies get different augmentation.
    """
    n = len(ids)
    per_step = world_size * batch_size
    if n == 0:
        raise DataError("no usable videos: every file in the list is bad (see the summary above)")
    perm = np.asarray(ids)[np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 7]).permutation(n)]
    stats = epoch_counts(n, per_step, drop_last)
    if drop_last:
        nb = n // per_step
        if nb == 0:
            raise DataError(f"{n} usable videos cannot fill one step of {world_size} ranks x batch "
                            f"{batch_size} with data.drop_last=true; set data.drop_last=false or use more videos")
        used = nb * per_step
        order, rep = perm[:used], np.zeros(used, np.int64)
    else:
        nb = math.ceil(n / per_step)
        total = nb * per_step
        pos = np.arange(total)
        order, rep = perm[pos % n], pos // n
    mine = slice(rank, None, world_size)
    return order[mine].reshape(nb, batch_size), rep[mine].reshape(nb, batch_size), stats


# --------------------------------------------------------------------------- dataset
class ClipDataset(torch.utils.data.Dataset):
    """Decodes one planned clip with PyAV; a failing file is replaced by another usable one.

    Items are keyed by (sample id, epoch, repeat) so the plan does not depend on worker state.
    ``__getitem__`` returns {'video': uint8 [3, T, S, S], 'index': id actually used,
    'bad': [(id, path, reason, detail), ...] failures met on the way,
    'repairs': [(id, path, frames), ...] lengths clamped on the way (see the module docstring)}.
    """

    def __init__(self, index: DatasetIndex, usable: np.ndarray, *, num_frames: int, size: int,
                 sampling: str = "segment", stride: int = 4, scales=(1.0, 0.875, 0.75, 0.66),
                 flip: bool = True, no_flip_sources=("ssv2",), train: bool = True, seed: int = 0,
                 decode_threads: int = 1, min_frames: int = 1, rgb: str = "exact"):
        self.index, self.usable = index, np.asarray(usable, np.int64)
        self.num_frames, self.size, self.sampling, self.stride = num_frames, size, sampling, stride
        self.scales, self.flip, self.no_flip = list(scales), flip, set(no_flip_sources)
        self.train, self.seed, self.decode_threads = train, seed, decode_threads
        self.min_frames = max(1, int(min_frames))
        self.rgb = rgb
        self.crashed: dict[int, tuple[str, str]] = {}   # sid -> (reason, detail): never decoded again
        self.inflight = None     # shared [pid, sid, start] per worker, set by ClipLoader for workers

    def __len__(self) -> int:
        return len(self.index)

    def plan(self, sid: int, epoch: int, rep: int = 0) -> ClipPlan:
        e, info = self.index.entries[sid], self.index.infos[sid]
        return plan_clip(num_frames_video=info.frames, fps=info.fps, width=info.width, height=info.height,
                         num=self.num_frames, out_size=self.size, mode=self.sampling, stride=self.stride,
                         scales=self.scales, flip=self.flip and e.source not in self.no_flip,
                         train=self.train, rng=sample_rng(self.seed, epoch, sid, rep),
                         start_sec=e.start_sec, end_sec=e.end_sec)

    def replacement(self, sid: int, epoch: int, rep: int, attempt: int, failed=()) -> int:
        """A deterministic stand-in for a sample whose file failed (never one that failed in this slot)."""
        rng = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, int(epoch), int(sid), int(rep), 1_000_003 + attempt])
        for _ in range(64):
            cand = int(self.usable[rng.integers(len(self.usable))])
            if cand not in failed:
                return cand
        return cand

    def decode_one(self, sid: int, epoch: int, rep: int) -> torch.Tensor:
        if sid in self.crashed:      # it killed a worker before: not decoded again
            reason, detail = self.crashed[sid]
            raise BadSample(reason, self.index.infos[sid].path, detail)
        plan = self.plan(sid, epoch, rep)
        self._note(sid)
        try:
            # source(): the file's path, or a tar shard member (read in place, see ivfast.data.sources)
            # only the crop is converted to RGB (bit-identical to cropping full frames)
            frames = decode_frames(self.index.infos[sid].source(), plan.frames, threads=self.decode_threads,
                                   crop=plan.crop, rgb=self.rgb)
        finally:
            self._note(-1)
        return resize_flip(frames, plan, self.size)

    def _note(self, sid: int) -> None:
        """In a worker: the file being decoded (-1: none), for the loader to blame if we die."""
        info = torch.utils.data.get_worker_info()
        if self.inflight is None or info is None:
            return
        k = 3 * info.id
        # pid and start before the sid: the watchdog never pairs a file with a stale time or pid
        self.inflight[k] = os.getpid()
        self.inflight[k + 2] = time.monotonic()
        self.inflight[k + 1] = sid

    def repair(self, sid: int, err: BadSample) -> int | None:
        """Clamp a quick-probed video whose stream ended early to the frames it gave.

        Returns the new length, or None when this is no repairable case (a fully verified
        file that now ends early has changed on disk: it is bad)."""
        info = self.index.infos[sid]
        if err.reason != "truncated" or info.verified or not 0 < err.decoded < info.frames:
            return None
        if err.decoded < self.min_frames:
            return None
        info.container_frames = info.container_frames or info.frames
        info.frames = int(err.decoded)
        info.duration = info.frames / info.fps if info.fps > 0 else 0.0
        info.note = f"stream ends after {info.frames} frames, the container lists {info.container_frames}"
        return info.frames

    def load(self, sid: int, epoch: int, rep: int = 0, first_error: BadSample | None = None) -> dict:
        bad, repairs = [], []
        orig = sid
        for attempt in range(MAX_ATTEMPTS):
            if attempt == 0 and first_error is not None:
                err = first_error
            else:
                try:
                    return {"video": self.decode_one(sid, epoch, rep), "index": sid, "bad": bad, "repairs": repairs}
                except BadSample as e:
                    err = e
                    fixed = self.repair(sid, e)
                    if fixed is not None:     # same video, same rng, planned within its real length
                        repairs.append((sid, e.path, fixed))
                        try:
                            return {"video": self.decode_one(sid, epoch, rep), "index": sid, "bad": bad,
                                    "repairs": repairs}
                        except BadSample as e2:
                            err = e2
                    elif e.reason == "truncated" and 0 < e.decoded < self.min_frames and not self.index.infos[sid].verified:
                        err = BadSample("too_few_frames", e.path, f"only {e.decoded} frames decode "
                                        f"(< data.min_frames={self.min_frames})")
                except (MemoryError, DataError):
                    raise
                except Exception as e:
                    # anything else one file makes decoding or cropping raise (a frame size that
                    # does not fit the index's, a decoder bug): that file is bad, not the run
                    err = BadSample("decode_error", self.index.infos[sid].path, f"{type(e).__name__}: {e}")
            bad.append((sid, err.path, err.reason, err.detail))
            sid = self.replacement(orig, epoch, rep, attempt, failed={b[0] for b in bad})
        raise DataError(f"{MAX_ATTEMPTS} files in a row failed to decode while filling one slot "
                        f"(last: {bad[-1][1]}: {bad[-1][2]}: {bad[-1][3]}); the data set is badly damaged")

    def __getitem__(self, key) -> dict:
        sid, epoch, rep = key
        return self.load(int(sid), int(epoch), int(rep))


def collate(items: list[dict]) -> dict:
    return {"video": torch.stack([it["video"] for it in items]),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
            "bad": [b for it in items for b in it["bad"]],
            "repairs": [r for it in items for r in it.get("repairs", ())]}


class _EpochBatches:
    """Batch sampler over the loader's current epoch, from its current position."""

    def __init__(self, loader: "ClipLoader"):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        ids, rep, _ = self.loader._epoch_plan()
        e = self.loader.epoch
        for b in range(self.loader.position, len(ids)):
            yield [(int(i), e, int(r)) for i, r in zip(ids[b], rep[b])]


def _exit_text(exitcode: int) -> str:
    if exitcode >= 0:
        return f"exit code {exitcode}"
    try:
        return f"signal {signal.Signals(-exitcode).name}"
    except ValueError:
        return f"signal {-exitcode}"


class _WorkerGuard:
    """Worker deaths of one DataLoader iterator, seen only where the loader asks for a batch.

    torch's SIGCHLD handler would raise a worker's death in the main thread wherever it runs
    (inside the training step), where it cannot be recovered; so the iterator's workers are
    taken off that handler, and torch's own liveness check in ``next()`` (every 5 s) reports
    the death instead. A watchdog thread kills a worker whose current decode passed
    ``timeout_s``. The iterator internals used (``_workers``, ``_worker_pids_set``) have no
    public equivalent; the torch version is pinned in constraints.txt and the tests cover them.
    """

    def __init__(self, it, inflight, timeout_s: float):
        self.it, self.inflight, self.timeout_s = it, inflight, timeout_s
        self.timed_out: dict[int, int] = {}      # worker id -> sid it was killed for
        if getattr(it, "_worker_pids_set", False):
            torch.utils.data._utils.signal_handling._remove_worker_pids(id(it))
            it._worker_pids_set = False
        self._stop = threading.Event()
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="ivfast-decode-watchdog", daemon=True)
            self._thread.start()

    def decoding(self, wid: int) -> int:
        return int(self.inflight[3 * wid + 1])

    def dead(self) -> dict[int, int]:
        """worker id -> exit code (negative: the signal) of the workers that died."""
        out = {}
        for wid, w in enumerate(self.it._workers):
            if w.exitcode is not None and w.exitcode != 0:
                out[wid] = w.exitcode
        return out

    def _watch(self) -> None:
        period = min(1.0, self.timeout_s / 4)
        while not self._stop.wait(period):
            now = time.monotonic()
            for wid in range(len(self.it._workers)):
                pid, sid, start = (self.inflight[3 * wid + j] for j in range(3))
                if (sid >= 0 and pid > 0 and now - start > self.timeout_s and wid not in self.timed_out
                        and self.it._workers[wid].exitcode is None):      # a dead one is a crash
                    self.timed_out[wid] = int(sid)
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# --------------------------------------------------------------------------- the loader
class ClipLoader:
    """Iterable over one epoch of this rank's batches (see the module docstring)."""

    def __init__(self, dataset: ClipDataset, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, device: str | torch.device = "cpu", output: str = "uint8",
                 norm_dtype: str = "auto", backend: str = "pyav", num_workers: int = 0,
                 drop_last: bool = False, max_bad_fraction: float = 0.01, prefetch: int = 2,
                 decode_threads: int = 2, index_bad: Counter | None = None,
                 index_bad_paths: dict | None = None, decode_timeout_s: float = 0.0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.seed, self.device, self.output = seed, torch.device(device), output
        self.drop_last, self.max_bad_fraction = drop_last, max_bad_fraction
        self.prefetch, self.decode_threads, self.num_workers = max(1, prefetch), decode_threads, num_workers
        self.decode_timeout_s = float(decode_timeout_s)
        self._last_blamed = ""       # the latest file a dead worker was decoding
        if norm_dtype == "auto":
            norm_dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.norm_dtype = getattr(torch, norm_dtype)
        self.epoch, self.position = 0, 0
        self.index_bad = Counter(index_bad or {})
        self.index_bad_paths = dict(index_bad_paths or {})
        self.decode_bad: Counter = Counter()          # failures while decoding, all epochs
        self.epoch_bad: Counter = Counter()           # failures while decoding, this epoch
        self.decode_bad_files: dict[str, str] = {}    # path -> reason (distinct files)
        self.dali_fallback_batches = 0
        self.repaired: dict[str, int] = {}            # path -> decodable length found while training
        self._repair_version = 0                      # bumped per repair: invalidates short_count's cache
        self.backend, self.dali = backend, None
        if backend == "dali":
            gpu = self.device.type == "cuda"
            dev_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu else None
            half = self.norm_dtype == torch.float16
            self.dali = dali_mod.DaliClipDecoder(batch_size, dataset.num_frames, dataset.size, dev_id,
                                                 num_threads=decode_threads, output=output, half=half, seed=seed)
        self._dl = None

    # ---- bookkeeping
    def _epoch_plan(self):
        return shard_epoch(self.dataset.usable, seed=self.seed, epoch=self.epoch, rank=self.rank,
                           world_size=self.world_size, batch_size=self.batch_size, drop_last=self.drop_last)

    def __len__(self) -> int:
        per_step = self.world_size * self.batch_size
        n = len(self.dataset.usable)
        return n // per_step if self.drop_last else math.ceil(n / per_step)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (unless a loaded state put us inside this very epoch)."""
        if epoch != self.epoch:
            self.epoch, self.position = int(epoch), 0
            self.epoch_bad.clear()

    def epoch_stats(self) -> dict:
        # arithmetic only: the log step used to re-permute the whole epoch for these counts
        return epoch_counts(len(self.dataset.usable), self.world_size * self.batch_size, self.drop_last)

    def path_of(self, sample_id: int) -> str:
        return self.dataset.index.infos[int(sample_id)].path

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_samples": len(self.dataset.index), "usable": len(self.dataset.usable),
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_samples", "world_size", "batch_size"):
            mine = self.state_dict()[key]
            if state.get(key, mine) != mine:
                raise DataError(f"cannot resume the data loader: {key} was {state[key]} when saved and is "
                                f"{mine} now; resume with the same data list, seed, world size and batch size")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.epoch_bad.clear()

    def bad_summary(self) -> dict:
        """Bad files by reason: found when indexing, and met while decoding (events and files)."""
        total = len(self.dataset.index)
        bad_files = sum(self.index_bad.values()) + len(self.decode_bad_files)
        examples: dict[str, list[str]] = defaultdict(list)
        for path, reason in list(self.index_bad_paths.items()) + list(self.decode_bad_files.items()):
            if len(examples[reason]) < 5:
                examples[reason].append(path)
        return {"files": total, "bad_files": bad_files, "bad_fraction": bad_files / max(1, total),
                "index": dict(self.index_bad), "decode": dict(self.decode_bad),
                "decode_this_epoch": dict(self.epoch_bad), "decode_bad_files": len(self.decode_bad_files),
                "examples": dict(examples), "dali_fallback_batches": self.dali_fallback_batches,
                "repaired": len(self.repaired), "short": self.short_count(),
                **self.epoch_stats()}

    def short_count(self) -> int:
        """Usable videos with fewer frames than a clip (sampled with repeated frames); cached
        until a repair changes a length (a Python pass over ~1 M videos at every log step costs
        ~0.1 s of host time while the GPU waits)."""
        key = self._repair_version
        if getattr(self, "_short_cache", (None, 0))[0] != key:
            infos = self.dataset.index.infos
            n = sum(1 for i in self.dataset.usable if infos[int(i)].frames < self.dataset.num_frames)
            self._short_cache = (key, n)
        return self._short_cache[1]

    def _apply_repairs(self, repairs) -> None:
        """Workers clamp their copy of the index; bring the clamp here and into the cache, so
        later epochs (fresh workers) and later runs plan within the real length."""
        changed = False
        for sid, path, frames in repairs:
            if self.repaired.get(path) == frames:
                continue
            if self.dataset.index.infos[sid].frames != frames:     # not yet applied in this process
                self.dataset.repair(sid, BadSample("truncated", path, "", decoded=frames))
            self.repaired[path] = frames
            self._repair_version += 1
            changed = True
            log.info("video %s: the stream ends after %d frames (the container lists more); length clamped, "
                     "clip sampled again from it", path, frames)
        idx = self.dataset.index
        if changed and idx.cache_path:
            save_cache(idx.cache_path, {i.path: i for i in idx.infos}.values())

    def _account(self, bad: list, repairs=()) -> None:
        if repairs:
            self._apply_repairs(repairs)
        for sid, path, reason, detail in bad:
            self.decode_bad[reason] += 1
            self.epoch_bad[reason] += 1
            if path not in self.decode_bad_files:
                self.decode_bad_files[path] = reason
                log.warning("bad video (%s) %s: %s; replaced in its batch by another sample", reason, path, detail)
        if bad:
            s = self.bad_summary()
            if s["bad_fraction"] > self.max_bad_fraction:
                raise DataError(f"{s['bad_files']} of {s['files']} videos are bad ({s['bad_fraction']:.1%} > "
                                f"data.max_bad_fraction={self.max_bad_fraction}): index {s['index']}, while "
                                f"decoding {s['decode']}; e.g. {s['examples']}. Fix or remove these files "
                                "(python -m ivfast.data inspect LIST lists them), or raise data.max_bad_fraction")

    def _finish(self, batch: dict) -> dict:
        video = batch["video"]
        if video.device != self.device:
            video = video.to(self.device, non_blocking=True)
        if self.output == "normalized" and video.dtype == torch.uint8:
            video = normalize(video, self.norm_dtype)
        elif self.output == "normalized" and video.dtype != self.norm_dtype:
            video = video.to(self.norm_dtype)
        return {"video": video, "index": batch["index"].to(self.device, non_blocking=True)}

    # ---- iteration
    def __iter__(self) -> Iterator[dict]:
        source = self._iter_dali() if self.backend == "dali" else self._iter_pyav()
        try:
            for batch in source:
                self._account(batch["bad"], batch.get("repairs", ()))
                out = self._finish(batch)
                self.position += 1      # counted as consumed once handed over: state_dict() resumes after it
                yield out
        finally:                        # a consumer that stops early also stops the producer
            source.close()
        if self.epoch_bad:
            log.warning("epoch %d: %d decode failures %s (replaced); totals: %s", self.epoch,
                        sum(self.epoch_bad.values()), dict(self.epoch_bad), self.bad_summary())
        else:
            log.info("epoch %d done: %d batches, no decode failures; index-time bad files: %s",
                     self.epoch, self.position, dict(self.index_bad) or "none")
        self.epoch, self.position = self.epoch + 1, 0     # a following plain iteration runs the next epoch
        self.epoch_bad.clear()

    def _iter_pyav(self) -> Iterator[dict]:
        if self._dl is None:
            kw: dict[str, Any] = {}
            if self.num_workers > 0:
                # Fresh workers each epoch (~0.5 s to fork): persistent ones took ~5 s per worker
                # to shut down when the loader was dropped (torch 2.13).
                kw = {"persistent_workers": False, "prefetch_factor": self.prefetch}
                self.dataset.inflight = multiprocessing.RawArray(ctypes.c_double, 3 * self.num_workers)
            self._dl = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=_EpochBatches(self), num_workers=self.num_workers,
                collate_fn=collate, pin_memory=self.device.type == "cuda", **kw)
        if self.num_workers == 0:
            yield from self._dl
            return
        blind = hung = 0
        while True:
            # Collect cyclic garbage before the workers fork (each epoch): a PyAV decoder left in
            # a cycle here would be freed in a child, whose FFmpeg threads do not exist, and the
            # worker hangs at start-up (seen with frame-threaded H.264 decoders).
            gc.collect()
            self.dataset.inflight[:] = [0.0, -1.0, 0.0] * self.num_workers
            it = iter(self._dl)          # from self.position: the first batch not handed over
            guard = _WorkerGuard(it, self.dataset.inflight, self.decode_timeout_s)
            try:
                while True:
                    try:
                        batch = next(it)
                    except StopIteration:
                        return
                    except RuntimeError:
                        dead = guard.dead()
                        if not dead:
                            raise
                        break
                    blind = hung = 0
                    yield batch
            finally:
                guard.stop()
            blamed, timed_out = self._blame(dead, guard)
            del it, guard                # shuts the remaining workers down
            blind = 0 if blamed else blind + 1
            hung = hung + 1 if blamed and timed_out == blamed else 0
            if hung >= MAX_TIMEOUT_RESTARTS:
                raise DataError(f"the workers were killed {hung} times in a row for decodes past "
                                f"data.decode_timeout_s={self.decode_timeout_s:g}, each on another file "
                                f"(latest: {self._last_blamed}): more likely the workers hang than the files "
                                "(e.g. a library with threads used in the training process before the "
                                "workers forked). Check those files with python -m ivfast.data inspect, "
                                "raise data.decode_timeout_s, or try data.num_workers=0")
            if blind >= MAX_BLIND_RESTARTS:
                raise DataError(f"DataLoader workers died {blind} times in a row while decoding no file "
                                f"({dead}): not a decoder crash; check the host's memory (OOM killer) "
                                "and dmesg, or run with data.num_workers=0 to see the error")

    def _blame(self, dead: dict[int, int], guard: "_WorkerGuard") -> tuple[int, int]:
        """Mark the files the dead workers were decoding (the restarted workers skip them);
        returns (files blamed, of which for a time-out)."""
        blamed = timed = 0
        for wid, exitcode in dead.items():
            timed_out = wid in guard.timed_out and exitcode == -signal.SIGKILL
            sid = guard.timed_out[wid] if timed_out else guard.decoding(wid)
            how = _exit_text(exitcode)
            if sid < 0:
                log.warning("DataLoader worker %d died (%s) while decoding no file", wid, how)
                continue
            path = self.path_of(sid)
            if timed_out:
                reason = "decode_timeout"
                detail = f"decoding ran past data.decode_timeout_s={self.decode_timeout_s:g}; its worker was killed"
            else:
                reason, detail = "decoder_crash", f"the decoder killed its worker ({how})"
            self.dataset.crashed[sid] = (reason, detail)
            self._last_blamed = path
            blamed += 1
            timed += timed_out
            log.warning("DataLoader worker %d died (%s) decoding %s: counted as bad (%s); restarting the "
                        "workers at batch %d of epoch %d", wid, how, path, reason, self.position, self.epoch)
        return blamed, timed

    def _iter_dali(self) -> Iterator[dict]:
        """A producer thread routes each batch (DALI for its codecs, PyAV threads for the rest)."""
        ids, rep, _ = self._epoch_plan()
        epoch, start = self.epoch, self.position
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce():
            try:
                with ThreadPoolExecutor(max(1, self.decode_threads)) as pool:
                    for b in range(start, len(ids)):
                        if stop.is_set():
                            return
                        q.put(self._dali_batch(ids[b], rep[b], epoch, pool))
                q.put(None)
            except BaseException as e:  # hand the error to the consumer
                q.put(e)

        thread = threading.Thread(target=produce, name="ivfast-dali-producer", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():     # unblock a producer waiting on a full queue
                try:
                    q.get(timeout=0.1)
                except queue.Empty:
                    pass

    def _dali_batch(self, ids: np.ndarray, rep: np.ndarray, epoch: int, pool: ThreadPoolExecutor) -> dict:
        ds, n = self.dataset, len(ids)
        rows: list[Any] = [None] * n
        out_ids, bad, repairs = [int(i) for i in ids], [], []
        on_dali = [k for k in range(n) if ds.index.infos[int(ids[k])].codec in self.dali.codecs]
        first_err: dict[int, BadSample] = {}
        data, keep = [], []
        for k in on_dali:
            path = ds.index.infos[int(ids[k])].source()
            try:
                # DALI decodes the bytes it is handed: a shard member's bytes are read from the tar
                # directly (its file reader, which cannot open tar members, is not used)
                data.append(read_array(path))
                keep.append(k)
            except OSError as e:
                first_err[k] = BadSample("missing", path, str(e))
        if keep:
            try:
                video = self.dali.decode(data, [ds.plan(int(ids[k]), epoch, int(rep[k])) for k in keep])
                for j, k in enumerate(keep):
                    rows[k] = video[j]
            except dali_mod.DaliError as e:
                # Which file broke the batch is unknown: decode these with PyAV, which finds it.
                self.dali_fallback_batches += 1
                log.warning("DALI failed on a batch (%s); decoding its %d clips with PyAV", e, len(keep))
        todo = [k for k in range(n) if rows[k] is None]
        results = pool.map(lambda k: ds.load(int(ids[k]), epoch, int(rep[k]), first_err.get(k)), todo)
        for k, res in zip(todo, results):
            rows[k], out_ids[k] = res["video"], res["index"]
            bad.extend(res["bad"])
            repairs.extend(res.get("repairs", ()))
        dev = next((r.device for r in rows if r.device.type == "cuda"), torch.device("cpu"))
        if any(r.dtype != rows[0].dtype for r in rows):
            # mixed sources with normalisation in the DALI graph: bring the PyAV rows to match
            dtype = next(r.dtype for r in rows if r.dtype != torch.uint8)
            rows = [normalize(r[None].to(dev), dtype)[0] if r.dtype == torch.uint8 else r for r in rows]
        video = torch.stack([r.to(dev, non_blocking=True) for r in rows])
        return {"video": video, "index": torch.tensor(out_ids, dtype=torch.int64), "bad": bad, "repairs": repairs}


# --------------------------------------------------------------------------- construction
def choose_backend(requested: str, device: torch.device) -> str:
    """'auto': DALI when a CUDA device is used and DALI imports, else PyAV. 'dali' insists."""
    ok, why = dali_mod.dali_status()
    if requested == "pyav":
        return "pyav"
    if requested == "dali":
        if not ok:
            raise DataError(f"data.backend='dali' but {why}; or set data.backend=pyav")
        return "dali"
    if requested != "auto":
        raise DataError(f"data.backend={requested!r} unknown; choose auto, dali or pyav")
    if device.type == "cuda" and ok:
        return "dali"
    if device.type == "cuda":
        log.warning("DALI unavailable (%s): decoding with PyAV on the CPU", why)
    return "pyav"


def split_usable(index: DatasetIndex, min_frames: int = 1) -> tuple[np.ndarray, Counter, dict]:
    """Ids of usable files, and the bad ones counted by reason (fewer than ``min_frames``
    frames counts as too_few_frames; videos shorter than a clip are usable, frames repeat)."""
    usable, bad, paths = [], Counter(), {}
    for i, info in enumerate(index.infos):
        reason = info.error or ("too_few_frames" if info.frames < min_frames else "")
        if reason:
            bad[reason] += 1
            paths[info.path] = reason
        else:
            usable.append(i)
    return np.asarray(usable, np.int64), bad, paths


class DeviceClips:
    """The output contract without files: one batch of random clips (uint8, or normalised as
    ``data.output`` asks) on ``device``, yielded forever. For runs that time or rehearse the
    training step rather than read data (``bench/bench_train_step.py``, ``ivfast.rehearse``)."""

    def __init__(self, cfg, device: torch.device | str):
        device = torch.device(device)
        B, T, S = cfg.optim.batch_per_gpu, cfg.model.num_frames, cfg.model.img_size
        g = torch.Generator().manual_seed(0)
        video = torch.randint(0, 256, (B, 3, T, S, S), generator=g, dtype=torch.uint8).to(device)
        if cfg.data.output == "normalized":
            name = cfg.data.norm_dtype
            if name == "auto":
                name = "bfloat16" if device.type == "cuda" else "float32"
            video = normalize(video, getattr(torch, name))
        self.batch = {"video": video, "index": torch.arange(B, device=device)}

    def __len__(self) -> int:
        return 1 << 30

    def __iter__(self):
        while True:
            yield self.batch

    def set_epoch(self, epoch: int) -> None:
        pass


def build_loader(cfg, *, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 train: bool = True, index: DatasetIndex | None = None) -> ClipLoader:
    """Index ``cfg.data.train_list`` (cached), check the bad fraction, and build this rank's loader.

    Batch per rank: ``cfg.optim.batch_per_gpu``; clip: ``cfg.model.num_frames`` frames of
    ``cfg.model.img_size`` px (what the model takes); seed ``cfg.runtime.seed``. Pass ``index`` to
    reuse one already built.
    """
    d = cfg.data
    num_frames, size = cfg.model.num_frames, cfg.model.img_size
    device = torch.device(device)
    backend = choose_backend(d.backend, device)
    if index is None:
        workers = max(1, min(d.num_workers, os.cpu_count() or 1))
        # DALI can crash on a corrupt payload instead of raising: decode every file once first.
        full = d.verify == "full" or (d.verify == "auto" and backend == "dali")
        index = build_index(d.train_list, d.root, d.index_cache, workers=workers, full=full)
    usable, bad, bad_paths = split_usable(index, d.min_frames)
    short = sum(1 for i in usable if index.infos[int(i)].frames < num_frames)
    if short:
        log.info("%d of %d usable videos have fewer than %d frames: sampled with repeated frames "
                 "(data.min_frames=%d decides what is dropped)", short, len(usable), num_frames, d.min_frames)
    for path, reason in list(bad_paths.items())[:20]:
        detail = next((i.detail for i in index.infos if i.path == path), "")
        log.warning("skipping bad video (%s) %s %s", reason, path, detail)
    if len(bad_paths) > 20:
        log.warning("... and %d more bad videos", len(bad_paths) - 20)
    total = len(index)
    if bad and sum(bad.values()) / max(1, total) > d.max_bad_fraction:
        raise DataError(f"{sum(bad.values())} of {total} videos in {d.train_list} are bad ({dict(bad)}; "
                        f"> data.max_bad_fraction={d.max_bad_fraction}), e.g. {list(bad_paths.items())[:5]}. "
                        "Fix or remove them (python -m ivfast.data inspect LIST lists them) or raise "
                        "data.max_bad_fraction")
    if d.rgb == "fast" and backend == "dali":
        log.warning("data.rgb=fast with the DALI backend: files DALI cannot decode go to PyAV and convert "
                    "to RGB differently (~44 dB); use data.rgb=exact for one conversion everywhere")
    dataset = ClipDataset(index, usable, num_frames=num_frames, size=size, sampling=d.sampling,
                          stride=d.stride, scales=d.scales, flip=d.flip, no_flip_sources=d.no_flip_sources,
                          train=train, seed=cfg.runtime.seed, decode_threads=1 if d.num_workers > 0 else d.decode_threads,
                          min_frames=d.min_frames, rgb=d.rgb)
    kw = dict(batch_size=cfg.optim.batch_per_gpu, rank=rank, world_size=world_size, seed=cfg.runtime.seed,
              device=device, output=d.output, norm_dtype=d.norm_dtype, num_workers=d.num_workers,
              drop_last=d.drop_last, max_bad_fraction=d.max_bad_fraction, prefetch=d.prefetch,
              decode_threads=d.decode_threads, index_bad=bad, index_bad_paths=bad_paths,
              decode_timeout_s=d.decode_timeout_s)
    try:
        return ClipLoader(dataset, backend=backend, **kw)
    except Exception as e:
        if not (backend == "dali" and d.backend == "auto"):
            raise
        # DALI imports but cannot build (e.g. its CUDA libraries do not match the driver)
        log.warning("DALI pipeline could not be built (%s: %s); decoding with PyAV instead",
                    type(e).__name__, e)
        return ClipLoader(dataset, backend="pyav", **kw)
