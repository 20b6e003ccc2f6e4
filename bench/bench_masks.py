"""Masks per second: C++ samplers vs the NumPy reference vs a V-JEPA-style Python collator.

    python bench/bench_masks.py [--batch 256] [--repeats 5]

Prints a table and writes JSON to bench/results/masks_<host>.json. Target: the C++
multi-block sampler at least 50x the pure-Python collator.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ivfast import __version__, masking


def vjepa_style_collator(B, T, H, W, num_blocks, spatial, aspect, generator):
    """Multi-block masks the way V-JEPA's collator builds them: torch ops per sample, in Python."""
    _rand = torch.rand(1, generator=generator).item()
    s_keep = int(H * W * (spatial[0] + _rand * (spatial[1] - spatial[0])))
    ar = aspect[0] + _rand * (aspect[1] - aspect[0])
    h = min(H, int(round(math.sqrt(s_keep * ar))))
    w = min(W, int(round(math.sqrt(s_keep / ar))))
    enc, pred = [], []
    for _ in range(B):
        mask = torch.ones((T, H, W), dtype=torch.int32)
        for _ in range(num_blocks):
            top = torch.randint(0, H - h + 1, (1,), generator=generator)
            left = torch.randint(0, W - w + 1, (1,), generator=generator)
            mask[:, top:top + h, left:left + w] = 0
        mask = mask.flatten()
        enc.append(torch.nonzero(mask).squeeze())
        pred.append(torch.nonzero(mask == 0).squeeze())
    k = min(len(e) for e in enc)
    m = min(len(p) for p in pred)
    return torch.stack([e[:k] for e in enc]), torch.stack([p[:m] for p in pred])


def rate(fn, B, repeats):
    fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return B / best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / f"masks_{platform.node()}.json"))
    args = ap.parse_args()
    B = args.batch
    rows = []
    for T, H, W in [(16, 16, 16), (32, 16, 16)]:
        blocks = dict(num_blocks=8, spatial=(0.15, 0.15))
        gen = torch.Generator().manual_seed(0)
        cands = {
            "multiblock C++ (1 thread)": lambda: masking.multiblock_mask(B, T, H, W, seed=1, threads=1, **blocks),
            "multiblock C++": lambda: masking.multiblock_mask(B, T, H, W, seed=1, **blocks),
            "multiblock NumPy ref": lambda: masking.multiblock_mask_reference(
                B, T, H, W, blocks["num_blocks"], blocks["spatial"], (1.0, 1.0), (0.75, 1.5), 1),
            "multiblock V-JEPA-style Python": lambda: vjepa_style_collator(
                B, T, H, W, blocks["num_blocks"], blocks["spatial"], (0.75, 1.5), gen),
            "tube C++ (1 thread)": lambda: masking.tube_mask(B, T, H, W, 0.75, 1, threads=1),
            "tube C++": lambda: masking.tube_mask(B, T, H, W, 0.75, 1),
            "tube NumPy ref": lambda: masking.tube_mask_reference(B, T, H, W, 0.75, 1),
        }
        res = {name: rate(fn, B, args.repeats) for name, fn in cands.items()}
        base = res["multiblock V-JEPA-style Python"]
        for name, r in res.items():
            rows.append(dict(grid=f"{T}x{H}x{W}", sampler=name, masks_per_s=round(r, 1),
                             x_vs_python_collator=round(r / base, 2) if name.startswith("multiblock") else None))
    print(f"{'grid':<10} {'sampler':<34} {'masks/s':>12} {'x python':>9}")
    for r in rows:
        x = "" if r["x_vs_python_collator"] is None else f"{r['x_vs_python_collator']:.1f}"
        print(f"{r['grid']:<10} {r['sampler']:<34} {r['masks_per_s']:>12.0f} {x:>9}")
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), host=platform.node(),
                cpu=platform.processor() or platform.machine(), torch=torch.__version__,
                ivfast=__version__, batch=B, cpu_count=os.cpu_count(),
                note="best of --repeats runs; 'C++' uses the default thread count (up to 8)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
