"""CPU decoding with PyAV, and the crop/resize/flip that matches the DALI graph.

Used in DataLoader workers when DALI is missing, cannot decode a file's codec, or the
config asks for it, and as the reference the DALI path is tested against.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .sampling import ClipPlan

if TYPE_CHECKING:
    import torch


class BadSample(Exception):
    """A file failed while decoding; ``reason`` is one of ``index.BAD_REASONS``."""

    def __init__(self, reason: str, path: str, detail: str):
        super().__init__(f"{reason}: {path}: {detail}")
        self.reason, self.path, self.detail = reason, path, detail


def decode_frames(path: str, indices, threads: int = 1) -> np.ndarray:
    """Decode the frames at ``indices`` (display order, repeats allowed) -> [T, H, W, 3] uint8 RGB.

    Decodes sequentially from the start up to the largest index, keeping only the frames
    asked for; this counts frames exactly like the index's probe and DALI's frame numbering
    (frame k = k-th decoded frame), which a timestamp seek cannot promise on every container.
    Raises :class:`BadSample` ('truncated' when the stream ends early, 'decode_error' on a
    corrupt payload, 'unreadable' when the container cannot be opened).
    """
    import av

    idx = np.asarray(indices, dtype=np.int64)
    if idx.ndim != 1 or idx.size == 0 or idx.min() < 0:
        raise ValueError(f"indices must be a non-empty 1-D list of frame numbers >= 0, got {idx}")
    wanted = np.unique(idx)
    need = int(wanted[-1])
    got: dict[int, np.ndarray] = {}
    try:
        container = av.open(path)
    except Exception as e:
        raise BadSample("unreadable", path, f"{type(e).__name__}: {e}") from e
    with container:
        if not container.streams.video:
            raise BadSample("no_video_stream", path, "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO" if threads > 1 else "SLICE"
        stream.thread_count = max(1, threads)
        k = 0
        pos = 0
        try:
            for frame in container.decode(stream):
                if k == wanted[pos]:
                    got[k] = frame.to_ndarray(format="rgb24")
                    pos += 1
                    if pos == len(wanted):
                        break
                k += 1
        except Exception as e:
            raise BadSample("decode_error", path, f"frame {k}: {type(e).__name__}: {e}") from e
    if len(got) < len(wanted):
        raise BadSample("truncated", path, f"stream ended after {k} frames, frame {need} was asked for")
    return np.stack([got[int(i)] for i in idx])


def crop_resize(frames: "np.ndarray | torch.Tensor", plan: ClipPlan, size: int) -> "torch.Tensor":
    """[T, H, W, 3] uint8 frames -> [3, T, size, size] uint8: crop, bilinear resize, flip.

    Bilinear with antialiasing when shrinking, rounded to uint8: the same operations the DALI
    graph applies (``fn.resize`` with a region of interest, linear, antialias on).
    """
    import torch   # here, so that the inspect CLI and synth start without importing torch
    import torch.nn.functional as F

    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"frames must be [T, H, W, 3] uint8, got {tuple(x.shape)} {x.dtype}")
    cx, cy, cw, ch = plan.crop
    x = x[:, cy:cy + ch, cx:cx + cw].permute(0, 3, 1, 2).float()          # T, 3, h, w
    if (ch, cw) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=ch > size or cw > size)
    if plan.flip:
        x = x.flip(-1)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(1, 0, 2, 3).contiguous()
