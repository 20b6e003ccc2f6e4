"""Clips per second of each decoding path, on generated clips at realistic source sizes.

Paths: ``pyav`` (PyAV in DataLoader workers), ``dali-cpu`` (DALI's CPU decoder; it handles
VP8/VP9/MJPEG, other codecs are routed to PyAV threads and the row says so) and ``dali-gpu``
(NVDEC, when CUDA and DALI are present). Output: uint8 [B, 3, T, 224, 224] on the device,
the training contract. Writes JSON and CSV to ``bench/results/``.

    python bench/bench_loader.py                              # full grid
    python bench/bench_loader.py --sizes 340x256 --codecs vp9,h264 --frames 16 --clips 8 --batches 3

Reference: the paper's runs consume about 10 clips/s per A100 (see shared/RECIPE.md), so the
target is >= 30 clips/s per GPU from the DALI path on a GPU node.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ivfast.config import load_config  # noqa: E402
from ivfast.data import build_index, build_loader  # noqa: E402
from ivfast.data.dali import dali_status  # noqa: E402
from ivfast.data.synth import make_videos  # noqa: E402

TRAIN_CLIPS_PER_S = 10.0   # per A100, stage 1 (RECIPE.md); DALI's target is 3x this


def bench_one(list_path: str, cache: str, backend: str, device: str, frames: int, batch: int,
              batches: int, workers: int, threads: int) -> dict:
    cfg = load_config("stage1_vitb", [
        f"data.train_list={list_path}", f"data.index_cache={cache}", f"data.backend={backend}",
        f"data.num_frames={frames}", f"model.num_frames={frames}", f"data.num_workers={workers}",
        f"data.decode_threads={threads}", f"optim.batch_per_gpu={batch}", "data.output=uint8",
        "data.verify=first"])
    loader = build_loader(cfg, device=device)
    it = iter(loader)
    first = next(it)                               # warm-up: worker start, pipeline build
    if first["video"].is_cuda:
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            b = next(it)
        except StopIteration:
            loader.set_epoch(loader.epoch + 1)
            it = iter(loader)
            b = next(it)
        n += b["video"].shape[0]
    if b["video"].is_cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    s = loader.bad_summary()
    return {"clips_per_s": n / dt, "clips": n, "seconds": dt, "shape": list(b["video"].shape),
            "dali_fallback_batches": s["dali_fallback_batches"], "bad_files": s["bad_files"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="340x256,640x360")
    ap.add_argument("--codecs", default="h264,vp9")
    ap.add_argument("--frames", default="16,32")
    ap.add_argument("--paths", default="auto", help="comma list of pyav,dali-cpu,dali-gpu; auto = all available")
    ap.add_argument("--clips", type=int, default=32, help="generated clips per (size, codec)")
    ap.add_argument("--source-frames", type=int, default=96, help="frames per generated clip (30 fps)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=8, help="timed batches after one warm-up batch")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="PyAV DataLoader workers")
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="DALI threads")
    ap.add_argument("--data-dir", default="", help="where to generate clips (default: a temp dir)")
    ap.add_argument("--out", default="bench/results/loader")
    ap.add_argument("--note", default="", help="free text stored with the results (machine load, ...)")
    args = ap.parse_args(argv)

    dali_ok, why = dali_status()
    paths = args.paths.split(",") if args.paths != "auto" else (
        ["pyav"] + (["dali-cpu"] if dali_ok else []) + (["dali-gpu"] if dali_ok and torch.cuda.is_available() else []))
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="ivfast_bench_"))
    rows = []
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        for codec in args.codecs.split(","):
            sub = data_dir / f"{codec}_{w}x{h}"
            if not sub.exists():
                t = time.perf_counter()
                make_videos(sub, args.clips, codec, frames=args.source_frames, size=(w, h), fps=30, seed=0)
                print(f"generated {args.clips} {codec} clips {w}x{h} x {args.source_frames} frames "
                      f"in {time.perf_counter() - t:.1f} s", flush=True)
            cache = str(sub / "index.jsonl")
            build_index(str(sub), cache_path=cache, workers=min(4, os.cpu_count() or 1))
            for frames in (int(f) for f in args.frames.split(",")):
                for path in paths:
                    backend, device = {"pyav": ("pyav", "cpu"), "dali-cpu": ("dali", "cpu"),
                                       "dali-gpu": ("dali", "cuda")}[path]
                    if path == "dali-gpu" and not torch.cuda.is_available():
                        continue
                    workers = args.workers if backend == "pyav" else 0
                    r = bench_one(str(sub), cache, backend, device, frames, args.batch, args.batches,
                                  workers, args.threads)
                    routed = "dali" if backend == "dali" and (device == "cuda" or codec in ("vp8", "vp9", "mjpeg")) else "pyav"
                    row = {"path": path, "codec": codec, "source": f"{w}x{h}", "frames": frames, "out_px": 224,
                           "batch": args.batch, "pyav_workers": workers,
                           "dali_threads": args.threads if backend == "dali" else 0,
                           "decoded_by": routed, **r}
                    rows.append(row)
                    print(f"{path:9s} {codec:5s} {w}x{h} T={frames:2d}: {r['clips_per_s']:7.2f} clips/s "
                          f"(decoded by {routed}, workers {workers}, threads {row['dali_threads']})", flush=True)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu only",
        "dali": (__import__("nvidia.dali").dali.__version__ if dali_ok else f"unavailable: {why}"),
        "av": __import__("av").__version__,
        "target_note": f"training consumes ~{TRAIN_CLIPS_PER_S:g} clips/s per A100; target >= "
                       f"{3 * TRAIN_CLIPS_PER_S:g} clips/s per GPU from the DALI GPU path",
        "note": args.note,
        "args": vars(args),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "shape"], extrasaction="ignore")
        wr.writeheader()
        wr.writerows(rows)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
