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
