"""Masked-token ops (ivfast.ops): references against plain indexing; Triton kernels against references."""
import pytest
import torch

from ivfast import ops


def _perm_ids(B, N, K, gen, dtype=torch.int32):
    perm = torch.stack([torch.randperm(N, generator=gen) for _ in range(B)])
    keep = perm[:, :K].sort(dim=1).values
    mask = perm[:, K:].sort(dim=1).values
    return keep.to(dtype), mask.to(dtype)


def test_references_match_loops():
    g = torch.Generator().manual_seed(0)
    B, N, K, C = 2, 11, 4, 5
    x = torch.randn(B, N, C, generator=g)
    pos = torch.randn(N, C, generator=g)
    keep, mask = _perm_ids(B, N, K, g)
    out = ops.gather_tokens(x, keep, pos)
    for b in range(B):
        for k in range(K):
            n = int(keep[b, k])
            torch.testing.assert_close(out[b, k], x[b, n] + pos[n])
    vis = torch.randn(B, K, C, generator=g)
    mt = torch.randn(C, generator=g)
    full = ops.assemble_sequence(vis, keep, mask, mt, pos)
    for b in range(B):
        for k in range(K):
            torch.testing.assert_close(full[b, int(keep[b, k])], vis[b, k] + pos[int(keep[b, k])])
        for m in range(N - K):
            torch.testing.assert_close(full[b, int(mask[b, m])], mt + pos[int(mask[b, m])])
