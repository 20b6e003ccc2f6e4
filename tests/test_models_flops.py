"""Analytic FLOP counter == torch.utils.flop_counter.FlopCounterMode on small configs."""
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from ivfast.config import load_config
from ivfast.models.epd import Stage1Model, Stage2Model, build_model
from ivfast.models.flops import attention_pairs, flops_per_clip

# The math attention path is plain batched GEMMs, which FlopCounterMode sees (the CPU flash
# kernel of SDPA is not in its registry). Local layers then run densely: dense_local=True.
OVR = ["model.attn_backend=math", "model.token_impl=eager", "model.decoder.impl=eager"]


def _count(model, video, seed):
    with FlopCounterMode(display=False) as fc:
        out = model(video, seed)
        out["loss"].backward()
    return fc.get_total_flops(), out


def test_attention_pairs():
    for n in (1, 5, 9, 30):
        for w in (0, 1, 3, 8, 40):
            brute = sum(1 for i in range(n) for j in range(n) if abs(i - j) <= w)
            assert attention_pairs(n, w) == brute, (n, w)
    assert attention_pairs(7, None) == 49


def test_stage1_flops_match_counter():
    torch.manual_seed(0)
    cfg = load_config("demo", OVR)
    model = build_model(cfg)
    B = 2
    video = torch.randint(0, 256, (B, 3, 4, 56, 56), dtype=torch.uint8)
    measured, out = _count(model, video, 0)
    est = flops_per_clip(cfg, dense_local=True)
    assert est["visible"] == out["visible"] and est["masked"] == out["masked"]
    assert est["total"] * B == measured, (est, measured)
    # useful (windowed) FLOPs are fewer than the dense count when the sequence exceeds the window
    assert flops_per_clip(cfg)["predictor"] < est["predictor"]


def test_stage2_flops_match_counter(tmp_path):
    torch.manual_seed(0)
    s1 = Stage1Model(load_config("demo", OVR))
    save_file({k: v.contiguous() for k, v in s1.state_dict().items()}, str(tmp_path / "model.safetensors"))
    cfg = load_config("demo", OVR + ["stage=2", "masking.kind=multiblock", f"model.init_from={tmp_path}",
                                     "model.stage2_loss=l1"])
    model = build_model(cfg)
    B = 2
    video = torch.randint(0, 256, (B, 3, 4, 56, 56), dtype=torch.uint8)
    measured, out = _count(model, video, 5)
    est = flops_per_clip(cfg, keep=out["visible"], predicted=out["predicted"], dense_local=True)
    assert est["total"] * B == measured, (est, measured)
    est_default = flops_per_clip(cfg)
    assert len(est_default["visible"]) == len(cfg.masking.blocks) and est_default["total"] > 0


@pytest.mark.parametrize("preset,low,high", [("stage1_vitb", 10e12, 17e12), ("stage2_vitb", 12e12, 19e12)])
def test_paper_scale_is_plausible(preset, low, high):
    """ViT-B totals land near the recipe's published table (~13.6 / ~15.5 TFLOP per clip)."""
    est = flops_per_clip(load_config(preset))
    assert low < est["total"] < high, est
