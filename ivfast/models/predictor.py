"""ModernBERT-compatible predictor (the "P" of EPD).

Layers follow ModernBERT exactly (``transformers``' ``ModernBertEncoderLayer``): pre-LayerNorm
without bias (the model's very first layer has no attention norm), fused ``Wqkv`` without bias,
rotary embeddings (rotate-half form), ``Wo``; GeGLU MLP ``Wi: d -> 2*hidden`` (input, gate),
``GELU(input) * gate``, ``Wo: hidden -> d``, no biases. Global and local (sliding window
``|i - j| <= local_window // 2``) layers alternate as in ModernBERT: original layer ``i`` is global
when ``i % global_every == 0``; global layers use RoPE theta 160000, local ones 10000.

``init_from`` loads the LAST ``layers`` layers of a ModernBERT checkpoint (a local directory or a
hub id) by mapping its safetensors state dict; config and keys are checked, and a mismatch fails
with the name of the field or key. ModernBERT's token embeddings and final norm are not used.

Token positions -> rotary positions (``rope_positions="flat"``, the released code's choice):
the sequence is ``[cls_0..cls_{C-1}, token (t, h, w) in T, H, W raster order]`` and token number
``n`` of that sequence gets rotary position ``n``. A local layer's +-64 window therefore spans
about a quarter of a 16x16 frame's rows around a token, and global layers see everything.

Input (released code): every grid position starts as the learned mask token, visible positions
take the encoder's outputs, the predictor's position table (learnable, 3-D sine-cosine init;
a fixed buffer with ``learnable_pos=False``) is added, the encoder's cls outputs are prepended
(with their position rows), then ``Linear(d, d) -> GELU -> Linear(d, dim) -> LayerNorm`` maps
to the ModernBERT width.
The output is the last layer's hidden state (no final norm), cls rows dropped.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .vit import MLPHead, set_pos_table, sincos_3d


# --------------------------------------------------------------------------- rotary
def rope_cos_sin(n: int, head_dim: int, theta: float, device, offset: int = 0):
    """cos, sin [n, head_dim] (fp32) for positions offset..offset+n-1, ModernBERT/HF layout cat(f, f)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    pos = torch.arange(offset, offset + n, dtype=torch.float32, device=device)
    f = pos[:, None] * inv[None]
    emb = torch.cat([f, f], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, N, H, D]; rotate-half RoPE computed in fp32, result in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return (xf * c + rot * s).to(x.dtype)


# --------------------------------------------------------------------------- activation checkpointing
# Ops whose outputs selective checkpointing keeps: the GEMMs and attention kernels (expensive to
# redo). Everything else in a layer (LayerNorm, the fp32 RoPE chain, GELU * gate, casts, residual
# adds) is recomputed in backward: about half a layer's saved bytes for ~3 % more step time
# (predicted).
def _saved_ops() -> set:
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_flash_attention_forward", "_efficient_attention_forward")
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


def _selective_context():
    # the list form (not a policy function) is what torch.compile can trace through
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(sorted(_saved_ops(), key=str))


CHECKPOINT_MODES = ("none", "full", "selective")


# --------------------------------------------------------------------------- layers
class _Attn(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.Wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.Wo = nn.Linear(dim, dim, bias=False)


class _GeGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.Wi = nn.Linear(dim, 2 * hidden, bias=False)
        self.Wo = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        inp, gate = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(F.gelu(inp) * gate)


class ModernBertLayer(nn.Module):
    """One ModernBERT encoder layer; parameter names mirror ``transformers`` for state-dict mapping."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, eps: float, window: int | None,
                 rope_theta: float, no_attn_norm: bool = False, backend: str = "auto"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"predictor width {dim} must divide by heads {heads}")
        self.heads, self.window, self.rope_theta, self.backend = heads, window, rope_theta, backend
        self.attn_norm = nn.Identity() if no_attn_norm else nn.LayerNorm(dim, eps=eps, bias=False)
        self.attn = _Attn(dim)
        self.mlp_norm = nn.LayerNorm(dim, eps=eps, bias=False)
        self.mlp = _GeGLU(dim, mlp_hidden)
        self.act_checkpoint = "none"    # model.predictor.act_checkpoint, set by the Predictor

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        mode = self.act_checkpoint
        if mode == "none" or not (self.training and torch.is_grad_enabled()):
            return self._layer(x, cos, sin)
        from torch.utils.checkpoint import checkpoint

        # "full": only the layer input is saved, the whole layer is recomputed in backward;
        # "selective": GEMM / attention outputs saved, the element-wise work recomputed.
        if mode == "selective":
            return checkpoint(self._layer, x, cos, sin, use_reentrant=False, context_fn=_selective_context)
        return checkpoint(self._layer, x, cos, sin, use_reentrant=False)

    def _layer(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        hd = C // self.heads
        qkv = self.attn.Wqkv(self.attn_norm(x)).view(B, N, 3, self.heads, hd)
        q, k, v = qkv.unbind(2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attention(q, k, v, window=self.window, backend=self.backend)
        x = x + self.attn.Wo(o.reshape(B, N, C))
        return x + self.mlp(self.mlp_norm(x))


def layer_is_global(index: int, global_every: int) -> bool:
    return index % global_every == 0


class Predictor(nn.Module):
    """``forward(x_enc [B, C+K, d_enc], ids_keep [B, K], ids_mask [B, M]) -> [B, N, dim]``."""

    def __init__(self, cfg, enc_dim: int, num_cls: int, grid: tuple, attn_backend: str = "auto",
                 token_impl: str = "eager", learnable_pos: bool = True):
        super().__init__()
        self.cfg, self.num_cls, self.grid, self.token_impl = cfg, num_cls, tuple(grid), token_impl
        self.num_tokens = grid[0] * grid[1] * grid[2]
        self.mask_token = nn.Parameter(torch.zeros(enc_dim))
        set_pos_table(self, "pos_embed", sincos_3d(enc_dim, *grid, num_cls=num_cls), learnable_pos)
        self.in_proj = MLPHead(enc_dim, cfg.dim)
        self.head_dim = cfg.dim // cfg.heads
        layers = []
        for j in range(cfg.layers):
            i = cfg.first_layer_index + j
            glob = layer_is_global(i, cfg.global_every)
            layers.append(ModernBertLayer(
                cfg.dim, cfg.heads, cfg.mlp_hidden, cfg.norm_eps,
                window=None if glob else cfg.local_window // 2,
                rope_theta=cfg.global_rope_theta if glob else cfg.local_rope_theta,
                no_attn_norm=(i == 0), backend=attn_backend))
        self.layers = nn.ModuleList(layers)
        self.set_act_checkpoint(getattr(cfg, "act_checkpoint", "none"))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self._init_layers(cfg.first_layer_index + cfg.layers)
        if cfg.init_from:
            load_modernbert_layers(self, cfg.init_from)

    def set_act_checkpoint(self, mode: str) -> None:
        """Activation checkpointing of every layer: "none", "full" (per layer) or "selective"."""
        if mode not in CHECKPOINT_MODES:
            raise ValueError(f"model.predictor.act_checkpoint={mode!r}: choose one of {list(CHECKPOINT_MODES)}")
        for layer in self.layers:
            layer.act_checkpoint = mode

    @torch.no_grad()
    def _init_layers(self, total_layers: int):
        """ModernBERT's init: trunc-normal 0.02 (cut at 2 std); output projections / sqrt(2 L)."""
        std_in, std_out = 0.02, 0.02 / math.sqrt(2.0 * total_layers)
        for layer in self.layers:
            for lin, std in ((layer.attn.Wqkv, std_in), (layer.attn.Wo, std_out),
                             (layer.mlp.Wi, std_in), (layer.mlp.Wo, std_out)):
                nn.init.trunc_normal_(lin.weight, std=std, a=-2 * std, b=2 * std)

    def assemble(self, x_enc: torch.Tensor, ids_keep: torch.Tensor, ids_mask: torch.Tensor) -> torch.Tensor:
        """Encoder-width input sequence [B, C+N, d]: cls outputs, then the full grid (mask tokens filled)."""
        from ivfast.ops import assemble_sequence
        C = self.num_cls
        cls = x_enc[:, :C] + self.pos_embed[:C]
        grid = assemble_sequence(x_enc[:, C:], ids_keep, ids_mask, self.mask_token.to(x_enc.dtype),
                                 self.pos_embed[C:], impl=self.token_impl)
        return torch.cat([cls, grid.to(cls.dtype)], dim=1)

    def run(self, seq: torch.Tensor) -> torch.Tensor:
        """ModernBERT layers over an assembled [B, C+N, d_enc] sequence -> [B, N, dim] (cls dropped)."""
        h = self.in_proj(seq)
        h = self.layers_forward(h)
        return h[:, self.num_cls:]

    def layers_forward(self, h: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Just the ModernBERT layers on hidden states [B, L, dim] (rotary positions offset..offset+L-1)."""
        ropes = {}
        for layer in self.layers:
            if layer.rope_theta not in ropes:
                ropes[layer.rope_theta] = rope_cos_sin(h.shape[1], self.head_dim, layer.rope_theta, h.device, offset)
            h = layer(h, *ropes[layer.rope_theta])
        return h

    def forward(self, x_enc, ids_keep, ids_mask):
        return self.run(self.assemble(x_enc, ids_keep, ids_mask))


# --------------------------------------------------------------------------- loading
def _resolve_checkpoint(path_or_id: str) -> Path:
    p = Path(os.path.expanduser(path_or_id))
    if p.is_dir():
        return p
    if p.exists():
        raise ValueError(f"predictor.init_from={path_or_id!r} is a file; give the directory holding "
                         f"config.json and model.safetensors (or a hub id)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - transformers depends on huggingface_hub
        raise FileNotFoundError(f"predictor.init_from={path_or_id!r}: no such directory") from e
    try:
        return Path(snapshot_download(path_or_id, allow_patterns=["config.json", "*.safetensors",
                                                                  "*.safetensors.index.json"]))
    except Exception as e:
        raise FileNotFoundError(f"predictor.init_from={path_or_id!r} is neither a local directory nor a "
                                f"reachable hub id ({type(e).__name__}: {e})") from e


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    single = folder / "model.safetensors"
    if single.exists():
        return load_file(str(single))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out = {}
        for f in files:
            out.update(load_file(str(folder / f)))
        return out
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                            f"(only safetensors checkpoints are read)")


def _rope_thetas(conf: dict) -> tuple[float, float]:
    rp = conf.get("rope_parameters") or {}
    g = (rp.get("full_attention") or {}).get("rope_theta", conf.get("global_rope_theta", 160000.0))
    l = (rp.get("sliding_attention") or {}).get("rope_theta", conf.get("local_rope_theta", 10000.0))
    return float(g), float(l)


def load_modernbert_layers(pred: Predictor, path_or_id: str) -> dict:
    """Copy the last ``len(pred.layers)`` layers of a ModernBERT checkpoint into ``pred``.

    Checks the checkpoint's config against ours (width, heads, MLP width, norm eps, local window,
    rotary thetas, global/local pattern and the index of our first layer) and that every mapped key
    exists with the right shape; returns the checkpoint's config dict.
    """
    folder = _resolve_checkpoint(path_or_id)
    conf_path = folder / "config.json"
    if not conf_path.exists():
        raise FileNotFoundError(f"{folder}: no config.json; predictor.init_from must be a ModernBERT checkpoint")
    conf = json.loads(conf_path.read_text())
    cfg = pred.cfg
    if conf.get("model_type") != "modernbert":
        raise ValueError(f"{conf_path}: model_type is {conf.get('model_type')!r}, expected 'modernbert'")
    L = int(conf["num_hidden_layers"])
    n = len(pred.layers)
    g_theta, l_theta = _rope_thetas(conf)
    checks = {
        "dim": (cfg.dim, conf.get("hidden_size")),
        "heads": (cfg.heads, conf.get("num_attention_heads")),
        "mlp_hidden": (cfg.mlp_hidden, conf.get("intermediate_size")),
        "local_window": (cfg.local_window, conf.get("local_attention", 128)),
        "norm_eps": (cfg.norm_eps, conf.get("norm_eps", 1e-5)),
        "global_rope_theta": (cfg.global_rope_theta, g_theta),
        "local_rope_theta": (cfg.local_rope_theta, l_theta),
        "first_layer_index": (cfg.first_layer_index, L - n),
    }
    bad = [f"model.predictor.{k}={ours} but the checkpoint has {theirs}"
           for k, (ours, theirs) in checks.items() if ours != theirs]
    if n > L:
        bad.append(f"model.predictor.layers={n} but the checkpoint has only {L} layers")
    if conf.get("hidden_activation", "gelu") != "gelu" or conf.get("mlp_bias") or conf.get("attention_bias") \
            or conf.get("norm_bias"):
        bad.append("the checkpoint uses activations or biases this predictor does not implement "
                   "(needs hidden_activation=gelu and no mlp/attention/norm biases)")
    types = conf.get("layer_types")
    if types is None:
        every = conf.get("global_attn_every_n_layers", 3)
        types = ["full_attention" if i % every == 0 else "sliding_attention" for i in range(L)]
    for j, layer in enumerate(pred.layers):
        i = L - n + j
        want = "full_attention" if layer.window is None else "sliding_attention"
        if i < len(types) and types[i] != want:
            bad.append(f"layer {i} is {types[i]} in the checkpoint but {want} here "
                       f"(model.predictor.global_every={cfg.global_every})")
    if bad:
        raise ValueError(f"ModernBERT checkpoint {path_or_id!r} does not fit the predictor config:\n  "
                         + "\n  ".join(bad))
    sd = _read_safetensors(folder)
    prefix = "model." if any(k.startswith("model.layers.") for k in sd) else ""
    own = pred.layers.state_dict()
    new, missing, mismatched = {}, [], []
    for key, t in own.items():
        j, rest = key.split(".", 1)
        src = f"{prefix}layers.{L - n + int(j)}.{rest}"
        if src not in sd:
            missing.append(src)
        elif sd[src].shape != t.shape:
            mismatched.append(f"{src}: checkpoint {tuple(sd[src].shape)} vs predictor {tuple(t.shape)}")
        else:
            new[key] = sd[src].to(t.dtype)
    if missing or mismatched:
        raise ValueError(f"ModernBERT checkpoint {path_or_id!r}: "
                         + (f"missing keys {missing}; " if missing else "")
                         + (f"shape mismatches {mismatched}" if mismatched else ""))
    pred.layers.load_state_dict(new, strict=True)
    return conf
