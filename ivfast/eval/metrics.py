"""Accuracy, per-class accuracy, confusion matrix and its PNG (PIL only; no matplotlib)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent; k larger than the class count counts as the class count."""
    out = {}
    for k in ks:
        kk = min(k, scores.shape[1])
        hit = (scores.topk(kk, dim=1).indices == labels[:, None]).any(1).float().mean().item()
        out[f"top{k}"] = 100.0 * hit
    return out


def confusion(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """[true, predicted] counts."""
    m = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(m, (labels.cpu().numpy(), pred.cpu().numpy()), 1)
    return m


def per_class_accuracy(cm: np.ndarray) -> list[float | None]:
    """Percent correct per true class; None for a class with no val samples."""
    rows = cm.sum(1)
    return [None if r == 0 else 100.0 * cm[i, i] / r for i, r in enumerate(rows)]


def save_confusion_png(cm: np.ndarray, path: str | Path, names: list[str] | None = None, cell: int = 0) -> Path:
    """Row-normalised confusion matrix as a PNG: white (0) to dark blue (1), true classes as rows.
    Class names are drawn when there are few enough classes to read them."""
    from PIL import Image, ImageDraw

    n = cm.shape[0]
    cell = cell or max(2, min(32, 800 // max(1, n)))
    frac = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    rgb = np.stack([255 - 235 * frac, 255 - 190 * frac, 255 - 80 * frac], -1).astype(np.uint8)
    grid = np.repeat(np.repeat(rgb, cell, 0), cell, 1)
    label_w = 110 if names and n <= 40 else 0
    img = Image.new("RGB", (label_w + grid.shape[1], label_w + grid.shape[0]), "white")
    img.paste(Image.fromarray(grid), (label_w, label_w))
    if label_w:
        draw = ImageDraw.Draw(img)
        for i, name in enumerate(names):
            y = label_w + i * cell + max(0, cell // 2 - 5)
            draw.text((2, y), str(name)[:16], fill="black")                   # rows: true class
            draw.text((label_w + i * cell + 1, 2 + (i % 8) * 12), str(i), fill="black")   # columns: index
        draw.text((2, 2), "rows=true\ncols=pred", fill="gray")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def bootstrap_ci(correct, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI (percent) of top-1 over val clips; ``correct`` is [n] or
    [seeds, n] 0/1 (several probe seeds: a clip's score is its mean over seeds)."""
    c = np.asarray(correct, np.float64)
    c = c.mean(0) if c.ndim == 2 else c
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(c), (n_boot, len(c)))
    means = 100.0 * c[idx].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def gain_ci(a, b, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Top-1 gain of arm ``a`` over arm ``b`` (percent points) with a two-level bootstrap CI.

    ``a`` [Sa, n] and ``b`` [Sb, n] are 0/1 correctness of runs (seeds: random inits, probe
    seeds) over the SAME n val clips. Each replicate resamples the clips (paired across arms) and,
    independently per arm, the runs, so both the val-set and the seed-to-seed spread count."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"gain_ci needs [runs, clips] arrays over the same clips, got {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    n = a.shape[1]
    gains = np.empty(n_boot)
    for r in range(n_boot):
        clips = rng.integers(0, n, n)
        ra = rng.integers(0, a.shape[0], a.shape[0])
        rb = rng.integers(0, b.shape[0], b.shape[0])
        gains[r] = 100.0 * (a[ra][:, clips].mean() - b[rb][:, clips].mean())
    q = (1 - level) / 2
    return {"gain": float(100.0 * (a.mean() - b.mean())),
            "ci": [float(np.quantile(gains, q)), float(np.quantile(gains, 1 - q))], "level": level,
            "runs": [int(a.shape[0]), int(b.shape[0])], "clips": int(n)}


def gains_by_group(a, b, labels, groups: dict[str, list[int]], **kw) -> dict[str, dict]:
    """:func:`gain_ci` over all val clips ("all") and over each group's clips; ``labels`` are the
    val clips' classes, ``groups`` {group: classes} (``ivfast.eval.data.label_groups``)."""
    out = {"all": gain_ci(a, b, **kw)}
    for group, classes in groups.items():
        m = [i for i, y in enumerate(labels) if y in classes]
        out[group] = gain_ci([[row[i] for i in m] for row in a], [[row[i] for i in m] for row in b], **kw)
    return out
