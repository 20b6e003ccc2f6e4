"""Per-patch conditional diffusion decoder of stage 1 (MAR ``SimpleMLPAdaLN`` style).

Three parts, each readable on its own:

* :class:`DiffusionDecoder` -- the MLP ``eps_theta(x_t, t, z)``: noisy patch -> Linear -> W,
  sinusoidal timestep embedding -> MLP -> W, condition z -> Linear -> W, ``c = t_emb + z_emb``;
  ``depth`` residual blocks ``x + gate * Linear(SiLU(Linear(LN(x) * (1 + scale) + shift)))``
  with ``(shift, scale, gate) = Linear(SiLU(c))`` per block; final non-affine LN + adaLN +
  Linear to ``target_dim`` (``2 * target_dim`` with a learned variance). Parameter names follow
  MAR / the released code, so their state dicts map one to one.
  ``impl`` picks ``eager`` (this file), ``compile`` (torch.compile of it) or ``triton``
  (``ivfast.kernels.diffusion_mlp``: same parameters, fused kernels).
* :class:`GaussianDiffusion` -- improved DDPM (Nichol & Dhariwal 2021): cosine / linear betas,
  q_sample, posterior, learned-range variance, eps-MSE + VLB loss, timestep respacing and the
  ancestral sampler. All tables are built once in float64 and kept as float32 torch tensors per
  device, so a training step does no numpy work and no host-device sync.
* :class:`DiffusionLoss` -- what the stage-1 model calls: ``loss(target, z)`` on masked patches,
  ``sample(z)`` for reconstructions.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ivfast.config import DecoderConfig

__all__ = [
    "DiffusionDecoder", "GaussianDiffusion", "DiffusionLoss", "decoder_flops", "decoder_autocast",
    "timestep_embedding", "cosine_betas", "linear_betas", "space_timesteps",
]

LN_EPS = 1e-6          # every LayerNorm of the decoder (MAR / released code)
FREQ_DIM = 256         # sinusoidal timestep features fed to the time MLP (MAR)


# =========================================================================== the MLP
def timestep_embedding(t: Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of (possibly fractional) timesteps ``t[N]`` -> ``[N, dim]`` fp32.

    Layout ``[cos(t f_0..f_{h-1}), sin(t f_0..f_{h-1})]`` with ``f_i = max_period^(-i/h)`` (MAR/DiT).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int = FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(t, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """``x + gate * MLP(LN(x) * (1 + scale) + shift)``, adaLN = SiLU -> Linear(W, 3W)."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=-1)
        h = modulate(self.in_ln(x), shift, scale)
        return x + gate * self.mlp(h)


class FinalLayer(nn.Module):
    """Non-affine LN, adaLN (shift, scale) = SiLU -> Linear(W, 2W), Linear(W, out)."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def _triton_runnable(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton path can run on ``device`` here, and if not, why."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - triton is a dependency
        return False, f"triton is not importable ({e})"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, ""
    return False, (f"tensors are on {device.type} and TRITON_INTERPRET is not set "
                   "(Triton needs a CUDA GPU, or TRITON_INTERPRET=1 before triton is imported "
                   "to run the kernels slowly on CPU)")


class DiffusionDecoder(nn.Module):
    """The per-patch denoiser ``eps_theta(x_t, t, z)`` (see module docstring).

    ``forward(x[R, target_dim], t[R], z[R, cond_dim]) -> [R, out_dim]`` with
    ``out_dim = 2 * target_dim`` when ``learn_sigma`` (eps, then the variance interpolation v).
    ``t`` holds the ORIGINAL (1000-step) timesteps, also when a respaced sampler drives it.

    ``dtype`` (constructor argument and attribute) is the compute precision, for every ``impl``:
    ``"auto"`` (the constructor's default; no config sets it): the autocast dtype when autocast is
    on, else the parameters' dtype, which the kernel tests use to run the module in fp16 and under
    autocast; ``"bf16"``: bfloat16 whatever autocast says (the fast path);
    ``"fp32"``: float32 with autocast off and TF32 off for the decoder's matmuls (the released
    code's fp32 decoder). Parameters stay as they are (fp32 masters); the output is in the
    compute dtype.
    """

    DTYPES = ("auto", "bf16", "fp32")

    _compiled_reference: Callable | None = None   # torch.compile of forward_reference, shared

    def __init__(self, target_dim: int = 588, cond_dim: int = 1024, width: int = 1536,
                 depth: int = 6, learn_sigma: bool = True, impl: str = "eager", dtype: str = "auto"):
        super().__init__()
        if impl not in ("eager", "compile", "triton"):
            raise ValueError(f"DiffusionDecoder impl={impl!r}: choose 'eager', 'compile' or 'triton'")
        self.target_dim, self.cond_dim, self.width, self.depth = target_dim, cond_dim, width, depth
        self.out_dim = 2 * target_dim if learn_sigma else target_dim
        self.impl = impl
        self.dtype = dtype           # compute precision, see compute_dtype(); settable after construction
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(target_dim, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, self.out_dim)
        self._warned = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAR init: xavier Linear, zero biases, N(0, 0.02) time MLP, zero adaLN and final Linear."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for blk in self.res_blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _check(self, x: Tensor, t: Tensor, z: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.target_dim:
            raise ValueError(f"DiffusionDecoder: x must be [rows, {self.target_dim}], got {tuple(x.shape)}")
        if z.dim() != 2 or z.shape[1] != self.cond_dim:
            raise ValueError(f"DiffusionDecoder: z must be [rows, {self.cond_dim}] (predictor width), "
                             f"got {tuple(z.shape)}")
        if t.shape != (x.shape[0],) or z.shape[0] != x.shape[0]:
            raise ValueError(f"DiffusionDecoder: rows disagree: x {tuple(x.shape)}, t {tuple(t.shape)}, "
                             f"z {tuple(z.shape)}; give one timestep and one condition per row")

    def forward_reference(self, x: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """Plain PyTorch (the 'eager' implementation and the kernels' reference)."""
        h = self.input_proj(x)
        c = self.time_embed(t) + self.cond_embed(z)
        for blk in self.res_blocks:
            h = blk(h, c)
        return self.final_layer(h, c)

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the decoder computes in on ``device`` (see the class docstring)."""
        if self.dtype not in self.DTYPES:
            raise ValueError(f"DiffusionDecoder dtype={self.dtype!r}: choose one of {self.DTYPES} "
                             "(model.decoder.dtype)")
        if self.dtype == "fp32":
            return torch.float32
        if self.dtype == "bf16":
            return torch.bfloat16
        dev = device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.input_proj.weight.dtype

    def forward_triton(self, x: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """Same maths on ``ivfast.kernels.diffusion_mlp`` (cuBLAS GEMMs + Triton row kernels).

        Everything runs in :meth:`compute_dtype` (weights cast once per call, their gradients flow
        back to the fp32 parameters through the cast). The input (588) and output (1176) widths
        are zero-padded to multiples of 8 so every GEMM row is 16-byte aligned; the padding costs
        about 1 % more FLOPs in those two layers and nothing anywhere else. It sets its precision
        without touching global state (explicit casts, autocast off, the ops' ``ieee`` flag for
        dtype fp32, which holds for their backward too), so torch.compile traces it whole.
        """
        from ivfast.kernels import diffusion_mlp as K
        dev = x.device.type
        dt = self.compute_dtype(x.device)
        ieee = self.dtype == "fp32"
        with torch.autocast(dev, enabled=False):
            cast = lambda p: p.to(dt)
            te = timestep_embedding(t, self.time_embed.freq_dim).to(dt)
            tm = self.time_embed.mlp
            te = K.linear(K.linear(te, cast(tm[0].weight), cast(tm[0].bias), act="silu", ieee=ieee),
                          cast(tm[2].weight), cast(tm[2].bias), ieee=ieee)
            c = te + K.linear(z.to(dt), cast(self.cond_embed.weight), cast(self.cond_embed.bias), ieee=ieee)
            pad_in = _pad8(self.target_dim)
            w_in = cast(self.input_proj.weight)
            xin = x.to(dt)
            if pad_in:           # zero columns in both operands: the same product, aligned rows
                w_in, xin = F.pad(w_in, (0, pad_in)), F.pad(xin, (0, pad_in))
            h = K.linear(xin, w_in, cast(self.input_proj.bias), ieee=ieee)
            adas = [blk.adaLN_modulation[1] for blk in self.res_blocks] + [self.final_layer.adaLN_modulation[1]]
            blocks = [(cast(b.in_ln.weight), cast(b.in_ln.bias), cast(b.mlp[0].weight), cast(b.mlp[0].bias),
                       cast(b.mlp[2].weight), cast(b.mlp[2].bias)) for b in self.res_blocks]
            pad_out = _pad8(self.out_dim)
            w_out, b_out = cast(self.final_layer.linear.weight), cast(self.final_layer.linear.bias)
            if pad_out:          # zero output rows, sliced off below (their gradient is dropped)
                w_out, b_out = F.pad(w_out, (0, 0, 0, pad_out)), F.pad(b_out, (0, pad_out))
            # cast each block's weights, then concatenate: no full-size fp32 copy per call
            out = K.adaln_trunk(h, c, torch.cat([cast(a.weight) for a in adas]),
                                torch.cat([cast(a.bias) for a in adas]), blocks, w_out, b_out, eps=LN_EPS,
                                ieee=ieee)
            return out[:, :self.out_dim] if pad_out else out

    def _forward_eager(self, x: Tensor, t: Tensor, z: Tensor) -> Tensor:
        if self.impl == "compile":
            # compile the unbound function and pass self: a deepcopy of this module must not
            # keep calling the original's weights through a bound method
            if DiffusionDecoder._compiled_reference is None:
                DiffusionDecoder._compiled_reference = torch.compile(DiffusionDecoder.forward_reference)
            return DiffusionDecoder._compiled_reference(self, x, t, z)
        return self.forward_reference(x, t, z)

    @torch.compiler.disable   # flips autocast / TF32 state, and hooks autograd nodes: not traceable
    def _forward_eager_with_precision(self, x: Tensor, t: Tensor, z: Tensor) -> Tensor:
        with decoder_precision(self.dtype, x.device):
            if self.dtype != "fp32":
                return self._forward_eager(x, t, z)
            x, z = x.float(), z.float()      # fp32 maths on fp32 inputs (autocast is off)
            first = torch._C._autograd._get_sequence_nr()
            out = self._forward_eager(x, t, z)
            if out.grad_fn is not None:
                _tf32_off_in_backward(out.grad_fn, first, torch._C._autograd._get_sequence_nr())
            return out

    def forward(self, x: Tensor, t: Tensor, z: Tensor) -> Tensor:
        self._check(x, t, z)
        if self.dtype not in self.DTYPES:
            raise ValueError(f"DiffusionDecoder dtype={self.dtype!r}: choose one of {self.DTYPES} "
                             "(model.decoder.dtype)")
        if self.impl == "triton":
            ok, why = _triton_runnable(x.device)
            if ok:
                return self.forward_triton(x, t, z)     # sets its own precision, traceable
            if not self._warned:
                warnings.warn(f"DiffusionDecoder impl='triton' falls back to eager PyTorch: {why}",
                              stacklevel=2)
                self._warned = True
        if self.dtype == "auto":    # the default: no state to switch, nothing hidden from torch.compile
            return self._forward_eager(x, t, z)
        return self._forward_eager_with_precision(x, t, z)


class _TF32Off:
    """TF32 off while at least one of the autograd nodes it hooks runs (a count, because the
    engine runs CPU and CUDA nodes on different threads); the setting before is restored after."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running = 0
        self._old = None

    def enter(self, *_) -> None:
        with self._lock:
            if self._running == 0:
                self._old = _set_tf32(False)
            self._running += 1

    def exit(self, *_) -> None:
        with self._lock:
            self._running -= 1
            if self._running == 0:
                _set_tf32(self._old)


def _tf32_off_in_backward(root, first: int, end: int) -> None:
    """Hook every autograd node of ``root``'s graph created in [first, end) (autograd's sequence
    numbers, per thread, in creation order) so that its backward runs with TF32 off.

    ``decoder_precision`` turns TF32 off only while the forward runs; autograd runs the backward
    later, under the global setting (TF32 on in training). Hooks on the region's own nodes scope
    exactly its backward GEMMs, and the rest of the backward keeps the global setting."""
    scope = _TF32Off()
    seen, todo = set(), [root]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if not first <= node._sequence_nr() < end:   # made before the region, or a leaf's accumulator
            continue
        node.register_prehook(scope.enter)
        node.register_hook(scope.exit)
        todo.extend(n for n, _ in node.next_functions)


def _pad8(n: int) -> int:
    """Zero columns that bring a GEMM dimension of ``n`` to a multiple of 8 (16 bytes in bf16)."""
    return -n % 8


def decoder_autocast(mode: str, device: torch.device):
    """The autocast half of :class:`decoder_precision`, for the code around a decoder call (the
    diffusion loss maths): ``"fp32"`` off, ``"bf16"`` on, ``"auto"`` unchanged. It switches no
    global TF32 state, so torch.compile traces it; the decoder keeps its own GEMMs off TF32."""
    if mode == "fp32":
        return torch.autocast(device.type, enabled=False)
    if mode == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class decoder_precision:
    """Context of a decoder call: ``"fp32"`` turns autocast and TF32 off (restored on exit);
    ``"bf16"`` turns bf16 autocast on (the eager/compile impls follow it; the Triton impl casts
    itself); ``"auto"`` changes nothing."""

    def __init__(self, mode: str, device: torch.device):
        self.mode, self.dev = mode, device.type
        self._ctx = None
        self._tf32 = None

    def __enter__(self):
        if self.mode == "fp32":
            self._ctx = torch.autocast(self.dev, enabled=False)
            self._tf32 = (_set_tf32(False),)
        elif self.mode == "bf16":
            self._ctx = torch.autocast(self.dev, dtype=torch.bfloat16)
        if self._ctx is not None:
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        if self._tf32 is not None:
            _set_tf32(self._tf32[0])
        return False


def _set_tf32(on: bool):
    """Set whether fp32 CUDA matmuls may use TF32; returns the previous raw setting, which
    ``_set_tf32`` also accepts to restore it. Uses the newer ``fp32_precision`` API where it
    exists (reading the legacy flag raises once it was set)."""
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        old = m.fp32_precision
        m.fp32_precision = on if isinstance(on, str) else ("tf32" if on else "ieee")
    else:                       # torch before the fp32_precision API
        old = m.allow_tf32
        m.allow_tf32 = bool(on)
    return old


def decoder_flops(rows: int, cfg: DecoderConfig, target_dim: int = 588, cond_dim: int = 1024) -> int:
    """Analytic FORWARD FLOPs (2*M*N*K per GEMM) of the decoder MLP.

    ``rows`` = rows given to :meth:`DiffusionLoss.forward` (masked patches); the
    ``cfg.batch_mul`` repetition is included here. Backward is about 2x this.
    Elementwise work (LN, modulate, SiLU, gate) is not counted, as usual for MFU.
    """
    m = rows * cfg.batch_mul
    w, d = cfg.width, cfg.depth
    out = 2 * target_dim if cfg.learn_sigma else target_dim
    gemm_nk = (target_dim * w                 # input_proj
               + FREQ_DIM * w + w * w         # time MLP
               + cond_dim * w                 # cond_embed
               + d * (3 * w * w + 2 * w * w)  # per block: adaLN + two MLP linears
               + 2 * w * w + w * out)         # final adaLN + final linear
    return 2 * m * gemm_nk


# =========================================================================== diffusion maths
def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Improved-DDPM cosine schedule: ``beta_t = min(1 - abar(t+1)/abar(t), max_beta)``,
    ``abar(u) = cos((u/T + s) / (1 + s) * pi/2)^2``. float64."""
    u = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    abar = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return torch.clamp(1 - abar[1:] / abar[:-1], max=max_beta)


def linear_betas(num_steps: int) -> Tensor:
    """DDPM linear schedule, scaled so any ``num_steps`` matches the 1000-step one. float64."""
    scale = 1000.0 / num_steps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)


def space_timesteps(num_steps: int, section_counts: int | list[int]) -> list[int]:
    """Improved-DDPM respacing: split ``[0, num_steps)`` into equal sections and take
    ``section_counts[i]`` evenly strided steps (rounded) from section i. Sorted list."""
    counts = [section_counts] if isinstance(section_counts, int) else list(section_counts)
    size_per, extra = divmod(num_steps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"space_timesteps: cannot take {count} steps from a section of {size} "
                             f"(num_steps={num_steps}); use 1 <= steps <= {size}")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        cur = 0.0
        for _ in range(count):        # accumulate like the original, so rounding matches it
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-likelihood of ``x`` under a Gaussian discretised into 8-bit bins of [-1, 1] (nats),
    as improved DDPM's decoder term at t = 0 (applied to any target, like MAR)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """Improved-DDPM Gaussian diffusion with eps prediction and (optional) learned-range variance.

    Built from float64 ``betas``; per-step tables are float32 tensors cached per device, so
    ``training_losses`` and ``sample`` run on the data's device without numpy or syncs.
    ``timestep_map[i]`` is the original timestep of step i (identity unless respaced); the model
    always sees original timesteps.
    """

    def __init__(self, betas: Tensor, learn_sigma: bool = True, timestep_map: Tensor | None = None):
        b = betas.to(torch.float64).flatten()
        if b.numel() < 1:
            raise ValueError("GaussianDiffusion: betas must be a non-empty 1-D tensor in (0, 1]")
        # an assert that reads no value on the host: it raises at once on CPU and costs nothing
        # on fake tensors (the GPU-free rehearsal builds the model on them)
        torch._assert_async(((b > 0) & (b <= 1)).all(), "GaussianDiffusion: betas must lie in (0, 1]")
        self.num_timesteps = int(b.numel())
        self.learn_sigma = learn_sigma
        ac = torch.cumprod(1.0 - b, 0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        # posterior variance is 0 at t = 0: clip the log to the next value (improved DDPM)
        post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]])) if b.numel() > 1 \
            else torch.log(b.clone())
        self.betas = b
        self.alphas_cumprod = ac
        tables64 = dict(
            sqrt_ac=ac.sqrt(), sqrt_1m_ac=(1.0 - ac).sqrt(),
            sqrt_recip_ac=(1.0 / ac).sqrt(), sqrt_recipm1_ac=(1.0 / ac - 1.0).sqrt(),
            post_logvar=post_logvar, log_betas=b.log(),
            post_c1=b * ac_prev.sqrt() / (1.0 - ac),
            post_c2=(1.0 - ac_prev) * (1.0 - b).sqrt() / (1.0 - ac),
        )
        self._tables64 = tables64
        self.timestep_map = (torch.arange(self.num_timesteps) if timestep_map is None
                             else timestep_map.to(torch.long))
        self._cache: dict[torch.device, dict[str, Tensor]] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, schedule: str, num_steps: int, learn_sigma: bool = True) -> "GaussianDiffusion":
        if schedule == "cosine":
            betas = cosine_betas(num_steps)
        elif schedule == "linear":
            betas = linear_betas(num_steps)
        else:
            raise ValueError(f"noise schedule {schedule!r} unknown; choose 'cosine' or 'linear'")
        return cls(betas, learn_sigma)

    def respace(self, steps: int | list[int]) -> "GaussianDiffusion":
        """A diffusion over a subset of timesteps with betas chosen so that its alphas_cumprod
        equal the originals at the kept steps (improved DDPM ``SpacedDiffusion``)."""
        keep = space_timesteps(self.num_timesteps, steps)
        ac = self.alphas_cumprod
        kept_ac = ac[keep]
        prev = torch.cat([kept_ac.new_ones(1), kept_ac[:-1]])
        return GaussianDiffusion(1.0 - kept_ac / prev, self.learn_sigma,
                                 self.timestep_map[torch.tensor(keep)])

    def tables(self, device: torch.device) -> dict[str, Tensor]:
        device = torch.device(device)
        if device not in self._cache:
            t = {k: v.to(torch.float32).to(device) for k, v in self._tables64.items()}
            t["timestep_map"] = self.timestep_map.to(device)
            self._cache[device] = t
        return self._cache[device]

    @staticmethod
    def _at(table: Tensor, t: Tensor) -> Tensor:
        return table[t].unsqueeze(-1)      # [N] -> [N, 1], broadcast over the patch values

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        tb = self.tables(x0.device)
        return self._at(tb["sqrt_ac"], t) * x0 + self._at(tb["sqrt_1m_ac"], t) * noise

    def q_posterior_mean_variance(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        tb = self.tables(xt.device)
        mean = self._at(tb["post_c1"], t) * x0 + self._at(tb["post_c2"], t) * xt
        return mean, self._at(tb["post_logvar"], t).expand_as(xt)

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(self, model_out: Tensor, xt: Tensor, t: Tensor, clip: float = 0.0) -> dict[str, Tensor]:
        """Mean / log-variance of p(x_{t-1} | x_t) from the model output (fp32 maths).

        ``clip > 0`` clamps the predicted x_0 to [-clip, clip] first (improved DDPM's
        ``clip_denoised``). Near t = T of the cosine schedule x_0 = (x_t - sqrt(1 - abar) eps) /
        sqrt(abar) multiplies eps errors by up to ~2e4, so a clamp to the data's known range keeps
        an imperfect model's first steps in range; the released code samples without it.
        """
        tb = self.tables(xt.device)
        model_out = model_out.float()
        c = xt.shape[1]
        if self.learn_sigma:
            if model_out.shape[1] != 2 * c:
                raise ValueError(f"learn_sigma needs a model output of width {2 * c}, got {model_out.shape[1]}")
            eps, v = model_out[:, :c], model_out[:, c:]
            lo, hi = self._at(tb["post_logvar"], t), self._at(tb["log_betas"], t)
            frac = (v + 1.0) / 2.0            # learned range: interpolate the two log-variances
            logvar = frac * hi + (1.0 - frac) * lo
        else:                                  # fixed-large variance, as improved DDPM's default
            eps = model_out
            big = torch.cat([tb["post_logvar"][1:2], tb["log_betas"][1:]]) if self.num_timesteps > 1 \
                else tb["log_betas"]
            logvar = self._at(big, t).expand_as(xt)
        x0_pred = self._at(tb["sqrt_recip_ac"], t) * xt - self._at(tb["sqrt_recipm1_ac"], t) * eps
        if clip > 0:
            x0_pred = x0_pred.clamp(-clip, clip)
        mean, _ = self.q_posterior_mean_variance(x0_pred, xt, t)
        return dict(mean=mean, log_variance=logvar, pred_xstart=x0_pred, eps=eps)

    def training_losses(self, model: Callable[[Tensor, Tensor], Tensor], x0: Tensor, t: Tensor,
                        noise: Tensor | None = None) -> dict[str, Tensor]:
        """Per-row losses ``{loss, mse, vb}`` (each ``[N]``, fp32) at step indices ``t``.

        ``model(x_t, original_t)`` returns the raw output. mse = mean over values of
        ``(eps - eps_hat)^2``; vb (learned sigma only) = the VLB term in bits per value with the
        mean's gradient stopped (so it trains only the variance), as improved DDPM / MAR.
        """
        x0 = x0.float()
        noise = torch.randn_like(x0) if noise is None else noise.float()
        tb = self.tables(x0.device)
        xt = self.q_sample(x0, t, noise)
        out = model(xt, tb["timestep_map"][t]).float()
        c = x0.shape[1]
        mse = ((noise - out[:, :c]) ** 2).mean(dim=1)
        if self.learn_sigma:
            frozen = torch.cat([out[:, :c].detach(), out[:, c:]], dim=1)
            vb = self.vb_terms_bpd(frozen, x0, xt, t)
        else:
            vb = torch.zeros_like(mse)
        return dict(loss=mse + vb, mse=mse, vb=vb)

    def vb_terms_bpd(self, model_out: Tensor, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """Per-row VLB term in bits per value: KL(q || p) for t > 0, decoder NLL at t = 0."""
        true_mean, true_logvar = self.q_posterior_mean_variance(x0, xt, t)
        out = self.p_mean_variance(model_out, xt, t)
        kl = normal_kl(true_mean, true_logvar, out["mean"], out["log_variance"]).mean(dim=1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        nll = nll.mean(dim=1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    @torch.no_grad()
    def sample(self, model: Callable[[Tensor, Tensor], Tensor], noise: Tensor, temperature: float = 1.0,
               generator: torch.Generator | None = None, clip: float = 0.0) -> Tensor:
        """Ancestral sampling from ``noise`` (x_T) through all of this diffusion's steps;
        the per-step noise is scaled by ``temperature`` (MAR); ``clip`` as in
        :meth:`p_mean_variance`. Returns x_0 (fp32)."""
        tb = self.tables(noise.device)
        x = noise.float()
        n = x.shape[0]
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((n,), i, device=x.device, dtype=torch.long)
            out = self.p_mean_variance(model(x, tb["timestep_map"][t]), x, t, clip)
            if i > 0:
                z = torch.randn(x.shape, device=x.device, generator=generator)
                x = out["mean"] + torch.exp(0.5 * out["log_variance"]) * z * temperature
            else:
                x = out["mean"]
        return x


# =========================================================================== the loss module
class DiffusionLoss(nn.Module):
    """Stage-1 diffusion loss on masked patches, and the sampler that reconstructs them.

    ``forward(target[R, target_dim], z[R, cond_dim]) -> {loss, mse, vlb}`` (fp32 scalars):
    each row is repeated ``cfg.batch_mul`` times with its own uniform t and noise; loss is the
    mean over all rows of eps-MSE (+ VLB with ``cfg.learn_sigma``).
    """

    def __init__(self, cfg: DecoderConfig, target_dim: int = 588, cond_dim: int = 1024):
        super().__init__()
        if cfg.batch_mul < 1:
            raise ValueError(f"model.decoder.batch_mul must be >= 1, got {cfg.batch_mul}")
        self.cfg = cfg
        self.target_dim, self.cond_dim = target_dim, cond_dim
        self.net = DiffusionDecoder(target_dim, cond_dim, cfg.width, cfg.depth,
                                    learn_sigma=cfg.learn_sigma, impl=cfg.impl,
                                    dtype=cfg.dtype)
        self.train_diffusion = GaussianDiffusion.from_config(cfg.noise_schedule, cfg.train_steps,
                                                             cfg.learn_sigma)
        self._samplers: dict[int, GaussianDiffusion] = {}

    def forward(self, target: Tensor, z: Tensor) -> dict[str, Tensor]:
        if target.dim() != 2 or target.shape[1] != self.target_dim:
            raise ValueError(f"DiffusionLoss: target must be [rows, {self.target_dim}] (patch values), "
                             f"got {tuple(target.shape)}")
        if z.dim() != 2 or z.shape != (target.shape[0], self.cond_dim):
            raise ValueError(f"DiffusionLoss: z must be [rows={target.shape[0]}, {self.cond_dim}] to match "
                             f"target, got {tuple(z.shape)}")
        mul = self.cfg.batch_mul
        if mul > 1:   # MAR: each condition seen with `mul` different (t, noise) draws
            target, z = target.repeat(mul, 1), z.repeat(mul, 1)
        t = torch.randint(0, self.train_diffusion.num_timesteps, (target.shape[0],), device=target.device)
        terms = self.train_diffusion.training_losses(lambda xt, tt: self.net(xt, tt, z), target, t)
        return dict(loss=terms["loss"].mean(), mse=terms["mse"].mean(), vlb=terms["vb"].mean())

    @torch.no_grad()
    def condition_gap(self, target: Tensor, z: Tensor, groups: Tensor, draws: int = 4, seed: int = 0,
                      resamples: int = 2000) -> dict:
        """Does the decoder use its per-row condition? eps-MSE of every row with its own condition,
        with the conditions permuted across rows, and with them zeroed, on the same timesteps and
        noise (so the three differ only by the condition). ``groups[R]`` names each row's clip: the
        gap (shuffled - true) gets a 95 % CI by resampling clips, since one clip's patches are not
        independent. t is drawn ``draws`` times in each quarter of the schedule (low noise first),
        so the overall numbers average t uniformly, as training does. Host floats out."""
        R, T = target.shape[0], self.train_diffusion.num_timesteps
        if R < 2 or groups.shape != (R,):
            raise ValueError(f"condition_gap: need >= 2 rows and one group id per row, got {R} rows, "
                             f"groups {tuple(groups.shape)}")
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(R, generator=gen).to(z.device)
        conds = {"true": z, "shuffled": z[perm], "zero": torch.zeros_like(z)}
        per_row = {k: torch.zeros(4, R, dtype=torch.float64) for k in conds}
        for q in range(4):
            for _ in range(draws):
                t = torch.randint(q * T // 4, (q + 1) * T // 4, (R,), generator=gen).to(target.device)
                noise = torch.randn(target.shape, generator=gen).to(target.device)
                for k, c in conds.items():
                    terms = self.train_diffusion.training_losses(lambda xt, tt: self.net(xt, tt, c), target, t, noise)
                    per_row[k][q] += terms["mse"].double().cpu() / draws
        gap_qr = per_row["shuffled"] - per_row["true"]                # [quarter, row]
        gap_rows = gap_qr.mean(0)
        ids, g = torch.unique(groups.cpu(), return_inverse=True)
        n = len(ids)
        sums = torch.zeros(n, dtype=torch.float64).index_add_(0, g, gap_rows)
        counts = torch.zeros(n, dtype=torch.float64).index_add_(0, g, torch.ones(R, dtype=torch.float64))
        pick = torch.randint(0, n, (resamples, n), generator=gen)
        boot = sums[pick].sum(1) / counts[pick].sum(1)
        lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        out = {f"mse_{k}": float(v.mean()) for k, v in per_row.items()}
        out.update({f"mse_{k}_by_t_quarter": [float(x) for x in v.mean(1)] for k, v in per_row.items()})
        out.update(gap=float(gap_rows.mean()), gap_ci95=[lo, hi], rows=R, clips=n,
                   gap_by_t_quarter=[float(x) for x in gap_qr.mean(1)],
                   cond_std_across_rows=float(z.float().std(0).mean()))
        return out

    def sampler(self, steps: int) -> GaussianDiffusion:
        if steps not in self._samplers:
            self._samplers[steps] = self.train_diffusion.respace(steps)
        return self._samplers[steps]

    @torch.no_grad()
    def sample(self, z: Tensor, steps: int | None = None, temperature: float | None = None,
               generator: torch.Generator | None = None, clip: float | None = None) -> Tensor:
        """Reconstruct ``[R, target_dim]`` patches from conditions ``z[R, cond_dim]`` with the
        ancestral sampler over ``steps`` (default ``cfg.sample_steps``) respaced steps;
        ``temperature`` and ``clip`` default to ``cfg.temperature`` / ``cfg.sample_clip``."""
        if z.dim() != 2 or z.shape[1] != self.cond_dim:
            raise ValueError(f"DiffusionLoss.sample: z must be [rows, {self.cond_dim}], got {tuple(z.shape)}")
        steps = self.cfg.sample_steps if steps is None else steps
        temperature = self.cfg.temperature if temperature is None else temperature
        clip = self.cfg.sample_clip if clip is None else clip
        noise = torch.randn(z.shape[0], self.target_dim, device=z.device, generator=generator)
        return self.sampler(steps).sample(lambda x, t: self.net(x, t, z), noise, temperature, generator, clip)
