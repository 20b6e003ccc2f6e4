"""One dataclass tree for a whole run, YAML presets and ``key.sub=value`` overrides.

Every number of the recipe lives here (defaults follow the authors' released code, see
docs/release-differences.md); presets in ``ivfast/configs/*.yaml`` only list what differs from
these defaults. Unknown keys and bad values fail with a message naming the key and the
valid choices, never silently.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

CONFIG_DIR = Path(__file__).with_name("configs")

KernelImpl = Literal["triton", "compile", "eager"]


class ConfigError(ValueError):
    """A config file or override is wrong; the message says which key and what is valid."""


# Keys that no longer exist, with what to do instead (a config that sets one fails on that line).
REMOVED_KEYS = {
    "data.num_frames": "the loader reads model.num_frames: delete the key, set model.num_frames",
    "data.img_size": "the loader reads model.img_size: delete the key, set model.img_size",
    "model.stage2_head": "the stage-2 head is always the released MLP: delete the key",
}


def _removed(key: str) -> None:
    if key in REMOVED_KEYS:
        raise ConfigError(f"{key} was removed: {REMOVED_KEYS[key]}")


# --------------------------------------------------------------------------- the tree
@dataclass
class EncoderConfig:
    """Student ViT (tubelet 1 x patch x patch, no cls in the token grid, 4 extra cls tokens)."""
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 14
    tubelet: int = 1
    num_cls: int = 4
    qk_norm: bool = True
    layerscale_init: float = 1e-5
    drop_path: float = 0.1
    act_checkpoint: bool = False
    # position tables (encoder, predictor, alignment) learnable, sin-cos initialised (released);
    # false: fixed sin-cos buffers (the paper's text), still saved in the state dict
    learnable_pos: bool = True


@dataclass
class PredictorConfig:
    """ModernBERT-compatible predictor: the LAST ``layers`` layers of a ModernBERT checkpoint."""
    init_from: str = ""                 # local dir or hub id of a ModernBERT checkpoint; "" = random init
    layers: int = 5
    dim: int = 1024
    heads: int = 16
    mlp_hidden: int = 2624
    first_layer_index: int = 23         # index of our first layer in the original model (28 layers)
    global_every: int = 3               # ModernBERT: layer i is global when i % global_every == 0
    local_window: int = 128             # total window (+-64 tokens) of local layers
    global_rope_theta: float = 160000.0
    local_rope_theta: float = 10000.0
    rope_positions: Literal["flat"] = "flat"   # 1-D RoPE over (cls, then T,H,W raster) order
    norm_eps: float = 1e-5
    # recompute in backward: "full" = whole layers (~-45 GiB, ~+8 % time at stage-2 ViT-B batch 14),
    # "selective" = keep GEMM/attention outputs, redo LN/RoPE/GeGLU (~-25 GiB, ~+3 %); predicted
    act_checkpoint: Literal["none", "full", "selective"] = "none"


@dataclass
class DecoderConfig:
    """Per-patch conditional diffusion MLP (stage 1)."""
    depth: int = 6
    width: int = 1536
    learn_sigma: bool = True
    batch_mul: int = 1                  # MAR uses 4; the released code 1
    train_steps: int = 1000
    noise_schedule: Literal["cosine", "linear"] = "cosine"
    sample_steps: int = 100
    temperature: float = 1.0
    sample_clip: float = 0.0            # sampler clamps predicted x0 to [-c, c]; 0 = off (released code)
    norm_pix: bool = False              # per-patch normalised targets (MAE norm_pix_loss)
    impl: KernelImpl = "triton"
    # precision of the decoder MLP + diffusion loss: "fp32" = released (fp32 autocast, TF32 off for
    # the decoder's GEMMs in forward and backward; the step's bf16 autocast is suspended around
    # it), "bf16" = faster (bf16 autocast around the decoder, on CPU too)
    dtype: Literal["fp32", "bf16"] = "fp32"


@dataclass
class TeacherConfig:
    """Stage 1: frozen SigLIP2 vision tower. Stage 2: frozen copy of the stage-1 encoder."""
    init_from: str = ""                 # local dir or hub id (stage 1); "" with tiny=True in demo/tests
    img_size: int = 256
    patch_size: int = 16
    middle_layers: list[int] = field(default_factory=lambda: [23, 26, 30, 33, 36, 39])
    student_layers: list[int] = field(default_factory=lambda: [6, 7, 8, 9, 10, 11])
    compile: bool = False
    tiny: bool = False                  # build a tiny random SigLIP2 (demo/tests only)
    # architecture of the checkpoint (SigLIP2 giant-opt); checked against init_from's config.json
    # when loading, and used by the analytic FLOP counter. The tiny teacher ignores these.
    dim: int = 1536
    depth: int = 40
    heads: int = 16
    mlp_hidden: int = 6144
    arch: Literal["siglip", "siglip2"] = "siglip"   # HF class of the tiny teacher (fixed-res SigLIP2 = "siglip")
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # teacher weights: auto = bf16 on CUDA, fp32 on CPU
    fp8: bool = False                   # encoder-layer GEMMs in row-wise scaled FP8 (Hopper/Ada; emulated on CPU)


@dataclass
class ModelConfig:
    num_frames: int = 16                # frames per clip, for the model and the loader alike
    img_size: int = 224                 # clip side in pixels, for the model and the loader alike
    init_from: str = ""                 # stage 2: path of a stage-1 checkpoint ("random": no weights, never for training)
    token_impl: KernelImpl = "triton"   # masked-token gather/scatter/targets kernels
    align_dim: int = 1536
    stage2_loss: Literal["cosine", "l1", "mse"] = "cosine"
    attn_backend: Literal["auto", "flash_attn", "sdpa", "flex", "xformers", "math"] = "auto"
    # training: a failing FlexAttention (local predictor layers) is an error; true = accept the dense
    # band-mask SDPA fallback (32-64x the local layers' attention work)
    attn_allow_dense_fallback: bool = False
    pool_dim: int = 768                 # attention-pool head output (released clip_embed_dim, all sizes)
    pool_heads: int = 16
    middle_loss_weight: float = 1.0     # stage-1 loss = w_mid * middle + w_final * final + diffusion
    final_loss_weight: float = 1.0
    diffusion_loss_weight: float = 1.0
    # stage-1 final target = mean over frames of the L2-normalised pooled teacher vectors, NOT
    # re-normalised (released code); true: re-normalise that mean (a plain cosine distance)
    final_target_renorm: bool = False
    # weight decay on predictor.pos_embed and predictor.mask_token (released: decayed); false: exempt
    decay_predictor_tokens: bool = True
    # stage-2 position tables: "reinterpolate" = learnable tables of stage2_pos_frames frames,
    # interpolated (linear in t) to num_frames on every forward, gradients reach the small tables
    # (released); "once" = interpolated once at load, free num_frames-frame tables are trained
    stage2_pos: Literal["reinterpolate", "once"] = "reinterpolate"
    stage2_pos_frames: int = 16         # frames of the learnable tables with stage2_pos=reinterpolate
    # stage 2: both mask sets' visible tokens in ONE encoder pass with per-sequence (varlen)
    # attention; auto = only where a varlen kernel is as fast as the per-set ones (CUDA with FA3,
    # or FA2 before Hopper), false = one pass per set (exact same maths either way)
    stage2_pack_sets: Literal["auto", True, False] = "auto"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)


@dataclass
class BlockSpec:
    """One V-JEPA mask set: ``num_blocks`` blocks of a sampled size, union masked."""
    num_blocks: int = 8
    spatial_scale: list[float] = field(default_factory=lambda: [0.15, 0.15])
    temporal_scale: list[float] = field(default_factory=lambda: [1.0, 1.0])
    aspect_ratio: list[float] = field(default_factory=lambda: [0.75, 1.5])


@dataclass
class MaskingConfig:
    kind: Literal["semantic", "tube", "multiblock"] = "semantic"
    ratio: float = 0.75                 # released scripts: 0.75 per frame (paper text: 0.8)
    semantic_mode: Literal["sample", "topk"] = "sample"  # released: sample prop. to attention
    semantic_per_frame: bool = True     # rank/sample within each frame (released); false: over the whole clip
    random_fraction: float = 0.0        # share of the kept set drawn uniformly at random
    blocks: list[BlockSpec] = field(default_factory=lambda: [
        BlockSpec(8, [0.15, 0.15]), BlockSpec(2, [0.7, 0.7])])
    max_keep: int = 0                   # cap on visible tokens per clip (0 = none)
    # how rows are cut to a common K: "lowest" keeps the lowest (t, h, w) ids (released, V-JEPA):
    # early-frame context, late frames predicted; "random" spreads the context over all frames
    trim: Literal["random", "lowest"] = "lowest"
    # stage 2 loss positions: "unseen" = every token the encoder did not see, visible tokens dropped
    # by the trim included (released: engines/jepa_mask.py masks_enc); "blocks" = the block-masked
    # tokens only, cut to the batch minimum (V-JEPA's choice)
    predict: Literal["blocks", "unseen"] = "unseen"


@dataclass
class DataConfig:
    train_list: str = ""                # CSV/TSV, the released code's list format, or a directory
    root: str = ""                      # prefix for relative paths in the list
    sampling: Literal["segment", "stride"] = "segment"
    stride: int = 4
    scales: list[float] = field(default_factory=lambda: [1.0, 0.875, 0.75, 0.66])
    flip: bool = True
    backend: Literal["auto", "dali", "pyav"] = "auto"
    output: Literal["uint8", "normalized"] = "uint8"
    num_workers: int = 8
    max_bad_fraction: float = 0.01
    index_cache: str = ""               # "" = next to the list file
    norm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # output=normalized; auto: bf16 on CUDA, fp32 on CPU
    drop_last: bool = False             # False: pad the epoch by repeating samples (every sample once or more); True: drop the remainder (counted)
    no_flip_sources: list[str] = field(default_factory=lambda: ["ssv2"])  # list 'source' values never flipped
    prefetch: int = 2                   # batches decoded ahead of the training step
    decode_threads: int = 2             # DALI threads / PyAV decoder threads per worker
    verify: Literal["auto", "first", "full"] = "auto"  # index probe decodes the first frame or all (auto: all with DALI, which can crash on corrupt files)
    min_frames: int = 1                 # videos with fewer decodable frames are dropped; shorter than num_frames = sampled with repeats (as released)
    decode_timeout_s: float = 120.0     # PyAV workers: a clip decoding longer is a bad file, its worker restarted (0 = off)
    rgb: Literal["exact", "fast"] = "exact"  # PyAV YUV->RGB: exact = as DALI (bit-identical); fast = swscale default, ~44 dB off, cheaper


@dataclass
class OptimConfig:
    optimizer: Literal["adamw", "apex"] = "adamw"
    base_lr: float = 1e-3               # per 256 clips of global batch
    min_lr: float = 1e-5                # per 256 clips of global batch
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    epochs: int = 50
    warmup_epochs: float = 5.0
    clip_grad: float = 5.0
    global_batch: int = 2048
    batch_per_gpu: int = 16


@dataclass
class RuntimeConfig:
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["bf16", "fp32"] = "bf16"     # autocast dtype on CUDA; CPU runs fp32
    # torch.compile encoder, predictor and decoder: "auto" = on CUDA only (fuses RoPE, LN+cast,
    # GeGLU, residual adds), true/false force it
    compile: Literal["auto", True, False] = "auto"
    distributed: Literal["ddp", "fsdp"] = "ddp"
    output_dir: str = "runs/ivfast"
    seed: int = 0
    max_steps: int = 0                  # stop after this step (the schedule still spans the epochs); 0 = all
    log_every: int = 10
    ckpt_every: int = 1000
    keep_last: int = 3
    max_nonfinite: int = 10
    # process-group timeout; a rank stuck for 80 % of it while others wait ends the run naming it
    # (0 = torch's default, no watchdog). Must exceed the longest checkpoint save.
    collective_timeout_s: float = 600.0
    profile_steps: str = ""             # "A:B" capture window
    # stage 1: every N steps, a reconstruction grid and the decoder's condition check (does it use the
    # predictor's per-patch conditions?) to TensorBoard (0 = off)
    recon_every: int = 0


@dataclass
class Config:
    stage: Literal[1, 2] = 1
    demo: bool = False                  # generate synthetic clips; run stage 1 then stage 2
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# --------------------------------------------------------------------------- coercion
def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotated type ``tp``; convert where it is lossless."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        if isinstance(value, str):  # "1" for Literal[1, 2] from the command line
            for c in choices:
                if str(c) == value or (isinstance(c, bool) and str(c).lower() == value.lower()):
                    return c
        raise ConfigError(f"{key}: {value!r} is not valid; choose one of {list(choices)}")
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return build_dataclass(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def build_dataclass(cls: type, data: dict, prefix: str = "") -> Any:
    """``cls`` from a nested mapping, every value checked against its field's type."""
    fields = _fields(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in fields:
            _removed(key)
            raise ConfigError(f"unknown config key {key!r}; valid keys here: {sorted(fields)}")
        kwargs[name] = _coerce(value, fields[name], key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """Build and validate a Config from a (possibly partial) nested mapping."""
    cfg = build_dataclass(Config, data or {})
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- presets, overrides
def presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, merging nested mappings key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset_path(name_or_path: str, config_dir: Path, names: list[str], what: str = "config") -> Path:
    """A preset name in ``config_dir`` or a YAML path; a clear error naming the presets otherwise."""
    path = Path(name_or_path)
    if not path.suffix and (config_dir / f"{name_or_path}.yaml").exists():
        path = config_dir / f"{name_or_path}.yaml"
    if not path.exists():
        raise ConfigError(f"{what} {name_or_path!r} not found: give a preset name "
                          f"({', '.join(names)}) or a path to a YAML file")
    return path


def _load_mapping(name_or_path: str, _seen: tuple = ()) -> dict:
    path = preset_path(name_or_path, CONFIG_DIR, presets())
    data = read_yaml(path)
    base = data.pop("base", None)   # a preset may extend another one
    if base:
        if base in _seen:
            raise ConfigError(f"{path}: 'base' chain loops through {base!r}")
        data = deep_merge(_load_mapping(base, _seen + (base,)), data)
    return data


def set_key(data: dict, dotted: str, raw: str, root: type | None = None, what: str = "config") -> None:
    """Apply one ``a.b.c=value`` override to a nested mapping, checking the key exists in the
    dataclass tree ``root`` (default :class:`Config`; the eval config passes its own)."""
    parts = dotted.split(".")
    cls: Any = root or Config
    node = data
    for i, part in enumerate(parts):
        fields = _fields(cls)
        where = ".".join(parts[:i]) or "the top level"
        if part not in fields:
            _removed(".".join(parts[:i + 1]))
            raise ConfigError(f"unknown {what} key {dotted!r}: {part!r} is not in {where}; "
                              f"valid keys there: {sorted(fields)}")
        tp = fields[part]
        if i == len(parts) - 1:
            if tp is str or (get_origin(tp) is Literal and all(isinstance(c, str) for c in get_args(tp))):
                node[part] = raw   # as typed: YAML 1.1 would read 20:30 as 1230 and 0123 as 83
                return
            try:
                value = yaml.safe_load(raw) if raw != "" else ""
            except yaml.YAMLError:
                value = raw
            node[part] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{'.'.join(parts[:i + 1])} is a value, not a section; "
                              f"cannot set {dotted!r}")
        node = node.setdefault(part, {})
        cls = tp


def load_config(name_or_path: str, overrides: list[str] | tuple = ()) -> Config:
    """Load a preset name or YAML path, apply ``key.sub=value`` overrides, validate."""
    data = _load_mapping(name_or_path)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.sub=value")
        key, raw = ov.split("=", 1)
        set_key(data, key.strip(), raw.strip())
    return from_dict(data)


def load_saved_config(path: str | os.PathLike) -> Config:
    """A checkpoint's ``config.yaml``, also one written before keys were removed: a removed key
    whose value the current config still holds (the data copies of the model's frames and image
    size, the released stage-2 head) is dropped, so no checkpoint becomes unreadable."""
    data = read_yaml(Path(path))
    d, m = data.get("data") or {}, data.get("model") or {}
    for k in ("num_frames", "img_size"):
        if k in d and d[k] == m.get(k, d[k]):
            m.setdefault(k, d.pop(k))
    if m.get("stage2_head", "mlp") == "mlp":
        m.pop("stage2_head", None)
    return from_dict(data)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def validate(cfg: Config) -> None:
    """Cross-field checks that a type alone cannot express."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    m, enc = cfg.model, cfg.model.encoder
    need(0.0 < cfg.masking.ratio < 1.0, f"masking.ratio must be in (0, 1), got {cfg.masking.ratio}")
    need(0.0 <= cfg.masking.random_fraction <= 1.0, "masking.random_fraction must be in [0, 1]")
    need(m.img_size % enc.patch_size == 0,
         f"model.img_size={m.img_size} must be a multiple of model.encoder.patch_size={enc.patch_size}")
    need(m.num_frames % enc.tubelet == 0,
         f"model.num_frames={m.num_frames} must be a multiple of model.encoder.tubelet={enc.tubelet}")
    need(enc.dim % enc.heads == 0, f"model.encoder.dim={enc.dim} must divide by heads={enc.heads}")
    p = m.predictor
    need(p.dim % p.heads == 0, f"model.predictor.dim={p.dim} must divide by heads={p.heads}")
    need(len(m.teacher.middle_layers) == len(m.teacher.student_layers),
         "model.teacher.middle_layers and model.teacher.student_layers must have the same length")
    need(all(0 <= i < enc.depth for i in m.teacher.student_layers),
         f"model.teacher.student_layers must index encoder blocks 0..{enc.depth - 1}")
    need(m.stage2_pos_frames >= 1 and m.stage2_pos_frames % enc.tubelet == 0,
         f"model.stage2_pos_frames={m.stage2_pos_frames} must be >= 1 and a multiple of model.encoder.tubelet="
         f"{enc.tubelet} (the stage-1 checkpoint's num_frames; or model.stage2_pos=once)")
    need(cfg.data.min_frames >= 1, f"data.min_frames must be >= 1 (videos with fewer decodable frames are dropped), "
                                   f"got {cfg.data.min_frames}")
    need(all(0 < s <= 1 for s in cfg.data.scales), "data.scales must be in (0, 1]")
    for i, b in enumerate(cfg.masking.blocks):
        for name in ("spatial_scale", "temporal_scale", "aspect_ratio"):
            lo_hi = getattr(b, name)
            need(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1],
                 f"masking.blocks[{i}].{name} must be [min, max] with 0 < min <= max")
    o = cfg.optim
    need(o.global_batch > 0 and o.batch_per_gpu > 0, "optim.global_batch and optim.batch_per_gpu must be > 0")
    need(len(o.betas) == 2, "optim.betas must be [beta1, beta2]")
    r = cfg.runtime
    for key in ("log_every", "ckpt_every", "max_nonfinite"):
        need(getattr(r, key) >= 1, f"runtime.{key} must be >= 1, got {getattr(r, key)}")
    need(r.keep_last >= 1, f"runtime.keep_last must be >= 1, got {r.keep_last}")
    need(r.max_steps >= 0, f"runtime.max_steps must be >= 0 (0 = the whole schedule), got {r.max_steps}")
    need(r.recon_every >= 0, f"runtime.recon_every must be >= 0 (0 = off), got {r.recon_every}")
    need(o.epochs >= 1, f"optim.epochs must be >= 1, got {o.epochs}")
    need(0 <= o.warmup_epochs <= o.epochs, f"optim.warmup_epochs must be in [0, optim.epochs], got {o.warmup_epochs}")
    for key in ("base_lr", "min_lr", "weight_decay", "eps"):
        v = getattr(o, key)
        need(math.isfinite(v) and v >= 0, f"optim.{key} must be a finite number >= 0, got {v}")
    need(o.clip_grad >= 0, f"optim.clip_grad must be >= 0 (0 = no clipping), got {o.clip_grad}")
    need(cfg.masking.max_keep >= 0, f"masking.max_keep must be >= 0 (0 = no cap), got {cfg.masking.max_keep}")
    if cfg.runtime.profile_steps:
        a, sep, b = cfg.runtime.profile_steps.partition(":")
        need(sep == ":" and a.isdigit() and b.isdigit() and int(a) < int(b),
             f"runtime.profile_steps must look like A:B with A < B, got {cfg.runtime.profile_steps!r}")
