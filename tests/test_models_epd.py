"""Composed stage-1 / stage-2 models on the demo preset (tiny, CPU)."""

import copy

import pytest
import torch
from safetensors.torch import save_file

from ivfast.config import ConfigError
from ivfast.config import load_config as _load_config
from ivfast.models.epd import (IMAGENET_MEAN, IMAGENET_STD, Stage1Model, Stage2Model, _VideoInput, build_model,
                               final_alignment_loss, load_stage1_weights, param_groups, purpose_seed)


def load_config(name, overrides=()):
    """The demo model with the presets' LayerScale (the demo itself runs without): these tests
    cover the released model's parameters and checkpoints."""
    return _load_config(name, ["model.encoder.layerscale_init=1e-5", *overrides])


def _video(B=2, T=4, S=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, 3, T, S, S), generator=g, dtype=torch.uint8)


def _normalised(v):
    m = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    return (v.float() / 255 - m) / s


@pytest.fixture(scope="module")
def stage1():
    torch.manual_seed(0)
    cfg = load_config("demo", ["model.attn_backend=sdpa"])
    return cfg, build_model(cfg)


def test_stage1_forward_backward(stage1):
    cfg, model = stage1
    assert isinstance(model, Stage1Model)
    model.train()
    assert not model.teacher.training
    video = _video()
    torch.manual_seed(1)
    out = model(video, step_seed=7)
    for k in ("loss", "loss_diffusion", "loss_middle", "loss_final", "diffusion_mse", "diffusion_vlb"):
        assert out[k].dim() == 0 and torch.isfinite(out[k]), k
    assert out["visible"] == 4 * 4 and out["masked"] == 4 * 12         # 75 % masked per frame
    model.zero_grad(set_to_none=True)
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(not p.requires_grad for p in model.teacher.parameters())
    # float input already ImageNet-normalised gives the same losses as uint8 (same seeds)
    torch.manual_seed(1)
    with torch.no_grad():
        a = model(video, step_seed=7)
        torch.manual_seed(1)
        b = model(_normalised(video), step_seed=7)
    for k in ("loss", "loss_middle", "loss_final"):
        torch.testing.assert_close(a[k], b[k], atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="model.num_frames"):
        model(_video(T=2), 0)


def test_final_alignment_loss_by_hand():
    # teacher frames along e1 and 3*e2: normalised per frame, mean (0.5, 0.5), NOT re-normalised
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])
    student = torch.tensor([[2.0, 0.0]])
    torch.testing.assert_close(final_alignment_loss(student, teacher), torch.tensor(2 - 2 * 0.5))
    torch.testing.assert_close(final_alignment_loss(student, teacher, renorm=True), torch.tensor(2 - 2 ** 0.5))
    with pytest.raises(ValueError, match="teacher \\[B, T, D\\]"):
        final_alignment_loss(student, teacher[0])


def test_stage1_final_loss_on_model(stage1):
    """loss_final of a forward = 2 - 2 <normalize(student pooled), mean_t normalize(teacher pooled_t)>."""
    cfg, model = stage1
    seen = {}
    hooks = [model.final_head.register_forward_hook(lambda mod, i, o: seen.__setitem__("s", o.detach())),
             model.teacher.register_forward_hook(lambda mod, i, o: seen.__setitem__("t", o.pooled.detach()))]

    def run():
        out = model(_video(), step_seed=5)
        s, t = seen["s"].double(), seen["t"].double()
        return out["loss_final"].double(), s / s.norm(dim=-1, keepdim=True), (t / t.norm(dim=-1, keepdim=True)).mean(1)

    try:
        with torch.no_grad():
            got, s, target = run()
            assert target.norm(dim=-1).max() < 0.999            # frames disagree: the two variants differ
            torch.testing.assert_close(got, (2 - 2 * (s * target).sum(-1)).mean(), atol=1e-5, rtol=1e-5)
            model.cfg.model.final_target_renorm = True
            got, s, target = run()
            want = (2 - 2 * (s * target / target.norm(dim=-1, keepdim=True)).sum(-1)).mean()
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    finally:
        model.cfg.model.final_target_renorm = False
        for h in hooks:
            h.remove()


def test_pixels01_fp32_constants_no_host_tensors(monkeypatch):
    """Normalised bf16 input back to 0..1 with fp32 ImageNet mean/std (not rounded to bf16), and
    no tensor built from Python numbers per call (a blocking host-to-device copy on a GPU)."""
    v = _normalised(_video(B=1, T=4, S=56)).bfloat16()
    want = v.float() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    inp = _VideoInput(v, 4, 56)
    torch.testing.assert_close(inp.pixels01(torch.float32), want, atol=0, rtol=0)
    u8 = _video(B=1, T=4, S=56)
    with monkeypatch.context() as mp:
        def boom(*a, **k):
            raise AssertionError("pixels01 built a tensor from host values")
        mp.setattr(torch, "tensor", boom)
        mp.setattr(torch.Tensor, "new_tensor", boom)
        assert torch.equal(inp.pixels01(torch.bfloat16), want.bfloat16())
        # uint8: 0..255 exact in bf16, one rounding: same as fp32 maths cast
        assert torch.equal(_VideoInput(u8, 4, 56).pixels01(torch.bfloat16), (u8.float() / 255).bfloat16())


def test_masks_follow_step_seed(stage1):
    cfg, model = stage1
    video = _video()
    with torch.no_grad():
        s = model.teacher(video.float() / 255).scores
    k1, _ = model._mask(s, 3, s.device)
    k2, _ = model._mask(s, 3, s.device)
    k3, _ = model._mask(s, 4, s.device)
    assert torch.equal(k1, k2) and not torch.equal(k1, k3)


def test_semantic_mask_per_frame_or_whole_clip(stage1):
    """masking.semantic_per_frame: each frame keeps its share (released) or one ranking over the clip."""
    cfg, model = stage1
    Tg, Hg, Wg = model.grid
    n = Hg * Wg
    scores = torch.zeros(2, Tg * n)
    scores[:, :n] = torch.rand(2, n) + 1.0          # all attention on frame 0
    keep, mask = model._mask(scores, 3, scores.device)
    per_frame = torch.bincount(keep[0].long() // n, minlength=Tg)
    assert per_frame.tolist() == [n - int(cfg.masking.ratio * n)] * Tg
    cfg.masking.semantic_per_frame = False
    try:
        keep2, mask2 = model._mask(scores, 3, scores.device)
    finally:
        cfg.masking.semantic_per_frame = True
    assert keep2.shape == keep.shape and keep2.shape[1] + mask2.shape[1] == Tg * n
    assert bool((keep2 < n).all())                   # the whole kept set comes from frame 0


def test_param_groups(stage1):
    _, model = stage1
    groups = param_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    decay, nodecay = set(groups[0]["names"]), set(groups[1]["names"])
    # released: no decay on these full names and on 1-D parameters ...
    for name in ("encoder.pos_embed", "encoder.cls_token", "align_pos", "encoder.blocks.0.norm1.weight",
                 "encoder.blocks.0.attn.proj.bias", "encoder.blocks.0.ls1.gamma", "encoder.patch_norm.weight",
                 "predictor.layers.0.mlp_norm.weight", "pool.q.bias"):
        assert name in nodecay, name
    # ... while the predictor's position table and mask token are decayed, as every weight matrix
    for name in ("predictor.pos_embed", "predictor.mask_token", "encoder.blocks.0.attn.qkv.weight",
                 "predictor.layers.0.attn.Wqkv.weight", "middle_heads.0.fc1.weight", "decoder.net.cond_embed.weight"):
        assert name in decay, name
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_trainable
    assert not any(n.startswith("teacher.") for g in groups for n in g["names"])
    # full-name matching survives wrapper prefixes (DDP's module., compile's _orig_mod.)
    wrapped = torch.nn.Module()
    wrapped.module = model
    wgroups = param_groups(wrapped, 0.05)
    assert wgroups[1]["names"] == ["module." + n for n in groups[1]["names"]]
    # the option exempts the predictor tokens
    model.cfg.model.decay_predictor_tokens = False
    try:
        groups = param_groups(wrapped, 0.05)
    finally:
        model.cfg.model.decay_predictor_tokens = True
    assert {"module.predictor.pos_embed", "module.predictor.mask_token"} <= set(groups[1]["names"])
    assert not {"module.predictor.pos_embed", "module.predictor.mask_token"} & set(groups[0]["names"])


def _save_stage1(model, tmp_path):
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert not any(k.startswith("teacher.") for k in sd)     # the frozen SigLIP is not checkpointed
    (tmp_path / "ckpt").mkdir()
    save_file(sd, str(tmp_path / "ckpt" / "model.safetensors"))
    return tmp_path / "ckpt"


@pytest.mark.parametrize("loss", ["cosine", "l1"])
def test_stage2_from_stage1_checkpoint(stage1, tmp_path, loss):
    _, s1 = stage1
    ckpt = _save_stage1(s1, tmp_path)
    # stage 2 at twice the frames: position tables are interpolated in time
    cfg2 = load_config("demo", ["stage=2", f"model.init_from={ckpt}", "model.num_frames=8",
                                "masking.kind=multiblock", "model.attn_backend=sdpa", f"model.stage2_loss={loss}"])
    model = build_model(cfg2)
    assert isinstance(model, Stage2Model)
    sd1 = s1.state_dict()
    for k, v in model.encoder.state_dict().items():
        if k != "pos_embed":
            torch.testing.assert_close(v, sd1["encoder." + k])
            torch.testing.assert_close(model.teacher.state_dict()[k], v)
    torch.testing.assert_close(model.predictor.layers[0].mlp.Wi.weight, s1.predictor.layers[0].mlp.Wi.weight)
    assert model.encoder.pos_embed.shape[0] == 4 + 8 * 16
    # cls rows kept, first frame of the 16-frame table ~ first frame of the interpolated one
    torch.testing.assert_close(model.encoder.pos_embed[:4], s1.encoder.pos_embed[:4])

    model.train()
    assert not model.teacher.training
    out = model(_video(T=8), step_seed=3)
    assert torch.isfinite(out["loss"]) and len(out["visible"]) == 2
    assert all(v > 0 for v in out["visible"]) and all(m > 0 for m in out["masked"])
    assert all(v + m == 8 * 16 for v, m in zip(out["visible"], out["masked"]))
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert not any(n.startswith("teacher.") for g in param_groups(model, 0.05) for n in g["names"])


def test_fixed_positions_are_buffers_and_checkpoints_cross_load(stage1, tmp_path):
    """model.encoder.learnable_pos=false: every position table is a fixed buffer (not optimised),
    still in the state dict, and checkpoints load between fixed and learnable models both ways."""
    cfg, s1 = stage1
    fixed = Stage1Model(load_config("demo", ["model.attn_backend=sdpa", "model.encoder.learnable_pos=false"]),
                        teacher=s1.teacher)
    tables = ("encoder.pos_embed", "predictor.pos_embed", "align_pos")
    params, bufs, sd = dict(fixed.named_parameters()), dict(fixed.named_buffers()), fixed.state_dict()
    for name in tables:
        assert name not in params and name in bufs and name in sd, name
        assert name in dict(s1.named_parameters()), name
    assert not any(n in tables for g in param_groups(fixed, 0.05) for n in g["names"])
    out = fixed(_video(), step_seed=1)
    out["loss"].backward()
    assert all(p.grad is not None for p in fixed.trainable_parameters())
    assert all(not b.requires_grad for b in fixed.buffers())

    with torch.no_grad():
        s1.encoder.pos_embed.add_(0.5)        # a trained table differs from the sin-cos init
    try:
        assert load_stage1_weights(fixed, _save_stage1(s1, tmp_path)) == []
    finally:
        with torch.no_grad():
            s1.encoder.pos_embed.sub_(0.5)
    assert "encoder.pos_embed" in dict(fixed.named_buffers())
    torch.testing.assert_close(fixed.encoder.pos_embed, s1.encoder.pos_embed + 0.5)
    (tmp_path / "fixed").mkdir()
    save_file({k: v.contiguous() for k, v in fixed.state_dict().items()}, str(tmp_path / "fixed" / "model.safetensors"))
    learnable = Stage1Model(cfg, teacher=s1.teacher)
    assert load_stage1_weights(learnable, tmp_path / "fixed") == []
    assert isinstance(learnable.encoder.pos_embed, torch.nn.Parameter)
    torch.testing.assert_close(learnable.encoder.pos_embed, fixed.encoder.pos_embed)


def test_stage1_checkpoint_errors(stage1, tmp_path):
    _, s1 = stage1
    sd = {k: v.contiguous() for k, v in s1.state_dict().items()}
    del sd["predictor.layers.1.mlp.Wo.weight"]
    save_file(sd, str(tmp_path / "bad.safetensors"))
    cfg2 = load_config("demo", ["stage=2", "masking.kind=multiblock"])
    model = Stage2Model(cfg2)
    with pytest.raises(ValueError, match=r"missing keys \['predictor.layers.1.mlp.Wo.weight'\]"):
        load_stage1_weights(model, tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_stage1_weights(model, tmp_path)
    cfg_wide = load_config("demo", ["stage=2", "masking.kind=multiblock", "model.encoder.dim=32"])
    sd_ok = {k: v.contiguous() for k, v in s1.state_dict().items()}
    save_file(sd_ok, str(tmp_path / "ok.safetensors"))
    with pytest.raises(ValueError, match="shape mismatches"):
        load_stage1_weights(Stage2Model(cfg_wide), tmp_path / "ok.safetensors")
    with pytest.raises(ValueError, match="needs model.init_from"):
        build_model(cfg2)
    # a Stage1Model resumes from its own checkpoint (teacher keys not needed)
    fresh = Stage1Model(load_config("demo"), teacher=s1.teacher)
    unused = load_stage1_weights(fresh, tmp_path / "ok.safetensors")
    assert unused == []
    torch.testing.assert_close(fresh.final_head.fc1.weight, s1.final_head.fc1.weight)


def test_demo_preset_steps():
    """The demo preset as the demo runs it: batch 4, a few forward + backward steps on CPU, finite
    losses and every trainable parameter reached. (Speed is measured in bench/, not here.)"""
    torch.manual_seed(0)
    model = build_model(load_config("demo"))
    video = _video(B=4)
    for s in range(2):
        model.zero_grad(set_to_none=True)
        out = model(video, s)
        out["loss"].backward()
        assert torch.isfinite(out["loss"]), s
    assert all(p.grad is not None for p in model.trainable_parameters())


def _autocast_run(device, tmp_path):
    torch.manual_seed(0)
    cfg = load_config("demo", ["model.teacher.dtype=bf16", f"runtime.device={device}"])
    s1 = build_model(cfg).to(device)
    video = _video().to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = s1(video, 0)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is not None for p in s1.trainable_parameters())
    (tmp_path / "s1").mkdir()
    save_file({k: v.contiguous().cpu() for k, v in s1.state_dict().items()}, str(tmp_path / "s1" / "model.safetensors"))
    cfg2 = load_config("demo", ["stage=2", "masking.kind=multiblock", f"model.init_from={tmp_path / 's1'}",
                                "model.teacher.dtype=bf16", f"runtime.device={device}"])
    s2 = build_model(cfg2).to(device)
    assert next(s2.teacher.parameters()).dtype == torch.bfloat16
    with torch.autocast(device, dtype=torch.bfloat16):
        out2 = s2(video, 1)
    out2["loss"].backward()
    assert torch.isfinite(out2["loss"])


def test_bf16_autocast_cpu(tmp_path):
    """Mixed precision wiring (bf16 teacher weights, autocast): dtypes stay consistent end to end."""
    _autocast_run("cpu", tmp_path)


@pytest.mark.gpu
def test_bf16_autocast_cuda(tmp_path):
    _autocast_run("cuda", tmp_path)


def test_stage1_tube_masking():
    torch.manual_seed(0)
    cfg = load_config("demo", ["masking.kind=tube", "masking.ratio=0.5"])
    model = build_model(cfg)
    out = model(_video(), step_seed=2)
    assert out["visible"] == 4 * 8 and torch.isfinite(out["loss"])


def test_stage2_loss_positions_follow_masking_predict(stage1, tmp_path):
    """'blocks' (V-JEPA): the loss is on block-masked ids only, not on visible ids dropped by the
    max_keep cut; 'unseen' (released, default): on every id the encoder did not see."""
    _, s1 = stage1
    ckpt = _save_stage1(s1, tmp_path)
    base = ["stage=2", f"model.init_from={ckpt}", "masking.kind=multiblock", "model.attn_backend=sdpa",
            "masking.max_keep=20", "masking.blocks=[{num_blocks: 2, spatial_scale: [0.15, 0.15]}]"]
    outs = {}
    for mode in ("blocks", "unseen"):
        model = build_model(load_config("demo", base + [f"masking.predict={mode}"]))
        outs[mode] = model(_video(), step_seed=3)
    blocks, unseen = outs["blocks"], outs["unseen"]
    assert blocks["visible"] == unseen["visible"] == [20], "the visible set is cut to max_keep"
    assert unseen["predicted"] == unseen["masked"] == [4 * 16 - 20]
    assert blocks["predicted"][0] < blocks["masked"][0], "dropped visible ids must not be predicted"
    assert not torch.equal(blocks["loss"], unseen["loss"])


# --------------------------------------------------------------------------- release fidelity
def _release_loss_positions(keep, N):
    """Plain transcription of the release (engines/jepa_mask.py:187-190, engine_for_stage2.py:77-78):
    masks_enc = 1 everywhere, 0 at the kept context; the loss is at masks_enc.bool()."""
    masks_enc = torch.ones(keep.shape[0], N)
    for b in range(keep.shape[0]):
        masks_enc[b, torch.as_tensor(keep[b]).long()] = 0
    return masks_enc.bool()


def test_stage2_default_loss_positions_are_the_releases(stage1, tmp_path):
    """Default config (no masking.predict override): the loss is at every id outside the trimmed
    visible set, dropped visible ids included; checked id by id against the release's logic."""
    from ivfast.masking import multiblock_masks
    _, s1 = stage1
    cfg = load_config("demo", ["stage=2", f"model.init_from={_save_stage1(s1, tmp_path)}", "masking.kind=multiblock",
                               "model.attn_backend=sdpa", "masking.max_keep=20",
                               "masking.blocks=[{num_blocks: 2, spatial_scale: [0.15, 0.15]}]"])
    assert cfg.masking.predict == "unseen"
    model = build_model(cfg)
    seen = []
    import ivfast.models.epd as epd
    real = epd.ops.gather_tokens
    def spy(x, ids, impl=None):
        seen.append(ids.clone())
        return real(x, ids, impl=impl)
    epd.ops.gather_tokens, old = spy, real
    try:
        with torch.no_grad():
            out = model(_video(), step_seed=5)
    finally:
        epd.ops.gather_tokens = old
    N = 4 * 16
    ((keep, _, _),) = multiblock_masks(cfg.masking, 2, *model.grid, seed=purpose_seed(5, "multiblock"), with_pred=True)
    release = _release_loss_positions(keep, N)
    assert out["predicted"] == [int(release[0].sum())] == [N - 20]
    predicted = seen[-1]            # the targets' gather: the loss positions
    for b in range(2):
        assert torch.equal(predicted[b].long(), torch.nonzero(release[b]).flatten()), b


def test_stage2_head_structure_and_init(stage1, tmp_path):
    """Release selfdist_decoder: Linear(1024,1024)-GELU-Linear(1024,d)-LayerNorm. Small heads
    trunc-normal 0.02 with zero bias (the parent's init)."""
    from ivfast.models.vit import MLPHead
    _, s1 = stage1
    base = ["stage=2", f"model.init_from={_save_stage1(s1, tmp_path)}", "masking.kind=multiblock",
            "model.attn_backend=sdpa"]
    mlp = build_model(load_config("demo", base))
    P, d = mlp.cfg.model.predictor.dim, mlp.cfg.model.encoder.dim
    assert isinstance(mlp.head, MLPHead)
    assert (mlp.head.fc1.in_features, mlp.head.fc1.out_features) == (P, P)
    assert (mlp.head.fc2.in_features, mlp.head.fc2.out_features) == (P, d)
    assert isinstance(mlp.head.norm, torch.nn.LayerNorm) and mlp.head.norm.normalized_shape == (d,)
    z = torch.randn(3, P)
    ref = mlp.head.norm(mlp.head.fc2(torch.nn.functional.gelu(mlp.head.fc1(z))))
    torch.testing.assert_close(mlp.head(z), ref)
    for m in mlp.head.modules():
        if isinstance(m, torch.nn.Linear):
            assert 0.015 < m.weight.std().item() < 0.025 and not m.bias.any()


def test_small_heads_trunc_normal_and_conv_default_patch_init():
    torch.manual_seed(0)
    model = build_model(load_config("demo", ["model.attn_backend=sdpa"]))
    heads = [model.predictor.in_proj, *model.middle_heads, model.final_head]
    for head in heads:
        for m in (head.fc1, head.fc2):
            # xavier would give sqrt(2 / (fan_in + fan_out)) = 0.125 at 64 x 64
            assert 0.017 < m.weight.std().item() < 0.023, m
            assert not m.bias.any()
    pe = model.encoder.patch_embed           # the release's Conv3d keeps PyTorch's default init
    bound = 1 / pe.in_features ** 0.5
    assert pe.weight.abs().max() <= bound and pe.bias.abs().max() <= bound and pe.bias.abs().min() > 0
    assert abs(pe.weight.std().item() - bound / 3 ** 0.5) < 0.1 * bound


def test_decoder_precision_fp32_or_bf16(stage1):
    """model.decoder.dtype=fp32 (released): the decoder's matmuls run in fp32 (TF32 off) even inside
    the step's bf16 autocast; bf16: in bf16 even without autocast (CPU trainer)."""
    cfg, model = stage1
    seen = []
    def hook(mod, args, out):
        m = torch.backends.cuda.matmul
        tf32 = m.fp32_precision != "ieee" if hasattr(m, "fp32_precision") else m.allow_tf32
        seen.append((args[0].dtype, out.dtype, tf32))
    lins = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)]
    handles = [m.register_forward_hook(hook) for m in lins]
    try:
        for mode, autocast, want in (("fp32", True, torch.float32), ("bf16", False, torch.bfloat16)):
            model.cfg.model.decoder.dtype = mode
            seen.clear()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = model(_video(), step_seed=2)
            assert seen and all(o == want for _, o, _ in seen), (mode, seen[:3])
            if mode == "fp32":
                assert all(i == torch.float32 and not tf32 for i, _, tf32 in seen)
            assert torch.isfinite(out["loss_diffusion"])
    finally:
        model.cfg.model.decoder.dtype = "fp32"
        for h in handles:
            h.remove()


def test_random_streams_are_independent_per_purpose(stage1, monkeypatch):
    """The semantic-mask generator is not seeded like the global RNG (drop path) nor like the
    diffusion draws: every purpose has its own stream from the step seed."""
    import ivfast.masking as masking
    from ivfast.trainer import step_seed
    cfg, model = stage1
    seed = step_seed(0, 3, 0, 0)
    seeds = {p: purpose_seed(seed, p) for p in ("drop_path", "semantic", "multiblock", "tube", "diffusion")}
    assert len(set(seeds.values())) == 5 and seed not in seeds.values()
    got, manual = {}, []
    real_mask, real_seed = masking.semantic_mask, torch.manual_seed
    def spy_mask(*a, generator=None, **k):
        got["mask_u"] = torch.rand(64, generator=generator.clone_state() if hasattr(generator, "clone_state")
                                   else torch.Generator().manual_seed(generator.initial_seed()))
        got["mask_seed"] = generator.initial_seed()
        return real_mask(*a, generator=generator, **k)
    monkeypatch.setattr(masking, "semantic_mask", spy_mask)
    monkeypatch.setattr(torch, "manual_seed", lambda s: (manual.append(int(s)), real_seed(s))[1])
    real_seed(seeds["drop_path"])              # what the trainer sets before the forward
    drop_u = torch.rand(64)
    with torch.no_grad():
        model(_video(), step_seed=seed)
    assert got["mask_seed"] == seeds["semantic"] and got["mask_seed"] not in (seed, seeds["drop_path"])
    assert not torch.allclose(got["mask_u"], drop_u), "drop path would re-use the mask's uniforms"
    assert seeds["diffusion"] in manual, "the diffusion draws get their own stream"


def test_stage2_position_tables_reinterpolated_every_forward(stage1, tmp_path):
    """stage2_pos=reinterpolate (released): small learnable tables, interpolated to num_frames on
    every forward, gradients reach them; checkpoints load between both modes; 'once' = free tables."""
    from ivfast.models.vit import interpolate_pos_table
    _, s1 = stage1
    base = ["stage=2", f"model.init_from={_save_stage1(s1, tmp_path)}", "model.num_frames=8",
            "masking.kind=multiblock", "model.attn_backend=sdpa", "model.stage2_pos_frames=4"]
    re = build_model(load_config("demo", base))
    params = dict(re.named_parameters())
    small = params["encoder.parametrizations.pos_embed.original"]
    assert small.shape[0] == 4 + 4 * 16 and "encoder.pos_embed" not in params
    assert re.encoder.pos_embed.shape[0] == 4 + 8 * 16
    torch.testing.assert_close(small, s1.encoder.pos_embed)       # the stage-1 table, as is
    torch.testing.assert_close(re.encoder.pos_embed, interpolate_pos_table(s1.encoder.pos_embed, 4, (4, 4, 4), (8, 4, 4)))
    torch.testing.assert_close(re.teacher.pos_embed, re.encoder.pos_embed)
    out = re(_video(T=8), step_seed=3)
    out["loss"].backward()
    assert small.grad is not None and small.grad.abs().sum() > 0
    assert params["predictor.parametrizations.pos_embed.original"].grad is not None
    groups = param_groups(re, 0.05)
    assert "encoder.parametrizations.pos_embed.original" in groups[1]["names"]      # not decayed
    assert "predictor.parametrizations.pos_embed.original" in groups[0]["names"]    # decayed (released)
    # checkpoints: the small tables under stage2_pos_tables.*, the full-size ones as <module>.pos_embed
    with torch.no_grad():
        small.add_(0.25)
    sd = re.state_dict()
    assert sd["stage2_pos_tables.encoder.pos_embed"].shape == small.shape
    torch.testing.assert_close(sd["encoder.pos_embed"], re.encoder.pos_embed.detach())
    again = build_model(load_config("demo", base))
    again.load_state_dict(sd)
    torch.testing.assert_close(again.encoder.parametrizations.pos_embed.original, small)
    once = build_model(load_config("demo", base + ["model.stage2_pos=once"]))
    assert isinstance(once.encoder.pos_embed, torch.nn.Parameter) and once.encoder.pos_embed.shape[0] == 4 + 8 * 16
    once.load_state_dict(sd)
    torch.testing.assert_close(once.encoder.pos_embed, re.encoder.pos_embed.detach())
    again.load_state_dict(once.state_dict())       # a free full-size table, resampled down
    assert again.encoder.parametrizations.pos_embed.original.shape == small.shape


# --------------------------------------------------------------------------- stage-2 step levers
def _stage2(stage1, tmp_path, *extra):
    _, s1 = stage1
    base = ["stage=2", f"model.init_from={_save_stage1(s1, tmp_path)}", "masking.kind=multiblock",
            "model.attn_backend=sdpa", "model.encoder.drop_path=0.0", *extra]
    return build_model(load_config("demo", base))


def test_stage2_packed_sets_equal_per_set_loop(stage1, tmp_path):
    """model.stage2_pack_sets=true (one encoder pass over both mask sets, per-sequence attention)
    gives the loss and every gradient of the per-set loop; odd, unequal visible counts, re-interpolated
    position tables, 3 clips. auto on CPU keeps the loop."""
    model = _stage2(stage1, tmp_path, "model.num_frames=8", "model.stage2_pos_frames=4",
                    "masking.max_keep=37")
    with torch.no_grad():              # LayerScale 1e-5 (stage-1 init) would hide the encoder blocks
        for blk in model.encoder.blocks:
            blk.ls1.gamma.uniform_(0.3, 1.0)
            blk.ls2.gamma.uniform_(0.3, 1.0)
    model.train()
    assert not model.pack_sets(torch.device("cpu"))            # auto: the loop on CPU
    video = _video(B=3, T=8, seed=4)
    runs = {}
    for pack in (False, True):
        model.cfg.model.stage2_pack_sets = pack
        model.zero_grad()
        out = model(video, step_seed=0)
        out["loss"].backward()
        runs[pack] = out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (ref, g_ref), (got, g) = runs[False], runs[True]
    K0, K1 = got["visible"]
    assert K0 % 2 == 1 and K0 != K1, got["visible"]
    assert got["visible"] == ref["visible"]
    torch.testing.assert_close(got["loss"], ref["loss"], atol=1e-6, rtol=1e-6)
    assert g.keys() == g_ref.keys() and "encoder.parametrizations.pos_embed.original" in g
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], atol=1e-6, rtol=1e-4, msg=n)


@pytest.mark.parametrize("key, bad, choices", [("stage2_pack_sets", "maybe", "['auto', True, False]"),
                                               ("stage2_pos", "twice", "['reinterpolate', 'once']"),
                                               ("stage2_loss", "l3", "['cosine', 'l1', 'mse']")])
def test_stage2_choices_checked_once_by_the_config(key, bad, choices):
    """The config rejects a value outside a choice field, with one line naming the key and the
    choices (the model trusts a loaded config and does not check again)."""
    with pytest.raises(ConfigError) as e:
        load_config("demo", ["stage=2", f"model.{key}={bad}"])
    assert str(e.value) == f"model.{key}: {bad!r} is not valid; choose one of {choices}"


def _teacher_probe(model):
    """Records, for each teacher call, whether autocast was on and the dtype the blocks saw."""
    seen = []
    model.teacher.blocks[0].register_forward_pre_hook(
        lambda mod, args: seen.append((torch.is_autocast_enabled("cpu"), args[0].dtype)))
    return seen


def _reference_teacher_tokens(model, patches):
    """The stage-2 teacher as the student's blocks run it: inside the caller's autocast, GELU and
    LayerScale + residual as their own passes (no fused frozen paths)."""
    ref = copy.deepcopy(model.teacher)
    for m in ref.modules():
        if hasattr(m, "fused_residual"):
            m.fused_residual = False
        if hasattr(m, "gelu_epilogue"):
            m.gelu_epilogue = False
    with torch.no_grad():
        return ref(patches, None)[0]


def test_stage2_teacher_runs_outside_autocast_on_bf16_weights(stage1, tmp_path, monkeypatch):
    """Under autocast whose dtype is the teacher's weights' (CUDA training; CPU autocast simulates
    it) the frozen teacher runs with autocast off, in bf16 throughout. Targets agree within bf16
    rounding with the unfused reference inside autocast, also with the CUDA-only fused paths (GELU
    epilogue, LayerScale addcmul) switched on for CPU."""
    from ivfast.models import vit
    model = _stage2(stage1, tmp_path, "model.teacher.dtype=bf16")
    with torch.no_grad():      # visible LayerScale, so the blocks (and their fused paths) matter
        for blk in model.teacher.blocks:
            blk.ls1.gamma.uniform_(0.3, 1.0)
            blk.ls2.gamma.uniform_(0.3, 1.0)
    assert all(p.dtype == torch.bfloat16 for p in model.teacher.parameters())
    seen = _teacher_probe(model)
    N = model.encoder.num_tokens
    patches = _VideoInput(_video(), 4, 56).patches(torch.arange(N, dtype=torch.int32).expand(2, N), 14, 1, "eager")

    def targets():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model._teacher_tokens(patches)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        old = _reference_teacher_tokens(model, patches)
    new = targets()
    assert seen[-1] == (False, torch.bfloat16), "the teacher must not run under autocast"
    assert old.dtype == new.dtype == torch.bfloat16
    torch.testing.assert_close(new.float(), old.float(), atol=3e-2, rtol=2e-2)

    calls = {"addmm_act": 0, "addcmul": 0}
    real_act, real_addcmul = torch._addmm_activation, torch.addcmul

    def spy_act(*a, **k):
        calls["addmm_act"] += 1
        return real_act(*a, **k)

    def spy_addcmul(*a, **k):
        calls["addcmul"] += 1
        return real_addcmul(*a, **k)
    monkeypatch.setattr(torch, "_addmm_activation", spy_act)
    monkeypatch.setattr(torch, "addcmul", spy_addcmul)
    targets()
    assert calls == {"addmm_act": 0, "addcmul": 0}, "CPU keeps the unfused path"
    monkeypatch.setattr(vit, "FUSED_FROZEN_DEVICES", ("cuda", "cpu"))
    fused = targets()
    depth = len(model.teacher.blocks)
    assert calls == {"addmm_act": depth, "addcmul": 2 * depth}
    # CPU's epilogue GELU is the erf form, CUDA's the tanh form of the module: both within bf16 noise
    torch.testing.assert_close(fused.float(), old.float(), atol=3e-2, rtol=2e-2)
    # the student never takes the frozen paths
    assert not any(getattr(m, "gelu_epilogue", False) or getattr(m, "fused_residual", False)
                   for m in model.encoder.modules())


def test_stage2_teacher_fp32_cpu_path_unchanged(stage1, tmp_path):
    """CPU, fp32 weights, no autocast: the teacher call is the plain module call, bit for bit;
    fp32 weights under bf16 autocast (teacher.dtype=fp32) keep running inside autocast."""
    model = _stage2(stage1, tmp_path)
    seen = _teacher_probe(model)
    N = model.encoder.num_tokens
    patches = torch.randn(2, N, model.encoder.patch_dim)
    assert torch.equal(model._teacher_tokens(patches), model.teacher(patches, None)[0])
    assert seen[-1] == (False, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model._teacher_tokens(patches)
    assert seen[-1] == (True, torch.float32)


def test_stage2_sync_teacher_after_stage1_load_is_identical(stage1, tmp_path):
    """After loading stage-1 weights the teacher is the encoder: same tensors, same outputs on all
    tokens (fp32, eval); a later sync_teacher follows the encoder; frozen, eval, fused flags set."""
    _, s1 = stage1
    model = _stage2(stage1, tmp_path)
    enc_sd = model.encoder.state_dict()
    t_sd = model.teacher.state_dict()
    assert t_sd.keys() == enc_sd.keys()
    for k, v in t_sd.items():
        assert torch.equal(v, enc_sd[k]), k
        if k != "pos_embed":
            assert torch.equal(v, s1.state_dict()["encoder." + k]), k
    N = model.encoder.num_tokens
    patches = torch.randn(2, N, model.encoder.patch_dim)
    model.encoder.eval()
    with torch.no_grad():
        assert torch.equal(model._teacher_tokens(patches), model.encoder(patches, None)[0])
        model.encoder.blocks[1].mlp.fc1.weight.add_(0.5)
        assert not torch.equal(model._teacher_tokens(patches), model.encoder(patches, None)[0])
    model.sync_teacher()
    with torch.no_grad():
        assert torch.equal(model._teacher_tokens(patches), model.encoder(patches, None)[0])
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    assert all(b.fused_residual and b.mlp.gelu_epilogue for b in model.teacher.blocks)


@pytest.mark.gpu
def test_cuda_stage2_teacher_and_packed_sets_match_the_references(stage1, tmp_path):
    """On a GPU under bf16 autocast: the teacher outside autocast (GELU epilogue, addcmul) gives
    the unfused reference's targets to bf16 accuracy; packed sets (flash varlen or segments) give
    the loop's loss and gradients to bf16 accuracy."""
    model = _stage2(stage1, tmp_path, "model.teacher.dtype=bf16", "runtime.device=cuda",
                    "model.attn_backend=auto").cuda()
    with torch.no_grad():
        for blk in (*model.encoder.blocks, *model.teacher.blocks):
            blk.ls1.gamma.uniform_(0.3, 1.0)
            blk.ls2.gamma.uniform_(0.3, 1.0)
    N = model.encoder.num_tokens
    video = _video().cuda()
    patches = _VideoInput(video, 4, 56).patches(torch.arange(N, dtype=torch.int32, device="cuda").expand(2, N),
                                                14, 1, "eager")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        old = _reference_teacher_tokens(model, patches).float()
        new = model._teacher_tokens(patches).float()
    cos = torch.nn.functional.cosine_similarity(old, new, dim=-1)
    assert cos.min() > 0.999, cos.min()
    model.train()
    runs = {}
    for pack in (False, True):
        model.cfg.model.stage2_pack_sets = pack
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(video, step_seed=0)
        out["loss"].backward()
        runs[pack] = out["loss"].item(), torch.cat([p.grad.flatten() for p in model.encoder.parameters()])
    (l0, g0), (l1, g1) = runs[False], runs[True]
    assert abs(l0 - l1) <= 1e-2 * abs(l0), (l0, l1)
    assert torch.nn.functional.cosine_similarity(g0, g1, dim=0) > 0.99
