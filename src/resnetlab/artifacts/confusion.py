"""Confusion-matrix figure: rows are true classes, columns predicted ones, colour = share of the row."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import torch

from resnetlab.artifacts.checkpoint import write_bytes_atomic
from resnetlab.errors import ResnetlabError


def save_confusion_png(
    confusion: torch.Tensor, classes: Sequence[str], path: str | Path, title: str = "Confusion matrix"
) -> Path:
    """Draw `confusion` (counts, rows = truth) with class names on both axes and write a PNG
    atomically. Cells show counts when there are at most 20 classes."""
    # A bare Figure (no pyplot): no global backend state, no display needed, nothing to close.
    from matplotlib.figure import Figure

    counts = confusion.to(torch.int64).cpu()
    size = counts.shape[0]
    if counts.shape != (size, size) or len(classes) != size:
        raise ValueError(f"confusion {tuple(counts.shape)} does not match {len(classes)} class names")
    row_share = counts.double() / counts.sum(dim=1, keepdim=True).clamp_min(1)

    side = min(4 + 0.45 * size, 40)
    figure = Figure(figsize=(side + 1.5, side))
    axes = figure.subplots()
    image = axes.imshow(row_share.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of true class")
    ticks = range(size)
    axes.set_xticks(ticks, labels=list(classes), rotation=45, ha="right", rotation_mode="anchor")
    axes.set_yticks(ticks, labels=list(classes))
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    if size <= 20:
        for t in ticks:
            for p in ticks:
                colour = "white" if row_share[t, p] > 0.5 else "black"
                axes.text(p, t, str(int(counts[t, p])), ha="center", va="center", color=colour, fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    try:
        write_bytes_atomic(path, buffer.getvalue())
    except OSError as error:
        raise ResnetlabError(f"cannot write confusion matrix to {path}: {error.strerror or error}") from None
    return Path(path)
