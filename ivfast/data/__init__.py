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
from .index import BAD_REASONS, DataError, DatasetIndex, Entry, VideoInfo, build_index, probe, read_list
from .loader import ClipDataset, ClipLoader, build_loader, normalize, shard_epoch
from .sampling import ClipPlan, plan_clip

__all__ = ["BAD_REASONS", "DataError", "DatasetIndex", "Entry", "VideoInfo", "build_index", "probe",
           "read_list", "ClipDataset", "ClipLoader", "build_loader", "normalize", "shard_epoch",
           "ClipPlan", "plan_clip"]
