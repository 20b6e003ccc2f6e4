"""What the rehearsal measures while the real step runs on fake tensors: memory and operations.

``MemoryTracker`` counts the bytes of every live CUDA storage (rounded to the caching
allocator's 512-byte blocks), as ``torch.cuda.memory_allocated`` would: a storage is counted
from the op that creates it until Python frees it. ``OpRecorder`` notes, for every GEMM and
attention call, the module it ran in, its input dtypes and device, and the fp32 matmul
precision in force (TF32 or IEEE).
"""
from __future__ import annotations

import weakref
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from torch.utils.module_tracker import ModuleTracker

import ivfast.rehearse.gpu  # noqa: F401  (defines the ivfast_rehearse ops named below)

aten = torch.ops.aten
BLOCK = 512


def allocated_bytes(storage: torch.UntypedStorage) -> int:
    """What the caching allocator hands out for ``storage``: its bytes rounded up to a block."""
    return -(-storage.nbytes() // BLOCK) * BLOCK


def _storages(out):
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            yield t.untyped_storage()


class MemoryTracker(TorchDispatchMode):
    """Live and peak bytes of CUDA storages created while active; ``phase`` names where the peak was."""

    supports_higher_order_operators = True     # flex attention is one

    def __init__(self):
        super().__init__()
        self.allocated = 0
        self.peak = 0
        self.phase = "set-up"
        self.peak_phase = ""
        self._live: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def reset_peak(self) -> None:
        self.peak = self.allocated

    def track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._live and self._refs[key]() is storage:
            return
        nbytes = allocated_bytes(storage)

        def free(_, key=key, nbytes=nbytes):
            if self._live.pop(key, None) is not None:
                self._refs.pop(key, None)
                self.allocated -= nbytes

        self._live[key] = nbytes
        self._refs[key] = weakref.ref(storage, free)
        self.allocated += nbytes
        if self.allocated > self.peak:
            self.peak, self.peak_phase = self.allocated, self.phase

    def track_tensors(self, tensors) -> None:
        for st in _storages(list(tensors)):
            self.track(st)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for st in _storages(out):
            self.track(st)
        return out


GEMMS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.addmm_.default,
         aten._addmm_activation.default, aten.convolution.default, aten._scaled_mm.default,
         aten.convolution_backward.default}
ATTENTION = {aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
             aten._scaled_dot_product_flash_attention_backward.default,
             aten._scaled_dot_product_efficient_attention_backward.default}
ATTENTION_BACKWARD = {aten._scaled_dot_product_flash_attention_backward.default,
                      aten._scaled_dot_product_efficient_attention_backward.default,
                      torch.ops.ivfast_rehearse.windowed_attention_backward.default}
# forward ops that, met during backward, are activation checkpointing's recomputation
# (attention only: a GEMM in backward may as well be a gradient's)
RECOMPUTABLE = {aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
                torch.ops.ivfast_rehearse.windowed_attention.default}


def _fp32_precision() -> str:
    """The fp32 matmul precision in force now: "tf32" or "ieee"."""
    m = torch.backends.cuda.matmul
    p = getattr(m, "fp32_precision", None)
    if p is not None:
        return "tf32" if p == "tf32" else "ieee"
    return "tf32" if m.allow_tf32 else "ieee"


class OpRecorder(TorchDispatchMode):
    """Per top-level module: counts of (op, input dtypes, fp32 precision); and inputs not on CUDA."""

    supports_higher_order_operators = True

    def __init__(self):
        super().__init__()
        self.tracker = ModuleTracker()
        self.by_module: dict[str, Counter] = defaultdict(Counter)
        self.forward_flops: Counter = Counter()    # by module, with FlopCounterMode's formulas
        self.recomputed_flops = 0                  # work redone in backward (not model FLOPs)
        self.off_device: list[str] = []

    def __enter__(self):
        self.tracker.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.tracker.__exit__(*exc)

    def _where(self) -> str:
        # backward ops are not attributed: torch's ModuleTracker keeps a module among the parents
        # after its backward ended when some of its inputs need no gradient
        if self.tracker.is_bw:
            return "backward"
        names = sorted(n for n in self.tracker.parents if n != "Global")
        # the deepest path under the model, reduced to its first component (encoder, predictor, ...)
        path = max(names, key=lambda n: n.count("."), default="Global")
        parts = path.split(".")
        return parts[1] if len(parts) > 1 else parts[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ns = getattr(func, "namespace", "")
        packet = getattr(func, "_overloadpacket", None)
        if packet in flop_registry:
            n = flop_registry[packet](*args, **kwargs, out_val=out)
            if not self.tracker.is_bw:
                self.forward_flops[self._where()] += n
            elif func in ATTENTION_BACKWARD:
                self.recomputed_flops += n // 5        # a fused backward recomputes the scores
            else:
                self.recomputed_flops += n if func in RECOMPUTABLE else 0   # checkpointing re-runs
        decoder_op = ns == "ivfast" and "ieee" in [a.name for a in func._schema.arguments]
        if func in GEMMS or func in ATTENTION or decoder_op or ns == "ivfast_rehearse":
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            # the matrix operands' dtypes (attention: q, k, v; not the fp32 log-sum-exp)
            operands = [t for t in tensors if t.is_floating_point() and t.dim() >= 2]
            if func in ATTENTION or ns == "ivfast_rehearse":
                operands = operands[:4]
            dtypes = "/".join(sorted({str(t.dtype).replace("torch.", "") for t in operands}))
            if decoder_op:
                names = [a.name for a in func._schema.arguments]
                ieee = (list(args) + [None] * len(names))[names.index("ieee")]
                ieee = kwargs.get("ieee", ieee)
                prec = "ieee" if ieee else "tf32"
            else:
                prec = _fp32_precision()
            if "float32" not in dtypes or func in ATTENTION or ns == "ivfast_rehearse":
                prec = "-"       # only fp32 GEMMs have a TF32 / IEEE choice
            name = str(func).replace("aten.", "").replace(".default", "")
            self.by_module[self._where()][(name, dtypes, prec)] += 1
            bad = [t for t in tensors if t.device.type != "cuda"]
            if bad:
                self.off_device.append(f"{name} in {self._where()}: input on {bad[0].device}")
        return out
