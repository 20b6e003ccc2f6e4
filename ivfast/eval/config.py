"""Evaluation config: its own schema (not the training one), protocol presets, overrides.

A run is ``protocol`` (a name below) + ``dataset`` (kinetics / ssv2: the protocols' numbers
differ per data set) + any ``key.sub=value`` overrides. The protocol fills in every number of
``probe`` and ``views`` that the user did not set; the resolved values are printed and written
with the results, so a number is never implicit.

Sources of the protocol numbers (``PROTOCOLS``):
  * ``ivnext``: InternVideo-Next paper, frozen attentive probe (one attention-pooling head, 16
    frames, 1 clip x 3 crops, AdamW 0.9/0.999, cosine, 5 warm-up epochs, lr 1e-3 SSv2 / 3e-4
    Kinetics, 30 / 20 epochs, global batch 1024). Weight decay and frame sampling are not given
    there: 0.05 and TSN segment sampling (the UMT/VideoMAE-v2 convention) are our assumption.
  * ``vjepa``: V-JEPA (Bardes et al. 2024) frozen evaluation: one learnable query, one
    cross-attention block, 20 epochs, lr 1e-3, wd 0.01, 16 frames at frame step 4, test views
    8x3 (Kinetics) / 2x3 (SSv2). Batch 256 and no warm-up are our assumption.
  * ``vjepa2``: V-JEPA 2 (Assran et al. 2025) probe: four blocks (three self-attention blocks
    then the cross-attention pooling block), a 5 lr x 4 wd grid of heads trained in parallel on
    the same features; the reported number is the best of the 20 heads ON THE VAL SET (an
    optimistic, selection-on-test number, printed as such). The grid values are our reading of
    the released configs; check them before comparing with the paper.
  * ``linear``: logistic regression on cached, mean-pooled, standardised features, fitted to
    convergence by full-batch L-BFGS (L2 1e-3 on the weights: strictly convex, seed-free); the
    output records the iterations and the final gradient. ivfast's own protocol.
  * ``knn``: weighted k-NN (DINO's vote: weights exp(cos / T)), k=20, T=0.07, cosine similarity
    of features standardised with the train set's mean and std (else a shared background
    direction dominates every cosine).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ivfast.config import ConfigError, build_dataclass, deep_merge, preset_path, read_yaml, set_key

EVAL_CONFIG_DIR = Path(__file__).with_name("configs")


@dataclass
class ViewConfig:
    num_frames: int = 0                 # 0 = the protocol's value
    img_size: int = 0                   # 0 = the checkpoint's model.img_size
    sampling: str = ""                  # segment | stride ("" = protocol)
    stride: int = 0
    test_clips: int = 0                 # temporal views at test
    test_crops: int = 0                 # spatial views at test (1 = centre, 3 = left/centre/right)
    train_augment: str = ""             # "on": multi-scale crop + flip per epoch; "off": centre view
    scales: list[float] = field(default_factory=lambda: [1.0, 0.875, 0.75, 0.66])
    flip: bool = True


@dataclass
class ProbeConfig:
    head: str = ""                      # attentive_pool | vjepa | vjepa2 | linear | knn
    blocks: int = 0                     # probe blocks (vjepa: 1, vjepa2: 4)
    heads: int = 0                      # attention heads of the probe (0 = encoder heads)
    epochs: int = 0
    warmup_epochs: float = -1.0
    lr: list[float] = field(default_factory=list)          # >1 value (x weight_decay) = a grid of heads
    weight_decay: list[float] = field(default_factory=list)
    betas: list[float] = field(default_factory=list)
    global_batch: int = 0               # target global batch, reached with accumulation
    batch_per_gpu: int = 0
    features: str = ""                  # online (augmented, encoder every step) | cached (no augmentation, fast)
    knn_k: int = 0
    knn_temperature: float = -1.0          # -1 = protocol value
    pool: str = ""                      # linear / knn feature: mean of patch tokens | cls tokens mean
    max_iter: int = 0                   # linear: L-BFGS iterations at most (it stops at convergence)


@dataclass
class EvalConfig:
    protocol: Literal["ivnext", "vjepa", "vjepa2", "linear", "knn"] = "ivnext"
    dataset: Literal["kinetics", "ssv2"] = "kinetics"
    checkpoint: str = ""                # ivfast checkpoint dir / model.safetensors / release .safetensors
    random_init: bool = False           # probe a randomly initialised encoder of the checkpoint's config
    # seed of that random init; NOT the training default 0, else the "random" baseline is the very
    # starting point of the pretraining run (identical weights before step 1)
    random_init_seed: int = 1
    train_list: str = ""
    val_list: str = ""
    root: str = ""
    label_map: str = ""                 # file: "index name" per line, or one name per line
    num_classes: int = 0                # 0 = from the train list
    output_dir: str = "runs/eval"
    cache_dir: str = ""                 # "" = OUTPUT_DIR/../feature_cache
    device: Literal["auto", "cuda", "cpu"] = "auto"
    num_workers: int = 2
    seed: int = 0                       # clip sampling and augmentation
    # seeds of the probe's init and batch order; several = one probe per seed, reported as mean,
    # spread and a CI over clips and seeds ([] = [seed]); the convex linear fit and k-NN need one
    probe_seeds: list[int] = field(default_factory=list)
    # the demo's random-init baselines, one encoder per seed ([] = [random_init_seed])
    random_init_seeds: list[int] = field(default_factory=list)
    demo: bool = False                  # generate labelled clips; probe the demo checkpoint and a random init
    demo_per_class: int = 12
    demo_val_per_class: int = 6
    demo_protocols: list[str] = field(default_factory=lambda: ["ivnext", "linear", "knn"])
    views: ViewConfig = field(default_factory=ViewConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


# Every number of every protocol; "dataset" sub-keys override per data set.
DATASETS = ("kinetics", "ssv2")
PROTOCOLS: dict[str, dict] = {
    "ivnext": {
        "views": {"num_frames": 16, "sampling": "segment", "stride": 4, "test_clips": 1, "test_crops": 3,
                  "train_augment": "on"},
        "probe": {"head": "attentive_pool", "blocks": 1, "heads": 0, "warmup_epochs": 5.0,
                  "weight_decay": [0.05], "betas": [0.9, 0.999], "global_batch": 1024, "batch_per_gpu": 32,
                  "features": "online", "pool": "mean"},
        "kinetics": {"probe": {"lr": [3e-4], "epochs": 20}},
        "ssv2": {"probe": {"lr": [1e-3], "epochs": 30}},
    },
    "vjepa": {
        "views": {"num_frames": 16, "sampling": "stride", "stride": 4, "test_crops": 3, "train_augment": "on"},
        "probe": {"head": "vjepa", "blocks": 1, "heads": 0, "epochs": 20, "warmup_epochs": 0.0, "lr": [1e-3],
                  "weight_decay": [0.01], "betas": [0.9, 0.999], "global_batch": 256, "batch_per_gpu": 32,
                  "features": "online", "pool": "mean"},
        "kinetics": {"views": {"test_clips": 8}},
        "ssv2": {"views": {"test_clips": 2}},
    },
    "vjepa2": {
        "views": {"num_frames": 16, "sampling": "stride", "stride": 4, "test_crops": 3, "train_augment": "on"},
        "probe": {"head": "vjepa2", "blocks": 4, "heads": 0, "epochs": 20, "warmup_epochs": 0.0,
                  "lr": [5e-3, 3e-3, 1e-3, 3e-4, 1e-4], "weight_decay": [0.8, 0.4, 0.1, 0.01],
                  "betas": [0.9, 0.999], "global_batch": 256, "batch_per_gpu": 32, "features": "online",
                  "pool": "mean"},
        "kinetics": {"views": {"test_clips": 8}},
        "ssv2": {"views": {"test_clips": 2}},
    },
    "linear": {
        "views": {"num_frames": 16, "sampling": "segment", "stride": 4, "test_clips": 1, "test_crops": 3,
                  "train_augment": "off"},
        "probe": {"head": "linear", "blocks": 0, "weight_decay": [1e-3], "max_iter": 1000, "batch_per_gpu": 256,
                  "features": "cached", "pool": "mean"},
    },
    "knn": {
        "views": {"num_frames": 16, "sampling": "segment", "stride": 4, "test_clips": 1, "test_crops": 3,
                  "train_augment": "off"},
        "probe": {"head": "knn", "epochs": 0, "features": "cached", "knn_k": 20, "knn_temperature": 0.07,
                  "pool": "mean", "batch_per_gpu": 256},
    },
}

_UNSET = {int: 0, float: -1.0, str: ""}


def _is_unset(value) -> bool:
    """Whether a probe/view value is left to the protocol ([] , 0, -1.0 or "")."""
    return value == [] if isinstance(value, list) else value == _UNSET.get(type(value), None)


def protocol_values(protocol: str, dataset: str) -> dict:
    """The protocol's numbers for ``dataset`` as {'views': {...}, 'probe': {...}}."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol {protocol!r} unknown; choose one of {sorted(PROTOCOLS)}")
    p = copy.deepcopy(PROTOCOLS[protocol])
    per = {d: p.pop(d) for d in ("kinetics", "ssv2") if d in p}
    return deep_merge(p, per.get(dataset, {}))


def resolve(cfg: EvalConfig, protocol: str | None = None) -> EvalConfig:
    """A copy of ``cfg`` for ``protocol`` (default cfg.protocol): every unset probe/view value is
    filled from the protocol; values the user set win."""
    protocol = protocol or cfg.protocol
    vals = protocol_values(protocol, cfg.dataset)
    out = dataclasses.replace(cfg, protocol=protocol, views=copy.deepcopy(cfg.views), probe=copy.deepcopy(cfg.probe))
    for section in ("views", "probe"):
        obj = getattr(out, section)
        for name, value in vals.get(section, {}).items():
            if _is_unset(getattr(obj, name)):
                setattr(obj, name, copy.deepcopy(value))
    validate(out)
    return out


def overridden(cfg: EvalConfig, protocol: str | None = None) -> dict[str, list]:
    """{'probe.epochs': [protocol value, value used], ...}: every value of the protocol that
    ``cfg`` replaces (a preset's or the command line's), so none is replaced silently."""
    protocol = protocol or cfg.protocol
    vals = protocol_values(protocol, cfg.dataset)
    out = {}
    for section in ("views", "probe"):
        obj = getattr(cfg, section)
        for name, value in vals.get(section, {}).items():
            cur = getattr(obj, name)
            if not _is_unset(cur) and cur != value:
                out[f"{section}.{name}"] = [value, cur]
    return out


def validate(cfg: EvalConfig) -> None:
    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)
    v, p = cfg.views, cfg.probe
    need(v.sampling in ("segment", "stride"), f"views.sampling must be segment or stride, got {v.sampling!r}")
    need(v.test_crops in (1, 3), f"views.test_crops must be 1 (centre) or 3 (left/centre/right), got {v.test_crops}")
    need(v.test_clips >= 1 and v.num_frames >= 1, "views.test_clips and views.num_frames must be >= 1")
    need(v.train_augment in ("on", "off"), f"views.train_augment must be on or off, got {v.train_augment!r}")
    need(p.head in ("attentive_pool", "vjepa", "vjepa2", "linear", "knn"), f"probe.head {p.head!r} unknown")
    need(p.features in ("online", "cached"), f"probe.features must be online or cached, got {p.features!r}")
    need(p.pool in ("mean", "cls"), f"probe.pool must be mean or cls, got {p.pool!r}")
    if p.head == "knn":
        need(p.knn_k >= 1 and p.knn_temperature > 0, "probe.knn_k must be >= 1 and probe.knn_temperature > 0")
    elif p.head == "linear":
        need(p.max_iter >= 1 and len(p.weight_decay) >= 1 and min(p.weight_decay) > 0,
             "probe.head=linear needs probe.max_iter >= 1 and probe.weight_decay > 0 (L2 of the L-BFGS fit)")
    else:
        need(p.epochs >= 1 and len(p.lr) >= 1 and len(p.weight_decay) >= 1,
             "probe.epochs >= 1 and at least one probe.lr and probe.weight_decay are needed")
        need(len(p.betas) == 2, "probe.betas must be [beta1, beta2]")
        need(0 <= p.warmup_epochs <= p.epochs, "probe.warmup_epochs must be in [0, probe.epochs]")
        need(p.global_batch >= 1 and p.batch_per_gpu >= 1, "probe.global_batch and probe.batch_per_gpu must be >= 1")
    if p.head in ("linear", "knn"):
        need(p.features == "cached", f"probe.head={p.head} works on cached features (probe.features=cached)")


def eval_presets() -> list[str]:
    return sorted(p.stem for p in EVAL_CONFIG_DIR.glob("*.yaml"))


def load_eval_config(name_or_path: str = "", overrides=()) -> EvalConfig:
    """An eval preset name (``ivfast/eval/configs/NAME.yaml``), a YAML path, or "" (defaults)."""
    data: dict = {}
    if name_or_path:
        data = read_yaml(preset_path(name_or_path, EVAL_CONFIG_DIR, eval_presets(), what="eval config"))
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.sub=value")
        k, raw = ov.split("=", 1)
        set_key(data, k.strip(), raw.strip(), root=EvalConfig, what="eval config")
    return build_dataclass(EvalConfig, data)
