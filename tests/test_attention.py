"""Attention entry point: every backend available here agrees with the math reference."""
import pytest
import torch
import torch.nn.functional as F

from ivfast.models import attention as A


def _qkv(B=2, N=37, H=3, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N, H, D, generator=g, dtype=torch.float32).to(dtype).requires_grad_() for _ in range(3)]


def _naive(q, k, v, window=None):
    """Loop-free but independent of the module: explicit per-pair mask and softmax in float64."""
    B, N, H, D = q.shape
    s = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) / D ** 0.5
    if window is not None:
        i = torch.arange(N)[:, None]
        j = torch.arange(k.shape[1])[None]
        s = s.masked_fill((i - j).abs() > window, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v.double())


@pytest.mark.parametrize("window", [None, 0, 5])
@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
def test_backends_match_reference(backend, window):
    q, k, v = _qkv()
    out = A.attention(q, k, v, window=window, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = _naive(q, k, v, window)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    # gradients agree with the reference too
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), g.double())
    for a, b in ((dq, rq), (dk, rk), (dv, rv)):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-3)


def test_window_is_local():
    """A key outside the window must not influence a query: perturb it and compare."""
    q, k, v = (t.detach() for t in _qkv(B=1, N=20))
    out = A.attention(q, k, v, window=3, backend="sdpa")
    v2 = v.clone()
    v2[:, 10] += 100.0
    out2 = A.attention(q, k, v2, window=3, backend="sdpa")
    changed = (out2 - out).abs().amax(dim=(0, 2, 3)) > 1e-4
    assert changed.nonzero().flatten().tolist() == list(range(7, 14))


def test_cross_attention_shapes_and_fp16():
    q = torch.randn(2, 1, 4, 8)
    k = torch.randn(2, 9, 4, 8)
    out = A.attention(q, k, k, backend="sdpa")
    torch.testing.assert_close(out, A.attention_reference(q, k, k), atol=1e-5, rtol=1e-4)
    qh, kh = q.half(), k.half()
    out16 = A.attention(qh, kh, kh, backend="auto")
    assert out16.dtype == torch.float16
    torch.testing.assert_close(out16.float(), out, atol=2e-3, rtol=2e-3)


def test_backend_report_and_errors():
    q, k, v = (t.detach() for t in _qkv(B=1, N=8))
    A.attention(q, k, v, backend="sdpa")
    rep = A.used_backends()
    assert any(name.startswith("sdpa:") for name in rep.values()), rep
    with pytest.raises(ValueError, match="unknown attention backend"):
        A.attention(q, k, v, backend="nope")
    with pytest.raises(ValueError, match="same B, H, D"):
        A.attention(q, k[:, :, :2], v, backend="sdpa")
    if A._FLASH is None:
        with pytest.raises(RuntimeError, match="flash-attn is not importable"):
            A.attention(q, k, v, backend="flash_attn")
    if A._xformers_ops() is None:
        with pytest.raises(RuntimeError, match="xformers is not installed"):
            A.attention(q, k, v, backend="xformers")


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 64])
def test_gpu_bf16_backends(window):
    q0, k0, v0 = (t.detach() for t in _qkv(B=2, N=300, H=4, D=64))
    qr, kr, vr = (t.double().requires_grad_() for t in (q0, k0, v0))
    ref = _naive(qr, kr, vr, window)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), g)
    for backend in ["sdpa", "flex", "auto"] + (["flash_attn"] if A._FLASH is not None else []):
        q, k, v = (t.cuda().bfloat16().requires_grad_() for t in (q0, k0, v0))
        out = A.attention(q, k, v, window=window, backend=backend)
        torch.testing.assert_close(out.double().cpu(), ref.detach(), atol=3e-2, rtol=3e-2)
        grads = torch.autograd.grad(out, (q, k, v), g.cuda().bfloat16())
        for a, r in zip(grads, ref_grads):
            torch.testing.assert_close(a.double().cpu(), r, atol=6e-2, rtol=6e-2)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window", [None, 4])
def test_flex_forward_matches_reference(window):
    """FlexAttention's block mask encodes the same window (CPU: forward only, PyTorch has no CPU backward)."""
    q, k, v = (t.detach() for t in _qkv(B=1, N=150, H=2, D=16))
    out = A.attention(q, k, v, window=window, backend="flex")
    torch.testing.assert_close(out.double(), _naive(q, k, v, window), atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------- mixed dtypes (torch >= 2.12 autocast)
@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_promoted_qk_with_bf16_v_runs_and_matches(backend):
    """torch >= 2.12 CUDA autocast runs rms_norm in fp32: the QK-norm hands fp32 q/k next to bf16 v.
    The entry brings all three to one compute dtype (v's bf16 outside autocast) instead of raising."""
    q, k, v = _qkv(N=33)
    vb = v.detach().bfloat16().requires_grad_()
    out = A.attention(q, k, vb, backend=backend)
    assert out.dtype == torch.bfloat16
    ref = _naive(q.bfloat16(), k.bfloat16(), vb)    # the same inputs rounded to the compute dtype
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    dq, dv = torch.autograd.grad(out.float().sum(), (q, vb))
    assert dq.dtype == torch.float32 and dv.dtype == torch.bfloat16 and dq.abs().sum() > 0


def test_compute_dtype_policy():
    f32, bf, f16 = (torch.zeros(1, 2, 1, 4, dtype=d) for d in (torch.float32, torch.bfloat16, torch.float16))
    assert A.compute_dtype(f32, f32, f32) == torch.float32
    assert A.compute_dtype(f32, f32, bf) == torch.bfloat16      # lowest precision
    assert A.compute_dtype(bf, f16, f16) == torch.float16       # tie: v's dtype
    assert A.compute_dtype(f32.double(), f32, f32) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert A.compute_dtype(f32, f32, f16) == torch.bfloat16  # autocast dtype wins
    with pytest.raises(ValueError, match="floating"):
        A.compute_dtype(f32, f32, torch.zeros(1, 2, 1, 4, dtype=torch.int32))


def _promoting_rms_norm(only_under_autocast: bool):
    """A stand-in for torch >= 2.12's CUDA autocast rule (rms_norm on the fp32 list), on the CPU."""
    real = F.rms_norm

    def fake(x, shape, weight=None, eps=None):
        y = real(x, shape, weight, eps)
        if not only_under_autocast or torch.is_autocast_enabled("cpu"):
            y = y.float()
        return y
    return fake


@pytest.mark.parametrize("only_under_autocast", [True, False])
def test_vit_block_with_autocast_promoting_norm(monkeypatch, only_under_autocast):
    """The ViT block (QK-norm -> attention) under bf16 autocast while rms_norm is promoted to fp32:
    the norms return their input dtype, the forward runs and equals the unpromoted forward."""
    from ivfast.models.vit import Block, RMSNorm
    torch.manual_seed(0)
    blk = Block(32, 4, 2.0, True, 1.0, 0.0, "auto").eval()
    x = torch.randn(2, 9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = blk(x)
    monkeypatch.setattr(F, "rms_norm", _promoting_rms_norm(only_under_autocast))
    xb = x.bfloat16()
    assert RMSNorm(32)(xb).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert blk.attn.q_norm(xb).dtype == torch.bfloat16
        got = blk(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- flex -> dense fallback policy
def test_flex_failure_is_an_error_unless_fallback_allowed(monkeypatch):
    def broken_flex(*a, **kw):
        raise RuntimeError("simulated flex compile failure")
    monkeypatch.setattr(A, "_flex", broken_flex)
    q, k, v = (t.detach() for t in _qkv(N=20, D=8))
    key = ("cpu", q.dtype, 8, True)
    A.reset()
    A.set_dense_fallback(False)
    try:
        with pytest.raises(RuntimeError, match="attn_allow_dense_fallback=true"):
            A._auto_windowed(q, k, v, 3, key)
        assert A.flex_failures() == {}
        A.set_dense_fallback(True)
        out = A._auto_windowed(q, k, v, 3, key)
        torch.testing.assert_close(out.double(), _naive(q, k, v, 3), atol=2e-5, rtol=1e-4)
        assert A.flex_failures() == {"cpu float32 d8 window": "RuntimeError: simulated flex compile failure"}
        assert A.used_backends()["cpu float32 d8 window"].startswith("sdpa:")
    finally:
        A.set_dense_fallback(True)
        A.reset()


def test_reset_forgets_every_choice():
    """A benchmark building several models in one process starts each from a fresh process's state."""
    q, k, v = (t.detach() for t in _qkv(N=20, D=8))
    A.attention(q, k, v, backend="sdpa")
    A.attention(q, k, v, window=3, backend="sdpa")
    assert A.used_backends() and A._sdpa_choice and A._masks
    A.reset()
    assert A.used_backends() == {} and A.flex_failures() == {} and A.timed_report() == {}
    assert not A._sdpa_choice and not A._masks
    torch.testing.assert_close(A.attention(q, k, v, window=3, backend="sdpa").double(), _naive(q, k, v, 3),
                               atol=2e-5, rtol=1e-4)


def test_used_backends_includes_compiled_calls():
    q, k, v = (t.detach() for t in _qkv(N=12, D=24))     # d24: a call kind no other test uses
    fn = torch.compile(lambda a, b, c: A.attention(a, b, c, backend="sdpa"), backend="eager", fullgraph=True)
    out = fn(q, k, v)
    torch.testing.assert_close(out.double(), _naive(q, k, v), atol=2e-5, rtol=1e-4)
    rep = A.used_backends()
    assert rep.get("cpu float32 d24 compiled", "").startswith("sdpa:"), rep


@pytest.mark.gpu
def test_gpu_vit_block_under_bf16_autocast():
    """Never run yet (no GPU so far). On torch >= 2.12 CUDA autocast promotes rms_norm to fp32."""
    from ivfast.models.vit import Block
    torch.manual_seed(0)
    blk = Block(256, 4, 2.0, True, 1.0, 0.0, "auto").cuda()
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert blk.attn.q_norm(x.bfloat16()).dtype == torch.bfloat16
        y = blk(x)
    y.float().sum().backward()
    with torch.autocast("cuda", dtype=torch.float32, enabled=False):
        ref = blk(x.detach())
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=5e-2)
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- packed sequences (stage 2)
def _packed(runs, H=2, D=8, dtype=torch.float32, seed=1):
    """Packed q, k, v [1, L, H, D] for ``runs`` of (count, length), and the per-run [c, n, H, D] views."""
    L = sum(c * n for c, n in runs)
    qkv = [t.reshape(1, L, H, D).detach().requires_grad_() for t in _qkv(B=1, N=L, H=H, D=D, dtype=dtype, seed=seed)]
    return qkv, A.Segments(runs, "cpu")


def _per_sequence(q, k, v, seg):
    """Independent oracle: attention of each sequence alone (float64, explicit loop over sequences)."""
    outs, start = [], 0
    for c, n in seg.runs:
        for _ in range(c):
            sl = slice(start, start + n)
            outs.append(_naive(q[:, sl], k[:, sl], v[:, sl]))
            start += n
    return torch.cat(outs, 1)


def test_segments_layout():
    seg = A.Segments([(2, 5), (3, 2)], "cpu")
    assert seg.total == 16 and seg.num_seqs == 5 and seg.max_len == 5 and seg.sizes() == [10, 6]
    assert seg.cu_seqlens().tolist() == [0, 5, 10, 12, 14, 16] and seg.cu_seqlens().dtype == torch.int32
    assert seg.seq_ids().tolist() == [0] * 5 + [1] * 5 + [2, 2, 3, 3, 4, 4]
    with pytest.raises(ValueError, match="runs"):
        A.Segments([(2, 0)], "cpu")


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_packed_attention_segments_forward_backward(backend):
    """The segment path (CPU / no flash-attn) equals attention of each sequence alone, grads too;
    odd, unequal lengths as stage 2's two mask sets have."""
    (q, k, v), seg = _packed([(2, 23), (2, 9)])
    out = A.packed_attention(q, k, v, seg, backend=backend)
    ref = _per_sequence(q, k, v, seg)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(A.packed_attention_reference(q, k, v, seg).double(), ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(out)
    g = torch.autograd.grad((out * w).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * w.double()).sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5)
    assert A.used_backends()["cpu float32 d8 packed"] == "segments"


def test_packed_attention_flex_document_mask_forward():
    """FlexAttention with the document mask (the CUDA path without flash-attn), run eagerly on CPU."""
    (q, k, v), seg = _packed([(2, 23), (2, 9)])
    q, k, v = q.detach(), k.detach(), v.detach()       # no FlexAttention backward on CPU
    with torch.no_grad():
        out = A.packed_attention(q, k, v, seg, backend="flex")
        torch.testing.assert_close(out.double(), _per_sequence(q, k, v, seg), atol=1e-5, rtol=1e-5)


def test_packed_attention_flash_varlen_call(monkeypatch):
    """The flash_attn_varlen_func call: [total, H, D] inputs, int32 cu_seqlens of every sequence,
    the longest length, and an FA3-style (out, lse) tuple unwrapped. A stand-in runs the maths."""
    calls = []

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
        calls.append((q.shape, cu_q.dtype, cu_q.tolist(), max_q, max_k))
        assert cu_q is cu_k and q.dim() == 3
        cu = cu_q.tolist()
        outs = [_naive(q[None, a:b], k[None, a:b], v[None, a:b])[0] for a, b in zip(cu[:-1], cu[1:])]
        return torch.cat(outs).to(q.dtype), None

    monkeypatch.setattr(A, "_flash_varlen", lambda: (fake_varlen, "fa3"))
    monkeypatch.setattr(A, "VARLEN_DEVICES", ("cpu",))
    (q, k, v), seg = _packed([(2, 7), (3, 4)], dtype=torch.bfloat16)
    with torch.no_grad():
        out = A.packed_attention(q, k, v, seg)
    assert calls == [((26, 2, 8), torch.int32, [0, 7, 14, 18, 22, 26], 7, 7)]
    torch.testing.assert_close(out.float(), _per_sequence(q, k, v, seg).float(), atol=2e-2, rtol=2e-2)
    assert A.used_backends()["cpu bfloat16 d8 packed"] == "flash_attn_varlen:fa3"
    with torch.no_grad():       # fp32 inputs: flash cannot take them, the segment path runs
        calls.clear()
        A.packed_attention(q.float(), k.float(), v.float(), seg)
        assert not calls


def test_packed_attention_errors(monkeypatch):
    (q, k, v), seg = _packed([(2, 5)])
    with pytest.raises(ValueError, match=r"\[1, 10, H, D\]"):
        A.packed_attention(q[:, :9], k[:, :9], v[:, :9], seg)
    monkeypatch.setattr(A, "_flash_varlen", lambda: None)
    with pytest.raises(RuntimeError, match="flash-attn is not importable"):
        A.packed_attention(q, k, v, seg, backend="flash_attn")


def test_packing_pays_policy(monkeypatch):
    """auto packs on CUDA with FA3, or FA2 before Hopper; never on CPU or without flash-attn."""
    assert not A.packing_pays(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = torch.device("cuda", 0)
    for fv, cap, want in [(None, (9, 0), False), ("fa2", (9, 0), False), ("fa2", (8, 0), True), ("fa3", (9, 0), True)]:
        monkeypatch.setattr(A, "_flash_varlen", lambda fv=fv: None if fv is None else (object(), fv))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, cap=cap: cap)
        assert A.packing_pays(cuda) is want, (fv, cap)
