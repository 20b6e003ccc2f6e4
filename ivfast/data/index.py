"""Dataset index: read a list (CSV/TSV, the released code's format or a directory scan),
probe every file once with PyAV, cache the result keyed by (path, size, mtime).

List formats accepted by :func:`read_list`:

* **CSV / TSV**: ``path[,label]`` per line; an optional header row names the columns
  (``path``, ``label``, ``source``, ``start_sec``, ``end_sec``, ``offset``, ``size``) in any order.
  A path ``<file>.tar#<member>`` is a member of a tar shard, with ``offset``/``size`` the byte
  range of its data (``ivfast.data.shards``; without them the tar's headers are read).
* **The released InternVideo-Next format**, fields split by single spaces:
  ``source path total_sec start_sec end_sec label`` (6 fields) or, without the source,
  ``path total_sec start_sec end_sec label`` (5 fields). Times of -1 mean the whole video.
  ``source`` is kept (``ssv2`` turns horizontal flipping off, see ``DataConfig.no_flip_sources``).
* ``path label`` or a bare ``path`` per line.
* **A directory**: every video file below it (by extension), sorted.

Blank lines and lines starting with ``#`` are skipped. Relative paths are joined to ``root``.
"""
from __future__ import annotations

import csv
import functools
import json
import logging
import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from .sources import (VIDEO_EXTS, CorruptStream, Member, absolute, is_member_path, iter_frames, open_video, source_of,
                      split_member_path)

log = logging.getLogger("ivfast.data")

# Why a file cannot be used, in the order a file meets the checks.
BAD_REASONS = (
    "missing",            # the path does not exist
    "empty",              # zero bytes
    "unreadable",         # the container cannot be opened (corrupt header, not a video at all)
    "no_video_stream",    # opens, but holds no video stream (audio only, subtitles, ...)
    "unsupported_codec",  # no decoder available for its codec
    "too_few_frames",     # fewer frames decode than data.min_frames
    "truncated",          # a fully verified file now ends before its verified length (changed on disk)
    "decode_error",       # a packet inside the stream fails to decode (corrupt payload)
)

# 2: frames = decodable frames, container_frames and note added (v1 marked over-stated files bad)
CACHE_VERSION = 2


class DataError(RuntimeError):
    """Bad data configuration or too many bad files; the message names the cause and the fix."""


@dataclass
class Entry:
    """One line of the list (and one sample to pack into shards)."""
    path: str
    label: int = -1
    source: str = ""
    start_sec: float = -1.0
    end_sec: float = -1.0
    offset: int = -1         # a tar shard member (path '<tar>#<member>'): its data's byte range
    size: int = -1
    frames: int = 0          # frames that decode, when known (packing checks it); not a list column


@dataclass
class VideoInfo:
    """What probing found out about one file. ``error`` is '' for a usable file, else a BAD_REASON."""
    path: str
    size: int = 0
    mtime_ns: int = 0
    codec: str = ""
    frames: int = 0
    fps: float = 0.0
    width: int = 0
    height: int = 0
    duration: float = 0.0
    error: str = ""
    detail: str = ""
    verified: bool = False   # every frame was decoded once (probe(full=True))
    container_frames: int = 0   # what the container says (header count, or packets); 0 = unknown
    note: str = ""           # a harmless oddity, e.g. fewer frames decode than the container lists
    member_offset: int = -1  # a tar shard member: its data's byte range (size/mtime are the tar's)
    member_size: int = -1

    @property
    def ok(self) -> bool:
        return not self.error

    def source(self) -> str:
        """What the decoders open: the path, or a :class:`~ivfast.data.sources.Member` of a shard."""
        return source_of(self.path, self.member_offset, self.member_size, lookup=False)


@dataclass
class DatasetIndex:
    """The list's entries with their probe results, in list order (position = dataset id)."""
    entries: list[Entry]
    infos: list[VideoInfo]
    probed: int = 0          # files probed this time (the rest came from the cache)
    cache_path: str = ""
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)


# --------------------------------------------------------------------------- list reading
def _resolve(path: str, root: str) -> str:
    path = path.strip()
    if root and not os.path.isabs(path):
        path = os.path.join(root, path)
    return path


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def scan_dir(directory: str | Path) -> list[Entry]:
    """Every file with a video extension below ``directory``, sorted by path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for name in filenames:
            if os.path.splitext(name)[1].lower() in VIDEO_EXTS:
                found.append(os.path.join(dirpath, name))
    return [Entry(p) for p in sorted(found)]


def write_list(path: str, entries: list[Entry]) -> None:
    """Write ``entries`` as a CSV list with a header, which :func:`read_list` reads back; the
    ``offset``/``size`` columns only when some entry is a tar shard member. Atomic (tmp + rename)."""
    members = any(e.offset >= 0 for e in entries)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "source", "start_sec", "end_sec"] + (["offset", "size"] if members else []))
        for e in entries:
            w.writerow([e.path, e.label, e.source, e.start_sec, e.end_sec] + ([e.offset, e.size] if members else []))
    os.replace(tmp, path)


def read_list(list_path: str | Path, root: str = "") -> list[Entry]:
    """Parse a list file (see the module docstring for formats) or scan a directory."""
    list_path = str(list_path)
    if not list_path:
        raise DataError("no data list given: set data.train_list to a CSV/TSV list, a list in the "
                        "released code's format, or a directory of videos")
    if os.path.isdir(list_path):
        entries = scan_dir(list_path)
        if not entries:
            raise DataError(f"{list_path}: no video files found (extensions {sorted(VIDEO_EXTS)})")
        return entries
    if not os.path.exists(list_path):
        raise DataError(f"data list {list_path!r} does not exist")
    with open(list_path, newline="") as f:
        lines = [ln.rstrip("\r\n") for ln in f]
    lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise DataError(f"{list_path}: the list holds no entries")
    first = lines[0]
    if "\t" in first or "," in first or first.strip().lower() == "path":
        return _read_delimited(lines, "\t" if "\t" in first else ",", root, list_path)
    return [_read_space_line(ln, root, list_path, i) for i, ln in enumerate(lines)]


def _read_delimited(lines: list[str], delim: str, root: str, list_path: str) -> list[Entry]:
    rows = list(csv.reader(lines, delimiter=delim))
    columns = ["path", "label"]
    if rows and rows[0] and rows[0][0].strip().lower() == "path":
        columns = [c.strip().lower() for c in rows[0]]
        rows = rows[1:]
        unknown = set(columns) - {"path", "label", "source", "start_sec", "end_sec", "offset", "size"}
        if unknown:
            raise DataError(f"{list_path}: unknown columns {sorted(unknown)} in the header; "
                            "known: path, label, source, start_sec, end_sec, offset, size")
    entries = []
    for n, row in enumerate(rows):
        if not row or not row[0].strip():
            continue
        rec = dict(zip(columns, (c.strip() for c in row)))
        try:
            entries.append(Entry(
                path=_resolve(rec["path"], root),
                label=int(rec["label"]) if rec.get("label", "") != "" else -1,
                source=rec.get("source", ""),
                start_sec=float(rec.get("start_sec") or -1), end_sec=float(rec.get("end_sec") or -1),
                offset=int(rec.get("offset") or -1), size=int(rec.get("size") or -1)))
        except ValueError as e:
            raise DataError(f"{list_path}: row {n + 1} {row!r} is malformed ({e})") from e
    return entries


def _read_space_line(line: str, root: str, list_path: str, n: int) -> Entry:
    f = line.split()
    try:
        if len(f) == 6 and all(_is_number(x) for x in f[2:6]):     # released: source path total start end label
            return Entry(_resolve(f[1], root), int(float(f[5])), f[0], float(f[3]), float(f[4]))
        if len(f) == 5 and all(_is_number(x) for x in f[1:5]):     # path total start end label
            return Entry(_resolve(f[0], root), int(float(f[4])), "", float(f[2]), float(f[3]))
        if len(f) == 2 and _is_number(f[1]):
            return Entry(_resolve(f[0], root), int(float(f[1])))
        if len(f) == 1:
            return Entry(_resolve(f[0], root))
    except ValueError:
        pass
    raise DataError(f"{list_path}: line {n + 1} {line!r} is not in a known format; expected "
                    "'source path total_sec start_sec end_sec label', 'path total_sec start_sec end_sec "
                    "label', 'path label', 'path', or a CSV/TSV 'path,label'")


# --------------------------------------------------------------------------- probing
def decoder_available(codec: str) -> bool:
    """Whether this PyAV/FFmpeg build can decode ``codec``."""
    import av

    try:
        av.codec.Codec(codec, "r")
        return True
    except Exception:
        return False


def probe(path: str, full: bool = False) -> VideoInfo:
    """Open ``path`` once: codec, frame count, fps, size; decode the first frame to prove it decodes.

    The frame count comes from the container when it records one, else from counting the
    stream's packets (demuxing only, no decoding). With ``full`` every frame is decoded and
    the frames that decode are the video's length (slower, once per file; the index cache
    keeps it; ``container_frames`` keeps the container's count and ``note`` the difference):
    this also catches corrupt payloads past the first frame, which DALI's decoder may crash
    on rather than report. A stream whose last packets fail (cut mid-GOP) is not bad: its
    length is the frames before the failure. Never raises:
    a bad file comes back with ``error`` set to one of :data:`BAD_REASONS` and ``detail``
    saying what happened.
    """
    import av

    info = VideoInfo(path=path)
    try:
        st = os.stat(split_member_path(path)[0] if is_member_path(path) else path)
    except OSError as e:
        info.error, info.detail = "missing", str(e)
        return info
    info.size, info.mtime_ns = st.st_size, st.st_mtime_ns
    if is_member_path(path):    # a tar shard member: its byte range must lie inside the tar
        try:
            path = source_of(path, getattr(path, "offset", -1), getattr(path, "size", -1))
        except Exception as e:
            info.error, info.detail = "missing", f"{type(e).__name__}: {e}"
            return info
        info.member_offset, info.member_size = path.offset, path.size
        if path.offset + path.size > st.st_size:
            info.error, info.detail = "truncated", (f"the shard has {st.st_size} bytes and ends inside this member "
                                                    f"(bytes {path.offset}..{path.offset + path.size})")
            return info
    if (info.member_size if is_member_path(path) else st.st_size) == 0:
        info.error, info.detail = "empty", "file has 0 bytes"
        return info
    try:
        container = open_video(path, metadata_errors="ignore")
    except Exception as e:
        info.error, info.detail = "unreadable", f"{type(e).__name__}: {e}"
        return info
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            info.error, info.detail = "no_video_stream", f"streams: {', '.join(kinds)}"
            return info
        stream = container.streams.video[0]
        ctx = stream.codec_context
        info.codec = ctx.name if ctx is not None else ""
        info.width, info.height = (ctx.width, ctx.height) if ctx is not None else (0, 0)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        info.fps = float(rate) if rate else 0.0
        if not info.codec or not decoder_available(info.codec):
            info.error, info.detail = "unsupported_codec", f"no decoder for codec {info.codec or '?'}"
            return info
        try:   # decode the first frame: proves the payload is a video this build can read
            first = next(container.decode(stream), None)
        except Exception as e:
            info.error, info.detail = "decode_error", f"first frame: {type(e).__name__}: {e}"
            return info
        if first is None:
            info.error, info.detail = "decode_error", "no frame could be decoded"
            return info
        info.width, info.height = first.width, first.height
        listed = stream.frames
        n = listed
        if n <= 0:
            try:
                container.seek(0)
                n = sum(1 for p in container.demux(stream) if p.size)
            except Exception as e:
                info.error, info.detail = "truncated", f"demuxing failed: {type(e).__name__}: {e}"
                return info
        info.container_frames = int(n)
        # A header that promises clearly more than the packets hold (e.g. a WebM whose download
        # stopped): the packets are the video; the shortfall is a note.
        if container.duration and info.fps > 0 and listed <= 0:
            promised = container.duration / 1e6 * info.fps
            if n < 0.9 * promised - 2:
                info.note = f"{n} frames of ~{promised:.0f} promised by the header"
        if full:
            # The video's length is what decodes; container counts are often off (edit lists,
            # a cut mid-GOP, a partial last packet), by one frame or by hundreds.
            try:
                container.seek(0)
                decoded = sum(1 for _ in iter_frames(container, stream))
            except CorruptStream as e:
                info.error, info.detail = "decode_error", f"full decode: {e}"
                return info
            except Exception as e:
                info.error, info.detail = "decode_error", f"full decode: {type(e).__name__}: {e}"
                return info
            if decoded == 0:
                info.error, info.detail = "decode_error", "full decode: no frame decodes"
                return info
            if decoded != n:
                info.note = f"{decoded} frames decode, the container lists {n}"
            n, info.verified = decoded, True
        info.frames = int(n)
        if info.fps > 0:
            info.duration = info.frames / info.fps
    return info


# --------------------------------------------------------------------------- cache
def default_cache_path(list_path: str) -> str:
    p = Path(list_path)
    if p.is_dir():
        return str(p / ".ivfast_index.jsonl")
    return str(p.with_name(p.name + ".index.jsonl"))


def load_cache(cache_path: str) -> dict[str, VideoInfo]:
    """Read a cache file; a missing, old-version or damaged cache is treated as empty."""
    out: dict[str, VideoInfo] = {}
    try:
        with open(cache_path) as f:
            head = json.loads(f.readline() or "{}")
            if head.get("ivfast_index") != CACHE_VERSION:
                return {}
            for line in f:
                rec = VideoInfo(**json.loads(line))
                out[rec.path] = rec
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError) as e:
        log.warning("index cache %s is unreadable (%s); probing again", cache_path, e)
        return {}
    return out


def save_cache(cache_path: str, infos: Iterable[VideoInfo]) -> bool:
    """Write atomically (temp file + rename). Returns False (with a warning) when not writable."""
    tmp = f"{cache_path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps({"ivfast_index": CACHE_VERSION}) + "\n")
            for info in infos:
                f.write(json.dumps(asdict(info)) + "\n")
        os.replace(tmp, cache_path)
        return True
    except OSError as e:
        log.warning("cannot write the index cache %s (%s); the next run probes again", cache_path, e)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False


def _cache_valid(rec: VideoInfo | None, path: str, full: bool = False) -> bool:
    """A cached record still describes ``path``: same size and mtime (the tar's, for a shard
    member, and then also the same byte range in it)."""
    if rec is None or (full and rec.ok and not rec.verified):
        return False
    if isinstance(path, Member) and (rec.member_offset, rec.member_size) != (path.offset, path.size):
        return False
    try:
        st = os.stat(split_member_path(path)[0] if is_member_path(path) else path)
    except OSError:
        return rec.error == "missing"
    return rec.error != "missing" and rec.size == st.st_size and rec.mtime_ns == st.st_mtime_ns


def probe_many(paths: list[str], workers: int = 0, full: bool = False) -> list[VideoInfo]:
    """Probe ``paths`` in parallel processes (serially when few files or ``workers`` <= 1)."""
    fn = functools.partial(probe, full=full)
    if workers <= 1 or len(paths) < 32:
        return [fn(p) for p in paths]
    # fork is cheap and safe here (children only run PyAV); spawn elsewhere.
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
        return list(ex.map(fn, paths, chunksize=max(1, min(256, len(paths) // (4 * workers)))))


def check_shards(entries: list[Entry], list_path: str) -> None:
    """A tar shard the list refers to that does not exist is a set-up error (a whole shard of
    samples, usually an unmounted or mistyped data root), not a bad file: one clear line."""
    tars: dict[str, int] = {}
    for e in entries:
        if is_member_path(e.path):
            tar = split_member_path(os.path.abspath(e.path))[0]
            tars[tar] = tars.get(tar, 0) + 1
    missing = [t for t in tars if not os.path.isfile(t)]
    if missing:
        raise DataError(f"{list_path}: shard {missing[0]} does not exist ({len(missing)} of {len(tars)} shards "
                        f"missing, {sum(tars[t] for t in missing)} samples); check data.root / the mount, or "
                        "write the shards again (python -m ivfast.data shard LIST OUT_DIR)")


def build_index(list_path: str, root: str = "", cache_path: str = "", workers: int = 0,
                use_cache: bool = True, full: bool = False) -> DatasetIndex:
    """Read the list and probe every file not already in the cache (by path, size and mtime).

    ``full``: decode every frame of each file once (see :func:`probe`); cached results of a
    quick probe are redone.
    """
    entries = read_list(list_path, root)
    check_shards(entries, list_path)
    cache_path = cache_path or default_cache_path(list_path)
    cached = load_cache(cache_path) if use_cache else {}
    paths = [absolute(source_of(e.path, e.offset, e.size, lookup=False)) for e in entries]
    todo = sorted({p for p in paths if not _cache_valid(cached.get(p), p, full)})
    if todo:
        log.info("probing %d of %d files (%d from cache %s)", len(todo), len(set(paths)),
                 len(set(paths)) - len(todo), cache_path)
    fresh = dict(zip(todo, probe_many(todo, workers, full)))
    merged = {p: fresh.get(p) or cached[p] for p in set(paths)}
    if todo and use_cache:
        save_cache(cache_path, (merged[p] for p in sorted(merged)))
    return DatasetIndex(entries, [merged[p] for p in paths], probed=len(todo), cache_path=cache_path)
