"""Fused Triton kernels for the per-patch diffusion MLP (adaLN residual blocks), fwd + bwd.

The decoder block (see ``ivfast.models.diffusion.ResBlock``) is::

    shift, scale, gate = Linear(SiLU(c))                    # all blocks: ONE batched GEMM
    h  = LN(x) * (1 + scale) + shift                         # row kernel  (_ln_mod_fwd)
    u  = h @ W1^T + b1 ;  a = SiLU(u)                        # GEMM, epilogue bias + SiLU
    h2 = a @ W2^T + b2 ;  y = x + gate * h2                  # GEMM, epilogue bias + gate + residual

What is fused and why:
* one generic tiled GEMM (``_mm_kernel``, fp32 accumulation, int64 offsets, any strides so
  transposed operands cost nothing) with epilogues for bias, SiLU, the SiLU derivative (which
  also re-emits SiLU(u) for the weight gradient), gate and residual, and the bias gradient summed
  from the A tiles of the weight-gradient GEMM: every memory-bound op next to a GEMM rides on it;
* LayerNorm + affine + modulate is one row kernel; its backward is one row kernel that also
  writes d(shift), d(scale) straight into the block's adaLN gradient and partial LN dw/db;
* backward recomputes h = LN-modulate(x) (cheap) instead of storing it. Saved per block: the
  block input x, u and h2 (+ the shared adaLN output), less than eager autograd keeps.

Autograd Functions: :class:`LinearFn` (Linear with optional SiLU, for the small input/time/cond
layers) and :class:`AdaLNTrunkFn` (all residual blocks + the final layer, with a hand-written
backward that takes the adaLN gradient block by block: only a [rows, 3W] slice of it is alive
at a time, and d(c) accumulates in fp32 through the GEMM's residual epilogue). ``*_reference`` functions are the plain PyTorch
definitions the tests compare against. Kernels know nothing of modules:
``ivfast.models.diffusion`` wires parameters in.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["matmul", "weight_grad", "ln_modulate", "ln_modulate_backward", "gate_backward", "linear",
           "adaln_trunk", "LinearFn", "AdaLNTrunkFn", "ln_modulate_reference", "adaln_trunk_reference"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# =========================================================================== GEMM
def _mm_configs() -> list:
    if _INTERPRET:      # the interpreter cannot autotune over several configs; big tiles = few programs
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4},
                              num_warps=4, num_stages=1)]
    cfgs = []
    # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps). Checked by compiling for sm_90 without a GPU
    # (ptxas resource usage): 128x128x64/8 warps keeps every epilogue spill-free or nearly; the
    # 256-wide tiles spill in the gate/residual epilogue but can still win on plain GEMMs.
    for bm, bn, bk, st, wp in [(128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (256, 128, 64, 3, 8),
                               (128, 128, 64, 3, 8), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                               (64, 64, 64, 4, 4)]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                  num_stages=st, num_warps=wp))
    return cfgs


@triton.jit
def _silu_f32(v):
    return v / (1.0 + tl.exp(-v))


@triton.autotune(configs=_mm_configs(),
                 key=["M_BUCKET", "N", "K", "ACT", "HAS_GATE", "HAS_RES", "STORE_PRE", "STORE_ACT", "ROWSUM_A"])
@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, aux_ptr, gate_ptr, res_ptr, act_ptr, rowsum_ptr,
               M, N, K, M_BUCKET,
               s_am, s_ak, s_bk, s_bn, s_cm, s_cn, s_aux, s_gate, s_res, s_act,
               HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr,
               STORE_PRE: tl.constexpr, STORE_ACT: tl.constexpr, ROWSUM_A: tl.constexpr, IEEE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C = epilogue(A @ B), fp32 accumulation.

    pre = acc + bias;  out = pre | SiLU(pre) (ACT=1) | pre * SiLU'(aux) (ACT=2);
    out = out * gate (HAS_GATE); out = out + res (HAS_RES); aux = pre (STORE_PRE);
    act = SiLU(aux) (STORE_ACT, with ACT=2: the activation the weight gradient needs, written
    once per element here instead of recomputed in the next GEMM's mainloop);
    rowsum[m] = sum_k A[m, k] in fp32 (ROWSUM_A: the bias gradient of a weight-gradient GEMM
    dW = dY^T X, taken from the dY tiles already in registers, by the pid_n == 0 programs).
    aux, gate, res and act are [M, N] with unit column stride.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: neighbouring programs share A row-panels in L2
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    # 64-bit scalar tile origins + 32-bit in-tile offsets: safe past 2^31 elements without
    # 64-bit offset tensors (which cost registers and spill in the epilogue)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    m0_64 = tl.cast(m0, tl.int64)
    n0_64 = tl.cast(n0, tl.int64)
    lm = tl.arange(0, BLOCK_M)
    ln = tl.arange(0, BLOCK_N)
    lk = tl.arange(0, BLOCK_K)
    mask_m = lm < M - m0
    mask_n = ln < N - n0
    a_ptrs = a_ptr + m0_64 * s_am + (lm[:, None] * s_am + lk[None, :] * s_ak)
    b_ptrs = b_ptr + n0_64 * s_bn + (lk[:, None] * s_bk + ln[None, :] * s_bn)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ROWSUM_A:
        rsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = lk < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & mask_n[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        if ROWSUM_A:
            if pid_n == 0:
                rsum += tl.sum(a.to(tl.float32), axis=1)
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_bk
    if ROWSUM_A:
        if pid_n == 0:
            tl.store(rowsum_ptr + m0_64 + lm, rsum, mask=mask_m)

    mask = mask_m[:, None] & mask_n[None, :]
    tile = lm[:, None] * 0 + ln[None, :]          # column offsets, broadcast to the tile
    pre = acc
    if HAS_BIAS:
        pre += tl.load(bias_ptr + n0_64 + ln, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if STORE_PRE:
        tl.store(aux_ptr + (m0_64 * s_aux + n0_64) + (lm[:, None] * s_aux + tile),
                 pre.to(aux_ptr.dtype.element_ty), mask=mask)
    out = pre
    if ACT == 1:
        out = _silu_f32(pre)
    if ACT == 2:       # chain rule through SiLU of the stored pre-activation u
        u = tl.load(aux_ptr + (m0_64 * s_aux + n0_64) + (lm[:, None] * s_aux + tile),
                    mask=mask, other=0.0).to(tl.float32)
        sg = 1.0 / (1.0 + tl.exp(-u))
        out = pre * sg * (1.0 + u * (1.0 - sg))
        if STORE_ACT:
            tl.store(act_ptr + (m0_64 * s_act + n0_64) + (lm[:, None] * s_act + tile),
                     (u * sg).to(act_ptr.dtype.element_ty), mask=mask)
    if HAS_GATE:
        g = tl.load(gate_ptr + (m0_64 * s_gate + n0_64) + (lm[:, None] * s_gate + tile), mask=mask, other=0.0)
        out = out * g.to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + (m0_64 * s_res + n0_64) + (lm[:, None] * s_res + tile), mask=mask, other=0.0)
        out = out + r.to(tl.float32)
    tl.store(c_ptr + (m0_64 * s_cm + n0_64 * s_cn) + (lm[:, None] * s_cm + ln[None, :] * s_cn),
             out.to(c_ptr.dtype.element_ty), mask=mask)


def _unit_col(t: Tensor | None, name: str, shape: tuple[int, int]) -> None:
    if t is None:
        return
    if tuple(t.shape) != shape or t.stride(1) != 1:
        raise ValueError(f"matmul: {name} must be {list(shape)} with unit column stride, "
                         f"got {list(t.shape)} strides {t.stride()} (pass a row-sliced view or .contiguous())")


def _tf32_allowed() -> bool:
    """Whether fp32 matmuls may use TF32, through either of torch's APIs: reading the legacy
    ``allow_tf32`` flag raises once a user has set the newer ``fp32_precision``."""
    try:
        return torch.backends.cuda.matmul.fp32_precision == "tf32"
    except AttributeError:   # torch before the fp32_precision API
        return torch.backends.cuda.matmul.allow_tf32


def matmul(a: Tensor, b: Tensor, bias: Tensor | None = None, *, act: str | None = None,
           aux: Tensor | None = None, gate: Tensor | None = None, res: Tensor | None = None,
           store_pre: bool = False, store_act: bool = False, rowsum_a: bool = False,
           out_dtype: torch.dtype | None = None):
    """``a[M, K] @ b[K, N]`` (+ bias[N]) with the fused epilogues of ``_mm_kernel``.

    ``act``: None, ``'silu'`` or ``'dsilu'`` (multiply by SiLU'(aux), aux = stored pre-activation).
    Extra outputs, in this order after ``out``: ``pre`` (store_pre: the pre-activation/pre-gate
    value), ``act`` (store_act, with dsilu: SiLU(aux)), ``rowsum`` (rowsum_a: fp32 row sums of a).
    Any strides for a and b (transposed views cost nothing). ``out_dtype`` (default a's) is the
    dtype of ``out`` only, e.g. fp32 to accumulate a gradient through ``res`` over several calls.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: shapes {list(a.shape)} @ {list(b.shape)} do not chain")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"matmul: a and b must share dtype and device, got {a.dtype}/{b.dtype}, "
                         f"{a.device}/{b.device}; cast the weights to the activation dtype first")
    if act not in (None, "silu", "dsilu"):
        raise ValueError(f"matmul: act={act!r}; choose None, 'silu' or 'dsilu'")
    M, K = a.shape
    N = b.shape[1]
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"matmul: bias must be [{N}], got {list(bias.shape)}")
    new = lambda: torch.empty((M, N), device=a.device, dtype=a.dtype)
    out = torch.empty((M, N), device=a.device, dtype=out_dtype or a.dtype)
    pre = new() if store_pre else None
    act_out = new() if store_act else None
    rowsum = torch.zeros((M,), device=a.device, dtype=torch.float32) if rowsum_a else None
    if act == "dsilu":
        if store_pre:
            raise ValueError("matmul: act='dsilu' reads aux; it cannot also store_pre")
        if aux is None:
            raise ValueError("matmul: act='dsilu' needs aux = the pre-activation u")
        _unit_col(aux, "aux", (M, N))
        aux_t = aux
    else:
        if store_act:
            raise ValueError("matmul: store_act needs act='dsilu' (it writes SiLU(aux))")
        aux_t = pre
    _unit_col(gate, "gate", (M, N))
    _unit_col(res, "res", (M, N))
    extra = [t for t in (pre, act_out, rowsum) if t is not None]
    strides = [a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0)] + \
        [t.stride(0) for t in (aux_t, gate, res) if t is not None]
    if max(strides) * 256 >= 2 ** 31:   # in-tile offsets are 32-bit (tile origins are 64-bit)
        raise ValueError(f"matmul: a stride of {max(strides)} elements is too large for 32-bit in-tile "
                         "offsets; pass .contiguous() operands")
    if M > 0 and N > 0:
        dummy = out
        ieee = a.dtype == torch.float32 and not _tf32_allowed()
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _mm_kernel[grid](
            a, b, out, bias if bias is not None else dummy, aux_t if aux_t is not None else dummy,
            gate if gate is not None else dummy, res if res is not None else dummy,
            act_out if act_out is not None else dummy, rowsum if rowsum is not None else dummy,
            M, N, K, max(M, 1).bit_length(),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            aux_t.stride(0) if aux_t is not None else 0, gate.stride(0) if gate is not None else 0,
            res.stride(0) if res is not None else 0, act_out.stride(0) if act_out is not None else 0,
            HAS_BIAS=bias is not None, ACT={None: 0, "silu": 1, "dsilu": 2}[act],
            HAS_GATE=gate is not None, HAS_RES=res is not None, STORE_PRE=store_pre,
            STORE_ACT=store_act, ROWSUM_A=rowsum_a, IEEE=ieee,
        )
    return (out, *extra) if extra else out


def weight_grad(dy: Tensor, x: Tensor, with_bias: bool = True) -> tuple[Tensor, Tensor | None]:
    """For ``y = x @ w^T + b``: ``dw = dy^T @ x`` and ``db = column sums of dy`` (fp32, fused
    into the same GEMM), cast to dy's dtype."""
    if not with_bias:
        return matmul(dy.t(), x), None
    dw, db = matmul(dy.t(), x, rowsum_a=True)
    return dw, db.to(dy.dtype)


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
def _ln_mod_fwd_kernel(x_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, h_ptr,
                       M, W, s_x, s_shift, s_scale, s_h, eps,
                       AFFINE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """BLOCK_R whole rows per program: h = LN(x) [* w + b] * (1 + scale) + shift."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_W)[None, :]
    mask = (rows < M) & (cols < W)
    x = tl.load(x_ptr + rows * s_x + cols, mask=mask, other=0.0).to(tl.float32)
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
                       dw_ptr, db_ptr, M, W, rows_per_prog,
                       s_dh, s_x, s_scale, s_dres, s_dx, s_dshift, s_dscale, eps,
                       AFFINE: tl.constexpr, HAS_DRES: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_W: tl.constexpr):
    """Rows [pid*rows_per_prog, ...) in chunks of BLOCK_R: dx (+ dres), d(shift) = dh,
    d(scale) = dh * LN(x); partial LN dw/db of this program's rows (summed by the caller)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_W)[None, :]
    cmask = cols < W
    if AFFINE:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
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
        tl.store(dshift_ptr + rows * s_dshift + cols, dh.to(dshift_ptr.dtype.element_ty), mask=mask)
        tl.store(dscale_ptr + rows * s_dscale + cols, (dh * ln).to(dscale_ptr.dtype.element_ty), mask=mask)
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
    if AFFINE:
        out = pid * W + tl.arange(0, BLOCK_W)
        tl.store(dw_ptr + out, tl.sum(dw, axis=0), mask=tl.arange(0, BLOCK_W) < W)
        tl.store(db_ptr + out, tl.sum(db, axis=0), mask=tl.arange(0, BLOCK_W) < W)


def _row_settings(W: int) -> tuple[int, int, int]:
    """(BLOCK_W, BLOCK_R, num_warps): whole rows in registers, ~4K values per program on a GPU;
    the interpreter takes 16 rows at once because each program costs milliseconds there."""
    block = triton.next_power_of_2(W)
    rows = 16 if _INTERPRET else max(1, min(16, 4096 // block))
    return block, rows, (4 if block * rows <= 2048 else 8 if block * rows <= 8192 else 16)


def _check_rows(name: str, t: Tensor, M: int, W: int) -> None:
    if t.shape != (M, W) or t.stride(1) != 1:
        raise ValueError(f"{name} must be [{M}, {W}] with unit column stride, got {list(t.shape)} "
                         f"strides {t.stride()}")


def ln_modulate(x: Tensor, weight: Tensor | None, bias: Tensor | None, shift: Tensor, scale: Tensor,
                eps: float = 1e-6, out: Tensor | None = None) -> Tensor:
    """Fused ``LN(x) (affine if weight is given) * (1 + scale) + shift``; shift/scale may be column
    slices of a wider tensor (the adaLN output)."""
    M, W = x.shape
    for name, t in (("x", x), ("shift", shift), ("scale", scale)):
        _check_rows(f"ln_modulate: {name}", t, M, W)
    if (weight is None) != (bias is None):
        raise ValueError("ln_modulate: give both LN weight and bias, or neither (non-affine LN)")
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    if M == 0:
        return h
    block, rows, warps = _row_settings(W)
    _ln_mod_fwd_kernel[(triton.cdiv(M, rows),)](
        x, weight if weight is not None else x, bias if bias is not None else x, shift, scale, h,
        M, W, x.stride(0), shift.stride(0), scale.stride(0), h.stride(0), eps,
        AFFINE=weight is not None, BLOCK_R=rows, BLOCK_W=block, num_warps=warps)
    return h


def _num_row_programs(M: int, rows: int, device: torch.device) -> int:
    """Programs of the LN backward: enough to fill the GPU, few enough that the fp32 dw/db
    partials ([programs, W]) stay small. Multiples of ``rows`` rows each."""
    if _INTERPRET or device.type != "cuda":
        target = 2
    else:
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(target, triton.cdiv(M, rows)))


def ln_modulate_backward(dh: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, scale: Tensor,
                         dshift: Tensor, dscale: Tensor, eps: float = 1e-6, dres: Tensor | None = None):
    """Backward of :func:`ln_modulate`. Writes d(shift), d(scale) into the given (possibly sliced)
    buffers; returns ``dx (+ dres), dweight, dbias`` (fp32 LN grads, None without affine)."""
    M, W = x.shape
    for name, t in (("dh", dh), ("x", x), ("scale", scale), ("dshift", dshift), ("dscale", dscale)):
        _check_rows(f"ln_modulate_backward: {name}", t, M, W)
    if dres is not None:
        _check_rows("ln_modulate_backward: dres", dres, M, W)
    dx = torch.empty((M, W), device=x.device, dtype=x.dtype)
    block, rows, warps = _row_settings(W)
    G = _num_row_programs(M, rows, x.device)
    per_prog = triton.cdiv(triton.cdiv(M, G), rows) * rows
    G = triton.cdiv(M, per_prog) if M > 0 else 1
    affine = weight is not None
    part = torch.empty((2, G, W), device=x.device, dtype=torch.float32) if affine else None
    if M > 0:
        _ln_mod_bwd_kernel[(G,)](
            dh, x, weight if affine else x, bias if affine else x, scale,
            dres if dres is not None else dh, dx, dshift, dscale,
            part[0] if affine else dx, part[1] if affine else dx, M, W, per_prog,
            dh.stride(0), x.stride(0), scale.stride(0), dres.stride(0) if dres is not None else 0,
            dx.stride(0), dshift.stride(0), dscale.stride(0), eps,
            AFFINE=affine, HAS_DRES=dres is not None, BLOCK_R=rows, BLOCK_W=block, num_warps=warps)
    if not affine:
        return dx, None, None
    if M == 0:
        part.zero_()
    return dx, part[0].sum(0), part[1].sum(0)


# =========================================================================== gate backward
@triton.jit
def _gate_bwd_kernel(dy_ptr, h2_ptr, gate_ptr, dgate_ptr, dh2_ptr, M, W,
                     s_dy, s_h2, s_gate, s_dgate, s_dh2,
                     BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr):
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rw = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (rm < M)[:, None] & (rw < W)[None, :]
    dy = tl.load(dy_ptr + rm[:, None] * s_dy + rw[None, :], mask=mask, other=0.0).to(tl.float32)
    h2 = tl.load(h2_ptr + rm[:, None] * s_h2 + rw[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + rm[:, None] * s_gate + rw[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(dgate_ptr + rm[:, None] * s_dgate + rw[None, :], (dy * h2).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dh2_ptr + rm[:, None] * s_dh2 + rw[None, :], (dy * g).to(dh2_ptr.dtype.element_ty), mask=mask)


def gate_backward(dy: Tensor, h2: Tensor, gate: Tensor, dgate: Tensor) -> Tensor:
    """For ``y = x + gate * h2``: writes ``dgate = dy * h2`` into ``dgate``, returns ``dh2 = dy * gate``."""
    M, W = dy.shape
    for name, t in (("dy", dy), ("h2", h2), ("gate", gate), ("dgate", dgate)):
        _check_rows(f"gate_backward: {name}", t, M, W)
    dh2 = torch.empty((M, W), device=dy.device, dtype=dy.dtype)
    if M == 0:
        return dh2
    bm, bw = (16, 64) if _INTERPRET else (32, 128)
    _gate_bwd_kernel[(triton.cdiv(M, bm), triton.cdiv(W, bw))](
        dy, h2, gate, dgate, dh2, M, W, dy.stride(0), h2.stride(0), gate.stride(0), dgate.stride(0),
        dh2.stride(0), BLOCK_M=bm, BLOCK_W=bw, num_warps=4)
    return dh2


# =========================================================================== Linear (+SiLU)
class LinearFn(torch.autograd.Function):
    """``y = act(x @ w^T + b)``, act None or SiLU, on the fused GEMM. All inputs share one dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, act: str | None):
        if act == "silu":
            y, u = matmul(x, w.t(), b, act="silu", store_pre=True)
            ctx.save_for_backward(x, w, u)
        else:
            y = matmul(x, w.t(), b)
            ctx.save_for_backward(x, w, None)
        ctx.act, ctx.has_bias = act, b is not None
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, w, u = ctx.saved_tensors
        dy = dy.contiguous()
        if ctx.act == "silu":     # small layers only (time MLP): plain elementwise chain rule
            s = torch.sigmoid(u.float())
            dy = (dy.float() * s * (1 + u.float() * (1 - s))).to(x.dtype)
        dx = matmul(dy, w) if ctx.needs_input_grad[0] else None
        dw = db = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:   # frozen layer: no weight GEMM
            dw, db = weight_grad(dy, x, ctx.has_bias)
        return dx, dw, db, None


def linear(x: Tensor, w: Tensor, b: Tensor | None = None, act: str | None = None) -> Tensor:
    if act not in (None, "silu"):
        raise ValueError(f"linear: act={act!r}; choose None or 'silu'")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"linear: x {list(x.shape)} and weight {list(w.shape)} do not match "
                         f"(need x [rows, in], weight [out, in])")
    return LinearFn.apply(x.contiguous(), w, b, act)


# =========================================================================== the decoder trunk
def adaln_trunk_reference(x: Tensor, c: Tensor, ada_w: Tensor, ada_b: Tensor, blocks: list[tuple],
                          final_w: Tensor, final_b: Tensor, eps: float = 1e-6) -> Tensor:
    """Plain PyTorch definition of :class:`AdaLNTrunkFn` (same argument layout)."""
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
    """Forward of the trunk; with ``keep`` also returns what backward needs (x, u, h2 per block)."""
    M, W = x.shape
    # [M, (3D+2)W]; SiLU(c) is a transient (a SiLU prologue would redo it for every N tile)
    ada = matmul(torch.nn.functional.silu(c), ada_w.t(), ada_b)
    saved = []
    for i in range(depth):
        ln_w, ln_b, w1, b1, w2, b2 = block_params[6 * i: 6 * i + 6]
        shift, scale, gate = (ada[:, (3 * i + j) * W: (3 * i + j + 1) * W] for j in range(3))
        h = ln_modulate(x, ln_w, ln_b, shift, scale, eps)
        if keep:
            a, u = matmul(h, w1.t(), b1, act="silu", store_pre=True)
            del h
            y, h2 = matmul(a, w2.t(), b2, gate=gate, res=x, store_pre=True)
            saved += [x, u, h2]
        else:       # inference (the sampler): no pre-activations written
            a = matmul(h, w1.t(), b1, act="silu")
            del h
            y = matmul(a, w2.t(), b2, gate=gate, res=x)
        del a
        x = y
    shift, scale = ada[:, 3 * depth * W: (3 * depth + 1) * W], ada[:, (3 * depth + 1) * W:]
    out = matmul(ln_modulate(x, None, None, shift, scale, eps), final_w.t(), final_b)
    return out, ada, saved, x


class AdaLNTrunkFn(torch.autograd.Function):
    """All residual blocks + the final layer of the decoder in one Function.

    Inputs: x[M, W] (after input_proj), c[M, W] (t_emb + z_emb), ada_w[(3D+2)W, W] / ada_b (the
    adaLN Linears of all blocks then the final layer, concatenated), final_w[O, W] / final_b, eps,
    depth D, then per block ln_w, ln_b, w1, b1, w2, b2. One dtype for all of them.
    """

    @staticmethod
    def forward(ctx, x, c, ada_w, ada_b, final_w, final_b, eps, depth, *block_params):
        out, ada, saved, x_last = _trunk_forward(x, c, ada_w, ada_b, final_w, final_b, eps, depth,
                                                 block_params, keep=True)
        ctx.save_for_backward(c, ada, ada_w, final_w, x_last, *saved, *block_params)
        ctx.eps, ctx.depth = eps, depth
        return out

    @staticmethod
    def backward(ctx, dout):
        c, ada, ada_w, final_w, x_last, *rest = ctx.saved_tensors
        D, eps = ctx.depth, ctx.eps
        saved, params = rest[:3 * D], rest[3 * D:]
        M, W = x_last.shape
        dout = dout.contiguous()
        # adaLN (ada = SiLU(c) @ ada_w^T + ada_b) is backpropagated one block at a time, so only a
        # [M, 3W] slice of its gradient is alive at once (not [M, (3D+2)W]); dc accumulates in fp32.
        sc = torch.nn.functional.silu(c)
        dc = None
        dada_w: list = [None] * (D + 1)
        dada_b: list = [None] * (D + 1)

        def ada_backward(k: int, lo: int, dada_k: Tensor) -> None:
            nonlocal dc
            dada_w[k], dada_b[k] = weight_grad(dada_k, sc)
            dc = matmul(dada_k, ada_w[lo: lo + dada_k.shape[1]], act="dsilu", aux=c, res=dc,
                        out_dtype=torch.float32)

        # final layer
        lo = 3 * D * W
        shift, scale = ada[:, lo: lo + W], ada[:, lo + W:]
        hf = ln_modulate(x_last, None, None, shift, scale, eps)       # recompute, not stored
        dfinal_w, dfinal_b = weight_grad(dout, hf)
        del hf
        dhf = matmul(dout, final_w)
        dada_k = torch.empty((M, 2 * W), device=c.device, dtype=c.dtype)
        dx, _, _ = ln_modulate_backward(dhf, x_last, None, None, scale, eps=eps,
                                        dshift=dada_k[:, :W], dscale=dada_k[:, W:])
        del dhf
        ada_backward(D, lo, dada_k)
        dparams: list = [None] * (6 * D)
        for i in reversed(range(D)):
            x, u, h2 = saved[3 * i: 3 * i + 3]
            ln_w, ln_b, w1, b1, w2, b2 = params[6 * i: 6 * i + 6]
            lo = 3 * i * W
            shift, scale, gate = ada[:, lo: lo + W], ada[:, lo + W: lo + 2 * W], ada[:, lo + 2 * W: lo + 3 * W]
            dada_k = torch.empty((M, 3 * W), device=c.device, dtype=c.dtype)
            # y = x + gate * h2
            dh2 = gate_backward(dx, h2, gate, dada_k[:, 2 * W:])
            du, a = matmul(dh2, w2, act="dsilu", aux=u, store_act=True)   # (dh2 W2) SiLU'(u); a = SiLU(u)
            dw2, db2 = weight_grad(dh2, a)
            del dh2, a
            h = ln_modulate(x, ln_w, ln_b, shift, scale, eps)          # recompute, not stored
            dw1, db1 = weight_grad(du, h)
            del h
            dh = matmul(du, w1)
            del du
            dx, dln_w, dln_b = ln_modulate_backward(dh, x, ln_w, ln_b, scale, eps=eps, dres=dx,
                                                    dshift=dada_k[:, :W], dscale=dada_k[:, W:2 * W])
            del dh
            ada_backward(i, lo, dada_k)
            del dada_k
            dparams[6 * i: 6 * i + 6] = [dln_w.to(ln_w.dtype), dln_b.to(ln_b.dtype), dw1, db1, dw2, db2]
        return (dx, dc.to(c.dtype), torch.cat(dada_w), torch.cat(dada_b), dfinal_w, dfinal_b, None, None,
                *dparams)


def adaln_trunk(x: Tensor, c: Tensor, ada_w: Tensor, ada_b: Tensor, blocks: list[tuple],
                final_w: Tensor, final_b: Tensor, eps: float = 1e-6) -> Tensor:
    """Residual adaLN blocks + final layer, fused (see :class:`AdaLNTrunkFn` for the layout)."""
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
    args = (x.contiguous(), c.contiguous(), ada_w.contiguous(), ada_b, final_w.contiguous(), final_b,
            float(eps), D)
    flat = [p.contiguous() for p in flat]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return _trunk_forward(*args, flat, keep=False)[0]
    return AdaLNTrunkFn.apply(*args, *flat)
