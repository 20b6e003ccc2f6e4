"""Training-step throughput per lever (issue 14): step time, clips/s, MFU and peak memory.

    python bench/bench_train_step.py                       # stage 1 b16 and stage 2 b14, ViT-B, levers cumulative
    python bench/bench_train_step.py --presets stage2_vitb --plan single
    python bench/bench_train_step.py --levers sync_free compile --steps 5
    python bench/bench_train_step.py --batch-search 32 24 16   # the old search: largest batch that fits
    python bench/bench_train_step.py --smoke               # tiny demo model on CPU: checks the script

Stable CLI (bench/gpu_check.sh calls it): --presets, --levers, --plan {cumulative,single,all},
--batch, --steps, --warmup, --smoke, --out. Each run records every switch's state in the JSON.

Levers (each a switch; off = the code before issue 14):
  sync_free    no host sync in the step: fused AdamW skips non-finite updates through found_inf
               (off: bool(isfinite(...)) every step)
  compile      torch.compile of the encoder and every predictor layer (runtime.compile=auto on CUDA)
  teacher      frozen teacher with autocast off on its bf16 weights: stage 1's SigLIP with fused
               q/k/v GEMM and GELU epilogue (off: inside the step's autocast, separate q/k/v,
               GELU pass); stage 2's ViT with GELU epilogue and LayerScale+residual in one
               addcmul (off: inside autocast, GELU and LayerScale as their own passes)
  attn_timed   SDPA kernel picked by timing (cuDNN / flash / efficient) instead of first-that-runs
  fp8_teacher  stage-1 teacher GEMMs in row-wise FP8 (Hopper/Ada); stage 1 only
  pred_ckpt    model.predictor.act_checkpoint=selective (a memory lever: costs time, saves GiB)
  pack_sets    model.stage2_pack_sets=true: both mask sets in one encoder pass, varlen attention
               (off: one pass per set); stage 2 only

``--plan cumulative`` (default): all off, then the levers switched on one after another in the
order given; ``single``: all off, then each alone; ``all``: all off and all on. The batch is the
preset's ``optim.batch_per_gpu`` (``--batch`` overrides). The teacher has the configured
architecture with random weights (speed does not depend on them). Clips are in GPU memory: the
pinned side-stream upload of train.py is not measured here. PYTORCH_CUDA_ALLOC_CONF is set to
expandable_segments:True before CUDA starts (unless set). Results: bench/results/train_step_<device>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")   # before CUDA init

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ivfast.config import load_config  # noqa: E402
from ivfast.metrics import device_peak_flops  # noqa: E402
from ivfast.models import attention as attn  # noqa: E402
from ivfast.models.epd import build_model, param_groups  # noqa: E402
from ivfast.models.flops import flops_per_clip, predicted_peak_memory  # noqa: E402

LEVERS = ("sync_free", "compile", "teacher", "attn_timed", "fp8_teacher", "pred_ckpt", "pack_sets")
STAGE_ONLY = {1: {"fp8_teacher"}, 2: {"pack_sets"}}     # levers that exist in one stage only


def plan_runs(levers: list[str], plan: str) -> list[dict]:
    off = {k: False for k in LEVERS}
    runs = [dict(off)]
    if plan == "cumulative":
        cur = dict(off)
        for lv in levers:
            cur = dict(cur, **{lv: True})
            runs.append(dict(cur))
    elif plan == "single":
        runs += [dict(off, **{lv: True}) for lv in levers]
    elif plan == "all":
        runs.append(dict(off, **{lv: True for lv in levers}))
    else:
        raise SystemExit(f"--plan {plan!r}: choose cumulative, single or all")
    return runs


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


def make_cfg(preset: str, sw: dict, batch: int, overrides: list[str], stage1_ckpt: str = ""):
    ov = [f"model.teacher.fp8={str(sw['fp8_teacher']).lower()}",
          f"model.predictor.act_checkpoint={'selective' if sw['pred_ckpt'] else 'none'}",
          f"model.stage2_pack_sets={str(sw['pack_sets']).lower()}", *overrides]
    if batch:
        ov.append(f"optim.batch_per_gpu={batch}")
    if preset == "demo":
        return load_config("demo", ov)
    ov.append("model.predictor.init_from=")
    ov.append("model.teacher.init_from=random" if preset.startswith("stage1") else f"model.init_from={stage1_ckpt}")
    return load_config(preset, ov)


def run_steps(cfg, sw: dict, device: torch.device, steps: int, warmup: int) -> tuple[float, float]:
    attn.timed_selection = sw["attn_timed"]
    attn._sdpa_choice.clear()
    attn._timed_choice.clear()
    model = build_model(cfg).to(device)
    if hasattr(model, "teacher") and hasattr(model.teacher, "fast"):
        model.teacher.fast = sw["teacher"]          # stage 1's SigLIP
    if hasattr(model, "teacher_fast"):
        model.teacher_fast = sw["teacher"]          # stage 2's ViT
    if sw["compile"]:
        model.encoder.compile()
        for layer in model.predictor.layers:
            layer.compile()
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, 0.05)],
                            lr=1e-4, fused=True)
    B, T, S = cfg.optim.batch_per_gpu, cfg.model.num_frames, cfg.model.img_size
    video = torch.randint(0, 256, (B, 3, T, S, S), dtype=torch.uint8, device=device)
    use_amp = device.type == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]

    def step(i):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(video, i)
        out["loss"].backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 5.0)
        bad = ~(torch.isfinite(gn) & torch.isfinite(out["loss"]))
        if sw["sync_free"]:
            opt.found_inf = bad.float().reshape(())
            opt.step()
        elif not bool(bad):          # the pre-issue-14 host decision: one sync per step
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
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del model, opt
    return dt, peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["stage1_vitb", "stage2_vitb"])
    ap.add_argument("--levers", nargs="+", default=None, choices=LEVERS,
                    help="levers in the order switched on (default: all but pred_ckpt; smoke: no compile)")
    ap.add_argument("--plan", default="cumulative", choices=("cumulative", "single", "all"))
    ap.add_argument("--batch", type=int, default=0, help="clips per GPU (default: the preset's)")
    ap.add_argument("--batch-search", nargs="*", type=int, default=None,
                    help="try these batches, largest first, keep the first that fits (default: no search)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny demo model on CPU (checks the script only)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    if args.smoke:
        device = torch.device("cpu")
        args.presets, args.steps, args.warmup = ["demo"], min(args.steps, 2), min(args.warmup, 1)
        levers = args.levers or ["sync_free", "teacher", "attn_timed", "fp8_teacher", "pred_ckpt"]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_train_step.py measures GPU throughput and needs CUDA; none is visible. "
                             "Use --smoke to check the script on CPU.")
        device = torch.device("cuda")
        levers = args.levers or [lv for lv in LEVERS if lv != "pred_ckpt"]
    peak_flops = device_peak_flops(device)
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    tag = "smoke_cpu" if args.smoke else dev_name.replace(" ", "_")
    meta = dict(device=dev_name, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, cuda=torch.version.cuda, peak_bf16_tflops=peak_flops and peak_flops / 1e12,
                plan=args.plan, levers=levers, alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                measured=not args.smoke)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            s1 = fake_stage1_checkpoint(preset, [], Path(tmp) / preset) if preset.startswith("stage2") else ""
            stage = 1 if preset == "demo" or preset.startswith("stage1") else 2
            seen = set()
            for sw in plan_runs(levers, args.plan):
                other = STAGE_ONLY[2 if stage == 1 else 1]   # the other stage's levers do not exist here
                sw = {k: (v and k not in other) for k, v in sw.items()}
                if tuple(sorted(sw.items())) in seen:
                    continue
                seen.add(tuple(sorted(sw.items())))
                row = measure(preset, sw, args, s1, device, peak_flops)
                rows.append(row)
                print(json.dumps(row), flush=True)
                write_results(Path(args.out), tag, meta, rows)   # a later crash keeps these
    write_results(Path(args.out), tag, meta, rows)
    print(f"wrote {args.out}/train_step_{tag}.json")
    return 0


def measure(preset, sw, args, s1, device, peak_flops) -> dict:
    batches = args.batch_search or [args.batch]
    on = [k for k, v in sw.items() if v] or ["none"]
    for batch in batches:
        cfg = make_cfg(preset, sw, batch, [], s1)
        try:
            dt, mem = run_steps(cfg, sw, device, args.steps, args.warmup)
        except torch.OutOfMemoryError:
            dt = None
        if dt is None:       # outside the handler, so the failed step's tensors are gone
            gc.collect()
            torch.cuda.empty_cache()
            continue
        B = cfg.optim.batch_per_gpu
        flops = flops_per_clip(cfg)["total"]
        clips_s = B / dt
        extra = {}
        if sw["fp8_teacher"] and cfg.stage == 1:
            extra["fp8_vs_bf16_teacher"] = fp8_agreement(cfg, device)
        return dict(**extra, preset=preset, levers_on=on, switches=sw, batch_per_gpu=B, step_ms=round(dt * 1e3, 2),
                    clips_per_s=round(clips_s, 2), tflop_per_clip=round(flops / 1e12, 3),
                    mfu=round(clips_s * flops / peak_flops, 4) if peak_flops else None,
                    peak_mem_gib=None if mem is None else round(mem, 2), predicted_peak_mem_gib=round(predicted_peak_memory(cfg)["total"], 1),
                    attention=attn.used_backends(), attention_timings=attn.timed_report())
    return dict(preset=preset, levers_on=on, switches=sw, error=f"no batch of {batches} fits")


def fp8_agreement(cfg, device, clips: int = 2) -> dict:
    """FP8 vs bf16 teacher (same weights: model.teacher.init_from, random by default, seeded) on
    ``clips`` random clips: semantic-mask scores and alignment targets (teacher_agreement)."""
    from ivfast.models.epd import _teacher_dtype
    from ivfast.models.teacher import build_teacher, teacher_agreement

    m = cfg.model
    dt = _teacher_dtype(cfg)
    outs = []
    for fp8 in (False, True):
        t = build_teacher(dataclasses.replace(m.teacher, fp8=fp8), m.align_dim, m.attn_backend, dtype=dt).to(device)
        g = torch.Generator(device="cpu").manual_seed(0)
        video = torch.rand(clips, 3, m.num_frames, m.img_size, m.img_size, generator=g).to(device, dt)
        outs.append(t(video))
        del t
    return teacher_agreement(outs[0], outs[1], frames=m.num_frames)   # the teacher sees every frame


def write_results(out: Path, tag: str, meta: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train_step_{tag}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
