"""Driver of ``bench/gpu_check.sh``: every GPU figure of issue 11 in one check of at most 12 minutes.

Each part runs in its own process under its own ``timeout`` (the shell script sets them), and
writes what it measures into one JSON file *as it goes* (atomic rewrite after every figure), so a
part that times out or crashes still leaves its partial results, marked ``timeout``/``error``.

    python bench/gpu_check.py --init [--dry-run] [--out FILE]    # create the JSON, print its path
    python bench/gpu_check.py --part attention --out FILE [--dry-run]
    python bench/gpu_check.py --mark attention timeout --out FILE
    python bench/gpu_check.py --table --out FILE

Parts (in run order): preflight, dtypes, attention, decoder, stage1, stage2, tokens.
``--dry-run``: every part with tiny shapes on the CPU (no GPU needed); checks the script, measures
nothing meaningful. Written without a GPU: the GPU side of this file has NEVER RUN yet.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:        # a bare source tree: ivfast importable without pip install
    sys.path.insert(0, str(ROOT))

PARTS = ("preflight", "dtypes", "attention", "decoder", "stage1", "stage2", "tokens", "nvdec")


# --------------------------------------------------------------------------- incremental JSON
def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"meta": {}, "parts": {}}


def _save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)          # atomic: a kill mid-write never leaves half a file


class Part:
    """One part's record in the JSON file; every ``set`` is written to disk at once."""

    def __init__(self, path: Path, name: str, budget_s: float):
        self.path, self.name = path, name
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        data = _load(path)
        data["parts"][name] = {"status": "running", "started": _now(), "budget_s": budget_s}
        _save(path, data)

    def set(self, key: str, value) -> None:
        data = _load(self.path)
        rec = data["parts"].setdefault(self.name, {})
        rec[key] = value
        rec["seconds"] = round(time.monotonic() - self.t0, 1)
        _save(self.path, data)

    def add(self, key: str, item) -> None:
        data = _load(self.path)
        rec = data["parts"].setdefault(self.name, {})
        rec.setdefault(key, []).append(item)
        rec["seconds"] = round(time.monotonic() - self.t0, 1)
        _save(self.path, data)

    def left(self) -> float:
        """Seconds left of this part's budget (the shell's timeout kills it at 0)."""
        return self.budget_s - (time.monotonic() - self.t0)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _err(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:300] if s else ''}"


# --------------------------------------------------------------------------- helpers (torch)
def _device(dry: bool):
    import torch
    if dry:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); "
                         "use --dry-run to check the script on a CPU")
    return torch.device("cuda")


def _sync(dev):
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, dev, warmup: int = 2, reps: int = 5) -> float:
    """Median wall ms of ``fn`` (CUDA events on GPU)."""
    import torch
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]


def _peak_flops(dev):
    from ivfast.metrics import device_peak_flops
    try:
        return device_peak_flops(dev)
    except Exception:
        return None


# --------------------------------------------------------------------------- parts
def part_preflight(p: Part, dry: bool):
    import torch
    p.set("python", platform.python_version())
    p.set("torch", torch.__version__)
    p.set("cuda", torch.version.cuda)
    p.set("cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    try:
        import triton
        p.set("triton", triton.__version__)
    except Exception as e:
        p.set("triton", _err(e))
    p.set("host_cc", shutil.which("cc") or shutil.which("gcc"))      # Triton builds its launcher with it
    p.set("alloc_conf", os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    imports = {}
    for mod in ("ivfast", "ivfast.kernels", "ivfast._C", "ivfast.masking", "ivfast.models.epd", "transformers",
                "safetensors", "yaml", "av", "nvidia.dali", "flash_attn", "xformers"):
        try:
            m = __import__(mod, fromlist=["_"])
            imports[mod] = "ok " + str(getattr(m, "__version__", "")).strip()
        except Exception as e:
            imports[mod] = _err(e)
    p.set("imports", imports)
    if dry:
        p.set("gpu", None)
        return
    props = torch.cuda.get_device_properties(0)
    p.set("gpu", {"name": props.name, "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
                  "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count()})
    smi = shutil.which("nvidia-smi")
    if smi:
        q = "name,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu,driver_version"
        r = subprocess.run([smi, f"--query-gpu={q}", "--format=csv"], capture_output=True, text=True, timeout=20)
        p.set("nvidia_smi", r.stdout.strip().splitlines())
    p.set("peak_bf16_tflops", (_peak_flops(torch.device("cuda")) or 0) / 1e12 or None)


def _stage_cfg(stage: int, batch: int, dry: bool, extra=()):
    """Config of the real ViT-B preset (dry: the demo model), random teacher and predictor."""
    from ivfast.config import load_config
    if dry:
        ov = ["demo=false", f"optim.batch_per_gpu={batch}", f"optim.global_batch={batch}"]
        if stage == 2:
            ov += ["stage=2", "masking.kind=multiblock", "masking.max_keep=0",
                   "masking.blocks=[{num_blocks: 2, spatial_scale: [0.3, 0.3]}, "
                   "{num_blocks: 1, spatial_scale: [0.5, 0.5]}]"]
        return load_config("demo", [*ov, *extra])
    ov = ["model.predictor.init_from=", f"optim.batch_per_gpu={batch}"]
    if stage == 1:
        return load_config("stage1_vitb", [*ov, "model.teacher.init_from=random", *extra])
    return load_config("stage2_vitb", [*ov, "model.init_from=random-for-gpu-check", *extra])


def _build(cfg, dev):
    """The stage model built directly on ``dev`` (a 1 B teacher takes a minute to init on a CPU),
    random weights (speed does not depend on them); stage 2 skips the stage-1 checkpoint load."""
    import torch
    from ivfast.models.epd import Stage1Model, Stage2Model
    tdtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    with torch.device(dev):
        model = Stage1Model(cfg, teacher_dtype=tdtype) if cfg.stage == 1 else Stage2Model(cfg, teacher_dtype=tdtype)
    return model.to(dev)


def _stepper(model, cfg, dev):
    import torch
    from ivfast.models.epd import param_groups
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, 0.05)],
                            lr=1e-4, fused=dev.type == "cuda")
    B, T, S = cfg.optim.batch_per_gpu, cfg.model.num_frames, cfg.model.img_size
    video = torch.randint(0, 256, (B, 3, T, S, S), dtype=torch.uint8, device=dev)
    amp = dev.type == "cuda"
    state = {"i": 0}

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = model(video, state["i"])
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["i"] += 1
    return step


_GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "convolution", "_scaled_mm")


def part_dtypes(p: Part, dry: bool):
    """Dtype of every tensor entering attention and the GEMMs in one stage-1 step (fwd + bwd).

    aten ops via a TorchDispatchMode; the attention entry via a wrapper (also sees q, k, v before
    the entry unifies them). SDPA backend pinned and the decoder eager, so every GEMM is an aten op
    and no Triton autotune / flex compile eats this part's budget: dtypes do not depend on that.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    import ivfast.models.attention as A
    from ivfast.models import predictor as P, teacher as TT, vit as V
    dev = _device(dry)
    cfg = _stage_cfg(1, 2, dry, ["model.attn_backend=sdpa", "model.decoder.impl=eager", "model.token_impl=eager"])
    model = _build(cfg, dev)
    step = _stepper(model, cfg, dev)
    p.set("config", "stage1 batch 2, attn_backend=sdpa, decoder eager (dtypes only)")
    entry: dict[str, int] = {}
    real = A.attention

    def spy(q, k, v, **kw):
        key = f"q {q.dtype} k {k.dtype} v {v.dtype} d{q.shape[-1]}{' window' if kw.get('window') is not None else ''}"
        entry[key] = entry.get(key, 0) + 1
        return real(q, k, v, **kw)
    mods = [m for m in (V, P, TT) if getattr(m, "attention", None) is real]
    for m in mods:
        m.attention = spy
    counts: dict[str, int] = {}

    class Census(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in _GEMM_OPS or "attention" in name:
                dts = ",".join(str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor))
                k = f"{name}({dts})"
                counts[k] = counts.get(k, 0) + 1
            return func(*args, **(kwargs or {}))
    try:
        step()                      # warm-up outside the census (lazy init, cached masks)
        with Census():
            step()
        _sync(dev)
    finally:
        for m in mods:
            m.attention = real
    p.set("attention_entry", entry)
    p.set("aten_ops", dict(sorted(counts.items(), key=lambda kv: -kv[1])))
    p.set("fp32_gemm_inputs", sorted(k for k in counts if "float32" in k and k.split("(")[0] in _GEMM_OPS))
    p.set("attention_backends", A.used_backends())


def _attn_shapes(dry: bool):
    # (label, B, N, H, D, window): teacher (16 clips x 16 frames of 256 tokens, 16 heads x 96),
    # encoder (12 x 64 at 1028), predictor global and local (16 x 64 at 4100 stage 1, 8196 stage 2)
    if dry:
        return [("teacher", 2, 24, 2, 16, None), ("predictor_local", 1, 40, 2, 16, 4)]
    return [("teacher_256", 256, 256, 16, 96, None), ("encoder_1028", 16, 1028, 12, 64, None),
            ("predictor_4100", 16, 4100, 16, 64, None), ("predictor_8196", 28, 8196, 16, 64, None),
            ("predictor_local_4100", 16, 4100, 16, 64, 64), ("predictor_local_8196", 28, 8196, 16, 64, 64)]


def part_attention(p: Part, dry: bool):
    """fwd and fwd+bwd TFLOP/s of each usable backend at the real shapes (bf16)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import ivfast.models.attention as A
    dev = _device(dry)
    dt = torch.float32 if dry else torch.bfloat16
    reps = 2 if dry else 5
    for label, B, N, H, D, w in _attn_shapes(dry):
        q, k, v = (torch.randn(B, N, H, D, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
        g = torch.randn(B, N, H, D, device=dev, dtype=dt)
        keys = N if w is None else min(N, 2 * w + 1)        # attended keys per query
        f_fwd = 4.0 * B * H * N * keys * D                  # QK^T + PV, 2 flops per MAC
        f_all = f_fwd * 3.5                                 # bwd = 2.5x fwd (recompute of P included)
        cands = {}
        if w is None:
            for b in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
                cands[f"sdpa:{b}"] = (lambda b=b: lambda a, c, e: _sdpa_pinned(F, sdpa_kernel, getattr(SDPBackend, b),
                                                                               a, c, e, None))()
        else:
            band = A.band_mask(N, N, w, dev)
            for b in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):    # the dense band-mask fallback
                cands[f"sdpa_band:{b}"] = (lambda b=b: lambda a, c, e: _sdpa_pinned(
                    F, sdpa_kernel, getattr(SDPBackend, b), a, c, e, band))()
            cands["flex"] = lambda a, c, e: A.attention(a, c, e, window=w, backend="flex")
        for name, fn in cands.items():
            if p.left() < (5 if dry else 20):
                p.add("results", {"shape": label, "backend": name, "skipped": "part budget spent"})
                continue
            rec = {"shape": label, "backend": name, "B": B, "N": N, "H": H, "D": D, "window": w}
            try:
                with torch.no_grad():
                    ms_f = _time_ms(lambda: fn(q, k, v), dev, reps=reps)
                rec.update(fwd_ms=round(ms_f, 3), fwd_tflops=round(f_fwd / ms_f / 1e9, 1))
                q.grad = k.grad = v.grad = None

                def fb():
                    fn(q, k, v).backward(g)
                ms_b = _time_ms(fb, dev, reps=reps)
                rec.update(fwd_bwd_ms=round(ms_b, 3), fwd_bwd_tflops=round(f_all / ms_b / 1e9, 1))
            except Exception as e:                 # not usable here (shape, dtype, device): say why
                rec["error"] = _err(e)
            p.add("results", rec)
        del q, k, v, g
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    p.set("flops_note", "window rows count only the 2w+1 attended keys (effective TFLOP/s); bwd = 2.5x fwd")


def _sdpa_pinned(F, sdpa_kernel, backend, q, k, v, mask):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask).transpose(1, 2)


def _bench_help(script: str) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{script} --help failed: {r.stderr.strip().splitlines()[-1:]}")
    return r.stdout


def part_decoder(p: Part, dry: bool):
    """Decoder D6 W1536 at 49 152 rows fwd+bwd: ivfast vs torch.compile (default mode) vs eager, and
    the cuBLAS GEMM floor for the same GEMMs, via bench_diffusion_mlp.py's CLI, one process per
    (dtype, impl) so that a slow compile / autotune keeps what the others measured. bf16 and fp32."""
    helptext = _bench_help("bench_diffusion_mlp.py")
    need = ("--rows", "--shapes", "--impls", "--modes", "--dtype", "--json", "--no-floor", "--compile-mode")
    missing = [f for f in need if f not in helptext]
    if missing:
        raise RuntimeError(f"bench_diffusion_mlp.py lacks {missing}: its CLI changed, update part_decoder")
    if dry:    # toy shape on the CPU, eager only (the Triton interpreter would take ~20 s here)
        runs, base = [("fp32", "eager")], ["--tiny", "--device", "cpu", "--warmup", "1", "--rep", "5"]
    else:
        runs = [(d, i) for d in ("bf16", "fp32") for i in ("eager", "triton", "compile")]
        base = ["--rows", "49152", "--shapes", "6x1536", "--warmup", "10", "--rep", "50"]
    p.set("shape", "rows 64, D2 W32 (dry run)" if dry else "rows 49152 (16 clips x 3072 masked), D6 W1536")
    tmp = p.path.parent / "_gpu_check_decoder"         # the bench's own files, next to the check's JSON
    floors_done = set()
    for dtype, impl in runs:
        left = p.left() - 5
        if impl == "triton":
            left = min(left, 0.6 * left + 20)          # leave torch.compile a chance
        if left < (5 if dry else 20):
            p.add("results", {"impl": impl, "dtype": dtype, "skipped": "part budget spent"})
            continue
        doc = tmp / f"{impl}_{dtype}.json"
        doc.unlink(missing_ok=True)
        cmd = [sys.executable, str(ROOT / "bench" / "bench_diffusion_mlp.py"), *base, "--impls", impl,
               "--modes", "fwd+bwd", "--dtype", dtype, "--compile-mode", "default", "--out", str(tmp),
               "--tag", f"gpu_check_{impl}_{dtype}", "--json", str(doc)]
        if dtype in floors_done:
            cmd.append("--no-floor")
        t0 = time.monotonic()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=left, cwd=ROOT)
        except subprocess.TimeoutExpired:
            p.add("results", {"impl": impl, "dtype": dtype, "error": f"timeout after {left:.0f} s (compile/autotune)"})
            continue
        rec = {"impl": impl, "dtype": dtype, "wall_s": round(time.monotonic() - t0, 1)}
        if r.returncode != 0 or not doc.exists():
            rec["error"] = ((r.stderr or r.stdout).strip().splitlines() or [f"rc {r.returncode}"])[-1][:300]
            p.add("results", rec)
            continue
        for x in json.loads(doc.read_text())["results"]:
            if x.get("mode") != "fwd+bwd":
                continue
            if x.get("impl") == "cublas_floor":
                floors_done.add(dtype)
                p.set(f"gemm_floor_{dtype}", {"ms": x.get("median_ms"), "tflops": x.get("tflops")})
            else:
                rec.update({k: x.get(k) for k in ("median_ms", "tflops", "pct_peak", "pct_of_gemm_floor",
                                                  "peak_mem_mib", "triton_vs_eager_rel_err", "error") if k in x})
        p.add("results", rec)
    done = {(r["impl"], r["dtype"]): r.get("median_ms") for r in _load(p.path)["parts"]["decoder"].get("results", [])}
    for dtype in ("bf16", "fp32"):
        ivf = done.get(("triton", dtype))
        if ivf:
            p.set(f"ivfast_speedup_{dtype}", {o: round(done[(o, dtype)] / ivf, 2) for o in ("eager", "compile")
                                              if done.get((o, dtype))})


def _stage(p: Part, dry: bool, stage: int, batch: int):
    import torch
    import ivfast.models.attention as A
    from ivfast.models.flops import flops_per_clip
    dev = _device(dry)
    if dry:
        batch = 2
    steps, warm = (1, 1) if dry else (3, 2)
    while batch >= 1:
        cfg = _stage_cfg(stage, batch, dry)
        model = step = None
        try:
            t0 = time.monotonic()
            model = _build(cfg, dev)
            _sync(dev)
            p.set("build_s", round(time.monotonic() - t0, 1))
            step = _stepper(model, cfg, dev)
            for i in range(warm):           # the first one compiles flex and autotunes the decoder
                t0 = time.monotonic()
                step()
                _sync(dev)
                p.add("warmup_step_s", round(time.monotonic() - t0, 2))
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.monotonic()
            for _ in range(steps):
                step()
            _sync(dev)
            dt = (time.monotonic() - t0) / steps
        except torch.OutOfMemoryError as e:
            oom = _err(e)
        else:
            oom = None
        if oom is not None:     # outside the handler, so the failed step's frames and tensors are gone
            p.add("oom_batches", batch)
            p.set("last_oom", oom)
            model = step = None
            import gc
            gc.collect()
            torch.cuda.empty_cache()
            batch //= 2
            continue
        f = flops_per_clip(cfg)
        peak = _peak_flops(dev)
        clips_s = batch / dt
        p.set("result", {
            "batch_per_gpu": batch, "frames": cfg.model.num_frames, "step_ms": round(dt * 1e3, 1),
            "clips_per_s": round(clips_s, 2), "tflop_per_clip": round(f["total"] / 1e12, 3),
            "teacher_tflop_per_clip": round(f["teacher"] / 1e12, 3),
            "mfu": round(clips_s * f["total"] / peak, 4) if peak else None,
            "mfu_without_teacher": round(clips_s * (f["total"] - f["teacher"]) / peak, 4) if peak else None,
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None})
        p.set("attention_backends", A.used_backends())
        p.set("flex_failed", {A._key_name(k): why for k, why in A._flex_failed.items()})
        if p.left() > (5 if dry else 25):
            p.set("top_kernels", _profile_one(step, dev))
        return
    p.set("result", {"error": "out of memory at every batch down to 1"})


def _profile_one(step, dev, top: int = 30):
    """The top CUDA kernels (CPU ops in a dry run) of one step by self device time."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        _sync(dev)
    rows = []
    for e in prof.key_averages():
        dev_t = getattr(e, "self_device_time_total", None)
        if dev_t is None:
            dev_t = getattr(e, "self_cuda_time_total", 0)
        is_kernel = dev.type == "cuda" and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
        t_us = dev_t if dev.type == "cuda" else e.self_cpu_time_total
        if (dev.type == "cuda" and not is_kernel) or t_us <= 0:
            continue
        rows.append({"name": e.key[:120], "calls": e.count, "ms": round(t_us / 1e3, 3)})
    if not rows and dev.type == "cuda":     # no kernel-level rows in this torch: fall back to ops by device time
        rows = [{"name": e.key[:120], "calls": e.count,
                 "ms": round((getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)) / 1e3, 3)}
                for e in prof.key_averages()]
        rows = [r for r in rows if r["ms"] > 0]
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows) or 1.0
    for r in rows:
        r["pct"] = round(100 * r["ms"] / total, 1)
    return rows[:top]


def part_stage1(p: Part, dry: bool):
    _stage(p, dry, 1, 16)


def part_stage2(p: Part, dry: bool):
    _stage(p, dry, 2, 14)


def part_tokens(p: Part, dry: bool):
    """Copy bandwidth, then the token kernels' GB/s (bench_tokens.py --quick) if time is left."""
    import torch
    dev = _device(dry)
    n = (1 << 20) if dry else (1 << 29)                      # 2 MiB / 1 GiB of bf16
    x = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_()
    y = torch.empty_like(x)
    ms = _time_ms(lambda: y.copy_(x), dev, reps=3 if dry else 10)
    p.set("copy_gb_s", round(2 * x.numel() * 2 / ms / 1e6, 1))
    del x, y
    helptext = _bench_help("bench_tokens.py")
    if dry:
        p.set("bench_cli", "ok" if "--quick" in helptext and "--impls" in helptext else "MISSING FLAGS")
        return
    out = p.path.parent / "_gpu_check_tokens"
    left = p.left() - 5
    if left < 15:
        p.set("tokens", "skipped: part budget spent")
        return
    try:
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_tokens.py"), "--quick", "--impls",
                            "triton,eager", "--out", str(out)], capture_output=True, text=True, timeout=left, cwd=ROOT)
    except subprocess.TimeoutExpired:
        p.set("tokens", f"timeout after {left:.0f} s")
        return
    found = sorted(out.glob("tokens_*.json"))
    if r.returncode != 0 or not found:
        p.set("tokens", {"error": (r.stderr or r.stdout).strip().splitlines()[-3:]})
        return
    res = json.loads(found[-1].read_text())
    p.set("tokens", res.get("rows"))
    p.set("tokens_copy_gb_s", (res.get("meta") or {}).get("copy_bandwidth_gb_s"))
    pct = [r["pct_copy_bw"] for r in res.get("rows") or [] if r.get("impl") == "triton" and r.get("pct_copy_bw")]
    if pct:
        p.set("triton_pct_of_copy", {"min": min(pct), "max": max(pct)})


def part_nvdec(p: Part, dry: bool):
    """DALI's GPU video decoding (NVDEC) on raw and prepared clips: clips/s at 16 frames and
    224 px, and the pixels against the PyAV path (same plans). Needs nvidia-dali and PyAV;
    without them (the lent machines have neither, and DALI's wheel is larger than what a run
    can carry) the part records why it measured nothing. Dry run: DALI's CPU decoder, VP9."""
    import tempfile

    import numpy as np
    try:
        import av  # noqa: F401
        from ivfast.data.dali import DaliClipDecoder, dali_status
    except ImportError as e:
        p.set("skipped", f"needs PyAV and nvidia-dali: {_err(e)}")
        return
    ok, why = dali_status()
    if not ok:
        p.set("skipped", f"DALI not usable: {why}")
        return
    import torch

    from ivfast.data.prepare import Job, prepare_one
    from ivfast.data.pyav import crop_resize, decode_frames
    from ivfast.data.sampling import plan_clip, sample_rng
    from ivfast.data.synth import make_videos

    dev = _device(dry)
    n, frames, size, T, out = (2, 24, (96, 80), 8, 56) if dry else (4, 150, (340, 256), 16, 224)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_nvdec_"))
    sets = {"raw": make_videos(tmp / "raw", n, "vp9" if dry else "h264b", frames=frames, size=size, fps=30,
                               seed=0, gop=0 if dry else 250)}
    if not dry:       # DALI's CPU decoder has no H.264: prepared (H.264) files only on the GPU
        sets["prepared_g1"] = []
        for f in sets["raw"]:
            dst = tmp / "prep" / (f.stem + ".mp4")
            r = prepare_one(Job(str(f), str(dst), 256, 1, 0.0, 20, "veryfast"))
            if r["status"] != "done":
                raise RuntimeError(f"prepare failed: {r}")
            sets["prepared_g1"].append(dst)
    p.set("clips", {"n": n, "frames": frames, "source": f"{size[0]}x{size[1]}", "T": T, "out": out})
    dec = DaliClipDecoder(n, T, out, device_id=None if dry else (dev.index or 0), num_threads=2 if dry else 8)
    for kind, files in sets.items():
        with av.open(str(files[0])) as c:
            s = c.streams.video[0]
            W, H = s.width, s.height
        plans = [plan_clip(num_frames_video=frames, fps=30.0, width=W, height=H, num=T, out_size=out,
                           rng=sample_rng(0, 0, i)) for i in range(n)]
        data = [np.fromfile(str(f), np.uint8) for f in files]
        got = dec.decode(data, plans)
        reps = 2 if dry else 5
        t0 = time.perf_counter()
        for _ in range(reps):
            got = dec.decode(data, plans)
        _sync(dev)
        dt = (time.perf_counter() - t0) / reps
        ref = torch.stack([crop_resize(decode_frames(str(f), pl.frames), pl, out) for f, pl in zip(files, plans)])
        diff = got.cpu().float() - ref.float()
        mse = float(diff.square().mean())
        p.add("results", {"data": kind, "clips_per_s": round(n / dt, 1), "ms_per_batch": round(1000 * dt, 1),
                          "psnr_vs_pyav_db": round(10 * np.log10(255 ** 2 / mse), 1) if mse > 0 else "identical",
                          "mean_abs_diff": round(float(diff.abs().mean()), 3)})
        if p.left() < 10:
            break


# --------------------------------------------------------------------------- table
def table(data: dict) -> str:
    m, parts = data.get("meta", {}), data.get("parts", {})
    lines = [f"gpu_check  {m.get('device')}  {m.get('date')}  dry_run={m.get('dry_run')}",
             f"{'part':<10} {'status':<8} {'s':>6}  figures"]
    for name in PARTS:
        r = parts.get(name)
        if r is None:
            lines.append(f"{name:<10} {'not run':<8}")
            continue
        fig = ""
        if name == "preflight":
            fig = f"torch {r.get('torch')} cuda {r.get('cuda')} triton {r.get('triton')} gpu {(r.get('gpu') or {}).get('name')}"
        elif name == "dtypes":
            fig = f"entry {list((r.get('attention_entry') or {}))[:2]} fp32 GEMMs {len(r.get('fp32_gemm_inputs') or [])}"
        elif name == "attention":
            fig = "; ".join(f"{x.get('shape')} {x.get('backend')} {x.get('fwd_bwd_tflops', x.get('error', x.get('skipped')))}"
                            for x in (r.get("results") or [])[:12])
        elif name == "decoder":
            fig = f"floor bf16 {(r.get('gemm_floor_bf16') or {}).get('ms')} fp32 {(r.get('gemm_floor_fp32') or {}).get('ms')} ms; " + "; ".join(
                f"{x.get('impl')}/{x.get('dtype')} {x.get('median_ms', x.get('error', x.get('skipped')))}"
                for x in r.get("results") or [])
        elif name in ("stage1", "stage2"):
            res = r.get("result") or {}
            fig = (f"b{res.get('batch_per_gpu')} {res.get('step_ms')} ms {res.get('clips_per_s')} clips/s "
                   f"MFU {res.get('mfu')} (no teacher {res.get('mfu_without_teacher')}) "
                   f"{res.get('peak_mem_gib')} GiB oom {r.get('oom_batches', [])}")
        elif name == "nvdec":
            fig = r.get("skipped") or "; ".join(f"{x.get('data')} {x.get('clips_per_s')} clips/s "
                                                f"PSNR {x.get('psnr_vs_pyav_db')} dB" for x in r.get("results") or [])
        elif name == "tokens":
            fig = f"copy {r.get('copy_gb_s')} GB/s; triton token kernels % of copy {r.get('triton_pct_of_copy')}"
        if r.get("error"):
            fig += f"  ERROR {r['error']}"
        lines.append(f"{name:<10} {r.get('status', '?'):<8} {r.get('seconds', 0):>6}  {fig[:300]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI
def default_out(dry: bool) -> Path:
    if dry:
        return ROOT / "bench" / "results" / "gpu_check_dryrun_cpu.json"
    import torch
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "nogpu"
    return ROOT / "bench" / "results" / f"gpu_check_{name.replace(' ', '_').replace('/', '_')}.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", action="store_true")
    ap.add_argument("--part", choices=PARTS)
    ap.add_argument("--mark", nargs=2, metavar=("PART", "STATUS"))
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds this part may take (its timeout)")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    if a.init:
        out = Path(a.out) if a.out else default_out(a.dry_run)
        dev = "cpu (dry run)" if a.dry_run else out.stem.removeprefix("gpu_check_").replace("_", " ")
        _save(out, {"meta": {"device": dev, "date": _now(), "dry_run": a.dry_run, "host": platform.node(),
                             "note": "written by bench/gpu_check.sh; parts write as they measure"}, "parts": {}})
        print(out)
        return 0
    out = Path(a.out) if a.out else default_out(a.dry_run)
    if a.mark:
        data = _load(out)
        rec = data["parts"].setdefault(a.mark[0], {})
        if rec.get("status") in (None, "running"):
            rec["status"] = a.mark[1]
        _save(out, data)
        return 0
    if a.table:
        print(table(_load(out)))
        return 0
    if not a.part:
        ap.error("one of --init, --part, --mark, --table")
    p = Part(out, a.part, a.budget)
    try:
        globals()[f"part_{a.part}"](p, a.dry_run)
    except BaseException as e:       # SystemExit too: a part's failure is data, and the next part runs
        p.set("error", _err(e))
        p.set("status", "error")
        import traceback
        traceback.print_exc()
        return 1
    p.set("status", "ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
