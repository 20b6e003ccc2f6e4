"""Checkpoint save time with and without the manifest's content hashes.

``python bench/bench_checkpoint_hash.py [--mb 300] [--repeats 3] [--dir DIR] [--json OUT]``

Writes a model-like state dict of about ``--mb`` MB (fp32 tensors of 1024 x 1024) and an
optimiser-like train state (two moments per tensor) with ``ivfast.checkpoint.save_checkpoint``,
then times hashing the written files alone. Reports medians over ``--repeats``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402  (also puts the repo root on sys.path)

from ivfast import checkpoint as ckpt  # noqa: E402
from ivfast.config import load_config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=300, help="model state size in MB (the train state is 2x)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default="", help="where to write (default: a temporary directory)")
    p.add_argument("--json", default="")
    a = p.parse_args()
    n = max(1, a.mb * 2**20 // (4 * 2**20))
    model = {f"w{i}": torch.randn(1024, 1024) for i in range(n)}
    state = {"optimizer": {"state": {i: {"exp_avg": torch.randn(1024, 1024), "exp_avg_sq": torch.rand(1024, 1024)}
                                     for i in range(n)}}, "step": 1}
    cfg = load_config("demo")
    root = Path(tempfile.mkdtemp(dir=a.dir or None))
    saves, hashes = [], []
    try:
        for r in range(a.repeats):
            t0 = time.perf_counter()
            path = ckpt.save_checkpoint(root, r + 1, model, state, cfg, keep_last=1)
            saves.append(time.perf_counter() - t0)
            names = [f.name for f in path.iterdir() if f.name != ckpt.MANIFEST]
            t0 = time.perf_counter()
            for name in names:
                ckpt.file_digest(path / name)
            hashes.append(time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in path.iterdir())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res = {"bytes": size, "hash": ckpt.HASH, "save_s_incl_hash": statistics.median(saves),
           "hash_s": statistics.median(hashes),
           "repeats": a.repeats, **H.stamp(torch.device("cpu"))}
    res["hash_share_of_save"] = res["hash_s"] / res["save_s_incl_hash"]
    res["hash_gb_s"] = size / res["hash_s"] / 1e9
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
