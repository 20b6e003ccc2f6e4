"""Diffusion-MLP decoder (adaLN residual blocks), fwd + bwd: cuBLAS GEMMs, Triton row kernels between them.

The decoder block (see ``ivfast.models.diffusion.ResBlock``) is::

    shift, scale, gate = Linear(SiLU(c))                    # all blocks: ONE batched GEMM (cuBLAS)
    h  = LN(x) * (1 + scale) + shift                         # row kernel  (_ln_mod_fwd_kernel)
    u  = h @ W1^T + b1 ;  a = SiLU(u)                        # cuBLAS addmm (bias epilogue) + SiLU
    h2 = a @ W2^T + b2 ;  y = x + gate * h2                  # cuBLAS addmm; the residual is fused
                                                             # into the NEXT block's LN row kernel

Why this split: at width 1536 the block is GEMM-bound (~700 FLOP/byte), so every GEMM
must run at cuBLAS speed; a hand-written Triton GEMM (cp.async, non-persistent, spilling dSiLU
epilogues, 144 tiles on 132 SMs for 1536^2 weight gradients) does not. So there is NO Triton GEMM
here (hence no autotuning): every product is ``torch.addmm`` / ``torch.mm``. The
memory-bound work next to them lives in a few Triton row / pointwise kernels, each doing one pass:

* forward: ``ln_modulate`` (LN + affine + modulate) and ``residual_ln_modulate`` (``y = x + gate*h2``
  of the previous block, then LN-modulate of y, one read of x/h2/gate);
* backward: ``gate_backward`` (dgate, dh2 and the column sums d(b2), d(gate bias)),
  ``dsilu_backward`` (du = da * SiLU'(u), a = SiLU(u) for dW2, column sum d(b1)),
  ``ln_modulate_backward`` (dx + residual grad, d(shift), d(scale) into the adaLN gradient, their
  column sums = the adaLN bias gradient, LN dw/db): every bias gradient is a column sum taken in a
  row kernel that already reads the tensor;
* backward recomputes h = LN-modulate(x) (cheap) instead of storing it. Saved per block: the
  block input x, u and h2 (+ the shared adaLN output), no more than eager autograd keeps.
* frozen parameters (``requires_grad=False``) get no weight-gradient GEMM (``ctx.needs_input_grad``).

Custom ops (``torch.library``, as the token ops): :func:`linear` (Linear with optional SiLU, for
the small input/time/cond layers) and :func:`adaln_trunk` (all residual blocks + the final layer,
hand-written backward that takes the adaLN gradient block by block: only a [rows, 3W] slice of it
is alive at a time), each a forward op and a backward op with fake implementations, so
torch.compile traces through the decoder and fake tensors run it. Their ``ieee`` flag keeps the
op's fp32 GEMMs off TF32 in both directions (the fp32 decoder).
``*_reference`` functions are the plain PyTorch definitions the tests compare against. Kernels know
nothing of modules: ``ivfast.models.diffusion`` wires parameters in (and pads 588 -> 592,
1176 -> 1184 so every GEMM operand row is 16-byte aligned).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

__all__ = ["ln_modulate", "residual_ln_modulate", "ln_modulate_backward", "gate_backward", "dsilu_backward",
           "linear", "adaln_trunk", "ieee_fp32_matmuls", "ln_modulate_reference", "adaln_trunk_reference",
           "weight_grad"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# =========================================================================== GEMMs (cuBLAS)
@contextlib.contextmanager
def ieee_fp32_matmuls(on: bool = True) -> Iterator[None]:
    """Inside, fp32 CUDA matmuls run in IEEE fp32 (TF32 off) when ``on``; the previous setting is
    restored on exit. Uses the ``fp32_precision`` API where torch has it (reading the legacy flag
    raises once the new one was set)."""
    if not on:
        yield
        return
    m = torch.backends.cuda.matmul
    new_api = hasattr(m, "fp32_precision")
    old = m.fp32_precision if new_api else m.allow_tf32
    if new_api:
        m.fp32_precision = "ieee"
    else:
        m.allow_tf32 = False
    try:
        yield
    finally:
        if new_api:
            m.fp32_precision = old
        else:
            m.allow_tf32 = old


def _linear_fwd(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x @ w^T + b`` through cuBLAS(Lt): addmm with a 1-D bias takes the bias epilogue."""
    return torch.addmm(b, x, w.t()) if b is not None else torch.mm(x, w.t())


def weight_grad(dy: Tensor, x: Tensor) -> Tensor:
    """``dW = dy^T @ x`` (cuBLAS; it picks split-K for the 1536 x 1536 x rows shapes). Every
    weight gradient of the decoder goes through here, so a test can count them (frozen layers
    must make none)."""
    return torch.mm(dy.t(), x)


def _column_sum(t: Tensor) -> Tensor:
    """Column sums in t's dtype (fp32 accumulation inside torch's reduction)."""
    return t.sum(0, dtype=torch.float32).to(t.dtype)


# =========================================================================== LN + modulate
def ln_modulate_reference(x: Tensor, weight: Tensor | None, bias: Tensor | None, shift: Tensor,
                          scale: Tensor, eps: float = 1e-6) -> Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` (fp32 statistics), the kernels' definition."""
    h = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], None if weight is None else weight.float(),
                                       None if bias is None else bias.float(), eps)
    return (h * (1 + scale.float()) + shift.float()).to(x.dtype)


@triton.jit
def _center_rows(x, mask, W, eps):
    """LayerNorm statistics of fp32 rows: (x - mean, 1 / std). Forward and backward call this
    one function, so the backward's recompute is exactly the forward's."""
    mean = tl.sum(x, axis=1)[:, None] / W
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1)[:, None] / W + eps)
    return xc, rstd


@triton.jit
def _ln_mod_fwd_kernel(x_ptr, h2_ptr, gate_ptr, y_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, h_ptr,
                       M, W, s_x, s_h2, s_gate, s_y, s_shift, s_scale, s_h, eps,
                       RESIDUAL: tl.constexpr, AFFINE: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_W: tl.constexpr):
    """BLOCK_R whole rows per program. RESIDUAL: y = x + gate * h2 is stored and normalised
    (the previous block's output, fused here so it costs no extra pass);
    h = LN(y) [* w + b] * (1 + scale) + shift."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_W)[None, :]
    mask = (rows < M) & (cols < W)
    x = tl.load(x_ptr + rows * s_x + cols, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        g = tl.load(gate_ptr + rows * s_gate + cols, mask=mask, other=0.0).to(tl.float32)
        h2 = tl.load(h2_ptr + rows * s_h2 + cols, mask=mask, other=0.0).to(tl.float32)
        y = (x + g * h2).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + rows * s_y + cols, y, mask=mask)
        x = y.to(tl.float32)       # normalise the ROUNDED y: the backward recomputes from the stored y
    xc, rstd = _center_rows(x, mask, W, eps)
    h = xc * rstd
    if AFFINE:
        h = h * tl.load(w_ptr + cols, mask=cols < W, other=0.0).to(tl.float32) \
            + tl.load(b_ptr + cols, mask=cols < W, other=0.0).to(tl.float32)
    sc = tl.load(scale_ptr + rows * s_scale + cols, mask=mask, other=0.0).to(tl.float32)
    sh = tl.load(shift_ptr + rows * s_shift + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + rows * s_h + cols, (h * (1.0 + sc) + sh).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ln_mod_bwd_kernel(dh_ptr, x_ptr, w_ptr, b_ptr, scale_ptr, dres_ptr, dx_ptr, dshift_ptr, dscale_ptr,
                       part_ptr, M, W, rows_per_prog,
                       s_dh, s_x, s_scale, s_dres, s_dx, s_dshift, s_dscale, s_part, eps,
                       AFFINE: tl.constexpr, HAS_DRES: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_W: tl.constexpr):
    """Rows [pid*rows_per_prog, ...) in chunks of BLOCK_R: dx (+ dres), d(shift) = dh,
    d(scale) = dh * LN(x); this program's column-sum partials, part[j, pid, :] for
    j = 0 sum d(shift), 1 sum d(scale) (the adaLN bias gradient), 2 LN dw, 3 LN db."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_W)[None, :]
    cmask = cols < W
    if AFFINE:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    s_sh = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
    s_sc = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
    dw = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
    db = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    for r0 in range(start, end, BLOCK_R):
        rows = (tl.cast(r0, tl.int64) + tl.arange(0, BLOCK_R).to(tl.int64))[:, None]
        mask = (rows < end) & cmask
        x = tl.load(x_ptr + rows * s_x + cols, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + rows * s_dh + cols, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + rows * s_scale + cols, mask=mask, other=0.0).to(tl.float32)
        xc, rstd = _center_rows(x, mask, W, eps)
        n = xc * rstd
        if AFFINE:
            ln = n * w + b
        else:
            ln = n
        dsc = dh * ln
        tl.store(dshift_ptr + rows * s_dshift + cols, dh.to(dshift_ptr.dtype.element_ty), mask=mask)
        tl.store(dscale_ptr + rows * s_dscale + cols, dsc.to(dscale_ptr.dtype.element_ty), mask=mask)
        s_sh += dh
        s_sc += dsc
        dl = dh * (1.0 + sc)
        if AFFINE:
            dw += dl * n
            db += dl
            dn = dl * w
        else:
            dn = dl
        c1 = tl.sum(dn, axis=1)[:, None] / W
        c2 = tl.sum(dn * n, axis=1)[:, None] / W
        dx = (dn - c1 - n * c2) * rstd
        if HAS_DRES:
            dx += tl.load(dres_ptr + rows * s_dres + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows * s_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    out = pid * W + tl.arange(0, BLOCK_W)
    omask = tl.arange(0, BLOCK_W) < W
    tl.store(part_ptr + out, tl.sum(s_sh, axis=0), mask=omask)
    tl.store(part_ptr + s_part + out, tl.sum(s_sc, axis=0), mask=omask)
    if AFFINE:
        tl.store(part_ptr + 2 * s_part + out, tl.sum(dw, axis=0), mask=omask)
        tl.store(part_ptr + 3 * s_part + out, tl.sum(db, axis=0), mask=omask)


def _row_settings(W: int) -> tuple[int, int, int]:
    """(BLOCK_W, BLOCK_R, num_warps): whole rows in registers, ~4K values per program on a GPU;
    the interpreter takes 16 rows at once because each program costs milliseconds there."""
    block = triton.next_power_of_2(W)
    rows = 16 if _INTERPRET else max(1, min(16, 4096 // block))
    return block, rows, (4 if block * rows <= 2048 else 8 if block * rows <= 8192 else 16)


def _check_rows(name: str, t: Tensor, M: int, W: int) -> None:
    if t.shape != (M, W) or t.stride(1) != 1:
        raise ValueError(f"{name} must be [{M}, {W}] with unit column stride, got {list(t.shape)} "
                         f"strides {t.stride()} (pass a row-sliced view or .contiguous())")


def _ln_mod_launch(x, h2, gate, weight, bias, shift, scale, eps, name):
    M, W = x.shape
    tensors = [("x", x), ("shift", shift), ("scale", scale)] + \
        ([("h2", h2), ("gate", gate)] if h2 is not None else [])
    for n, t in tensors:
        _check_rows(f"{name}: {n}", t, M, W)
    if (weight is None) != (bias is None):
        raise ValueError(f"{name}: give both LN weight and bias, or neither (non-affine LN)")
    h = torch.empty((M, W), device=x.device, dtype=x.dtype)
    y = torch.empty((M, W), device=x.device, dtype=x.dtype) if h2 is not None else None
    if M > 0:
        block, rows, warps = _row_settings(W)
        res = h2 is not None
        _ln_mod_fwd_kernel[(triton.cdiv(M, rows),)](
            x, h2 if res else x, gate if res else x, y if res else h,
            weight if weight is not None else x, bias if bias is not None else x, shift, scale, h,
            M, W, x.stride(0), h2.stride(0) if res else 0, gate.stride(0) if res else 0,
            y.stride(0) if res else 0, shift.stride(0), scale.stride(0), h.stride(0), eps,
            RESIDUAL=res, AFFINE=weight is not None, BLOCK_R=rows, BLOCK_W=block, num_warps=warps)
    return y, h


def ln_modulate(x: Tensor, weight: Tensor | None, bias: Tensor | None, shift: Tensor, scale: Tensor,
                eps: float = 1e-6) -> Tensor:
    """Fused ``LN(x) (affine if weight is given) * (1 + scale) + shift``; shift/scale may be column
    slices of a wider tensor (the adaLN output)."""
    return _ln_mod_launch(x, None, None, weight, bias, shift, scale, eps, "ln_modulate")[1]


def residual_ln_modulate(x: Tensor, h2: Tensor, gate: Tensor, weight: Tensor | None, bias: Tensor | None,
                         shift: Tensor, scale: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``y = x + gate * h2`` (the previous block's residual), then ``h = ln_modulate(y, ...)``, in
    one pass. Returns ``(y, h)``; LN statistics are taken of y rounded to x's dtype."""
    return _ln_mod_launch(x, h2, gate, weight, bias, shift, scale, eps, "residual_ln_modulate")


def _num_row_programs(M: int, rows: int, device: torch.device) -> int:
    """Programs of the column-summing row kernels: enough to fill the GPU, few enough that the fp32
    partials ([programs, W]) stay small. Multiples of ``rows`` rows each."""
    if _INTERPRET or device.type != "cuda":
        target = 2
    else:
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(target, triton.cdiv(M, rows)))


def _split_rows(M: int, rows: int, device: torch.device) -> tuple[int, int]:
    """(programs, rows per program) for a column-summing kernel over M rows in chunks of ``rows``."""
    G = _num_row_programs(M, rows, device)
    per_prog = triton.cdiv(triton.cdiv(max(M, 1), G), rows) * rows
    return (triton.cdiv(M, per_prog) if M > 0 else 1), per_prog


def ln_modulate_backward(dh: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, scale: Tensor,
                         dshift: Tensor, dscale: Tensor, eps: float = 1e-6, dres: Tensor | None = None):
    """Backward of :func:`ln_modulate`. Writes d(shift), d(scale) into the given (possibly sliced)
    buffers; returns ``dx (+ dres), dweight, dbias, dshift_sum, dscale_sum`` (column sums: fp32; LN
    grads None without affine)."""
    M, W = x.shape
    for name, t in (("dh", dh), ("x", x), ("scale", scale), ("dshift", dshift), ("dscale", dscale)):
        _check_rows(f"ln_modulate_backward: {name}", t, M, W)
    if dres is not None:
        _check_rows("ln_modulate_backward: dres", dres, M, W)
    dx = torch.empty((M, W), device=x.device, dtype=x.dtype)
    block, rows, warps = _row_settings(W)
    G, per_prog = _split_rows(M, rows, x.device)
    affine = weight is not None
    if not _INTERPRET and affine:
        warps = max(warps, 16)     # four fp32 accumulators per row chunk: spread over more threads
        # and at most 2K values each: 4K (2 rows of 2048) spilled on sm_90 with triton 3.7
        rows = max(1, min(rows, 2048 // block))
    part = torch.zeros((4, G, W), device=x.device, dtype=torch.float32)
    if M > 0:
        _ln_mod_bwd_kernel[(G,)](
            dh, x, weight if affine else x, bias if affine else x, scale,
            dres if dres is not None else dh, dx, dshift, dscale, part, M, W, per_prog,
            dh.stride(0), x.stride(0), scale.stride(0), dres.stride(0) if dres is not None else 0,
            dx.stride(0), dshift.stride(0), dscale.stride(0), part.stride(0), eps,
            AFFINE=affine, HAS_DRES=dres is not None, BLOCK_R=rows, BLOCK_W=block, num_warps=warps)
    sums = part.sum(1)
    return dx, (sums[2] if affine else None), (sums[3] if affine else None), sums[0], sums[1]


# =========================================================================== pointwise backward kernels
@triton.jit
def _gate_bwd_kernel(dy_ptr, h2_ptr, gate_ptr, dgate_ptr, dh2_ptr, part_ptr, M, W, rows_per_prog,
                     s_dy, s_h2, s_gate, s_dgate, s_dh2, s_part,
                     BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """y = x + gate * h2: dgate = dy * h2, dh2 = dy * gate; partial column sums of dh2 (the b2
    gradient) -> part[0, pid], of dgate (the gate's adaLN bias gradient) -> part[1, pid]."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    cmask = cols < W
    s_h = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
    s_g = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    for r0 in range(start, end, BLOCK_R):
        rm = tl.cast(r0, tl.int64) + tl.arange(0, BLOCK_R).to(tl.int64)
        mask = (rm < end)[:, None] & cmask[None, :]
        dy = tl.load(dy_ptr + rm[:, None] * s_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h2 = tl.load(h2_ptr + rm[:, None] * s_h2 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + rm[:, None] * s_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dg = dy * h2
        dh2 = dy * g
        tl.store(dgate_ptr + rm[:, None] * s_dgate + cols[None, :], dg.to(dgate_ptr.dtype.element_ty), mask=mask)
        tl.store(dh2_ptr + rm[:, None] * s_dh2 + cols[None, :], dh2.to(dh2_ptr.dtype.element_ty), mask=mask)
        s_h += dh2
        s_g += dg
    tl.store(part_ptr + pid * W + cols, tl.sum(s_h, axis=0), mask=cmask)
    tl.store(part_ptr + s_part + pid * W + cols, tl.sum(s_g, axis=0), mask=cmask)


def _pointwise_settings() -> tuple[int, int]:
    # (BLOCK_R, BLOCK_W); 8 x 256 on a GPU keeps the fp32 column-sum accumulators small (see the
    # ptxas report of tests/test_diffusion_mlp.py::test_kernels_compile_for_real_gpus_without_spills)
    return (16, 64) if _INTERPRET else (8, 256)


def gate_backward(dy: Tensor, h2: Tensor, gate: Tensor, dgate: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For ``y = x + gate * h2``: writes ``dgate = dy * h2`` into ``dgate``; returns
    ``(dh2 = dy * gate, column sums of dh2, column sums of dgate)`` (sums fp32)."""
    M, W = dy.shape
    for name, t in (("dy", dy), ("h2", h2), ("gate", gate), ("dgate", dgate)):
        _check_rows(f"gate_backward: {name}", t, M, W)
    dh2 = torch.empty((M, W), device=dy.device, dtype=dy.dtype)
    br, bw = _pointwise_settings()
    G, per_prog = _split_rows(M, br, dy.device)
    part = torch.zeros((2, G, W), device=dy.device, dtype=torch.float32)
    if M > 0:
        _gate_bwd_kernel[(G, triton.cdiv(W, bw))](
            dy, h2, gate, dgate, dh2, part, M, W, per_prog, dy.stride(0), h2.stride(0), gate.stride(0),
            dgate.stride(0), dh2.stride(0), part.stride(0), BLOCK_R=br, BLOCK_W=bw, num_warps=4)
    sums = part.sum(1)
    return dh2, sums[0], sums[1]


@triton.jit
def _dsilu_bwd_kernel(da_ptr, u_ptr, du_ptr, a_ptr, part_ptr, M, W, rows_per_prog,
                      s_da, s_u, s_du, s_a,
                      STORE_ACT: tl.constexpr, COLSUM: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """a = SiLU(u): du = da * SiLU'(u); STORE_ACT: a (what the weight gradient of the next Linear
    needs, recomputed here instead of saved); COLSUM: partial column sums of du -> part[pid]."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    cmask = cols < W
    acc = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    for r0 in range(start, end, BLOCK_R):
        rm = tl.cast(r0, tl.int64) + tl.arange(0, BLOCK_R).to(tl.int64)
        mask = (rm < end)[:, None] & cmask[None, :]
        da = tl.load(da_ptr + rm[:, None] * s_da + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + rm[:, None] * s_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sg = 1.0 / (1.0 + tl.exp(-u))
        du = da * sg * (1.0 + u * (1.0 - sg))
        tl.store(du_ptr + rm[:, None] * s_du + cols[None, :], du.to(du_ptr.dtype.element_ty), mask=mask)
        if STORE_ACT:
            tl.store(a_ptr + rm[:, None] * s_a + cols[None, :], (u * sg).to(a_ptr.dtype.element_ty), mask=mask)
        if COLSUM:
            acc += du
    if COLSUM:
        tl.store(part_ptr + pid * W + cols, tl.sum(acc, axis=0), mask=cmask)


def dsilu_backward(da: Tensor, u: Tensor, store_act: bool = True, colsum: bool = True,
                   out: Tensor | None = None):
    """For ``a = SiLU(u)``: ``du = da * SiLU'(u)`` (into ``out`` if given, which may be ``da``
    itself), then ``a`` (store_act) and the fp32 column sums of du (colsum), in that order."""
    M, W = u.shape
    _check_rows("dsilu_backward: da", da, M, W)
    _check_rows("dsilu_backward: u", u, M, W)
    du = torch.empty((M, W), device=u.device, dtype=da.dtype) if out is None else out
    _check_rows("dsilu_backward: out", du, M, W)
    a = torch.empty((M, W), device=u.device, dtype=u.dtype) if store_act else None
    br, bw = _pointwise_settings()
    G, per_prog = _split_rows(M, br, u.device)
    part = torch.zeros((G, W), device=u.device, dtype=torch.float32) if colsum else None
    if M > 0:
        _dsilu_bwd_kernel[(G, triton.cdiv(W, bw))](
            da, u, du, a if store_act else du, part if colsum else du, M, W, per_prog,
            da.stride(0), u.stride(0), du.stride(0), a.stride(0) if store_act else 0,
            STORE_ACT=store_act, COLSUM=colsum, BLOCK_R=br, BLOCK_W=bw, num_warps=4)
    res = [du] + ([a] if store_act else []) + ([part.sum(0)] if colsum else [])
    return res[0] if len(res) == 1 else tuple(res)


# =========================================================================== Linear (+SiLU)
def _linear_launch(x: Tensor, w: Tensor, b: Tensor | None, silu: bool, keep: bool) -> tuple[Tensor, Tensor]:
    """``(act(x @ w^T + b), u)``; u (the pre-activation, for the SiLU backward) only when
    ``silu and keep``, else an empty tensor."""
    u = _linear_fwd(x, w, b)
    if not silu:
        return u, u.new_empty((0,))
    if keep:
        return torch.nn.functional.silu(u), u
    return torch.nn.functional.silu(u, inplace=True), u.new_empty((0,))


def _linear_backward_launch(dy: Tensor, x: Tensor, w: Tensor, u: Tensor, silu: bool, need_x: bool,
                            need_w: bool, need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw, db) of :func:`linear`; an empty tensor for each one not asked for."""
    dy = dy.contiguous()
    db = None
    if silu:
        dy, db = dsilu_backward(dy, u, store_act=False, colsum=True)
        db = db.to(dy.dtype)
    elif need_b:
        db = _column_sum(dy)
    none = lambda: dy.new_empty((0,))       # a new one each time: op outputs must not alias
    dx = torch.mm(dy, w) if need_x else none()
    dw = weight_grad(dy, x) if need_w else none()     # frozen layer: no weight GEMM
    return dx, dw, (db if need_b else none())


# The forward and backward launchers are torch.library custom ops, as the token ops: torch.compile
# and fake tensors see opaque ops with known output shapes (no graph break, no Triton launch
# traced), and autograd is registered on the forward op. ``ieee`` scopes the op's own GEMMs to
# IEEE fp32 (TF32 off) in forward AND backward: the caller's global setting only holds while its
# forward runs, while the backward runs later under whatever is set then.
@torch.library.custom_op("ivfast::decoder_linear", mutates_args=())
def _linear_op(x: Tensor, w: Tensor, b: Optional[Tensor], silu: bool, ieee: bool,
               keep: bool) -> tuple[Tensor, Tensor]:
    with ieee_fp32_matmuls(ieee):
        return _linear_launch(x, w, b, silu, keep)


@_linear_op.register_fake
def _(x, w, b, silu, ieee, keep):
    y = x.new_empty((x.shape[0], w.shape[0]))
    return y, x.new_empty(y.shape if silu and keep else (0,))


@torch.library.custom_op("ivfast::decoder_linear_backward", mutates_args=())
def _linear_backward_op(dy: Tensor, x: Tensor, w: Tensor, u: Tensor, silu: bool, need_x: bool, need_w: bool,
                        need_b: bool, ieee: bool) -> tuple[Tensor, Tensor, Tensor]:
    with ieee_fp32_matmuls(ieee):
        return _linear_backward_launch(dy, x, w, u, silu, need_x, need_w, need_b)


@_linear_backward_op.register_fake
def _(dy, x, w, u, silu, need_x, need_w, need_b, ieee):
    return (dy.new_empty(x.shape if need_x else (0,)), dy.new_empty(w.shape if need_w else (0,)),
            dy.new_empty((w.shape[0],) if need_b else (0,)))


def _linear_setup_context(ctx, inputs, output):
    x, w, b, silu, ieee, keep = inputs
    ctx.save_for_backward(x, w, output[1])
    ctx.silu, ctx.ieee, ctx.keep, ctx.has_bias = silu, ieee, keep, b is not None


def _linear_backward(ctx, dy, _du):
    x, w, u = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = ctx.has_bias and ctx.needs_input_grad[2]
    if not (need_x or need_w or need_b):
        return None, None, None, None, None, None
    if ctx.silu and not ctx.keep:
        raise RuntimeError("decoder linear: the forward ran without grad mode, so its pre-activation was not kept")
    dx, dw, db = _linear_backward_op(dy, x, w, u, ctx.silu, need_x, need_w, need_b, ctx.ieee)
    return dx if need_x else None, dw if need_w else None, db if need_b else None, None, None, None


torch.library.register_autograd("ivfast::decoder_linear", _linear_backward, setup_context=_linear_setup_context)


# FLOP formulas (2*M*N*K per GEMM the op runs), so FlopCounterMode, which cannot see inside a
# custom op, still counts the decoder's GEMMs (shapes only: it works on fake tensors too).
@register_flop_formula(torch.ops.ivfast.decoder_linear)
def _(x, w, b, silu, ieee, keep, out_shape=None, **kwargs) -> int:
    return 2 * x[0] * x[1] * w[0]


@register_flop_formula(torch.ops.ivfast.decoder_linear_backward)
def _(dy, x, w, u, silu, need_x, need_w, need_b, ieee, out_shape=None, **kwargs) -> int:
    return 2 * x[0] * x[1] * w[0] * (int(need_x) + int(need_w))


def linear(x: Tensor, w: Tensor, b: Tensor | None = None, act: str | None = None, ieee: bool = False) -> Tensor:
    """``act(x @ w^T + b)``, act None or SiLU, on cuBLAS; all inputs share one dtype. ``ieee``: its
    fp32 GEMMs run without TF32, forward and backward."""
    if act not in (None, "silu"):
        raise ValueError(f"linear: act={act!r}; choose None or 'silu'")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"linear: x {list(x.shape)} and weight {list(w.shape)} do not match "
                         f"(need x [rows, in], weight [out, in])")
    if x.dtype != w.dtype or (b is not None and b.dtype != w.dtype):
        raise ValueError(f"linear: x, weight and bias must share one dtype, got {x.dtype}/{w.dtype}"
                         f"{'/' + str(b.dtype) if b is not None else ''}; cast the weights first")
    keep = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad))
    return _linear_op(x.contiguous(), w, b, act == "silu", bool(ieee), keep)[0]


# =========================================================================== the decoder trunk
def adaln_trunk_reference(x: Tensor, c: Tensor, ada_w: Tensor, ada_b: Tensor, blocks: list[tuple],
                          final_w: Tensor, final_b: Tensor, eps: float = 1e-6) -> Tensor:
    """Plain PyTorch definition of :func:`adaln_trunk` (same argument layout)."""
    F = torch.nn.functional
    W = x.shape[1]
    ada = F.linear(F.silu(c), ada_w, ada_b)
    for i, (ln_w, ln_b, w1, b1, w2, b2) in enumerate(blocks):
        shift, scale, gate = ada[:, 3 * W * i: 3 * W * (i + 1)].chunk(3, dim=1)
        h = F.layer_norm(x, (W,), ln_w, ln_b, eps) * (1 + scale) + shift
        x = x + gate * F.linear(F.silu(F.linear(h, w1, b1)), w2, b2)
    shift, scale = ada[:, 3 * W * len(blocks):].chunk(2, dim=1)
    return F.linear(F.layer_norm(x, (W,), None, None, eps) * (1 + scale) + shift, final_w, final_b)


def _trunk_forward(x, c, ada_w, ada_b, final_w, final_b, eps, depth, block_params, keep: bool):
    """Forward of the trunk; with ``keep`` also returns what backward needs (x, u, h2 per block).
    Block i's residual ``x + gate * h2`` is computed inside block i+1's (or the final layer's)
    LN row kernel."""
    M, W = x.shape
    silu = torch.nn.functional.silu
    # [M, (3D+2)W]: one cuBLAS GEMM for every block's adaLN; SiLU(c) is a transient
    ada = _linear_fwd(silu(c), ada_w, ada_b)
    saved = []
    prev = None                               # (h2, gate) of the previous block, not yet added
    for i in range(depth):
        ln_w, ln_b, w1, b1, w2, b2 = block_params[6 * i: 6 * i + 6]
        shift, scale, gate = (ada[:, (3 * i + j) * W: (3 * i + j + 1) * W] for j in range(3))
        if prev is None:
            h = ln_modulate(x, ln_w, ln_b, shift, scale, eps)
        else:
            x, h = residual_ln_modulate(x, *prev, ln_w, ln_b, shift, scale, eps)
        u = _linear_fwd(h, w1, b1)
        del h
        a = silu(u, inplace=not keep)          # inference (the sampler): no pre-activation kept
        h2 = _linear_fwd(a, w2, b2)
        del a
        if keep:
            saved += [x, u, h2]
        del u
        prev = (h2, gate)
    shift, scale = ada[:, 3 * depth * W: (3 * depth + 1) * W], ada[:, (3 * depth + 1) * W:]
    if prev is None:
        hf = ln_modulate(x, None, None, shift, scale, eps)
    else:
        x, hf = residual_ln_modulate(x, *prev, None, None, shift, scale, eps)
    out = _linear_fwd(hf, final_w, final_b)
    return out, ada, saved, x


def _trunk_backward_launch(dout: Tensor, c: Tensor, ada: Tensor, ada_w: Tensor, final_w: Tensor, x_last: Tensor,
                           saved: list[Tensor], params: list[Tensor], eps: float, need: list[bool]):
    """Backward of the trunk: ``saved`` = (x, u, h2) per block, ``need`` = which gradients to make, in
    the order x, c, ada_w, ada_b, final_w, final_b, then 6 per block. Returns (dx, dc, dada_w,
    dada_b, dfinal_w, dfinal_b, dparams), an empty tensor for each one not asked for."""
    D = len(params) // 6
    need_c, need_ada_w, need_ada_b, need_fw, need_fb = need[1], need[2], need[3], need[4], need[5]
    need_block = lambda i, j: need[6 + 6 * i + j]
    M, W = x_last.shape
    dout = dout.contiguous()
    # adaLN (ada = SiLU(c) @ ada_w^T + ada_b) is backpropagated one block at a time, so only a
    # [M, 3W] slice of its gradient is alive at once (not [M, (3D+2)W]). d(SiLU(c)) accumulates
    # through cuBLAS's beta=1 epilogue (one rounding per block, as eager autograd's accumulation).
    sc = torch.nn.functional.silu(c) if need_ada_w else None
    dsc = None
    dada_w: list = [None] * (D + 1)
    dada_b: list = [None] * (D + 1)

    def ada_backward(k: int, lo: int, dada_k: Tensor, bias_sums: list[Tensor]) -> None:
        nonlocal dsc
        if need_ada_w:
            dada_w[k] = weight_grad(dada_k, sc)
        if need_ada_b:
            dada_b[k] = torch.cat(bias_sums).to(dada_k.dtype)
        if need_c:
            w_k = ada_w[lo: lo + dada_k.shape[1]]
            dsc = torch.mm(dada_k, w_k) if dsc is None else dsc.addmm_(dada_k, w_k)

    # final layer
    lo = 3 * D * W
    shift, scale = ada[:, lo: lo + W], ada[:, lo + W:]
    dfinal_w = dfinal_b = None
    if need_fw:
        hf = ln_modulate(x_last, None, None, shift, scale, eps)       # recompute, not stored
        dfinal_w = weight_grad(dout, hf)
        del hf
    if need_fb:
        dfinal_b = _column_sum(dout)
    dhf = torch.mm(dout, final_w)
    dada_k = torch.empty((M, 2 * W), device=c.device, dtype=c.dtype)
    dx, _, _, s_shift, s_scale = ln_modulate_backward(dhf, x_last, None, None, scale, eps=eps,
                                                      dshift=dada_k[:, :W], dscale=dada_k[:, W:])
    del dhf
    ada_backward(D, lo, dada_k, [s_shift, s_scale])
    dparams: list = [None] * (6 * D)
    for i in reversed(range(D)):
        x, u, h2 = saved[3 * i: 3 * i + 3]
        ln_w, ln_b, w1, b1, w2, b2 = params[6 * i: 6 * i + 6]
        lo = 3 * i * W
        shift, scale, gate = ada[:, lo: lo + W], ada[:, lo + W: lo + 2 * W], ada[:, lo + 2 * W: lo + 3 * W]
        dada_k = torch.empty((M, 3 * W), device=c.device, dtype=c.dtype)
        # y = x + gate * h2  (dx is dy here)
        dh2, db2, s_gate = gate_backward(dx, h2, gate, dada_k[:, 2 * W:])
        da = torch.mm(dh2, w2)
        if need_block(i, 4):
            du, a, db1 = dsilu_backward(da, u, store_act=True, colsum=True, out=da)   # du in place of da
            dparams[6 * i + 4] = weight_grad(dh2, a)
            del a
        else:
            du, db1 = dsilu_backward(da, u, store_act=False, colsum=True, out=da)
        del dh2, da
        if need_block(i, 2):
            h = ln_modulate(x, ln_w, ln_b, shift, scale, eps)          # recompute, not stored
            dparams[6 * i + 2] = weight_grad(du, h)
            del h
        dh = torch.mm(du, w1)
        del du
        dx, dln_w, dln_b, s_shift, s_scale = ln_modulate_backward(
            dh, x, ln_w, ln_b, scale, eps=eps, dres=dx, dshift=dada_k[:, :W], dscale=dada_k[:, W:2 * W])
        del dh
        ada_backward(i, lo, dada_k, [s_shift, s_scale, s_gate])
        del dada_k
        for j, g in ((0, dln_w), (1, dln_b), (3, db1), (5, db2)):
            if need_block(i, j):
                # a copy: dln_w / dln_b are rows of one tensor, and outputs must not share storage
                dparams[6 * i + j] = g.to(params[6 * i + j].dtype, copy=True)
    none = lambda: dout.new_empty((0,))     # a new one each time: op outputs must not alias
    dc = dsilu_backward(dsc, c, store_act=False, colsum=False, out=dsc) if need_c else none()
    return (dx if need[0] else none(), dc,
            torch.cat(dada_w) if need_ada_w else none(), torch.cat(dada_b) if need_ada_b else none(),
            none() if dfinal_w is None else dfinal_w, none() if dfinal_b is None else dfinal_b,
            [none() if g is None else g for g in dparams])


@torch.library.custom_op("ivfast::adaln_trunk", mutates_args=())
def _trunk_op(x: Tensor, c: Tensor, ada_w: Tensor, ada_b: Tensor, final_w: Tensor, final_b: Tensor,
              block_params: list[Tensor], eps: float, ieee: bool, keep: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(out, ada, kept): with ``keep``, ada and per block (u, h2, next block's input x), the last
    x being the final layer's input; without, ada and kept are empty. Block 0's x is the op's input
    x, which autograd saves itself (an op output must not alias an input)."""
    with ieee_fp32_matmuls(ieee):
        out, ada, saved, x_last = _trunk_forward(x, c, ada_w, ada_b, final_w, final_b, eps,
                                                 len(block_params) // 6, block_params, keep)
    if not keep:
        return out, ada.new_empty((0,)), []
    D = len(block_params) // 6
    kept = []
    for i in range(D):
        kept += [saved[3 * i + 1], saved[3 * i + 2], saved[3 * i + 3] if i + 1 < D else x_last]
    return out, ada, kept


@_trunk_op.register_fake
def _(x, c, ada_w, ada_b, final_w, final_b, block_params, eps, ieee, keep):
    M, W = x.shape
    out = x.new_empty((M, final_w.shape[0]))
    if not keep:
        return out, x.new_empty((0,)), []
    return out, x.new_empty((M, ada_w.shape[0])), [x.new_empty((M, W)) for _ in range(3 * (len(block_params) // 6))]


@torch.library.custom_op("ivfast::adaln_trunk_backward", mutates_args=())
def _trunk_backward_op(dout: Tensor, c: Tensor, ada: Tensor, ada_w: Tensor, final_w: Tensor, x_last: Tensor,
                       saved: list[Tensor], params: list[Tensor], eps: float, need: list[bool],
                       ieee: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    with ieee_fp32_matmuls(ieee):
        return _trunk_backward_launch(dout, c, ada, ada_w, final_w, x_last, saved, params, eps, need)


@_trunk_backward_op.register_fake
def _(dout, c, ada, ada_w, final_w, x_last, saved, params, eps, need, ieee):
    like = lambda t, i: dout.new_empty(t.shape if need[i] else (0,))
    return (like(x_last, 0), like(c, 1), like(ada_w, 2), dout.new_empty((ada_w.shape[0],) if need[3] else (0,)),
            like(final_w, 4), dout.new_empty((final_w.shape[0],) if need[5] else (0,)),
            [like(p, 6 + k) for k, p in enumerate(params)])


def _trunk_setup_context(ctx, inputs, output):
    x, c, ada_w, ada_b, final_w, final_b, block_params, eps, ieee, keep = inputs
    _, ada, kept = output
    ctx.save_for_backward(x, c, ada, ada_w, final_w, *kept, *block_params)
    ctx.eps, ctx.ieee, ctx.keep, ctx.depth = eps, ieee, keep, len(block_params) // 6


def _trunk_backward(ctx, dout, _dada, _dkept):
    x, c, ada, ada_w, final_w, *rest = ctx.saved_tensors
    D = ctx.depth
    need_in = ctx.needs_input_grad         # block_params: a list of flags (one per tensor)
    need = [bool(n) for n in need_in[:6]] + [bool(n) for n in need_in[6]]
    if not any(need):
        return None, None, None, None, None, None, [None] * (6 * D), None, None, None
    if not ctx.keep:
        raise RuntimeError("adaln_trunk: the forward ran without grad mode, so its activations were not kept")
    kept, params = rest[:3 * D], rest[3 * D:]
    # per block (x, u, h2): block 0's x is the op's input, block i's is kept[3i - 1]
    saved, x_last = [], x
    for i in range(D):
        saved += [x_last, kept[3 * i], kept[3 * i + 1]]
        x_last = kept[3 * i + 2]
    dx, dc, dada_w, dada_b, dfw, dfb, dparams = _trunk_backward_op(dout, c, ada, ada_w, final_w, x_last, saved,
                                                                   params, ctx.eps, need, ctx.ieee)
    pick = lambda g, n: g if n else None
    return (pick(dx, need[0]), pick(dc, need[1]), pick(dada_w, need[2]), pick(dada_b, need[3]), pick(dfw, need[4]),
            pick(dfb, need[5]), [pick(g, n) for g, n in zip(dparams, need[6:])], None, None, None)


torch.library.register_autograd("ivfast::adaln_trunk", _trunk_backward, setup_context=_trunk_setup_context)


@register_flop_formula(torch.ops.ivfast.adaln_trunk)
def _(x, c, ada_w, ada_b, final_w, final_b, block_params, eps, ieee, keep, out_shape=None, **kwargs) -> int:
    (M, W), D = x, len(block_params) // 6
    return 2 * M * W * (ada_w[0] + 2 * D * W + final_w[0])


@register_flop_formula(torch.ops.ivfast.adaln_trunk_backward)
def _(dout, c, ada, ada_w, final_w, x_last, saved, params, eps, need, ieee, out_shape=None, **kwargs) -> int:
    (M, W), D = x_last, len(params) // 6
    final = final_w[0] * W * (1 + need[4])                          # d(hf), d(final_w)
    blocks = sum(W * W * (2 + need[6 + 6 * i + 2] + need[6 + 6 * i + 4]) for i in range(D))   # da, dh, dW1, dW2
    adaln = ada_w[0] * W * (need[1] + need[2])                      # d(SiLU(c)), d(ada_w)
    return 2 * M * (final + blocks + adaln)

def adaln_trunk(x: Tensor, c: Tensor, ada_w: Tensor, ada_b: Tensor, blocks: list[tuple],
                final_w: Tensor, final_b: Tensor, eps: float = 1e-6, ieee: bool = False) -> Tensor:
    """All residual adaLN blocks + the final layer of the decoder, fused, with a hand-written
    backward that takes the adaLN gradient block by block (only a [rows, 3W] slice of it is alive
    at a time).

    x[M, W] (after input_proj), c[M, W] (t_emb + z_emb), ada_w[(3D+2)W, W] / ada_b (the adaLN
    Linears of all blocks then the final layer, concatenated), blocks = D tuples (ln_w, ln_b, w1,
    b1, w2, b2), final_w[O, W] / final_b. One dtype for all of them. A parameter that does not
    require grad (frozen) gets no weight-gradient GEMM and a None gradient. ``ieee``: its fp32
    GEMMs run without TF32, forward and backward.
    """
    M, W = x.shape
    D = len(blocks)
    if c.shape != (M, W):
        raise ValueError(f"adaln_trunk: c must be [{M}, {W}] like x, got {list(c.shape)}")
    if ada_w.shape != ((3 * D + 2) * W, W) or ada_b.shape != ((3 * D + 2) * W,):
        raise ValueError(f"adaln_trunk: ada_w/ada_b must be [{(3 * D + 2) * W}, {W}] / [{(3 * D + 2) * W}] "
                         f"for depth {D}, got {list(ada_w.shape)} / {list(ada_b.shape)}")
    flat = [p for blk in blocks for p in blk]
    tensors = [x, c, ada_w, ada_b, final_w, final_b, *flat]
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"adaln_trunk: all inputs must share one dtype, got {sorted(map(str, dtypes))}; "
                         "cast the parameters to the activation dtype first")
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return _trunk_op(x.contiguous(), c.contiguous(), ada_w.contiguous(), ada_b, final_w.contiguous(), final_b,
                     [p.contiguous() for p in flat], float(eps), bool(ieee), keep)[0]
