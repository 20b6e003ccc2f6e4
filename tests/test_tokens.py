"""Masked-token ops (ivfast.ops) and their Triton kernels (ivfast.kernels.tokens).

The kernels run under the Triton CPU interpreter here (tests/conftest.py), in fp32/fp16 on
small odd shapes; bf16 runs only on a GPU. References: plain indexing / torch.gather, and an
F.unfold-based patchify for the targets. Results are held to the rule of utils.check_close:
error against an fp32 reference at most ~2x PyTorch's own low-precision error, plus a small atol.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from ivfast import ops
from utils import check_close

DEV = "cuda" if torch.cuda.is_available() else "cpu"
LOWP_DTYPES = [torch.float32, torch.float16]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _perm_ids(B, N, K, seed=0, dtype=torch.int32):
    g = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    keep = perm[:, :K].sort(dim=1).values
    mask = perm[:, K:].sort(dim=1).values
    return keep.to(dtype).to(DEV), mask.to(dtype).to(DEV)


def _randn(*shape, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g).to(device=DEV, dtype=dtype)
    return t.requires_grad_(grad)


def _check(out, ref_lowp, ref32, name=""):
    """The kernel keeps PyTorch's result dtype, and its error against the fp32 reference passes the
    shared rule (at most ~2x the error PyTorch makes in the same precision)."""
    assert out.dtype == ref_lowp.dtype, f"{name}: dtype {out.dtype} != {ref_lowp.dtype}"
    check_close(out, ref32, ref_lowp, name)


def _grads(fn, inputs, gout):
    out = fn(*inputs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return out, torch.autograd.grad(out, leaves, gout)


# =========================================================================== gather
def test_references_match_loops():
    B, N, K, C = 2, 11, 4, 5
    x, pos = _randn(B, N, C), _randn(N, C, seed=1)
    keep, mask = _perm_ids(B, N, K)
    out = ops.gather_tokens(x, keep, pos)
    for b in range(B):
        for k in range(K):
            n = int(keep[b, k])
            torch.testing.assert_close(out[b, k], x[b, n] + pos[n])
    vis, mt = _randn(B, K, C, seed=2), _randn(C, seed=3)
    full = ops.assemble_sequence(vis, keep, mask, mt, pos)
    for b in range(B):
        for k in range(K):
            torch.testing.assert_close(full[b, int(keep[b, k])], vis[b, k] + pos[int(keep[b, k])])
        for m in range(N - K):
            torch.testing.assert_close(full[b, int(mask[b, m])], mt + pos[int(mask[b, m])])


@pytest.mark.parametrize("dtype", LOWP_DTYPES)
@pytest.mark.parametrize("B,N,K,C,with_pos,id_dtype", [
    (2, 37, 9, 19, True, torch.int32),
    (3, 50, 17, 300, True, torch.int64),     # C over one 256-wide block, rows not a block multiple
    (1, 23, 23, 8, False, torch.int32),      # K = N (all picked), feature picking without pos
    (2, 40, 5, 33, False, torch.int64),
    (1, 9, 4, 1536, True, torch.int32),      # the decoder / teacher width
])
def test_gather_forward_backward(dtype, B, N, K, C, with_pos, id_dtype):
    ids, _ = _perm_ids(B, N, K, seed=B + N, dtype=id_dtype)
    x32, pos32 = _randn(B, N, C, seed=1), _randn(N, C, seed=2) if with_pos else None
    gout32 = _randn(B, K, C, seed=3)
    leaves32 = [x32.requires_grad_(True)] + ([pos32.requires_grad_(True)] if with_pos else [])
    x = x32.detach().to(dtype).requires_grad_(True)
    pos = pos32.detach().to(dtype).requires_grad_(True) if with_pos else None

    out, g = _grads(lambda a, p: ops.gather_tokens(a, ids, p, impl="triton"), (x, pos), gout32.to(dtype))
    ref, gref = _grads(lambda a, p: ops.gather_tokens(a, ids, p), (x, pos), gout32.to(dtype))
    ref32, g32 = _grads(lambda a, p: ops.gather_tokens(a, ids, p), (x32, pos32), gout32)
    _check(out, ref, ref32, "out")
    for name, a, r, r32 in zip(["grad_x", "grad_pos"], g, gref, g32):
        _check(a, r, r32, name)
    assert len(g) == len(leaves32)


def test_gather_mixed_dtypes_and_strided_view():
    """bf16/fp16 tokens + fp32 table promote like PyTorch; a [:, cls:] view needs no copy."""
    B, N, C, cls = 2, 21, 12, 4
    ids, _ = _perm_ids(B, N, 6, seed=5, dtype=torch.int64)
    full = _randn(B, cls + N, C, dtype=torch.float16, seed=4, grad=True)
    pos = _randn(N, C, seed=6, grad=True)
    gout = _randn(B, 6, C, seed=7)
    out, (gf, gp) = _grads(lambda f, p: ops.gather_tokens(f[:, cls:], ids, p, impl="triton"), (full, pos), gout)
    ref, (rf, rp) = _grads(lambda f, p: ops.gather_tokens(f[:, cls:], ids, p), (full, pos), gout)
    assert out.dtype == torch.float32 == ref.dtype
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gf, rf)
    torch.testing.assert_close(gp, rp)
    assert gf[:, :cls].abs().sum() == 0


@pytest.mark.parametrize("grad_x,grad_pos", [(True, False), (False, True), (False, False)])
def test_gather_partial_grads(grad_x, grad_pos):
    B, N, K, C = 2, 19, 7, 10
    ids, _ = _perm_ids(B, N, K, seed=8)
    x = _randn(B, N, C, seed=9, grad=grad_x)
    pos = _randn(N, C, seed=10, grad=grad_pos)
    out = ops.gather_tokens(x, ids, pos, impl="triton")
    torch.testing.assert_close(out, ops.gather_tokens(x, ids, pos))
    assert out.requires_grad == (grad_x or grad_pos)
    if out.requires_grad:
        out.sum().backward()
        assert (x.grad is not None) == grad_x and (pos.grad is not None) == grad_pos
        if grad_pos:   # every picked token contributes 1 per batch element
            counts = torch.zeros(N, device=DEV).index_add_(0, ids.long().flatten(), torch.ones(B * K, device=DEV))
            torch.testing.assert_close(pos.grad, counts[:, None].expand(N, C))


# =========================================================================== assemble
@pytest.mark.parametrize("dtype", LOWP_DTYPES)
@pytest.mark.parametrize("B,N,K,C,with_pos", [
    (2, 37, 9, 19, True),
    (3, 45, 11, 300, True),
    (2, 30, 29, 16, False),     # a single masked position
    (1, 17, 1, 7, True),        # a single visible position
    (2, 9, 4, 1536, True),      # the decoder / teacher width
])
def test_assemble_forward_backward(dtype, B, N, K, C, with_pos):
    keep, mask = _perm_ids(B, N, K, seed=N + C)
    vis32, mt32 = _randn(B, K, C, seed=1), _randn(C, seed=2)
    pos32 = _randn(N, C, seed=3) if with_pos else None
    gout32 = _randn(B, N, C, seed=4)
    vis32.requires_grad_(True)
    mt32.requires_grad_(True)
    if with_pos:
        pos32.requires_grad_(True)
    vis = vis32.detach().to(dtype).requires_grad_(True)
    mt = mt32.detach().to(dtype).requires_grad_(True)
    pos = pos32.detach().to(dtype).requires_grad_(True) if with_pos else None

    def run(impl):
        return lambda v, m, p: ops.assemble_sequence(v, keep, mask, m, p, impl=impl)
    out, g = _grads(run("triton"), (vis, mt, pos), gout32.to(dtype))
    ref, gref = _grads(run("eager"), (vis, mt, pos), gout32.to(dtype))
    ref32, g32 = _grads(run("eager"), (vis32, mt32, pos32), gout32)
    _check(out, ref, ref32, "out")
    for name, a, r, r32 in zip(["grad_visible", "grad_mask_token", "grad_pos"], g, gref, g32):
        _check(a, r, r32, name)


def test_assemble_mask_token_grad_is_deterministic():
    B, N, K, C = 4, 60, 12, 40
    keep, mask = _perm_ids(B, N, K, seed=11)
    vis, mt, pos = _randn(B, K, C, seed=12), _randn(C, seed=13, grad=True), _randn(N, C, seed=14, grad=True)
    gout = _randn(B, N, C, seed=15) * 1e3
    runs = [torch.autograd.grad(ops.assemble_sequence(vis, keep, mask, mt, pos, impl="triton"), (mt, pos), gout)
            for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# =========================================================================== patch targets
def _targets_unfold(video, ids, patch, tubelet, mean, std, norm_pix, eps=1e-6):
    """Independent reference: F.unfold per tubelet group gives (c, t, ph, pw) columns."""
    v = video.float()
    if mean is not None:
        u = 1 / 255 if video.dtype == torch.uint8 else 1.0
        v = (v * u - torch.tensor(mean, device=v.device).view(1, 3, 1, 1, 1)) \
            / torch.tensor(std, device=v.device).view(1, 3, 1, 1, 1)
    B, _, T, H, W = v.shape
    rows = []
    for t0 in range(0, T, tubelet):
        grp = v[:, :, t0:t0 + tubelet].reshape(B, 3 * tubelet, H, W)        # channels (c, t)
        rows.append(F.unfold(grp, kernel_size=patch, stride=patch).transpose(1, 2))  # [B, L, (c,t,ph,pw)]
    allp = torch.cat(rows, dim=1)
    out = torch.stack([allp[b, ids[b].long()] for b in range(B)])
    if norm_pix:
        out = (out - out.mean(-1, keepdim=True)) / (out.var(-1, unbiased=True, keepdim=True) + eps).sqrt()
    return out


@pytest.mark.parametrize("vdtype", [torch.uint8, torch.float32, torch.float16])
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("tubelet,patch,T,H,W,normalise", [
    (1, 14, 3, 28, 42, True),
    (2, 14, 4, 14, 28, True),
    (1, 5, 2, 15, 10, False),
])
def test_patch_targets(vdtype, norm_pix, tubelet, patch, T, H, W, normalise):
    B = 2
    g = torch.Generator().manual_seed(T * H + W)
    if vdtype == torch.uint8:
        video = torch.randint(0, 256, (B, 3, T, H, W), generator=g, dtype=torch.uint8)
    else:
        video = torch.rand(B, 3, T, H, W, generator=g).to(vdtype)
    video = video.to(DEV)
    L = (T // tubelet) * (H // patch) * (W // patch)
    _, ids = _perm_ids(B, L, L // 3, seed=L)
    mean, std = (MEAN, STD) if normalise else (None, None)
    out = ops.patch_targets(video, ids, patch, tubelet, mean, std, norm_pix=norm_pix, impl="triton")
    ref = ops.patch_targets(video, ids, patch, tubelet, mean, std, norm_pix=norm_pix)
    indep = _targets_unfold(video, ids, patch, tubelet, mean, std, norm_pix)
    assert out.dtype == torch.float32 and out.shape == (B, ids.shape[1], 3 * tubelet * patch * patch)
    torch.testing.assert_close(ref, indep, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, indep, rtol=1e-5, atol=1e-5)


def test_patch_targets_channels_last_input():
    """A [B, T, H, W, 3] loader clip passed as a permuted view gives the same targets, no copy."""
    g = torch.Generator().manual_seed(3)
    clip = torch.randint(0, 256, (2, 2, 28, 28, 3), generator=g, dtype=torch.uint8).to(DEV)
    video = clip.permute(0, 4, 1, 2, 3)
    assert not video.is_contiguous()
    _, ids = _perm_ids(2, 8, 3, seed=4)
    out = ops.patch_targets(video, ids, 14, 1, MEAN, STD, norm_pix=True, impl="triton")
    torch.testing.assert_close(out, _targets_unfold(video.contiguous(), ids, 14, 1, MEAN, STD, True))


# =========================================================================== dispatch and errors
def test_compile_impl_matches_eager():
    B, N, K, C = 2, 13, 5, 6
    keep, mask = _perm_ids(B, N, K, seed=20)
    x, pos = _randn(B, N, C, seed=21, grad=True), _randn(N, C, seed=22, grad=True)
    out = ops.gather_tokens(x, keep, pos, impl="compile")
    gx, gp = torch.autograd.grad(out.sum(), (x, pos))
    ref = ops.gather_tokens(x, keep, pos)
    rx, rp = torch.autograd.grad(ref.sum(), (x, pos))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gp, rp)


def test_triton_impl_traces_into_torch_compile_without_graph_breaks():
    """The kernels are torch.library custom ops: a compiled model keeps them in one graph."""
    B, N, K, C = 2, 13, 5, 6
    keep, mask = _perm_ids(B, N, K, seed=23)
    x, pos = _randn(B, N, C, seed=24, grad=True), _randn(N, C, seed=25, grad=True)
    mt = _randn(C, seed=26, grad=True)
    video = torch.randint(0, 256, (B, 3, 1, 14, 13 * 14), dtype=torch.uint8).to(DEV)

    def step(x, pos, mt):
        vis = ops.gather_tokens(x, keep, pos, impl="triton")
        full = ops.assemble_sequence(vis * 2, keep, mask, mt, pos, impl="triton")
        tgt = ops.patch_targets(video, mask, 14, 1, MEAN, STD, impl="triton")
        return full.square().sum() + tgt.sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, pos, mt), (x, pos, mt))
    want = torch.autograd.grad(step(x, pos, mt), (x, pos, mt))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def _no_host_tensors(monkeypatch):
    """Make building a tensor from Python numbers fail (on a GPU each is a blocking host copy)."""
    def boom(*a, **k):
        raise AssertionError("a tensor was built from host values in the step path")
    monkeypatch.setattr(torch, "tensor", boom)
    monkeypatch.setattr(torch.Tensor, "new_tensor", boom)


def test_patch_targets_reuse_device_constants(monkeypatch):
    """eager and compile build their mean/std vectors once per device, not every call."""
    a = ops.channel_constant(MEAN, DEV)
    assert a is ops.channel_constant(list(MEAN), torch.device(DEV)) and a.dtype == torch.float32
    video = torch.randint(0, 256, (2, 3, 2, 28, 42), dtype=torch.uint8).to(DEV)
    _, ids = _perm_ids(2, 2 * 2 * 3, 5, seed=40)
    want = _targets_unfold(video, ids, 14, 1, MEAN, STD, False)
    for impl in ("eager", "compile"):
        ops.patch_targets(video, ids, 14, 1, MEAN, STD, impl=impl)          # first call: constants made
    with monkeypatch.context() as mp:
        _no_host_tensors(mp)
        for impl in ("eager", "compile"):
            torch.testing.assert_close(ops.patch_targets(video, ids, 14, 1, MEAN, STD, impl=impl), want)


@pytest.mark.skipif(DEV != "cpu", reason="tests the CPU fallback")
def test_triton_impl_falls_back_to_reference_without_interpreter(monkeypatch):
    import ivfast.kernels.tokens as kt

    def boom(*a, **k):
        raise AssertionError("kernel called on CPU without the interpreter")
    monkeypatch.setattr(kt, "gather_tokens_triton", boom)
    monkeypatch.setattr(kt, "assemble_sequence_triton", boom)
    monkeypatch.setattr(kt, "patch_targets_triton", boom)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    keep, mask = _perm_ids(1, 8, 3)
    x = _randn(1, 8, 4)
    torch.testing.assert_close(ops.gather_tokens(x, keep, impl="triton"), ops.gather_tokens(x, keep))
    ops.assemble_sequence(x[:, :3], keep, mask, x[0, 0], impl="triton")
    ops.patch_targets(torch.zeros(1, 3, 1, 28, 56, dtype=torch.uint8), keep, impl="triton")


def test_bad_inputs_name_the_problem():
    x = _randn(2, 10, 4)
    keep, mask = _perm_ids(2, 10, 3)
    with pytest.raises(ValueError, match="impl"):
        ops.gather_tokens(x, keep, impl="cuda")
    with pytest.raises(TypeError, match="int32 or int64"):
        ops.gather_tokens(x, keep.float())
    with pytest.raises(ValueError, match=r"\[B=2"):
        ops.gather_tokens(x, keep[:1])
    with pytest.raises(ValueError, match="pos\\[0\\]"):
        ops.gather_tokens(x, keep, _randn(1, 10, 4))
    with pytest.raises(ValueError, match="visible has K=4"):
        ops.assemble_sequence(x[:, :4], keep, mask, x[0, 0])
    with pytest.raises(ValueError, match="mask_token"):
        ops.assemble_sequence(x[:, :3], keep, mask, _randn(5))
    with pytest.raises(ValueError, match="multiples"):
        ops.patch_targets(torch.zeros(2, 3, 1, 20, 28), keep)
    with pytest.raises(ValueError, match="permute"):
        ops.patch_targets(torch.zeros(2, 1, 28, 28, 3), keep)
    with pytest.raises(RuntimeError):   # eager path checks the ids' range
        ops.gather_tokens(x, keep + 10)


# =========================================================================== GPU only
@pytest.mark.gpu
def test_bf16_on_gpu():
    B, N, K, C = 3, 301, 61, 768
    keep, mask = _perm_ids(B, N, K, seed=30)
    x32, pos32, vis32, mt32 = _randn(B, N, C, seed=31), _randn(N, C, seed=32), _randn(B, K, C, seed=33), _randn(C, seed=34)
    bf = torch.bfloat16
    for name, fn, args32 in [
        ("gather", lambda impl, a, p: ops.gather_tokens(a, keep, p, impl=impl), (x32, pos32)),
        ("assemble", lambda impl, v, m, p: ops.assemble_sequence(v, keep, mask, m, p, impl=impl), (vis32, mt32, pos32)),
    ]:
        args = [a.to(bf).requires_grad_(True) for a in args32]
        a32 = [a.clone().requires_grad_(True) for a in args32]
        out = fn("triton", *args)
        gout = torch.randn_like(out)
        g = torch.autograd.grad(out, args, gout)
        ref = fn("eager", *args)
        gref = torch.autograd.grad(ref, args, gout)
        ref32 = fn("eager", *a32)
        g32 = torch.autograd.grad(ref32, a32, gout.float())
        _check(out, ref, ref32, name)
        for a, r, r32 in zip(g, gref, g32):
            _check(a, r, r32, name + " grad")
    video = torch.randint(0, 256, (B, 3, 4, 56, 70), dtype=torch.uint8, device=DEV)
    _, ids = _perm_ids(B, 4 * 4 * 5, 50, seed=35)
    out = ops.patch_targets(video.to(bf), ids, 14, 1, None, None, norm_pix=True, impl="triton")
    torch.testing.assert_close(out, _targets_unfold(video.to(bf), ids, 14, 1, None, None, True))


@pytest.mark.gpu
def test_patch_targets_no_host_sync_on_gpu():
    video = torch.randint(0, 256, (2, 3, 2, 28, 42), dtype=torch.uint8, device=DEV)
    _, ids = _perm_ids(2, 2 * 2 * 3, 5, seed=41)
    for impl in ops.IMPLS:
        ops.patch_targets(video, ids, 14, 1, MEAN, STD, impl=impl)          # warm-up: constants, compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for impl in ops.IMPLS:
            ops.patch_targets(video, ids, 14, 1, MEAN, STD, impl=impl)
    finally:
        torch.cuda.set_sync_debug_mode(0)
