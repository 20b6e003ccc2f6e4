"""Analytic model FLOPs per clip, for MFU.

Counted like ``torch.utils.flop_counter.FlopCounterMode`` counts (and tested against it on small
configs): ``2*M*N*K`` for every GEMM / batched GEMM / convolution, attention as its two GEMMs
(``4 * L_q * L_k * d`` forward), nothing for element-wise work (norms, activations, RoPE, softmax).
Backward is what autograd runs: 2x the forward for a layer whose input needs a gradient, 1x (the
weight gradient only) for a layer fed by data (the decoder's noisy-target and timestep layers; not
the patch embedding, whose input is the output of a learnable RMSNorm). Frozen teachers run forward only.

Local (sliding-window) attention counts only the (query, key) pairs inside the window, i.e. the
useful work a windowed kernel (flash-attn) does; ``dense_local=True`` counts all pairs, which is
what a dense masked kernel (SDPA with a band mask) executes and what FlopCounterMode reports there.

These are MODEL FLOPs: recomputation (activation checkpointing, flash attention's backward) is
not added, as usual for MFU.

Token counts per clip: stage 1 keeps ``n - int(ratio * n)`` tokens of every frame's ``n``; stage 2
takes the visible count of each mask set from ``keep=`` or, by default, the mean over a batch of
masks drawn by ``ivfast.masking.multiblock_masks`` with a fixed seed.
"""
from __future__ import annotations

from .predictor import layer_is_global
from .teacher import teacher_arch


def _lin(rows: int, i: int, o: int) -> int:
    return 2 * rows * i * o


def attention_pairs(n: int, window: int | None) -> int:
    """Number of (query, key) pairs attended in a length-``n`` sequence (``|i - j| <= window``)."""
    if window is None or window >= n - 1:
        return n * n
    w = window
    # every row has 2w+1 keys, minus what falls off the two ends: 2 * (w + (w-1) + ... + 1)
    return n * (2 * w + 1) - w * (w + 1)


def encoder_flops(ecfg, tokens: int) -> dict:
    """Forward FLOPs of the ViT on ``tokens`` patch tokens (+ its cls tokens), one clip."""
    d, L = ecfg.dim, ecfg.num_cls + tokens
    hidden = int(d * ecfg.mlp_ratio)
    patch = _lin(tokens, 3 * ecfg.tubelet * ecfg.patch_size ** 2, d)
    per_block = (_lin(L, d, 3 * d) + 4 * L * L * d + _lin(L, d, d)
                 + _lin(L, d, hidden) + _lin(L, hidden, d))
    return dict(patch=patch, blocks=ecfg.depth * per_block)


def predictor_flops(pcfg, enc_dim: int, seq: int, dense_local: bool = False) -> int:
    """Forward FLOPs of the predictor (input MLP + ModernBERT layers) on a ``seq``-long sequence."""
    D, h = pcfg.dim, pcfg.mlp_hidden
    total = _lin(seq, enc_dim, enc_dim) + _lin(seq, enc_dim, D)
    for j in range(pcfg.layers):
        glob = layer_is_global(pcfg.first_layer_index + j, pcfg.global_every)
        pairs = attention_pairs(seq, None if (glob or dense_local) else pcfg.local_window // 2)
        total += _lin(seq, D, 3 * D) + 4 * pairs * D + _lin(seq, D, D) + _lin(seq, D, 2 * h) + _lin(seq, h, D)
    return total


def siglip_flops(arch: dict, frames: int, tokens: int, patch: int) -> int:
    """Forward FLOPs of a SigLIP vision tower with its pooling head on ``frames`` images."""
    D, m = arch["dim"], arch["mlp_hidden"]
    n = tokens
    per_image = _lin(n, 3 * patch * patch, D)
    per_image += arch["depth"] * (4 * _lin(n, D, D) + 4 * n * n * D + _lin(n, D, m) + _lin(n, m, D))
    # pooling head: probe q, k and v projections, 1 x n attention, out proj, MLP on the pooled vector
    per_image += _lin(1, D, D) + 2 * _lin(n, D, D) + 4 * n * D + _lin(1, D, D) + _lin(1, D, m) + _lin(1, m, D)
    return frames * per_image


def _decoder(rows: int, cfg, target_dim: int, cond_dim: int) -> int:
    """Decoder forward + backward: the layers fed by data (noisy target, timestep features) get 1x back."""
    from .diffusion import FREQ_DIM, decoder_flops
    fwd = decoder_flops(rows, cfg, target_dim, cond_dim)
    data_fed = _lin(rows * cfg.batch_mul, target_dim, cfg.width) + _lin(rows * cfg.batch_mul, FREQ_DIM, cfg.width)
    return 3 * fwd - data_fed


def stage2_counts(cfg, batch: int = 16, seed: int = 0) -> tuple[list[float], list[float]]:
    """Visible and predicted (loss) tokens per clip of each stage-2 mask set, from masks drawn
    with a fixed seed (``masking.predict`` decides which ids carry the loss)."""
    from ivfast.masking import multiblock_masks
    m, e = cfg.model, cfg.model.encoder
    grid = (m.num_frames // e.tubelet, m.img_size // e.patch_size, m.img_size // e.patch_size)
    sets = multiblock_masks(cfg.masking, batch, *grid, seed=seed, with_pred=True)
    pred = [float((mk if cfg.masking.predict == "unseen" else pr).shape[1]) for _, mk, pr in sets]
    return [float(k.shape[1]) for k, _, _ in sets], pred


def flops_per_clip(cfg, keep: list[float] | None = None, dense_local: bool = False,
                   predicted: list[float] | None = None) -> dict:
    """Model FLOPs per clip (forward + backward; teachers forward only) of ``cfg.stage``.

    Returns ``dict(encoder, predictor, decoder, heads, teacher, total)`` (floats) plus the token
    counts used (``visible``, ``masked``: per clip, lists for stage 2's mask sets, where
    ``masked`` counts the positions the loss is on). Stage 2 takes ``keep`` / ``predicted``
    (tokens per set) when given, else the mean of masks drawn with a fixed seed.
    """
    m, e, p = cfg.model, cfg.model.encoder, cfg.model.predictor
    T, S = m.num_frames // e.tubelet, m.img_size // e.patch_size
    n_frame = S * S
    N = T * n_frame
    d, C = e.dim, e.num_cls
    seq = C + N
    out = dict(encoder=0.0, predictor=0.0, decoder=0.0, heads=0.0, teacher=0.0)

    def trained_encoder(tokens):
        f = encoder_flops(e, tokens)
        # the patch embedding's input carries a gradient too: it feeds the learnable patch RMSNorm
        return 3 * (f["patch"] + f["blocks"])

    if cfg.stage == 1:
        per_frame_keep = n_frame - int(cfg.masking.ratio * n_frame)
        K = T * per_frame_keep
        M = N - K
        out["encoder"] = trained_encoder(K)
        out["predictor"] = 3 * predictor_flops(p, d, seq, dense_local)
        out["decoder"] = _decoder(M, m.decoder, 3 * e.tubelet * e.patch_size ** 2, p.dim)
        arch = teacher_arch(m.teacher, m.align_dim)
        Dt, L = arch["dim"], C + K
        heads = len(m.teacher.student_layers) * (_lin(K, d, d) + _lin(K, d, Dt))
        heads += _lin(1, d, d) + 2 * _lin(L, d, d) + 4 * L * d + _lin(1, d, m.pool_dim)   # attention pool
        heads += _lin(1, m.pool_dim, m.pool_dim) + _lin(1, m.pool_dim, Dt)                # final head
        out["heads"] = 3 * heads
        t_tokens = (m.teacher.img_size // m.teacher.patch_size) ** 2
        out["teacher"] = siglip_flops(arch, m.num_frames, t_tokens, m.teacher.patch_size)
        out.update(visible=K, masked=M)
    elif cfg.stage == 2:
        drawn_keep, drawn_pred = stage2_counts(cfg) if keep is None or predicted is None else (None, None)
        keeps = list(keep) if keep is not None else drawn_keep
        preds = list(predicted) if predicted is not None else drawn_pred
        for K, P in zip(keeps, preds):
            out["encoder"] += trained_encoder(K)
            out["predictor"] += 3 * predictor_flops(p, d, seq, dense_local)
            # stage-2 head at the loss positions: the released MLP (P x P, then P x d)
            out["heads"] += 3 * (_lin(P, p.dim, p.dim) + _lin(P, p.dim, d))
        f = encoder_flops(e, N)
        out["teacher"] = f["patch"] + f["blocks"]
        out.update(visible=keeps, masked=preds)
    else:
        raise ValueError(f"stage must be 1 or 2, got {cfg.stage!r}")
    out["total"] = sum(out[k] for k in ("encoder", "predictor", "decoder", "heads", "teacher"))
    return out


# --------------------------------------------------------------------------- predicted peak memory
# Bytes autograd keeps per token and layer in eager bf16 autocast, from what each op saves
# (a review of what each op saves, +-20 %), written per channel so they scale with
# the width: encoder block ~41 KB/token at d=768 (hidden 3072); predictor layer ~45 KB/token at
# dim=1024, mlp_hidden=2624 (fp32 residual saved twice, the [2h] GeGLU buffer, q/k/v + qkv).
def _enc_block_bytes(d: int, hidden: int) -> float:
    return 41 * 1024 * (d + hidden / 4) / (768 + 3072 / 4)


def _pred_layer_bytes(D: int, h: int, mode: str = "none") -> float:
    if mode == "full":        # only the fp32 layer input stays; a layer's worth is rebuilt in backward
        return 4 * D
    if mode == "selective":   # GEMM / attention outputs (bf16) + the fp32 input; LN/RoPE/GeGLU redone
        return 2 * (3 * D + D + D + 2 * h + D) + 4 * D
    return 45 * 1024 * (D + h / 2) / (1024 + 2624 / 2)


def _count_params(module_fn) -> int:
    m = module_fn()
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def _encoder_params(e, tokens: int) -> int:
    hidden = int(e.dim * e.mlp_ratio)
    pos = (tokens + e.num_cls) * e.dim if e.learnable_pos else 0
    return e.depth * (4 * e.dim ** 2 + 2 * e.dim * hidden) + 3 * e.tubelet * e.patch_size ** 2 * e.dim + pos


def _predictor_params(p, enc_dim: int, tokens: int, learnable_pos: bool) -> int:
    pos = (tokens + 1) * enc_dim if learnable_pos else 0
    return enc_dim ** 2 + enc_dim * p.dim + p.layers * (4 * p.dim ** 2 + 3 * p.dim * p.mlp_hidden) + pos


def predicted_peak_memory(cfg, batch: int | None = None) -> dict:
    """Predicted peak GPU memory (GiB) of one training step of ``cfg`` at ``batch`` clips per GPU
    (default ``optim.batch_per_gpu``): fp32 params + grads + AdamW moments, bf16 frozen teacher,
    saved activations per token (above), decoder rows, a transient margin. A model, not a
    measurement: +-20 %, to be checked against ``torch.cuda.max_memory_allocated``."""
    m, e, p = cfg.model, cfg.model.encoder, cfg.model.predictor
    B = batch or cfg.optim.batch_per_gpu
    GiB = 2.0 ** 30
    T, S = m.num_frames // e.tubelet, m.img_size // e.patch_size
    N, C = T * S * S, e.num_cls
    enc_params = _encoder_params(e, N)
    pred_params = _predictor_params(p, e.dim, N, e.learnable_pos)
    hidden = int(e.dim * e.mlp_ratio)
    pmode = getattr(p, "act_checkpoint", "none")
    enc_tok = (4 * e.dim) if e.act_checkpoint else _enc_block_bytes(e.dim, hidden)
    pred_tok = _pred_layer_bytes(p.dim, p.mlp_hidden, pmode)
    out = {}
    if cfg.stage == 1:
        from .diffusion import DiffusionLoss
        from .teacher import teacher_arch
        dec_params = _count_params(lambda: DiffusionLoss(m.decoder, target_dim=3 * e.tubelet * e.patch_size ** 2,
                                                         cond_dim=p.dim))
        arch = teacher_arch(m.teacher, m.align_dim)
        Dt = arch["dim"]
        heads = len(m.teacher.student_layers) * (e.dim * e.dim + e.dim * Dt) + 3 * e.dim * e.dim \
            + m.pool_dim * m.pool_dim + m.pool_dim * Dt
        trainable = enc_params + pred_params + dec_params + heads
        tp = m.teacher.patch_size
        teacher_params = arch["depth"] * (4 * Dt * Dt + 2 * Dt * arch["mlp_hidden"]) + 3 * tp * tp * Dt
        K = T * (S * S - int(cfg.masking.ratio * S * S))
        rows = B * (N - K) * m.decoder.batch_mul
        enc_act = B * (C + K) * e.depth * enc_tok
        pred_act = B * (C + N) * p.layers * pred_tok
        # decoder blocks ~55 KB/row + adaLN ~61 KB/row + fp32 loss maths ~50 KB/row at width 1536
        dec_act = rows * (55 + 61 + 50) * 1024 * m.decoder.width / 1536
        # alignment heads: fp32 projections to the teacher width and cosine maths, per visible token
        heads_act = B * K * len(m.teacher.student_layers) * 34 * 1024 * Dt / 1536
        teacher_out = B * m.num_frames * (m.teacher.img_size // tp) ** 2 * Dt * 2 * (len(m.teacher.middle_layers) + 1)
        out.update(decoder_and_heads=(dec_act + heads_act) / GiB)
    else:
        keeps, preds = stage2_counts(cfg, batch=max(B, 2))
        trainable = enc_params + pred_params + p.dim * e.dim + p.dim * p.dim     # the head: two layers
        teacher_params = enc_params
        enc_act = sum(B * (C + K) * e.depth * enc_tok for K in keeps)
        pred_act = len(keeps) * B * (C + N) * p.layers * pred_tok
        # fp32 head activations + targets at the loss positions
        heads_act = sum(B * P * (3 * p.dim + e.dim) * 4 * 2 for P in preds)
        teacher_out = B * N * e.dim * 2
        out.update(decoder_and_heads=heads_act / GiB)
    # recomputation rebuilds one layer's full activations at a time
    recompute = 0.0
    if pmode != "none":   # one layer's dropped bytes, rebuilt during its backward
        dropped = _pred_layer_bytes(p.dim, p.mlp_hidden) - pred_tok
        recompute = max(recompute, pred_act / p.layers / pred_tok * dropped)
    if e.act_checkpoint:
        recompute = max(recompute, enc_act / e.depth / enc_tok * _enc_block_bytes(e.dim, hidden))
    acts = enc_act + pred_act + out["decoder_and_heads"] * GiB
    out.update(params_grads_adamw=16 * trainable / GiB, teacher_weights=2 * teacher_params / GiB,
               encoder_activations=enc_act / GiB, predictor_activations=pred_act / GiB,
               teacher_outputs=teacher_out / GiB, recompute=recompute / GiB,
               transients=0.08 * acts / GiB)   # backward's gradient buffers, workspace, fragmentation
    out["total"] = sum(out.values())
    out.update(batch=B, trainable_params=trainable, predictor_checkpoint=pmode, encoder_checkpoint=e.act_checkpoint)
    return out


def main(argv=None) -> int:
    """``python -m ivfast.models.flops --config stage2_vitb [key=value ...]``: FLOPs per clip and
    the predicted peak memory of a preset."""
    import argparse

    from ivfast.config import load_config
    ap = argparse.ArgumentParser(prog="python -m ivfast.models.flops", description=main.__doc__)
    ap.add_argument("--config", default="stage1_vitb")
    ap.add_argument("--batch", type=int, default=0, help="clips per GPU (default optim.batch_per_gpu)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    f = flops_per_clip(cfg)
    mem = predicted_peak_memory(cfg, a.batch or None)
    B = mem["batch"]
    print(f"{a.config}: stage {cfg.stage}, {B} clips per GPU")
    print("model TFLOP per clip (fwd+bwd; teacher fwd): " + ", ".join(
        f"{k} {f[k] / 1e12:.2f}" for k in ("teacher", "encoder", "predictor", "decoder", "heads", "total")))
    print(f"model TFLOP per step and GPU: {f['total'] * B / 1e12:.1f}")
    print(f"predicted peak memory (GiB, +-20 %, not measured; predictor checkpoint={mem['predictor_checkpoint']}, "
          f"encoder checkpoint={mem['encoder_checkpoint']}):")
    for k in ("params_grads_adamw", "teacher_weights", "encoder_activations", "predictor_activations",
              "decoder_and_heads", "teacher_outputs", "recompute", "transients", "total"):
        print(f"  {k:22s} {mem[k]:6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
