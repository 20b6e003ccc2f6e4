"""Compile every Triton kernel launch for real GPUs, on a machine without one.

The CPU interpreter runs the kernels' maths but not Triton's compiler, so a kernel can pass
every interpreted test and still fail to compile for a GPU (a bf16 ``tl.dot``, a type that
does not lower, a constexpr misuse). This module closes that gap:

1. ``record_launches(fn)`` runs ``fn`` under the interpreter and records, for every kernel
   launch, the kernel, the argument types (pointer dtypes, int widths), the constexpr values
   and launch options.
2. ``compile_specs(specs, targets)`` (in a child process WITHOUT ``TRITON_INTERPRET``, where
   ``@triton.jit`` gives real JIT functions) compiles each recorded launch ahead of time
   through TTIR -> TTGIR -> LLVM -> PTX -> cubin for the given ``GPUTarget``s (sm_80, sm_90),
   also in bf16 where the recorded launch was fp16, and for every autotune config.
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

_TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                    torch.int64: "i64", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas")


def _is_constexpr(annotation) -> bool:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return text.endswith("constexpr")


def _arg_type(value):
    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


def record_launches(fn, hints: bool = False) -> list[dict]:
    """Run ``fn()`` (interpreter mode) and return one spec per distinct kernel launch.

    ``hints``: also record what the GPU runtime specialises on, so the ahead-of-time compile sees
    the same kernel the GPU would run: ``tt.divisibility=16`` for 16-byte-aligned pointers and
    ints divisible by 16, and ints equal to 1 as constants."""
    from triton.runtime.interpreter import InterpretedFunction

    specs: dict[str, dict] = {}
    original = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        bound = dict(zip(params, args))
        bound.update({k: v for k, v in kwargs.items() if k in params})
        signature, constexprs, divisible = {}, {}, []
        for name, p in params.items():
            value = bound.get(name, p.default)
            if _is_constexpr(p.annotation) or value is None or \
                    (hints and type(value) is int and value == 1):
                signature[name] = "constexpr"
                constexprs[name] = value.value if hasattr(value, "value") else value
            else:
                signature[name] = _arg_type(value)
                if hints and ((isinstance(value, torch.Tensor) and value.data_ptr() % 16 == 0) or
                              (type(value) is int and value % 16 == 0)):
                    divisible.append(name)
        options = {k: kwargs[k] for k in _OPTIONS if k in kwargs}
        spec = dict(module=self.fn.__module__, name=self.fn.__name__, signature=signature,
                    constexprs=constexprs, options=options)
        if hints:
            spec["divisible"] = divisible
        specs[json.dumps(spec, sort_keys=True, default=str)] = spec
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    try:
        fn()
    finally:
        InterpretedFunction.run = original
    return list(specs.values())


_CHILD = r"""
import importlib, json, sys, traceback
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

specs, targets, report = json.loads(sys.stdin.read())
failures, done, resources = [], 0, []


def ptxas_usage(ptx, arch):
    # registers and spill bytes from ptxas -v (the GPU runtime reads the same numbers as
    # n_regs / n_spills when it loads the cubin; without a GPU, ptxas's log is the source)
    import re, subprocess, tempfile
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    log = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                          f"--gpu-name={sm_arch_from_capability(arch)}", f.name, "-o", f.name + ".o"],
                         capture_output=True, text=True).stderr
    num = lambda pat: max([int(v) for v in re.findall(pat, log)] or [0])
    return dict(n_regs=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"))


for spec in specs:
    obj = getattr(importlib.import_module(spec["module"]), spec["name"])
    configs = getattr(obj, "configs", None)      # autotuned: compile every real config
    jit = obj
    while not isinstance(jit, JITFunction):
        jit = jit.fn
    variants = [(c.kwargs, {"num_warps": c.num_warps, "num_stages": c.num_stages}) for c in configs] \
        if configs else [({}, spec["options"])]
    for arch in targets:
        for extra, options in variants:
            constexprs = dict(spec["constexprs"], **extra)
            sig = dict(spec["signature"], **{k: "constexpr" for k in extra})
            attrs = {(jit.arg_names.index(n),): [["tt.divisibility", 16]] for n in spec.get("divisible", [])}
            try:
                k = triton.compile(ASTSource(fn=jit, signature=sig, constexprs=constexprs, attrs=attrs),
                                   target=GPUTarget("cuda", arch, 32), options=options)
                done += 1
                if report:
                    resources.append(dict(kernel=spec["name"], arch=arch, options=options,
                                          constexprs={k_: v for k_, v in constexprs.items()
                                                      if k_.isupper() or k_.startswith("BLOCK")},
                                          **ptxas_usage(k.asm["ptx"], arch)))
            except Exception as e:
                failures.append(f"{spec['name']} sm_{arch} {sig} {constexprs} {options}: "
                                f"{type(e).__name__}: {str(e)[-1500:]}")
print(json.dumps({"compiled": done, "failures": failures, "resources": resources}, default=str))
"""


def with_bf16_variants(specs: list[dict]) -> list[dict]:
    """Each fp16 launch again with bf16 pointers: the interpreter cannot run bf16, ptxas can."""
    out = list(specs)
    for s in specs:
        if any(t == "*fp16" for t in s["signature"].values()):
            sig = {k: ("*bf16" if t == "*fp16" else t) for k, t in s["signature"].items()}
            out.append(dict(s, signature=sig))
    return out


def compile_specs(specs: list[dict], targets=(80, 90), timeout: int = 900, report: bool = False) -> dict:
    """Compile specs for each compute capability in a child process without the interpreter.
    ``report``: also return ``resources``, one dict per compiled kernel (kernel, arch, options,
    constexprs, n_regs, spill_stores, spill_loads) from ptxas's resource log."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps([specs, list(targets), report], default=str),
                         capture_output=True, text=True, env=env, timeout=timeout,
                         cwd=str(Path(__file__).resolve().parents[1]))
    if res.returncode != 0:
        raise RuntimeError(f"kernel compile child failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
