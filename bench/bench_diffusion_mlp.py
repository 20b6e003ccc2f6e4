"""The stage-1 diffusion MLP decoder: eager vs torch.compile vs ivfast's Triton kernels.

Same module, same weights, same inputs in one run, under bf16 autocast (how training runs it):
forward (no grad) and forward+backward, at rows 13107 / 52428 (16 frames x 80 % masked x
diffusion_batch_mul 1 / 4) and (depth, width) in D3W1024, D6W1536, D9W2048. Reports the median
ms (and 20/80 % quantiles), TFLOP/s of the decoder's GEMMs (analytic ``decoder_flops``; backward
counted as 2x forward), % of the device's dense bf16 peak, and peak memory above the weights and
inputs. Writes JSON and CSV to ``bench/results/``.

    python bench/bench_diffusion_mlp.py                       # full grid (a few minutes, mostly compile)
    python bench/bench_diffusion_mlp.py --rows 13107 --shapes 6x1536 --impls eager,triton

GPU check in one go (bf16 correctness, > 2^31-element offsets, then this benchmark):

    pytest tests/test_diffusion_kernels.py -q -m gpu && python bench/bench_diffusion_mlp.py

Targets on an H100 (issue 4): fwd+bwd at D6W1536 >= 1.5x faster than torch.compile and 2.5x
faster than eager, >= 60 % of the bf16 peak, peak memory no higher than eager.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ivfast.config import DecoderConfig  # noqa: E402
from ivfast.metrics import device_peak_flops  # noqa: E402
from ivfast.models.diffusion import DiffusionDecoder, decoder_flops  # noqa: E402

TARGET_DIM, COND_DIM = 588, 1024


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="13107,52428", help="comma list of decoder rows")
    p.add_argument("--shapes", default="3x1024,6x1536,9x2048", help="comma list of DEPTHxWIDTH")
    p.add_argument("--impls", default="eager,compile,triton", help="subset of eager,compile,triton")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int, default=200, help="do_bench measuring time (ms)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--tag", default="", help="suffix of the result file names")
    return p.parse_args(argv)


def build(depth: int, width: int, rows: int, seed: int = 0):
    torch.manual_seed(seed)
    net = DiffusionDecoder(TARGET_DIM, COND_DIM, width, depth, learn_sigma=True).cuda()
    with torch.no_grad():          # a trained-looking net: the zero init would skip no work, but be safe
        for p in net.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(rows, TARGET_DIM, device="cuda")
    t = torch.randint(0, 1000, (rows,), device="cuda")
    z = torch.randn(rows, COND_DIM, device="cuda", requires_grad=True)   # the predictor's output
    g = torch.randn(rows, 2 * TARGET_DIM, device="cuda")
    return net, x, t, z, g


def make_fn(net, impl: str, mode: str, x, t, z, g, amp_dtype):
    if impl == "compile":
        fwd = torch.compile(net.forward_reference, mode="max-autotune-no-cudagraphs")
    else:
        net.impl = impl
        fwd = net
    params = list(net.parameters())

    if mode == "fwd":
        def fn():
            with torch.no_grad(), torch.autocast("cuda", dtype=amp_dtype):
                return fwd(x, t, z.detach())
    else:
        def fn():
            with torch.autocast("cuda", dtype=amp_dtype):
                out = fwd(x, t, z)
            out.backward(g)
            for p in params:        # keep grads from accumulating across repeats
                p.grad = None
            z.grad = None
    return fn


def peak_memory(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def check_agreement(net, x, t, z, amp_dtype) -> float:
    """Relative max difference of the triton output vs eager (same weights), a sanity check."""
    with torch.no_grad(), torch.autocast("cuda", dtype=amp_dtype):
        net.impl = "eager"
        ref = net(x, t, z).float()
        net.impl = "triton"
        out = net(x, t, z).float()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_diffusion_mlp.py needs a CUDA GPU: torch.cuda.is_available() is False here. "
              "The CPU tests (tests/test_diffusion_kernels.py) check correctness without one.", file=sys.stderr)
        return 2
    import triton
    from triton.testing import do_bench

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    dev_name = torch.cuda.get_device_name()
    peak = device_peak_flops(torch.device("cuda"))
    impls = args.impls.split(",")
    modes = args.modes.split(",")
    meta = dict(device=dev_name, torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version(), dtype=args.dtype,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                peak_tflops=peak / 1e12 if peak else None)
    print(f"# {dev_name}  torch {torch.__version__}  triton {triton.__version__}  {args.dtype} autocast  "
          f"peak {meta['peak_tflops']} TFLOP/s")
    rows_out = []
    hdr = f"{'rows':>6} {'shape':>8} {'mode':>8} {'impl':>8} {'ms':>9} {'p20':>8} {'p80':>8} " \
          f"{'TFLOP/s':>8} {'%peak':>6} {'peakMiB':>8} {'vs eager':>8} {'vs comp':>8}"
    print(hdr)
    for rows in [int(r) for r in args.rows.split(",")]:
        for shape in args.shapes.split(","):
            depth, width = (int(v) for v in shape.lower().split("x"))
            net, x, t, z, g = build(depth, width, rows)
            agree = check_agreement(net, x, t, z, amp_dtype) if "triton" in impls else None
            flops_fwd = decoder_flops(rows, DecoderConfig(depth=depth, width=width, batch_mul=1),
                                      TARGET_DIM, COND_DIM)
            for mode in modes:
                flops = flops_fwd * (1 if mode == "fwd" else 3)
                found: dict[str, float] = {}
                for impl in impls:
                    fn = make_fn(net, impl, mode, x, t, z, g, amp_dtype)
                    try:
                        mem = peak_memory(fn)        # also the first (compiling / autotuning) call
                        ms, p20, p80 = do_bench(fn, warmup=args.warmup, rep=args.rep, quantiles=[0.5, 0.2, 0.8])
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
                               peak_mem_mib=round(mem / 2 ** 20, 1), flops=flops,
                               speedup_vs_eager=round(found["eager"] / ms, 2) if "eager" in found else None,
                               speedup_vs_compile=round(found["compile"] / ms, 2) if "compile" in found else None,
                               triton_vs_eager_rel_err=agree)
                    rows_out.append(rec)
                    fmt = lambda v, f: format(v, f) if v is not None else "-"
                    print(f"{rows:>6} {shape:>8} {mode:>8} {impl:>8} {ms:9.3f} {p20:8.3f} {p80:8.3f} "
                          f"{tflops:8.1f} {fmt(rec['pct_peak'], '6.1f')} {rec['peak_mem_mib']:8.0f} "
                          f"{fmt(rec['speedup_vs_eager'], '8.2f')} {fmt(rec['speedup_vs_compile'], '8.2f')}")
            del net, x, t, z, g
            torch.cuda.empty_cache()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "diffusion_mlp_" + dev_name.replace(" ", "_").replace("/", "_") + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, results=rows_out), indent=1))
    keys = sorted({k for r in rows_out for k in r}, key=lambda k: list(rows_out[0]).index(k)
                  if k in rows_out[0] else 99)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(meta) + keys)
        w.writeheader()
        for r in rows_out:
            w.writerow({**meta, **r})
    print(f"wrote {out / stem}.json and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
