"""Clips per second: ivfast's loader next to a release-style loader, on Kinetics-like clips,
raw and prepared (``python -m ivfast.data prepare``).

Clips: 10 s at 30 fps (300 frames), H.264 with B-frames, a keyframe every 250 frames (as
typical uploads), moving patterns at ``--sizes``. Prepared: the same files re-encoded by
``ivfast.data.prepare`` (short side 256, a keyframe every ``--gops`` frames, one prepared
copy per value, no B-frames).

Loaders, both in a torch DataLoader with the same workers, batch, TSN frame choice and
224 px crop, uint8 [B, 3, T, 224, 224] out:
* ``ivfast``: ``build_loader`` with the PyAV backend (seeking, non-reference skipping,
  single-threaded RGB conversion; see ``ivfast.data.pyav``);
* ``release``: what the released code does per clip: decode the video at full resolution
  up to the last sampled frame (decord where installed; else PyAV, default threading),
  convert the sampled frames to PIL images, crop and resize with PIL, stack.

    python bench/bench_loader.py                                  # 340x256, T=16,32, 1 and 2 workers
    python bench/bench_loader.py --sizes 340x256,640x360 --clips 8 --batches 4
    # speed and disk per CPU-second on real footage (e.g. the sample videos of Debian's opencv-doc)
    python bench/bench_loader.py --real DIR --real-frames 300 --sizes 340x256,640x360 --frames 16 --workers ""

Every row carries the disk cost beside its speed: ``mb``, ``size_vs_raw`` (prepared files
against the raw clips), ``size_vs_raw_per_clip`` (min, max) and, for prepared rows, the
encode's CPU-seconds per source-second.

Writes JSON to ``--out`` (default bench/results/loader_kinetics_cpu.json) and prints a table
with the ratio ivfast / release for each row. Timings on a shared machine are noisy: say so
with ``--note``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ivfast.config import load_config  # noqa: E402
from ivfast.data import build_index, build_loader  # noqa: E402
from ivfast.data.plan import clips_per_cpu_second  # noqa: E402
from ivfast.data.prepare import Job, out_path, prepare_one  # noqa: E402
from ivfast.data.sampling import plan_clip, sample_rng  # noqa: E402
from ivfast.data.synth import make_videos  # noqa: E402


class ReleaseStyle(torch.utils.data.Dataset):
    """Per clip: full-resolution decode through the last sampled frame, PIL crop + resize."""

    def __init__(self, index, num_frames: int, size: int = 224, use_decord: bool = False):
        self.index, self.num_frames, self.size, self.use_decord = index, num_frames, size, use_decord

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        from PIL import Image

        info = self.index.infos[i]
        plan = plan_clip(num_frames_video=info.frames, fps=info.fps, width=info.width, height=info.height,
                         num=self.num_frames, out_size=self.size, rng=sample_rng(0, 0, i))
        if self.use_decord:
            import decord
            vr = decord.VideoReader(info.path, num_threads=1)
            frames = vr.get_batch(plan.frames.tolist()).asnumpy()
        else:
            import av
            want = set(plan.frames.tolist())
            got = {}
            with av.open(info.path) as c:
                for k, f in enumerate(c.decode(video=0)):
                    if k in want:
                        got[k] = f.to_ndarray(format="rgb24")
                    if k >= max(want):
                        break
            frames = np.stack([got[int(k)] for k in plan.frames])
        x, y, w, h = plan.crop
        out = []
        for fr in frames:
            img = Image.fromarray(fr).crop((x, y, x + w, y + h)).resize((self.size, self.size), Image.BILINEAR)
            if plan.flip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            out.append(np.asarray(img))
        return torch.from_numpy(np.stack(out)).permute(3, 0, 1, 2)       # 3, T, S, S


def _size(batch) -> int:
    return (batch["video"] if isinstance(batch, dict) else batch).shape[0]


def kinetics_clips(sources: list[Path], out_dir: Path, size: tuple[int, int], clips: int,
                   seconds: float = 10.0, frames: int = 0) -> list[Path]:
    """Real footage as Kinetics-style clips: ``seconds``-long pieces (``frames`` > 0: pieces of
    that many frames) of the ``sources`` (one piece of each source in turn, then the second of
    each, ...; a shorter source gives one shorter piece), resized to ``size``, H.264 crf 23
    (x264 veryfast, as the synthetic clips), a keyframe every 250 frames, B-frames, at the
    source's frame rate."""
    import av
    from av.video.frame import PictureType

    pieces = []
    durations = {}
    for src in sources:
        with av.open(str(src)) as c:
            s = c.streams.video[0]
            dur = float(s.duration * s.time_base) if s.duration else (c.duration or 0) / 1e6
            durations[src] = (dur, float(s.average_rate or s.guessed_rate or 25))
    per = {src: frames or int(round(seconds * fps)) for src, (_, fps) in durations.items()}
    count = {src: max(1, int(d * fps) // per[src]) for src, (d, fps) in durations.items()}
    for k in range(max(count.values())):
        pieces += [(src, k) for src in sources if k < count[src]]
    pieces = pieces[:clips]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for src in sources:
        mine = {k for s_, k in pieces if s_ == src}
        if not mine:
            continue
        fps = durations[src][1]
        rate = Fraction(fps).limit_denominator(1001)
        outs = {}
        with av.open(str(src)) as inp:
            for i, frame in enumerate(inp.decode(video=0)):
                k = i // per[src]
                if k > max(mine):
                    break
                if k not in mine:
                    continue
                if k not in outs:
                    path = out_dir / f"{src.stem}_{k:03d}.mp4"
                    c = av.open(str(path), "w")
                    o = c.add_stream("libx264", rate=rate,
                                     options={"preset": "veryfast", "crf": "23"})
                    o.width, o.height, o.pix_fmt, o.gop_size = size[0], size[1], "yuv420p", 250
                    outs[k] = (c, o, 0)
                    paths.append(path)
                c, o, n = outs[k]
                f = frame.reformat(width=size[0], height=size[1], format="yuv420p", interpolation="AREA")
                f.pts, f.time_base = n, o.codec_context.time_base or 1 / rate
                f.pict_type = PictureType.NONE       # else x264 copies the source's frame types
                outs[k] = (c, o, n + 1)
                for p in o.encode(f):
                    c.mux(p)
        for c, o, _ in outs.values():
            for p in o.encode():
                c.mux(p)
            c.close()
    return sorted(paths)


def bench_cpu(list_path: str, cache: str, index, frames: int, use_decord: bool) -> tuple[float, float, float]:
    """(ivfast with data.rgb=exact, ivfast with data.rgb=fast, release-style) clips per CPU-second."""
    ds = {}
    for rgb in ("exact", "fast"):
        cfg = load_config("stage1_vitb", [
            f"data.train_list={list_path}", f"data.index_cache={cache}", "data.backend=pyav",
            f"model.num_frames={frames}", "data.num_workers=0",
            "optim.batch_per_gpu=1", "data.output=uint8", "data.verify=first", f"data.rgb={rgb}",
            "data.decode_threads=1"])     # one core: without workers the loader would use 2 decoder threads
        ds[rgb] = build_loader(cfg, device="cpu").dataset
    rel = ReleaseStyle(index, frames, use_decord=use_decord)
    n = len(index)
    r = clips_per_cpu_second({"exact": lambda i: ds["exact"].decode_one(i, 0, 0),
                      "fast": lambda i: ds["fast"].decode_one(i, 0, 0), "release": lambda i: rel[i]}, n)
    return r["exact"], r["fast"], r["release"]


def bench_ivfast(list_path: str, cache: str, frames: int, batch: int, batches: int, workers: int) -> float:
    cfg = load_config("stage1_vitb", [
        f"data.train_list={list_path}", f"data.index_cache={cache}", "data.backend=pyav",
        f"model.num_frames={frames}", f"data.num_workers={workers}",
        f"optim.batch_per_gpu={batch}", "data.output=uint8", "data.verify=first", "data.prefetch=2"])
    loader = build_loader(cfg, device="cpu")
    return _loop(loader, batches, lambda: loader.set_epoch(loader.epoch + 1))


def bench_release(index, frames: int, batch: int, batches: int, workers: int, use_decord: bool) -> float:
    ds = ReleaseStyle(index, frames, use_decord=use_decord)
    kw = {"prefetch_factor": 2} if workers else {}
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, **kw)
    return _loop(dl, batches, lambda: None)


def repeated_list(folder: Path, index, clips: int):
    """A list naming the folder's files over and over, ``clips`` entries at least: the timed
    batches then fit in one epoch (an epoch end restarts the DataLoader workers, which a
    handful of files would make the main cost of a wall-clock row)."""
    paths = [info.path for info in index.infos]
    reps = -(-clips // len(paths))
    lst = folder / f"repeat_{reps}.csv"
    lst.write_text("path,label\n" + "".join(f"{p},0\n" for _ in range(reps) for p in paths))
    cache = str(folder / f"repeat_{reps}_index.jsonl")
    return str(lst), cache, build_index(str(lst), cache_path=cache)


def _loop(loader, batches: int, next_epoch) -> float:
    it = iter(loader)
    next(it)                                        # warm-up: workers start
    n, t0 = 0, time.perf_counter()
    while n < batches:
        try:
            b = next(it)
        except StopIteration:
            next_epoch()
            it = iter(loader)
            continue
        n += 1
        clips = _size(b)
    dt = time.perf_counter() - t0
    return batches * clips / dt


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="340x256")
    ap.add_argument("--frames", default="16,32")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--clips", type=int, default=8, help="clips per size")
    ap.add_argument("--real", default="", metavar="DIR",
                    help="real footage: cut the videos in DIR into Kinetics-style clips (see kinetics_clips) "
                         "instead of generating synthetic ones")
    ap.add_argument("--real-frames", type=int, default=0,
                    help="with --real: pieces of this many frames (0: 10 s at the source's frame rate)")
    ap.add_argument("--source-frames", type=int, default=300, help="frames per clip (30 fps: 10 s)")
    ap.add_argument("--source-gop", type=int, default=250)
    ap.add_argument("--gops", default="1,4,16", help="keyframe intervals of the prepared copies (comma list)")
    ap.add_argument("--short-side", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--batches", type=int, default=3, help="timed batches after one warm-up batch")
    ap.add_argument("--data-dir", default="", help="where to generate clips (default: a temp dir; reused if given)")
    ap.add_argument("--out", default="bench/results/loader_kinetics_cpu.json")
    ap.add_argument("--note", default="", help="free text stored with the results (machine load, ...)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    try:
        import decord  # noqa: F401
        use_decord = True
    except ImportError:
        use_decord = False
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="ivfast_bench_"))
    rows = []
    sizes_mb: dict[str, float] = {}
    footage = "real" if args.real else "synthetic"
    real = sorted(p for p in Path(args.real).iterdir() if p.is_file()) if args.real else []
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        raw = data_dir / (f"real{args.real_frames or ''}_{w}x{h}" if real else f"raw_{w}x{h}")
        if not raw.exists():
            t = time.perf_counter()
            if real:
                kinetics_clips(real, raw, (w, h), args.clips, frames=args.real_frames)
            else:
                make_videos(raw, args.clips, "h264b", frames=args.source_frames, size=(w, h), fps=30, seed=0,
                            gop=args.source_gop)
            print(f"made {args.clips} {footage} clips {w}x{h} in {time.perf_counter() - t:.1f} s", flush=True)
        files = sorted(raw.glob("*.mp4"))
        bytes_raw = sum(f.stat().st_size for f in files)
        sizes = {"raw": {"mb": round(bytes_raw / 1e6, 3), "size_vs_raw": 1.0, "size_vs_raw_per_clip": [1.0, 1.0]}}
        sources = [("raw", raw)]
        for gop in (int(g) for g in args.gops.split(",") if g):
            prep = data_dir / f"prep_{raw.name}_g{gop}_b0"      # one per source folder (real/synthetic, size)
            t = time.perf_counter()
            res = [prepare_one(Job(str(f), out_path(str(f), str(raw), str(prep)), args.short_side, gop, 0.0, 20,
                                   "veryfast", bframes=0)) for f in files]
            assert all(r["status"] != "failed" for r in res), res
            bytes_prep = sum(r["bytes_out"] for r in res)
            per_clip = [r["bytes_out"] / r["bytes_in"] for r in res]
            # the encode's CPU-seconds per second of source (of files done now; reused ones have none)
            done = [r for r in res if r["status"] == "done"]
            src_s = sum(r["frames_in"] / r["fps"] for r in done) if done else 0.0
            sizes[f"prepared g{gop}"] = {
                "mb": round(bytes_prep / 1e6, 3), "size_vs_raw": round(bytes_prep / bytes_raw, 2),
                "size_vs_raw_per_clip": [round(min(per_clip), 2), round(max(per_clip), 2)],
                "prepare_cpu_s_per_source_s": round(sum(r["cpu_s"] for r in done) / src_s, 3) if src_s else None}
            print(f"prepared {len(files)} clips (gop {gop}) in {time.perf_counter() - t:.1f} s "
                  f"({bytes_raw / 1e6:.1f} -> {bytes_prep / 1e6:.1f} MB, {bytes_prep / bytes_raw:.1f}x)", flush=True)
            sources.append((f"prepared g{gop}", prep))
            sizes_mb[f"{w}x{h} g{gop}"] = round(bytes_prep / 1e6, 2)
        sizes_mb[f"{w}x{h} raw"] = round(bytes_raw / 1e6, 2)
        for kind, folder in sources:
            cache = str(folder / "index.jsonl")
            index = build_index(str(folder), cache_path=cache)
            for frames in (int(v) for v in args.frames.split(",")):
                iv, fast, rel = bench_cpu(str(folder), cache, index, frames, use_decord)
                rows.append({"footage": footage, "source": f"{w}x{h}", "data": kind, "frames": frames,
                             "workers": "cpu-time", **sizes[kind],
                             "ivfast_clips_per_s": round(iv, 2), "ivfast_fast_rgb_clips_per_s": round(fast, 2),
                             "release_clips_per_s": round(rel, 2), "ratio": round(iv / rel, 2)})
                print(f"{w}x{h} {kind:8s} T={frames:2d} per CPU-second: ivfast {iv:6.2f} (data.rgb=fast {fast:6.2f})  "
                      f"release {rel:6.2f} clips/s/core  ratio {iv / rel:5.2f}", flush=True)
                for workers in (int(v) for v in args.workers.split(",") if v):
                    rlist, rcache, rindex = repeated_list(folder, index, args.batch * (args.batches + 2) * 2)
                    iv = bench_ivfast(rlist, rcache, frames, args.batch, args.batches, workers)
                    rel = bench_release(rindex, frames, args.batch, args.batches, workers, use_decord)
                    row = {"footage": footage, "source": f"{w}x{h}", "data": kind, "frames": frames,
                           "workers": workers, **sizes[kind],
                           "ivfast_clips_per_s": round(iv, 2), "release_clips_per_s": round(rel, 2),
                           "ratio": round(iv / rel, 2)}
                    rows.append(row)
                    print(f"{w}x{h} {kind:8s} T={frames:2d} workers={workers}: ivfast {iv:6.2f}  "
                          f"release {rel:6.2f} clips/s  ratio {iv / rel:5.2f}", flush=True)
    # the headline: ivfast on prepared data against the release-style loader on the raw files
    for r in rows:
        if r["data"].startswith("prepared"):
            base = next(x for x in rows if x["data"] == "raw" and all(x[k] == r[k] for k in ("source", "frames", "workers")))
            r["ratio_vs_release_on_raw"] = round(r["ivfast_clips_per_s"] / base["release_clips_per_s"], 2)
            if "ivfast_fast_rgb_clips_per_s" in r:
                r["fast_rgb_ratio_vs_release_on_raw"] = round(r["ivfast_fast_rgb_clips_per_s"]
                                                              / base["release_clips_per_s"], 2)
    print("\nclips/s ('cpu-time': clips per CPU-second in one process, i.e. per core; else DataLoader wall clock)")
    print(f"{footage} clips; size: MB and x the raw files (per clip min-max)")
    print("source   data          size             T   workers  ivfast  (rgb=fast)  release  ratio  "
          "prepared ivfast / raw release (rgb=fast)")
    for r in rows:
        lo, hi = r["size_vs_raw_per_clip"]
        size = f"{r['mb']:6.1f} {r['size_vs_raw']:4.1f}x ({lo:.1f}-{hi:.1f})"
        print(f"{r['source']:8s} {r['data']:12s}  {size:<16} {r['frames']:2d}  {r['workers']:>8}  {r['ivfast_clips_per_s']:6.2f}  "
              f"{r.get('ivfast_fast_rgb_clips_per_s', ''):>10}  {r['release_clips_per_s']:7.2f}  {r['ratio']:5.2f}  "
              f"{r.get('ratio_vs_release_on_raw', '')} ({r.get('fast_rgb_ratio_vs_release_on_raw', '')})")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU only: {_cpu_model()}, {os.cpu_count()} cores visible",
        "host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "av": __import__("av").__version__,
        "commit": os.popen("git rev-parse --short HEAD 2>/dev/null").read().strip(),
        "release_decoder": "decord" if use_decord else "PyAV (decord not installed), default threading",
        "clips": (f"real footage from {args.real} ({', '.join(p.name for p in real)}): up to {args.clips} pieces of "
                  f"{f'{args.real_frames} frames' if args.real_frames else '10 s'} per size at the source frame rate, H.264 crf 23 with B-frames (x264 veryfast), keyframe every 250 "
                  "(and at scene cuts)") if real else
                 (f"synthetic: {args.clips} per size, {args.source_frames} frames at 30 fps, H.264 with B-frames "
                  f"(x264 veryfast), keyframe every {args.source_gop}"),
        "footage": footage,
        "prepared": f"ivfast.data.prepare: short side {args.short_side}, keyframe every {args.gops} frames "
                    "('prepared gK' rows), no B-frames, x264 veryfast tune=fastdecode crf 20",
        "megabytes": sizes_mb,
        "note": args.note, "args": vars(args),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
