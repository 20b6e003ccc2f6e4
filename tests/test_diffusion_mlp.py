"""Fused diffusion-MLP kernels against plain PyTorch references, forward and backward.

Rule (flash-attention's): the kernel's error against an fp64 reference must be at most 2x the
error of the same computation done by PyTorch in the kernel's dtype, plus a small atol
(utils.check_close).
CPU runs the kernels under the Triton interpreter in fp32/fp16 with small odd shapes;
bf16 and the > 2^31-element offsets are GPU tests.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from ivfast.kernels import diffusion_mlp as K
from ivfast.models.diffusion import DiffusionDecoder
from utils import ATOL, check_close

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = [torch.float32, torch.float16]


def rnd(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


# ------------------------------------------------------------------------------------ no Triton GEMM
def test_no_triton_gemm_and_no_autotuning():
    """Issue 13 / 11.5: every GEMM is cuBLAS, so no kernel autotunes (nothing to tune before step 1)."""
    import triton
    kernels = [v for v in vars(K).values() if isinstance(v, (triton.runtime.jit.KernelInterface,))]
    assert kernels, "the row kernels should be visible"
    assert not [k for k in kernels if isinstance(k, triton.runtime.autotuner.Autotuner)]


def test_linear_frozen_weights_skip_their_gradient(monkeypatch):
    x = torch.randn(13, 20, requires_grad=True)
    w, b = torch.randn(9, 20), torch.randn(9)          # frozen
    calls = []
    monkeypatch.setattr(K, "weight_grad", lambda *a, **k: calls.append(1))
    K.linear(x, w, b).sum().backward()
    assert not calls, "no weight-gradient GEMM for a frozen layer"
    torch.testing.assert_close(x.grad, torch.ones(13, 9) @ w, rtol=1e-4, atol=1e-4)


def test_linear_rejects_bad_inputs():
    x = torch.randn(4, 8, device=DEV)
    with pytest.raises(ValueError, match="do not match"):
        K.linear(x, torch.randn(3, 7, device=DEV))
    with pytest.raises(ValueError, match="one dtype"):
        K.linear(x, torch.randn(3, 8, device=DEV, dtype=torch.float16))
    with pytest.raises(ValueError, match="act="):
        K.linear(x, torch.randn(3, 8, device=DEV), act="gelu")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("store_act,colsum,inplace", [(True, True, False), (False, False, True), (False, True, True)])
def test_dsilu_backward(dtype, store_act, colsum, inplace):
    torch.manual_seed(0)
    M, W = 37, 70                                    # odd rows, columns not a multiple of the tile
    da, u = rnd(M, W, dtype=dtype), rnd(M, W, dtype=dtype, scale=2.0)
    d64, u64 = da.double(), u.double()
    s64 = torch.sigmoid(u64)
    du64 = d64 * s64 * (1 + u64 * (1 - s64))
    sl = torch.sigmoid(u.float())
    du_low = (da.float() * sl * (1 + u.float() * (1 - sl))).to(dtype)
    buf = da.clone()
    res = K.dsilu_backward(buf, u, store_act=store_act, colsum=colsum, out=buf if inplace else None)
    res = res if isinstance(res, tuple) else (res,)
    check_close(res[0], du64, du_low, "du")
    if inplace:
        assert res[0].data_ptr() == buf.data_ptr()
    k = 1
    if store_act:
        check_close(res[k], F.silu(u64), F.silu(u.float()).to(dtype), "act")
        k += 1
    if colsum:
        check_close(res[k].to(dtype), du64.sum(0), du_low.float().sum(0).to(dtype), "colsum")
        k += 1
    assert len(res) == k


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_residual_ln_modulate(dtype, affine):
    """y = x + gate * h2 (the previous block's output) and LN-modulate of it in one pass."""
    torch.manual_seed(0)
    M, W = 19, 37
    x, h2 = rnd(M, W, dtype=dtype, scale=2.0), rnd(M, W, dtype=dtype)
    ada = rnd(M, 3 * W, dtype=dtype, scale=0.5)
    shift, scale, gate = ada[:, :W], ada[:, W:2 * W], ada[:, 2 * W:]
    w, b = (rnd(W, dtype=dtype), rnd(W, dtype=dtype)) if affine else (None, None)
    y, h = K.residual_ln_modulate(x, h2, gate, w, b, shift, scale, 1e-6)
    d = lambda t: None if t is None else t.double()
    y64 = d(x) + d(gate) * d(h2)
    check_close(y, y64, (x.float() + gate.float() * h2.float()).to(dtype), "y")
    ref = _ln_mod_torch(y64, d(w), d(b), d(shift), d(scale))
    f = lambda t: None if t is None else t.float()
    check_close(h, ref, _ln_mod_torch(y.float(), f(w), f(b), f(shift), f(scale)).to(dtype), "h")
    # the backward recomputes h from the stored y: it must be bit-equal to the forward's h
    torch.testing.assert_close(K.ln_modulate(y, w, b, shift, scale, 1e-6), h, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ LN + modulate
def _ln_mod_torch(x, w, b, shift, scale, eps=1e-6):
    """PyTorch in the inputs' dtype (the 'same computation in low precision' baseline)."""
    return F.layer_norm(x, x.shape[-1:], w, b, eps) * (1 + scale) + shift


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("W", [37, 48, 1536])
@pytest.mark.parametrize("affine", [True, False])
def test_ln_modulate_forward(dtype, W, affine):
    torch.manual_seed(0)
    M = 19
    x = rnd(M, W, dtype=dtype, scale=3.0) + 1.0
    ada = rnd(M, 3 * W, dtype=dtype, scale=0.5)            # shift/scale are slices, as in the trunk
    shift, scale = ada[:, W:2 * W], ada[:, 2 * W:]
    w, b = (rnd(W, dtype=dtype), rnd(W, dtype=dtype)) if affine else (None, None)
    out = K.ln_modulate(x, w, b, shift, scale, 1e-6)
    d = lambda t: None if t is None else t.double()
    f = lambda t: None if t is None else t.float()    # fp32 maths rounded to dtype = the kernel's recipe
    ref = _ln_mod_torch(d(x), d(w), d(b), d(shift), d(scale))
    check_close(out, ref, _ln_mod_torch(f(x), f(w), f(b), f(shift), f(scale)).to(dtype), "ln_modulate")
    torch.testing.assert_close(K.ln_modulate_reference(x, w, b, shift, scale).double(), ref,
                               atol=ATOL[dtype] * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("W", [37, 1536])
@pytest.mark.parametrize("affine,dres", [(True, True), (False, False)])
def test_ln_modulate_backward(dtype, W, affine, dres):
    torch.manual_seed(0)
    M = 37
    x = rnd(M, W, dtype=dtype, scale=2.0)
    ada = rnd(M, 2 * W, dtype=dtype, scale=0.5)
    shift, scale = ada[:, :W], ada[:, W:]
    w, b = (rnd(W, dtype=dtype), rnd(W, dtype=dtype)) if affine else (None, None)
    dh = rnd(M, W, dtype=dtype)
    dr = rnd(M, W, dtype=dtype) if dres else None

    dada = torch.full((M, 3 * W), float("nan"), device=DEV, dtype=dtype)   # slices written in place
    dx, dw, db, s_shift, s_scale = K.ln_modulate_backward(dh, x, w, b, scale, dada[:, :W], dada[:, 2 * W:], 1e-6,
                                                          dres=dr)

    def grads(cast):
        leaves = [cast(t).requires_grad_() if t is not None else None for t in (x, w, b, shift, scale)]
        out = _ln_mod_torch(*leaves)
        out.backward(cast(dh))
        g = [t.grad if t is not None else None for t in leaves]
        if dr is not None:
            g[0] = g[0] + cast(dr)
        return g

    ref = grads(lambda t: t.double())
    low = grads(lambda t: t.clone())
    check_close(dx, ref[0], low[0].to(dtype), "dx")
    check_close(dada[:, :W], ref[3], low[3].to(dtype), "dshift")
    check_close(dada[:, 2 * W:], ref[4], low[4].to(dtype), "dscale")
    assert torch.isnan(dada[:, W:2 * W]).all(), "wrote outside its slices"
    # column sums of d(shift), d(scale): the adaLN bias gradient, from the same kernel
    check_close(s_shift.to(dtype), ref[3].sum(0), low[3].sum(0).to(dtype), "dshift colsum")
    check_close(s_scale.to(dtype), ref[4].sum(0), low[4].sum(0).to(dtype), "dscale colsum")
    if affine:
        check_close(dw.to(dtype), ref[1], low[1].to(dtype), "dweight")
        check_close(db.to(dtype), ref[2], low[2].to(dtype), "dbias")
    else:
        assert dw is None and db is None


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_gate_backward(dtype):
    torch.manual_seed(0)
    M, W = 37, 70
    dy, h2, gate = rnd(M, W, dtype=dtype), rnd(M, W, dtype=dtype), rnd(M, W, dtype=dtype)
    dada = torch.zeros(M, 3 * W, device=DEV, dtype=dtype)
    dh2, s_dh2, s_dgate = K.gate_backward(dy, h2, gate, dada[:, 2 * W:])
    check_close(dh2, dy.double() * gate.double(), dy * gate, "dh2")
    check_close(dada[:, 2 * W:], dy.double() * h2.double(), dy * h2, "dgate")
    check_close(s_dh2.to(dtype), (dy.double() * gate.double()).sum(0),
                (dy.float() * gate.float()).sum(0).to(dtype), "db2")
    check_close(s_dgate.to(dtype), (dy.double() * h2.double()).sum(0),
                (dy.float() * h2.float()).sum(0).to(dtype), "dgate b")
    assert dada[:, :2 * W].abs().max().item() == 0


def test_ln_modulate_rejects_bad_inputs():
    x = torch.randn(4, 8, device=DEV)
    with pytest.raises(ValueError, match="shift must be"):
        K.ln_modulate(x, None, None, torch.randn(4, 7, device=DEV), x)
    with pytest.raises(ValueError, match="both LN weight and bias"):
        K.ln_modulate(x, torch.ones(8, device=DEV), None, x, x)


# ------------------------------------------------------------------------------------ autograd Functions
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("act", [None, "silu"])
def test_linear_fn_forward_backward(dtype, act):
    torch.manual_seed(0)
    M, Kd, N = 37, 23, 50
    x, w, b, g = rnd(M, Kd, dtype=dtype), rnd(N, Kd, dtype=dtype, scale=0.3), rnd(N, dtype=dtype), rnd(M, N, dtype=dtype)

    def run(cast, fn):
        leaves = [cast(t).requires_grad_() for t in (x, w, b)]
        y = fn(*leaves)
        y.backward(cast(g))
        return [y.detach()] + [t.grad for t in leaves]

    torch_fn = lambda x, w, b: F.silu(F.linear(x, w, b)) if act else F.linear(x, w, b)
    out = run(lambda t: t.clone(), lambda x, w, b: K.linear(x, w, b, act))
    ref = run(lambda t: t.double(), torch_fn)
    low = run(lambda t: t.clone(), torch_fn)
    for name, o, r, lo in zip(["y", "dx", "dw", "db"], out, ref, low):
        check_close(o, r, lo, name)


def _trunk_inputs(M, W, D, O, dtype):
    g = lambda *s, sc=1.0: rnd(*s, dtype=dtype, scale=sc)
    blocks = [(1 + g(W, sc=0.1), g(W, sc=0.1), g(W, W, sc=W ** -0.5), g(W, sc=0.1), g(W, W, sc=W ** -0.5),
               g(W, sc=0.1)) for _ in range(D)]
    return dict(x=g(M, W), c=g(M, W), ada_w=g((3 * D + 2) * W, W, sc=0.3 * W ** -0.5),
                ada_b=g((3 * D + 2) * W, sc=0.1), blocks=blocks, final_w=g(O, W, sc=W ** -0.5), final_b=g(O, sc=0.1))


def _trunk_grads(inp, cast, fn):
    leaves = {k: cast(v).requires_grad_() for k, v in inp.items() if k != "blocks"}
    blocks = [tuple(cast(p).requires_grad_() for p in blk) for blk in inp["blocks"]]
    out = fn(leaves["x"], leaves["c"], leaves["ada_w"], leaves["ada_b"], blocks, leaves["final_w"], leaves["final_b"])
    torch.manual_seed(123)
    out.backward(cast(torch.randn(out.shape, device=out.device)))
    res = {"out": out.detach(), **{f"d{k}": v.grad for k, v in leaves.items()}}
    for i, blk in enumerate(blocks):
        for name, p in zip(["ln_w", "ln_b", "w1", "b1", "w2", "b2"], blk):
            res[f"block{i}.{name}"] = p.grad
    return res


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_adaln_trunk_forward_backward(dtype):
    torch.manual_seed(0)
    inp = _trunk_inputs(M=37, W=40, D=2, O=26, dtype=dtype)
    out = _trunk_grads(inp, lambda t: t.clone(), K.adaln_trunk)
    ref = _trunk_grads(inp, lambda t: t.double(), K.adaln_trunk_reference)
    low = _trunk_grads(inp, lambda t: t.clone(), K.adaln_trunk_reference)
    for k in ref:
        check_close(out[k], ref[k], low[k].to(dtype), k)


def test_adaln_trunk_rejects_mixed_dtypes():
    inp = _trunk_inputs(M=5, W=16, D=1, O=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="one dtype"):
        K.adaln_trunk(inp["x"].half(), inp["c"], inp["ada_w"], inp["ada_b"], inp["blocks"], inp["final_w"],
                      inp["final_b"])
    with pytest.raises(ValueError, match="ada_w/ada_b"):
        K.adaln_trunk(inp["x"], inp["c"], inp["ada_w"][:-1], inp["ada_b"], inp["blocks"], inp["final_w"],
                      inp["final_b"])


# ------------------------------------------------------------------------------------ whole module
def _module_grads(net, x, t, z, g):
    x, z = x.clone().requires_grad_(), z.clone().requires_grad_()
    out = net(x, t, z)
    out.backward(g.to(out.dtype))
    res = {"out": out.detach(), "dx": x.grad, "dz": z.grad}
    res.update({n: p.grad for n, p in net.named_parameters()})
    return res


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_fused_module_matches_reference(dtype):
    """Same weights, impl='triton' vs eager: outputs, input grads and ALL parameter grads."""
    torch.manual_seed(0)
    # target 13 -> padded to 16 inside, output 26 -> 32: the 588 -> 592 / 1176 -> 1184 paths
    base = DiffusionDecoder(target_dim=13, cond_dim=20, width=40, depth=2, learn_sigma=True).to(DEV)
    with torch.no_grad():
        for p in base.parameters():   # leave the zero init: every path must carry signal
            p.normal_(0, 0.2)
    M = 37
    x, z = torch.randn(M, 13, device=DEV), torch.randn(M, 20, device=DEV)
    t = torch.randint(0, 1000, (M,), device=DEV)
    g = torch.randn(M, 26, device=DEV)

    fused = copy.deepcopy(base).to(dtype)
    fused.impl = "triton"
    assert fused.state_dict().keys() == base.state_dict().keys()
    out = _module_grads(fused, x.to(dtype), t, z.to(dtype), g)
    ref = _module_grads(copy.deepcopy(base).double(), x.double(), t, z.double(), g.double())
    low = _module_grads(copy.deepcopy(base).to(dtype), x.to(dtype), t, z.to(dtype), g)
    assert set(out) == set(ref)
    for k in ref:
        check_close(out[k], ref[k], low[k].to(dtype), k)


def test_padded_widths_reach_the_gemms_aligned(monkeypatch):
    """588 -> 592 and 1176 -> 1184: the input and final GEMMs see multiples of 8, the output does not."""
    seen = []
    real = K._linear_fwd
    monkeypatch.setattr(K, "_linear_fwd", lambda x, w, b: seen.append((x.shape[1], w.shape[0])) or real(x, w, b))
    net = DiffusionDecoder(target_dim=13, cond_dim=20, width=24, depth=1, learn_sigma=True, impl="triton")
    out = net(torch.randn(5, 13), torch.randint(0, 1000, (5,)), torch.randn(5, 20))
    assert out.shape == (5, 26)
    assert (16, 24) in seen and (24, 32) in seen, seen      # padded input K, padded final N
    assert all(k % 8 == 0 or k in (20,) for k, _ in seen), seen


def test_frozen_parameters_get_no_weight_gradient_gemm(monkeypatch):
    """Freeze the MLP weights of block 0 and every adaLN Linear: those get no dW GEMM and no grad;
    everything else still matches the eager reference."""
    torch.manual_seed(0)
    base = DiffusionDecoder(target_dim=12, cond_dim=16, width=24, depth=2, learn_sigma=False)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.2)
    frozen = {"res_blocks.0.mlp.0.weight", "res_blocks.0.mlp.2.weight", "res_blocks.0.mlp.0.bias",
              "final_layer.linear.weight", "cond_embed.weight"}
    frozen |= {n for n, _ in base.named_parameters() if "adaLN" in n}
    for n, p in base.named_parameters():
        p.requires_grad_(n not in frozen)
    M = 21
    x, z, t, g = torch.randn(M, 12), torch.randn(M, 16), torch.randint(0, 1000, (M,)), torch.randn(M, 12)
    shapes = []
    real = K.weight_grad
    monkeypatch.setattr(K, "weight_grad", lambda dy, x: shapes.append((dy.shape[1], x.shape[1])) or real(dy, x))
    fused = copy.deepcopy(base)
    fused.impl = "triton"
    out = _module_grads(fused, x, t, z, g)
    ref = _module_grads(copy.deepcopy(base).double(), x.double(), t, z.double(), g.double())
    low = _module_grads(copy.deepcopy(base), x, t, z, g)
    for k in ref:
        if k in frozen:
            assert out[k] is None, f"{k} is frozen but got a gradient"
        else:
            check_close(out[k], ref[k], low[k], k)
    # dW GEMMs that remain: time MLP (2), input_proj, block 1 (w1, w2); none for adaLN (N = 3W / 2W),
    # block 0, the final Linear or cond_embed
    assert sorted(shapes) == sorted([(24, 256), (24, 24), (24, 16), (24, 24), (24, 24)]), shapes


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_fp32_mode_ignores_autocast_and_turns_tf32_off(impl, monkeypatch):
    """dtype='fp32': fp32 maths whatever autocast says. Eager: TF32 off during the call (restored
    after); triton: no global switch, its ops carry the precision (tests/test_decoder_precision.py
    records it at every GEMM, forward and backward)."""
    import ivfast.models.diffusion as D
    torch.manual_seed(0)
    net = DiffusionDecoder(target_dim=12, cond_dim=16, width=24, depth=1, impl=impl, dtype="fp32")
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    x, z, t = torch.randn(9, 12), torch.randn(9, 16), torch.randint(0, 1000, (9,))
    inside = []
    real = D.DiffusionDecoder._forward_eager if impl == "eager" else D.DiffusionDecoder.forward_triton
    def spy(self, *a):
        inside.append((torch.backends.cuda.matmul.fp32_precision, torch.is_autocast_enabled("cpu")))
        return real(self, *a)
    monkeypatch.setattr(D.DiffusionDecoder, "_forward_eager" if impl == "eager" else "forward_triton", spy)
    before = torch.backends.cuda.matmul.fp32_precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, z)
    assert out.dtype == torch.float32
    assert inside == ([("ieee", False)] if impl == "eager" else [(before, True)]), inside
    assert torch.backends.cuda.matmul.fp32_precision == before
    net.dtype = "auto"
    torch.testing.assert_close(out, net.forward_reference(x, t, z), rtol=1e-4, atol=1e-5)
    net.dtype = "fp64"
    with pytest.raises(ValueError, match="model.decoder.dtype"):
        net(x, t, z)


def test_triton_impl_falls_back_with_a_warning_where_it_cannot_run(monkeypatch):
    import ivfast.models.diffusion as D
    monkeypatch.setattr(D, "_triton_runnable", lambda device: (False, "no GPU and no interpreter"))
    net = DiffusionDecoder(target_dim=6, cond_dim=4, width=16, depth=1, impl="triton")
    with pytest.warns(UserWarning, match="falls back to eager PyTorch: no GPU"):
        net(torch.randn(3, 6), torch.zeros(3, dtype=torch.long), torch.randn(3, 4))


# ------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
def test_fused_module_bf16_autocast_matches_reference():
    torch.manual_seed(0)
    base = DiffusionDecoder(target_dim=588, cond_dim=1024, width=1536, depth=2).cuda()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.02)
    M = 1000
    x, z = torch.randn(M, 588, device="cuda"), torch.randn(M, 1024, device="cuda")
    t = torch.randint(0, 1000, (M,), device="cuda")
    g = torch.randn(M, 1176, device="cuda")
    fused = copy.deepcopy(base)
    fused.impl = "triton"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = _module_grads(fused, x, t, z, g)
        low = _module_grads(copy.deepcopy(base), x, t, z, g)
    ref = _module_grads(copy.deepcopy(base).double(), x.double(), t, z.double(), g.double())
    for k in ref:
        o, lo = out[k], low[k]
        check_close(o.to(torch.bfloat16) if o.dtype == torch.float32 else o, ref[k],
                    lo.to(torch.bfloat16) if lo.dtype == torch.float32 else lo, k)


@pytest.mark.gpu
@pytest.mark.parametrize("W", [1536, 2000])
def test_bf16_trunk_matches_reference(W):
    torch.manual_seed(0)
    inp = _trunk_inputs(M=3000, W=W, D=2, O=1176, dtype=torch.bfloat16)
    out = _trunk_grads(inp, lambda t: t.clone(), K.adaln_trunk)
    ref = _trunk_grads(inp, lambda t: t.double(), K.adaln_trunk_reference)
    low = _trunk_grads(inp, lambda t: t.clone(), K.adaln_trunk_reference)
    for k in ref:
        check_close(out[k], ref[k], low[k], k)


@pytest.mark.gpu
@pytest.mark.slow
def test_int64_offsets_past_2_31_elements():
    """rows x width > 2^31: int32 offsets would wrap and touch the wrong rows."""
    W = 1536
    M = (2 ** 31) // W + 77
    x = torch.randn(M, W, device="cuda", dtype=torch.bfloat16)
    ss = torch.randn(M, 2 * W, device="cuda", dtype=torch.bfloat16)
    h = K.ln_modulate(x, None, None, ss[:, :W], ss[:, W:])
    tail = slice(M - 100, M)
    check_close(h[tail], _ln_mod_torch(x[tail].double(), None, None, ss[tail, :W].double(), ss[tail, W:].double()),
                _ln_mod_torch(x[tail], None, None, ss[tail, :W], ss[tail, W:]), "ln tail rows")
    y, h = K.residual_ln_modulate(x, x, ss[:, :W], None, None, ss[:, :W], ss[:, W:])
    check_close(y[tail], x[tail].double() * (1 + ss[tail, :W].double()), x[tail] * (1 + ss[tail, :W]),
                "residual tail rows")


def test_trunk_without_grad_gives_the_same_output():
    """No grad (the sampler): the lean forward that stores no pre-activations gives the same result."""
    torch.manual_seed(0)
    inp = _trunk_inputs(M=21, W=24, D=1, O=10, dtype=torch.float32)
    args = (inp["x"], inp["c"], inp["ada_w"], inp["ada_b"], inp["blocks"], inp["final_w"], inp["final_b"])
    with torch.no_grad():
        lean = K.adaln_trunk(*args)
    x = inp["x"].clone().requires_grad_()
    full = K.adaln_trunk(x, *args[1:])
    assert full.grad_fn is not None and lean.grad_fn is None
    torch.testing.assert_close(lean, full.detach(), rtol=0, atol=0)


def test_diffusion_loss_triton_matches_eager():
    """The loss module on impl='triton' (same seed -> same t and noise): same loss terms and grads."""
    from ivfast.config import DecoderConfig
    from ivfast.models.diffusion import DiffusionLoss
    torch.manual_seed(0)
    eager = DiffusionLoss(DecoderConfig(depth=1, width=32, batch_mul=2, impl="eager"), target_dim=12, cond_dim=16)
    with torch.no_grad():
        for p in eager.parameters():
            p.normal_(0, 0.2)
    fused = copy.deepcopy(eager)
    fused.net.impl = "triton"
    target, z = torch.randn(13, 12), torch.randn(13, 16)
    res = []
    for m in (eager, fused):
        torch.manual_seed(7)
        zz = z.clone().requires_grad_()
        out = m(target, zz)
        out["loss"].backward()
        res.append((out, zz.grad, m.net.res_blocks[0].mlp[0].weight.grad))
    (o1, gz1, gw1), (o2, gz2, gw2) = res
    for k in ("loss", "mse", "vlb"):
        torch.testing.assert_close(o2[k], o1[k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gz2, gz1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw2, gw1, rtol=1e-4, atol=1e-5)


def _saved_activation_bytes(net, x, t, z) -> int:
    """Bytes of distinct row-shaped tensors ([rows, ...]) the autograd graph keeps for backward."""
    rows, seen = x.shape[0], {}

    def pack(tensor):
        if tensor.dim() >= 1 and tensor.shape[0] == rows:
            st = tensor.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x, t, z.requires_grad_())
    del out
    return sum(seen.values())


def test_fused_module_saves_less_activation_memory_than_eager():
    torch.manual_seed(0)
    net = DiffusionDecoder(target_dim=12, cond_dim=20, width=32, depth=3).to(DEV)
    M = 64
    x, z, t = torch.randn(M, 12, device=DEV), torch.randn(M, 20, device=DEV), torch.randint(0, 1000, (M,), device=DEV)
    eager = _saved_activation_bytes(net, x, t, z)
    net.impl = "triton"
    fused = _saved_activation_bytes(net, x, t, z)
    assert fused < 0.8 * eager, (fused, eager)


def decoder_launches():
    """One fwd+bwd of the Triton decoder at the real width (1536; few rows, fp16; bf16 is added
    by the compiler helper), with the GPU's block settings rather than the interpreter's."""
    real = K._INTERPRET
    K._INTERPRET = False                  # record the BLOCK_R / BLOCK_W / warps a GPU launch uses
    try:
        torch.manual_seed(0)
        net = DiffusionDecoder(target_dim=588, cond_dim=64, width=1536, depth=1, impl="triton").half()
        x, z = torch.randn(32, 588).half(), torch.randn(32, 64).half().requires_grad_()
        net(x, torch.randint(0, 1000, (32,)), z).float().sum().backward()
    finally:
        K._INTERPRET = real


def _spill_table(resources):
    return "\n".join(f"{r['kernel']:>20} sm_{r['arch']} {r['constexprs']} warps={r['options'].get('num_warps')}: "
                      f"{r['n_regs']} regs, {r['spill_stores']} B spill stores" for r in resources)


@pytest.mark.slow
def test_kernels_compile_for_real_gpus_without_spills():
    """The interpreter does not compile: build every kernel launch the decoder makes (recorded
    with the runtime's divisibility hints) for sm_80 and sm_90, fp16 and bf16, with Triton's
    bundled ptxas, and require zero spill bytes (no spilling config anywhere).
    Run with ``-s`` to print registers / spills per kernel."""
    from kernel_compile import compile_specs, record_launches, with_bf16_variants
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("records launches through the Triton interpreter (CPU-only machines)")
    specs = record_launches(decoder_launches, hints=True)
    names = {s["name"] for s in specs}
    assert names == {"_ln_mod_fwd_kernel", "_ln_mod_bwd_kernel", "_gate_bwd_kernel", "_dsilu_bwd_kernel"}, names
    # what a fresh process JIT-compiles before its first decoder step (was ~90 autotuned GEMM
    # binaries): a handful of fixed-config row kernels, nothing to benchmark
    assert len(specs) <= 10, [(s["name"], s["constexprs"]) for s in specs]
    result = compile_specs(with_bf16_variants(specs), targets=(80, 90), report=True)
    assert not result["failures"], "\n\n".join(result["failures"][:3])
    print("\n" + _spill_table(result["resources"]))
    spilling = [r for r in result["resources"] if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, _spill_table(spilling)


# ------------------------------------------------------------------------------------ custom ops, compile, fake tensors
@pytest.mark.slow
def test_decoder_custom_ops_pass_opcheck():
    """Schema, fake implementation, autograd registration and AOT tracing of the four decoder ops
    (forward ops with a frozen input, backward ops with some gradients not asked for)."""
    torch.manual_seed(0)
    M, W, D, O = 7, 16, 1, 10
    r = lambda *s, grad=True: torch.randn(*s, device=DEV, requires_grad=grad)
    blocks = [r(W), r(W), r(W, W), r(W, grad=False), r(W, W), r(W)]
    x, c, ada_w, ada_b, fw, fb = r(M, W), r(M, W), r((3 * D + 2) * W, W), r((3 * D + 2) * W), r(O, W), r(O)
    ops = torch.ops.ivfast
    cases = [
        (ops.adaln_trunk.default, (x, c, ada_w, ada_b, fw, fb, blocks, 1e-6, True, True)),
        (ops.adaln_trunk.default, (x.detach(), c.detach(), ada_w.detach(), ada_b.detach(), fw.detach(),
                                   fb.detach(), [b.detach() for b in blocks], 1e-6, False, False)),
        (ops.adaln_trunk_backward.default,
         (r(M, O, grad=False), c.detach(), r(M, (3 * D + 2) * W, grad=False), ada_w.detach(), fw.detach(),
          r(M, W, grad=False), [r(M, W, grad=False) for _ in range(3 * D)], [b.detach() for b in blocks], 1e-6,
          [True, False, True, False, True, True] + [True, False, True, True, False, True], True)),
        (ops.decoder_linear.default, (r(M, W), r(O, W), r(O), True, True, True)),
        (ops.decoder_linear.default, (r(M, W), r(O, W, grad=False), None, False, False, True)),
        (ops.decoder_linear_backward.default,
         (r(M, O, grad=False), r(M, W, grad=False), r(O, W, grad=False), r(M, O, grad=False), True, True, False,
          True, True)),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "auto"])
def test_compiled_decoder_loss_has_no_graph_break(dtype):
    """What torch.compile sees of the stage-1 decoder (the DiffusionLoss module trainer.py compiles):
    one graph, with the decoder as ivfast custom ops, for every model.decoder.dtype."""
    from ivfast.config import DecoderConfig
    from ivfast.models.diffusion import DiffusionLoss
    torch.manual_seed(0)
    loss = DiffusionLoss(DecoderConfig(depth=2, width=32, dtype=dtype), target_dim=13, cond_dim=16).to(DEV)
    target, z = torch.randn(11, 13, device=DEV), torch.randn(11, 16, device=DEV, requires_grad=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss)(target, z)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    ops = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert "ivfast.adaln_trunk.default" in ops and ops.count("ivfast.decoder_linear.default") == 4, ops


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compiled_decoder_forward_backward_matches_eager(dtype):
    """fullgraph=True (any graph break raises); AOT autograd traces the registered backward through
    the fake backward ops and runs it: same output and gradients as the uncompiled module."""
    torch.manual_seed(0)
    net = DiffusionDecoder(target_dim=13, cond_dim=20, width=24, depth=2, impl="triton", dtype=dtype).to(DEV)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    x, t, z0 = torch.randn(9, 13, device=DEV), torch.randint(0, 1000, (9,), device=DEV), torch.randn(9, 20, device=DEV)
    res = []
    torch._dynamo.reset()
    for compiled in (False, True):
        m = copy.deepcopy(net)
        f = torch.compile(m, backend="aot_eager", fullgraph=True) if compiled else m
        z = z0.clone().requires_grad_()
        out = f(x, t, z)
        out.float().square().sum().backward()
        res.append([out.detach(), z.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_decoder_runs_on_fake_tensors_at_stage1_size(dtype):
    """The stage-1 decoder (W1536, D6) forward + backward on fake tensors (no data, no kernel
    launch): the ops' fake implementations give every output and gradient shape and dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    want = torch.float32 if dtype == "fp32" else torch.bfloat16
    with FakeTensorMode(), torch.device(DEV):
        net = DiffusionDecoder(target_dim=588, cond_dim=1024, width=1536, depth=6, impl="triton", dtype=dtype)
        rows = 16 * 1176                     # masked patches of 16 stage-1 clips
        x, t = torch.randn(rows, 588, device=DEV), torch.randint(0, 1000, (rows,), device=DEV)
        z = torch.randn(rows, 1024, device=DEV, requires_grad=True)
        out = net(x, t, z)
        out.float().sum().backward()
        assert out.shape == (rows, 1176) and out.dtype == want
        assert z.grad.shape == z.shape
        assert all(p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == torch.float32
                   for p in net.parameters())


@pytest.mark.parametrize("frozen", [False, True])
def test_flop_counter_counts_the_custom_ops_like_the_eager_gemms(frozen):
    """FlopCounterMode cannot look inside a custom op: the ops' FLOP formulas give it the GEMMs
    they run, equal to the eager module's count (fwd + bwd; widths need no padding here), with
    frozen layers' weight gradients left out as the ops leave them out."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    base = DiffusionDecoder(target_dim=16, cond_dim=24, width=40, depth=2, learn_sigma=True).to(DEV)
    if frozen:
        for n, p in base.named_parameters():
            p.requires_grad_(not (n.startswith("res_blocks.0.mlp") or "adaLN" in n or n.startswith("cond_embed")))
    x, t = torch.randn(11, 16, device=DEV), torch.randint(0, 1000, (11,), device=DEV)
    counts = []
    for impl in ("eager", "triton"):
        net = copy.deepcopy(base)
        net.impl = impl
        z = torch.randn(11, 24, device=DEV, requires_grad=True)
        with FlopCounterMode(display=False) as fc:
            net(x, t, z).sum().backward()
        counts.append(fc.get_total_flops())
    assert counts[0] > 0 and counts[1] == counts[0], counts


@pytest.mark.slow
def test_compiled_stage1_model_traces_through_the_decoder():
    """The whole demo stage-1 model under dynamo: the decoder (fp32, the stage-1 default) lands in
    a graph as its custom ops, and no graph break comes from inside it (the model's other breaks,
    in masking and seeding, are not the decoder's)."""
    from ivfast.config import load_config
    from ivfast.models import build_model
    torch.manual_seed(0)
    cfg = load_config("demo", ["model.attn_backend=sdpa", "model.decoder.impl=triton", "model.decoder.dtype=fp32"])
    model = build_model(cfg).to(DEV)
    video = torch.randint(0, 256, (2, 3, 4, 56, 56), dtype=torch.uint8, device=DEV)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(video, 3)
    ops = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert ops.count("ivfast.adaln_trunk.default") == 1 and ops.count("ivfast.decoder_linear.default") == 4, ops
    in_decoder = [(r.reason, fs.lineno) for r in explained.break_reasons for fs in r.user_stack
                  if fs.filename.endswith("diffusion.py")]
    assert not in_decoder, in_decoder
