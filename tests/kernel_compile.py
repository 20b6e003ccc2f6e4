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


def record_launches(fn) -> list[dict]:
    """Run ``fn()`` (interpreter mode) and return one spec per distinct kernel launch."""
    from triton.runtime.interpreter import InterpretedFunction

    specs: dict[str, dict] = {}
    original = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        bound = dict(zip(params, args))
        bound.update({k: v for k, v in kwargs.items() if k in params})
        signature, constexprs = {}, {}
        for name, p in params.items():
            value = bound.get(name, p.default)
            if _is_constexpr(p.annotation) or value is None:
                signature[name] = "constexpr"
                constexprs[name] = value.value if hasattr(value, "value") else value
            else:
                signature[name] = _arg_type(value)
        options = {k: kwargs[k] for k in _OPTIONS if k in kwargs}
        spec = dict(module=self.fn.__module__, name=self.fn.__name__, signature=signature,
                    constexprs=constexprs, options=options)
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

specs, targets = json.loads(sys.stdin.read())
failures, done = [], 0
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
            try:
                triton.compile(ASTSource(fn=jit, signature=sig, constexprs=constexprs),
                               target=GPUTarget("cuda", arch, 32), options=options)
                done += 1
            except Exception as e:
                failures.append(f"{spec['name']} sm_{arch} {sig} {constexprs} {options}: "
                                f"{type(e).__name__}: {str(e)[-1500:]}")
print(json.dumps({"compiled": done, "failures": failures}))
"""


def with_bf16_variants(specs: list[dict]) -> list[dict]:
    """Each fp16 launch again with bf16 pointers: the interpreter cannot run bf16, ptxas can."""
    out = list(specs)
    for s in specs:
        if any(t == "*fp16" for t in s["signature"].values()):
            sig = {k: ("*bf16" if t == "*fp16" else t) for k, t in s["signature"].items()}
            out.append(dict(s, signature=sig))
    return out


def compile_specs(specs: list[dict], targets=(80, 90), timeout: int = 900) -> dict:
    """Compile specs for each compute capability in a child process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps([specs, list(targets)], default=str),
                         capture_output=True, text=True, env=env, timeout=timeout,
                         cwd=str(Path(__file__).resolve().parents[1]))
    if res.returncode != 0:
        raise RuntimeError(f"kernel compile child failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
