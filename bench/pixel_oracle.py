"""How much can any per-patch condition lower the demo decoder's eps-MSE? An oracle on demo patches.

The stage-1 decoder denoises each masked patch given the predictor's condition z. This trains the
decoder alone on the demo's pixel targets (clips drawn like the eval demo's, 4 frames of 56 px,
patch 14, ImageNet-normalised: 588 values a patch) with an ORACLE condition, a random projection of
the clean patch itself (what a perfect predictor could at best supply), and reports the eps-MSE
with the true and with shuffled conditions, overall and per timestep quarter. If even the oracle
gap is small, the objective cannot reward a predictor for informative conditions, whatever the
encoder learns.

    python bench/pixel_oracle.py --width 64 --steps 400
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from ivfast.config import DecoderConfig
from ivfast.eval.synth_labels import make_clip
from ivfast.models.diffusion import DiffusionLoss
from ivfast.ops import patch_targets

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def demo_patches(clips: int, seed: int, frames: int = 4, size: int = 56, patch: int = 14) -> torch.Tensor:
    """[clips * patches, 588] pixel targets of every patch of ``clips`` synthetic clips."""
    rng = np.random.default_rng(seed)
    video = np.stack([make_clip(int(rng.integers(8)), frames, size, rng) for _ in range(clips)])
    v = torch.from_numpy(video).permute(0, 4, 1, 2, 3).contiguous()          # [B, 3, T, H, W]
    n = frames * (size // patch) ** 2
    ids = torch.arange(n).expand(clips, n).contiguous()
    return patch_targets(v, ids, patch, 1, MEAN, STD).reshape(clips * n, -1)


def patch_summary(x: torch.Tensor, patch: int = 14) -> torch.Tensor:
    """[R, 588] patches -> [R, 9]: each channel's mean and its left-right and top-bottom differences
    (what a predictor could at best infer from smooth neighbours)."""
    p = x.reshape(len(x), 3, patch, patch)
    h = patch // 2
    dx = p[..., :, h:].mean((2, 3)) - p[..., :, :h].mean((2, 3))
    dy = p[..., h:, :].mean((2, 3)) - p[..., :h, :].mean((2, 3))
    return torch.cat([p.mean((2, 3)), dx, dy], 1)


def make_condition(kind: str, D: int, C: int):
    """``cond(x)``: the condition given for clean patches ``x`` [R, D]: a fixed random projection
    (to C values) of the whole patch ("oracle"), of its channel means ("mean"), of means and
    gradients ("meangrad"), or zeros."""
    if kind == "zero":
        return lambda x: torch.zeros(len(x), C)
    src, dim = {"oracle": (lambda x: x, D), "mean": (lambda x: patch_summary(x)[:, :3], 3),
                "meangrad": (patch_summary, 9)}[kind]
    proj = torch.randn(dim, C, generator=torch.Generator().manual_seed(7)) / dim ** 0.5
    return lambda x: src(x) @ proj


def eps_mse_by_quarter(model: DiffusionLoss, x0: torch.Tensor, cond: torch.Tensor, draws: int = 4) -> list[float]:
    """eps-MSE per quarter of the timesteps (the same t and noise for every condition)."""
    diff = model.train_diffusion
    T = diff.num_timesteps
    out = []
    with torch.no_grad():
        for q in range(4):
            tot = 0.0
            for d in range(draws):
                g = torch.Generator().manual_seed(1000 * q + d)
                t = torch.randint(q * T // 4, (q + 1) * T // 4, (len(x0),), generator=g)
                noise = torch.randn(x0.shape, generator=g)
                terms = diff.training_losses(lambda xt, tt: model.net(xt, tt, cond), x0, t, noise)
                tot += float(terms["mse"].mean()) / draws
            out.append(tot)
    return out


def run(args, seed: int) -> dict:
    torch.manual_seed(seed)
    train = demo_patches(args.clips, seed)
    val = demo_patches(64, 10_000 + seed)
    D, C = train.shape[1], 64
    cond = make_condition(args.cond, D, C)
    model = DiffusionLoss(DecoderConfig(depth=args.depth, width=args.width, impl="eager", learn_sigma=True,
                                        dtype="fp32"), D, C)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for _ in range(args.steps):
        x = train[torch.randint(len(train), (args.rows,), generator=g)]
        loss = model(x, cond(x))["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    perm = torch.randperm(len(val), generator=torch.Generator().manual_seed(1))
    true = eps_mse_by_quarter(model, val, cond(val))
    shuf = eps_mse_by_quarter(model, val, cond(val)[perm])
    return {"seed": seed, "true": sum(true) / 4, "shuffled": sum(shuf) / 4, "true_by_quarter": true,
            "shuffled_by_quarter": shuf, "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--rows", type=int, default=192, help="patches a step (demo: 4 clips x 48 masked)")
    ap.add_argument("--lr", type=float, default=5e-2 * 4 / 256, help="demo's peak lr")
    ap.add_argument("--clips", type=int, default=320)
    ap.add_argument("--cond", choices=("oracle", "mean", "meangrad", "zero"), default="oracle")
    ap.add_argument("--seeds", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    for s in range(args.seeds):
        r = run(args, s)
        q = " ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(r["true_by_quarter"], r["shuffled_by_quarter"]))
        print(f"width {args.width} depth {args.depth} steps {args.steps} cond {args.cond} seed {s}: "
              f"true {r['true']:.4f} shuffled {r['shuffled']:.4f}; by t quarter (true/shuffled) {q} "
              f"[{r['seconds']} s]", flush=True)
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
