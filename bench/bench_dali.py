"""DALI's GPU video decoding (NVDEC) against the PyAV path: clips/s and pixel agreement, same plans.

    python bench/bench_dali.py              # raw and prepared H.264 clips, 16 frames at 224 px, GPU
    python bench/bench_dali.py --dry-run    # DALI's CPU decoder on two small VP9 clips

Needs nvidia-dali and PyAV; without them it records why it measured nothing. The clips are
synthetic (ivfast.data.synth), made in a temporary folder. Results: bench/results/dali_<device>.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402  (also puts the repo root on sys.path)

try:
    import av
    from ivfast.data.dali import DaliClipDecoder, dali_status
    from ivfast.data.prepare import Job, prepare_one
    from ivfast.data.pyav import crop_resize, decode_frames
    from ivfast.data.sampling import plan_clip, sample_rng
    from ivfast.data.synth import make_videos
    MISSING = None
except ImportError as e:            # a bare GPU machine has neither PyAV nor DALI
    MISSING = H.err(e)


def run(rec: H.Record, dry: bool, reserve_s: float = 0.0) -> None:
    """One row per clip set in ``rec["results"]``, or ``rec["skipped"]`` saying why none."""
    if MISSING is not None:
        rec.set("skipped", f"needs PyAV and nvidia-dali: {MISSING}")
        return
    ok, why = dali_status()
    if not ok:
        rec.set("skipped", f"DALI not usable: {why}")
        return
    dev = H.device(dry)
    n, frames, size, T, out = (2, 24, (96, 80), 8, 56) if dry else (4, 150, (340, 256), 16, 224)
    tmp = Path(tempfile.mkdtemp(prefix="bench_dali_"))
    sets = {"raw": make_videos(tmp / "raw", n, "vp9" if dry else "h264b", frames=frames, size=size, fps=30,
                               seed=0, gop=0 if dry else 250)}
    if not dry:       # DALI's CPU decoder has no H.264: prepared (H.264) files only on the GPU
        sets["prepared_g1"] = []
        for f in sets["raw"]:
            dst = tmp / "prep" / (f.stem + ".mp4")
            r = prepare_one(Job(str(f), str(dst), 256, 1, 0.0, 20, "veryfast"))
            if r["status"] != "done":
                raise RuntimeError(f"prepare failed: {r}")
            sets["prepared_g1"].append(dst)
    rec.set("clips", {"n": n, "frames": frames, "source": f"{size[0]}x{size[1]}", "T": T, "out": out})
    dec = DaliClipDecoder(n, T, out, device_id=None if dry else (dev.index or 0), num_threads=2 if dry else 8)
    for kind, files in sets.items():
        if rec.left() < reserve_s:
            rec.add("results", {"data": kind, "skipped": "part budget spent"})
            continue
        with av.open(str(files[0])) as c:
            W, Hh = c.streams.video[0].width, c.streams.video[0].height
        plans = [plan_clip(num_frames_video=frames, fps=30.0, width=W, height=Hh, num=T, out_size=out,
                           rng=sample_rng(0, 0, i)) for i in range(n)]
        data = [np.fromfile(str(f), np.uint8) for f in files]
        got = dec.decode(data, plans)
        reps = 2 if dry else 5
        t0 = time.perf_counter()
        for _ in range(reps):
            got = dec.decode(data, plans)
        H.sync(dev)
        dt = (time.perf_counter() - t0) / reps
        ref = torch.stack([crop_resize(decode_frames(str(f), pl.frames), pl, out) for f, pl in zip(files, plans)])
        diff = got.cpu().float() - ref.float()
        mse = float(diff.square().mean())
        rec.add("results", {"data": kind, "clips_per_s": round(n / dt, 1), "ms_per_batch": round(1000 * dt, 1),
                            "psnr_vs_pyav_db": round(10 * np.log10(255 ** 2 / mse), 1) if mse > 0 else "identical",
                            "mean_abs_diff": round(float(diff.abs().mean()), 3)})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="DALI's CPU decoder, small VP9 clips")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    dev = H.device(args.dry_run)
    rec = H.Record()
    run(rec, args.dry_run)
    print(rec.data.get("skipped") or rec.data["results"])
    tag = H.result_tag(dev, args.dry_run)
    out = H.write_result(Path(args.out) / f"dali_{tag}.json", dict(H.stamp(dev), clips=rec.data.get("clips"),
                         skipped=rec.data.get("skipped")), rec.data.get("results", []))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
