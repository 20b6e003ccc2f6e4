"""``python -m ivfast.data prepare LIST OUT_DIR``: re-encode a data set once into a form that
trains fast.

Sparse TSN sampling of raw uploads (keyframe every ~250 frames, full source resolution)
decodes nearly every frame of every video. Prepared files have the short side scaled to
``--short-side`` (default 256, just above a 224 crop), a keyframe every ``--gop`` frames (the
loader then seeks to the keyframe before each sample instead of decoding through), no
B-frames by default (``--bframes``), an optional frame-rate cap, and H.264 tuned for fast
decoding (no CABAC or deblocking, ``tune=fastdecode``), which CPU decoders and NVDEC both
decode fast.

``--gop`` trades disk for decoding: with 16 TSN samples from a 10 s, 30 fps clip, a sample
costs one keyframe plus on average (gop - 1) / 2 frames. Without ``--gop`` the plan step
(``ivfast.data.plan``; ``--plan`` runs it alone) measures gop 1 / 4 / 16, and keeping small
sources as they are, on a sample of the list and takes the smallest output that still feeds
``--clips-per-gpu`` from ``--cores-per-gpu`` cores with ``--margin``. Measured ranges over
synthetic and real clips are in the README (bench/results/loader_*_cputime.json): at 340x256
gop 1 files are 7.0-8.1x the sources (up to 11x per clip), gop 16 2.4-3.5x.

* Parallel over processes, with a progress bar; resumable: an output is written to a
  temporary name, verified by a full decode (frame count), then renamed, so an existing
  output is a finished one and is skipped next time.
* The list's labels, sources and clip times are carried into ``OUT_DIR/list.csv``
  (CSV with a header, which every ivfast command reads); files that fail are left out and
  listed in ``OUT_DIR/failed.txt``.
* A summary: files done / kept / skipped / failed, bytes in and out, wall time, and the
  training loader's clips per CPU-second on a sample of the outputs.
* ``--shards MB``: then pack the outputs, in list order, into uncompressed tar shards of about
  MB megabytes each (webdataset layout, ``OUT_DIR/shards/shard-NNNNNN.tar``) and write
  ``OUT_DIR/shards.csv``, whose rows give each sample's shard member and byte range: the loader
  reads a sample in place, by id, so exact resume is kept (see ``ivfast.data.shards``). Each
  shard is verified (bytes and a full decode of every video) before its rename; a rerun keeps
  shards that match. The loose files stay (they are what makes the re-encode resumable).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from fractions import Fraction
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from .index import DataError, Entry, probe, read_list, write_list



@dataclass
class Job:
    src: str
    dst: str
    short_side: int
    gop: int
    fps_cap: float
    crf: int
    preset: str
    bframes: int = 0        # B-frames between references; 0: every frame decodes in display order
    max_seconds: float = 0.0   # > 0: encode only the first this many seconds (the plan's short samples)
    keep_small: bool = False   # a source needing no downscale or frame drop is used as it is


def out_path(entry_path: str, base: str, out_dir: str) -> str:
    """OUT_DIR/<path relative to the list's common folder, extension .mp4>."""
    rel = os.path.relpath(os.path.abspath(entry_path), base)
    if rel.startswith(".."):
        rel = os.path.basename(entry_path)
    return os.path.join(out_dir, os.path.splitext(rel)[0] + ".mp4")


def target_size(w: int, h: int, short_side: int) -> tuple[int, int]:
    """Scale so the short side is ``short_side`` (never upscale); both sides even (4:2:0)."""
    s = min(1.0, short_side / min(w, h)) if short_side > 0 else 1.0
    return max(2, int(round(w * s / 2)) * 2), max(2, int(round(h * s / 2)) * 2)


def kept_frames(n_in: int, fps: float, cap: float) -> list[int]:
    """Input frame numbers kept under a frame-rate cap: the first frame of each output tick."""
    if cap <= 0 or fps <= cap:
        return list(range(n_in))
    out, last = [], -1
    for i in range(n_in):
        tick = int(i * cap / fps)
        if tick != last:
            out.append(i)
            last = tick
    return out


def is_small(width: int, height: int, fps: float, short_side: int, fps_cap: float) -> bool:
    """Whether re-encoding would neither downscale nor drop frames (``keep`` can use it as it is)."""
    return (short_side <= 0 or min(width, height) <= short_side) and (fps_cap <= 0 or fps <= fps_cap)


def prepare_one(job: Job) -> dict:
    """Re-encode one file; returns {'src', 'dst', 'status': done|kept|skipped|failed, 'cpu_s', ...}.

    ``kept`` (with ``job.keep_small``): the source is small already; ``dst`` is the source,
    verified by a full decode, and nothing is written."""
    t0 = time.process_time()
    rec = _prepare_one(job)
    # CPU seconds of this process, encoder and decoder threads included (the plan's cost estimate)
    return {**rec, "cpu_s": time.process_time() - t0}


def _prepare_one(job: Job) -> dict:
    import av
    from av.video.frame import PictureType

    from .pyav import iter_frames

    rec = {"src": job.src, "dst": job.dst, "bytes_in": 0, "bytes_out": 0, "frames": 0}
    try:
        rec["bytes_in"] = os.path.getsize(job.src)
    except OSError as e:
        return {**rec, "status": "failed", "error": f"missing: {e}"}
    if job.keep_small:
        kept = _keep(job, rec)
        if kept is not None:
            return kept
    if os.path.exists(job.dst):
        # finished earlier: its frame count is the one it was verified with (our mp4 header lists
        # it exactly), so a rerun describes it as the first run did (shard metadata stays the same)
        try:
            with av.open(job.dst) as done:
                frames = max(0, done.streams.video[0].frames)
        except Exception:
            frames = 0
        return {**rec, "status": "skipped", "bytes_out": os.path.getsize(job.dst), "frames": frames}
    os.makedirs(os.path.dirname(job.dst) or ".", exist_ok=True)
    tmp = f"{job.dst}.tmp{os.getpid()}.mp4"
    try:
        with av.open(job.src, metadata_errors="ignore") as inp:
            s = inp.streams.video[0]
            s.thread_type = "AUTO"
            rate = s.average_rate or s.guessed_rate or 25
            fps = float(rate)
            out_fps = min(fps, job.fps_cap) if job.fps_cap > 0 else fps
            keep_every = job.fps_cap > 0 and fps > job.fps_cap
            with av.open(tmp, "w", format="mp4") as out:
                o = out.add_stream("libx264", rate=Fraction(out_fps).limit_denominator(1001),
                                   options={"preset": job.preset, "tune": "fastdecode", "crf": str(job.crf),
                                            # exact GOP: a keyframe every gop frames, no scene-cut extras
                                            "x264-params": f"keyint={job.gop}:min-keyint={job.gop}:scenecut=0:bframes={job.bframes}"})
                o.pix_fmt = "yuv420p"
                o.gop_size = job.gop
                size = None
                n_in = n_out = 0
                last_tick = -1
                last_in = int(job.max_seconds * fps) if job.max_seconds > 0 else -1
                for frame in iter_frames(inp, s):
                    if n_in == last_in:
                        break
                    if size is None:
                        size = target_size(frame.width, frame.height, job.short_side)
                        o.width, o.height = size
                    i, n_in = n_in, n_in + 1
                    if keep_every:
                        tick = int(i * job.fps_cap / fps)
                        if tick == last_tick:
                            continue
                        last_tick = tick
                    f = frame.reformat(width=size[0], height=size[1], format="yuv420p", interpolation="AREA")
                    f.pts, f.time_base = n_out, o.codec_context.time_base or Fraction(1, 25)
                    # the source's picture type rides along and x264 obeys it (extra keyframes, no B-frames)
                    f.pict_type = PictureType.NONE
                    n_out += 1
                    for p in o.encode(f):
                        out.mux(p)
                for p in o.encode():
                    out.mux(p)
        if n_out == 0:
            raise ValueError("no frame decodes")
        # verify: every written frame decodes
        with av.open(tmp) as chk:
            got = sum(1 for _ in iter_frames(chk, chk.streams.video[0]))
        if got != n_out:
            raise ValueError(f"verification: {got} of {n_out} written frames decode")
        os.replace(tmp, job.dst)
        return {**rec, "status": "done", "frames": n_out, "frames_in": n_in, "cut": n_in == last_in,
                "bytes_out": os.path.getsize(job.dst),
                "size": list(size), "fps": out_fps}
    except Exception as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return {**rec, "status": "failed", "error": f"{type(e).__name__}: {e}"}


def _keep(job: Job, rec: dict) -> dict | None:
    """The source itself as the output when it is small already (None: it needs a re-encode)."""
    info = probe(job.src)
    if not info.ok or not is_small(info.width, info.height, info.fps, job.short_side, job.fps_cap):
        return None          # a bad file fails in the re-encode with its own message
    full = probe(job.src, full=True)      # the verification a re-encoded output gets: every frame decodes
    if not full.ok:
        return {**rec, "status": "failed", "error": f"{full.error}: {full.detail}"}
    return {**rec, "dst": job.src, "status": "kept", "frames": full.frames, "bytes_out": rec["bytes_in"],
            "size": [full.width, full.height], "fps": full.fps}


def main(argv: list[str] | None = None) -> int:
    # the plan builds on this module (it encodes with prepare_one), hence imported here
    from .plan import (DEFAULT_CLIPS_PER_GPU, DEFAULT_CORES_PER_GPU, DEFAULT_MARGIN, adopt_outputs,
                       measure_outputs, plan_for_run, remove_work)

    ap = argparse.ArgumentParser(prog="python -m ivfast.data prepare", description=__doc__,
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
    ap.add_argument("--clips-per-gpu", type=float, default=DEFAULT_CLIPS_PER_GPU,
                    help="clips/s one GPU trains on (default: stage 1 ViT-B's predicted H100 rate)")
    ap.add_argument("--cores-per-gpu", type=float, default=DEFAULT_CORES_PER_GPU, help="CPU cores per GPU")
    ap.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
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
    settings = Job("", "", args.short_side, 1, args.fps_cap, args.crf, args.preset, args.bframes)
    gop, keep, planned, adopted = args.gop, False, None, set()
    if gop is None or args.plan:
        try:
            gop, keep, planned = plan_for_run(args, entries, settings, plan_gops)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.plan:
            return 0
    jobs = [Job(os.path.abspath(e.path), out_path(e.path, base, args.out_dir), args.short_side, gop,
                args.fps_cap, args.crf, args.preset, args.bframes, keep_small=keep) for e in entries]
    if planned is not None:
        if not keep:        # keeping: the sources are the outputs, not the plan's fallback encodes
            adopted = adopt_outputs(planned, gop, jobs)
        remove_work(args.out_dir)
    t0 = time.time()
    from tqdm import tqdm

    if args.workers <= 1:
        results = [prepare_one(j) for j in tqdm(jobs, desc="prepare", unit="file", file=sys.stderr)]
    else:
        with ProcessPoolExecutor(args.workers) as ex:
            results = list(tqdm(ex.map(prepare_one, jobs), total=len(jobs), desc="prepare", unit="file",
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
    plan = f"{n['plan']} encoded by the plan, " if n["plan"] else ""
    print(f"prepared {len(results)} files in {wall:.1f} s: {n['done']} done, {kept}{plan}"
          f"{n['skipped'] - n['plan']} already done, "
          f"{n['failed']} failed; {b_in:,} bytes in -> {b_out:,} bytes out ({b_in / 1e6:.1f} -> {b_out / 1e6:.1f} MB, "
          f"{b_out / max(1, b_in):.2f}x); list {os.path.join(args.out_dir, 'list.csv')}")
    if ok:
        print(measure_outputs([r["dst"] for _, r in ok], args.out_dir, args.config))
    for r in failed[:10]:
        print(f"  failed: {r['src']}: {r['error']}", file=sys.stderr)
    if args.shards > 0 and ok:
        from .shards import Sample, pack

        lst, s = pack([Sample(os.path.abspath(r["dst"]), e.label, e.source, e.start_sec, e.end_sec, r["frames"])
                       for e, r in ok], args.out_dir, args.shards)
        print(f"packed {s['samples']} samples into {s['shards']} shards ({s['written']} written, {s['kept']} kept) "
              f"in {s['seconds']:.1f} s, {s['bytes'] / 1e6:.1f} MB; list {lst}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
