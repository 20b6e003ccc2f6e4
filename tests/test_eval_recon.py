"""Stage-1 reconstruction viewer: shapes, kept patches untouched, mask share, PNG grid, CLI."""
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
