"""Labelled synthetic clips for the evaluation demo and tests.

Eight classes; a probe needs motion for six of them and appearance for two:

  0-3  a grey square moving right / left / down / up           (direction of movement)
  4-5  a grey bar rotating clockwise / counter-clockwise       (sense of rotation)
  6-7  a red / a blue square drifting in a random direction    (appearance)

Every clip has a random smooth background and random start positions and speeds, so no single
frame tells a motion class apart (a frame of "right" and one of "left" look alike). Clips are
encoded with :func:`ivfast.data.synth.write_video` and listed as ``path,label`` CSV, the format
the training loader reads.

    python -m ivfast.eval.synth_labels OUT_DIR --per-class 8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

CLASS_NAMES = ["move_right", "move_left", "move_down", "move_up",
               "rotate_cw", "rotate_ccw", "red_square", "blue_square"]
MOTION_CLASSES = (0, 1, 2, 3, 4, 5)
APPEARANCE_CLASSES = (6, 7)
GREY = (200.0, 200.0, 200.0)


def class_group(label: int) -> str:
    """'motion' (needs the frame order) or 'appearance' (one frame tells)."""
    return "appearance" if label in APPEARANCE_CLASSES else "motion"


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base, gx, gy = rng.uniform(50, 120, 3), rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        img[..., c] = base[c] + 25 * np.sin((xx * gx[c] + yy * gy[c]) / 15)
    return img


def make_clip(label: int, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One [frames, size, size, 3] uint8 clip of class ``label``."""
    if not 0 <= label < len(CLASS_NAMES):
        raise ValueError(f"label {label} is not a class of this data set (0..{len(CLASS_NAMES) - 1})")
    h = w = size
    bg = _background(h, w, rng)
    side = max(4, size // 4)
    out = np.empty((frames, h, w, 3), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # the whole movement spans about half the frame over the clip, whatever its length
    speed = rng.uniform(0.35, 0.5) * size / max(1, frames - 1)
    if label < 4:
        direction = [(1, 0), (-1, 0), (0, 1), (0, -1)][label]
    else:
        a = rng.uniform(0, 2 * np.pi)
        direction = (np.cos(a), np.sin(a))
    colour = {6: (220.0, 40.0, 40.0), 7: (40.0, 60.0, 230.0)}.get(label, GREY)
    cx0, cy0 = rng.uniform(0.3, 0.7, 2) * size
    angle0, omega = rng.uniform(0, np.pi), rng.uniform(0.25, 0.4) * (1 if label == 4 else -1)
    for i in range(frames):
        img = bg.copy()
        if label in (4, 5):   # a bar through the centre, turning by omega rad per frame (image y is down)
            ang = angle0 + omega * i
            u = (xx - cx0) * np.cos(ang) + (yy - cy0) * np.sin(ang)
            v = -(xx - cx0) * np.sin(ang) + (yy - cy0) * np.cos(ang)
            img[(np.abs(u) < size * 0.35) & (np.abs(v) < max(2, size // 14))] = colour
            # a marker at one end makes the bar's orientation (and so the sense) unambiguous
            img[((u - size * 0.3) ** 2 + v ** 2) < (size / 12) ** 2] = (250.0, 250.0, 120.0)
        else:
            cx = cx0 - direction[0] * speed * (frames - 1) / 2 + direction[0] * speed * i
            cy = cy0 - direction[1] * speed * (frames - 1) / 2 + direction[1] * speed * i
            x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
            img[max(0, y0):max(0, y0 + side), max(0, x0):max(0, x0 + side)] = colour
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def make_labelled_clips(out_dir: str | Path, per_class: int, frames: int = 16, size: int = 64,
                        seed: int = 0, split: str = "train", classes=None, codec: str = "vp9") -> Path:
    """Write ``per_class`` clips of each class and a ``{split}.csv`` list (path,label); returns the list.

    ``classes``: a subset of the class ids above; labels are then renumbered 0..len-1 in that order
    (``labels.txt`` names them). Cached: a list that already exists is returned as it is.
    """
    from ivfast.data.synth import write_video

    classes = list(range(len(CLASS_NAMES))) if classes is None else list(classes)
    out_dir = Path(out_dir)
    listing = out_dir / f"{split}.csv"
    if listing.exists():
        return listing
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = ["path,label"]
    split_seed = {"train": 0, "val": 1}.get(split, 2)
    for new_label, label in enumerate(classes):
        for k in range(per_class):
            rng = np.random.default_rng([seed, split_seed, label, k])
            path = out_dir / f"{split}_{CLASS_NAMES[label]}_{k:03d}.webm"
            write_video(path, make_clip(label, frames, size, rng), codec=codec)
            rows.append(f"{path.resolve()},{new_label}")
    tmp = listing.with_suffix(".tmp")
    tmp.write_text("\n".join(rows) + "\n")
    tmp.replace(listing)
    (out_dir / "labels.txt").write_text("".join(f"{i} {CLASS_NAMES[c]} @{class_group(c)}\n"
                                                for i, c in enumerate(classes)))
    return listing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ivfast.eval.synth_labels", description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for split in ("train", "val"):
        print(make_labelled_clips(args.out_dir, args.per_class, args.frames, args.size, args.seed, split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
