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


SEEK_GAP = 120   # frames: a longer jump forward seeks to a keyframe instead of decoding through


def decode_frames(path: str, indices, threads: int = 1, seek_gap: int = SEEK_GAP) -> np.ndarray:
    """Decode the frames at ``indices`` (display order, repeats allowed) -> [T, H, W, 3] uint8 RGB.

    Frame k is the k-th frame the decoder outputs, as in the index's frame count and DALI's
    ``frames`` argument. Short jumps are decoded through; a jump of more than ``seek_gap``
    frames seeks to the keyframe before the target and numbers frames by timestamp from
    there (k = (pts - pts of frame 0) x fps). A seek that lands past the target, or frames
    without timestamps, fall back to decoding from the start, so the result is always the
    sequential numbering. Raises :class:`BadSample` ('truncated' when the stream ends early,
    'decode_error' on a corrupt payload or frames whose size changes mid-stream, 'unreadable'
    when the container cannot be opened).
    """
    import av

    idx = np.asarray(indices, dtype=np.int64)
    if idx.ndim != 1 or idx.size == 0 or idx.min() < 0:
        raise ValueError(f"indices must be a non-empty 1-D list of frame numbers >= 0, got {idx}")
    wanted = [int(w) for w in np.unique(idx)]
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
        rate = stream.average_rate or stream.guessed_rate
        tb = stream.time_base
        can_seek = seek_gap > 0 and bool(rate) and bool(tb)
        k = -1            # number of the last frame decoded
        pts0 = None       # timestamp of frame 0 (from a decode that started at the beginning)
        frames_iter = container.decode(stream)
        by_pts = False    # after a seek, frames are numbered by timestamp
        try:
            for w in wanted:
                if w <= k:                               # asked twice (unique() prevents) or passed
                    continue
                if can_seek and pts0 is not None and w - k > seek_gap:
                    container.seek(int(pts0 + (w / float(rate)) / float(tb)), stream=stream, backward=True)
                    frames_iter, by_pts = container.decode(stream), True
                    k = -1
                while k < w:
                    frame = next(frames_iter, None)
                    if frame is None:
                        break
                    if pts0 is None:
                        pts0 = frame.pts
                    if by_pts:
                        if frame.pts is None:
                            raise _Restart
                        n = int(round((frame.pts - pts0) * float(tb) * float(rate)))
                        if k == -1 and n > w:            # the seek overshot the target
                            raise _Restart
                        k = n
                    else:
                        k += 1
                    if k in got or k not in wanted:
                        continue
                    got[k] = frame.to_ndarray(format="rgb24")
                if w not in got:
                    if by_pts and k > w:                 # timestamps skipped this number
                        raise _Restart
                    break                                # the stream ended first
        except _Restart:
            return decode_frames(path, indices, threads, seek_gap=0)
        except Exception as e:
            raise BadSample("decode_error", path, f"near frame {k}: {type(e).__name__}: {e}") from e
    missing = [w for w in wanted if w not in got]
    if missing:
        raise BadSample("truncated", path, f"stream ended after frame {k}; frames {missing[:4]} were asked for")
    shapes = sorted({got[w].shape for w in wanted})
    if len(shapes) > 1:      # e.g. segments of different resolutions concatenated into one stream
        raise BadSample("decode_error", path, f"the frame size changes within the stream: {shapes}")
    return np.stack([got[int(i)] for i in idx])


class _Restart(Exception):
    """Timestamps cannot be trusted for this file: decode it from the start."""


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
