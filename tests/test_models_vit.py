"""Student ViT: patch embedding = Conv3d, positions, visible-token forward, compile-friendliness."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ivfast.config import EncoderConfig
from ivfast.models.vit import (AttentionPool, VisionTransformer, interpolate_pos_table, patchify,
                               sincos_3d)


def _enc(**kw):
    base = dict(dim=32, depth=3, heads=4, patch_size=4, num_cls=4, drop_path=0.0)
    base.update(kw)
    return VisionTransformer(EncoderConfig(**base), num_frames=2, img_size=8, attn_backend="sdpa")


def test_patch_embedding_equals_conv3d():
    torch.manual_seed(0)
    enc = _enc(tubelet=2, patch_size=4)
    video = torch.randn(2, 3, 2, 8, 8)
    patches = patchify(video, 4, 2)                              # [B, N, 3*2*4*4], values (c, t, ph, pw)
    normed = enc.patch_norm(patches)
    lin = enc.patch_embed(normed)
    # put the RMS-normalised patches back into a video and run the released code's Conv3d on it
    normed_video = normed.reshape(2, 1, 2, 2, 3, 2, 4, 4).permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(2, 3, 2, 8, 8)
    assert torch.equal(patchify(normed_video, 4, 2), normed)
    w = enc.patch_embed.weight.reshape(32, 3, 2, 4, 4)
    conv = F.conv3d(normed_video, w, enc.patch_embed.bias, stride=(2, 4, 4))   # [B, D, 1, 2, 2]
    torch.testing.assert_close(lin, conv.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_sincos_table():
    t = sincos_3d(32, 2, 3, 4, num_cls=4)
    assert t.shape == (4 + 24, 32)
    assert t[:4].abs().sum() == 0
    grid = t[4:].reshape(2, 3, 4, 32)
    # first d/4 channels depend on t only; the rest on (h, w) only
    assert torch.equal(grid[:, :, :, :8], grid[:, :1, :1, :8].expand(2, 3, 4, 8))
    assert torch.equal(grid[:, :, :, 8:], grid[:1, :, :, 8:].expand(2, 3, 4, 24))
    assert not torch.equal(grid[0, 0, 0], grid[1, 0, 0])
    with pytest.raises(ValueError, match="divisible by 16"):
        sincos_3d(24, 1, 1, 1)
    # linear interpolation in time keeps the spatial half and reproduces the end frames
    up = interpolate_pos_table(t, 4, (2, 3, 4), (4, 3, 4))
    assert up.shape == (4 + 48, 32)
    torch.testing.assert_close(up[4:].reshape(4, 3, 4, 32)[:, :, :, 8:], grid[:1, :, :, 8:].expand(4, 3, 4, 24))


def _released_sincos_3d(dim, T, H, W):
    """numpy, written as the released code / MAE build it: 1-D = [sin | cos] with omega = 1/10000^(i/(D/2));
    2-D from meshgrid(grid_w, grid_h): first half of the channels from grid[0] (= w), second from h;
    3-D = [temporal (dim/4) | spatial (3 dim/4)], token raster (t, h, w)."""
    def one_d(D, pos):
        omega = 1.0 / 10000 ** (np.arange(D // 2, dtype=np.float64) / (D / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    ds, dt = dim // 4 * 3, dim // 4
    grid = np.stack(np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64)), 0)
    spatial = np.concatenate([one_d(ds // 2, grid[0]), one_d(ds // 2, grid[1])], axis=1)    # [H*W, ds]
    temporal = one_d(dt, np.arange(T, dtype=np.float64))                                     # [T, dt]
    table = np.concatenate([np.repeat(temporal[:, None], H * W, 1), np.repeat(spatial[None], T, 0)], -1)
    return torch.from_numpy(table.reshape(T * H * W, dim)).float()


def test_sincos_matches_released_construction():
    t = sincos_3d(48, 3, 4, 5, num_cls=2)
    torch.testing.assert_close(t[2:], _released_sincos_3d(48, 3, 4, 5), atol=1e-6, rtol=0)
    # token (t=0, h=0, w=1): the first spatial half moves with w, the second (h) stays at position 0
    row = t[2 + 1, 12:]
    assert not torch.equal(row[:18], t[2, 12:30]) and torch.equal(row[18:], t[2, 30:])


def test_visible_forward_matches_full_forward_gathered():
    """Encoding only the visible tokens is the same as embedding all, then gathering (depth 0)."""
    torch.manual_seed(0)
    enc = _enc(depth=2).eval()
    video = torch.randn(2, 3, 2, 8, 8)
    patches = patchify(video, 4)
    ids = torch.tensor([[0, 3, 5], [1, 2, 7]])
    vis = torch.gather(patches, 1, ids[..., None].expand(-1, -1, patches.shape[-1]))
    emb_vis = enc.embed(vis, ids)
    emb_all = enc.embed(patches, None)
    torch.testing.assert_close(emb_vis[:, 4:], torch.gather(emb_all[:, 4:], 1, ids[..., None].expand(-1, -1, 32)))
    x, feats = enc(vis, ids, return_layers=[1, 0])
    assert x.shape == (2, 4 + 3, 32) and len(feats) == 2
    torch.testing.assert_close(feats[0], x)          # block 1 is the last one


def test_gradients_checkpointing_and_drop_path():
    torch.manual_seed(0)
    enc = _enc(drop_path=0.2, act_checkpoint=True).train()
    ids = torch.tensor([[0, 3, 5, 6]])
    vis = torch.randn(1, 4, 48)
    torch.manual_seed(1)
    x, _ = enc(vis, ids)
    x.square().sum().backward()
    g1 = {n: p.grad.clone() for n, p in enc.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in g1.values())
    enc.zero_grad()
    enc.act_checkpoint = False
    torch.manual_seed(1)
    x2, _ = enc(vis, ids)
    x2.square().sum().backward()
    torch.testing.assert_close(x, x2)
    for n, p in enc.named_parameters():
        torch.testing.assert_close(p.grad, g1[n], atol=1e-6, rtol=1e-5)
    # output projections are scaled by 1/sqrt(2 * layer) at init; LayerScale starts at 1e-5
    assert enc.blocks[0].ls1.gamma.max().item() == pytest.approx(1e-5)


def test_no_graph_breaks():
    enc = _enc(depth=2).eval()
    pool = AttentionPool(32, 4, 16, backend="sdpa")
    ids = torch.tensor([[0, 3, 5, 6]])
    vis = torch.randn(1, 4, 48)
    with torch.no_grad():
        enc(vis, ids)                            # eager call pins the SDPA kernel first

    def f(v, i):
        x, _ = enc(v, i)
        return pool(x)
    torch._dynamo.reset()
    exp = torch._dynamo.explain(f)(vis, ids)
    assert exp.graph_break_count == 0, exp.break_reasons
    assert exp.graph_count == 1


def test_attention_pool_matches_manual():
    torch.manual_seed(0)
    pool = AttentionPool(16, 4, 8, backend="math")
    x = torch.randn(2, 5, 16)
    q = pool.q(pool.norm_q(x.mean(1, keepdim=True))).reshape(2, 1, 4, 4).transpose(1, 2)
    k = pool.k(pool.norm_k(x)).reshape(2, 5, 4, 4).transpose(1, 2)
    v = pool.v(pool.norm_v(x)).reshape(2, 5, 4, 4).transpose(1, 2)
    a = (q @ k.transpose(-1, -2) / 2.0).softmax(-1)
    ref = pool.proj((a @ v).transpose(1, 2).reshape(2, 16))
    torch.testing.assert_close(pool(x), ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- packed mask sets (stage 2)
def _packed_case(B=3, counts=(23, 10), seed=0, **kw):
    """An encoder with non-trivial LayerScale (1e-5 would hide the blocks) and two sets of visible
    tokens, odd and unequal counts, each row its own sorted random ids."""
    torch.manual_seed(seed)
    enc = VisionTransformer(EncoderConfig(**dict(dict(dim=32, depth=3, heads=4, patch_size=4, num_cls=4,
                                                      drop_path=0.0), **kw)), num_frames=4, img_size=16,
                            attn_backend="sdpa")
    with torch.no_grad():
        for blk in enc.blocks:
            blk.ls1.gamma.uniform_(0.3, 1.0)
            blk.ls2.gamma.uniform_(0.3, 1.0)
    N = enc.num_tokens
    ids = [torch.stack([torch.randperm(N)[:K].sort().values for _ in range(B)]).int() for K in counts]
    patches = [torch.randn(B, K, enc.patch_dim, requires_grad=True) for K in counts]
    return enc, patches, ids


@pytest.mark.parametrize("act_checkpoint", [False, True])
def test_packed_sets_equal_separate_passes(act_checkpoint):
    """Both mask sets in one packed pass = one pass per set: outputs, returned layers, and the
    gradients of every parameter (position table, cls tokens, LayerScale) and of the patches."""
    enc, patches, ids = _packed_case(act_checkpoint=act_checkpoint)
    enc.train()
    w = [torch.randn(p.shape[0], 4 + p.shape[1], 32) for p in patches]

    def run(packed):
        enc.zero_grad()
        for p in patches:
            p.grad = None
        if packed:
            outs = enc(patches, ids, return_layers=[0, 2])
        else:
            outs = [enc(p, i, return_layers=[0, 2]) for p, i in zip(patches, ids)]
        loss = sum(((x + f[0]) * wi).sum() for (x, f), wi in zip(outs, w))
        loss.backward()
        grads = {n: q.grad.clone() for n, q in enc.named_parameters()}
        return outs, grads, [p.grad.clone() for p in patches]

    ref, g_ref, pg_ref = run(False)
    got, g, pg = run(True)
    for (x, f), (xr, fr) in zip(got, ref):
        assert x.shape == xr.shape
        torch.testing.assert_close(x, xr, atol=1e-5, rtol=1e-5)
        for a, b in zip(f, fr):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], atol=1e-5, rtol=1e-4, msg=n)
    for a, b in zip(pg, pg_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_packed_drop_path_is_per_sequence():
    """Drop path in a packed pass: one keep/drop draw per sequence (as unpacked), not per pack."""
    from ivfast.models.attention import Segments
    from ivfast.models.vit import drop_path_packed
    seg = Segments([(40, 5), (40, 3)], "cpu")
    torch.manual_seed(0)
    y = drop_path_packed(torch.ones(1, seg.total, 2), 0.5, True, seg)[0, :, 0]
    per_seq = [part.unique() for part in y.split([5] * 40 + [3] * 40)]
    assert all(len(u) == 1 for u in per_seq), "a sequence is dropped or kept as a whole"
    kept = torch.stack([u[0] for u in per_seq])
    assert set(kept.tolist()) == {0.0, 2.0} and 20 <= int((kept > 0).sum()) <= 60
    assert drop_path_packed(torch.ones(1, seg.total, 2), 0.5, False, seg).eq(1).all()
    enc, patches, ids = _packed_case(drop_path=0.3)
    enc.train()
    outs = enc(patches, ids)
    assert all(torch.isfinite(x).all() for x, _ in outs)
