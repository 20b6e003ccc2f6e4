"""Masked-token ops: the functions model code calls to move tokens around a masked clip.

Each op has a readable PyTorch reference (``*_reference``; the maths, the test oracle and the
fallback) and a dispatch function taking ``impl``:

- ``"triton"``: the fused Triton kernels of ``ivfast.kernels.tokens`` (one pass over memory,
  forward and backward). On CPU tensors without the Triton interpreter it falls back to the
  eager reference, so CPU runs and the demo work unchanged.
- ``"compile"``: ``torch.compile`` of the reference (compiled once per process and op).
- ``"eager"``: the reference as is.

Where the models use them: the encoder embeds only the visible patches (``patch_targets`` on
``ids_keep`` gathers and normalises their pixels in one pass) and adds its positions with an
embedding lookup (``F.embedding(ids_keep, pos_table)``) after the patch GEMM, so it never
gathers token vectors. ``assemble_sequence`` (with positions) builds the predictor input;
``gather_tokens`` WITHOUT positions picks predictor outputs and teacher features at masked or
visible ids for the losses. The positions path of ``gather_tokens`` (gather + add in one pass)
is not on the models' hot path: it serves callers holding full token tensors, and benchmarks.

Index contract (``ivfast.masking``): ``ids_keep`` [B, K] and ``ids_mask`` [B, M], int32 or
int64, each row holding distinct token ids; together they cover all N = K + M positions.
Token ids follow the T, H, W raster of the patch grid (t major, then h, then w). The Triton
path trusts the ids (no device-side bounds check, which would cost a host sync): ids out of
[0, N) or repeated within a row are undefined behaviour there; the eager path raises on
out-of-range ids.

Dtypes follow PyTorch's promotion (``x + pos`` with bf16 x and fp32 pos gives fp32); the
kernels add in fp32 and round once on the store.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "IMPLS",
    "gather_tokens", "gather_tokens_reference",
    "assemble_sequence", "assemble_sequence_reference",
    "patch_targets", "patch_targets_reference",
    "channel_constant",
]

IMPLS = ("triton", "compile", "eager")


# --------------------------------------------------------------------------- input checks
def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _check_ids(name: str, ids: Tensor, B: int, device: torch.device) -> None:
    if ids.dim() != 2 or ids.shape[0] != B:
        raise ValueError(f"{name} must be [B={B}, count], got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {ids.dtype}; convert with .to(torch.int32)")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but the tokens are on {device}; move it with .to(device)")


def _check_pos(pos: Optional[Tensor], N: int, C: int, device: torch.device) -> None:
    if pos is None:
        return
    if pos.dim() == 3 and pos.shape[0] == 1:
        raise ValueError(f"pos must be [N, C], got {tuple(pos.shape)}; pass pos[0] (no batch dim)")
    if tuple(pos.shape) != (N, C):
        raise ValueError(f"pos must be [N={N}, C={C}], got {tuple(pos.shape)}")
    if pos.device != device:
        raise ValueError(f"pos is on {pos.device} but the tokens are on {device}")


def _triton_runs_on(t: Tensor) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests)."""
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


_CONSTANTS: dict = {}


def channel_constant(values: Sequence[float], device) -> Tensor:
    """fp32 [len(values)] tensor of ``values`` on ``device``, built once per (values, device).

    A tensor made from Python numbers on a GPU is a pageable host-to-device copy that blocks the
    host; per-channel mean/std/scale vectors are made here once and reused by every step.
    Callers must not write to the returned tensor.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (tuple(float(v) for v in values), device)
    t = _CONSTANTS.get(key)
    if t is None:
        t = torch.tensor(key[0], dtype=torch.float32).to(device)
        _CONSTANTS[key] = t
    return t


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable) -> Callable:
    # default (automatic) dynamic shapes: K changes from batch to batch with multi-block masks,
    # and a static-shape compile would recompile until dynamo's limit and then run eager
    return torch.compile(fn)


# --------------------------------------------------------------------------- 1. gather (+ positions)
def gather_tokens_reference(x: Tensor, ids: Tensor, pos: Optional[Tensor] = None) -> Tensor:
    """out[b, k] = x[b, ids[b, k]] (+ pos[ids[b, k]]): visible-token gather or feature picking."""
    idx = ids.long()
    out = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    if pos is not None:
        out = out + pos[idx]
    return out


def gather_tokens(x: Tensor, ids: Tensor, pos: Optional[Tensor] = None, impl: str = "eager") -> Tensor:
    """Pick the tokens ``ids`` [B, K] of ``x`` [B, N, C], adding positions ``pos`` [N, C] if given.

    Returns [B, K, C]. Differentiable w.r.t. ``x`` and ``pos``. With ``pos=None`` this is the
    feature picking of the losses (teacher features at visible or masked positions).
    ``x`` may be a view with any batch/token strides (e.g. ``tokens[:, num_cls:]``) as long as
    its last dim is contiguous.
    """
    _check_impl(impl)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, C], got shape {tuple(x.shape)}")
    B, N, C = x.shape
    _check_ids("ids", ids, B, x.device)
    _check_pos(pos, N, C, x.device)
    if impl == "triton" and _triton_runs_on(x):
        from ivfast.kernels.tokens import gather_tokens_triton
        return gather_tokens_triton(x, ids, pos)
    if impl == "compile":
        return _compiled(gather_tokens_reference)(x, ids, pos)
    return gather_tokens_reference(x, ids, pos)


# --------------------------------------------------------------------------- 2. predictor input
def assemble_sequence_reference(visible: Tensor, ids_keep: Tensor, ids_mask: Tensor,
                                mask_token: Tensor, pos: Optional[Tensor] = None) -> Tensor:
    """Full [B, N, C] sequence: visible rows at ``ids_keep``, ``mask_token`` at ``ids_mask``, + pos."""
    B, K, C = visible.shape
    M = ids_mask.shape[1]
    dtype = torch.promote_types(visible.dtype, mask_token.dtype)
    rows = torch.cat([visible.to(dtype), mask_token.to(dtype).expand(B, M, C)], dim=1)
    ids = torch.cat([ids_keep.long(), ids_mask.long()], dim=1)
    # the ids of a row are a permutation of 0..N-1, so this scatter writes every row exactly once
    out = torch.empty_like(rows).scatter(1, ids.unsqueeze(-1).expand(-1, -1, C), rows)
    if pos is not None:
        out = out + pos
    return out


def assemble_sequence(visible: Tensor, ids_keep: Tensor, ids_mask: Tensor, mask_token: Tensor,
                      pos: Optional[Tensor] = None, impl: str = "eager") -> Tensor:
    """Predictor input: scatter ``visible`` [B, K, C] to ``ids_keep`` and ``mask_token`` [C] to
    ``ids_mask`` [B, M], then add ``pos`` [N, C] (N = K + M) everywhere. Returns [B, N, C].

    Differentiable w.r.t. ``visible``, ``mask_token`` (a deterministic reduction over all masked
    positions) and ``pos``.
    """
    _check_impl(impl)
    if visible.dim() != 3:
        raise ValueError(f"visible must be [B, K, C], got shape {tuple(visible.shape)}")
    B, K, C = visible.shape
    _check_ids("ids_keep", ids_keep, B, visible.device)
    _check_ids("ids_mask", ids_mask, B, visible.device)
    if ids_keep.shape[1] != K:
        raise ValueError(f"ids_keep has {ids_keep.shape[1]} ids per row but visible has K={K} rows")
    if mask_token.reshape(-1).shape[0] != C:
        raise ValueError(f"mask_token must hold C={C} values, got shape {tuple(mask_token.shape)}")
    mask_token = mask_token.reshape(C)
    N = K + ids_mask.shape[1]
    _check_pos(pos, N, C, visible.device)
    if impl == "triton" and _triton_runs_on(visible):
        from ivfast.kernels.tokens import assemble_sequence_triton
        return assemble_sequence_triton(visible, ids_keep, ids_mask, mask_token, pos)
    if impl == "compile":
        return _compiled(assemble_sequence_reference)(visible, ids_keep, ids_mask, mask_token, pos)
    return assemble_sequence_reference(visible, ids_keep, ids_mask, mask_token, pos)


# --------------------------------------------------------------------------- 3. patch targets
def _channel_affine(video: Tensor, mean, std):
    """Per-channel scale and shift so that ``x * scale + shift`` is the normalised pixel.

    Convention: ``mean``/``std`` are in 0..1 units (ImageNet: 0.485, 0.229, ...). uint8 input is
    divided by 255 first; float input is taken as already in 0..1. With ``mean=std=None`` the
    pixels pass unchanged (uint8 then gives 0..255 as float: no implicit rescale).
    """
    if mean is None and std is None:
        return [1.0] * 3, [0.0] * 3
    mean = [0.0] * 3 if mean is None else [float(m) for m in mean]
    std = [1.0] * 3 if std is None else [float(s) for s in std]
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std must have 3 values (one per RGB channel), got {mean}, {std}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {std}")
    u = 1.0 / 255.0 if video.dtype == torch.uint8 else 1.0
    scale = [u / s for s in std]
    shift = [-m / s for m, s in zip(mean, std)]
    return scale, shift


def patchify_reference(video: Tensor, patch: int, tubelet: int = 1) -> Tensor:
    """[B, 3, T, H, W] -> [B, N, 3*tubelet*patch*patch] in token raster order, values (c, t, ph, pw).

    The released code's order (pixel_unshuffle per frame: (c, ph, pw)); it is also the order in
    which a Conv3d patch-embedding weight [D, 3, tubelet, p, p] flattens.
    """
    B, Ch, T, H, W = video.shape
    x = video.reshape(B, Ch, T // tubelet, tubelet, H // patch, patch, W // patch, patch)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)          # B, Tg, Hg, Wg | c, t, ph, pw
    return x.reshape(B, (T // tubelet) * (H // patch) * (W // patch), Ch * tubelet * patch * patch)


def patch_targets_reference(video: Tensor, ids: Tensor, patch: int = 14, tubelet: int = 1,
                            mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                            norm_pix: bool = False, eps: float = 1e-6) -> Tensor:
    """fp32 pixels of the patches ``ids`` [B, M], channel-normalised, optionally per-patch normalised."""
    scale, shift = _channel_affine(video, mean, std)
    return _patch_targets_affine(video, ids, patch, tubelet, channel_constant(scale, video.device),
                                 channel_constant(shift, video.device), norm_pix, eps)


def _patch_targets_affine(video: Tensor, ids: Tensor, patch: int, tubelet: int, scale: Tensor, shift: Tensor,
                          norm_pix: bool, eps: float) -> Tensor:
    """``patch_targets_reference`` with the per-channel ``scale``/``shift`` as fp32 [3] device tensors
    (made once by ``channel_constant``, so neither eager nor compiled runs copy them every call)."""
    v = video.float() * scale.view(1, 3, 1, 1, 1) + shift.view(1, 3, 1, 1, 1)
    p = patchify_reference(v, patch, tubelet)
    idx = ids.long()
    p = torch.gather(p, 1, idx.unsqueeze(-1).expand(-1, -1, p.shape[-1]))
    if norm_pix:
        # MAE norm_pix_loss: per-patch mean and UNBIASED variance, (x - mean) / sqrt(var + eps)
        mu = p.mean(dim=-1, keepdim=True)
        var = p.var(dim=-1, unbiased=True, keepdim=True)
        p = (p - mu) / (var + eps).sqrt()
    return p


def patch_targets(video: Tensor, ids: Tensor, patch: int = 14, tubelet: int = 1,
                  mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                  norm_pix: bool = False, eps: float = 1e-6, impl: str = "eager") -> Tensor:
    """Pixel targets of the patches ``ids`` [B, M] of ``video`` [B, 3, T, H, W].

    Returns float32 [B, M, tubelet*patch*patch*3], values in (c, [t,] ph, pw) order, tokens in
    T, H, W raster order of the patch grid. Per-channel normalisation ``(x*u - mean) / std``
    with ``u = 1/255`` for uint8 input (``mean``/``std`` in 0..1 units; float input taken as
    0..1); ``None`` leaves pixels as they are. ``norm_pix`` then normalises each patch (MAE's
    ``norm_pix_loss``: unbiased variance, ``eps`` inside the square root).
    Targets carry no gradient (the output is detached). ``video`` may have any strides (e.g. a
    channels-last view of a [B, T, H, W, 3] loader tensor) on the Triton path.
    """
    _check_impl(impl)
    if video.dim() != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be [B, 3, T, H, W], got shape {tuple(video.shape)}; "
                         f"a [B, T, H, W, 3] clip can be passed as clip.permute(0, 4, 1, 2, 3)")
    B, _, T, H, W = video.shape
    if patch <= 0 or tubelet <= 0 or H % patch or W % patch or T % tubelet:
        raise ValueError(f"video T, H, W = {T}, {H}, {W} must be multiples of tubelet={tubelet}, "
                         f"patch={patch}, patch={patch}")
    if not (video.dtype == torch.uint8 or video.is_floating_point()):
        raise TypeError(f"video must be uint8 or floating point, got {video.dtype}")
    _check_ids("ids", ids, B, video.device)
    if impl == "triton" and _triton_runs_on(video):
        from ivfast.kernels.tokens import patch_targets_triton
        scale, shift = _channel_affine(video, mean, std)
        return patch_targets_triton(video, ids, patch, tubelet, scale, shift, norm_pix, eps)
    with torch.no_grad():
        if impl == "compile":
            scale, shift = _channel_affine(video, mean, std)
            return _compiled(_patch_targets_affine)(video, ids, patch, tubelet, channel_constant(scale, video.device),
                                                    channel_constant(shift, video.device), norm_pix, eps)
        return patch_targets_reference(video, ids, patch, tubelet, mean, std, norm_pix, eps)
