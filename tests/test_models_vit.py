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
