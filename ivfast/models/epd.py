"""Composed models: ``Stage1Model``, ``Stage2Model``, ``build_model(cfg)``, ``param_groups``.

Stage 1 (pixel reconstruction + semantic alignment), per clip:
  frozen SigLIP teacher on all frames -> semantic-aware mask from its pooling-head attention ->
  encoder on the visible tokens -> predictor over all positions -> diffusion loss on the masked
  patches' pixels + alignment of projected student tokens (middle layers, visible positions) and
  of the student's attention-pooled vector (final) with the teacher's per-frame pooled vectors
  (L2-normalised, averaged over frames, not re-normalised: ``final_alignment_loss``).
Stage 2 (latent prediction):
  frozen copy of the stage-1 encoder on all tokens -> targets (autocast off on its bf16 weights);
  per V-JEPA mask set the student encoder on its visible tokens (``model.stage2_pack_sets``: both
  sets in one pass with per-sequence attention, the same maths); the predictor runs ONCE over all mask sets stacked on the batch
  axis (every set has all N positions) -> head (``Linear -> GELU -> Linear -> LayerNorm``, the
  released ``selfdist_decoder``) -> loss at every position the encoder did not see (released;
  ``masking.predict=blocks``: the block-masked ones only) (``2 - 2 cos`` of L2-normalised vectors
  by default; ``l1`` / ``mse`` against layer-normalised targets as V-JEPA).

Both take ``video`` [B, 3, T, H, W] as uint8 (normalised on device with the ImageNet mean/std,
fused into the token gather) or as float already ImageNet-normalised, and a ``step_seed`` that
fixes every random draw: each purpose (semantic mask, multi-block masks, drop path, diffusion
timesteps and noise) gets its own stream derived from it (``purpose_seed``). They return a dict with ``loss`` (the scalar to backward),
each loss part (detached) and the token counts.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ivfast import ops
from .diffusion import decoder_autocast
from .predictor import Predictor
from .teacher import build_teacher
from .vit import AttentionPool, MLPHead, VisionTransformer, interpolate_pos_table, set_pos_table, sincos_3d

log = logging.getLogger("ivfast.models")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Weight decay (released code): none on these FULL parameter names, nor on any parameter with
# fewer than 2 dims (norms, biases, LayerScale gammas). The predictor's position table and mask
# token ARE decayed unless model.decay_predictor_tokens is false.
NO_DECAY_NAMES = ("encoder.pos_embed", "encoder.cls_token", "align_pos")
PREDICTOR_TOKEN_NAMES = ("predictor.pos_embed", "predictor.mask_token")


# Independent random streams per purpose, all derived from the step seed (a purpose never re-uses
# another's uniforms: the semantic-mask generator used to be seeded like torch.manual_seed).
STREAMS = dict(drop_path=1, semantic=2, multiblock=3, tube=4, diffusion=5)


def purpose_seed(step_seed: int, purpose: str) -> int:
    """The seed of ``purpose``'s random stream at this step (63 bits, valid for torch generators)."""
    from ivfast.masking import stream_key
    return stream_key(int(step_seed) % (1 << 64), STREAMS[purpose]) >> 1


def _init_head(head: nn.Module) -> None:
    """Released init of the small MLP heads: the parent's trunc-normal 0.02 / zero bias runs after
    the heads' own xavier init (s1:682, s2:666), so every Linear ends up trunc-normal 0.02."""
    for lin in head.modules():
        if isinstance(lin, nn.Linear):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean of ``2 - 2 cos(a, b)`` over rows (= squared distance of the L2-normalised vectors), fp32."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    return (2.0 - 2.0 * (a * b).sum(-1)).mean()


def final_alignment_loss(student: torch.Tensor, teacher_frames: torch.Tensor, renorm: bool = False) -> torch.Tensor:
    """Stage-1 final alignment: student pooled [B, D] vs the teacher's pooled vectors per frame [B, T, D].

    Released code: each frame's teacher vector is L2-normalised, the clip target is their mean over
    frames and is NOT re-normalised, so ``loss = 2 - 2 <normalize(s), mean_t normalize(p_t)>`` (the
    target's norm is below 1 when frames disagree, which scales the gradient down). ``renorm=True``
    re-normalises the mean: a plain cosine distance. Mean over the batch, fp32.
    """
    if teacher_frames.dim() != 3 or student.dim() != 2 or teacher_frames.shape[::2] != student.shape:
        raise ValueError(f"final alignment needs student [B, D] and teacher [B, T, D], got "
                         f"{tuple(student.shape)} and {tuple(teacher_frames.shape)}")
    target = F.normalize(teacher_frames.float(), dim=-1).mean(1)
    if renorm:
        target = F.normalize(target, dim=-1)
    return (2.0 - 2.0 * (F.normalize(student.float(), dim=-1) * target).sum(-1)).mean()


class _VideoInput:
    """What the model needs from one input clip, for uint8 and pre-normalised float alike."""

    def __init__(self, video: torch.Tensor, num_frames: int, img_size: int):
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, T, H, W], got {tuple(video.shape)}; a loader's "
                             f"[B, T, H, W, 3] clip can be passed as clip.permute(0, 4, 1, 2, 3)")
        B, _, T, H, W = video.shape
        if (T, H, W) != (num_frames, img_size, img_size):
            raise ValueError(f"video is T, H, W = {T}, {H}, {W} but the model is built for "
                             f"{num_frames}, {img_size}, {img_size} (model.num_frames, model.img_size)")
        self.video, self.B = video, B
        if video.dtype == torch.uint8:
            self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD    # ops normalise uint8 in the gather
        elif video.is_floating_point():
            self.mean = self.std = None                          # already ImageNet-normalised
        else:
            raise TypeError(f"video must be uint8 or an ImageNet-normalised float tensor, got {video.dtype}")

    def pixels01(self, dtype=torch.float32) -> torch.Tensor:
        """The clip in 0..1 (the teacher applies its own normalisation)."""
        v = self.video
        if v.dtype == torch.uint8:
            # 0..255 are exact in bf16/fp16 and the division rounds once: same as fp32 then cast
            return v.to(dtype) / 255.0
        # fp32 ImageNet constants made once per device (no per-step host copy, no bf16 rounding)
        mean = ops.channel_constant(IMAGENET_MEAN, v.device).view(1, 3, 1, 1, 1)
        std = ops.channel_constant(IMAGENET_STD, v.device).view(1, 3, 1, 1, 1)
        return (v.float() * std + mean).to(dtype)

    def patches(self, ids, patch, tubelet, impl, norm_pix=False) -> torch.Tensor:
        return ops.patch_targets(self.video, ids, patch, tubelet, self.mean, self.std, norm_pix=norm_pix, impl=impl)


class _Base(nn.Module):
    """What both stages share: the student encoder and the predictor, built from ``cfg.model``."""

    def __init__(self, cfg):
        super().__init__()
        m, enc = cfg.model, cfg.model.encoder
        self.cfg, self.impl = cfg, m.token_impl
        self.encoder = VisionTransformer(enc, m.num_frames, m.img_size, m.attn_backend)
        self.grid, self.num_cls = self.encoder.grid, enc.num_cls
        self.predictor = Predictor(m.predictor, enc.dim, enc.num_cls, self.grid, m.attn_backend, m.token_impl,
                                   learnable_pos=enc.learnable_pos)
        # released init: the patch projection is a Conv3d the parent's init skips, so it keeps
        # PyTorch's default (kaiming-uniform a=sqrt(5), the same as nn.Linear's default for the
        # equivalent GEMM); the predictor's input projection is a small head (trunc-normal 0.02)
        self.encoder.patch_embed.reset_parameters()
        in_proj = getattr(self.predictor, "in_proj", None)
        if in_proj is not None:
            _init_head(in_proj)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def _ids_to_device(self, groups, device):
        """NumPy id arrays (tuples of them, one tuple per mask set) as device tensors.

        On CUDA all arrays of one dtype travel in ONE copy from a pinned host buffer: six small
        copies from pageable memory each stage through a bounce buffer and block the host, which
        serialises micro-steps under gradient accumulation. torch's caching host allocator keeps
        the pinned buffer alive until the copy has run."""
        return ids_to_device(groups, torch.device(device))


def pack_ids(groups, pin: bool = False):
    """Concatenate the id arrays of ``groups`` into one flat host tensor per dtype.

    Returns ``(flat, layout)``: ``flat[dtype]`` is 1-D (pinned when ``pin``), ``layout`` mirrors
    ``groups`` with ``(dtype, offset, shape)`` per array; :func:`unpack_ids` inverts it."""
    arrays = [[np.ascontiguousarray(a) for a in g] for g in groups]
    sizes: dict = {}
    layout = []
    for g in arrays:
        row = []
        for a in g:
            t = torch.from_numpy(a).dtype
            row.append((t, sizes.get(t, 0), tuple(a.shape)))
            sizes[t] = sizes.get(t, 0) + a.size
        layout.append(row)
    flat = {t: torch.empty(n, dtype=t, pin_memory=pin) for t, n in sizes.items()}
    for g, row in zip(arrays, layout):
        for a, (t, off, _) in zip(g, row):
            flat[t][off:off + a.size].copy_(torch.from_numpy(a.reshape(-1)))
    return flat, layout


def unpack_ids(flat, layout):
    n = lambda shape: int(np.prod(shape)) if shape else 1     # noqa: E731
    return [tuple(flat[t][off:off + n(shape)].view(shape) for t, off, shape in row) for row in layout]


def ids_to_device(groups, device: torch.device):
    if device.type != "cuda":
        return [tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in g) for g in groups]
    flat, layout = pack_ids(groups, pin=True)
    return unpack_ids({t: v.to(device, non_blocking=True) for t, v in flat.items()}, layout)


# =========================================================================== stage 1
class Stage1Model(_Base):
    def __init__(self, cfg, teacher: nn.Module | None = None, teacher_dtype=torch.float32):
        super().__init__(cfg)
        m, enc = cfg.model, cfg.model.encoder
        from .diffusion import DiffusionLoss
        self.decoder = DiffusionLoss(m.decoder, target_dim=self.encoder.patch_dim, cond_dim=m.predictor.dim)
        self.teacher = teacher if teacher is not None else build_teacher(
            m.teacher, m.align_dim, m.attn_backend, dtype=teacher_dtype)
        Dt = self.teacher.dim
        if Dt != m.align_dim:
            raise ValueError(f"model.align_dim={m.align_dim} must equal the teacher's width {Dt}")
        if self.teacher.grid != self.grid[1] or self.grid[2] != self.grid[1]:
            raise ValueError(f"teacher token grid {self.teacher.grid}x{self.teacher.grid} (img_size "
                             f"{m.teacher.img_size} / patch {self.teacher.patch}) must equal the student's "
                             f"{self.grid[1]}x{self.grid[2]}; set model.teacher.img_size accordingly")
        self.student_layers = list(m.teacher.student_layers)
        if len(self.student_layers) != len(m.teacher.middle_layers):
            raise ValueError("model.teacher.student_layers and middle_layers must pair up one to one")
        set_pos_table(self, "align_pos", sincos_3d(enc.dim, *self.grid, num_cls=enc.num_cls), enc.learnable_pos)
        self.middle_heads = nn.ModuleList(MLPHead(enc.dim, Dt) for _ in self.student_layers)
        self.pool = AttentionPool(enc.dim, m.pool_heads, m.pool_dim, m.attn_backend)
        self.final_head = MLPHead(m.pool_dim, Dt)
        for head in (*self.middle_heads, self.final_head):
            _init_head(head)
        for lin in self.pool.modules():      # the encoder's init (trunc-normal 0.02) for the pool head
            if isinstance(lin, nn.Linear):
                nn.init.trunc_normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
        # The frozen SigLIP teacher is rebuilt from model.teacher.init_from; keep it out of checkpoints.
        self.register_state_dict_post_hook(_drop_teacher_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_teacher_keys)

    @torch.no_grad()
    def teacher_outputs(self, inp: "_VideoInput") -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """The frozen teacher on the full clip, frame by frame: token scores [B, N], middle-layer
        targets [B, N, Dt] per student token, and the fp32 pooled vectors per frame."""
        m, B, Tg = self.cfg.model, inp.B, self.grid[0]
        tub = m.encoder.tubelet
        tout = self.teacher(inp.pixels01(self.teacher.patch_weight.dtype))
        scores, middle, pooled = tout.scores, tout.middle, tout.pooled.float()
        if tub > 1:   # one student token spans `tub` frames: average the teacher over them
            n = scores.shape[1] // m.num_frames
            scores = scores.reshape(B, Tg, tub, n).mean(2).reshape(B, Tg * n)
            middle = [h.reshape(B, Tg, tub, n, -1).mean(2).reshape(B, Tg * n, -1) for h in middle]
        return scores, middle, pooled

    def _mask(self, scores, step_seed, device):
        mc = self.cfg.masking
        B = scores.shape[0]
        Tg, Hg, Wg = self.grid
        if mc.kind == "semantic":
            from ivfast.masking import semantic_mask
            gen = torch.Generator(device=device)
            gen.manual_seed(purpose_seed(step_seed, "semantic"))
            # per frame (released): every frame keeps the same share; else one ranking over the clip
            return semantic_mask(scores, mc.ratio, mode=mc.semantic_mode, random_fraction=mc.random_fraction,
                                 generator=gen, frames=Tg if mc.semantic_per_frame else None)
        if mc.kind == "tube":
            from ivfast.masking import tube_mask
            return self._ids_to_device([tube_mask(B, Tg, Hg, Wg, mc.ratio, purpose_seed(step_seed, "tube"))], device)[0]
        raise ValueError(f"stage 1 masks with masking.kind 'semantic' or 'tube', got {mc.kind!r}")

    def _decode(self, target: torch.Tensor, z: torch.Tensor, step_seed: int) -> dict:
        """Diffusion loss in ``model.decoder.dtype``, with its own timestep/noise stream."""
        mode = self.cfg.model.decoder.dtype
        net = getattr(self.decoder, "net", None)
        if net is not None and "fp32" in getattr(net, "DTYPES", ()):
            net.dtype = mode                     # the module's own precision switch, where it has one
        torch.manual_seed(purpose_seed(step_seed, "diffusion"))   # not drop path's uniforms
        with decoder_autocast(mode, target.device):    # also covers the loss maths around the MLP
            if mode == "fp32":
                target, z = target.float(), z.float()
            return self.decoder(target, z)

    def forward(self, video: torch.Tensor, step_seed: int) -> dict:
        m = self.cfg.model
        inp = _VideoInput(video, m.num_frames, m.img_size)
        dev = video.device
        C, tub, p = self.num_cls, m.encoder.tubelet, m.encoder.patch_size

        # 1. frozen teacher on the full clip, frame by frame
        scores, middle, pooled = self.teacher_outputs(inp)

        # 2. semantic-aware mask
        ids_keep, ids_mask = self._mask(scores, step_seed, dev)

        # 3. encoder on the visible patches only
        vis = inp.patches(ids_keep, p, tub, self.impl)
        x, feats = self.encoder(vis, ids_keep, return_layers=self.student_layers)

        # 4-5. predictor over all positions, diffusion loss on the masked patches
        z = self.predictor(x, ids_keep, ids_mask)
        z_m = ops.gather_tokens(z, ids_mask, impl=self.impl)
        target = inp.patches(ids_mask, p, tub, self.impl, norm_pix=m.decoder.norm_pix)
        diff = self._decode(target.reshape(-1, target.shape[-1]), z_m.reshape(-1, z_m.shape[-1]), step_seed)

        # 6. alignment: middle layers at the visible tokens, and the pooled clip vector
        pos_vis = F.embedding(ids_keep.long(), self.align_pos[C:])
        mid = 0.0
        for feat, head, t in zip(feats, self.middle_heads, middle):
            s = head(feat[:, C:] + pos_vis)
            mid = mid + cosine_distance(s, ops.gather_tokens(t, ids_keep, impl=self.impl))
        mid = mid / max(len(feats), 1)
        final = final_alignment_loss(self.final_head(self.pool(x)), pooled, renorm=m.final_target_renorm)

        loss = (m.diffusion_loss_weight * diff["loss"] + m.middle_loss_weight * mid
                + m.final_loss_weight * final)
        return dict(loss=loss, loss_diffusion=diff["loss"].detach(), diffusion_mse=diff["mse"].detach(),
                    diffusion_vlb=diff["vlb"].detach(), loss_middle=torch.as_tensor(mid).detach(),
                    loss_final=final.detach(), visible=ids_keep.shape[1], masked=ids_mask.shape[1])


def _drop_teacher_keys(module, state_dict, prefix, local_metadata):
    for k in [k for k in state_dict if k.startswith(prefix + "teacher.")]:
        del state_dict[k]


def _ignore_missing_teacher_keys(module, incompatible):
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if ".teacher." not in f".{k}"]


# =========================================================================== stage 2
_POS_MODULES = ("encoder", "predictor")     # the stage-2 student's position tables
_SMALL = "stage2_pos_tables."               # checkpoint keys of the small learnable tables


class _TimeResample(nn.Module):
    """Parametrization: a learnable ``grid_from`` table seen as a ``grid_to`` table, interpolated
    (linear in t) on every access, so gradients reach the small table (released stage 2)."""

    def __init__(self, num_cls: int, grid_from: tuple, grid_to: tuple):
        super().__init__()
        self.num_cls, self.grid_from, self.grid_to = num_cls, tuple(grid_from), tuple(grid_to)

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        return interpolate_pos_table(table, self.num_cls, self.grid_from, self.grid_to)

    def right_inverse(self, table: torch.Tensor) -> torch.Tensor:
        """A full-size table -> the small one (resampled down: approximate, used at construction
        and for checkpoints that only hold full-size tables)."""
        if table.shape[0] == self.num_cls + math.prod(self.grid_from):
            return table
        return interpolate_pos_table(table, self.num_cls, self.grid_to, self.grid_from)


class _SmallTable:
    """What ``stage2_pos_tables.<module>.pos_embed`` resolves to by attribute access: the small
    learnable table. Distributed checkpointing (``get_model_state_dict``) walks every state-dict
    key by getattr, so the checkpoint key must resolve; it is not a registered module (that
    would put a second copy of the table in the state dict)."""

    def __init__(self, owner: nn.Module, name: str):
        self._owner, self._name = owner, name

    @property
    def pos_embed(self) -> torch.Tensor:
        return getattr(self._owner, self._name).parametrizations.pos_embed.original


class _SmallTables:
    def __init__(self, owner: nn.Module):
        for name in _POS_MODULES:
            setattr(self, name, _SmallTable(owner, name))


def _pos_to_checkpoint(module, state_dict, prefix, local_metadata):
    """Checkpoints hold the small tables under ``stage2_pos_tables.*`` and, as ``<module>.pos_embed``,
    the full-size tables they give (what evaluation and ``stage2_pos=once`` models read)."""
    for name in _POS_MODULES:
        k = f"{prefix}{name}.parametrizations.pos_embed.original"
        if k in state_dict:
            state_dict[f"{prefix}{_SMALL}{name}.pos_embed"] = state_dict.pop(k)
            state_dict[f"{prefix}{name}.pos_embed"] = getattr(module, name).pos_embed.detach()


def _pos_from_checkpoint(module, state_dict, prefix, *args):
    for name in _POS_MODULES:
        small, full = f"{prefix}{_SMALL}{name}.pos_embed", f"{prefix}{name}.pos_embed"
        sub = getattr(module, name)
        if not parametrize.is_parametrized(sub, "pos_embed"):
            state_dict.pop(small, None)            # stage2_pos=once: the full-size table is the one
            continue
        dst = f"{prefix}{name}.parametrizations.pos_embed.original"
        if small in state_dict:
            state_dict[dst] = state_dict.pop(small)
            state_dict.pop(full, None)             # derived from the small one
        elif full in state_dict:                   # a stage2_pos=once checkpoint: resample it down
            state_dict[dst] = sub.parametrizations.pos_embed[0].right_inverse(state_dict.pop(full))


def _canonical(key: str) -> str:
    return key.replace(".parametrizations.pos_embed.original", ".pos_embed")


class Stage2Model(_Base):
    def __init__(self, cfg, teacher_dtype=torch.float32):
        super().__init__(cfg)
        m, enc = cfg.model, cfg.model.encoder
        self.head = MLPHead(m.predictor.dim, enc.dim)   # released selfdist_decoder: MLP_Decoder(1024 -> d)
        _init_head(self.head)
        small_t = min(m.stage2_pos_frames, m.num_frames) // enc.tubelet
        if m.stage2_pos == "reinterpolate" and enc.learnable_pos and small_t != self.grid[0]:
            for name in _POS_MODULES:
                parametrize.register_parametrization(
                    getattr(self, name), "pos_embed",
                    _TimeResample(self.num_cls, (small_t, *self.grid[1:]), self.grid), unsafe=True)
            object.__setattr__(self, "stage2_pos_tables", _SmallTables(self))   # see _SmallTable
        self.register_state_dict_post_hook(_pos_to_checkpoint)
        self._register_load_state_dict_pre_hook(_pos_from_checkpoint, with_module=True)
        self.teacher = VisionTransformer(enc, m.num_frames, m.img_size, m.attn_backend)
        self.sync_teacher()
        self.teacher.to(teacher_dtype)

    @torch.no_grad()
    def sync_teacher(self):
        """Teacher := a frozen copy of the student encoder (called after loading stage-1 weights)."""
        sd = self.encoder.state_dict()
        if parametrize.is_parametrized(self.encoder, "pos_embed"):   # the teacher gets the full-size table
            del sd["parametrizations.pos_embed.original"]
            sd["pos_embed"] = self.encoder.pos_embed.detach()
        self.teacher.load_state_dict(sd)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        for blk in self.teacher.modules():         # frozen: it may take the fused inference paths
            if hasattr(blk, "fused_residual"):
                blk.fused_residual = True
            if hasattr(blk, "gelu_epilogue"):
                blk.gelu_epilogue = True

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()        # frozen teacher: no drop path, ever
        return self

    def _distance(self, pred, tgt):
        kind = self.cfg.model.stage2_loss
        if kind == "cosine":
            return cosine_distance(pred, tgt)
        tgt = F.layer_norm(tgt.float(), (tgt.shape[-1],))
        if kind == "l1":
            return (pred.float() - tgt).abs().mean()
        return (pred.float() - tgt).square().mean()

    @torch.no_grad()
    def _teacher_tokens(self, patches: torch.Tensor) -> torch.Tensor:
        """The frozen teacher over all tokens: ``[B, num_cls + N, d]`` in its weights' dtype.

        Under autocast whose dtype is the teacher's weight dtype (CUDA training: bf16 weights,
        ``model.teacher.dtype=auto``), autocast is switched off: the weights' dtype is the compute
        dtype already, so autocast only adds a cast check per op; off, the teacher's MLP can take
        its GELU in the GEMM epilogue (vit.Mlp) and RMSNorm/attention keep bf16. With other
        weights (``teacher.dtype=fp32`` under bf16 autocast) it runs as before, inside autocast."""
        dev = patches.device.type
        wdt = self.teacher.patch_embed.weight.dtype
        if (dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev)
                and torch.get_autocast_dtype(dev) == wdt):
            with torch.autocast(dev, enabled=False):
                return self.teacher(patches, None)[0]
        return self.teacher(patches, None)[0]

    def pack_sets(self, device: torch.device) -> bool:
        """``model.stage2_pack_sets``: both mask sets in one encoder pass (auto: where it pays)."""
        from .attention import packing_pays
        pays = packing_pays(device)     # also finds flash-attn varlen before a compiled encoder runs
        choice = self.cfg.model.stage2_pack_sets
        return pays if choice == "auto" else bool(choice)

    def forward(self, video: torch.Tensor, step_seed: int) -> dict:
        m, mc = self.cfg.model, self.cfg.masking
        inp = _VideoInput(video, m.num_frames, m.img_size)
        B, dev = inp.B, video.device
        C, tub, p = self.num_cls, m.encoder.tubelet, m.encoder.patch_size
        N = self.encoder.num_tokens
        if mc.kind != "multiblock":
            raise ValueError(f"stage 2 uses masking.kind 'multiblock', got {mc.kind!r}")
        from ivfast.masking import multiblock_masks
        # per set: visible ids, ids filled with mask tokens (all the rest), ids the loss is on
        # (masking.predict: "unseen" = all the rest, as released; "blocks" = block-masked ids, V-JEPA)
        sets = self._ids_to_device(multiblock_masks(mc, B, *self.grid, seed=purpose_seed(step_seed, "multiblock"),
                                                    with_pred=True), dev)
        if mc.predict == "unseen":
            sets = [(keep, mask, mask) for keep, mask, _ in sets]

        with torch.no_grad():
            all_ids = torch.arange(N, device=dev, dtype=torch.int32).expand(B, N)
            targets = self._teacher_tokens(inp.patches(all_ids, p, tub, self.impl))[:, C:]

        visible = [inp.patches(keep, p, tub, self.impl) for keep, _, _ in sets]
        if self.pack_sets(video.device):   # one encoder pass over both sets (varlen attention)
            xs = [x for x, _ in self.encoder(visible, [keep for keep, _, _ in sets])]
        else:
            xs = [self.encoder(vis, keep)[0] for vis, (keep, _, _) in zip(visible, sets)]
        seqs = [self.predictor.assemble(x, keep, mask) for x, (keep, mask, _) in zip(xs, sets)]
        # every mask set covers all N positions: one predictor pass over the stacked sets
        z = self.predictor.run(torch.cat(seqs, 0))
        out = dict(visible=[k.shape[1] for k, _, _ in sets], masked=[mk.shape[1] for _, mk, _ in sets],
                   predicted=[pr.shape[1] for _, _, pr in sets])
        total = 0.0
        for i, (_, _, predict) in enumerate(sets):
            z_m = ops.gather_tokens(z[i * B:(i + 1) * B], predict, impl=self.impl)
            pred = self.head(z_m)
            tgt = ops.gather_tokens(targets, predict, impl=self.impl)
            li = self._distance(pred, tgt)
            out[f"loss_set{i}"] = li.detach()
            total = total + li
        out["loss"] = total
        return out


# =========================================================================== building, loading
def _teacher_dtype(cfg) -> torch.dtype:
    choice = cfg.model.teacher.dtype
    if choice == "fp32":
        return torch.float32
    if choice == "bf16":
        return torch.bfloat16
    on_gpu = cfg.runtime.device != "cpu" and torch.cuda.is_available()
    return torch.bfloat16 if on_gpu and cfg.runtime.dtype != "fp32" else torch.float32


def build_model(cfg) -> Stage1Model | Stage2Model:
    """The model of ``cfg.stage``; stage 2 is initialised from the stage-1 checkpoint ``model.init_from``."""
    tdtype = _teacher_dtype(cfg)
    if cfg.stage == 1:
        model = Stage1Model(cfg, teacher_dtype=tdtype)
        if cfg.model.teacher.compile:
            model.teacher.compile()
        return model
    if cfg.stage != 2:
        raise ValueError(f"stage must be 1 or 2, got {cfg.stage!r}")
    if not cfg.model.init_from:
        raise ValueError("stage 2 needs model.init_from: the stage-1 checkpoint (a directory holding "
                         "model.safetensors, or that file) to initialise the student, teacher and predictor")
    model = Stage2Model(cfg, teacher_dtype=tdtype)
    if cfg.model.init_from != "random":   # "random": the architecture only (the rehearsal, FLOP checks)
        load_stage1_weights(model, cfg.model.init_from)
    if cfg.model.teacher.compile:
        model.teacher.compile()
    return model


def _checkpoint_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        f = p / "model.safetensors"
        if not f.exists():
            raise FileNotFoundError(f"{p}: no model.safetensors in this stage-1 checkpoint directory")
        return f
    if not p.exists():
        raise FileNotFoundError(f"stage-1 checkpoint {p} does not exist")
    return p


def _strip(key: str) -> str:
    for pre in ("module.", "_orig_mod."):   # DDP / torch.compile wrappers
        while key.startswith(pre):
            key = key[len(pre):]
    return key.replace("._orig_mod.", ".")


def load_stage1_weights(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a stage-1 checkpoint (``model.safetensors`` with the Stage1Model state dict).

    Into a ``Stage2Model``: encoder -> student AND frozen teacher, predictor -> predictor. With
    ``model.stage2_pos=reinterpolate`` (released) the student's learnable tables keep
    ``stage2_pos_frames`` frames and are interpolated on every forward; with ``once`` they are
    interpolated here (16 -> 32, linear in time) and trained at full size. Into a
    ``Stage1Model``: everything but the frozen SigLIP teacher. Any missing key or shape mismatch
    raises, naming the keys. Returns the checkpoint keys that were not used.
    """
    from safetensors.torch import load_file
    f = _checkpoint_file(path)
    sd = {_strip(k): v for k, v in load_file(str(f)).items()}
    if isinstance(model, Stage2Model):
        wanted = {k: v for k, v in model.state_dict().items()
                  if k.startswith(("encoder.", "predictor.", _SMALL))}
        for k in [k for k in wanted if k.startswith(_SMALL)]:
            wanted.pop(k[len(_SMALL):], None)      # stage2_pos=reinterpolate: load the small table only
    elif isinstance(model, Stage1Model):
        wanted = dict(model.state_dict())          # teacher keys are already left out
    else:
        raise TypeError(f"load_stage1_weights expects a Stage1Model or Stage2Model, got {type(model).__name__}")
    grid_to = model.grid
    new, missing, mismatched, used = {}, [], [], set()
    for k, ref in wanted.items():
        src = _canonical(k.removeprefix(_SMALL))
        if src not in sd:
            missing.append(src)
            continue
        t = sd[src]
        if t.shape != ref.shape and k.endswith("pos_embed") and t.dim() == 2 and t.shape[1] == ref.shape[1]:
            n_old, n_new = t.shape[0] - model.num_cls, ref.shape[0] - model.num_cls
            hw = grid_to[1] * grid_to[2]
            if n_old % hw == 0 and n_new % hw == 0:
                t = interpolate_pos_table(t, model.num_cls, (n_old // hw, *grid_to[1:]), (n_new // hw, *grid_to[1:]))
                log.info("%s: position table interpolated from %d to %d frames", k, n_old // hw, n_new // hw)
        if t.shape != ref.shape:
            mismatched.append(f"{k}: checkpoint {tuple(t.shape)} vs model {tuple(ref.shape)}")
            continue
        new[k] = t.to(ref.dtype)
        used.add(src)
    if missing or mismatched:
        raise ValueError(f"stage-1 checkpoint {f} does not fit this model: "
                         + (f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}; " if missing else "")
                         + (f"shape mismatches {mismatched[:20]}" if mismatched else "")
                         + " (was it written with the same model.encoder / model.predictor config?)")
    result = model.load_state_dict(new, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    if isinstance(model, Stage2Model):
        model.sync_teacher()
    unused = sorted(set(sd) - used)
    return unused


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (``.module``) / ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = next((m for m in (getattr(model, "module", None), getattr(model, "_orig_mod", None))
                      if isinstance(m, nn.Module)), None)
        if inner is None:
            return model
        model = inner


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups ``[decay, no_decay]``, each ``dict(params, weight_decay, names)``.

    No decay: the full names in ``NO_DECAY_NAMES`` (encoder position table, cls tokens, alignment
    position table) and every parameter with fewer than 2 dims (norms, biases, LayerScale). The
    predictor's position table and mask token follow ``model.decay_predictor_tokens`` (decayed by
    default, as released). Names are matched after stripping DDP / compile prefixes. Frozen
    parameters (the teachers) are left out; fixed position tables (buffers) are not parameters.
    """
    cfg = getattr(_unwrap(model), "cfg", None)
    decay_pred = cfg.model.decay_predictor_tokens if cfg is not None else True
    decay, no_decay, dn, nn_ = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = _canonical(_strip(name))
        if key in PREDICTOR_TOKEN_NAMES:
            use_decay = decay_pred
        else:
            use_decay = p.ndim >= 2 and key not in NO_DECAY_NAMES
        if use_decay:
            decay.append(p)
            dn.append(name)
        else:
            no_decay.append(p)
            nn_.append(name)
    return [dict(params=decay, weight_decay=weight_decay, names=dn),
            dict(params=no_decay, weight_decay=0.0, names=nn_)]
