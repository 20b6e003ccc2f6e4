"""The stage-1 diffusion decoder: eager vs torch.compile vs ivfast (cuBLAS GEMMs + Triton row kernels).

Same module, same weights, same inputs in one run: forward (no grad) and forward+backward at the
real shape, 16 clips x 3072 masked rows = 49 152 rows, and the 8-clip half (24 576), depth 6,
width 1536 (``--rows`` / ``--shapes`` change that). Per case: median ms (20/80 % quantiles),
TFLOP/s of the decoder's GEMMs (analytic ``decoder_flops``; fwd+bwd = 3x fwd), % of a **cuBLAS
GEMM floor measured in the same run** (every GEMM of the decoder, fwd + dX + dW shapes, timed alone
with ``torch.mm`` in the same dtype: the time these FLOPs take at cuBLAS speed with no other
work), % of the device's dense peak, peak memory above weights and inputs, speedups.

    python bench/bench_diffusion_mlp.py                          # defaults (H100: < 3 min, predicted)
    python bench/bench_diffusion_mlp.py --dtype fp32             # the fp32 decoder (TF32 off)
    python bench/bench_diffusion_mlp.py --max-autotune           # torch.compile mode=max-autotune-no-cudagraphs
    python bench/bench_diffusion_mlp.py --tiny --device cpu      # dry run: toy shape, CPU, seconds
    python bench/bench_diffusion_mlp.py --json out.json          # also write the result document there

CLI (bench/gpu_check.py calls ``run(parse_args([...]))`` with these): --rows --shapes --impls (eager,compile,triton; "ivfast"
= triton) --modes (fwd,fwd+bwd) --dtype (bf16|fp32) --warmup --rep (ms) --out DIR --tag --json PATH
--compile-mode (default|max-autotune|max-autotune-no-cudagraphs) --max-autotune --tiny --device
(cuda|cpu) --no-floor. Writes ``DIR/diffusion_mlp_<device>[_tag].json`` and ``.csv``.

Arithmetic (D6 W1536, 588 -> 1176, cond 1024; PREDICTIONS, no GPU has run this yet):
* GEMM FLOPs per row, forward: 2 x (592*W + 256*W + W^2 + 1024*W + D*5*W^2 + 2*W^2 + W*1184)
  = 165 MFLOP; at 49 152 rows: 8.1 TFLOP fwd, 24.3 TFLOP fwd+bwd. adaLN = 58 %, dW GEMMs = 33 %.
* Row-kernel traffic per row and block (bf16): fwd LN-modulate with the fused residual 7W x 2 B,
  SiLU 4W x 2 B; bwd gate 5W, dSiLU 4W, LN recompute 4W, LN bwd 7W (x 2 B): about 31 W x 2 B
  = 95 KB/row/block, 0.57 MB/row for 6 blocks, 28 GB at 49 152 rows = about 9 ms at 3 TB/s.
  The block is GEMM-bound: 30 W^2 FLOP per row per block fwd+bwd against that traffic is about
  740 FLOP/B, above an H100's ridge (~300).
* Predicted fwd+bwd at 49 152 rows on an H100 SXM (cuBLAS bf16 at 600-660 TFLOP/s on these
  shapes): floor 37-41 ms; ivfast 46-51 ms (floor + row kernels), i.e. 1.15-1.25x the floor,
  about 1.0-1.1x torch.compile (47-52 ms) and 1.35-1.5x eager (68-72 ms); peak memory below eager
  (saved per block: x, u, h2; no h, no a). The issue's <= 1.10x-floor target needs the SiLU and
  residual passes fused into the GEMM epilogues (a persistent TMA kernel), which this does not do.
* fp32 (``--dtype fp32``, TF32 off, the released code's precision; PREDICTED): the same 24.3 TFLOP
  on the fp32 FMA pipes (H100 SXM peak 67 TFLOP/s, cuBLAS ~50-60 on these shapes) is about
  400-500 ms fwd+bwd at 49 152 rows, ~10x the bf16 path; row-kernel traffic doubles to ~18 ms.
* Default run time (predicted): 2 row counts x 3 impls x 2 modes, each ~0.3 s measuring, plus
  4 torch.compile graphs (fwd, fwd+bwd, x2 row counts; 20-40 s each) and the floor (~5 s):
  about 1.5-3 min on an H100.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def _cpu_run(argv) -> bool:
    """Whether this run is on the CPU (decided before anything imports triton: the ivfast kernels
    then run under the interpreter, which must be switched on before triton's first import)."""
    if "--device=cpu" in argv or any(a == "--device" and b == "cpu" for a, b in zip(argv, argv[1:])):
        return True
    return "--tiny" in argv and not torch.cuda.is_available() and "--device=cuda" not in argv \
        and not any(a == "--device" and b == "cuda" for a, b in zip(argv, argv[1:]))


if _cpu_run(sys.argv[1:]) and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402  (also puts the repo root on sys.path)

from ivfast.config import DecoderConfig  # noqa: E402
from ivfast.models import diffusion as D  # noqa: E402
from ivfast.models.diffusion import DiffusionDecoder, decoder_flops  # noqa: E402

TARGET_DIM, COND_DIM = 588, 1024
TINY = dict(rows="64", shapes="2x32", target=12, cond=16)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=None, help="comma list of decoder rows (default 49152,24576; --tiny: 64)")
    p.add_argument("--shapes", default=None, help="comma list of DEPTHxWIDTH (default 6x1536; --tiny: 2x32)")
    p.add_argument("--impls", default=None,
                   help="subset of eager,compile,triton ('ivfast' = triton); default all three "
                        "(on --device cpu: eager,triton)")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                   help="decoder compute dtype (DiffusionDecoder(dtype=...)); fp32 runs with TF32 off")
    p.add_argument("--warmup", type=int, default=25, help="warm-up (ms)")
    p.add_argument("--rep", type=int, default=200, help="measuring time (ms)")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead"])
    p.add_argument("--max-autotune", action="store_true", help="= --compile-mode max-autotune-no-cudagraphs")
    p.add_argument("--tiny", action="store_true", help="toy shape (rows 64, D2 W32, 12 -> 24): a dry run")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default cuda (cpu with --tiny "
                                                                            "when no GPU)")
    p.add_argument("--no-floor", action="store_true", help="skip the cuBLAS GEMM floor")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--tag", default="", help="suffix of the result file names")
    p.add_argument("--json", default=None, help="also write the JSON result document to this path")
    a = p.parse_args(argv)
    if a.max_autotune:
        a.compile_mode = "max-autotune-no-cudagraphs"
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() or not a.tiny else "cpu"
    a.rows = a.rows or (TINY["rows"] if a.tiny else "49152,24576")
    a.shapes = a.shapes or (TINY["shapes"] if a.tiny else "6x1536")
    a.impls = a.impls or ("eager,triton" if a.device == "cpu" else "eager,compile,triton")
    a.impls = ",".join("triton" if i == "ivfast" else i for i in a.impls.split(","))
    bad = set(a.impls.split(",")) - {"eager", "compile", "triton"}
    if bad:
        p.error(f"--impls: unknown {sorted(bad)}; choose from eager,compile,triton (ivfast = triton)")
    return a


# ------------------------------------------------------------------ timing (GPU: do_bench; CPU: a loop)
def bench(fn, dev: str, warmup_ms: float, rep_ms: float) -> tuple[float, float, float]:
    if dev == "cuda":
        from triton.testing import do_bench
        return tuple(do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))
    fn()
    times, t_end = [], time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return statistics.median(times), q[1], q[7]


def peak_memory(fn, dev: str) -> int | None:
    if dev != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# ------------------------------------------------------------------ the cuBLAS floor
def gemm_shapes(rows: int, depth: int, width: int, target: int, cond: int, out: int,
                backward: bool) -> list[tuple[int, int, int]]:
    """(M, K, N) of every decoder GEMM (inputs padded to 8 as the ivfast path runs them); with
    ``backward`` also each one's dX (M, N, K) and dW (N, M, K) product: 3x the forward FLOPs,
    as the TFLOP/s figures count them."""
    p8 = lambda n: n + (-n % 8)
    fwd = [(rows, 256, width), (rows, width, width), (rows, cond, width), (rows, p8(target), width),
           (rows, width, (3 * depth + 2) * width)] + [(rows, width, width)] * (2 * depth) + \
        [(rows, width, p8(out))]
    if not backward:
        return fwd
    return fwd + [(m, n, k) for m, k, n in fwd] + [(n, m, k) for m, k, n in fwd]


def gemm_floor_ms(shapes, dtype, dev: str, warmup: int, rep: int) -> float:
    """Sum over the shapes of the median time of one ``torch.mm`` each (distinct shapes timed once)."""
    times = _FLOOR_CACHE.setdefault((str(dtype), dev), {})    # the fwd shapes recur in fwd+bwd
    for s in set(shapes) - set(times):
        m, k, n = s
        a = torch.randn(m, k, device=dev, dtype=dtype)
        b = torch.randn(k, n, device=dev, dtype=dtype)
        times[s] = bench(lambda: torch.mm(a, b), dev, warmup, rep)[0]
        del a, b
    return sum(times[s] for s in shapes)


_FLOOR_CACHE: dict[tuple, dict] = {}


# ------------------------------------------------------------------ cases
def build(depth: int, width: int, rows: int, target: int, cond: int, dev: str, seed: int = 0):
    torch.manual_seed(seed)
    net = DiffusionDecoder(target, cond, width, depth, learn_sigma=True).to(dev)
    with torch.no_grad():          # a trained-looking net: the zero init would hide nothing, but be safe
        for p in net.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(rows, target, device=dev)
    t = torch.randint(0, 1000, (rows,), device=dev)
    z = torch.randn(rows, cond, device=dev, requires_grad=True)   # the predictor's output
    g = torch.randn(rows, 2 * target, device=dev)
    return net, x, t, z, g


def make_fn(net, impl: str, mode: str, x, t, z, g, compiled):
    """One call of the decoder in ``net.dtype`` (the module sets autocast / TF32 itself)."""
    if impl == "compile":
        def fwd(x, t, z):
            with D.decoder_precision(net.dtype, x.device):
                if net.dtype == "fp32":
                    x, z = x.float(), z.float()
                return compiled(net, x, t, z)
    else:
        net.impl = impl
        fwd = net
    params = list(net.parameters())

    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return fwd(x, t, z.detach())
    else:
        def fn():
            out = fwd(x, t, z)
            out.backward(g.to(out.dtype))
            for p in params:        # keep grads from accumulating across repeats
                p.grad = None
            z.grad = None
    return fn


def check_agreement(net, x, t, z) -> float:
    """Relative max difference of the ivfast output vs eager (same weights, same dtype)."""
    with torch.no_grad():
        net.impl = "eager"
        ref = net(x, t, z).float()
        net.impl = "triton"
        out = net(x, t, z).float()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def run(args) -> dict:
    """Every case of ``args`` (``parse_args``): ``{"meta": stamp and settings, "results": [...]}``."""
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_diffusion_mlp.py: torch.cuda.is_available() is False; use --tiny --device cpu "
                         "for a dry run (tests/test_diffusion_mlp.py checks correctness without a GPU)")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    target, cond = (TINY["target"], TINY["cond"]) if args.tiny else (TARGET_DIM, COND_DIM)
    peak = H.peak_flops(torch.device(dev))
    impls, modes = args.impls.split(","), args.modes.split(",")
    meta = dict(H.stamp(torch.device(dev)), dtype=args.dtype, compile_mode=args.compile_mode, tiny=args.tiny,
                floor="sum of torch.mm medians over the decoder's GEMM shapes (fwd; +dX,+dW for fwd+bwd)")
    print(f"# {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  {args.dtype}  "
          f"compile mode {args.compile_mode}  peak {meta['peak_bf16_tflops']} TFLOP/s")
    rows_out = []
    hdr = f"{'rows':>6} {'shape':>8} {'mode':>8} {'impl':>8} {'ms':>9} {'p20':>8} {'p80':>8} " \
          f"{'TFLOP/s':>8} {'%floor':>6} {'peakMiB':>8} {'vs eager':>8} {'vs comp':>8}"
    print(hdr)
    fmt = lambda v, f: format(v, f) if v is not None else "-"
    for rows in [int(r) for r in args.rows.split(",")]:
        for shape in args.shapes.split(","):
            depth, width = (int(v) for v in shape.lower().split("x"))
            net, x, t, z, g = build(depth, width, rows, target, cond, dev)
            net.dtype = args.dtype
            agree = check_agreement(net, x, t, z) if "triton" in impls else None
            compiled = torch.compile(DiffusionDecoder.forward_reference, mode=args.compile_mode) \
                if "compile" in impls else None
            flops_fwd = decoder_flops(rows, DecoderConfig(depth=depth, width=width, batch_mul=1), target, cond)
            for mode in modes:
                flops = flops_fwd * (1 if mode == "fwd" else 3)
                floor = None
                if not args.no_floor:
                    old = D._set_tf32(False) if args.dtype == "fp32" else None   # the fp32 floor: no TF32
                    try:
                        floor = gemm_floor_ms(gemm_shapes(rows, depth, width, target, cond, 2 * target,
                                                          mode != "fwd"), dtype, dev, args.warmup, args.rep)
                    finally:
                        if old is not None:
                            D._set_tf32(old)
                    print(f"{rows:>6} {shape:>8} {mode:>8} {'floor':>8} {floor:9.3f} {'':>8} {'':>8} "
                          f"{flops / floor / 1e9:8.1f}")
                    rows_out.append(dict(rows=rows, depth=depth, width=width, mode=mode, impl="cublas_floor",
                                         median_ms=round(floor, 4), tflops=round(flops / floor / 1e9, 1),
                                         flops=flops))
                found: dict[str, float] = {}
                for impl in impls:
                    fn = make_fn(net, impl, mode, x, t, z, g, compiled)
                    try:
                        mem = peak_memory(fn, dev)        # also the first (compiling) call
                        ms, p20, p80 = bench(fn, dev, args.warmup, args.rep)
                    except Exception as e:          # report and continue: one failure must not hide the rest
                        print(f"{rows:>6} {shape:>8} {mode:>8} {impl:>8} FAILED: {type(e).__name__}: {e}")
                        rows_out.append(dict(rows=rows, depth=depth, width=width, mode=mode, impl=impl,
                                             error=f"{type(e).__name__}: {e}"))
                        continue
                    found[impl] = ms
                    tflops = flops / ms / 1e9
                    rec = dict(rows=rows, depth=depth, width=width, mode=mode, impl=impl,
                               median_ms=round(ms, 4), p20_ms=round(p20, 4), p80_ms=round(p80, 4),
                               tflops=round(tflops, 1), pct_peak=round(100 * tflops * 1e12 / peak, 1) if peak else None,
                               gemm_floor_ms=round(floor, 4) if floor else None,
                               pct_of_gemm_floor=round(100 * floor / ms, 1) if floor else None,
                               peak_mem_mib=round(mem / 2 ** 20, 1) if mem is not None else None, flops=flops,
                               speedup_vs_eager=round(found["eager"] / ms, 2) if "eager" in found else None,
                               speedup_vs_compile=round(found["compile"] / ms, 2) if "compile" in found else None,
                               triton_vs_eager_rel_err=agree)
                    rows_out.append(rec)
                    print(f"{rows:>6} {shape:>8} {mode:>8} {impl:>8} {ms:9.3f} {p20:8.3f} {p80:8.3f} "
                          f"{tflops:8.1f} {fmt(rec['pct_of_gemm_floor'], '6.1f')} "
                          f"{fmt(rec['peak_mem_mib'], '8.0f')} "
                          f"{fmt(rec['speedup_vs_eager'], '8.2f')} {fmt(rec['speedup_vs_compile'], '8.2f')}")
                # speedups relative to impls measured after this one, too
                for rec in rows_out:
                    if rec.get("rows") == rows and rec.get("mode") == mode and rec.get("depth") == depth \
                            and rec.get("width") == width and rec.get("median_ms") and rec["impl"] in found:
                        for o in ("eager", "compile"):
                            if o in found:
                                rec[f"speedup_vs_{o}"] = round(found[o] / rec["median_ms"], 2)
            del net, x, t, z, g
            if dev == "cuda":
                torch.cuda.empty_cache()

    return dict(meta=meta, results=rows_out)


def main(argv=None) -> int:
    args = parse_args(argv)
    doc = run(args)
    meta, rows_out = doc["meta"], doc["results"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "diffusion_mlp_" + meta["device"].split(" (")[0].replace(" ", "_").replace("/", "_") + \
        (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1))
    keys = list(dict.fromkeys(k for r in rows_out for k in r))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(meta) + keys)
        w.writeheader()
        for r in rows_out:
            w.writerow({**meta, **r})
    print(f"wrote {out / stem}.json and .csv" + (f" and {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
