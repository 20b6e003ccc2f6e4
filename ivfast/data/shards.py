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

**Reading** a member is ``ivfast.data.sources`` (:func:`~ivfast.data.sources.open_video`,
:class:`~ivfast.data.sources.Member`): the index (probe, cache: keyed by path, checked against the
tar's size/mtime and the member's offset/size) and both decoders go through it.

**Writing** (this module: :func:`pack`; a sample is an :class:`~ivfast.data.index.Entry` whose
``path`` is a file) is resumable and atomic like ``prepare``: each shard is written to a temporary name,
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

from tqdm import tqdm

from .index import DataError, Entry, read_list, write_list
from .sources import Member, iter_frames, open_video, read_bytes


def sample_key(position: int, file: str) -> str:
    stem = os.path.splitext(os.path.basename(file))[0]
    # no dots (webdataset splits the key at the first one); short enough for a ustar name (100)
    return f"{position:06d}_{re.sub(r'[^A-Za-z0-9_-]', '_', stem)[:80]}"


def plan_shards(samples: list[Entry], max_bytes: int) -> list[list[int]]:
    """Consecutive samples per shard, each shard's video bytes <= ``max_bytes`` (at least one)."""
    shards: list[list[int]] = [[]]
    used = 0
    for i, s in enumerate(samples):
        n = os.path.getsize(s.path)
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += n
    return [s for s in shards if s]


def _members(key: str, s: Entry) -> list[tuple[str, bytes | None]]:
    meta = {"label": s.label, "source": s.source, "start_sec": s.start_sec, "end_sec": s.end_sec,
            "src": s.path, "frames": s.frames}
    out: list[tuple[str, bytes | None]] = [(key + os.path.splitext(s.path)[1].lower(), None),   # None: the file
                                           (key + ".json", json.dumps(meta, sort_keys=True).encode())]
    if s.label >= 0:
        out.append((key + ".cls", str(s.label).encode()))
    return out


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    return ti


def _write_shard(path: str, samples: list[Entry], positions: list[int]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for pos in positions:
            s = samples[pos]
            for name, data in _members(sample_key(pos, s.path), s):
                if data is None:
                    with open(s.path, "rb") as f:
                        t.addfile(_tarinfo(name, os.fstat(f.fileno()).st_size), f)
                else:
                    t.addfile(_tarinfo(name, len(data)), io.BytesIO(data))


def _shard_table(path: str) -> dict[str, tuple[int, int]]:
    with tarfile.open(path, "r:") as t:
        return {m.name: (m.offset_data, m.size) for m in t.getmembers() if m.isfile()}


def _matches(table: dict, samples: list[Entry], positions: list[int]) -> bool:
    """An existing shard holds exactly the planned members, with the planned sizes."""
    want = {}
    for pos in positions:
        s = samples[pos]
        for name, data in _members(sample_key(pos, s.path), s):
            want[name] = os.path.getsize(s.path) if data is None else len(data)
    return {n: sz for n, (_, sz) in table.items()} == want


def verify_shard(path: str, samples: list[Entry], positions: list[int], decode: bool = True) -> list[Member]:
    """Check a written shard: every planned member is there, its bytes are the source file's,
    and (``decode``) every frame of each video decodes (as many as known). Returns the videos."""
    table = _shard_table(path)
    if not _matches(table, samples, positions):
        raise ValueError(f"{path}: members differ from the plan")
    videos = []
    for pos in positions:
        s = samples[pos]
        name = sample_key(pos, s.path) + os.path.splitext(s.path)[1].lower()
        m = Member(os.path.abspath(path), name, *table[name])
        with open(s.path, "rb") as f:
            if read_bytes(m) != f.read():
                raise ValueError(f"{m}: bytes differ from {s.path}")
        if decode:
            with open_video(m) as c:
                n = sum(1 for _ in iter_frames(c, c.streams.video[0]))
            if n == 0 or (s.frames and n != s.frames):
                raise ValueError(f"{m}: {n} frames decode, expected {s.frames or '> 0'}")
        videos.append(m)
    return videos


def pack(samples: list[Entry], out_dir: str, shard_mb: float, verify: bool = True,
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
    write_list(list_path, [Entry(str(m), s.label, s.source, s.start_sec, s.end_sec, m.offset, m.size)
                           for m, s in zip(members, samples)])
    total = sum(os.path.getsize(os.path.join(shard_dir, f"shard-{k:06d}.tar")) for k in range(len(plan)))
    return list_path, {"shards": len(plan), "written": done, "kept": kept, "samples": len(samples),
                       "bytes": total, "seconds": time.time() - t0}


def main(argv: list[str] | None = None) -> int:
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
    samples = [Entry(os.path.abspath(e.path), e.label, e.source, e.start_sec, e.end_sec) for e in entries]
    lst, s = pack(samples, args.out_dir, args.shard_mb, verify=not args.no_verify)
    print(f"packed {s['samples']} samples into {s['shards']} shards ({s['written']} written, {s['kept']} kept) "
          f"in {s['seconds']:.1f} s, {s['bytes'] / 1e6:.1f} MB; list {lst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
