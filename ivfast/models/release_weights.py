"""The authors' released InternVideo-Next weights in ivfast's encoder, and ``load_encoder``.

Key map (release module names from ``InternVideo-Next/models/InternVideo_next.py``, class
``InternVideo2``; ours from :class:`ivfast.models.vit.VisionTransformer`):

  release                                   ivfast                       transform
  patch_embed.norm_before.weight [588]      patch_norm.weight            (t, ph, pw, c) -> (c, t, ph, pw)
  patch_embed.proj.weight [d, 3, t, p, p]   patch_embed.weight [d, 588]  flatten (c, t, ph, pw)
  patch_embed.proj.bias                     patch_embed.bias
  patch_embed.norm.weight                   embed_norm.weight
  cls_token [1, n_cls, d]                   cls_token
  pos_embed [1, n_cls + T*H*W, d]           pos_embed [n_cls + T*H*W, d] squeeze(0)
  blocks.i.{norm1,norm2}.weight             same
  blocks.i.attn.qkv.weight                  same (the release default has no qkv bias)
  blocks.i.attn.{q_norm,k_norm}.weight      same (RMSNorm over the full width in both)
  blocks.i.attn.proj.{weight,bias}          same
  blocks.i.ls{1,2}.gamma                    same
  blocks.i.mlp.fc{1,2}.{weight,bias}        same (FusedMLP keeps the fc1/fc2 names)
  clip_projector.norm1_{q,k,v}.*            pool.norm_{q,k,v}.*  (stage-1 attention pool, optional)
  clip_projector.cross_attn.{q,k,v}.weight  pool.{q,k,v}.weight
  clip_projector.cross_attn.{q,k,v}_bias    pool.{q,k,v}.bias
  clip_projector.cross_attn.proj.*          pool.proj.*

Why the patch-norm weight is permuted: the release RMS-normalises each patch in
``(t2 hp wp c)`` order (channels last) and then runs a Conv3d; ivfast normalises the
``(c, t, ph, pw)`` vector it feeds one GEMM. RMS statistics do not depend on the order, the
per-element weight does.

Ambiguities (also raised as errors where they matter):
  * the hub files wrap the model (custom code); the prefix in front of ``patch_embed`` is found
    from the keys, and a file holding several encoders (e.g. student and teacher) needs ``prefix``;
  * the number of heads is not in the weights (qkv is [3d, d]): taken from the config, else from
    the release's registry (Base 768 -> 12, Large 1024 -> 16);
  * ``pos_embed`` gives T*H*W, not T and H*W separately: ``img_size`` (default 224) decides;
  * ``sep_pos_embed`` checkpoints and ``qkv_bias`` ones have no ivfast equivalent: refused.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import replace
from pathlib import Path

import torch

log = logging.getLogger("ivfast.models")
RELEASE_HEADS = {768: 12, 1024: 16, 1408: 16}     # internvideo_next_{base,large}, InternVideo2-1B


def _find_prefix(sd: dict, prefix: str | None) -> str:
    if prefix is not None:
        return prefix
    found = sorted({k[: -len("patch_embed.proj.weight")] for k in sd if k.endswith("patch_embed.proj.weight")})
    if not found:
        raise KeyError("no 'patch_embed.proj.weight' key: this is not a released InternVideo-Next encoder state dict")
    if len(found) > 1:
        raise KeyError(f"the file holds several encoders (prefixes {found}); pass prefix= to choose one")
    return found[0]


def is_release_state_dict(sd: dict) -> bool:
    return any(k.endswith("patch_embed.proj.weight") for k in sd)


def convert_release_state_dict(sd: dict, prefix: str | None = None) -> tuple[dict, dict]:
    """Release names -> (ivfast encoder state dict, ivfast pool state dict ('' if absent)).

    Raises on keys of the encoder we cannot place, naming them."""
    pre = _find_prefix(sd, prefix)
    src = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
    if any(k.startswith("pos_embed_spatial") for k in src):
        raise ValueError("this checkpoint uses separate spatial/temporal position tables (sep_pos_embed=True); "
                         "ivfast's encoder has one joint table: not supported")
    enc, pool, unused = {}, {}, []
    w = src["patch_embed.proj.weight"]
    d, c, t, ph, pw = w.shape
    enc["patch_embed.weight"] = w.reshape(d, c * t * ph * pw)
    enc["patch_embed.bias"] = src["patch_embed.proj.bias"]
    nb = src["patch_embed.norm_before.weight"]
    enc["patch_norm.weight"] = nb.reshape(t, ph, pw, c).permute(3, 0, 1, 2).reshape(-1)
    enc["embed_norm.weight"] = src["patch_embed.norm.weight"]
    enc["cls_token"] = src["cls_token"]
    enc["pos_embed"] = src["pos_embed"].reshape(src["pos_embed"].shape[-2:])
    block = re.compile(r"blocks\.\d+\.(norm1\.weight|norm2\.weight|attn\.qkv\.weight|attn\.q_norm\.weight|"
                       r"attn\.k_norm\.weight|attn\.proj\.(weight|bias)|ls[12]\.gamma|mlp\.fc[12]\.(weight|bias))$")
    for k, v in src.items():
        if k.startswith("blocks."):
            if k.endswith("attn.qkv.bias") or k.endswith(("attn.q_bias", "attn.v_bias")):
                raise ValueError(f"{pre}{k}: the released checkpoint has a qkv bias; ivfast's encoder has none "
                                 f"(model built with qkv_bias=True is not supported)")
            if block.match(k):
                enc[k] = v
            else:
                unused.append(pre + k)
        elif k.startswith("clip_projector."):
            rest = k[len("clip_projector."):]
            m = re.match(r"norm1_([qkv])\.(weight|bias)$", rest)
            if m:
                pool[f"norm_{m[1]}.{m[2]}"] = v
            elif re.match(r"cross_attn\.[qkv]\.weight$", rest):
                pool[rest[len("cross_attn."):]] = v
            elif re.match(r"cross_attn\.[qkv]_bias$", rest):
                pool[f"{rest[len('cross_attn.')]}.bias"] = v
            elif rest.startswith("cross_attn.proj."):
                pool[rest[len("cross_attn."):]] = v
            else:
                unused.append(pre + k)
        elif k not in ("patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm_before.weight",
                       "patch_embed.norm.weight", "cls_token", "pos_embed"):
            unused.append(pre + k)
    if unused:   # e.g. a stage-2 file's predictor: not part of the encoder
        log.warning("release weights: %d keys not used by the encoder or pool, e.g. %s", len(unused), unused[:5])
    return enc, pool


def encoder_config_from_state(enc_sd: dict, heads: int = 0, **overrides):
    """An ivfast EncoderConfig matching a (converted) encoder state dict's shapes."""
    from ivfast.config import EncoderConfig

    d = enc_sd["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in enc_sd if k.startswith("blocks."))
    hidden = enc_sd["blocks.0.mlp.fc1.weight"].shape[0]
    patch_dim = enc_sd["patch_embed.weight"].shape[1]
    heads = heads or RELEASE_HEADS.get(d, 0)
    if not heads:
        raise ValueError(f"width {d}: the number of heads is not in the weights; pass heads=")
    cfg = EncoderConfig(dim=d, depth=depth, heads=heads, mlp_ratio=hidden / d, num_cls=enc_sd["cls_token"].shape[1],
                        qk_norm="blocks.0.attn.q_norm.weight" in enc_sd,
                        layerscale_init=1e-5 if "blocks.0.ls1.gamma" in enc_sd else 0.0, drop_path=0.0)
    cfg = replace(cfg, **overrides)
    if 3 * cfg.tubelet * cfg.patch_size ** 2 != patch_dim:
        raise ValueError(f"patches of {patch_dim} values do not fit patch_size={cfg.patch_size}, "
                         f"tubelet={cfg.tubelet}; pass the right ones")
    return cfg


def _ivfast_checkpoint_file(path: Path) -> Path:
    """A checkpoint dir, a model.safetensors, or a run dir (its newest checkpoint)."""
    from ivfast.checkpoint import find_latest
    if path.is_dir():
        for root in (path, path / "checkpoints"):
            if (root / "model.safetensors").exists():
                return root / "model.safetensors"
            latest = find_latest(root) if root.is_dir() else None
            if latest is not None:
                return latest / "model.safetensors"
        raise FileNotFoundError(f"{path}: no model.safetensors and no checkpoints/step_* in it")
    if not path.exists():
        raise FileNotFoundError(f"encoder weights {path} do not exist")
    return path


def load_encoder(path: str | os.PathLike, num_frames: int = 0, img_size: int = 0, config=None,
                 prefix: str | None = None, heads: int = 0, random_init: bool = False,
                 attn_backend: str = "auto", seed: int = 0, trained_img_size: int = 0):
    """Rebuild a frozen-ready encoder (``VisionTransformer``, eval mode) from weights alone.

    ``path``: an ivfast checkpoint directory / run directory / ``model.safetensors`` (its
    ``config.yaml`` next to it gives the architecture; stage 1 or 2, the student ``encoder.*``), or a
    released InternVideo-Next safetensors (names mapped, see the module docstring). ``num_frames``
    / ``img_size`` (0 = as trained) resize the position table (linear in time, bicubic in space).
    ``config``: an ivfast Config or EncoderConfig to use instead of the file's.
    ``trained_img_size``: released weights only, the image size they were trained at (not in the
    weights; default the hub config's, else 224). ``random_init``:
    same architecture, fresh weights drawn from ``seed`` (the random baseline of a probe; the same
    seed gives the same weights, which the feature cache relies on). Returns the encoder; its
    ``.source`` attribute says what was loaded.
    """
    from safetensors.torch import load_file

    from ivfast.config import Config, EncoderConfig, load_saved_config
    from ivfast.models.vit import VisionTransformer, interpolate_pos_table

    f = _ivfast_checkpoint_file(Path(path))
    raw = load_file(str(f))
    frames0 = size0 = 0
    if is_release_state_dict(raw) and not any(k.startswith("encoder.") for k in raw):
        sd, _ = convert_release_state_dict(raw, prefix)
        enc_cfg = config.model.encoder if isinstance(config, Config) else config
        if enc_cfg is None:
            conv = raw[_find_prefix(raw, prefix) + "patch_embed.proj.weight"]       # [d, 3, t, p, p]
            enc_cfg = encoder_config_from_state(sd, heads=heads, tubelet=conv.shape[2], patch_size=conv.shape[3])
            cfg_json = f.with_name("config.json")
            if cfg_json.exists():   # the hub's config; field names of the custom code, when present
                j = json.loads(cfg_json.read_text())
                frames0 = int(j.get("num_frames", 0) or 0)
                size0 = int(j.get("img_size", 0) or 0)
        size0 = trained_img_size or size0 or 224
        hw = (size0 // enc_cfg.patch_size) ** 2
        rows = sd["pos_embed"].shape[0] - enc_cfg.num_cls
        if rows % hw:
            raise ValueError(f"{f}: position table of {rows} patch rows does not fit {size0} px images "
                             f"({hw} patches a frame); pass trained_img_size=")
        frames0 = frames0 or rows // hw * enc_cfg.tubelet
        source = f"release:{f}"
    else:
        if config is None:
            cfg_file = f.with_name("config.yaml")
            if not cfg_file.exists():
                raise FileNotFoundError(f"{f}: no config.yaml next to it; pass config= (an ivfast Config)")
            config = load_saved_config(cfg_file)
        enc_cfg = config.model.encoder if isinstance(config, Config) else config
        if isinstance(config, Config):
            frames0, size0 = config.model.num_frames, config.model.img_size
        strip = {k.removeprefix("module."): v for k, v in raw.items()}
        sd = {k[len("encoder."):]: v for k, v in strip.items() if k.startswith("encoder.")}
        if not sd:
            sd = strip                     # a bare encoder state dict (e.g. written by save_encoder)
        if not frames0:
            raise ValueError("num_frames/img_size of the training run are unknown: pass an ivfast Config")
        source = f"ivfast:{f}"
    if not isinstance(enc_cfg, EncoderConfig):
        raise TypeError(f"config must be an ivfast Config or EncoderConfig, got {type(config).__name__}")
    num_frames, img_size = num_frames or frames0, img_size or size0
    with torch.random.fork_rng(devices=[]):      # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        enc = VisionTransformer(replace(enc_cfg, drop_path=0.0, act_checkpoint=False), num_frames, img_size,
                                attn_backend)
    if not random_init:
        grid0 = (frames0 // enc_cfg.tubelet, size0 // enc_cfg.patch_size, size0 // enc_cfg.patch_size)
        if "pos_embed" in sd:
            sd["pos_embed"] = interpolate_pos_table(sd["pos_embed"].float(), enc_cfg.num_cls, grid0, enc.grid)
        missing, unexpected = enc.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
        if missing or unexpected:
            raise ValueError(f"{f} does not fit the encoder: missing {missing[:10]}, unexpected {unexpected[:10]}")
    else:
        source = f"random-init ({source})"
    enc.source = source
    enc.weights_file = str(f.resolve())    # the feature cache keys on this file's size and mtime
    return enc.eval().requires_grad_(False)
