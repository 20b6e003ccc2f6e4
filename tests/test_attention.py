"""Attention entry point: every backend available here agrees with the math reference."""
import pytest
import torch

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
