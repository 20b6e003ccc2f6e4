"""Helpers shared by the tests: the tolerance rule for low-precision kernels. Test modules import
them as ``from utils import ...`` (pytest puts tests/ on sys.path, as for kernel_compile)."""
import torch

# --------------------------------------------------------------------------- tolerance
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}   # relative to max |ref|


def check_close(out: torch.Tensor, ref: torch.Tensor, lowp: torch.Tensor, name: str = "") -> None:
    """Flash-attention's rule: a kernel's error against a high-precision reference ``ref`` may be at
    most 2x the error of the same computation done by PyTorch in the kernel's dtype (``lowp``),
    plus ``ATOL[dtype]`` x max|ref|. Max norms over all elements, in fp64."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    ref = ref.double()
    scale = ref.abs().max().item() or 1.0
    err = (out.double() - ref).abs().max().item()
    base = (lowp.double() - ref).abs().max().item()
    tol = 2 * base + ATOL[out.dtype] * scale
    assert err <= tol, f"{name}: error {err:.3g} > 2 x torch's {base:.3g} + atol (max|ref| {scale:.3g})"
