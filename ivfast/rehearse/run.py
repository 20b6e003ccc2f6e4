"""The rehearsal itself: build the Trainer on the simulated GPU, run its steps, report (see the package's docstring)."""
from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys
import tempfile
from collections import Counter

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from ivfast.config import load_config
from ivfast.data.loader import DeviceClips
from ivfast.models import attention as A
from ivfast.models.diffusion import decoder_flops
from ivfast.models.flops import flops_per_clip, predicted_peak_memory
from ivfast.rehearse import shim
from ivfast.rehearse.gpu import GPUS, GiB, GpuSpec, SdpaLog, simulated_gpu
from ivfast.rehearse.record import MemoryTracker, OpRecorder, allocated_bytes
from ivfast.trainer import Trainer, unwrap

# Left free of the step's allocated peak: the CUDA context and cuBLAS/cuDNN workspaces (~1.5 GiB),
# NCCL buffers (~1 GiB) and the caching allocator's reserve over what is allocated (5 %).
CONTEXT_GIB = 2.5
ALLOCATOR_SLACK = 1.05


def budget_gib(spec: GpuSpec) -> float:
    """The allocated peak that fits ``spec``: its memory less the margin above."""
    return (spec.total_memory / GiB - CONTEXT_GIB) / ALLOCATOR_SLACK


def _move_params(module: torch.nn.Module, fn, recurse: bool = True):
    """``Module._apply`` for fake parameters: torch swaps a fake parameter in place, which fails
    on the weak reference fake tensors carry; a new Parameter in the same slot is equivalent for
    a model moved before its optimiser is built (as the Trainer does)."""
    if recurse:
        for child in module.children():
            child._apply(fn)
    for key, p in module._parameters.items():
        if p is None:
            continue
        with torch.no_grad():
            moved = fn(p)
        if moved is p:
            continue
        new = torch.nn.Parameter(moved, requires_grad=p.requires_grad)
        # attributes the code set on the parameter; not the fake tensor's own (its device among them)
        new.__dict__.update({k: v for k, v in p.__dict__.items() if k not in new.__dict__})
        module._parameters[key] = new
    for key, b in module._buffers.items():
        if b is not None:
            module._buffers[key] = fn(b)
    return module


class _PhaseWatch:
    """Stands where the Trainer's watchdog stands: learns the step's phase for the memory peak."""

    def __init__(self, memory: MemoryTracker):
        self.memory = memory

    def enter(self, phase: str, step: int, micro: int) -> None:
        self.memory.phase = f"step {step + 1} {phase}"


def _flop_formulas() -> None:
    """GEMMs FlopCounterMode has no formula for: the fused bias+GELU GEMM and in-place addmm."""
    aten = torch.ops.aten

    def addmm(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    for op in (aten._addmm_activation, aten.addmm_):
        if op.default not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(addmm)


@dataclasses.dataclass
class Report:
    config: str
    gpu: GpuSpec
    batch: int
    peak_gib: float
    peak_phase: str
    budget_gib: float
    weights_gib: float
    optimizer_gib: float
    flops_measured: dict
    flops_analytic: dict
    precision: dict
    off_device: list
    sdpa: dict
    attention: dict
    predicted_gib: float
    notes: list

    @property
    def fits(self) -> bool:
        return self.peak_gib <= self.budget_gib

    def text(self) -> str:
        L = [f"rehearsal of {self.config} on a simulated {self.gpu.name} (fake tensors: measured memory and "
             f"FLOPs of the real step; no speed), {self.batch} clips per GPU"]
        L.append(f"peak memory allocated: {self.peak_gib:.1f} GiB at {self.peak_phase} | budget {self.budget_gib:.1f} "
                 f"GiB = ({self.gpu.total_memory / GiB:.1f} GiB - {CONTEXT_GIB} GiB context/NCCL) / "
                 f"{ALLOCATOR_SLACK} allocator slack | hand prediction (ivfast.models.flops) {self.predicted_gib:.1f}")
        act = self.peak_gib - self.weights_gib - self.optimizer_gib
        L.append(f"  at the peak: weights {self.weights_gib:.1f} GiB (trainable fp32 and frozen), AdamW state "
                 f"{self.optimizer_gib:.1f}, activations, gradients and transients {act:.1f}")
        L.append("model TFLOP per step on this GPU: measured (FlopCounterMode's formulas) | analytic "
                 "(ivfast.models.flops)")
        fwd = self.flops_analytic["forward"]
        for k in ("teacher", "encoder", "predictor", "decoder", "heads"):
            if k in fwd:
                L.append(f"  {k:10s} forward {self.flops_measured.get(k, 0.0) / 1e12:9.3f} | {fwd[k] / 1e12:9.3f}")
        m, r, a = self.flops_measured["total"], self.flops_measured["recomputed"], self.flops_analytic["total"]
        L.append(f"  {'total':10s} fwd+bwd {m / 1e12:9.3f} | {a / 1e12:9.3f}  (teacher forward only; measured "
                 f"includes {r / 1e12:.3f} recomputed in backward by fused attention and checkpointing)")
        L.append(f"  {'model':10s} fwd+bwd {(m - r) / 1e12:9.3f} | {a / 1e12:9.3f}  ({(m - r - a) / a:+.2%}: measured "
                 f"less recomputation vs analytic)")
        L.append("GEMM and attention calls by module (op, input dtypes, fp32 precision: count):")
        for mod, rows in sorted(self.precision.items()):
            L.append(f"  {mod}: " + ", ".join(f"{op} {dt} {p}: {n}" for (op, dt, p), n in sorted(rows.items())))
        L.append("attention kernels a GPU is asked for: " + (", ".join(f"{k} -> {v}" for k, v in self.attention.items())
                                                          or "none recorded"))
        L.append("  SDPA calls by kernel: " + ", ".join(f"{b} {dt} d{d}: {n}" for (b, dt, d), n in self.sdpa.items()))
        if self.off_device:
            L.append("inputs not on the GPU: " + "; ".join(self.off_device[:5]))
        L.extend(self.notes)
        L.append(f"fits: {'yes' if self.fits else 'NO'} ({self.peak_gib:.1f} of {self.budget_gib:.1f} GiB)")
        return "\n".join(L)


def rehearsal_overrides(output_dir: str) -> list[str]:
    """What a rehearsal changes in the user's config: the simulated GPU, eager, random weights."""
    return ["runtime.device=cuda", "runtime.compile=false", f"runtime.output_dir={output_dir}",
            "runtime.profile_steps=", "runtime.recon_every=0", "model.predictor.init_from="]


def rehearse(config: str, overrides: list[str] = (), gpu: str = "h100", gpu_mem: float | None = None,
             steps: int = 2) -> Report:
    """Run ``steps`` real training steps of ``config`` on a simulated ``gpu``; needs :func:`shim.activate`d."""
    spec = GPUS[gpu]
    tmp = tempfile.mkdtemp(prefix="ivfast-rehearse-")
    ovr = list(overrides) + rehearsal_overrides(tmp)
    cfg = load_config(config, ovr)
    # one micro-batch per step: a rank's share of a step on a cluster large enough to need no
    # gradient accumulation (with accumulation, the trainable gradients also stay alive through
    # the next micro-batch's forward: not rehearsed)
    ovr.append(f"optim.global_batch={cfg.optim.batch_per_gpu}")
    if not cfg.model.teacher.tiny:
        ovr.append("model.teacher.init_from=random")
    if cfg.stage == 2:
        ovr.append("model.init_from=random")
    cfg = load_config(config, ovr)
    memory, recorder, sdpa_log = MemoryTracker(), OpRecorder(), SdpaLog()
    _flop_formulas()
    device = torch.device("cuda", 0)
    notes = []
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    saved_apply = torch.nn.Module._apply
    torch.nn.Module._apply = _move_params
    try:
        with fake, simulated_gpu(spec, memory, sdpa_log), memory:
            trainer = Trainer(cfg, loader=DeviceClips(cfg, device))
            trainer.watchdog = _PhaseWatch(memory)
            model = unwrap(trainer.model)
            step_peaks = []
            counts = {}      # stage 2: the step's visible and loss token counts per mask set
            model.register_forward_hook(lambda mod, args, out: counts.update(
                {k: out[k] for k in ("visible", "predicted") if k in out}))
            weights = sum(allocated_bytes(t.untyped_storage()) for t in [*model.parameters(), *model.buffers()])
            for i in range(steps):
                last = i == steps - 1
                with (FlopCounterMode(display=False) if last else contextlib.nullcontext()) as counter, \
                        (recorder if last else contextlib.nullcontext()):
                    memory.reset_peak()
                    trainer.train_step()
                    trainer.step += 1
                    step_peaks.append((memory.peak / GiB, memory.peak_phase))
            optimizer = sum(allocated_bytes(t.untyped_storage()) for s in trainer.optimizer.state.values()
                            for t in s.values() if torch.is_tensor(t) and t.is_cuda)
            trainer.metrics.close()
    finally:
        torch.nn.Module._apply = saved_apply
    B = cfg.optim.batch_per_gpu
    fpc = flops_per_clip(cfg, keep=counts.get("visible"), predicted=counts.get("predicted"))
    analytic = {k: v * B for k, v in fpc.items() if k in ("teacher", "encoder", "predictor", "decoder", "heads", "total")}
    # Forward FLOPs by module: backward ops cannot be told apart by module (see record.py), so
    # the per-module rows compare forwards and only the total includes the backward.
    measured = Counter()
    for mod, n in recorder.forward_flops.items():
        measured[mod if mod in ("teacher", "encoder", "predictor", "decoder") else "heads"] += n
    measured = {k: float(v) for k, v in measured.items()}
    measured["total"] = float(sum(counter.get_flop_counts().get("Global", {}).values()))
    measured["recomputed"] = float(recorder.recomputed_flops)
    analytic_fwd = {k: v / 3 for k, v in analytic.items() if k in ("encoder", "predictor", "heads")}
    analytic_fwd["teacher"] = analytic.get("teacher", 0.0)
    if cfg.stage == 1:
        e = cfg.model.encoder
        analytic_fwd["decoder"] = B * decoder_flops(fpc["masked"], cfg.model.decoder, 3 * e.tubelet * e.patch_size ** 2,
                                                    cfg.model.predictor.dim)
    analytic = {"forward": analytic_fwd, "total": analytic["total"]}
    if A._FLASH is None:
        notes.append("flash-attn is not importable here: a GPU with it installed would run flash_attn where "
                     "these calls run SDPA/flex (the same saved tensors: output and log-sum-exp)")
    notes.append("runtime.compile: rehearsed eager (a compiled step saves no more than eager)")
    peak, phase = max(step_peaks)
    notes.insert(0, "peak by step: " + ", ".join(f"{p:.1f} GiB ({ph})" for p, ph in step_peaks)
                 + " (AdamW's state appears in step 1's optimizer phase)")
    return Report(config=config, gpu=spec, batch=B, peak_gib=peak, peak_phase=phase,
                  budget_gib=gpu_mem if gpu_mem else budget_gib(spec), weights_gib=weights / GiB,
                  optimizer_gib=optimizer / GiB, flops_measured=measured, flops_analytic=analytic,
                  precision={k: dict(v) for k, v in recorder.by_module.items()}, off_device=recorder.off_device,
                  sdpa=dict(sdpa_log.calls), attention=A.used_backends(),
                  predicted_gib=predicted_peak_memory(cfg)["total"], notes=notes)


def run_in_subprocess(argv: list[str]) -> int:
    """Build the stand-in library if needed and run ``python -m ivfast.rehearse ARGV`` with it preloaded."""
    try:
        lib = shim.build()
    except shim.ShimError as e:
        print(f"ivfast rehearse: {e}", file=sys.stderr)
        return 2
    return subprocess.run([sys.executable, "-m", "ivfast.rehearse", *argv], env=shim.environ(lib)).returncode


def report_json(rep: Report) -> dict:
    """The report as plain JSON (what tests and ``bench/gpu_check`` read)."""
    return {
        "config": rep.config, "gpu": rep.gpu.name, "batch": rep.batch, "measured_on": "fake tensors",
        "peak_gib": rep.peak_gib, "peak_phase": rep.peak_phase, "budget_gib": rep.budget_gib, "fits": rep.fits,
        "weights_gib": rep.weights_gib, "optimizer_gib": rep.optimizer_gib, "predicted_gib": rep.predicted_gib,
        "tflop_measured": {k: v / 1e12 for k, v in rep.flops_measured.items()},
        "tflop_analytic": {"total": rep.flops_analytic["total"] / 1e12,
                           "forward": {k: v / 1e12 for k, v in rep.flops_analytic["forward"].items()}},
        "gemms": {mod: [{"op": op, "dtypes": dt, "fp32_precision": p, "calls": n} for (op, dt, p), n in rows.items()]
                  for mod, rows in rep.precision.items()},
        "off_device": rep.off_device,
        "sdpa": [{"kernel": b, "dtype": dt, "head_dim": d, "calls": n} for (b, dt, d), n in rep.sdpa.items()],
        "attention": rep.attention, "notes": rep.notes,
    }
