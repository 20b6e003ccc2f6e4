"""Tar shards (webdataset layout) with random access by sample id, for data on object storage
or network file systems, where millions of small files are slow to list, open and copy.

    python -m ivfast.data shard LIST OUT_DIR [--shard-mb 1024]      # pack a list's files as they are
    python -m ivfast.data prepare LIST OUT_DIR --shards 1024         # re-encode, then pack

**Layout** (readable by webdataset tools): ``OUT_DIR/shards/shard-000000.tar``, ... are
uncompressed POSIX (ustar) tars; sample ``<key>`` is the members ``<key>.mp4`` (the video, with
its own extension), ``<key>.json`` (label, source, clip times, original path) and, for a labelled
sample, ``<key>.cls`` (the label as text). ``<key>`` is ``<list position, 6 digits>_<file name
stem>`` (characters other than ``[A-Za-z0-9_-]`` become ``_``): unique, and stable for the same
list. Members are written with fixed owner, mode and mtime, so the same inputs give the same bytes.

**The list** ``OUT_DIR/shards.csv`` (the header names the columns; every ivfast command reads it)::

    path,label,source,start_sec,end_sec,offset,size
    /data/out/shards/shard-000000.tar#000000_clip_a.mp4,3,k400,-1.0,-1.0,1536,20480

``path`` is ``<tar file>#<member name>`` (split at the last ``.tar#``); ``offset`` and ``size`` are
the byte range of the member's data inside the tar (an uncompressed tar member's data is
contiguous). So the loader reads sample ``i`` directly, without scanning the shard: random access
by sample id, and with it the loader's exact resume (its order depends only on (seed, epoch,
rank), see ``loader.shard_epoch``). A ``tar#member`` path without offset/size (typed by hand, or
given to ``inspect``) is found by reading the tar's headers once.

**Reading**: :func:`open_video` opens a path or a :class:`Member` with PyAV; a member through
:class:`MemberFile`, a read-only view of the tar that never reads outside the member. The index
(probe, cache: keyed by path, checked against the tar's size/mtime and the member's offset/size)
and both decoders go through it. DALI gets the member's bytes (:func:`read_bytes`), as it gets a
file's bytes.

**Writing** is resumable and atomic like ``prepare``: each shard is written to a temporary name,
verified (every member's bytes equal the source file's; every video decodes, frame count checked
when known), then renamed; an existing shard whose members match the plan is kept.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tarfile
import time
from dataclasses import dataclass

SEP = ".tar#"


class Member(str):
    """A path string ``<tar>#<name>`` that also knows where the member's data lies in the tar.

    A ``str`` so that everything that logs, counts or compares paths (bad-file accounting,
    ``BadSample.path``, the index cache) works unchanged; :func:`open_video` reads the range."""

    tar: str
    name: str
    offset: int
    size: int

    def __new__(cls, tar: str, name: str, offset: int, size: int):
        self = super().__new__(cls, f"{tar}#{name}")
        self.tar, self.name, self.offset, self.size = tar, name, int(offset), int(size)
        return self

    def __reduce__(self):       # pickling (spawned DataLoader workers) keeps the byte range
        return (Member, (self.tar, self.name, self.offset, self.size))


def is_member_path(path: str) -> bool:
    return SEP in str(path)


def split_member_path(path: str) -> tuple[str, str]:
    """``'/d/shard-000001.tar#key.mp4'`` -> ``('/d/shard-000001.tar', 'key.mp4')``."""
    i = str(path).rfind(SEP)
    if i < 0:
        raise ValueError(f"{path!r} is not a shard member path (<file>.tar#<member>)")
    return str(path)[:i + len(SEP) - 1], str(path)[i + len(SEP):]


def source_of(path: str, offset: int = -1, size: int = -1, lookup: bool = True) -> str:
    """What to open for a list entry / index record: a :class:`Member` when it names a tar
    member, else the path. Without offset/size, the member is looked up in the tar's headers
    (``lookup``; else the path comes back as it is, for :func:`open_video` to look up)."""
    if isinstance(path, Member) or not is_member_path(path):
        return path
    tar, name = split_member_path(path)
    if offset < 0 or size < 0:
        if not lookup:
            return path
        offset, size = lookup_member(tar, name)
    return Member(tar, name, offset, size)


def absolute(source: str) -> str:
    """``os.path.abspath`` that keeps a :class:`Member` a member."""
    if isinstance(source, Member):
        return Member(os.path.abspath(source.tar), source.name, source.offset, source.size)
    return os.path.abspath(source)


_LOOKUPS: dict[tuple, dict[str, tuple[int, int]]] = {}


def lookup_member(tar: str, name: str) -> tuple[int, int]:
    """(offset, size) of ``name``'s data in ``tar`` by reading the tar's headers (cached per tar
    version: path, size, mtime)."""
    st = os.stat(tar)
    key = (tar, st.st_size, st.st_mtime_ns)
    table = _LOOKUPS.get(key)
    if table is None:
        with tarfile.open(tar, "r:") as t:      # "r:": uncompressed only (offsets must be file offsets)
            table = {m.name: (m.offset_data, m.size) for m in t.getmembers() if m.isfile()}
        _LOOKUPS[key] = table
    if name not in table:
        raise FileNotFoundError(f"{tar} has no member {name!r}")
    return table[name]


def tar_videos(tar: str) -> list[Member]:
    """The video members of a tar (by extension), in tar order."""
    from .index import VIDEO_EXTS

    with tarfile.open(tar, "r:") as t:
        return [Member(os.path.abspath(tar), m.name, m.offset_data, m.size) for m in t.getmembers()
                if m.isfile() and os.path.splitext(m.name)[1].lower() in VIDEO_EXTS]


class MemberFile(io.RawIOBase):
    """Read-only file view of bytes [offset, offset + size) of a file: what PyAV reads a tar
    member through. Positions are relative to the member; reads stop at its end (or at the end
    of the file, for a tar cut short), never past it."""

    def __init__(self, path: str, offset: int, size: int):
        super().__init__()
        self._f = open(path, "rb", buffering=0)
        self.offset, self.size, self.pos = int(offset), int(size), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.size - self.pos))
        if n == 0:
            return 0
        self._f.seek(self.offset + self.pos)
        got = self._f.readinto(memoryview(b)[:n])
        self.pos += got or 0
        return got or 0

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if base + pos < 0:
            raise OSError(f"seek to {base + pos} before the member's start")
        self.pos = base + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def open_video(source, **kwargs):
    """``av.open`` for a path or a shard member (a :class:`Member`, or a ``tar#member`` path)."""
    import av

    source = source_of(source)
    if isinstance(source, Member):
        # PyAV keeps a reference to the file object and does not close it: closed when the
        # container is freed (CPython frees it as soon as the caller's `with` block ends).
        return av.open(MemberFile(source.tar, source.offset, source.size), "r", **kwargs)
    return av.open(source, **kwargs)


def read_bytes(source) -> bytes:
    """The whole file or member (for DALI, which decodes bytes handed to it)."""
    source = source_of(source)
    if isinstance(source, Member):
        with MemberFile(source.tar, source.offset, source.size) as f:
            data = f.read()
        if len(data) != source.size:
            raise OSError(f"{source}: the shard ends inside this member ({len(data)} of {source.size} bytes)")
        return data
    with open(source, "rb") as f:
        return f.read()


def read_array(source):
    """The whole file or member as a writable uint8 numpy array (what the DALI decoder is fed)."""
    import numpy as np

    source = source_of(source)
    if not isinstance(source, Member):
        return np.fromfile(source, dtype=np.uint8)
    out = np.empty(source.size, np.uint8)
    got = 0
    with MemberFile(source.tar, source.offset, source.size) as f:
        while got < source.size:
            n = f.readinto(memoryview(out)[got:])
            if not n:
                break
            got += n
    if got != source.size:
        raise OSError(f"{source}: the shard ends inside this member ({got} of {source.size} bytes)")
    return out


# --------------------------------------------------------------------------- writing
@dataclass
class Sample:
    """One sample to pack: a video file and what the list says about it."""
    file: str
    label: int = -1
    source: str = ""
    start_sec: float = -1.0
    end_sec: float = -1.0
    frames: int = 0          # frames that decode, when known (checked by the verification)


def sample_key(position: int, file: str) -> str:
    stem = os.path.splitext(os.path.basename(file))[0]
    # no dots (webdataset splits the key at the first one); short enough for a ustar name (100)
    return f"{position:06d}_{re.sub(r'[^A-Za-z0-9_-]', '_', stem)[:80]}"


def plan_shards(samples: list[Sample], max_bytes: int) -> list[list[int]]:
    """Consecutive samples per shard, each shard's video bytes <= ``max_bytes`` (at least one)."""
    shards: list[list[int]] = [[]]
    used = 0
    for i, s in enumerate(samples):
        n = os.path.getsize(s.file)
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += n
    return [s for s in shards if s]


def _members(key: str, s: Sample) -> list[tuple[str, bytes | None]]:
    meta = {"label": s.label, "source": s.source, "start_sec": s.start_sec, "end_sec": s.end_sec,
            "src": s.file, "frames": s.frames}
    out: list[tuple[str, bytes | None]] = [(key + os.path.splitext(s.file)[1].lower(), None),   # None: the file
                                           (key + ".json", json.dumps(meta, sort_keys=True).encode())]
    if s.label >= 0:
        out.append((key + ".cls", str(s.label).encode()))
    return out


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    return ti


def _write_shard(path: str, samples: list[Sample], positions: list[int]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for pos in positions:
            s = samples[pos]
            for name, data in _members(sample_key(pos, s.file), s):
                if data is None:
                    with open(s.file, "rb") as f:
                        t.addfile(_tarinfo(name, os.fstat(f.fileno()).st_size), f)
                else:
                    t.addfile(_tarinfo(name, len(data)), io.BytesIO(data))


def _shard_table(path: str) -> dict[str, tuple[int, int]]:
    with tarfile.open(path, "r:") as t:
        return {m.name: (m.offset_data, m.size) for m in t.getmembers() if m.isfile()}


def _matches(table: dict, samples: list[Sample], positions: list[int]) -> bool:
    """An existing shard holds exactly the planned members, with the planned sizes."""
    want = {}
    for pos in positions:
        s = samples[pos]
        for name, data in _members(sample_key(pos, s.file), s):
            want[name] = os.path.getsize(s.file) if data is None else len(data)
    return {n: sz for n, (_, sz) in table.items()} == want


def verify_shard(path: str, samples: list[Sample], positions: list[int], decode: bool = True) -> list[Member]:
    """Check a written shard: every planned member is there, its bytes are the source file's,
    and (``decode``) every frame of each video decodes (as many as known). Returns the videos."""
    from .pyav import iter_frames

    table = _shard_table(path)
    if not _matches(table, samples, positions):
        raise ValueError(f"{path}: members differ from the plan")
    videos = []
    for pos in positions:
        s = samples[pos]
        name = sample_key(pos, s.file) + os.path.splitext(s.file)[1].lower()
        m = Member(os.path.abspath(path), name, *table[name])
        with open(s.file, "rb") as f:
            if read_bytes(m) != f.read():
                raise ValueError(f"{m}: bytes differ from {s.file}")
        if decode:
            with open_video(m) as c:
                n = sum(1 for _ in iter_frames(c, c.streams.video[0]))
            if n == 0 or (s.frames and n != s.frames):
                raise ValueError(f"{m}: {n} frames decode, expected {s.frames or '> 0'}")
        videos.append(m)
    return videos


def pack(samples: list[Sample], out_dir: str, shard_mb: float, verify: bool = True,
         progress: bool = True) -> tuple[str, dict]:
    """Pack ``samples`` into ``out_dir/shards/shard-NNNNNN.tar`` and write ``out_dir/shards.csv``.

    Returns (list path, summary). A shard already there with the planned members is kept
    (resume); one that does not match is rewritten."""
    if shard_mb <= 0:
        raise ValueError(f"shard size must be > 0 MB, got {shard_mb}")
    shard_dir = os.path.join(out_dir, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    for name in os.listdir(shard_dir):        # left by an interrupted run (never renamed: unverified)
        if re.fullmatch(r"shard-\d{6}\.tar\.tmp\d+", name):
            os.unlink(os.path.join(shard_dir, name))
    plan = plan_shards(samples, int(shard_mb * 1e6))
    members: list[Member | None] = [None] * len(samples)
    done = kept = 0
    t0 = time.time()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan), desc="shards", unit="shard", file=sys.stderr)
    for k, positions in enumerate(plan):
        path = os.path.join(shard_dir, f"shard-{k:06d}.tar")
        if os.path.exists(path) and _matches(_shard_table(path), samples, positions):
            kept += 1      # written and verified by an earlier run (the rename came after the check)
            vids = verify_shard(path, samples, positions, decode=False)
        else:
            tmp = f"{path}.tmp{os.getpid()}"
            try:
                _write_shard(tmp, samples, positions)
                vids = verify_shard(tmp, samples, positions, decode=verify)
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            vids = [Member(os.path.abspath(path), m.name, m.offset, m.size) for m in vids]
            done += 1
        for pos, m in zip(positions, vids):
            members[pos] = m
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    # stale shards from an earlier, longer plan would be picked up by webdataset globs
    for name in os.listdir(shard_dir):
        m = re.fullmatch(r"shard-(\d{6})\.tar", name)
        if m and int(m.group(1)) >= len(plan):
            os.unlink(os.path.join(shard_dir, name))
    list_path = os.path.join(out_dir, "shards.csv")
    from .index import Entry, write_list

    write_list(list_path, [Entry(str(m), s.label, s.source, s.start_sec, s.end_sec, m.offset, m.size)
                           for m, s in zip(members, samples)])
    total = sum(os.path.getsize(os.path.join(shard_dir, f"shard-{k:06d}.tar")) for k in range(len(plan)))
    return list_path, {"shards": len(plan), "written": done, "kept": kept, "samples": len(samples),
                       "bytes": total, "seconds": time.time() - t0}


def main(argv: list[str] | None = None) -> int:
    from .index import DataError, read_list

    ap = argparse.ArgumentParser(prog="python -m ivfast.data shard", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("list", help="list file (CSV/TSV/released format) or a directory of videos")
    ap.add_argument("out_dir")
    ap.add_argument("--root", default="", help="prefix for relative paths in the list")
    ap.add_argument("--shard-mb", type=float, default=1024, help="video bytes per shard, in MB")
    ap.add_argument("--no-verify", action="store_true", help="skip decoding every video after packing "
                    "(bytes are still compared)")
    args = ap.parse_args(argv)
    try:
        entries = read_list(args.list, args.root)
        missing = [e.path for e in entries if not os.path.isfile(e.path)]
        if missing:
            raise DataError(f"{len(missing)} files in the list do not exist (e.g. {missing[0]}); "
                            "fix the list or --root")
        if args.shard_mb <= 0:
            raise DataError(f"--shard-mb must be > 0, got {args.shard_mb}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    samples = [Sample(os.path.abspath(e.path), e.label, e.source, e.start_sec, e.end_sec) for e in entries]
    lst, s = pack(samples, args.out_dir, args.shard_mb, verify=not args.no_verify)
    print(f"packed {s['samples']} samples into {s['shards']} shards ({s['written']} written, {s['kept']} kept) "
          f"in {s['seconds']:.1f} s, {s['bytes'] / 1e6:.1f} MB; list {lst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
