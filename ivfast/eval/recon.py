"""Stage-1 reconstructions: what the diffusion decoder makes of the masked patches.

    python -m ivfast.eval recon CKPT CLIP_OR_LIST [--out DIR] [--num 4] [--steps N] [--seed 0]

For each clip: the frozen teacher scores the tokens, the stage-1 mask keeps the semantic ones
(exactly as in training: ``masking.*`` of the checkpoint's config), the encoder sees the visible
patches, the predictor fills in every position and the decoder SAMPLES each masked patch
(``model.decoder.sample_steps`` respaced steps unless ``--steps``). One PNG per clip, one row per
frame: original | visible patches (masked ones grey) | reconstruction (visible patches as they
are, masked ones sampled) | the semantic mask (white = kept by the teacher's ranking).
With ``model.decoder.norm_pix`` the decoder predicts per-patch normalised pixels; they are shown
with the ORIGINAL patch's mean and variance (MAE's viewer does the same), which the grid says.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from ivfast import ops
from ivfast.models.epd import _VideoInput

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])


def unpatchify(p: torch.Tensor, grid, patch: int, tubelet: int) -> torch.Tensor:
    """[B, N, 3*tub*p*p] in (c, t, ph, pw) order, tokens (t, h, w) -> [B, 3, T, H, W]."""
    B = p.shape[0]
    T, H, W = grid
    x = p.reshape(B, T, H, W, 3, tubelet, patch, patch).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(B, 3, T * tubelet, H * patch, W * patch)


def _masked_conditions(model, video: torch.Tensor, seed: int):
    """The stage-1 forward up to the decoder, as in training (teacher scores, semantic mask with
    the step seed ``seed``, encoder on the visible patches, predictor): the masked-patch ids and
    the predictor's conditions ``z_m`` [B, M, dim] for them."""
    m = model.cfg.model
    p, tub = m.encoder.patch_size, m.encoder.tubelet
    inp = _VideoInput(video, m.num_frames, m.img_size)
    scores = model.teacher_outputs(inp)[0]
    ids_keep, ids_mask = model._mask(scores, seed, video.device)
    x, _ = model.encoder(inp.patches(ids_keep, p, tub, "eager"), ids_keep)
    z = model.predictor(x, ids_keep, ids_mask)
    return inp, ids_keep, ids_mask, ops.gather_tokens(z, ids_mask, impl="eager")


@torch.no_grad()
def condition_check(model, video: torch.Tensor, seed: int = 0, draws: int = 4) -> dict:
    """Does the stage-1 decoder use the predictor's per-patch conditions? ``model``: a Stage1Model
    in eval mode; ``video`` [B, 3, T, S, S] uint8, several clips (the CI resamples clips).
    :meth:`DiffusionLoss.condition_gap` on the masked patches of ``video``, masked as in training.
    A decoder that ignores its conditions scores the same with them shuffled across patches."""
    if video.shape[0] < 2:
        raise ValueError(f"condition_check needs >= 2 clips (its CI resamples clips), got {video.shape[0]}")
    m = model.cfg.model
    inp, _, ids_mask, z_m = _masked_conditions(model, video, seed)
    B, M = ids_mask.shape
    target = inp.patches(ids_mask, m.encoder.patch_size, m.encoder.tubelet, "eager", norm_pix=m.decoder.norm_pix)
    groups = torch.arange(B).repeat_interleave(M)
    return model.decoder.condition_gap(target.reshape(B * M, -1).float(), z_m.reshape(B * M, -1).float(),
                                       groups, draws=draws, seed=seed)


def describe_condition_check(r: dict) -> str:
    """One line for a person: the three eps-MSEs, the gap with its CI, and what it means."""
    lo, hi = r["gap_ci95"]
    share = 100 * r["gap"] / max(r["mse_shuffled"], 1e-12)
    # the CI says whether the decoder uses them at all; the share (0.1 % cut) says whether it matters
    verdict = (f"uses its per-patch conditions (they lower its eps-MSE by {share:.3g} %)" if lo > 0 and share >= 0.1
               else f"barely uses its per-patch conditions (a measurable {share:.3g} % of its eps-MSE)" if lo > 0
               else "no measurable use of its per-patch conditions (gap inside the noise)" if hi >= 0
               else "does worse with its own conditions than with shuffled ones")
    return (f"decoder eps-MSE {r['mse_true']:.5f} with the predictor's conditions, {r['mse_shuffled']:.5f} with "
            f"them shuffled across patches, {r['mse_zero']:.5f} zeroed; gap {r['gap']:+.2e} [{lo:+.2e}, {hi:+.2e}] "
            f"(95 % CI over {r['clips']} clips, {r['rows']} patches): {verdict}")


@torch.no_grad()
def reconstruct(model, video: torch.Tensor, seed: int = 0, steps: int | None = None) -> dict:
    """``model``: a Stage1Model in eval mode; ``video`` [B, 3, T, S, S] uint8. Returns 0..1 float
    videos 'original', 'visible', 'recon' [B, 3, T, S, S] and 'kept' [B, T, h, w] bool."""
    m = model.cfg.model
    p, tub, impl = m.encoder.patch_size, m.encoder.tubelet, "eager"
    B, N = video.shape[0], model.encoder.num_tokens
    inp, ids_keep, ids_mask, z_m = _masked_conditions(model, video, seed)
    gen = torch.Generator(device=video.device).manual_seed(seed)
    sampled = model.decoder.sample(z_m.reshape(-1, z_m.shape[-1]).float(), steps=steps, generator=gen)
    sampled = sampled.reshape(B, ids_mask.shape[1], -1)
    all_ids = torch.arange(N, device=video.device).expand(B, N)
    full = inp.patches(all_ids, p, tub, impl)                       # ImageNet-normalised patches
    if m.decoder.norm_pix:   # show per-patch-normalised predictions with the original patch statistics
        tgt = torch.gather(full, 1, ids_mask.long()[..., None].expand(-1, -1, full.shape[-1]))
        mu, sd = tgt.mean(-1, keepdim=True), (tgt.var(-1, unbiased=True, keepdim=True) + 1e-6).sqrt()
        sampled = sampled * sd + mu
    recon = full.clone()
    recon.scatter_(1, ids_mask.long()[..., None].expand(-1, -1, full.shape[-1]), sampled)
    kept = torch.zeros(B, N, dtype=torch.bool, device=video.device)
    kept.scatter_(1, ids_keep.long(), True)
    visible = torch.where(kept[..., None], full, torch.zeros_like(full))   # 0 = the mean colour after de-norm

    def to01(patches):
        v = unpatchify(patches.float().cpu(), model.grid, p, tub)
        return (v * IMAGENET_STD.view(1, 3, 1, 1, 1) + IMAGENET_MEAN.view(1, 3, 1, 1, 1)).clamp(0, 1)

    vis01 = to01(visible)
    grey = (~kept.cpu()).reshape(B, *model.grid)
    gmask = grey.repeat_interleave(tub, 1).repeat_interleave(p, 2).repeat_interleave(p, 3)[:, None]
    vis01 = torch.where(gmask, torch.full_like(vis01, 0.5), vis01)
    return {"original": to01(full), "visible": vis01, "recon": to01(recon),
            "kept": kept.cpu().reshape(B, *model.grid), "masked_fraction": ids_mask.shape[1] / N}


def save_grid(out: dict, b: int, path: Path, note: str = "") -> Path:
    """Frames as rows; columns original | visible | reconstruction | semantic mask."""
    from PIL import Image, ImageDraw

    def img(v):   # [3, T, H, W] -> list of HxWx3 uint8
        return [(f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for f in v.unbind(1)]

    cols = [img(out["original"][b]), img(out["visible"][b]), img(out["recon"][b])]
    T, S = out["original"].shape[2], out["original"].shape[3]
    kept = out["kept"][b]                                           # [Tg, h, w]
    tub = T // kept.shape[0]
    mask_frames = []
    for t in range(T):
        k = kept[t // tub].numpy().astype(np.uint8) * 255
        mask_frames.append(np.array(Image.fromarray(k).resize((S, S), Image.NEAREST).convert("RGB")))
    cols.append(mask_frames)
    pad, head = 2, 14
    canvas = Image.new("RGB", (4 * (S + pad) + pad, head + T * (S + pad) + pad + (12 if note else 0)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(["original", "visible", "recon", "kept"]):
        draw.text((pad + c * (S + pad), 1), title, fill="black")
        for t in range(T):
            canvas.paste(Image.fromarray(cols[c][t]), (pad + c * (S + pad), head + t * (S + pad)))
    if note:
        draw.text((pad, canvas.size[1] - 12), note, fill="gray")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def load_stage1(ckpt: str | Path):
    from ivfast.config import load_saved_config
    from ivfast.models.epd import Stage1Model, build_model, load_stage1_weights
    from ivfast.models.release_weights import _ivfast_checkpoint_file

    f = _ivfast_checkpoint_file(Path(ckpt))
    cfg_file = f.with_name("config.yaml")
    if not cfg_file.exists():
        raise FileNotFoundError(f"{f}: no config.yaml next to it (an ivfast stage-1 checkpoint has one)")
    cfg = load_saved_config(cfg_file)
    if cfg.stage != 1:
        raise ValueError(f"{f} is a stage-{cfg.stage} checkpoint; reconstructions need the stage-1 diffusion "
                         f"decoder: pass a stage-1 checkpoint (e.g. runs/demo/stage1)")
    model = build_model(cfg)
    assert isinstance(model, Stage1Model)
    load_stage1_weights(model, f)
    return model.eval(), f


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ivfast.eval recon", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="stage-1 checkpoint dir, run dir or model.safetensors")
    ap.add_argument("clips", help="a video file, or a list (any training list format) / directory of videos")
    ap.add_argument("--out", default="runs/recon")
    ap.add_argument("--num", type=int, default=4, help="clips of the list to show")
    ap.add_argument("--steps", type=int, default=0, help="sampler steps (0 = model.decoder.sample_steps)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from ivfast.eval.data import LabelledClips, ViewSpec

    model, f = load_stage1(args.checkpoint)
    m = model.cfg.model
    src = Path(args.clips)
    with tempfile.TemporaryDirectory() as tmp:
        listing = src
        if src.is_file() and src.suffix.lower() in (".mp4", ".webm", ".avi", ".mkv", ".mov"):
            listing = Path(tmp) / "one.csv"
            listing.write_text(f"{src.resolve()}\n")
        ds = LabelledClips(str(listing), ViewSpec(m.num_frames, m.img_size), mode="center", workers=1)
        outs = []
        for i in range(min(args.num, len(ds))):
            video = ds[i][0]                                        # [1, 3, T, S, S] uint8
            res = reconstruct(model, video, seed=args.seed + i, steps=args.steps or None)
            note = f"{res['masked_fraction']:.0%} masked" + (", norm_pix shown with original stats"
                                                            if m.decoder.norm_pix else "")
            outs.append(save_grid(res, 0, Path(args.out) / f"recon_{i:03d}.png", note))
    print(f"ivfast.eval recon: {len(outs)} grids from {f} in {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def grid_array(out: dict, b: int = 0) -> np.ndarray:
    """The PNG grid of :func:`save_grid` as an [H, W, 3] uint8 array (for TensorBoard)."""
    from PIL import Image
    with tempfile.TemporaryDirectory() as tmp:
        return np.array(Image.open(save_grid(out, b, Path(tmp) / "g.png")).convert("RGB"))


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode inside the block, its own mode restored after (train-time hooks)."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def log_recon(model, video: torch.Tensor, writer, step: int, tag: str = "recon") -> None:
    """Train-time hook (``runtime.recon_every``): the grid of ``video``'s first clip and, with two
    or more clips, the decoder's condition check (one draw per quarter: cheap) to TensorBoard.

    Runs the unwrapped stage-1 model in eval mode (no DDP collectives) and restores train mode."""
    with eval_mode(model):
        out = reconstruct(model, video[:1], seed=step)
        r = condition_check(model, video, seed=step, draws=1) if video.shape[0] >= 2 else {}
    writer.add_image(tag, grid_array(out), step, dataformats="HWC")
    for k in ("gap", "mse_true", "mse_shuffled") if r else ():
        writer.add_scalar(f"decoder_condition/{k}", r[k], step)
