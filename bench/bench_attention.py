"""ivfast.models.attention at the presets' shapes: forward and forward+backward per backend (bf16).

    python bench/bench_attention.py                  # needs a CUDA GPU
    python bench/bench_attention.py --dry-run        # tiny shapes on the CPU: checks the script

Per shape, each candidate that runs there: the module's own choice (``ivfast:auto``), each SDPA
kernel pinned (``sdpa:<kernel>``; windowed shapes: ``sdpa_band:<kernel>``, the dense band-mask
fallback), FlexAttention (``flex``, windowed shapes) and flash-attn when installed. TFLOP/s count
QK^T and PV (2 FLOPs per MAC); a windowed shape counts only the 2w+1 attended keys per query
(effective TFLOP/s); backward = 2.5x forward (the recompute of P included). A candidate that
cannot run records why. Results: bench/results/attention_<device>.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402  (also puts the repo root on sys.path)

import ivfast.models.attention as A  # noqa: E402

# (label, B, N, H, D, window) of the ViT-B presets: the stage-1 teacher (16 clips x 16 frames of
# 256 tokens, 16 heads x 96), the encoder (12 x 64 at 1028 visible tokens), the predictor's
# global and local (w = 64) layers (16 x 64 at 4100 tokens in stage 1, 8196 in stage 2)
SHAPES = [("teacher_256", 256, 256, 16, 96, None), ("encoder_1028", 16, 1028, 12, 64, None),
          ("predictor_4100", 16, 4100, 16, 64, None), ("predictor_8196", 28, 8196, 16, 64, None),
          ("predictor_local_4100", 16, 4100, 16, 64, 64), ("predictor_local_8196", 28, 8196, 16, 64, 64)]
DRY_SHAPES = [("teacher", 2, 24, 2, 16, None), ("predictor_local", 1, 40, 2, 16, 4)]


def _sdpa_pinned(kernel, q, k, v, mask):
    with sdpa_kernel([kernel]):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask).transpose(1, 2)


def candidates(N: int, window: int | None, dev: torch.device) -> dict:
    """name -> fn(q, k, v) for one shape."""
    c = {"ivfast:auto": lambda q, k, v: A.attention(q, k, v, window=window)}
    if window is None:
        for kern in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            c[f"sdpa:{kern.name}"] = lambda q, k, v, kern=kern: _sdpa_pinned(kern, q, k, v, None)
    else:
        band = A.band_mask(N, N, window, dev)
        for kern in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            c[f"sdpa_band:{kern.name}"] = lambda q, k, v, kern=kern: _sdpa_pinned(kern, q, k, v, band)
        c["flex"] = lambda q, k, v: A.attention(q, k, v, window=window, backend="flex")
    c["flash_attn"] = lambda q, k, v: A.attention(q, k, v, window=window, backend="flash_attn")   # if installed
    return c


def run(rec: H.Record, dry: bool, reserve_s: float = 0.0) -> None:
    """Adds one row per (shape, candidate) to ``rec["results"]``; a candidate is skipped when less
    than ``reserve_s`` of the record's budget is left."""
    dev = H.device(dry)
    dt = torch.float32 if dry else torch.bfloat16
    reps = 2 if dry else 5
    for label, B, N, Hh, D, w in DRY_SHAPES if dry else SHAPES:
        q, k, v = (torch.randn(B, N, Hh, D, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
        g = torch.randn(B, N, Hh, D, device=dev, dtype=dt)
        keys = N if w is None else min(N, 2 * w + 1)
        f_fwd = 4.0 * B * Hh * N * keys * D
        f_all = 3.5 * f_fwd
        for name, fn in candidates(N, w, dev).items():
            row = {"shape": label, "backend": name, "B": B, "N": N, "H": Hh, "D": D, "window": w}
            if rec.left() < reserve_s:
                rec.add("results", {"shape": label, "backend": name, "skipped": "part budget spent"})
                continue
            try:
                with torch.no_grad():
                    ms = H.time_ms(lambda: fn(q, k, v), dev, reps=reps)
                row.update(fwd_ms=round(ms, 3), fwd_tflops=round(f_fwd / ms / 1e9, 1))
                q.grad = k.grad = v.grad = None
                ms = H.time_ms(lambda: fn(q, k, v).backward(g), dev, reps=reps)
                row.update(fwd_bwd_ms=round(ms, 3), fwd_bwd_tflops=round(f_all / ms / 1e9, 1))
            except Exception as e:         # not usable here (shape, dtype, device): say why
                row["error"] = H.err(e)
            rec.add("results", row)
        del q, k, v, g
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    rec.set("attention_backends", A.used_backends())
    rec.set("flops_note", "window rows count only the 2w+1 attended keys (effective TFLOP/s); bwd = 2.5x fwd")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (checks the script only)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    dev = H.device(args.dry_run)
    rec = H.Record()
    run(rec, args.dry_run)
    for r in rec.data["results"]:
        print(r)
    tag = H.result_tag(dev, args.dry_run)
    out = H.write_result(Path(args.out) / f"attention_{tag}.json",
                         dict(H.stamp(dev), dry_run=args.dry_run, note=rec.data["flops_note"]), rec.data["results"])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
