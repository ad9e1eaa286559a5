"""Evaluate a classifier on in-memory uint8 images: top-k errors, loss, per-class accuracy and the
confusion matrix, optionally with flip test-time augmentation.

Everything is accumulated on the evaluation device and read back once at the end, so a GPU never
waits for the host between batches (no `.item()` per batch).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from resnetlab.data.augment import PADDING_MODES, tta_logits
from resnetlab.errors import DataError, ResnetlabError

TTA_MODES = ("none", "flip", "flip-shift")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_TOPK = (1, 3, 5)


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one evaluation. Errors are fractions in [0, 1]; `confusion[t, p]` counts images of
    true class t predicted as p (rows: truth, columns: prediction)."""

    n: int
    loss: float
    topk_errors: dict[int, float]
    confusion: torch.Tensor

    @property
    def top1_error(self) -> float:
        return self.topk_errors[1]

    @property
    def top3_error(self) -> float:
        return self.topk_errors[3]

    @property
    def top5_error(self) -> float:
        return self.topk_errors[5]

    @property
    def per_class_accuracy(self) -> list[float]:
        """Top-1 accuracy of each true class; NaN for a class with no images."""
        counts = self.confusion.sum(dim=1).double()
        hits = self.confusion.diagonal().double()
        return [h / c if c else math.nan for h, c in zip(hits.tolist(), counts.tolist())]

    def summary(self) -> dict:
        """The five numbers `resnetlab eval --json` prints."""
        return {
            "top1_error": self.topk_errors[1],
            "top3_error": self.topk_errors[3],
            "top5_error": self.topk_errors[5],
            "loss": self.loss,
            "n": self.n,
        }


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Number of rows whose label is among the k highest scores, for each k (a device tensor).
    A k larger than the number of classes counts every row as correct."""
    kmax = min(max(ks), scores.shape[1])
    hits = scores.topk(kmax, dim=1).indices == labels[:, None]  # at most one True per row
    cumulative = hits.cumsum(dim=1).sum(dim=0)  # cumulative[j]: rows correct within top j+1
    return torch.stack([cumulative[min(k, kmax) - 1] for k in ks])


def autocast_context(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise ResnetlabError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    images_uint8: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    normalizer: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    tta: str = "none",
    shift_padding: str = "zeros",
    precision: str = "fp32",
    num_classes: int | None = None,
    topk: Sequence[int] = DEFAULT_TOPK,
) -> EvalResult:
    """Evaluate `model` on `images_uint8` (N, 3, H, W) with integer `labels` (N,).

    `normalizer` maps a uint8 batch on the device to the float input of the model. `device=None`
    uses the model's device; otherwise the model is moved there. The model is put in eval mode for
    the call and its previous mode restored. `tta="flip"` averages the *logits* of each image and of
    its horizontal mirror, `"flip-shift"` of 10 views (those two, each also shifted one pixel along
    the four diagonals, the border filled as `shift_padding` pads: the model's training padding_mode);
    ranks and the cross-entropy loss are taken from that average.
    `precision` "bf16"/"fp16" runs the forward pass under autocast; metrics are computed in fp32.
    """
    if tta not in TTA_MODES:
        raise ResnetlabError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    if shift_padding not in PADDING_MODES:
        raise ResnetlabError(f"shift_padding must be one of {', '.join(PADDING_MODES)}, got {shift_padding!r}")
    images = torch.as_tensor(images_uint8)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if images.ndim != 4 or images.shape[0] != labels.shape[0]:
        raise DataError(f"expected images (N, C, H, W) and N labels, got {tuple(images.shape)} and {tuple(labels.shape)}")
    if images.shape[0] == 0:
        raise DataError("nothing to evaluate: the data set is empty")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    num_classes = num_classes or _output_width(model, images[:1].to(device), normalizer)
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise DataError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")

    # uint8 images are small (CIFAR's 10k test images: 30 MB): one transfer instead of one per batch.
    images, labels = images.to(device), labels.to(device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros(len(topk), dtype=torch.int64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, images.shape[0], batch_size):
            x = normalizer(images[start : start + batch_size])
            y = labels[start : start + batch_size]
            with autocast_context(device, precision):
                logits = tta_logits(model, x, tta, shift_padding).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += topk_correct(logits, y, topk)
            # scatter_add_ instead of bincount: CUDA bincount reads the max back to the host.
            confusion.scatter_add_(0, y * num_classes + logits.argmax(dim=1), torch.ones_like(y))
    finally:
        model.train(was_training)

    n = images.shape[0]
    correct_host = correct.cpu().tolist()
    return EvalResult(
        n=n,
        loss=float(loss_sum.cpu()) / n,
        topk_errors={k: (n - c) / n for k, c in zip(topk, correct_host)},
        confusion=confusion.view(num_classes, num_classes).cpu(),
    )


def _output_width(model: torch.nn.Module, one_image: torch.Tensor, normalizer) -> int:
    was_training = model.training
    model.eval()
    try:
        return int(model(normalizer(one_image)).shape[1])
    finally:
        model.train(was_training)
