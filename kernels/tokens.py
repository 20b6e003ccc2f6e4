"""Masked-token kernels: gather with positions, predictor-input assembly, patch targets.

All three are pure memory traffic, so each is written to touch every byte once:

1. ``gather``: out[b, k] = x[b, ids[b, k]] + pos[ids[b, k]]. Backward is a gather too: the
   forward records the inverse map inv[b, n] = k (or -1 for tokens not picked), so one kernel
   walks the [N, C] grid, reads grad_out where a token was picked, writes grad_x densely (zeros
   elsewhere, no separate memset) and sums grad_pos over the batch in registers. No atomics,
   so gradients are bitwise deterministic.
2. ``assemble``: out[b, ids_keep[b, k]] = visible[b, k], out[b, ids_mask[b, m]] = mask_token,
   plus pos everywhere; every output row is written exactly once. Backward reads grad_out once
   and produces grad_visible (via the inverse map), grad_pos (sum over the batch) and
   per-block partial sums of grad_mask_token (reduced by a tiny torch.sum: deterministic).
3. ``patch_targets``: for each masked id, the tubelet x patch x patch x 3 pixels are read
   straight from the [B, 3, T, H, W] clip (any strides, uint8 or float), normalised per
   channel and optionally per patch, and written as fp32 rows in (c, t, ph, pw) order.

The readable PyTorch references are in ``ivfast.ops`` (``*_reference``); ``ivfast.ops`` is the
API model code calls. Offsets are int64 wherever rows x width can pass 2**31.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["gather_tokens_triton", "assemble_sequence_triton", "patch_targets_triton"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _row_settings(C: int):
    """Tile of BLOCK_R token rows x BLOCK_C channels (~4K elements, 4 warps)."""
    block_c = 256 if C >= 256 else triton.next_power_of_2(max(C, 1))
    block_r = min(64, max(16, 4096 // block_c))
    return block_r, block_c, 4


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# =========================================================================== 1. gather
@triton.jit
def _gather_fwd_kernel(x_ptr, pos_ptr, ids_ptr, out_ptr, inv_ptr,
                       N, K, C, stride_xb, stride_xn, stride_pn, stride_ib,
                       HAS_POS: tl.constexpr, WRITE_INV: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rk = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    kmask = rk < K
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = rc < C
    m2 = kmask[:, None] & cmask[None, :]
    ids = tl.load(ids_ptr + b * stride_ib + rk, mask=kmask, other=0).to(tl.int64)
    val = tl.load(x_ptr + b * stride_xb + ids[:, None] * stride_xn + rc[None, :],
                  mask=m2, other=0.0).to(tl.float32)
    if HAS_POS:
        val += tl.load(pos_ptr + ids[:, None] * stride_pn + rc[None, :], mask=m2, other=0.0).to(tl.float32)
    tl.store(out_ptr + (b * K + rk[:, None]) * C + rc[None, :], val.to(out_ptr.dtype.element_ty), mask=m2)
    if WRITE_INV:
        if pid_c == 0:
            # inverse map for the backward: which output row token n went to
            tl.store(inv_ptr + b * N + ids, rk, mask=kmask)


@triton.jit
def _gather_bwd_kernel(gout_ptr, inv_ptr, gx_ptr, gpos_ptr,
                       N, C, stride_gb, stride_gk, b_per_prog,
                       NEED_X: tl.constexpr, NEED_POS: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_g = tl.program_id(2)
    rn = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    nmask = rn < N
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = rc < C
    m2 = nmask[:, None] & cmask[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    b_start = pid_g * b_per_prog         # the host makes b_per_prog divide B
    for i in range(0, b_per_prog):
        b = (b_start + i).to(tl.int64)
        j = tl.load(inv_ptr + b * N + rn, mask=nmask, other=-1)
        sel = j >= 0
        jj = tl.where(sel, j, 0).to(tl.int64)
        g = tl.load(gout_ptr + b * stride_gb + jj[:, None] * stride_gk + rc[None, :],
                    mask=sel[:, None] & m2, other=0.0).to(tl.float32)
        if NEED_X:
            tl.store(gx_ptr + (b * N + rn[:, None]) * C + rc[None, :], g.to(gx_ptr.dtype.element_ty),
                     mask=m2)
        if NEED_POS:
            acc += g
    if NEED_POS:
        tl.store(gpos_ptr + rn[:, None].to(tl.int64) * C + rc[None, :], acc.to(gpos_ptr.dtype.element_ty),
                 mask=m2)


def _gather_launch(x: Tensor, ids: Tensor, pos: Optional[Tensor], write_inv: bool):
    B, N, C = x.shape
    K = ids.shape[1]
    x, ids = _last_dim_contiguous(x), _last_dim_contiguous(ids)
    has_pos = pos is not None
    if has_pos:
        pos = _last_dim_contiguous(pos)
    out = torch.empty((B, K, C), dtype=_gather_out_dtype(x, pos), device=x.device)
    inv = torch.full((B, N) if write_inv else (0,), -1, dtype=torch.int32, device=x.device)
    if out.numel() > 0:
        BLOCK_R, BLOCK_C, warps = _row_settings(C)
        grid = (triton.cdiv(K, BLOCK_R), triton.cdiv(C, BLOCK_C), B)
        _gather_fwd_kernel[grid](
            x, pos if has_pos else x, ids, out, inv, N, K, C,
            x.stride(0), x.stride(1), pos.stride(0) if has_pos else 0, ids.stride(0),
            HAS_POS=has_pos, WRITE_INV=write_inv, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=warps)
    return out, inv


def _gather_out_dtype(x: Tensor, pos: Optional[Tensor]) -> torch.dtype:
    return x.dtype if pos is None else torch.promote_types(x.dtype, pos.dtype)


def _gather_backward_launch(gout: Tensor, inv: Tensor, x_dtype: torch.dtype, pos_dtype: torch.dtype,
                            need_x: bool, need_pos: bool):
    B, N = inv.shape
    C = gout.shape[2]
    dev = gout.device
    gout = _last_dim_contiguous(gout)
    runs = B * N * C > 0 and (need_x or need_pos)
    gx = torch.empty((B, N, C) if need_x else (0,), dtype=x_dtype, device=dev)
    # the kernel writes every element it owns; zeros only when it does not run (B == 0)
    gpos = (torch.empty if runs else torch.zeros)((N, C) if need_pos else (0,), dtype=pos_dtype, device=dev)
    if runs:
        BLOCK_R, BLOCK_C, warps = _row_settings(C)
        # grad_pos sums over the batch in registers, so one program walks all of B; without it,
        # one batch element per program for more parallelism
        b_per_prog = B if need_pos else 1
        grid = (triton.cdiv(N, BLOCK_R), triton.cdiv(C, BLOCK_C), B // b_per_prog)
        _gather_bwd_kernel[grid](
            gout, inv, gx if need_x else gout, gpos if need_pos else gout,
            N, C, gout.stride(0), gout.stride(1), b_per_prog,
            NEED_X=need_x, NEED_POS=need_pos, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=warps)
    return gx, gpos


# The launchers are wrapped as torch.library custom ops, so torch.compile treats them as opaque
# ops (no graph break, no attempt to trace Triton launches) and autograd is registered on them.
@torch.library.custom_op("ivfast::gather_tokens", mutates_args=())
def _gather_op(x: Tensor, ids: Tensor, pos: Optional[Tensor], write_inv: bool) -> tuple[Tensor, Tensor]:
    return _gather_launch(x, ids, pos, write_inv)


@_gather_op.register_fake
def _(x, ids, pos, write_inv):
    B, N, C = x.shape
    out = x.new_empty((B, ids.shape[1], C), dtype=_gather_out_dtype(x, pos))
    return out, x.new_empty((B, N) if write_inv else (0,), dtype=torch.int32)


@torch.library.custom_op("ivfast::gather_tokens_backward", mutates_args=())
def _gather_backward_op(gout: Tensor, inv: Tensor, x_dtype: torch.dtype, pos_dtype: torch.dtype,
                        need_x: bool, need_pos: bool) -> tuple[Tensor, Tensor]:
    return _gather_backward_launch(gout, inv, x_dtype, pos_dtype, need_x, need_pos)


@_gather_backward_op.register_fake
def _(gout, inv, x_dtype, pos_dtype, need_x, need_pos):
    B, N = inv.shape
    C = gout.shape[2]
    return (gout.new_empty((B, N, C) if need_x else (0,), dtype=x_dtype),
            gout.new_empty((N, C) if need_pos else (0,), dtype=pos_dtype))


def _gather_setup_context(ctx, inputs, output):
    x, _, pos, _ = inputs
    ctx.save_for_backward(output[1])
    ctx.dtypes = (x.dtype, pos.dtype if pos is not None else x.dtype)
    ctx.has_pos = pos is not None


def _gather_backward(ctx, gout, _ginv):
    (inv,) = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_pos = ctx.has_pos and ctx.needs_input_grad[2]
    if not (need_x or need_pos):
        return None, None, None, None
    if inv.dim() != 2:
        raise RuntimeError("gather_tokens: the forward ran without grad mode, so its inverse map was not kept")
    gx, gpos = _gather_backward_op(gout, inv, *ctx.dtypes, need_x, need_pos)
    return gx if need_x else None, None, gpos if need_pos else None, None


torch.library.register_autograd("ivfast::gather_tokens", _gather_backward, setup_context=_gather_setup_context)


def gather_tokens_triton(x: Tensor, ids: Tensor, pos: Optional[Tensor] = None) -> Tensor:
    """x [B, N, C], ids [B, K] (distinct per row), pos [N, C] or None -> [B, K, C]."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (pos is not None and pos.requires_grad))
    return _gather_op(x, ids, pos, needs_grad)[0]


# =========================================================================== 2. assemble
@triton.jit
def _assemble_fwd_kernel(vis_ptr, keep_ptr, mid_ptr, mt_ptr, pos_ptr, out_ptr, inv_ptr,
                         N, K, M, C, stride_vb, stride_vk, stride_kb, stride_mb, stride_pn,
                         HAS_POS: tl.constexpr, WRITE_INV: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    # row j of the concatenation [visible rows (K) | mask-token rows (M)]
    rj = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    jmask = rj < N
    is_keep = rj < K
    kk = tl.where(is_keep, rj, 0)
    mm = tl.where(is_keep, 0, rj - K)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = rc < C
    m2 = jmask[:, None] & cmask[None, :]
    idk = tl.load(keep_ptr + b * stride_kb + kk, mask=jmask & is_keep, other=0)
    idm = tl.load(mid_ptr + b * stride_mb + mm, mask=jmask & (rj >= K), other=0)
    dest = tl.where(is_keep, idk, idm).to(tl.int64)
    v = tl.load(vis_ptr + b * stride_vb + kk[:, None].to(tl.int64) * stride_vk + rc[None, :],
                mask=(jmask & is_keep)[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    mt = tl.load(mt_ptr + rc, mask=cmask, other=0.0).to(tl.float32)
    val = tl.where(is_keep[:, None], v, mt[None, :])
    if HAS_POS:
        val += tl.load(pos_ptr + dest[:, None] * stride_pn + rc[None, :], mask=m2, other=0.0).to(tl.float32)
    tl.store(out_ptr + (b * N + dest[:, None]) * C + rc[None, :], val.to(out_ptr.dtype.element_ty), mask=m2)
    if WRITE_INV:
        if pid_c == 0:
            # >= 0: the visible row that landed at n; < 0: a mask-token position
            tl.store(inv_ptr + b * N + dest, tl.where(is_keep, rj, -1), mask=jmask)


@triton.jit
def _assemble_bwd_kernel(gout_ptr, inv_ptr, gvis_ptr, gpos_ptr, gmt_part_ptr,
                         N, K, C, stride_gb, stride_gn, b_per_prog,
                         NEED_VIS: tl.constexpr, NEED_MT: tl.constexpr, NEED_POS: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_g = tl.program_id(2)
    rn = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    nmask = rn < N
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = rc < C
    m2 = nmask[:, None] & cmask[None, :]
    acc_pos = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_mt = tl.zeros([BLOCK_C], dtype=tl.float32)
    b_start = pid_g * b_per_prog         # the host makes b_per_prog divide B
    for i in range(0, b_per_prog):
        b = (b_start + i).to(tl.int64)
        g = tl.load(gout_ptr + b * stride_gb + rn[:, None].to(tl.int64) * stride_gn + rc[None, :],
                    mask=m2, other=0.0).to(tl.float32)
        if NEED_VIS or NEED_MT:
            j = tl.load(inv_ptr + b * N + rn, mask=nmask, other=0)
            if NEED_VIS:
                jj = tl.where(j >= 0, j, 0).to(tl.int64)
                tl.store(gvis_ptr + (b * K + jj[:, None]) * C + rc[None, :], g.to(gvis_ptr.dtype.element_ty),
                         mask=(j >= 0)[:, None] & m2)
            if NEED_MT:
                acc_mt += tl.sum(tl.where((j < 0)[:, None] & m2, g, 0.0), axis=0)
        if NEED_POS:
            acc_pos += g
    if NEED_POS:
        tl.store(gpos_ptr + rn[:, None].to(tl.int64) * C + rc[None, :], acc_pos.to(gpos_ptr.dtype.element_ty),
                 mask=m2)
    if NEED_MT:
        part = pid_g * tl.num_programs(0) + pid_r
        tl.store(gmt_part_ptr + part.to(tl.int64) * C + rc, acc_mt, mask=cmask)


def _assemble_out_dtype(visible: Tensor, mask_token: Tensor, pos: Optional[Tensor]) -> torch.dtype:
    dt = torch.promote_types(visible.dtype, mask_token.dtype)
    return dt if pos is None else torch.promote_types(dt, pos.dtype)


def _assemble_launch(visible: Tensor, ids_keep: Tensor, ids_mask: Tensor, mask_token: Tensor,
                     pos: Optional[Tensor], write_inv: bool):
    B, K, C = visible.shape
    M = ids_mask.shape[1]
    N = K + M
    visible, ids_keep, ids_mask = (_last_dim_contiguous(t) for t in (visible, ids_keep, ids_mask))
    mask_token = mask_token.contiguous()
    has_pos = pos is not None
    if has_pos:
        pos = _last_dim_contiguous(pos)
    out = torch.empty((B, N, C), dtype=_assemble_out_dtype(visible, mask_token, pos), device=visible.device)
    # every position is either kept or masked, so the kernel writes all of inv
    inv = torch.empty((B, N) if write_inv else (0,), dtype=torch.int32, device=visible.device)
    if out.numel() > 0:
        BLOCK_R, BLOCK_C, warps = _row_settings(C)
        grid = (triton.cdiv(N, BLOCK_R), triton.cdiv(C, BLOCK_C), B)
        _assemble_fwd_kernel[grid](
            visible, ids_keep, ids_mask, mask_token, pos if has_pos else visible, out, inv,
            N, K, M, C, visible.stride(0), visible.stride(1), ids_keep.stride(0), ids_mask.stride(0),
            pos.stride(0) if has_pos else 0,
            HAS_POS=has_pos, WRITE_INV=write_inv, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=warps)
    return out, inv


def _assemble_backward_launch(gout: Tensor, inv: Tensor, K: int, vis_dtype: torch.dtype, mt_dtype: torch.dtype,
                              pos_dtype: torch.dtype, need_vis: bool, need_mt: bool, need_pos: bool):
    B, N, C = gout.shape
    dev = gout.device
    gout = _last_dim_contiguous(gout)
    runs = B * N * C > 0 and (need_vis or need_mt or need_pos)
    alloc = torch.empty if runs else torch.zeros     # the kernel writes all it owns
    gvis = torch.empty((B, K, C) if need_vis else (0,), dtype=vis_dtype, device=dev)
    gpos = alloc((N, C) if need_pos else (0,), dtype=pos_dtype, device=dev)
    BLOCK_R, BLOCK_C, warps = _row_settings(C)
    b_per_prog = B if need_pos else 1
    n_rblocks = triton.cdiv(N, BLOCK_R)
    n_groups = B // b_per_prog if B > 0 else 0
    part = alloc((max(n_groups * n_rblocks, 1), C) if need_mt else (0,), dtype=torch.float32, device=dev)
    if runs:
        grid = (n_rblocks, triton.cdiv(C, BLOCK_C), n_groups)
        _assemble_bwd_kernel[grid](
            gout, inv, gvis if need_vis else gout, gpos if need_pos else gout,
            part if need_mt else gout, N, K, C, gout.stride(0), gout.stride(1), b_per_prog,
            NEED_VIS=need_vis, NEED_MT=need_mt, NEED_POS=need_pos,
            BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=warps)
    # fixed-order reduction of the per-block partial sums: deterministic
    gmt = part.sum(0).to(mt_dtype) if need_mt else gout.new_empty((0,), dtype=mt_dtype)
    return gvis, gmt, gpos


@torch.library.custom_op("ivfast::assemble_sequence", mutates_args=())
def _assemble_op(visible: Tensor, ids_keep: Tensor, ids_mask: Tensor, mask_token: Tensor,
                 pos: Optional[Tensor], write_inv: bool) -> tuple[Tensor, Tensor]:
    return _assemble_launch(visible, ids_keep, ids_mask, mask_token, pos, write_inv)


@_assemble_op.register_fake
def _(visible, ids_keep, ids_mask, mask_token, pos, write_inv):
    B, K, C = visible.shape
    N = K + ids_mask.shape[1]
    out = visible.new_empty((B, N, C), dtype=_assemble_out_dtype(visible, mask_token, pos))
    return out, visible.new_empty((B, N) if write_inv else (0,), dtype=torch.int32)


@torch.library.custom_op("ivfast::assemble_sequence_backward", mutates_args=())
def _assemble_backward_op(gout: Tensor, inv: Tensor, K: int, vis_dtype: torch.dtype, mt_dtype: torch.dtype,
                          pos_dtype: torch.dtype, need_vis: bool, need_mt: bool,
                          need_pos: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _assemble_backward_launch(gout, inv, K, vis_dtype, mt_dtype, pos_dtype, need_vis, need_mt, need_pos)


@_assemble_backward_op.register_fake
def _(gout, inv, K, vis_dtype, mt_dtype, pos_dtype, need_vis, need_mt, need_pos):
    B, N, C = gout.shape
    return (gout.new_empty((B, K, C) if need_vis else (0,), dtype=vis_dtype),
            gout.new_empty((C,) if need_mt else (0,), dtype=mt_dtype),
            gout.new_empty((N, C) if need_pos else (0,), dtype=pos_dtype))


def _assemble_setup_context(ctx, inputs, output):
    visible, _, _, mask_token, pos, _ = inputs
    ctx.save_for_backward(output[1])
    ctx.K = visible.shape[1]
    ctx.dtypes = (visible.dtype, mask_token.dtype, pos.dtype if pos is not None else visible.dtype)
    ctx.has_pos = pos is not None


def _assemble_backward(ctx, gout, _ginv):
    (inv,) = ctx.saved_tensors
    need_vis, need_mt = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    need_pos = ctx.has_pos and ctx.needs_input_grad[4]
    if not (need_vis or need_mt or need_pos):
        return None, None, None, None, None, None
    if (need_vis or need_mt) and inv.dim() != 2:
        raise RuntimeError("assemble_sequence: the forward ran without grad mode, so its inverse map was not kept")
    gvis, gmt, gpos = _assemble_backward_op(gout, inv, ctx.K, *ctx.dtypes, need_vis, need_mt, need_pos)
    return (gvis if need_vis else None, None, None, gmt if need_mt else None,
            gpos if need_pos else None, None)


torch.library.register_autograd("ivfast::assemble_sequence", _assemble_backward,
                                setup_context=_assemble_setup_context)


def assemble_sequence_triton(visible: Tensor, ids_keep: Tensor, ids_mask: Tensor, mask_token: Tensor,
                             pos: Optional[Tensor] = None) -> Tensor:
    """visible [B, K, C] at ids_keep, mask_token [C] at ids_mask, + pos [N, C] -> [B, N, C]."""
    needs_grad = torch.is_grad_enabled() and (visible.requires_grad or mask_token.requires_grad)
    return _assemble_op(visible, ids_keep, ids_mask, mask_token, pos, needs_grad)[0]


# =========================================================================== 3. patch targets
@triton.jit
def _patch_targets_kernel(video_ptr, ids_ptr, out_ptr,
                          M, Hg, Wg, stride_vb, stride_vc, stride_vt, stride_vh, stride_vw, stride_ib,
                          s0, s1, s2, h0, h1, h2, eps,
                          P: tl.constexpr, TUB: tl.constexpr, NORM_PIX: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    D: tl.constexpr = 3 * TUB * P * P
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < M
    n = tl.load(ids_ptr + b * stride_ib + rm, mask=mmask, other=0).to(tl.int64)
    # token id -> (t, h, w) on the patch grid (raster order t, h, w)
    t = n // (Hg * Wg)
    h = (n // Wg) % Hg
    w = n % Wg
    # value index -> (c, dt, ph, pw): the (c, t, ph, pw) order of the released code / Conv3d weight
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    c = d // (TUB * P * P)
    dt = (d // (P * P)) % TUB
    ph = (d // P) % P
    pw = d % P
    col = c.to(tl.int64) * stride_vc + dt.to(tl.int64) * stride_vt + ph.to(tl.int64) * stride_vh \
        + pw.to(tl.int64) * stride_vw
    row = b * stride_vb + (t * TUB) * stride_vt + (h * P) * stride_vh + (w * P) * stride_vw
    m2 = mmask[:, None] & dmask[None, :]
    x = tl.load(video_ptr + row[:, None] + col[None, :], mask=m2, other=0).to(tl.float32)
    scale = tl.where(c == 0, s0, tl.where(c == 1, s1, s2))
    shift = tl.where(c == 0, h0, tl.where(c == 1, h1, h2))
    x = x * scale[None, :] + shift[None, :]
    if NORM_PIX:
        x = tl.where(m2, x, 0.0)
        mu = tl.sum(x, axis=1) / D
        xc = tl.where(m2, x - mu[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / (D - 1)      # unbiased, as MAE's norm_pix_loss
        x = xc / tl.sqrt(var + eps)[:, None]
    tl.store(out_ptr + (b * M + rm[:, None]) * D + d[None, :], x, mask=m2)


@torch.library.custom_op("ivfast::patch_targets", mutates_args=())
def _patch_targets_op(video: Tensor, ids: Tensor, patch: int, tubelet: int, scale: list[float],
                      shift: list[float], norm_pix: bool, eps: float) -> Tensor:
    B, _, T, H, W = video.shape
    M = ids.shape[1]
    D = 3 * tubelet * patch * patch
    ids = _last_dim_contiguous(ids)
    out = torch.empty((B, M, D), dtype=torch.float32, device=video.device)
    if out.numel() == 0:
        return out
    BLOCK_D = triton.next_power_of_2(D)
    # several patches per program: neighbouring masked ids share memory sectors of the clip
    BLOCK_M = max(1, min(16 if _INTERPRET else 4, 4096 // BLOCK_D))
    grid = (triton.cdiv(M, BLOCK_M), B)
    _patch_targets_kernel[grid](
        video, ids, out, M, H // patch, W // patch, *video.stride(), ids.stride(0),
        float(scale[0]), float(scale[1]), float(scale[2]),
        float(shift[0]), float(shift[1]), float(shift[2]), float(eps),
        P=patch, TUB=tubelet, NORM_PIX=bool(norm_pix), BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
        num_warps=4 if BLOCK_D <= 1024 else 8)
    return out


@_patch_targets_op.register_fake
def _(video, ids, patch, tubelet, scale, shift, norm_pix, eps):
    return video.new_empty((video.shape[0], ids.shape[1], 3 * tubelet * patch * patch), dtype=torch.float32)


def patch_targets_triton(video: Tensor, ids: Tensor, patch: int, tubelet: int,
                         scale: Sequence[float], shift: Sequence[float], norm_pix: bool, eps: float) -> Tensor:
    """fp32 [B, M, 3*tubelet*patch*patch]; x -> x*scale[c] + shift[c], then per-patch norm. No grad."""
    return _patch_targets_op(video.detach(), ids, int(patch), int(tubelet), [float(s) for s in scale],
                             [float(s) for s in shift], bool(norm_pix), float(eps))
