"""``python -m ivfast.data inspect PATHS_OR_LIST [--json]``: per-file codec, frames, fps, size,
and whether every frame decodes; totals at the end. Exit status 0 when all decode, 1 otherwise.

``frames`` is the number of frames that decode (with the default full decode) and
``container_frames`` what the container lists; a difference is a note, not a bad file.

``python -m ivfast.data prepare LIST OUT_DIR [--shards MB]``: re-encode a data set for fast loading
(see ``ivfast.data.prepare``); ``python -m ivfast.data shard LIST OUT_DIR``: pack a list's files
into tar shards (webdataset layout) with a list that keeps random access (``ivfast.data.shards``).

Paths may be tar shard members (``<file>.tar#<member>``, see ``ivfast.data.shards``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

from .index import VIDEO_EXTS, DataError, probe, read_list
from .shards import absolute, source_of, tar_videos


def _targets(args: list[str], root: str) -> list[str]:
    out: list[str] = []
    for a in args:
        if os.path.isfile(a) and a.lower().endswith(".tar"):        # a shard: its videos
            out.extend(m for m in tar_videos(a))
        elif os.path.isdir(a) or (os.path.isfile(a) and os.path.splitext(a)[1].lower() not in VIDEO_EXTS):
            # a directory or a list file (a shard member keeps its byte range from the list)
            out.extend(source_of(e.path, e.offset, e.size, lookup=False) for e in read_list(a, root))
        else:
            out.append(a)                                       # a video (or a missing path)
    return out


def inspect_file(path: str, full: bool = True) -> dict:
    """Probe one file and, with ``full``, decode every frame to prove it decodes."""
    info = probe(absolute(path), full=full)
    return {"path": path, "codec": info.codec, "frames": info.frames, "container_frames": info.container_frames,
            "fps": round(info.fps, 3), "width": info.width, "height": info.height,
            "duration": round(info.duration, 3), "decodes": info.ok, "verified": info.verified,
            "error": info.error, "detail": info.detail, "note": info.note}


def inspect(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m ivfast.data inspect", description=__doc__)
    ap.add_argument("paths", nargs="+", help="video files, list files (CSV/TSV/released format), directories, "
                    "tar shards or shard members (SHARD.tar#MEMBER)")
    ap.add_argument("--root", default="", help="prefix for relative paths in list files")
    ap.add_argument("--json", action="store_true", help="one JSON object per file, then a totals object")
    ap.add_argument("--quick", action="store_true", help="decode only the first frame (the probe)")
    args = ap.parse_args(argv)
    try:
        targets = _targets(args.paths, args.root)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    recs = [inspect_file(p, full=not args.quick) for p in targets]
    reasons = Counter(r["error"] for r in recs if not r["decodes"])
    codecs = Counter(r["codec"] or "?" for r in recs)
    totals = {"files": len(recs), "decode": sum(r["decodes"] for r in recs), "bad": sum(reasons.values()),
              "bad_by_reason": dict(reasons), "codecs": dict(codecs),
              "frames": sum(r["frames"] for r in recs if r["decodes"]),
              "noted": sum(1 for r in recs if r["decodes"] and r["note"])}
    if args.json:
        for r in recs:
            print(json.dumps(r))
        print(json.dumps({"totals": totals}))
    else:
        print(f"{'codec':<8} {'frames':>7} {'fps':>7} {'size':>10}  status  path")
        for r in recs:
            size = f"{r['width']}x{r['height']}" if r["width"] else "-"
            status = "ok" if r["decodes"] else f"BAD {r['error']}: {r['detail']}"
            if r["decodes"] and r["note"]:
                status += f" (note: {r['note']})"
            print(f"{r['codec'] or '-':<8} {r['frames']:>7} {r['fps']:>7.2f} {size:>10}  {status}  {r['path']}")
        print(f"{totals['files']} files: {totals['decode']} decode, {totals['bad']} bad {dict(reasons) or ''}; "
              f"codecs {dict(codecs)}; {totals['frames']} frames"
              + (f"; {totals['noted']} with a note (length = frames that decode)" if totals["noted"] else ""))
    return 0 if totals["bad"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "prepare":
        from .prepare import main as prepare_main
        return prepare_main(argv[1:])
    if argv and argv[0] == "shard":
        from .shards import main as shard_main
        return shard_main(argv[1:])
    if not argv or argv[0] != "inspect":
        print("usage: python -m ivfast.data inspect PATHS_OR_LIST [--json] [--quick] [--root DIR]\n"
              "       python -m ivfast.data prepare LIST OUT_DIR [--plan] [--gop N] [--short-side 256] [--fps-cap F] "
              "[--shards MB]\n"
              "       python -m ivfast.data shard LIST OUT_DIR [--shard-mb 1024]",
              file=sys.stderr)
        return 2
    return inspect(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
