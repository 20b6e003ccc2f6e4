"""Video input pipeline: index (probe + cache), sampling, DALI and PyAV decoding, the loader.

    from ivfast.data import build_loader
    loader = build_loader(cfg, rank=rank, world_size=world, device="cuda")
    for epoch in range(E):
        loader.set_epoch(epoch)
        for batch in loader:          # {'video': [B,3,T,S,S], 'index': [B]}
            ...
        print(loader.bad_summary())

Synthetic clips: ``python -m ivfast.data.synth OUT --num N --codec vp9``.
Inspection: ``python -m ivfast.data inspect LIST_OR_PATHS [--json]``.
"""
from __future__ import annotations

import importlib

# Lazy: ``python -m ivfast.data.synth`` and ``from ivfast.data import DataError`` should not pay for
# importing torch.
_EXPORTS = {
    "index": ["BAD_REASONS", "DataError", "DatasetIndex", "Entry", "VideoInfo", "build_index", "probe", "read_list"],
    "loader": ["ClipDataset", "ClipLoader", "DeviceClips", "build_loader", "normalize", "shard_epoch"],
    "sampling": ["ClipPlan", "plan_clip"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'ivfast.data' has no attribute {name!r}")
