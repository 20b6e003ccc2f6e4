"""Every token-kernel launch the ops make compiles for sm_80 and sm_90 (fp32, fp16, bf16).

The interpreter checks the maths on CPU; this checks the other half, that Triton's real
compiler lowers each launch to a cubin (see tests/kernel_compile.py). No GPU needed.
(The diffusion-decoder kernels have their own compile test, with the runtime's divisibility hints
and a zero-spill check: test_diffusion_mlp.py::test_kernels_compile_for_real_gpus_without_spills.)
"""
import os

import pytest
import torch

from kernel_compile import compile_specs, record_launches, with_bf16_variants

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="records launches through the Triton interpreter (CPU-only machines)")


def token_launches():
    from ivfast import ops

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        B, N, K, C = 2, 13, 5, 24
        x = torch.randn(B, N, C, generator=g).to(dtype).requires_grad_()
        pos = torch.randn(N, C, generator=g).requires_grad_()
        ids = torch.stack([torch.randperm(N, generator=g)[:K].sort().values for _ in range(B)]).int()
        mask_ids = torch.stack([torch.tensor(sorted(set(range(N)) - set(r.tolist()))) for r in ids]).int()
        ops.gather_tokens(x, ids, pos, impl="triton").sum().backward()
        ops.gather_tokens(x, ids, None, impl="triton").sum().backward()
        vis = torch.randn(B, K, C, generator=g).to(dtype).requires_grad_()
        tok = torch.randn(C, generator=g).to(dtype).requires_grad_()
        ops.assemble_sequence(vis, ids, mask_ids, tok, pos, impl="triton").sum().backward()
        video = torch.randn(B, 3, 2, 28, 28, generator=g).to(dtype)
        grid_ids = torch.tensor([[0, 3, 6], [1, 2, 7]], dtype=torch.int32)
        ops.patch_targets(video, grid_ids, patch=14, norm_pix=True, impl="triton")
    video8 = torch.randint(0, 255, (2, 3, 2, 28, 28), dtype=torch.uint8, generator=g)
    ops.patch_targets(video8, grid_ids, patch=14, mean=(0.5,) * 3, std=(0.2,) * 3, impl="triton")


@pytest.mark.slow
def test_token_kernels_compile_for_gpus():
    specs = record_launches(token_launches)
    assert specs, "no Triton kernel was launched: the ops did not take their Triton path"
    result = compile_specs(with_bf16_variants(specs), targets=(80, 90))
    assert not result["failures"], "\n\n".join(result["failures"][:5])
    assert result["compiled"] >= 2 * len(specs)
