"""GPU figures for the composed models: step time, peak memory per clip, attention backend, MFU.

    python bench/bench_models.py --preset stage1_vitb --batch 8 16
    python bench/bench_models.py --preset stage2_vitb --batch 4 8 14

Forward + backward (no optimizer step) under bf16 autocast with random weights: the teacher is
built with ``model.teacher.init_from=random`` (the configured SigLIP2 architecture, no download),
the predictor is randomly initialised and stage 2 starts from a random encoder. MFU uses
``ivfast.models.flops.flops_per_clip`` (useful FLOPs: windowed local attention) and the device's
dense bf16 peak. Results are appended as JSON lines to ``--out`` (default
``bench/results/models.jsonl``) with the device name, versions and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
             "L40S": 362e12, "4090": 165e12}


def peak_flops(name: str) -> float | None:
    if "H100" in name and "PCIe" in name:
        return 756e12
    for k, v in PEAK_BF16.items():
        if k in name:
            return v
    return None


def run(preset: str, batch: int, steps: int, warmup: int, overrides: list[str]) -> dict:
    from ivfast.config import load_config
    from ivfast.models import attention as A
    from ivfast.models.epd import Stage1Model, Stage2Model
    from ivfast.models.flops import flops_per_clip

    ov = ["model.predictor.init_from=", "model.teacher.init_from=random", "model.init_from=",
          "runtime.device=cuda"] + overrides
    cfg = load_config(preset, ov)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = (Stage1Model(cfg, teacher_dtype=torch.bfloat16) if cfg.stage == 1
             else Stage2Model(cfg, teacher_dtype=torch.bfloat16)).to(dev).train()
    m = cfg.model
    video = torch.randint(0, 256, (batch, 3, m.num_frames, m.img_size, m.img_size), dtype=torch.uint8, device=dev)
    torch.cuda.reset_peak_memory_stats()
    times, flops = [], []
    for step in range(warmup + steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(video, step)
        out["loss"].backward()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(dt)
            keep = out["visible"] if cfg.stage == 2 else None
            flops.append(flops_per_clip(cfg, keep=keep)["total"])
    step_s = statistics.median(times)
    name = torch.cuda.get_device_name()
    peak = peak_flops(name)
    achieved = statistics.mean(flops) * batch / step_s
    return dict(preset=preset, stage=cfg.stage, batch=batch, frames=m.num_frames, step_s=round(step_s, 4),
                clips_per_s=round(batch / step_s, 2), tflops_per_clip=round(statistics.mean(flops) / 1e12, 3),
                achieved_tflops=round(achieved / 1e12, 1), mfu=round(achieved / peak, 3) if peak else None,
                peak_mem_gib_per_clip=round(torch.cuda.max_memory_allocated() / batch / 2**30, 3),
                attention=A.used_backends(), loss=float(out["loss"]), overrides=overrides)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="stage1_vitb")
    ap.add_argument("--batch", type=int, nargs="+", default=[8])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "models.jsonl"))
    ap.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_models.py needs a CUDA GPU")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    try:
        import flash_attn
        meta["flash_attn"] = flash_attn.__version__
    except Exception:
        meta["flash_attn"] = None
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    for b in args.batch:
        try:
            rec = run(args.preset, b, args.steps, args.warmup, args.overrides)
        except torch.OutOfMemoryError:
            rec = dict(preset=args.preset, batch=b, error="out of memory")
        torch.cuda.empty_cache()
        rec.update(meta)
        print(json.dumps(rec))
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
