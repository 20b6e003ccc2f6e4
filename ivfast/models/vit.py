"""Student video ViT (the "E" of EPD), following the authors' released encoder.

* Patch embedding: each tubelet x patch x patch x 3 patch (588 values at 1x14x14) is RMS-normalised
  (learnable weight, eps 1e-6), projected by one GEMM (``nn.Linear`` with bias, the same maths as
  the released Conv3d: its weight flattens in the (c, t, ph, pw) order of ``patchify``), then
  RMS-normalised over the width.
* ``num_cls`` (4) learnable cls tokens are prepended; a LEARNABLE position table of
  ``num_cls + T*H*W`` rows initialised with 3-D sine-cosine (first d/4 channels temporal, the rest
  spatial: w then h; cls rows zero) is added to every token (``learnable_pos=False``: a fixed
  buffer, still in the state dict).
* Pre-norm blocks: RMSNorm, fused qkv without bias, QK-norm = RMSNorm over the whole width of q and
  of k (not per head), attention through ``ivfast.models.attention``, proj with bias, LayerScale,
  stochastic depth; MLP with tanh-GELU and biases. No final norm. Optional activation
  checkpointing per block.

The encoder sees only the visible tokens: it takes the pixels of the visible patches
(``ivfast.ops.patch_targets`` gathers and normalises them in one pass) and their token ids.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import Segments, attention, packed_attention

# Devices where the frozen stage-2 teacher's fused paths run (GELU in cuBLASLt's GEMM epilogue,
# LayerScale + residual in one addcmul). CUDA only: CPU's _addmm_activation uses the erf GELU,
# not the tanh form, and the CPU fp32 path stays bit-identical to the unfused one. Tests patch it.
FUSED_FROZEN_DEVICES = ("cuda",)


# --------------------------------------------------------------------------- positions
def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """MAE 1-D sine-cosine: [len(pos), dim], first half sin, second half cos."""
    if dim % 2:
        raise ValueError(f"sine-cosine embedding width must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_3d(dim: int, T: int, H: int, W: int, num_cls: int = 0) -> torch.Tensor:
    """[num_cls + T*H*W, dim] table: first dim/4 channels encode t, the rest w then h; cls rows 0.

    The spatial order is that of MAE's ``get_2d_sincos_pos_embed_from_grid`` (used by the released
    code): its grid comes from ``meshgrid(grid_w, grid_h)``, so the first half encodes w, the second h.
    """
    if dim % 16:
        raise ValueError(f"3-D sine-cosine positions need a width divisible by 16, got {dim}")
    dt, ds = dim // 4, dim * 3 // 4
    t = sincos_1d(dt, torch.arange(T))                       # [T, dt]
    h = sincos_1d(ds // 2, torch.arange(H))                  # [H, ds/2]
    w = sincos_1d(ds // 2, torch.arange(W))
    spatial = torch.cat([w[None].expand(H, W, -1), h[:, None].expand(H, W, -1)], -1).reshape(H * W, ds)
    table = torch.cat([t[:, None].expand(T, H * W, dt), spatial[None].expand(T, H * W, ds)], -1)
    table = table.reshape(T * H * W, dim)
    return torch.cat([torch.zeros(num_cls, dim), table], 0)


def set_pos_table(module: nn.Module, name: str, table: torch.Tensor, learnable: bool) -> None:
    """Attach a position table: a learnable parameter, or a fixed buffer that is still in the
    state dict (same key either way, so checkpoints load into both kinds of model)."""
    if learnable:
        setattr(module, name, nn.Parameter(table))
    else:
        module.register_buffer(name, table, persistent=True)


def interpolate_pos_table(table: torch.Tensor, num_cls: int, grid_from: tuple, grid_to: tuple) -> torch.Tensor:
    """Resize a ``[num_cls + T*H*W, d]`` table to another (T, H, W) grid: linear in time, bicubic in space."""
    if tuple(grid_from) == tuple(grid_to):
        return table
    T0, H0, W0 = grid_from
    T1, H1, W1 = grid_to
    d = table.shape[-1]
    if table.shape[0] != num_cls + T0 * H0 * W0:
        raise ValueError(f"position table has {table.shape[0]} rows, expected {num_cls} + {T0}*{H0}*{W0}")
    cls, grid = table[:num_cls], table[num_cls:].float().reshape(T0, H0, W0, d)
    if T0 != T1:
        g = grid.permute(1, 2, 3, 0).reshape(H0 * W0, d, T0)
        g = F.interpolate(g, size=T1, mode="linear", align_corners=False)
        grid = g.reshape(H0, W0, d, T1).permute(3, 0, 1, 2)
    if (H0, W0) != (H1, W1):
        g = grid.permute(0, 3, 1, 2)
        g = F.interpolate(g, size=(H1, W1), mode="bicubic", align_corners=False)
        grid = g.permute(0, 2, 3, 1)
    return torch.cat([cls, grid.reshape(T1 * H1 * W1, d).to(table.dtype)], 0)


# --------------------------------------------------------------------------- patches
def patchify(video: torch.Tensor, patch: int, tubelet: int = 1) -> torch.Tensor:
    """[B, 3, T, H, W] -> [B, N, 3*tubelet*patch*patch], token raster (t, h, w), values (c, t, ph, pw)."""
    B, C, T, H, W = video.shape
    x = video.reshape(B, C, T // tubelet, tubelet, H // patch, patch, W // patch, patch)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(B, (T // tubelet) * (H // patch) * (W // patch), C * tubelet * patch * patch)


# --------------------------------------------------------------------------- layers
class RMSNorm(nn.RMSNorm):
    """RMSNorm whose output keeps the input's dtype whatever autocast's policy is: the weight is cast
    to it, so the fused kernel runs (fp32 accumulation inside) instead of a mixed-dtype composite.
    Why the autocast guard: torch >= 2.12 puts ``rms_norm`` on CUDA autocast's fp32 list, which
    would turn the QK-norm's q/k into fp32 next to a bf16 v (and double the norm's traffic)."""

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        dev = x.device.type
        if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                y = F.rms_norm(x, self.normalized_shape, w, self.eps)
        else:
            y = F.rms_norm(x, self.normalized_shape, w, self.eps)
        return y if y.dtype == x.dtype else y.to(x.dtype)   # a policy that still promotes: cast back


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x):
        return x * self.gamma


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch for a random subset of samples, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x * mask / keep


def drop_path_packed(x: torch.Tensor, p: float, training: bool, segments: Segments) -> torch.Tensor:
    """Stochastic depth on packed sequences ``[1, L, d]``: one draw per sequence, as unpacked."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = torch.empty(segments.num_seqs, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x * mask[segments.seq_ids()].view(1, -1, 1) / keep


class Attention(nn.Module):
    """Self-attention with fused qkv (no bias), QK-norm over the full width, proj with bias."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = True, backend: str = "auto"):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, segments: Segments | None = None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        shape = (B, N, self.heads, C // self.heads)
        if segments is None:
            o = attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), backend=self.backend)
        else:   # packed sequences [1, L, C]: attention stays inside each one
            o = packed_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), segments, backend=self.backend)
        return self.proj(o.reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.gelu_epilogue = False      # the frozen stage-2 teacher sets it (Stage2Model.sync_teacher)

    def forward(self, x):
        if (self.gelu_epilogue and x.device.type in FUSED_FROZEN_DEVICES and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled(x.device.type) and x.dtype == self.fc1.weight.dtype):
            # bias + tanh-GELU in cuBLASLt's epilogue: no separate pass over [tokens, hidden]
            h = torch._addmm_activation(self.fc1.bias, x.reshape(-1, x.shape[-1]), self.fc1.weight.t(), use_gelu=True)
            return self.fc2(h.view(*x.shape[:-1], -1))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool, ls_init: float,
                 drop_path: float, backend: str = "auto"):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm, backend)
        self.ls1 = LayerScale(dim, ls_init) if ls_init > 0 else nn.Identity()
        self.norm2 = RMSNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, ls_init) if ls_init > 0 else nn.Identity()
        self.drop_path = drop_path
        self.fused_residual = False     # the frozen stage-2 teacher sets it (Stage2Model.sync_teacher)

    def _add(self, x, branch, ls, segments):
        if (self.fused_residual and isinstance(ls, LayerScale) and not self.training
                and x.device.type in FUSED_FROZEN_DEVICES):
            return torch.addcmul(x, branch, ls.gamma)      # x + gamma * branch in one pass
        if segments is None:
            return x + drop_path(ls(branch), self.drop_path, self.training)
        return x + drop_path_packed(ls(branch), self.drop_path, self.training, segments)

    def forward(self, x, segments: Segments | None = None):
        x = self._add(x, self.attn(self.norm1(x), segments), self.ls1, segments)
        return self._add(x, self.mlp(self.norm2(x)), self.ls2, segments)


class VisionTransformer(nn.Module):
    """Video ViT over visible tokens. ``forward(patches [B, K, P], ids [B, K] | None)``.

    Returns ``(x, feats)``: ``x`` [B, num_cls + K, d] (cls first, no final norm) and the outputs of
    the blocks listed in ``return_layers`` (same shape each), in that order.
    """

    def __init__(self, cfg, num_frames: int, img_size: int, attn_backend: str = "auto"):
        super().__init__()
        p, tub = cfg.patch_size, cfg.tubelet
        if img_size % p or num_frames % tub:
            raise ValueError(f"img_size={img_size} and num_frames={num_frames} must be multiples of "
                             f"patch_size={p} and tubelet={tub}")
        self.cfg = cfg
        self.grid = (num_frames // tub, img_size // p, img_size // p)
        self.num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.patch_dim = 3 * tub * p * p
        self.num_cls, self.dim = cfg.num_cls, cfg.dim
        d = cfg.dim
        self.patch_norm = RMSNorm(self.patch_dim, eps=1e-6)
        self.patch_embed = nn.Linear(self.patch_dim, d)
        self.embed_norm = RMSNorm(d, eps=1e-6)
        self.cls_token = nn.Parameter(torch.zeros(1, cfg.num_cls, d))
        set_pos_table(self, "pos_embed", sincos_3d(d, *self.grid, num_cls=cfg.num_cls), cfg.learnable_pos)
        # rising linearly with depth; host arithmetic, not a tensor read, so that the model also
        # builds on fake tensors (the GPU-free rehearsal); equal to torch.linspace to fp32 rounding
        rates = [cfg.drop_path * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            Block(d, cfg.heads, cfg.mlp_ratio, cfg.qk_norm, cfg.layerscale_init, rates[i], attn_backend)
            for i in range(cfg.depth))
        self.act_checkpoint = cfg.act_checkpoint
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for i, blk in enumerate(self.blocks):   # output projections scaled by 1/sqrt(2 * layer)
            blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    def embed(self, patches: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """Patch pixels [B, K, P] at token ids [B, K] (None = all N in order) -> tokens with cls + positions."""
        B, K, P = patches.shape
        if P != self.patch_dim:
            raise ValueError(f"patches have {P} values each, the encoder expects {self.patch_dim} "
                             f"(3 x tubelet x patch x patch)")
        x = self.embed_norm(self.patch_embed(self.patch_norm(patches.to(self.patch_embed.weight.dtype))))
        if ids is None:
            if K != self.num_tokens:
                raise ValueError(f"without ids the encoder needs all {self.num_tokens} tokens, got {K}")
            pos = self.pos_embed[self.num_cls:].unsqueeze(0)
        else:
            if ids.shape != (B, K):
                raise ValueError(f"ids must be [B, K] = {(B, K)} matching the patches, got {tuple(ids.shape)}")
            pos = F.embedding(ids.long(), self.pos_embed[self.num_cls:])
        cls = (self.cls_token + self.pos_embed[: self.num_cls]).expand(B, -1, -1)
        return torch.cat([cls, x + pos], dim=1)

    def forward(self, patches, ids=None, return_layers: Sequence[int] = ()):
        """One clip batch, or (``patches`` and ``ids`` lists, one entry per mask set) several
        packed into one pass: then a list of ``(x, feats)`` per set, equal to separate calls
        (but for the drop-path draws)."""
        if isinstance(patches, (list, tuple)):
            return self._forward_packed(patches, ids, return_layers)
        x, feats = self._blocks(self.embed(patches, ids), None, return_layers)
        return x, feats

    def _blocks(self, x, segments, return_layers):
        feats = {}
        want = set(return_layers)
        for i, blk in enumerate(self.blocks):
            if self.act_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, segments, use_reentrant=False)
            else:
                x = blk(x, segments)
            if i in want:
                feats[i] = x
        return x, [feats[i] for i in return_layers]

    def _forward_packed(self, patches, ids, return_layers):
        if ids is None or len(ids) != len(patches):
            raise ValueError("a packed encoder call needs one ids tensor per patches tensor")
        xs = [self.embed(p, i) for p, i in zip(patches, ids)]            # [B_s, num_cls + K_s, d] each
        segments = Segments([(t.shape[0], t.shape[1]) for t in xs], xs[0].device)
        x = torch.cat([t.reshape(1, -1, t.shape[-1]) for t in xs], 1)    # [1, sum B_s (num_cls + K_s), d]
        x, feats = self._blocks(x, segments, return_layers)

        def unpack(t):
            return [part.view(ref.shape) for part, ref in zip(t.split(segments.sizes(), 1), xs)]
        per_set_feats = list(zip(*[unpack(f) for f in feats])) if feats else [[] for _ in xs]
        return [(xo, list(fo)) for xo, fo in zip(unpack(x), per_set_feats)]


class AttentionPool(nn.Module):
    """Attention pooling head: query = mean of all tokens; LayerNorm on the q, k and v inputs;
    one cross-attention with ``heads`` heads; output projection to ``out_dim``."""

    def __init__(self, dim: int, heads: int, out_dim: int, backend: str = "auto"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention-pool width {dim} must divide by its heads {heads}")
        self.heads, self.backend = heads, backend
        self.norm_q, self.norm_k, self.norm_v = (nn.LayerNorm(dim, eps=1e-5) for _ in range(3))
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, x):
        B, N, C = x.shape
        hd = C // self.heads
        q = self.q(self.norm_q(x.mean(1, keepdim=True))).reshape(B, 1, self.heads, hd)
        k = self.k(self.norm_k(x)).reshape(B, N, self.heads, hd)
        v = self.v(self.norm_v(x)).reshape(B, N, self.heads, hd)
        return self.proj(attention(q, k, v, backend=self.backend).reshape(B, C))


class MLPHead(nn.Module):
    """Linear(in, in) -> GELU -> Linear(in, out) -> LayerNorm (the released alignment/projection head)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, dim_in)
        self.fc2 = nn.Linear(dim_in, dim_out)
        self.norm = nn.LayerNorm(dim_out, eps=1e-5)
        # the release's heads init xavier here, but its parent model's init runs afterwards and
        # leaves them trunc-normal 0.02: epd.py re-initialises every use (see _init_head)
        for m in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.norm(self.fc2(F.gelu(self.fc1(x))))
