"""``python -m ivfast.data inspect PATHS_OR_LIST [--json]``: per-file codec, frames, fps, size,
and whether every frame decodes; totals at the end. Exit status 0 when all decode, 1 otherwise.

``frames`` is the number of frames that decode (with the default full decode) and
``container_frames`` what the container lists; a difference is a note, not a bad file.

``python -m ivfast.data prepare LIST OUT_DIR [--shards MB]``: re-encode a data set for fast loading
(:func:`prepare_main`, the re-encode in ``ivfast.data.prepare``, the plan in ``ivfast.data.plan``);
``python -m ivfast.data shard LIST OUT_DIR``: pack a list's files
into tar shards (webdataset layout) with a list that keeps random access (``ivfast.data.shards``).

Paths may be tar shard members (``<file>.tar#<member>``, see ``ivfast.data.shards``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

from tqdm import tqdm

from . import plan, prepare, shards
from .index import DataError, Entry, probe, read_list, write_list
from .sources import VIDEO_EXTS, absolute, source_of, tar_videos


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


def prepare_main(argv: list[str]) -> int:
    """``python -m ivfast.data prepare``: plan, re-encode every file, then (``--shards``) pack."""
    ap = argparse.ArgumentParser(prog="python -m ivfast.data prepare", description=prepare.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("list", help="list file (CSV/TSV/released format) or a directory of videos")
    ap.add_argument("out_dir")
    ap.add_argument("--root", default="", help="prefix for relative paths in the list")
    ap.add_argument("--short-side", type=int, default=256, help="short side in pixels (never upscaled); 0 keeps the size")
    ap.add_argument("--gop", type=int, default=None,
                    help="a keyframe every this many frames (1: all-intra, fastest; larger: smaller files); "
                         "default: the plan's choice")
    ap.add_argument("--plan", action="store_true", help="measure the candidates, print the table and the "
                    "recommendation, and stop")
    ap.add_argument("--clips-per-gpu", type=float, default=plan.DEFAULT_CLIPS_PER_GPU,
                    help="clips/s one GPU trains on (default: stage 1 ViT-B's predicted H100 rate)")
    ap.add_argument("--cores-per-gpu", type=float, default=plan.DEFAULT_CORES_PER_GPU, help="CPU cores per GPU")
    ap.add_argument("--margin", type=float, default=plan.DEFAULT_MARGIN,
                    help="the chosen setting must give this many times the clips per core needed")
    ap.add_argument("--plan-files", type=int, default=24, help="files the plan samples")
    ap.add_argument("--plan-seconds", type=float, default=10.0, help="seconds of each sampled file it encodes")
    ap.add_argument("--plan-gops", default="1,4,16", help="GOPs the plan tries (comma list)")
    ap.add_argument("--config", default="stage1_vitb", help="preset (or YAML) whose frames and crop the plan times")
    ap.add_argument("--bframes", type=int, default=0, help="x264 B-frames between references (0: none)")
    ap.add_argument("--fps-cap", type=float, default=0.0, help="drop frames above this rate (0: keep all)")
    ap.add_argument("--crf", type=int, default=20, help="x264 quality (lower = better, larger)")
    ap.add_argument("--preset", default="veryfast", help="x264 preset")
    ap.add_argument("--shards", type=float, default=0.0, metavar="MB",
                    help="then pack the outputs into tar shards of about MB megabytes (0: no shards)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="processes")
    args = ap.parse_args(argv)
    if args.gop is not None and args.gop < 1:
        print("error: --gop must be >= 1", file=sys.stderr)
        return 2
    try:
        plan_gops = [int(g) for g in args.plan_gops.split(",") if g.strip()]
    except ValueError:
        plan_gops = []
    if not plan_gops or min(plan_gops) < 1:
        print(f"error: --plan-gops must be a comma list of GOPs >= 1, got {args.plan_gops!r}", file=sys.stderr)
        return 2
    if min(args.clips_per_gpu, args.cores_per_gpu, args.margin, args.plan_files, args.plan_seconds) <= 0:
        print("error: --clips-per-gpu, --cores-per-gpu, --margin, --plan-files and --plan-seconds must be > 0",
              file=sys.stderr)
        return 2
    if args.bframes < 0:
        print(f"error: --bframes must be >= 0, got {args.bframes}", file=sys.stderr)
        return 2
    if args.shards < 0:
        print(f"error: --shards must be >= 0 MB (0: no shards), got {args.shards}", file=sys.stderr)
        return 2
    try:
        entries = read_list(args.list, args.root)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base = args.root or os.path.commonpath([os.path.dirname(os.path.abspath(e.path)) for e in entries])
    os.makedirs(args.out_dir, exist_ok=True)
    settings = prepare.Job("", "", args.short_side, 1, args.fps_cap, args.crf, args.preset, args.bframes)
    gop, keep, planned, adopted = args.gop, False, None, set()
    if gop is None or args.plan:
        try:
            gop, keep, planned = plan.plan_for_run(args, entries, settings, plan_gops)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.plan:
            return 0
    jobs = [prepare.Job(os.path.abspath(e.path), prepare.out_path(e.path, base, args.out_dir), args.short_side, gop,
                args.fps_cap, args.crf, args.preset, args.bframes, keep_small=keep) for e in entries]
    if planned is not None:
        if not keep:        # keeping: the sources are the outputs, not the plan's fallback encodes
            adopted = plan.adopt_outputs(planned, gop, jobs)
        plan.remove_work(args.out_dir)
    t0 = time.time()
    if args.workers <= 1:
        results = [prepare.prepare_one(j) for j in tqdm(jobs, desc="prepare", unit="file", file=sys.stderr)]
    else:
        with ProcessPoolExecutor(args.workers) as ex:
            results = list(tqdm(ex.map(prepare.prepare_one, jobs), total=len(jobs), desc="prepare", unit="file",
                                file=sys.stderr))
    wall = time.time() - t0
    ok = [(e, r) for e, r in zip(entries, results) if r["status"] != "failed"]
    failed = [r for r in results if r["status"] == "failed"]
    write_list(os.path.join(args.out_dir, "list.csv"),
               [Entry(os.path.abspath(r["dst"]), e.label, e.source, e.start_sec, e.end_sec) for e, r in ok])
    with open(os.path.join(args.out_dir, "failed.txt"), "w") as f:
        for r in failed:
            f.write(f"{r['src']}\t{r['error']}\n")
    n = {s: sum(r["status"] == s for r in results) for s in ("done", "kept", "skipped", "failed")}
    b_in = sum(r["bytes_in"] for r in results if r["status"] != "failed")
    b_out = sum(r["bytes_out"] for r in results)
    kept = f"{n['kept']} kept as they are (no re-encode), " if n["kept"] else ""
    # the plan's whole-file encodes at the chosen GOP were moved into place before the run
    n["plan"] = sum(r["status"] == "skipped" and r["dst"] in adopted for r in results)
    by_plan = f"{n['plan']} encoded by the plan, " if n["plan"] else ""
    print(f"prepared {len(results)} files in {wall:.1f} s: {n['done']} done, {kept}{by_plan}"
          f"{n['skipped'] - n['plan']} already done, "
          f"{n['failed']} failed; {b_in:,} bytes in -> {b_out:,} bytes out ({b_in / 1e6:.1f} -> {b_out / 1e6:.1f} MB, "
          f"{b_out / max(1, b_in):.2f}x); list {os.path.join(args.out_dir, 'list.csv')}")
    if ok:
        print(plan.measure_outputs([r["dst"] for _, r in ok], args.out_dir, args.config))
    for r in failed[:10]:
        print(f"  failed: {r['src']}: {r['error']}", file=sys.stderr)
    if args.shards > 0 and ok:
        lst, s = shards.pack([Entry(os.path.abspath(r["dst"]), e.label, e.source, e.start_sec, e.end_sec,
                                    frames=r["frames"]) for e, r in ok], args.out_dir, args.shards)
        print(f"packed {s['samples']} samples into {s['shards']} shards ({s['written']} written, {s['kept']} kept) "
              f"in {s['seconds']:.1f} s, {s['bytes'] / 1e6:.1f} MB; list {lst}")
    return 0 if not failed else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "prepare":
        return prepare_main(argv[1:])
    if argv and argv[0] == "shard":
        return shards.main(argv[1:])
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
