"""A simulated GPU for fake tensors: ``torch.cuda``'s Python side and the attention kernels' choice.

With the stand-in C++ device (``shim``) torch can hold fake tensors on ``cuda:0``; this module
answers what the training code asks ``torch.cuda`` (availability, capability, streams, events,
memory statistics, seeds) as the target GPU would, and routes ``scaled_dot_product_attention``
to the fused kernel a GPU would run. On a CPU build of torch, SDPA on fake CUDA tensors would
otherwise take the math path (which keeps the whole score matrix for backward) whatever backend
was asked for; on a CUDA build with no GPU it finds no kernel at all.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from types import SimpleNamespace
from typing import Iterator

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    name: str
    total_memory: int          # bytes, as torch.cuda.get_device_properties reports
    capability: tuple[int, int]
    sms: int


# total_memory as torch reports it on these cards (the driver's usable size, not the marketing one)
GPUS = {
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", 85_029_158_912, (9, 0), 132),
    "h200": GpuSpec("NVIDIA H200", 150_119_563_264, (9, 0), 132),
    "a100": GpuSpec("NVIDIA A100-SXM4-80GB", 85_097_971_712, (8, 0), 108),
}


class _Stream:
    """What the training loop does with a side stream: enter it, wait on it, record on it."""

    def __init__(self, device=None, priority: int = 0):
        self.device = torch.device("cuda", 0)

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event or _Event()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class _Event:
    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


class SdpaLog:
    """Which fused kernel each SDPA call was routed to, by (backend, dtype, head dim)."""

    def __init__(self):
        self.calls: Counter = Counter()


def _flash_ok(q, k, v, mask) -> bool:
    return (mask is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and q.shape[-1] % 8 == 0)


def _efficient_ok(q, k, v, mask) -> bool:
    return q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] % 8 == 0


def _routed_sdpa(orig, log: SdpaLog):
    """``scaled_dot_product_attention`` that calls the kernel a GPU would pick among the enabled
    ones (torch's order: flash, then memory-efficient, then math), as its aten op, whose fake
    implementation gives the real kernel's outputs and saved tensors (output and log-sum-exp)."""
    from torch.backends import cuda as bc

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type != "cuda":
            return orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)
        d = query.shape[-1]
        if bc.flash_sdp_enabled() and not enable_gqa and _flash_ok(query, key, value, attn_mask):
            log.calls[("flash", str(query.dtype), d)] += 1
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale)[0]
        if bc.mem_efficient_sdp_enabled() and not enable_gqa and _efficient_ok(query, key, value, attn_mask):
            log.calls[("efficient", str(query.dtype), d)] += 1
            bias = attn_mask
            if bias is not None and bias.dtype == torch.bool:   # the kernel takes an additive bias
                bias = torch.zeros(bias.shape, dtype=query.dtype, device=query.device).masked_fill(
                    ~bias, float("-inf"))
            need_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                query, key, value, bias, need_lse, dropout_p, is_causal, scale=scale)[0]
        if not bc.math_sdp_enabled():
            raise RuntimeError("No available kernel (rehearsal: flash and memory-efficient attention reject "
                               f"{query.dtype} head dim {d}{' with a mask' if attn_mask is not None else ''})")
        log.calls[("math", str(query.dtype), d)] += 1
        # the math kernel by name: SDPA's own choice asks the CUDA library (cuDNN's version) first
        return torch.ops.aten._scaled_dot_product_attention_math(
            query, key, value, attn_mask, dropout_p, is_causal, None, scale=scale, enable_gqa=enable_gqa)[0]

    return sdpa


# FlexAttention's eager entry compiles a wrapper, which cannot run under the rehearsal's dispatch
# modes. Its stand-in has flex's outputs and saved tensors (output, fp32 log-sum-exp, q, k, v)
# and counts the FLOPs of the (query, key) pairs inside the window, as ivfast.models.flops does.
@torch.library.custom_op("ivfast_rehearse::windowed_attention", mutates_args=())
def windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, N, D] inputs; what a real tensor gets is the dense band-masked reference."""
    n = q.shape[-2]
    i = torch.arange(n, device=q.device)
    s = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
    s = s.masked_fill((i[:, None] - i[None, :]).abs() > window, float("-inf"))
    return (s.softmax(-1) @ v.float()).to(q.dtype), s.logsumexp(-1)


@windowed_attention.register_fake
def _(q, k, v, window):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("ivfast_rehearse::windowed_attention_backward", mutates_args=())
def windowed_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                out: torch.Tensor, lse: torch.Tensor, window: int
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        o, _ = windowed_attention(*leaves, window)
        return torch.autograd.grad(o, leaves, dout)


@windowed_attention_backward.register_fake
def _(dout, q, k, v, out, lse, window):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _wa_setup(ctx, inputs, output):
    q, k, v, window = inputs
    ctx.window = window
    ctx.save_for_backward(q, k, v, *output)


def _wa_backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    return (*windowed_attention_backward(dout, q, k, v, out, lse, ctx.window), None)


windowed_attention.register_autograd(_wa_backward, setup_context=_wa_setup)


def _wa_pairs(n: int, window: int) -> int:
    from ivfast.models.flops import attention_pairs
    return attention_pairs(n, window)


def _register_flops() -> None:
    from torch.utils import flop_counter as fc
    fwd = torch.ops.ivfast_rehearse.windowed_attention
    bwd = torch.ops.ivfast_rehearse.windowed_attention_backward
    if fwd.default in fc.flop_registry:
        return

    @fc.register_flop_formula(fwd)
    def _(q_shape, k_shape, v_shape, window, out_shape=None, **kw) -> int:
        b, h, n, d = q_shape
        return 4 * b * h * _wa_pairs(n, window) * d

    @fc.register_flop_formula(bwd)
    def _(dout_shape, q_shape, *rest, out_shape=None, **kw) -> int:
        b, h, n, d = q_shape
        # five GEMMs, as torch counts a flash backward: the scores are recomputed
        return 10 * b * h * _wa_pairs(n, rest[-1]) * d


def _flex_stand_in(q, k, v, window, key):
    """``attention._flex`` on the simulated GPU: [B, N, H, D] in and out, recorded as flex."""
    from ivfast.models import attention as A
    w = k.shape[1] if window is None else window
    out, _ = windowed_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), w)
    A._record(key, "flex")
    return out.transpose(1, 2)


@contextlib.contextmanager
def simulated_gpu(spec: GpuSpec, memory, sdpa_log: SdpaLog) -> Iterator[None]:
    """Patch ``torch.cuda`` and SDPA for the duration: one GPU ``spec``; ``memory`` (a
    ``record.MemoryTracker``) answers the memory statistics."""
    from ivfast.models import attention as A

    cuda = torch.cuda
    props = SimpleNamespace(name=spec.name, total_memory=spec.total_memory, multi_processor_count=spec.sms,
                            major=spec.capability[0], minor=spec.capability[1], is_integrated=False,
                            is_multi_gpu_board=False, L2_cache_size=50 * 2 ** 20, uuid="rehearsal")
    patches = {
        (cuda, "is_available"): lambda: True,
        (cuda, "device_count"): lambda: 1,
        (cuda, "current_device"): lambda: 0,
        (cuda, "set_device"): lambda d: None,
        (cuda, "is_initialized"): lambda: True,
        (cuda, "init"): lambda: None,
        (cuda, "_lazy_init"): lambda: None,
        (cuda, "is_bf16_supported"): lambda *a, **k: True,
        (cuda, "get_device_capability"): lambda d=None: spec.capability,
        (cuda, "get_device_properties"): lambda d=None: props,
        (cuda, "get_device_name"): lambda d=None: spec.name,
        (cuda, "mem_get_info"): lambda d=None: (spec.total_memory - memory.allocated, spec.total_memory),
        (cuda, "Stream"): _Stream,
        (cuda, "Event"): _Event,
        (cuda, "stream"): lambda s=None: contextlib.nullcontext(),
        (cuda, "current_stream"): lambda d=None: _Stream(),
        (cuda, "default_stream"): lambda d=None: _Stream(),
        (cuda, "synchronize"): lambda d=None: None,
        (cuda, "manual_seed"): lambda s: None,
        (cuda, "manual_seed_all"): lambda s: None,
        (cuda, "get_rng_state_all"): lambda: [],
        (cuda, "set_rng_state_all"): lambda states: None,
        (cuda, "memory_allocated"): lambda d=None: memory.allocated,
        (cuda, "max_memory_allocated"): lambda d=None: memory.peak,
        (cuda, "reset_peak_memory_stats"): lambda d=None: memory.reset_peak(),
        (cuda.nvtx, "range_push"): lambda msg: 0,
        (cuda.nvtx, "range_pop"): lambda: 0,
        (torch.Tensor, "record_stream"): lambda self, stream: None,
        (F, "scaled_dot_product_attention"): _routed_sdpa(F.scaled_dot_product_attention, sdpa_log),
    }
    # torch's truncated normal draws until no value falls outside, a loop on values that fake
    # tensors do not have; the rehearsal's weights need no values
    trunc = torch.nn.init._no_grad_trunc_normal_
    patches[(torch.nn.init, "_no_grad_trunc_normal_")] = \
        lambda tensor, *a, **k: tensor if isinstance(tensor, FakeTensor) else trunc(tensor, *a, **k)
    _register_flops()
    patches[(A, "_flex")] = _flex_stand_in
    saved = {key: getattr(*key) for key in patches}
    try:
        for (obj, name), value in patches.items():
            setattr(obj, name, value)
        # a GPU times the SDPA kernels once per shape, which fake tensors cannot: the rehearsal
        # takes torch's first-that-runs kernel
        A.set_kernel_timing(False)
        yield
    finally:
        A.set_kernel_timing(True)
        for (obj, name), value in saved.items():
            setattr(obj, name, value)
