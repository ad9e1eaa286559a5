"""Evaluate on a streamed image folder (the ImageNet pipeline): the single centre crop, its flip,
10-crop testing and fully-convolutional multi-scale testing (He et al. 2015, section 3.4).

- "none" / "flip": the centre crop; flip averages the logits with the mirror's (as `evaluate`).
- "10crop": the softmax scores of the 4 corner + centre crops and their mirrors, averaged.
- "multiscale": the whole image with its shorter side at each of MULTISCALE_SIDES, and its mirror,
  fed to the network as it is (the global average pool makes any size work); softmax scores
  averaged over scales and flips.
The loss is the cross-entropy of the averaged scores (of the averaged logits for none/flip).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from resnetlab.data.augment import tta_logits
from resnetlab.data.imagenet import (EvalTransform, FolderDataset, FolderSplit, _collate_lists, data_loader,
                                     normalize_any_size, worker_batches)
from resnetlab.data.normalize import Normalizer
from resnetlab.errors import DataError, ResnetlabError
from resnetlab.evaluate import DEFAULT_TOPK, EvalResult, autocast_context, topk_correct

STREAM_TTA_MODES = ("none", "flip", "flip-shift", "10crop", "multiscale")


def crop_scores(model: torch.nn.Module, crops: torch.Tensor) -> torch.Tensor:
    """Normalised crops N x K x C x H x W -> the mean over the K crops of the softmax scores (N x classes)."""
    n, k = crops.shape[:2]
    probs = model(crops.flatten(0, 1)).float().softmax(dim=1)
    return probs.view(n, k, -1).mean(dim=1)


def multiscale_scores(model: torch.nn.Module, views: Sequence[torch.Tensor], normalizer: Normalizer) -> torch.Tensor:
    """One image at several sizes (uint8 C x H_s x W_s each) -> its softmax scores averaged over the
    sizes and their mirrors (a vector of classes)."""
    total = 0
    for view in views:
        x = normalize_any_size(normalizer, view[None])
        total = total + model(torch.cat([x, x.flip(3)])).float().softmax(dim=1).sum(dim=0)
    return total / (2 * len(views))


def stream_batches(split: FolderSplit, tta: str, *, resize: int, crop: int, batch_size: int, workers: int = 0,
                   pin: bool = False, scales: Sequence[int] | None = None):
    """(uint8 views, labels) batches of `split` as `tta` needs them: N x 3 x crop x crop (none, flip),
    N x 10 x 3 x crop x crop (10crop; `batch_size` counts crops, so N = batch_size // 10), or a list
    of one image's whole views (multiscale: one image per batch, its sizes differ)."""
    mode = {"none": "center", "flip": "center"}.get(tta, tta)
    transform = EvalTransform(mode, resize, crop, **({"scales": tuple(scales)} if scales else {}))
    multiscale = mode == "multiscale"
    images_per_batch = 1 if multiscale else max(1, batch_size // 10) if mode == "10crop" else batch_size
    loader = data_loader(FolderDataset(split, transform), batch_size=images_per_batch,
                         workers=workers, pin=pin, collate_fn=_collate_lists if multiscale else None)
    return worker_batches(loader)


@torch.inference_mode()
def evaluate_stream(
    model: torch.nn.Module,
    batches: Iterable,
    normalizer: Normalizer,
    *,
    tta: str = "none",
    device: str | torch.device | None = None,
    precision: str = "fp32",
    num_classes: int,
    topk: Sequence[int] = DEFAULT_TOPK,
) -> EvalResult:
    """Evaluate `model` on batches from `stream_batches` (the same `tta`); the model's mode is restored."""
    if tta not in STREAM_TTA_MODES:
        raise ResnetlabError(f"tta must be one of {', '.join(STREAM_TTA_MODES)}, got {tta!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros(len(topk), dtype=torch.int64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    n = 0
    was_training = model.training
    model.eval()
    try:
        for views, labels in batches:
            if int(labels.min()) < 0 or int(labels.max()) >= num_classes:  # CPU labels: no device sync
                low, high = int(labels.min()), int(labels.max())
                raise DataError(f"labels must lie in [0, {num_classes}), got [{low}, {high}]")
            y = labels.to(device, non_blocking=True)
            with autocast_context(device, precision):
                scores, are_probs = _scores(model, views, normalizer, tta, device)
            loss_sum += (F.nll_loss(scores.clamp_min(1e-12).log(), y, reduction="sum") if are_probs
                         else F.cross_entropy(scores, y, reduction="sum"))
            correct += topk_correct(scores, y, topk)
            confusion.scatter_add_(0, y * num_classes + scores.argmax(dim=1), torch.ones_like(y))
            n += len(y)
    finally:
        model.train(was_training)
    if n == 0:
        raise DataError("nothing to evaluate: the data set is empty")
    correct_host = correct.cpu().tolist()
    return EvalResult(n=n, loss=float(loss_sum.cpu()) / n,
                      topk_errors={k: (n - c) / n for k, c in zip(topk, correct_host)},
                      confusion=confusion.view(num_classes, num_classes).cpu())


def _scores(model, views, normalizer: Normalizer, tta: str, device) -> tuple[torch.Tensor, bool]:
    """(N x classes scores, whether they are probabilities rather than logits)."""
    if tta == "multiscale":
        scores = [multiscale_scores(model, [v.to(device) for v in image], normalizer) for image in views]
        return torch.stack(scores), True
    x = views.to(device, non_blocking=True)
    if tta == "10crop":
        n, k = x.shape[:2]
        crops = normalizer(x.flatten(0, 1)).unflatten(0, (n, k))
        return crop_scores(model, crops), True
    x = normalizer(x)
    return tta_logits(model, x, tta).float(), False
