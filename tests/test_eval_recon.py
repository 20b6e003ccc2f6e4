"""Stage-1 reconstruction viewer: shapes, kept patches untouched, mask share, PNG grid, CLI."""
import pytest
import torch

from ivfast.config import load_config


def test_reconstruction_keeps_visible_patches_and_writes_a_grid(tmp_path):
    from ivfast.checkpoint import save_checkpoint
    from ivfast.eval.recon import load_stage1, main, reconstruct, save_grid
    from ivfast.eval.synth_labels import make_labelled_clips
    from ivfast.models.epd import build_model

    cfg = load_config("demo", ["model.decoder.sample_steps=2"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ck = save_checkpoint(tmp_path / "run" / "checkpoints", 3, model.state_dict(), {}, cfg)
    model, _ = load_stage1(tmp_path / "run")
    video = torch.randint(0, 256, (2, 3, cfg.model.num_frames, cfg.model.img_size, cfg.model.img_size),
                          dtype=torch.uint8)
    out = reconstruct(model, video, seed=1)
    assert out["recon"].shape == out["original"].shape == (2, 3, 4, 56, 56)
    kept = out["kept"]                                               # [B, T, h, w]
    assert kept.float().mean().item() == 0.25                        # masking.ratio 0.75, per frame
    # visible patches are the original pixels, in the reconstruction and in the 'visible' column
    pix = kept.repeat_interleave(14, 2).repeat_interleave(14, 3)[:, None].expand_as(out["recon"])
    torch.testing.assert_close(out["recon"][pix], out["original"][pix])
    torch.testing.assert_close(out["original"], video.float() / 255, atol=1e-5, rtol=0)
    assert (out["visible"][~pix] == 0.5).all()
    assert not torch.allclose(out["recon"][~pix], out["original"][~pix])
    png = save_grid(out, 0, tmp_path / "g.png", "note")
    from PIL import Image
    assert Image.open(png).size[0] == 4 * (56 + 2) + 2
    lst = make_labelled_clips(tmp_path / "clips", 1, frames=8, size=64, split="val", classes=[0])
    assert main([str(ck), str(lst), "--out", str(tmp_path / "rec"), "--num", "1", "--steps", "2"]) == 0
    assert (tmp_path / "rec" / "recon_000.png").exists()


@pytest.mark.slow
def test_training_logs_a_reconstruction_grid_every_n_steps(tmp_path):
    """runtime.recon_every=2 on the demo: stage 1 writes 'recon' images at steps 2 and 4, stage 2 none;
    the default (0) writes none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ivfast.train import main as train_main

    out = tmp_path / "demo"
    assert train_main(["--config", "demo", f"runtime.output_dir={out}", "runtime.max_steps=4",
                       "runtime.recon_every=2", "model.decoder.sample_steps=2"]) == 0

    def steps(stage):
        ea = EventAccumulator(str(out / stage / "tensorboard"))
        ea.Reload()
        return [e.step for e in ea.Images("recon")] if "recon" in ea.Tags()["images"] else []
    assert steps("stage1") == [2, 4] and steps("stage2") == []
    ea = EventAccumulator(str(out / "stage1" / "tensorboard"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("decoder_condition/gap")] == [2, 4]
    # the demo checks its stage-1 decoder once more at the end, on 16 clips
    import json
    r = json.loads((out / "stage1" / "decoder_condition.json").read_text())
    assert r["clips"] == 16 and r["rows"] == 16 * 48 and len(r["gap_ci95"]) == 2
    assert load_config("demo").runtime.recon_every == 0


def test_condition_check_on_a_stage1_model():
    """Masked as in training; an untrained decoder (zero-initialised output, as released) ignores its
    conditions exactly, and the line says so; one clip is refused (its CI resamples clips)."""
    from ivfast.eval.recon import condition_check, describe_condition_check
    from ivfast.models.epd import build_model

    cfg = load_config("demo")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    video = torch.randint(0, 256, (3, 3, 4, 56, 56), dtype=torch.uint8)
    r = condition_check(model, video, seed=0, draws=1)
    assert r["rows"] == 3 * 48 and r["clips"] == 3
    assert r["gap"] == 0.0 and r["mse_true"] == r["mse_shuffled"] == r["mse_zero"]
    assert "no measurable use" in describe_condition_check(r)
    used = {**r, "mse_shuffled": 1.0, "gap": 0.01, "gap_ci95": [0.005, 0.02]}
    assert "uses its per-patch conditions (they lower its eps-MSE by 1 %)" in describe_condition_check(used)
    barely = {**used, "gap": 1e-5, "gap_ci95": [1e-6, 2e-5]}
    assert "barely uses" in describe_condition_check(barely)
    with pytest.raises(ValueError, match=">= 2 clips"):
        condition_check(model, video[:1])
