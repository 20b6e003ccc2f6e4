"""Frame and crop choices, made in Python from the index so every decoder path decodes and
crops exactly the same thing.

A clip's randomness comes from one generator seeded by (seed, epoch, sample id, attempt):
the same sample gets the same frames, crop and flip on any rank, worker or backend, and a
resumed run repeats the interrupted epoch exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClipPlan:
    """Everything a decoder needs for one clip: which frames, which crop, whether to flip."""
    frames: np.ndarray          # [T] int64 frame indices (0-based, in display order)
    crop: tuple[int, int, int, int]   # x, y, w, h of the crop in source pixels
    flip: bool                  # horizontal flip after the resize


def sample_rng(seed: int, epoch: int, sample_id: int, attempt: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(sample_id), int(attempt)])


def frame_window(num_frames: int, fps: float, start_sec: float = -1.0, end_sec: float = -1.0) -> tuple[int, int]:
    """[first, last) frame range of the clip inside the video (times < 0: the whole video)."""
    if start_sec < 0 or end_sec < 0 or fps <= 0 or end_sec <= start_sec:
        return 0, num_frames
    first = min(num_frames - 1, max(0, int(start_sec * fps)))
    last = min(num_frames, max(first + 1, int(round(end_sec * fps))))
    return first, last


def segment_indices(first: int, last: int, num: int, rng: np.random.Generator | None) -> np.ndarray:
    """TSN sparse sampling: split [first, last) into ``num`` equal segments, take one frame in each.

    Training (``rng`` given): a uniformly random frame inside each segment. Evaluation
    (``rng`` None): the centre frame of each segment. Segments use float boundaries, so the
    whole range is covered and no index falls outside it (the released code can return -1).
    Shorter ranges than ``num`` repeat frames.
    """
    n = last - first
    if n <= 0:
        raise ValueError(f"empty frame range [{first}, {last})")
    edges = np.arange(num + 1, dtype=np.float64) * n / num
    lo = np.floor(edges[:-1]).astype(np.int64)
    hi = np.maximum(lo + 1, np.floor(edges[1:]).astype(np.int64))      # exclusive, >= lo + 1
    if rng is None:
        idx = np.floor((edges[:-1] + edges[1:]) / 2).astype(np.int64)
    else:
        idx = lo + (rng.random(num) * (hi - lo)).astype(np.int64)
    return first + np.clip(idx, 0, n - 1)


def stride_indices(first: int, last: int, num: int, stride: int, rng: np.random.Generator | None) -> np.ndarray:
    """``num`` consecutive frames ``stride`` apart, at a random (train) or centred (eval) start.

    A range shorter than the span repeats its last frame (as DALI's ``pad_mode='edge'``).
    """
    n = last - first
    span = (num - 1) * stride + 1
    room = max(0, n - span)
    start = int(rng.integers(room + 1)) if rng is not None else room // 2
    return first + np.minimum(start + np.arange(num, dtype=np.int64) * stride, n - 1)


def fixed_offsets(image_w: int, image_h: int, crop_w: int, crop_h: int) -> list[tuple[int, int]]:
    """The 13 fixed crop positions of TSN's MultiScaleCrop: corners, centre, edge centres, quarters."""
    ws, hs = (image_w - crop_w) // 4, (image_h - crop_h) // 4
    grid = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2),
            (0, 2), (4, 2), (2, 4), (2, 0),
            (1, 1), (3, 1), (1, 3), (3, 3)]
    return [(i * ws, j * hs) for i, j in grid]


def multiscale_crop(image_w: int, image_h: int, out_size: int, scales: list[float],
                    rng: np.random.Generator, max_distort: int = 1) -> tuple[int, int, int, int]:
    """MultiScaleCrop: a crop side from ``scales`` x the short side for width and height
    (their scale indices differ by at most ``max_distort``), snapped to ``out_size`` when within
    3 px, placed at one of the 13 fixed offsets. Returns (x, y, w, h)."""
    base = min(image_w, image_h)
    sizes = [int(base * s) for s in scales]
    snap = [out_size if abs(s - out_size) < 3 else s for s in sizes]
    snap = [max(1, min(s, base)) for s in snap]
    pairs = [(snap[j], snap[i]) for i in range(len(snap)) for j in range(len(snap))
             if abs(i - j) <= max_distort]
    cw, ch = pairs[int(rng.integers(len(pairs)))]
    offsets = fixed_offsets(image_w, image_h, cw, ch)
    x, y = offsets[int(rng.integers(len(offsets)))]
    return int(x), int(y), int(cw), int(ch)


def center_crop(image_w: int, image_h: int) -> tuple[int, int, int, int]:
    """Evaluation crop: the centred square of the short side."""
    side = min(image_w, image_h)
    return (image_w - side) // 2, (image_h - side) // 2, side, side


def plan_clip(*, num_frames_video: int, fps: float, width: int, height: int, num: int,
              out_size: int, mode: str = "segment", stride: int = 4,
              scales: list[float] | tuple[float, ...] = (1.0, 0.875, 0.75, 0.66),
              flip: bool = True, train: bool = True, rng: np.random.Generator | None = None,
              start_sec: float = -1.0, end_sec: float = -1.0) -> ClipPlan:
    """Choose frames, crop and flip for one clip (``rng`` required when ``train``)."""
    if train and rng is None:
        raise ValueError("plan_clip(train=True) needs an rng")
    first, last = frame_window(num_frames_video, fps, start_sec, end_sec)
    r = rng if train else None
    if mode == "segment":
        frames = segment_indices(first, last, num, r)
    elif mode == "stride":
        frames = stride_indices(first, last, num, stride, r)
    else:
        raise ValueError(f"sampling mode {mode!r} unknown; choose 'segment' or 'stride'")
    if train:
        crop = multiscale_crop(width, height, out_size, list(scales), rng)
        do_flip = bool(flip and rng.random() < 0.5)
    else:
        crop, do_flip = center_crop(width, height), False
    return ClipPlan(frames, crop, do_flip)
