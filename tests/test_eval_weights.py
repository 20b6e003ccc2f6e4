"""Released InternVideo-Next weights -> ivfast encoder (key map), and load_encoder round trips."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ivfast.config import load_config
from ivfast.models import convert_release_state_dict, load_encoder
from ivfast.models.vit import VisionTransformer

D, DEPTH, P, T, S, NCLS = 32, 2, 8, 4, 16, 4         # width, blocks, patch, frames, image size, cls tokens


def release_state_dict(prefix="", qkv_bias=False, seed=0):
    """A state dict with the release's names and shapes (InternVideo_next.py, class InternVideo2)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    n = T * (S // P) ** 2
    sd = {"patch_embed.proj.weight": r(D, 3, 1, P, P), "patch_embed.proj.bias": r(D),
          "patch_embed.norm_before.weight": r(3 * P * P), "patch_embed.norm.weight": r(D),
          "cls_token": r(1, NCLS, D), "pos_embed": r(1, NCLS + n, D),
          "clip_projector.norm1_q.weight": r(D), "clip_projector.norm1_q.bias": r(D),
          "clip_projector.cross_attn.q.weight": r(D, D), "clip_projector.cross_attn.q_bias": r(D),
          "clip_projector.cross_attn.proj.weight": r(16, D), "clip_projector.cross_attn.proj.bias": r(16)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": r(D), b + "norm2.weight": r(D), b + "attn.qkv.weight": r(3 * D, D),
                   b + "attn.q_norm.weight": r(D), b + "attn.k_norm.weight": r(D),
                   b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
                   b + "ls1.gamma": r(D), b + "ls2.gamma": r(D),
                   b + "mlp.fc1.weight": r(4 * D, D), b + "mlp.fc1.bias": r(4 * D),
                   b + "mlp.fc2.weight": r(D, 4 * D), b + "mlp.fc2.bias": r(D)})
        if qkv_bias:
            sd[b + "attn.qkv.bias"] = r(3 * D)
    return {prefix + k: v for k, v in sd.items()}


def release_patch_embed(sd, video):
    """The release's PatchEmbed.forward in plain torch: channels-last patch vectors, RMSNorm with
    weight, back to a video, Conv3d, RMSNorm. video [B, 3, T, H, W] -> [B, T*h*w, D]."""
    B, C, Tn, H, W = video.shape
    x = video.permute(0, 2, 3, 4, 1)                                             # b t H W c
    x = x.reshape(B, Tn, H // P, P, W // P, P, C).permute(0, 1, 2, 4, 3, 5, 6)   # b t ht wt hp wp c
    x = x.reshape(B, Tn * (H // P) * (W // P), P * P * C)
    x = F.rms_norm(x, (P * P * C,), sd["patch_embed.norm_before.weight"], 1e-6)
    x = x.reshape(B, Tn, H // P, W // P, P, P, C).permute(0, 6, 1, 2, 4, 3, 5).reshape(B, C, Tn, H, W)
    x = F.conv3d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=(1, P, P))
    x = x.flatten(2).transpose(1, 2)                                             # raster (t, h, w)
    return F.rms_norm(x, (D,), sd["patch_embed.norm.weight"], 1e-6)


def test_release_names_map_to_an_equivalent_encoder(tmp_path):
    sd = release_state_dict(prefix="vision_encoder.")
    enc_sd, pool_sd = convert_release_state_dict(sd)
    f = tmp_path / "model.safetensors"
    save_file(sd, str(f))
    enc = load_encoder(f, heads=4, trained_img_size=S, attn_backend="math")
    assert enc.dim == D and len(enc.blocks) == DEPTH and enc.num_cls == NCLS and enc.grid == (T, S // P, S // P)
    assert enc.source.startswith("release:")
    mine = enc.state_dict()
    for i in range(DEPTH):                                                       # block weights: same names
        for k in ("attn.qkv.weight", "attn.q_norm.weight", "ls2.gamma", "mlp.fc2.bias"):
            torch.testing.assert_close(mine[f"blocks.{i}.{k}"], sd[f"vision_encoder.blocks.{i}.{k}"])
    torch.testing.assert_close(mine["pos_embed"], sd["vision_encoder.pos_embed"][0])
    # the patch embedding computes what the release's does (patch-norm weight permuted, conv flattened)
    video = torch.randn(2, 3, T, S, S)
    from ivfast.models.vit import patchify
    ours = enc.embed_norm(enc.patch_embed(enc.patch_norm(patchify(video, P))))
    ref = release_patch_embed({k.removeprefix("vision_encoder."): v for k, v in sd.items()}, video)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    # the stage-1 attention pool keys map to ivfast's AttentionPool names
    assert set(pool_sd) == {"norm_q.weight", "norm_q.bias", "q.weight", "q.bias", "proj.weight", "proj.bias"}
    torch.testing.assert_close(pool_sd["q.bias"], sd["vision_encoder.clip_projector.cross_attn.q_bias"])


def test_release_ambiguities_are_errors():
    two = {**release_state_dict("student."), **release_state_dict("teacher.")}
    with pytest.raises(KeyError, match="several encoders"):
        convert_release_state_dict(two)
    enc_sd, _ = convert_release_state_dict(two, prefix="teacher.")
    assert "blocks.1.mlp.fc1.weight" in enc_sd
    with pytest.raises(ValueError, match="qkv bias"):
        convert_release_state_dict(release_state_dict(qkv_bias=True))
    from ivfast.models.release_weights import encoder_config_from_state
    with pytest.raises(ValueError, match="number of heads"):
        encoder_config_from_state(convert_release_state_dict(release_state_dict())[0])   # width 32: unknown


def test_load_encoder_round_trip_from_an_ivfast_checkpoint(tmp_path):
    from ivfast.checkpoint import save_checkpoint
    cfg = load_config("demo")
    torch.manual_seed(0)
    enc = VisionTransformer(cfg.model.encoder, cfg.model.num_frames, cfg.model.img_size, "math").eval()
    state = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    state["predictor.some.weight"] = torch.zeros(3)                 # other modules are ignored
    ck = save_checkpoint(tmp_path / "checkpoints", 7, state, {"step": 7}, cfg)
    for path in (ck, ck / "model.safetensors", tmp_path):           # checkpoint dir, file, run dir
        back = load_encoder(path, attn_backend="math")
        x = torch.randn(2, back.num_tokens, back.patch_dim)
        torch.testing.assert_close(back(x)[0], enc(x)[0])
        assert not any(p.requires_grad for p in back.parameters())
    longer = load_encoder(ck, num_frames=2 * cfg.model.num_frames)  # position table interpolated in time
    assert longer.pos_embed.shape[0] == enc.pos_embed.shape[0] * 2 - enc.num_cls
    r1, r2 = load_encoder(ck, random_init=True, seed=3), load_encoder(ck, random_init=True, seed=3)
    torch.testing.assert_close(r1.patch_embed.weight, r2.patch_embed.weight)   # seeded: cache-safe
    assert not torch.allclose(r1.patch_embed.weight, enc.patch_embed.weight)
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        (tmp_path / "bare").mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bare" / "w.safetensors"))
        load_encoder(tmp_path / "bare" / "w.safetensors")


def test_unused_release_keys_are_reported(caplog):
    sd = {**release_state_dict(), "predictor.layers.0.weight": torch.zeros(2)}
    with caplog.at_level("WARNING", logger="ivfast.models"):
        enc_sd, _ = convert_release_state_dict(sd)
    assert "predictor.layers.0.weight" in caplog.text and "1 keys not used" in caplog.text
    assert "predictor.layers.0.weight" not in enc_sd
