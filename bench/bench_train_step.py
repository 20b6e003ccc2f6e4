"""Training-step throughput: steps/s, clips/s per GPU and MFU, model path alone (in-memory clips).

    python bench/bench_train_step.py                      # stage 1 (16 f) and stage 2 (32 f), ViT-B
    python bench/bench_train_step.py --modes eager triton --batches 32 16 8
    python bench/bench_train_step.py --smoke              # tiny demo model on CPU: checks the script

For each module switch (``eager``: reference PyTorch everywhere; ``compile``: torch.compile of the
references and of encoder/predictor; ``triton``: ivfast kernels; ``triton+compile``) it finds the
largest per-GPU batch of ``--batches`` that fits, times ``--steps`` optimiser steps (bf16 autocast,
fused AdamW) and reports MFU from the analytic FLOP counter (teacher forward included) against
the device's bf16 peak. The teacher has the configured architecture with random weights
(``model.teacher.init_from=random``): speed does not depend on the weights. JSON and CSV go to
bench/results/train_step_<device>.{json,csv}.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ivfast.config import load_config
from ivfast.metrics import device_peak_flops
from ivfast.models.epd import build_model, param_groups
from ivfast.models.flops import flops_per_clip

MODES = {
    "eager": dict(token_impl="eager", decoder_impl="eager", compile=False),
    "compile": dict(token_impl="compile", decoder_impl="compile", compile=True),
    "triton": dict(token_impl="triton", decoder_impl="triton", compile=False),
    "triton+compile": dict(token_impl="triton", decoder_impl="triton", compile=True),
}


def make_cfg(preset: str, mode: str, batch: int, overrides: list[str], stage1_ckpt: str = ""):
    m = MODES[mode]
    ov = [f"model.token_impl={m['token_impl']}", f"model.decoder.impl={m['decoder_impl']}",
          "model.predictor.init_from=", f"optim.batch_per_gpu={batch}", *overrides]
    if preset.startswith("stage1"):
        ov.append("model.teacher.init_from=random")
    else:
        ov.append(f"model.init_from={stage1_ckpt}")
    return load_config(preset, ov), m["compile"]


def fake_stage1_checkpoint(preset2: str, overrides: list[str], out: Path) -> str:
    """A random stage-1 model of the stage-2 preset's sizes, saved where stage 2 reads it."""
    from safetensors.torch import save_file

    cfg2 = load_config(preset2, ["model.init_from=x", *overrides])
    cfg1 = load_config("stage1_vitb" if "vitb" in preset2 else "stage1_vitl",
                       ["model.teacher.init_from=random", "model.teacher.depth=1", "model.teacher.middle_layers=[0]",
                        "model.teacher.student_layers=[0]", "model.predictor.init_from=", *overrides])
    cfg1 = dataclasses.replace(cfg1, model=dataclasses.replace(
        cfg1.model, encoder=cfg2.model.encoder, predictor=cfg2.model.predictor))
    model = build_model(cfg1)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    return str(out)


def run_steps(cfg, compile_modules: bool, device: torch.device, steps: int, warmup: int):
    model = build_model(cfg).to(device)
    if compile_modules:
        for name in ("encoder", "predictor"):
            getattr(model, name).compile()
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, 0.05)],
                            lr=1e-4, fused=device.type == "cuda")
    B, T, S = cfg.optim.batch_per_gpu, cfg.model.num_frames, cfg.model.img_size
    video = torch.randint(0, 256, (B, 3, T, S, S), dtype=torch.uint8, device=device)
    use_amp = device.type == "cuda"

    def step(i):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(video, i)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return dt, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["stage1_vitb", "stage2_vitb"])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--batches", nargs="+", type=int, default=[64, 48, 32, 24, 16, 12, 8, 4])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny demo model on CPU (checks the script only)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    if args.smoke:
        device, overrides = torch.device("cpu"), []
        args.presets, args.batches, args.steps, args.warmup = ["demo"], [2], 2, 1
        args.modes = [m for m in args.modes if m == "eager"] or ["eager"]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_train_step.py measures GPU throughput and needs CUDA; none is visible. "
                             "Use --smoke to check the script on CPU.")
        device, overrides = torch.device("cuda"), []
    peak_flops = device_peak_flops(device)
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    tag = "smoke_cpu" if args.smoke else dev_name.replace(" ", "_")
    meta = dict(device=dev_name, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, cuda=torch.version.cuda, peak_bf16_tflops=peak_flops and peak_flops / 1e12)
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            s1 = ""
            if preset.startswith("stage2"):
                s1 = fake_stage1_checkpoint(preset, overrides, Path(tmp) / preset)
            for mode in args.modes:
                for batch in args.batches:
                    cfg, comp = make_cfg(preset, mode, batch, overrides, s1) if preset != "demo" else (
                        load_config("demo", [f"optim.batch_per_gpu={batch}"]), False)
                    try:
                        dt, mem = run_steps(cfg, comp, device, args.steps, args.warmup)
                        oom = False
                    except torch.OutOfMemoryError:
                        oom = True
                    if oom:   # outside the handler, so the failed step's tensors are gone
                        gc.collect()
                        torch.cuda.empty_cache()
                        continue
                    flops = flops_per_clip(cfg)["total"]
                    clips_s = batch / dt
                    rows.append(dict(preset=preset, mode=mode, batch_per_gpu=batch, frames=cfg.model.num_frames,
                                     step_ms=round(dt * 1e3, 2), steps_per_s=round(1 / dt, 3),
                                     clips_per_s=round(clips_s, 2), tflop_per_clip=round(flops / 1e12, 3),
                                     mfu=round(clips_s * flops / peak_flops, 4) if peak_flops else None,
                                     peak_mem_gib=round(mem, 2)))
                    print(rows[-1], flush=True)
                    write_results(Path(args.out), tag, meta, rows)   # a later crash keeps these
                    break   # the largest batch that fits
                else:
                    print(f"{preset} {mode}: no batch size of {args.batches} fits")
    write_results(Path(args.out), tag, meta, rows)
    print(f"wrote {args.out}/train_step_{tag}.json")


def write_results(out: Path, tag: str, meta: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train_step_{tag}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    if rows:
        with open(out / f"train_step_{tag}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
