"""One attention entry point for every block of every model.

``attention(q, k, v, window=None, backend="auto")`` takes ``[B, N, H, D]`` tensors (the layout a
fused ``qkv`` projection gives without a copy, and flash-attn's native one) and returns
``[B, N, H, D]``. ``window=w`` restricts token ``i`` to keys ``j`` with ``|i - j| <= w``
(ModernBERT's local layers: ``w = local_attention // 2 = 64``).

Backends, in the order ``"auto"`` tries them:

* ``flash_attn``: ``flash_attn.flash_attn_func`` when the package is installed and the inputs are
  fp16/bf16 on CUDA (it does the sliding window natively with ``window_size=(w, w)``).
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with its own kernels tried in
  the order flash -> memory-efficient -> cuDNN -> math (a banded mask for the sliding window,
  which the flash kernel cannot take, so windowed calls start at memory-efficient).
  The first kernel that accepts the call is *found by running it* (the real call, its output
  is used), cached per (device, dtype, head dim, windowed), pinned with ``sdpa_kernel`` for all
  later calls and logged once, so the report says what ran, not what should have run.
* ``flex``: ``torch.nn.attention.flex_attention`` (compiled) with a sliding-window block mask, which
  skips the key blocks outside the window instead of masking a dense score matrix. ``"auto"`` tries
  it for windowed calls on CUDA when flash-attn is missing; if its first call fails it logs why and
  pins ``sdpa`` instead. (PyTorch has no FlexAttention backward on CPU.)
* ``xformers``: ``xformers.ops.memory_efficient_attention`` when chosen explicitly and installed.
* ``math``: the plain PyTorch reference below (``attention_reference``); also the test oracle.

``packed_attention(q, k, v, segments)`` is attention within each of several sequences packed on
one token axis (stage 2's two mask sets in one encoder pass): flash-attn's varlen kernel, a
FlexAttention document mask, or one dense call per run of equal-length sequences.

``used_backends()`` returns what each kind of call resolved to (compiled calls included); the
training loop prints it and writes it to metrics.jsonl. q, k, v of different dtypes (fp32 q/k from
an autocast-promoted QK-norm next to bf16 v) are brought to one compute dtype (``compute_dtype``).
If flex fails, ``auto`` falls back to dense SDPA only while ``set_dense_fallback(True)`` (the
default outside training); training forbids it unless model.attn_allow_dense_fallback=true.
"""
from __future__ import annotations

import importlib
import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger("ivfast.attention")

Backend = Literal["auto", "flash_attn", "sdpa", "flex", "xformers", "math"]
BACKENDS = ("auto", "flash_attn", "sdpa", "flex", "xformers", "math")

# Memory-efficient before cuDNN: PyTorch itself moved cuDNN attention down its default order after
# correctness reports (2.5.1); both beat math, and flash (FA2) is first whenever it applies.
_SDPA_ORDER = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)
# The flash kernel of SDPA takes no attn_mask, so a banded (windowed) call skips it.
_SDPA_ORDER_MASKED = (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)

_resolved: dict[tuple, str] = {}          # call kind -> backend name, for the report
_sdpa_choice: dict[tuple, SDPBackend] = {}
_flex_failed: dict[tuple, str] = {}        # call kind -> why flex could not run (auto then uses sdpa)
_masks: dict[tuple, object] = {}           # cached band masks / flex block masks


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func  # type: ignore
    except Exception:  # not installed, or built for another torch: fall back quietly
        return None
    return flash_attn_func


def _xformers_ops():
    try:
        import xformers.ops as xops  # type: ignore
    except Exception:
        return None
    return xops


_FLASH = _flash_attn_func()


def _key_name(key: tuple) -> str:
    dev, dtype, d, windowed = key
    return f"{dev} {str(dtype).replace('torch.', '')} d{d}{' window' if windowed else ''}"


def used_backends() -> dict[str, str]:
    """What each kind of attention call ran on so far, e.g. ``{'cuda bfloat16 d64 window': 'sdpa:EFFICIENT_ATTENTION'}``.

    Calls traced into a torch.compile graph appear as ``'<kind> compiled'`` (their backend as
    chosen at trace time; ``sdpa:compiler`` when inductor picks the SDPA kernel itself)."""
    rep = {_key_name(k): name for k, name in _resolved.items()}
    rep.update({_key_name(k) + " compiled": name for k, name in _compiled_resolved.items()})
    rep.update({_key_name(k) + " packed": name for k, name in _resolved_packed.items()})
    return rep


def _record(key: tuple, name: str) -> None:
    if _resolved.get(key) != name:
        _resolved[key] = name
        log.info("attention backend for %s calls: %s", _key_name(key), name)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        window: int | None = None) -> torch.Tensor:
    """Readable math path in the input dtype's fp32 upcast: softmax(q k^T / sqrt(D)) v."""
    qf, kf, vf = (t.transpose(1, 2).float() for t in (q, k, v))     # [B, H, N, D]
    s = qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if window is not None:
        s = s.masked_fill(~band_mask(q.shape[1], k.shape[1], window, q.device), float("-inf"))
    return (s.softmax(-1) @ vf).transpose(1, 2).to(q.dtype)


def band_mask(nq: int, nk: int, window: int, device) -> torch.Tensor:
    """Boolean ``[nq, nk]``: True where ``|i - j| <= window`` (keys that may be attended)."""
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    return (i - j).abs() <= window


def _cached_band_mask(nq, nk, window, device):
    if torch.compiler.is_compiling():
        return band_mask(nq, nk, window, device)
    key = ("band", nq, nk, window, str(device))
    if key not in _masks:
        _masks[key] = band_mask(nq, nk, window, device)
    return _masks[key]


def _check(q, k, v, window):
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention expects q [B, Nq, H, D] and k, v [B, Nk, H, D] with the same B, H, D; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if window is not None and window < 0:
        raise ValueError(f"attention: window must be >= 0 (half width in tokens), got {window}")


def compute_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.dtype:
    """The one dtype attention runs in when q, k, v differ.

    Why: from torch 2.12 CUDA autocast runs ``rms_norm`` in fp32, so a QK-norm hands fp32 q/k next
    to a bf16 v. Under autocast the autocast dtype wins (what the surrounding GEMMs use); outside
    it the lowest-precision floating dtype of the three (v's on a fp16/bf16 tie), never an upcast
    that would silently push every kernel onto the slow fp32 path.
    """
    if q.dtype == k.dtype == v.dtype:
        return q.dtype
    dev = q.device.type
    if dev in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    dtypes = [t.dtype for t in (v, q, k)]          # v first: it wins ties
    if not all(d.is_floating_point for d in dtypes):
        raise ValueError(f"attention expects floating q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}")
    return min(dtypes, key=lambda d: torch.finfo(d).bits)


def _unify_dtypes(q, k, v):
    dt = compute_dtype(q, k, v)
    return q.to(dt), k.to(dt), v.to(dt)


# Training turns this off (model.attn_allow_dense_fallback=false): a windowed call whose
# FlexAttention fails then raises instead of running a dense band-masked SDPA that does 32-64x
# the work of the local layers. Benchmarks and tests keep the forgiving default.
_allow_dense_fallback = True


def set_dense_fallback(allowed: bool) -> None:
    """Allow (True) or forbid (False) the flex -> dense band-mask SDPA fallback of ``auto``."""
    global _allow_dense_fallback
    _allow_dense_fallback = bool(allowed)


_compiled_resolved: dict[tuple, str] = {}   # call kind -> backend traced into a compiled graph


@torch.compiler.assume_constant_result
def _note_compiled(dev: str, dtype: torch.dtype, d: int, windowed: bool, name: str) -> bool:
    """Called while dynamo traces: records which backend a compiled graph holds. Dynamo runs a
    constant-result function once at trace time and bakes in its result, so this costs nothing
    per call and adds no graph break."""
    _compiled_resolved[(dev, dtype, d, windowed)] = name
    return True


def _sdpa(q, k, v, window, key):
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    mask = _cached_band_mask(q.shape[1], k.shape[1], window, q.device) if window is not None else None
    if torch.compiler.is_compiling():
        # Inside a compiled graph the probing try/except cannot be traced: use the choice made
        # by an eager call if there was one, otherwise let the compiler pick its kernel.
        choice = _sdpa_choice.get(key)
        _note_compiled(*key, "sdpa:compiler" if choice is None else f"sdpa:{choice.name}")
        if choice is None:
            return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)
        with sdpa_kernel([choice]):
            return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)
    choice = _timed_sdpa_choice(qt, kt, vt, mask, key) or _sdpa_choice.get(key)   # timed: CUDA only
    if choice is not None:
        with sdpa_kernel([choice]):
            return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)
    errors = []
    for b in (_SDPA_ORDER_MASKED if mask is not None else _SDPA_ORDER):
        try:
            with sdpa_kernel([b]):
                out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
        except RuntimeError as e:   # "No available kernel": this kernel rejects the call
            errors.append(f"{b.name}: {str(e).splitlines()[0]}")
            continue
        _sdpa_choice[key] = b
        _record(key, f"sdpa:{b.name}")
        return out.transpose(1, 2)
    raise RuntimeError("no scaled_dot_product_attention kernel accepted the call:\n  " + "\n  ".join(errors))


_flex_compiled = None


def _flex(q, k, v, window, key):
    """FlexAttention with a sliding-window block mask (all keys when ``window`` is None)."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    nq, nk = q.shape[1], k.shape[1]
    w = nk if window is None else window

    def window_mod(b, h, qi, ki):
        return (qi - ki).abs() <= w

    mkey = ("flex", nq, nk, w, str(q.device))
    block_mask = None if torch.compiler.is_compiling() else _masks.get(mkey)
    if block_mask is None:
        block_mask = create_block_mask(window_mod, None, None, nq, nk, device=q.device)
        if not torch.compiler.is_compiling():
            _masks[mkey] = block_mask
    fn = flex_attention
    if q.is_cuda and not torch.compiler.is_compiling():   # eager flex is a slow reference: compile it once
        if _flex_compiled is None:
            _flex_compiled = torch.compile(flex_attention, dynamic=False)
        fn = _flex_compiled
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
    if torch.compiler.is_compiling():
        _note_compiled(*key, "flex")
    else:
        _record(key, "flex")
    return out.transpose(1, 2)


def _xformers(q, k, v, window, key):
    xops = _xformers_ops()
    if xops is None:
        raise RuntimeError("attention backend 'xformers' was chosen but xformers is not installed; "
                           "pip install xformers, or choose backend 'auto'")
    bias = None
    if window is not None:
        from xformers.ops.fmha.attn_bias import LocalAttentionFromBottomRightMask  # type: ignore
        bias = LocalAttentionFromBottomRightMask(window_left=window, window_right=window)
    _record(key, "xformers")
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias)


def _auto_windowed(q, k, v, window, key):
    """``auto`` for a windowed call without flash-attn: flex, or (if allowed) dense SDPA for good."""
    if torch.compiler.is_compiling() or _resolved.get(key) == "flex":
        return _flex(q, k, v, window, key)
    try:   # first windowed call: prove flex works here, else fall back for good
        return _flex(q, k, v, window, key)
    except Exception as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if not _allow_dense_fallback:
            raise RuntimeError(
                f"FlexAttention failed for windowed {_key_name(key)} attention ({why}); the dense "
                f"band-mask fallback would do 32-64x the local layers' work. Fix the flex error, or "
                f"set model.attn_allow_dense_fallback=true to accept the slow path") from e
        _flex_failed[key] = why
        log.warning("flex attention unavailable for %s (%s); using sdpa with a band mask",
                    _key_name(key), why)
    return _sdpa(q, k, v, window, key)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None,
              backend: Backend = "auto") -> torch.Tensor:
    """Scaled dot-product attention (no causal mask, scale 1/sqrt(D)) on ``[B, N, H, D]`` inputs."""
    _check(q, k, v, window)
    if not (q.dtype == k.dtype == v.dtype):
        q, k, v = _unify_dtypes(q, k, v)
    key = (q.device.type, q.dtype, q.shape[-1], window is not None)
    if backend == "auto":
        if _FLASH is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            backend = "flash_attn"
        elif window is not None and q.is_cuda and key not in _flex_failed:
            return _auto_windowed(q, k, v, window, key)
        else:
            backend = "sdpa"
    if backend == "flash_attn":
        if torch.compiler.is_compiling():
            _note_compiled(*key, "flash_attn")
        if _FLASH is None:
            raise RuntimeError("attention backend 'flash_attn' was chosen but flash-attn is not importable; "
                               "pip install flash-attn, or choose backend 'auto'")
        if not torch.compiler.is_compiling():
            _record(key, "flash_attn")
        ws = (window, window) if window is not None else (-1, -1)
        return _FLASH(q, k, v, window_size=ws)
    if backend == "sdpa":
        return _sdpa(q, k, v, window, key)
    if backend == "flex":
        return _flex(q, k, v, window, key)
    if backend == "xformers":
        return _xformers(q, k, v, window, key)
    if backend == "math":
        if torch.compiler.is_compiling():
            _note_compiled(*key, "math")
        else:
            _record(key, "math")
        return attention_reference(q, k, v, window)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


# --------------------------------------------------------------------------- packed sequences
# Stage 2 runs the student encoder over two mask sets with different visible counts; packing
# both sets' sequences back to back on one token axis turns two passes into one (every op but
# attention is per token). Attention must then stay inside each sequence: block-diagonal.
class Segments:
    """Sequences packed back to back on the token axis of a ``[1, L, ...]`` tensor.

    ``runs`` lists ``(count, length)`` pairs: ``count`` sequences of ``length`` tokens each, in
    order (stage 2: ``(B, num_cls + K0), (B, num_cls + K1)``). The lengths are host ints (from
    tensor shapes), so nothing here copies to or syncs with the device; the device tensors
    (``cu_seqlens``, ``seq_ids``) are made with ``arange`` on first use and kept for the pass."""

    def __init__(self, runs, device):
        if not runs or any(c < 1 or n < 1 for c, n in runs):
            raise ValueError(f"packed segments need (count >= 1, length >= 1) runs, got {runs}")
        self.runs, self.device = tuple((c, n) for c, n in runs), torch.device(device)
        self.total = sum(c * n for c, n in self.runs)
        self.num_seqs = sum(c for c, _ in self.runs)
        self.max_len = max(n for _, n in self.runs)
        self._cu = self._ids = None

    def sizes(self) -> list:
        """Tokens per run (what ``torch.split`` of the packed axis into runs needs)."""
        return [c * n for c, n in self.runs]

    def cu_seqlens(self) -> torch.Tensor:
        """int32 ``[num_seqs + 1]`` sequence starts and the end (flash-attn's varlen layout)."""
        if self._cu is None:
            parts, off = [torch.zeros(1, dtype=torch.int32, device=self.device)], 0
            for c, n in self.runs:
                parts.append(off + n * torch.arange(1, c + 1, dtype=torch.int32, device=self.device))
                off += c * n
            self._cu = torch.cat(parts)
        return self._cu

    def seq_ids(self) -> torch.Tensor:
        """int32 ``[L]``: the sequence index of every packed token (the document of a flex mask)."""
        if self._ids is None:
            parts, base = [], 0
            for c, n in self.runs:
                parts.append(base + torch.arange(c * n, dtype=torch.int32, device=self.device) // n)
                base += c
            self._ids = torch.cat(parts)
        return self._ids


_UNSET = object()
_varlen_found = _UNSET


def _flash_varlen():
    """``(flash_attn_varlen_func, "fa3" | "fa2")`` or None. Imported lazily: only packed stage 2
    needs it. FA3 (``flash_attn_interface``, Hopper) first: FA2 is slower on Hopper than the
    timed cuDNN kernel the per-set loop gets. A compiled graph cannot import: it reads what an
    eager call found (``Stage2Model.pack_sets`` asks first, through ``packing_pays``)."""
    global _varlen_found
    if _varlen_found is _UNSET:
        if torch.compiler.is_compiling():
            return None
        _varlen_found = None
        for mod, name in (("flash_attn_interface", "fa3"), ("flash_attn", "fa2")):
            try:
                _varlen_found = getattr(importlib.import_module(mod), "flash_attn_varlen_func"), name
                break
            except Exception:   # not installed, or built for another torch
                continue
    return _varlen_found


def packing_pays(device: torch.device) -> bool:
    """``model.stage2_pack_sets=auto``: pack only where one varlen kernel is at least as fast as the
    per-set kernels, i.e. on CUDA with FA3, or FA2 before Hopper. On an H100 FA2 runs hd-64
    attention ~30 % slower than cuDNN (timed per set), which costs more (~5 ms/step in stage 2)
    than packing saves (~1-2 ms); see bench/results/train_step_levers_PREDICTED.md."""
    fv = _flash_varlen()           # also resolves the import before any compiled graph needs it
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if fv is None:
        return False
    return fv[1] == "fa3" or torch.cuda.get_device_capability(device) < (9, 0)


_resolved_packed: dict[tuple, str] = {}
VARLEN_DEVICES = ("cuda",)     # where flash_attn_varlen_func runs (tests add "cpu" with a stand-in)


def _record_packed(key: tuple, name: str) -> None:
    if _resolved_packed.get(key) != name:
        _resolved_packed[key] = name
        log.info("attention backend for packed %s calls: %s", _key_name(key), name)


def packed_attention_reference(q, k, v, segments: Segments) -> torch.Tensor:
    """fp32 block-diagonal attention over packed ``[1, L, H, D]`` inputs (test oracle)."""
    ids = segments.seq_ids()
    allowed = ids[:, None] == ids[None, :]
    qf, kf, vf = (t[0].transpose(0, 1).float() for t in (q, k, v))     # [H, L, D]
    s = (qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, float("-inf"))
    return (s.softmax(-1) @ vf).transpose(0, 1).unsqueeze(0).to(q.dtype)


_flex_packed_compiled = None


def _packed_flex(q, k, v, segments: Segments):
    """FlexAttention with a document mask (token i sees token j iff same sequence)."""
    global _flex_packed_compiled
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    ids, L = segments.seq_ids(), q.shape[1]

    def same_sequence(b, h, qi, ki):
        return ids[qi] == ids[ki]

    block_mask = getattr(segments, "_block_mask", None)
    if block_mask is None:     # once per packed pass (the layout changes with every batch)
        block_mask = create_block_mask(same_sequence, None, None, L, L, device=q.device)
        segments._block_mask = block_mask
    fn = flex_attention
    if q.is_cuda and not torch.compiler.is_compiling():
        if _flex_packed_compiled is None:   # dynamic: the packed length changes every batch
            _flex_packed_compiled = torch.compile(flex_attention, dynamic=True)
        fn = _flex_packed_compiled
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
    return out.transpose(1, 2)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, *,
                     backend: Backend = "auto") -> torch.Tensor:
    """Attention within each sequence of packed ``[1, L, H, D]`` inputs; returns ``[1, L, H, D]``.

    * ``flash_attn_varlen_func`` (FA3, else FA2): one kernel over all sequences, for ``auto`` on
      CUDA with fp16/bf16 inputs when importable, and for ``flash_attn``;
    * ``flex``: FlexAttention with a document mask;
    * otherwise ("segments"): one dense :func:`attention` call per run of equal-length
      sequences (the per-set kernels, timed SDPA choice included; exact on CPU).
    """
    if q.dim() != 4 or q.shape[0] != 1 or q.shape[1] != segments.total or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"packed attention expects q, k, v [1, {segments.total}, H, D] (the segments' tokens), "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        q, k, v = _unify_dtypes(q, k, v)
    key = (q.device.type, q.dtype, q.shape[-1], False)
    fv = _flash_varlen() if backend in ("auto", "flash_attn") else None
    if backend == "flash_attn" and fv is None:
        raise RuntimeError("attention backend 'flash_attn' was chosen for packed stage 2 but flash-attn is not "
                           "importable; pip install flash-attn, or choose backend 'auto'")
    if fv is not None and q.device.type in VARLEN_DEVICES and q.dtype in (torch.float16, torch.bfloat16):
        cu = segments.cu_seqlens()
        out = fv[0](q[0], k[0], v[0], cu, cu, segments.max_len, segments.max_len)
        out = out[0] if isinstance(out, tuple) else out      # some FA3 builds also return the LSE
        if not torch.compiler.is_compiling():
            _record_packed(key, f"flash_attn_varlen:{fv[1]}")
        return out.unsqueeze(0)
    if backend == "flex":
        if not torch.compiler.is_compiling():
            _record_packed(key, "flex:document")
        return _packed_flex(q, k, v, segments)
    if not torch.compiler.is_compiling():
        _record_packed(key, "segments")
    outs = []
    for (c, n), qs, ks, vs in zip(segments.runs, *(t.split(segments.sizes(), 1) for t in (q, k, v))):
        # split (not slicing): its backward writes the gradient in one concatenation
        o = attention(*(t.reshape(c, n, *t.shape[2:]) for t in (qs, ks, vs)), backend=backend)
        outs.append(o.reshape(1, c * n, *o.shape[2:]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


# --------------------------------------------------------------------------- SDPA backend by timing
# "First that runs" would keep FLASH (FA2) for every unmasked call and never try cuDNN attention
# (FA3-class on Hopper). On CUDA, eager calls instead time every SDPA kernel that accepts the
# call, once per (kind, shape bucket), forward + backward when the inputs need gradients, check
# each against an fp32 math reference on a slice, and keep the fastest that passes. The first
# winner of a call kind is also what compiled graphs pin (``_sdpa_choice``). Timing syncs the
# GPU, but only for new buckets.
TIMED_CANDIDATES = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
_timed_choice: dict[tuple, SDPBackend] = {}
_timings: dict[tuple, dict[str, float]] = {}   # bucket -> {backend: ms, or "rejected: why"}


_kernel_timing = True


def set_kernel_timing(enabled: bool) -> None:
    """Time the SDPA kernels once per shape bucket (True, the default; CUDA only) or take the
    first kernel that runs (False): fake tensors, as the GPU-free rehearsal runs, cannot be timed."""
    global _kernel_timing
    _kernel_timing = bool(enabled)


def _timing_device_ok(t: torch.Tensor) -> bool:
    return _kernel_timing and t.is_cuda


def _bucket(n: int) -> int:
    """Sequence lengths rounded up to a power of two: stage 2's visible count changes every batch."""
    return 1 << max(0, (n - 1).bit_length())


def _cuda_timer(fn, reps: int = 3) -> float:
    """Milliseconds per call of ``fn`` on the current CUDA stream (one warm-up call)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def pick_fastest(run, candidates, check, timer) -> tuple[object, dict]:
    """The fastest of ``candidates`` whose ``run(b)`` works and passes ``check(b, out)``.

    ``run(b)`` returns the output (raising RuntimeError if the kernel rejects the call),
    ``check(b, out)`` returns None when the numerics are fine or a reason, ``timer(fn)`` returns
    milliseconds. Returns ``(best or None, {name: ms or 'rejected: ...'})``."""
    report, best, best_ms = {}, None, float("inf")
    for b in candidates:
        name = getattr(b, "name", str(b))
        try:
            out = run(b)
        except RuntimeError as e:
            report[name] = f"rejected: {str(e).splitlines()[0][:120]}"
            continue
        bad = check(b, out)
        if bad:
            report[name] = f"rejected: {bad}"
            continue
        ms = timer(lambda: run(b))
        report[name] = ms
        if ms < best_ms:
            best, best_ms = b, ms
    return best, report


def _timed_sdpa_choice(qt, kt, vt, mask, key):
    """The timed SDPA kernel for this call ([B, H, N, D] inputs), or None (then: first that runs)."""
    if not _timing_device_ok(qt):
        return None
    bkey = (key, qt.shape[0], qt.shape[1], _bucket(qt.shape[2]), _bucket(kt.shape[2]))
    if bkey in _timed_choice:
        return _timed_choice[bkey]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (qt, kt, vt))
    # fp32 math reference on one clip, two heads and <= 128 queries (rows are independent)
    sl = (slice(0, 1), slice(0, 2), slice(0, 128))
    m_sl = None if mask is None else mask[..., :128, :]
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(qt[sl].float(), kt[:1, :2].float(), vt[:1, :2].float(), attn_mask=m_sl)
    tol = 2e-2 if qt.dtype in (torch.bfloat16, torch.float16) else 1e-4
    cands = [b for b in TIMED_CANDIDATES if mask is None or b != SDPBackend.FLASH_ATTENTION]
    leaves = [t.detach().requires_grad_(grad) for t in (qt, kt, vt)]

    def run(b):
        # identity saved-tensor hooks on top of the stack: a checkpointed caller's hooks must
        # not capture this throw-away graph
        with sdpa_kernel([b]), (torch.enable_grad() if grad else torch.no_grad()), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            out = F.scaled_dot_product_attention(*leaves, attn_mask=mask)
            if grad:
                out.backward(torch.ones_like(out))
        return out.detach()

    def check(b, out):
        err = (out[sl].float() - ref).abs().max().item()
        return None if err <= tol * max(1.0, ref.abs().max().item()) else f"max error {err:.3g} > {tol}"

    best, report = pick_fastest(run, cands, check, lambda fn: _cuda_timer(fn))
    _timings[bkey] = report
    if best is None:
        return None
    _timed_choice[bkey] = best
    _sdpa_choice.setdefault(key, best)
    _record(key, f"sdpa:{best.name}")
    log.info("attention %s B%d H%d N<=%d: timed %s -> %s", _key_name(key), bkey[1], bkey[2], bkey[3],
             {k: (round(v, 3) if isinstance(v, float) else v) for k, v in report.items()}, best.name)
    return best


def timed_report() -> dict:
    """Per shape bucket, each SDPA kernel's milliseconds (or why it was rejected): for benchmarks."""
    return {f"{_key_name(k[0])} B{k[1]} H{k[2]} N{k[3]}x{k[4]}": v for k, v in _timings.items()}


def flex_failures() -> dict[str, str]:
    """Per call kind, why FlexAttention could not run (``auto`` then used dense SDPA): for reports."""
    return {_key_name(k): why for k, why in _flex_failed.items()}


def reset() -> None:
    """Forget every backend choice, timing, failure and cached mask, as in a fresh process (a
    benchmark that builds several models in one process starts each from the same state)."""
    for cache in (_resolved, _sdpa_choice, _flex_failed, _masks, _compiled_resolved, _resolved_packed,
                  _timed_choice, _timings):
        cache.clear()
