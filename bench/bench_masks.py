"""Masks per second: C++ samplers vs the NumPy reference vs a V-JEPA-style Python collator.

    python bench/bench_masks.py [--batch 256] [--repeats 5]

Prints a table and writes JSON to bench/results/masks_<host>.json. Target: the C++
multi-block sampler at least 50x the V-JEPA-style Python collator; the last line says whether
this run met it.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (also puts the repo root on sys.path)

from ivfast import masking  # noqa: E402


class VJEPAStyleCollator:
    """Multi-block masks built the way V-JEPA's collator builds them, in Python with torch.

    Per sample and block: a full (T, H, W) int32 mask with the block zeroed, multiplied into
    the sample's context mask; the context is resampled if empty; nonzero / argwhere give the
    ids; every list is cut to the batch minimum and collated. (Written from V-JEPA's
    published algorithm, as the baseline the issue names.)
    """

    def __init__(self, T, H, W, num_blocks, spatial, aspect, temporal=(1.0, 1.0), seed=0):
        self.T, self.H, self.W, self.npred = T, H, W, num_blocks
        self.spatial, self.aspect, self.temporal = spatial, aspect, temporal
        self.generator = torch.Generator().manual_seed(seed)

    def _block_size(self):
        _rand = torch.rand(1, generator=self.generator).item()
        t = max(1, int(self.T * (self.temporal[0] + _rand * (self.temporal[1] - self.temporal[0]))))
        s_keep = int(self.H * self.W * (self.spatial[0] + _rand * (self.spatial[1] - self.spatial[0])))
        ar = self.aspect[0] + _rand * (self.aspect[1] - self.aspect[0])
        h = min(self.H, int(round(math.sqrt(s_keep * ar))))
        w = min(self.W, int(round(math.sqrt(s_keep / ar))))
        return t, h, w

    def _block_mask(self, size):
        t, h, w = size
        top = torch.randint(0, self.H - h + 1, (1,), generator=self.generator)
        left = torch.randint(0, self.W - w + 1, (1,), generator=self.generator)
        start = torch.randint(0, self.T - t + 1, (1,), generator=self.generator)
        mask = torch.ones((self.T, self.H, self.W), dtype=torch.int32)
        mask[start:start + t, top:top + h, left:left + w] = 0
        return mask

    def __call__(self, B):
        size = self._block_size()
        enc, pred = [], []
        min_keep_enc = min_keep_pred = self.T * self.H * self.W
        for _ in range(B):
            while True:
                mask_e = torch.ones((self.T, self.H, self.W), dtype=torch.int32)
                for _ in range(self.npred):
                    mask_e *= self._block_mask(size)
                mask_e = mask_e.flatten()
                mask_p = torch.argwhere(mask_e == 0).squeeze()
                mask_e = torch.nonzero(mask_e).squeeze()
                if len(mask_e) > 0:
                    break
            min_keep_enc, min_keep_pred = min(min_keep_enc, len(mask_e)), min(min_keep_pred, len(mask_p))
            enc.append(mask_e)
            pred.append(mask_p)
        collate = torch.utils.data.default_collate
        return collate([e[:min_keep_enc] for e in enc]), collate([p[:min_keep_pred] for p in pred])


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
        vjepa = VJEPAStyleCollator(T, H, W, blocks["num_blocks"], blocks["spatial"], (0.75, 1.5))
        cands = {
            "multiblock C++ (1 thread)": lambda: masking.multiblock_mask(B, T, H, W, seed=1, threads=1, **blocks),
            "multiblock C++": lambda: masking.multiblock_mask(B, T, H, W, seed=1, **blocks),
            "multiblock NumPy ref": lambda: masking.multiblock_mask_reference(
                B, T, H, W, blocks["num_blocks"], blocks["spatial"], (1.0, 1.0), (0.75, 1.5), 1),
            "multiblock V-JEPA-style Python": lambda: vjepa(B),
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
    meta = dict(harness.stamp(torch.device("cpu")), batch=B, cpu_count=os.cpu_count(),
                note="best of --repeats runs; 'C++' uses the default thread count (up to 8)")
    harness.write_result(Path(args.out), meta, rows)
    worst = min(r["x_vs_python_collator"] for r in rows if r["sampler"] == "multiblock C++")
    print(f"target (C++ multi-block >= 50x the Python collator): {'met' if worst >= 50 else 'NOT met'} "
          f"(worst grid {worst:.1f}x)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
