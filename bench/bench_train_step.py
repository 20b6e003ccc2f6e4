"""One optimiser step of the real ``Trainer.train_step`` at a preset: step time, clips/s, MFU, memory.

    python bench/bench_train_step.py                                   # stage 1 b16 and stage 2 b14, ViT-B
    python bench/bench_train_step.py --presets stage2_vitb --levers pack_sets compile --plan single
    python bench/bench_train_step.py --presets stage1_vitb --batch 16 8   # the first batch that fits
    python bench/bench_train_step.py --dry-run                         # the demo model on the CPU

``TrainStep`` is the one step timer of bench/ (bench/gpu_check.py uses it too): a ``Trainer`` built
from the preset with random weights (the teacher has the configured architecture; stage 2 starts
from a random stage-1 checkpoint of the preset's sizes), one micro-batch per step, fed the same
random clips already on the device. The loader is left out on purpose: it needs video files and
PyAV or DALI, and its cost is not the step's.

Levers are config switches, each off in the first row (``--plan cumulative``: then switched on one
after another; ``single``: each alone; ``all``: all on). A "before" of a code change is this file
run at that git revision, not a switch in the code.
  compile      runtime.compile (torch.compile of encoder and predictor layers)
  fp8_teacher  model.teacher.fp8: row-wise FP8 teacher GEMMs (stage 1 only; Hopper/Ada)
  pred_ckpt    model.predictor.act_checkpoint=selective (a memory lever: costs time, saves GiB)
  pack_sets    model.stage2_pack_sets: both mask sets in one encoder pass (stage 2 only)
Results: bench/results/train_step_<device>.json (meta: the device and version stamp).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")   # before CUDA init

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402  (also puts the repo root on sys.path)

import ivfast.models.attention as A  # noqa: E402
from ivfast.config import load_config  # noqa: E402
from ivfast.models import predictor as P, teacher as TT, vit as V  # noqa: E402
from ivfast.models.epd import build_model  # noqa: E402
from ivfast.models.flops import flops_per_clip, predicted_peak_memory  # noqa: E402
from ivfast.models.teacher import build_teacher, teacher_agreement  # noqa: E402
from ivfast.data.loader import DeviceClips  # noqa: E402
from ivfast.trainer import Trainer  # noqa: E402

LEVERS = {"compile": ("runtime.compile={}", "true", "false"),
          "fp8_teacher": ("model.teacher.fp8={}", "true", "false"),
          "pred_ckpt": ("model.predictor.act_checkpoint={}", "selective", "none"),
          "pack_sets": ("model.stage2_pack_sets={}", "true", "false")}
STAGE_ONLY = {"fp8_teacher": 1, "pack_sets": 2}
# the demo model at stage 2 (dry run): multiblock masks that fit its 4 x 4 grid
DRY_STAGE2 = ["stage=2", "masking.kind=multiblock", "masking.max_keep=0",
              "masking.blocks=[{num_blocks: 2, spatial_scale: [0.3, 0.3]}, {num_blocks: 1, spatial_scale: [0.5, 0.5]}]"]


# --------------------------------------------------------------------------- the step timer
class TrainStep:
    """The real ``Trainer`` at ``cfg``; calling it runs one ``train_step()``.

    The model is built directly on the device (a 1 B random teacher takes about a minute to
    initialise on a CPU); its loader is :class:`DeviceClips`."""

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device = cfg, device
        with torch.device(device):
            self.trainer = Trainer(cfg, loader=DeviceClips(cfg, device))

    def __call__(self) -> dict:
        return self.trainer.train_step()

    def close(self) -> None:
        self.trainer.metrics.close()


def preset_config(preset: str, batch: int, overrides=(), dry: bool = False, out_dir: str = ""):
    """The config ``TrainStep`` times: the preset with random weights, ``batch`` clips per step in
    one micro-batch, no data files. Stage 2 gets a random stage-1 checkpoint in ``out_dir``.
    Dry run: the demo model (``preset`` names the stage only)."""
    out_dir = out_dir or tempfile.mkdtemp(prefix="bench_train_step_")
    stage = 2 if "stage2" in preset else 1
    common = [f"optim.batch_per_gpu={batch}", f"optim.global_batch={batch}", "runtime.device=auto",
              f"runtime.output_dir={out_dir}/run", "model.predictor.init_from="]
    if dry:
        cfg = load_config("demo", ["demo=false", *common, *(DRY_STAGE2 if stage == 2 else []), *overrides])
    elif stage == 1:
        cfg = load_config(preset, [*common, "model.teacher.init_from=random", *overrides])
    else:
        cfg = load_config(preset, [*common, "model.init_from=x", *overrides])
    if stage == 2:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=stage1_checkpoint(cfg, out_dir)))
    return cfg


def stage1_checkpoint(cfg2, out_dir: str) -> str:
    """A random stage-1 model with the stage-2 config's encoder and predictor (a one-layer teacher:
    its weights are not saved), written where stage 2 reads it."""
    from safetensors.torch import save_file
    m = cfg2.model
    teacher = dataclasses.replace(m.teacher, init_from="random", depth=1, middle_layers=[0], student_layers=[0])
    cfg1 = dataclasses.replace(cfg2, stage=1, model=dataclasses.replace(m, teacher=teacher, init_from=""))
    dev = torch.device("cuda" if cfg2.runtime.device != "cpu" and torch.cuda.is_available() else "cpu")
    with torch.device(dev):
        model = build_model(cfg1)
    path = Path(out_dir) / "stage1"
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(path / "model.safetensors"))
    return str(path)


def measure(rec: H.Record, preset: str, batches, overrides=(), dry: bool = False, steps: int = 3,
            warmup: int = 2, profile_reserve_s: float | None = None) -> dict | None:
    """Time ``steps`` train steps after ``warmup`` at the first of ``batches`` that fits; records
    ``build_s``, ``warmup_step_s``, ``oom_batches`` and ``result`` on ``rec`` as it goes, and the
    top kernels of one more step when more than ``profile_reserve_s`` of its budget is left."""
    dev = H.device(dry)
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        for batch in batches:
            A.reset()          # every row chooses its attention kernels afresh, as a new process would
            step = None
            try:
                t0 = time.monotonic()
                cfg = preset_config(preset, batch, overrides, dry, tmp)
                step = TrainStep(cfg, dev)
                H.sync(dev)
                rec.set("build_s", round(time.monotonic() - t0, 1))
                for _ in range(warmup):        # the first compiles flex and autotunes the decoder
                    t0 = time.monotonic()
                    step()
                    H.sync(dev)
                    rec.add("warmup_step_s", round(time.monotonic() - t0, 2))
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                ms = H.time_ms(step, dev, warmup=0, reps=steps)
            except torch.OutOfMemoryError as e:
                oom = H.err(e)
            else:
                oom = None
            if oom is not None:    # outside the handler, so the failed step's frames and tensors are gone
                rec.add("oom_batches", batch)
                rec.set("last_oom", oom)
                step = None
                gc.collect()
                torch.cuda.empty_cache()
                continue
            res = _figures(cfg, batch, ms, dev)
            if not dry and set(overrides) <= {"runtime.compile=false"}:   # the rehearsal runs eager too
                res["rehearsal_peak_mem_gib"] = rehearsal_peak(preset, batch)
            rec.set("result", res)
            rec.set("attention_backends", A.used_backends())
            rec.set("attention_timings", A.timed_report())
            rec.set("flex_failed", A.flex_failures())
            if profile_reserve_s is not None and rec.left() > profile_reserve_s:
                rec.set("top_kernels", H.top_kernels(step, dev))
            step.close()
            return res
    rec.set("result", {"error": f"out of memory at every batch of {list(batches)}"})
    return None


REHEARSAL = H.ROOT / "bench" / "results" / "rehearsal_fake_tensors.json"


def rehearsal_peak(preset: str, batch: int) -> float | None:
    """The peak memory the GPU-free rehearsal measured for ``preset`` at ``batch`` clips (eager, fake
    tensors; committed in results/rehearsal_fake_tensors.json), to record next to the real one."""
    try:
        r = json.loads(REHEARSAL.read_text())["presets"][preset]
    except (OSError, KeyError, ValueError):
        return None
    return round(r["peak_gib"], 2) if r.get("batch") == batch else None


def _figures(cfg, batch: int, ms: float, dev: torch.device) -> dict:
    f = flops_per_clip(cfg)
    peak = H.peak_flops(dev)
    clips_s = batch / (ms / 1e3)
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    return {"batch_per_gpu": batch, "frames": cfg.model.num_frames, "step_ms": round(ms, 1),
            "clips_per_s": round(clips_s, 2), "tflop_per_clip": round(f["total"] / 1e12, 3),
            "teacher_tflop_per_clip": round(f["teacher"] / 1e12, 3),
            "mfu": round(clips_s * f["total"] / peak, 4) if peak else None,
            "mfu_without_teacher": round(clips_s * (f["total"] - f["teacher"]) / peak, 4) if peak else None,
            "peak_mem_gib": round(mem, 2) if mem is not None else None,
            "peak_mem_gib_per_clip": round(mem / batch, 3) if mem is not None else None,
            "predicted_peak_mem_gib": round(predicted_peak_memory(cfg)["total"], 1)}


# --------------------------------------------------------------------------- dtypes of one step
_GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "convolution", "_scaled_mm")


def dtype_census(step, dev: torch.device) -> dict:
    """Dtype of every tensor entering attention and the GEMMs in one call of ``step`` (fwd + bwd):
    aten ops through a TorchDispatchMode, the attention entry through a wrapper (which also sees
    q, k, v before the entry unifies them). One untimed call first (lazy init, cached masks)."""
    entry: dict[str, int] = {}
    counts: dict[str, int] = {}
    real = A.attention

    def spy(q, k, v, **kw):
        key = f"q {q.dtype} k {k.dtype} v {v.dtype} d{q.shape[-1]}{' window' if kw.get('window') is not None else ''}"
        entry[key] = entry.get(key, 0) + 1
        return real(q, k, v, **kw)

    class Census(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in _GEMM_OPS or "attention" in name:
                dts = ",".join(str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor))
                counts[f"{name}({dts})"] = counts.get(f"{name}({dts})", 0) + 1
            return func(*args, **(kwargs or {}))

    step()
    mods = [m for m in (V, P, TT) if getattr(m, "attention", None) is real]
    for m in mods:
        m.attention = spy
    try:
        with Census():
            step()
        H.sync(dev)
    finally:
        for m in mods:
            m.attention = real
    return {"attention_entry": entry, "aten_ops": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
            "fp32_gemm_inputs": sorted(k for k in counts if "float32" in k and k.split("(")[0] in _GEMM_OPS),
            "attention_backends": A.used_backends()}


# --------------------------------------------------------------------------- levers (the CLI)
def plan_runs(levers: list[str], plan: str) -> list[dict]:
    off = {k: False for k in LEVERS}
    runs = [dict(off)]
    if plan == "cumulative":
        for i in range(len(levers)):
            runs.append(dict(off, **{lv: True for lv in levers[:i + 1]}))
    elif plan == "single":
        runs += [dict(off, **{lv: True}) for lv in levers]
    elif plan == "all":
        runs.append(dict(off, **{lv: True for lv in levers}))
    else:
        raise SystemExit(f"--plan {plan!r}: choose cumulative, single or all")
    return runs


def lever_overrides(switches: dict, stage: int) -> list[str]:
    """The config overrides of ``switches`` (a lever of the other stage stays at its default)."""
    return [fmt.format(on if switches[k] else off) for k, (fmt, on, off) in LEVERS.items()
            if STAGE_ONLY.get(k, stage) == stage]


def fp8_agreement(cfg, device, clips: int = 2) -> dict:
    """FP8 vs bf16 teacher (same random weights, seeded) on ``clips`` random clips: semantic-mask
    scores and alignment targets (teacher_agreement)."""
    m = cfg.model
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    outs = []
    for fp8 in (False, True):
        torch.manual_seed(0)
        t = build_teacher(dataclasses.replace(m.teacher, fp8=fp8), m.align_dim, m.attn_backend, dtype=dt).to(device)
        g = torch.Generator(device="cpu").manual_seed(0)
        video = torch.rand(clips, 3, m.num_frames, m.img_size, m.img_size, generator=g).to(device, dt)
        outs.append(t(video))
        del t
    return teacher_agreement(outs[0], outs[1], frames=m.num_frames)   # the teacher sees every frame


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["stage1_vitb", "stage2_vitb"])
    ap.add_argument("--levers", nargs="*", default=None, choices=list(LEVERS),
                    help="levers in the order switched on (default: all but pred_ckpt; dry run: none)")
    ap.add_argument("--plan", default="cumulative", choices=("cumulative", "single", "all"))
    ap.add_argument("--batch", type=int, nargs="+", default=None,
                    help="clips per GPU, tried in order until one fits (default: the preset's)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dry-run", action="store_true", help="the demo model on the CPU (checks the script only)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    dev = H.device(args.dry_run)
    if args.dry_run:
        args.presets, args.steps, args.warmup = ["demo"], min(args.steps, 2), min(args.warmup, 1)
    levers = args.levers if args.levers is not None else ([] if args.dry_run else
                                                          [lv for lv in LEVERS if lv != "pred_ckpt"])
    meta = dict(H.stamp(dev), plan=args.plan, levers=levers, measured=not args.dry_run,
                alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    tag = H.result_tag(dev, args.dry_run)
    out = Path(args.out) / f"train_step_{tag}.json"
    rows = []
    for preset in args.presets:
        stage = 2 if "stage2" in preset else 1
        seen = set()
        for sw in plan_runs(levers, args.plan):
            ov = lever_overrides(sw, stage)
            if tuple(ov) in seen:          # a lever of the other stage: the same run again
                continue
            seen.add(tuple(ov))
            batches = args.batch or [load_config("demo" if args.dry_run else preset).optim.batch_per_gpu]
            rec = H.Record()
            measure(rec, preset, batches, ov, args.dry_run, args.steps, args.warmup)
            row = dict(preset=preset, levers_on=[k for k, v in sw.items() if v] or ["none"], overrides=ov,
                       **{k: v for k, v in rec.data.items() if k not in ("status", "started", "budget_s")})
            if sw["fp8_teacher"] and stage == 1 and "error" not in row["result"]:
                row["fp8_vs_bf16_teacher"] = fp8_agreement(preset_config(preset, 1, ov, args.dry_run), dev)
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
            H.write_result(out, meta, rows)          # a later crash keeps these
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
