"""Semantic-aware masking (ivfast.masking.semantic_mask): contract, top-k against a sort,
ties, determinism, sampling probabilities, per-frame selection, random fraction, no host sync."""
import itertools

import pytest
import torch

from ivfast.masking import semantic_mask

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def _check_contract(keep, mask, B, N, K):
    assert keep.dtype == torch.int32 and mask.dtype == torch.int32
    assert keep.shape == (B, K) and mask.shape == (B, N - K)
    assert torch.all(keep[:, 1:] > keep[:, :-1]) and torch.all(mask[:, 1:] > mask[:, :-1])
    both = torch.cat([keep, mask], dim=1).sort(dim=1).values
    assert torch.equal(both.long(), torch.arange(N, device=keep.device).expand(B, N))


def _topk_by_sort(row, k):
    """Reference: highest scores first, lower index first among equals."""
    order = sorted(range(len(row)), key=lambda i: (-row[i], i))
    return sorted(order[:k])


@pytest.mark.parametrize("B,N,ratio", [(3, 49, 0.8), (2, 256, 0.75), (1, 10, 0.5)])
def test_topk_matches_sort_and_contract(B, N, ratio):
    scores = torch.rand(B, N, generator=torch.Generator().manual_seed(N)).to(DEV)
    keep, mask = semantic_mask(scores, ratio)
    K = N - int(ratio * N)
    _check_contract(keep, mask, B, N, K)
    for b in range(B):
        assert keep[b].tolist() == _topk_by_sort(scores[b].tolist(), K)


def test_topk_ties_go_to_lower_index_and_are_deterministic():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 3, (4, 40), generator=g).float().to(DEV)   # many ties
    keep, mask = semantic_mask(scores, 0.7)
    K = 40 - int(0.7 * 40)
    _check_contract(keep, mask, 4, 40, K)
    for b in range(4):
        assert keep[b].tolist() == _topk_by_sort(scores[b].tolist(), K)
    keep2, mask2 = semantic_mask(scores.clone(), 0.7)
    assert torch.equal(keep, keep2) and torch.equal(mask, mask2)
    flat = torch.ones(1, 20, device=DEV)           # all equal: the lowest ids are kept
    assert semantic_mask(flat, 0.75)[0].tolist() == [[0, 1, 2, 3, 4]]


def test_nan_scores_rank_last():
    scores = torch.tensor([[0.5, float("nan"), 0.1, 0.9, float("nan"), 0.3, 0.2, 0.0]], device=DEV)
    keep, _ = semantic_mask(scores, 0.5)
    assert keep.tolist() == [[0, 3, 5, 6]]


def test_per_frame_selection():
    B, F, n, ratio = 2, 3, 20, 0.75
    scores = torch.rand(B, F * n, generator=torch.Generator().manual_seed(2)).to(DEV)
    keep, mask = semantic_mask(scores, ratio, frames=F)
    kf = n - int(ratio * n)
    _check_contract(keep, mask, B, F * n, F * kf)
    for b in range(B):
        for f in range(F):
            got = [i - f * n for i in keep[b].tolist() if f * n <= i < (f + 1) * n]
            assert got == _topk_by_sort(scores[b, f * n:(f + 1) * n].tolist(), kf)
    sampled, _ = semantic_mask(scores, ratio, mode="sample", frames=F, generator=_gen(0))
    per_frame = torch.stack([((sampled >= f * n) & (sampled < (f + 1) * n)).sum(1) for f in range(F)], 1)
    assert torch.all(per_frame == kf)


def test_sample_is_seeded_and_differs_across_seeds():
    scores = torch.rand(4, 64, generator=torch.Generator().manual_seed(3)).to(DEV)
    a = semantic_mask(scores, 0.75, mode="sample", generator=_gen(7))
    b = semantic_mask(scores, 0.75, mode="sample", generator=_gen(7))
    c = semantic_mask(scores, 0.75, mode="sample", generator=_gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    _check_contract(*a, 4, 64, 16)


def test_sample_inclusion_probabilities_match_successive_sampling():
    """Keeping 2 of 4 by Gumbel-top-k = drawing 2 without replacement with p (as multinomial)."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    rows = 20000
    scores = (p * 7.0).expand(rows, 4).contiguous().to(DEV)          # unnormalised is fine
    keep, _ = semantic_mask(scores, 0.5, mode="sample", generator=_gen(11))
    freq = torch.zeros(4).index_add_(0, keep.long().flatten().cpu(), torch.ones(keep.numel())) / rows
    exact = torch.zeros(4)
    for i, j in itertools.permutations(range(4), 2):   # P(first i, then j)
        exact[i] += p[i] * p[j] / (1 - p[i])
        exact[j] += p[i] * p[j] / (1 - p[i])
    assert torch.allclose(freq, exact, atol=0.015), (freq, exact)


def test_sample_never_keeps_zero_scores_when_enough_positive():
    scores = torch.zeros(50, 16, device=DEV)
    scores[:, ::2] = torch.rand(50, 8, generator=torch.Generator().manual_seed(4)).to(DEV) + 0.01
    keep, _ = semantic_mask(scores, 0.5, mode="sample", generator=_gen(5))
    assert torch.all(keep % 2 == 0)


def test_random_fraction_keeps_top_scores_and_randomises_the_rest():
    B, N, ratio, frac = 8, 60, 0.75, 0.4
    scores = torch.arange(N, 0, -1, dtype=torch.float32, device=DEV).expand(B, N).contiguous()  # id 0 best
    K = N - int(ratio * N)
    n_rand = round(frac * K)
    keep, mask = semantic_mask(scores, ratio, mode="topk", random_fraction=frac, generator=_gen(9))
    _check_contract(keep, mask, B, N, K)
    assert torch.all(keep[:, :K - n_rand] == torch.arange(K - n_rand, device=DEV))   # the top ones stay
    rand_part = keep[:, K - n_rand:]
    assert torch.all(rand_part >= K - n_rand)
    assert not torch.all(rand_part == rand_part[0])     # rows draw their random share independently


def test_random_fraction_one_ignores_the_scores():
    B, N = 400, 40
    scores = torch.full((B, N), 1e-3, device=DEV)
    scores[:, 0] = 1e3                                   # token 0 gets nearly all the attention
    sampled, _ = semantic_mask(scores, 0.75, mode="sample", generator=_gen(12))
    assert torch.all(sampled[:, 0] == 0)
    k, m = semantic_mask(scores, 0.75, mode="sample", random_fraction=1.0, generator=_gen(10))
    _check_contract(k, m, B, N, 10)
    share = (k == 0).any(dim=1).float().mean().item()   # uniform: 10 of 40 -> 0.25
    assert 0.18 < share < 0.32, share


def test_no_data_dependent_shapes_or_host_reads():
    """On the meta device any .item(), nonzero or boolean-mask indexing would raise."""
    scores = torch.empty(3, 64, device="meta")
    for mode in ("topk", "sample"):
        keep, mask = semantic_mask(scores, 0.8, mode=mode, random_fraction=0.25, frames=4)
        assert keep.shape == (3, 4 * (16 - int(0.8 * 16))) and keep.device.type == "meta"


def test_bad_inputs():
    s = torch.rand(2, 32)
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        semantic_mask(s[0], 0.75)
    with pytest.raises(ValueError, match="mode"):
        semantic_mask(s, 0.75, mode="argmax")
    with pytest.raises(ValueError, match="divide"):
        semantic_mask(s, 0.75, frames=5)
    with pytest.raises(ValueError, match="no masked or no visible"):
        semantic_mask(s, 0.01)
    with pytest.raises(ValueError, match="random_fraction"):
        semantic_mask(s, 0.75, random_fraction=1.5)


@pytest.mark.gpu
def test_no_host_sync_on_gpu():
    scores = torch.rand(4, 4096, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for mode in ("topk", "sample"):
            semantic_mask(scores, 0.8, mode=mode, random_fraction=0.1, generator=gen)
            semantic_mask(scores, 0.75, mode=mode, frames=16, generator=gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
