"""Masked-token kernels vs PyTorch indexing (eager) and torch.compile, forward and backward.

    python bench/bench_tokens.py                   # paper shapes, bf16, needs a CUDA GPU
    python bench/bench_tokens.py --quick           # fewer shapes
    python bench/bench_tokens.py --smoke           # CPU + Triton interpreter, tiny shapes: checks
                                                   # the script runs; its timings mean nothing

For each op, pass and implementation: median time, GB/s moved (the bytes the op must read and
write at least: gathered rows, outputs, gradients, ids, and the [N, C] position table counted
once, although every batch element reads it: L2 serves the repeats) and the % of the device's
copy bandwidth measured in the same run (a plain device-to-device ``copy_`` of 1 GiB).
Targets: >= 85 % of copy bandwidth for gather / assemble / patch targets, and faster
than torch.compile. Also times ``semantic_mask`` (topk / sample) at the same shapes.
Writes CSV and JSON (device, versions, date) to bench/results/tokens_<device>.{csv,json}.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__" and "--smoke" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402  (also puts the repo root on sys.path)

from ivfast import ops  # noqa: E402
from ivfast.masking import semantic_mask  # noqa: E402

ROOT = Path(__file__).resolve().parent
# one compiled graph per op and shape: keep dynamo from giving up (and silently running eager)
for _name in ("cache_size_limit", "recompile_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 256)
ARGS = DEV = DTYPE = IMPLS = None          # set by run()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--quick", action="store_true", help="one shape per op")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (script check only; Triton "
                                                         "kernels under the interpreter)")
    ap.add_argument("--impls", default="triton,compile,eager")
    ap.add_argument("--out", default=str(ROOT / "results"))
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- timing
def bench(fn, grad_to_none=None):
    """Median milliseconds."""
    if ARGS.smoke:
        fn()
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")


def copy_bandwidth():
    n = (1 << 30) if not ARGS.smoke else (1 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------- shapes
def shapes():
    if ARGS.smoke:
        return [dict(B=2, T=1, img=112, C=40, D_feat=48)]
    full = [dict(B=64, T=16, img=224, C=768, D_feat=1536),     # ViT-B stage 1, teacher width 1536
            dict(B=32, T=16, img=224, C=1024, D_feat=1536),    # ViT-L / predictor width
            dict(B=32, T=32, img=224, C=768, D_feat=768),      # stage 2 (32 frames, 8192 tokens)
            dict(B=32, T=32, img=224, C=1024, D_feat=1024)]
    return full[:1] if ARGS.quick else full


def mask_ids(B, N, K, gen):
    keep, mask = semantic_mask(torch.rand(B, N, device=DEV, generator=gen), 1 - K / N,
                               mode="sample", generator=gen)
    return keep, mask


# --------------------------------------------------------------------------- cases
def cases():
    gen = torch.Generator(device=DEV).manual_seed(0)
    s = DTYPE.itemsize
    for sh in shapes():
        B, T, img, C, Df = sh["B"], sh["T"], sh["img"], sh["C"], sh["D_feat"]
        N = T * (img // 14) ** 2
        K = N // 5                                    # 80 % masking: K 819 / M 3277 at N 4096
        keep, mask = mask_ids(B, N, K, gen)
        M = mask.shape[1]
        K = keep.shape[1]
        tag = f"B{B} N{N} K{K} M{M} C{C}"

        x = torch.randn(B, N, C, device=DEV, dtype=DTYPE, requires_grad=True)
        pos = torch.randn(N, C, device=DEV, dtype=DTYPE, requires_grad=True)
        ids_bytes = B * K * 4
        yield dict(op="gather+pos", shape=tag, inputs=(x, pos),
                   fn=lambda impl, x=x, pos=pos, keep=keep: ops.gather_tokens(x, keep, pos, impl=impl),
                   fwd_bytes=2 * B * K * C * s + N * C * s + ids_bytes,          # x rows, out, pos table once
                   bwd_bytes=B * K * C * s + B * N * C * s + N * C * s + B * N * 4)  # gout, gx, gpos, inv

        feats = torch.randn(B, N, Df, device=DEV, dtype=DTYPE, requires_grad=True)
        yield dict(op="pick_features", shape=f"B{B} N{N} K{K} C{Df}", inputs=(feats,),
                   fn=lambda impl, f=feats, keep=keep: ops.gather_tokens(f, keep, None, impl=impl),
                   fwd_bytes=2 * B * K * Df * s + ids_bytes,
                   bwd_bytes=B * K * Df * s + B * N * Df * s + B * N * 4)

        vis = torch.randn(B, K, C, device=DEV, dtype=DTYPE, requires_grad=True)
        mt = torch.randn(C, device=DEV, dtype=DTYPE, requires_grad=True)
        yield dict(op="assemble", shape=tag, inputs=(vis, mt, pos),
                   fn=lambda impl, v=vis, mt=mt, pos=pos, keep=keep, mask=mask:
                       ops.assemble_sequence(v, keep, mask, mt, pos, impl=impl),
                   fwd_bytes=B * K * C * s + B * N * C * s + N * C * s + B * N * 4,  # vis, out, pos table, ids
                   bwd_bytes=B * N * C * s + B * K * C * s + N * C * s + B * N * 4)  # gout, gvis, gpos, inv

        for vdtype in (torch.uint8, torch.float32):
            video = (torch.randint(0, 256, (B, 3, T, img, img), device=DEV, dtype=torch.uint8) if vdtype == torch.uint8
                     else torch.rand(B, 3, T, img, img, device=DEV))
            vname = "u8" if vdtype == torch.uint8 else "f32"
            for norm_pix in (False, True):
                yield dict(op=f"patch_targets[{vname}{',norm_pix' if norm_pix else ''}]", shape=f"B{B} T{T} M{M}",
                           inputs=(),
                           fn=lambda impl, v=video, mask=mask, n=norm_pix: ops.patch_targets(
                               v, mask, 14, 1, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), norm_pix=n, impl=impl),
                           fwd_bytes=B * M * 588 * (video.element_size() + 4) + B * M * 4, bwd_bytes=0)
            del video

        scores = torch.rand(B, N, device=DEV)
        for mode in ("topk", "sample"):
            yield dict(op=f"semantic_mask[{mode}]", shape=f"B{B} N{N}", inputs=(),
                       fn=lambda impl, sc=scores, mode=mode: semantic_mask(sc, 0.8, mode=mode, generator=gen),
                       fwd_bytes=0, bwd_bytes=0, impls=["eager"])


def check(case):
    """The kernel must agree with eager before its timing means anything."""
    if "triton" not in IMPLS or case.get("impls") == ["eager"]:
        return
    out_t = case["fn"]("triton")
    out_e = case["fn"]("eager")
    tol = 1e-5 if out_e.dtype == torch.float32 and DTYPE == torch.float32 else 2e-2
    torch.testing.assert_close(out_t.float(), out_e.float(), rtol=tol, atol=tol,
                               msg=lambda m: f"{case['op']} {case['shape']}: triton != eager\n{m}")


def run(argv=None) -> dict:
    """Every case of ``argv``'s settings: ``{"meta": stamp and copy bandwidth, "rows": [...]}``."""
    global ARGS, DEV, DTYPE, IMPLS
    ARGS = parse_args(argv)
    if not ARGS.smoke and not torch.cuda.is_available():
        raise SystemExit("bench_tokens.py needs a CUDA GPU (torch.cuda.is_available() is False). "
                         "Use --smoke to only check that the script runs on CPU.")
    DEV = "cpu" if ARGS.smoke else "cuda"
    DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[ARGS.dtype]
    IMPLS = ARGS.impls.split(",")
    copy_gbs = copy_bandwidth()
    dev_name = H.device_name(torch.device(DEV))
    print(f"device: {dev_name}; copy bandwidth {copy_gbs:.0f} GB/s; dtype {ARGS.dtype}")
    rows = []
    for case in cases():
        check(case)
        ms = {}
        for impl in case.get("impls", IMPLS):
            for pass_ in ("fwd", "bwd"):
                nbytes = case[f"{pass_}_bytes"]
                if pass_ == "bwd" and not case["inputs"]:
                    continue
                if pass_ == "fwd":
                    with torch.no_grad() if not case["inputs"] else torch.enable_grad():
                        t = bench(lambda: case["fn"](impl))
                else:
                    out = case["fn"](impl)
                    gout = torch.randn_like(out)
                    t = bench(lambda: out.backward(gout, retain_graph=True), grad_to_none=list(case["inputs"]))
                    del out, gout
                ms[(impl, pass_)] = t
                gbs = nbytes / (t * 1e-3) / 1e9 if nbytes else float("nan")
                rows.append(dict(op=case["op"], shape=case["shape"], pass_=pass_, impl=impl,
                                 median_ms=round(t, 4), gb_s=round(gbs, 1),
                                 pct_copy_bw=round(100 * gbs / copy_gbs, 1) if nbytes else None))
        for r in rows:
            if r["op"] == case["op"] and r["shape"] == case["shape"] and ("compile", r["pass_"]) in ms:
                r["speedup_vs_compile"] = round(ms[("compile", r["pass_"])] / r["median_ms"], 2)
        for r in [r for r in rows if r["op"] == case["op"] and r["shape"] == case["shape"]]:
            pct = f"{r['pct_copy_bw']:5.1f}%" if r["pct_copy_bw"] is not None else "   -  "
            print(f"{r['op']:32s} {r['shape']:28s} {r['pass_']} {r['impl']:8s} {r['median_ms']:9.3f} ms "
                  f"{r['gb_s']:8.1f} GB/s {pct} of copy  x{r.get('speedup_vs_compile', float('nan')):.2f} vs compile")
        if case["inputs"]:
            for t in case["inputs"]:
                t.grad = None

    # targets: >= 85 % of copy bandwidth for the three kernels, and faster than compile
    verdicts = []
    for r in rows:
        if r["impl"] == "triton" and r["pct_copy_bw"] is not None:
            ok = r["pct_copy_bw"] >= 85 and r.get("speedup_vs_compile", 0) > 1
            r["meets_target"] = ok
            verdicts.append(ok)
            if not ok:
                print(f"below target: {r['op']} {r['shape']} {r['pass_']}: {r['pct_copy_bw']}% of copy, "
                      f"x{r.get('speedup_vs_compile')} vs compile")
    print(f"{sum(verdicts)}/{len(verdicts)} triton rows meet the target")
    meta = dict(H.stamp(torch.device(DEV)), copy_bandwidth_gb_s=round(copy_gbs, 1), dtype=ARGS.dtype,
                smoke=ARGS.smoke)
    return dict(meta=meta, rows=rows)


def main(argv=None) -> int:
    doc = run(argv)
    meta, rows = doc["meta"], doc["rows"]
    out_dir = Path(ARGS.out)
    stem = "tokens_" + ("smoke" if ARGS.smoke else meta["device"].replace(" ", "_").replace("/", "_"))
    H.write_result(out_dir / f"{stem}.json", meta, rows)
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        keys = ["op", "shape", "pass_", "impl", "median_ms", "gb_s", "pct_copy_bw", "speedup_vs_compile",
                "meets_target"]
        w = csv.DictWriter(f, fieldnames=keys + list(meta))
        w.writeheader()
        for r in rows:
            w.writerow({**{k: r.get(k) for k in keys}, **meta})
    print(f"wrote {out_dir / stem}.json and .csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
