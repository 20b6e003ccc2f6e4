"""Driver of ``bench/gpu_check.sh``: the GPU figures of every benchmark in one check of at most 12 minutes.

Each part runs in its own process under its own ``timeout`` (the shell script sets them from
``BUDGET_S`` below, printed by ``--budgets``) and writes what it measures into one JSON file *as
it goes* (``harness.Record``), so a part that times out or crashes still leaves its partial
results, marked ``timeout``/``error``.

    python bench/gpu_check.py --budgets [--dry-run]                 # the budgets, as shell assignments
    python bench/gpu_check.py --init [--dry-run] [--out FILE]       # create the JSON, print its path
    python bench/gpu_check.py --part attention --budget 90 --out FILE [--dry-run]
    python bench/gpu_check.py --mark attention timeout --out FILE
    python bench/gpu_check.py --table --out FILE

A part calls its benchmark's functions: attention -> bench_attention, decoder ->
bench_diffusion_mlp, dtypes / stage1 / stage2 -> bench_train_step (the real ``Trainer.train_step``),
tokens -> bench_tokens, nvdec -> bench_dali. ``--dry-run``: every part with tiny shapes on the
CPU (no GPU needed); checks the script, measures nothing meaningful.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402  (also puts the repo root on sys.path)

PARTS = ("preflight", "dtypes", "attention", "decoder", "stage1", "stage2", "tokens", "nvdec")

# ---- budgets, the only place they are set (gpu_check.sh reads them through --budgets)
# Seconds each part may run: the shell's `timeout` kills it there (SIGKILL 5 s later). These are
# budgets, not predictions. The run stops giving time at TOTAL_S after its start, setup included.
# Setup: pip install building ivfast._C (SETUP_S at most); when pip fails within PIP_QUICK_S (a
# packaging failure, not the C++ build), `setup.py build_ext` gets BUILD_EXT_S. Parts 640 s +
# 60 s of setup = TOTAL_S 700 s, which leaves 12 min minus the last part's 5 s kill grace and
# the closing table; a longer setup takes its time from the last parts.
BUDGET_S = {"preflight": 30, "dtypes": 75, "attention": 90, "decoder": 150, "stage1": 130, "stage2": 90,
            "tokens": 35, "nvdec": 40}
TOTAL_S, SETUP_S, PIP_QUICK_S, BUILD_EXT_S = 700, 120, 60, 90
RESERVE_S = 20            # a measurement inside a part is not started with less of its budget left
DRY_BUDGET_S, DRY_TOTAL_S, DRY_RESERVE_S = 40, 240, 5


def budgets(dry: bool) -> dict:
    if dry:
        return {"parts": {p: DRY_BUDGET_S for p in PARTS}, "total": DRY_TOTAL_S, "reserve": DRY_RESERVE_S}
    return {"parts": dict(BUDGET_S), "total": TOTAL_S, "reserve": RESERVE_S}


def bench(name: str):
    """A benchmark module of bench/, imported when its part runs: a dependency missing on the GPU
    machine then fails that part alone, and the preflight part (which needs none) reports it."""
    return importlib.import_module(name)


# --------------------------------------------------------------------------- parts
def part_preflight(rec: H.Record, dry: bool, reserve: float):
    """Versions, the imports the other parts need (first: they are worth having when the rest fails)
    and the GPU's properties."""
    import torch
    imports = {}
    for mod in ("ivfast", "ivfast.kernels", "ivfast._C", "ivfast.masking", "ivfast.models.epd", "transformers",
                "safetensors", "yaml", "av", "nvidia.dali", "flash_attn", "xformers"):
        try:
            m = importlib.import_module(mod)
            imports[mod] = "ok " + str(getattr(m, "__version__", "")).strip()
        except Exception as e:
            imports[mod] = H.err(e)
    rec.set("imports", imports)
    for k, v in H.stamp(torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")).items():
        rec.set(k, v)
    rec.set("cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    rec.set("host_cc", shutil.which("cc") or shutil.which("gcc"))      # Triton builds its launcher with it
    rec.set("alloc_conf", os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    if dry:
        rec.set("gpu", None)
        return
    H.device(dry)          # no GPU visible: say so (the figures above are kept)
    props = torch.cuda.get_device_properties(0)
    rec.set("gpu", {"name": props.name, "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
                    "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count()})
    smi = shutil.which("nvidia-smi")
    if smi:
        q = "name,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu,driver_version"
        r = subprocess.run([smi, f"--query-gpu={q}", "--format=csv"], capture_output=True, text=True, timeout=20)
        rec.set("nvidia_smi", r.stdout.strip().splitlines())


def part_dtypes(rec: H.Record, dry: bool, reserve: float):
    """Dtypes entering attention and the GEMMs in one stage-1 train step. SDPA pinned and the
    decoder and token ops eager, so every GEMM is an aten op and no Triton autotune or flex
    compile spends this part's budget: dtypes do not depend on that."""
    T = bench("bench_train_step")
    dev = H.device(dry)
    cfg = T.preset_config("stage1_vitb", 2, ["model.attn_backend=sdpa", "model.decoder.impl=eager",
                                             "model.token_impl=eager", "runtime.compile=false"], dry)
    rec.set("config", "stage1 batch 2, attn_backend=sdpa, decoder eager (dtypes only)")
    step = T.TrainStep(cfg, dev)
    for k, v in T.dtype_census(step, dev).items():
        rec.set(k, v)
    step.close()


def part_attention(rec: H.Record, dry: bool, reserve: float):
    bench("bench_attention").run(rec, dry, reserve)


def part_decoder(rec: H.Record, dry: bool, reserve: float):
    """Decoder D6 W1536 at 49 152 rows fwd+bwd: ivfast vs torch.compile (default mode) vs eager, and
    the cuBLAS GEMM floor of the same GEMMs. The eager and Triton runs of both dtypes come before
    the compiles, so a compile that runs out the budget leaves the others measured."""
    D = bench("bench_diffusion_mlp")
    if dry:    # toy shape on the CPU, eager only (the Triton interpreter would take ~20 s here)
        runs, base = [("fp32", "eager")], ["--tiny", "--device", "cpu", "--warmup", "1", "--rep", "5"]
    else:
        runs = [(d, i) for i in ("eager", "triton", "compile") for d in ("bf16", "fp32")]
        base = ["--rows", "49152", "--shapes", "6x1536", "--warmup", "10", "--rep", "50"]
    rec.set("shape", "rows 64, D2 W32 (dry run)" if dry else "rows 49152 (16 clips x 3072 masked), D6 W1536")
    floors_done = set()
    for dtype, impl in runs:
        if rec.left() < reserve:
            rec.add("results", {"impl": impl, "dtype": dtype, "skipped": "part budget spent"})
            continue
        argv = [*base, "--impls", impl, "--modes", "fwd+bwd", "--dtype", dtype, "--compile-mode", "default",
                *(["--no-floor"] if dtype in floors_done else [])]
        row = {"impl": impl, "dtype": dtype}
        try:
            doc = D.run(D.parse_args(argv))
        except Exception as e:
            rec.add("results", dict(row, error=H.err(e)))
            continue
        for x in doc["results"]:
            if x.get("impl") == "cublas_floor":
                floors_done.add(dtype)
                rec.set(f"gemm_floor_{dtype}", {"ms": x.get("median_ms"), "tflops": x.get("tflops")})
            else:
                row.update({k: x[k] for k in ("median_ms", "tflops", "pct_peak", "pct_of_gemm_floor",
                                              "peak_mem_mib", "triton_vs_eager_rel_err", "error") if k in x})
        rec.add("results", row)
    done = {(r["impl"], r["dtype"]): r.get("median_ms") for r in rec.data.get("results", [])}
    for dtype in ("bf16", "fp32"):
        ivf = done.get(("triton", dtype))
        if ivf:
            rec.set(f"ivfast_speedup_{dtype}", {o: round(done[(o, dtype)] / ivf, 2) for o in ("eager", "compile")
                                                if done.get((o, dtype))})


def _stage(rec: H.Record, dry: bool, reserve: float, preset: str, batch: int):
    """The real train step at the preset (eager: torch.compile would spend the part's budget),
    halving the batch until one fits; the top kernels of one more step if time is left."""
    T = bench("bench_train_step")
    batches = [2] if dry else [batch >> i for i in range(batch.bit_length())]
    steps, warm = (1, 1) if dry else (3, 2)
    T.measure(rec, preset, batches, ["runtime.compile=false"], dry, steps, warm, profile_reserve_s=reserve)


def part_stage1(rec: H.Record, dry: bool, reserve: float):
    _stage(rec, dry, reserve, "stage1_vitb", 16)


def part_stage2(rec: H.Record, dry: bool, reserve: float):
    _stage(rec, dry, reserve, "stage2_vitb", 14)


def part_tokens(rec: H.Record, dry: bool, reserve: float):
    """The token kernels' GB/s against the copy bandwidth (bench_tokens --quick; dry: eager, tiny)."""
    doc = bench("bench_tokens").run(["--smoke", "--impls", "eager"] if dry else ["--quick", "--impls", "triton,eager"])
    rec.set("copy_gb_s", doc["meta"]["copy_bandwidth_gb_s"])
    rec.set("tokens", doc["rows"])
    pct = [r["pct_copy_bw"] for r in doc["rows"] if r.get("impl") == "triton" and r.get("pct_copy_bw")]
    if pct:
        rec.set("triton_pct_of_copy", {"min": min(pct), "max": max(pct)})


def part_nvdec(rec: H.Record, dry: bool, reserve: float):
    bench("bench_dali").run(rec, dry, reserve)


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
                   f"{res.get('peak_mem_gib')} GiB (rehearsal {res.get('rehearsal_peak_mem_gib')}) "
                   f"oom {r.get('oom_batches', [])}")
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
        return H.ROOT / "bench" / "results" / "gpu_check_dryrun_cpu.json"
    import torch
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "nogpu"
    return H.ROOT / "bench" / "results" / f"gpu_check_{name.replace(' ', '_').replace('/', '_')}.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", action="store_true", help="print the budgets as shell assignments")
    ap.add_argument("--init", action="store_true")
    ap.add_argument("--part", choices=PARTS)
    ap.add_argument("--mark", nargs=2, metavar=("PART", "STATUS"))
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--budget", type=float, default=None, help="seconds this part may take (its timeout)")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    b = budgets(a.dry_run)
    if a.budgets:
        print(f"TOTAL={b['total']}; SETUP={SETUP_S}; PIP_QUICK={PIP_QUICK_S}; BUILD_EXT={BUILD_EXT_S}; "
              f"PARTS=\"{' '.join(PARTS)}\"")
        print("declare -A BUDGET=(" + " ".join(f"[{p}]={s}" for p, s in b["parts"].items()) + ")")
        return 0
    out = Path(a.out) if a.out else default_out(a.dry_run)
    if a.init:
        dev = "cpu (dry run)" if a.dry_run else out.stem.removeprefix("gpu_check_").replace("_", " ")
        H.save(out, {"meta": {"device": dev, "date": H.now(), "dry_run": a.dry_run, "host": platform.node(),
                              "note": "written by bench/gpu_check.sh; parts write as they measure"}, "parts": {}})
        print(out)
        return 0
    if a.mark:
        data = H.load(out)
        rec = data["parts"].setdefault(a.mark[0], {})
        if rec.get("status") in (None, "running"):
            rec["status"] = a.mark[1]
        H.save(out, data)
        return 0
    if a.table:
        print(table(H.load(out)))
        return 0
    if not a.part:
        ap.error("one of --budgets, --init, --part, --mark, --table")
    rec = H.Record(out, a.part, a.budget if a.budget is not None else b["parts"][a.part])
    try:
        globals()[f"part_{a.part}"](rec, a.dry_run, b["reserve"])
    except BaseException as e:       # SystemExit too: a part's failure is data, and the next part runs
        rec.set("error", H.err(e))
        rec.set("status", "error")
        traceback.print_exc()
        return 1
    rec.set("status", "ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
