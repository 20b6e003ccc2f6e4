"""Labelled clips and their views, read with the training pipeline's list formats and decoder.

Lists: anything :func:`ivfast.data.read_list` reads (CSV ``path,label``, the release's
``source path total start end label`` lines, ``path label``); every entry needs a label.
Views: training views are augmented with the training loader's own planner (multi-scale crop,
flip, random frames: :func:`ivfast.data.sampling.plan_clip`) or, ``train_augment=off``, the
centre view; test views are ``test_clips`` temporal windows x ``test_crops`` spatial crops of the
short side (left/top, centre, right/bottom), the usual video-recognition protocol.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ivfast.data.index import DataError, build_index
from ivfast.data.pyav import decode_frames, crop_resize
from ivfast.data.sampling import ClipPlan, frame_window, plan_clip, sample_rng, segment_indices, stride_indices

log = logging.getLogger("ivfast.eval")


class LabelError(DataError):
    """Labels missing, non-contiguous, or inconsistent between train and val."""


def check_labels(train: list[int], val: list[int], num_classes: int = 0,
                 train_name: str = "train list", val_name: str = "val list") -> int:
    """Number of classes; raises a one-line LabelError naming the cause and the fix."""
    for name, labels in ((train_name, train), (val_name, val)):
        missing = [i for i, y in enumerate(labels) if y < 0]
        if missing:
            raise LabelError(f"{name}: {len(missing)} entries have no label (first at line {missing[0] + 1}); "
                             f"give each line a class index (CSV 'path,label' or the release's 6-field format)")
    if not train:
        raise LabelError(f"{train_name} is empty")
    classes = sorted(set(train))
    k = classes[-1] + 1
    if classes != list(range(k)):
        gaps = sorted(set(range(k)) - set(classes))[:10]
        raise LabelError(f"{train_name}: class indices are not contiguous 0..{k - 1} (no samples of {gaps}); "
                         f"renumber the labels or drop the empty classes")
    vclasses = sorted(set(val))
    if vclasses and (vclasses[-1] >= k or len(vclasses) != len(classes)):
        raise LabelError(f"class count differs: {train_name} has {len(classes)} classes (0..{k - 1}), "
                         f"{val_name} has {len(vclasses)} ({vclasses[0]}..{vclasses[-1]}); "
                         f"both lists must use the same label indices")
    if num_classes and num_classes != k:
        raise LabelError(f"num_classes={num_classes} but the lists have {k} classes; fix num_classes or the lists")
    return k


def _split_group(name: str) -> tuple[str, str]:
    """'name @group' -> ('name', 'group'); a name without a trailing @word has no group."""
    head, _, last = name.strip().rpartition(" ")
    if head and last.startswith("@") and len(last) > 1:
        return head.strip(), last[1:]
    return name.strip(), ""


def label_groups(path: str, num_classes: int) -> dict[str, list[int]]:
    """{group: class indices} from a text label map whose lines end with '@group' (for example
    the demo's '0 move_right @motion'); {} when no line names a group."""
    if not path or path.endswith(".json"):
        return {}
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(_read_names(path, num_classes)):
        g = _split_group(name)[1]
        if g:
            groups.setdefault(g, []).append(i)
    return groups


def read_label_map(path: str, num_classes: int) -> list[str]:
    """Class names from a file: JSON {index: name} / [names], or text lines 'index name' or 'name'
    (a trailing '@group' word puts the class in a group, see :func:`label_groups`)."""
    return [_split_group(n)[0] for n in _read_names(path, num_classes)]


def _read_names(path: str, num_classes: int) -> list[str]:
    if not path:
        return [str(i) for i in range(num_classes)]
    text = Path(path).read_text()
    names: dict[int, str] = {}
    if path.endswith(".json"):
        data = json.loads(text)
        names = {int(k): str(v) for k, v in (data.items() if isinstance(data, dict) else enumerate(data))}
    else:
        for i, line in enumerate(l for l in text.splitlines() if l.strip()):
            head, _, rest = line.strip().partition(" ")
            if head.isdigit() and rest:
                names[int(head)] = rest.strip()
            else:
                names[i] = line.strip()
    if sorted(names) != list(range(num_classes)):
        raise LabelError(f"label map {path} names classes {sorted(names)[:5]}... ({len(names)}), the lists have "
                         f"{num_classes} (0..{num_classes - 1}); give one name per class index")
    return [names[i] for i in range(num_classes)]


@dataclass
class ViewSpec:
    num_frames: int
    size: int
    sampling: str = "segment"
    stride: int = 4
    test_clips: int = 1
    test_crops: int = 1
    scales: tuple = (1.0, 0.875, 0.75, 0.66)
    flip: bool = True

    def key(self) -> dict:
        return {"num_frames": self.num_frames, "size": self.size, "sampling": self.sampling, "stride": self.stride,
                "test_clips": self.test_clips, "test_crops": self.test_crops}


def _window_frames(first: int, last: int, spec: ViewSpec, clip: int, clips: int) -> np.ndarray:
    """Frame indices of temporal view ``clip`` of ``clips``: equal sub-windows of [first, last)."""
    n = last - first
    if spec.sampling == "segment":
        if clips == 1:
            return segment_indices(first, last, spec.num_frames, None)
        # segment sampling with the within-segment position moved across views (as VideoMAE's test)
        edges = np.arange(spec.num_frames + 1) * n / spec.num_frames
        pos = edges[:-1] + (edges[1:] - edges[:-1]) * (clip + 0.5) / clips
        return first + np.clip(np.floor(pos).astype(np.int64), 0, n - 1)
    span = (spec.num_frames - 1) * spec.stride + 1
    room = max(0, n - span)
    start = int(round(room * (clip + 0.5) / clips)) if clips > 1 else room // 2   # centres of equal parts
    start = min(max(start, 0), room)
    return first + np.minimum(start + np.arange(spec.num_frames) * spec.stride, n - 1)


def _crop(width: int, height: int, crop: int, crops: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    slack_x, slack_y = width - side, height - side
    frac = 0.5 if crops == 1 else crop / (crops - 1)
    return int(round(slack_x * frac)), int(round(slack_y * frac)), side, side


class LabelledClips(torch.utils.data.Dataset):
    """Items: (clip [V, 3, T, S, S] uint8, label, sample id). ``mode`` 'train' (1 augmented view, new
    each epoch), 'center' (1 centre view) or 'test' (test_clips x test_crops views)."""

    def __init__(self, list_path: str, spec: ViewSpec, root: str = "", mode: str = "test", seed: int = 0,
                 workers: int = 1):
        if mode not in ("train", "center", "test"):
            raise ValueError(f"mode must be train, center or test, got {mode!r}")
        if not list_path:
            raise DataError("no list given: set train_list and val_list (CSV 'path,label' or the release format)")
        self.index = build_index(list_path, root, workers=workers)
        bad = [(i.path, i.error) for i in self.index.infos if not i.ok]
        if bad:
            raise DataError(f"{len(bad)} videos in {list_path} cannot be decoded (e.g. {bad[:3]}); evaluation does "
                            f"not skip files (it would change the number): fix or remove them "
                            f"(python -m ivfast.data inspect {list_path})")
        self.labels = [e.label for e in self.index.entries]
        self.spec, self.mode, self.seed, self.epoch = spec, mode, seed, 0
        self.list_path = list_path

    def __len__(self):
        return len(self.index)

    @property
    def num_views(self) -> int:
        return self.spec.test_clips * self.spec.test_crops if self.mode == "test" else 1

    def plans(self, sid: int) -> list[ClipPlan]:
        e, info, s = self.index.entries[sid], self.index.infos[sid], self.spec
        if self.mode == "train":
            return [plan_clip(num_frames_video=info.frames, fps=info.fps, width=info.width, height=info.height,
                              num=s.num_frames, out_size=s.size, mode=s.sampling, stride=s.stride,
                              scales=list(s.scales), flip=s.flip, train=True,
                              rng=sample_rng(self.seed, self.epoch, sid), start_sec=e.start_sec, end_sec=e.end_sec)]
        first, last = frame_window(info.frames, info.fps, e.start_sec, e.end_sec)
        clips, crops = (s.test_clips, s.test_crops) if self.mode == "test" else (1, 1)
        return [ClipPlan(_window_frames(first, last, s, c, clips), _crop(info.width, info.height, k, crops), False)
                for c in range(clips) for k in range(crops)]

    def __getitem__(self, sid: int):
        plans = self.plans(sid)
        wanted = np.unique(np.concatenate([p.frames for p in plans]))
        frames = decode_frames(self.index.infos[sid].path, wanted)       # decode each frame once for all views
        where = {int(f): i for i, f in enumerate(wanted)}
        views = [crop_resize(frames[[where[int(f)] for f in p.frames]], p, self.spec.size) for p in plans]
        return torch.stack(views), self.labels[sid], sid


def shard(n: int, rank: int, world: int) -> list[int]:
    """Contiguous-free round-robin shard of range(n) for a rank (every id exactly once over ranks)."""
    return list(range(rank, n, world))


def make_loader(ds: LabelledClips, batch: int, ids: list[int], workers: int, shuffle_seed: int | None = None):
    order = list(ids)
    if shuffle_seed is not None:
        order = [order[i] for i in np.random.default_rng(shuffle_seed).permutation(len(order))]
    return torch.utils.data.DataLoader(torch.utils.data.Subset(ds, order), batch_size=batch, shuffle=False,
                                       num_workers=workers, collate_fn=_collate)


def _collate(items):
    return (torch.stack([v for v, _, _ in items]), torch.tensor([y for _, y, _ in items]),
            torch.tensor([i for _, _, i in items]))
