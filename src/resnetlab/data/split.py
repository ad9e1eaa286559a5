"""The honest validation split: carved from the training images, class-stratified, seeded."""
from __future__ import annotations

import numpy as np
import torch

from resnetlab.errors import DataError


def stratified_split(labels: torch.Tensor, val_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (sorted, int64) of the training and validation parts of `labels`.

    Each class gives val_size * n_class / n images (largest remainders round, so the total is exactly
    val_size): 5000 of CIFAR-10's 50,000 is 500 per class. Same labels + seed -> same split, on any
    machine and numpy version (the legacy RandomState stream is frozen by NEP 19).
    """
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu().numpy()
    total = labels.size
    if not 0 <= val_size < max(total, 1):
        raise DataError(f"val_size must be between 0 and {total - 1} (the training images), got {val_size}")
    if val_size == 0:
        return torch.arange(total), torch.empty(0, dtype=torch.int64)
    counts = np.bincount(labels)
    quotas = _apportion(counts, val_size)
    rng = np.random.RandomState(seed)
    by_class = np.argsort(labels, kind="stable")  # indices of class 0, then class 1, ...
    starts = np.concatenate([[0], np.cumsum(counts)])
    val_mask = np.zeros(total, dtype=bool)
    for cls, quota in enumerate(quotas):
        members = by_class[starts[cls] : starts[cls + 1]]
        val_mask[members[rng.permutation(len(members))[:quota]]] = True
    return torch.from_numpy(np.flatnonzero(~val_mask)), torch.from_numpy(np.flatnonzero(val_mask))


def _apportion(counts: np.ndarray, size: int) -> list[int]:
    """Largest-remainder rounding of size * counts / counts.sum() (ties go to the lower class)."""
    exact = counts * size / counts.sum()
    quotas = np.floor(exact).astype(np.int64)
    short = size - int(quotas.sum())
    order = np.lexsort((np.arange(len(counts)), -(exact - quotas)))  # largest remainder first
    quotas[order[:short]] += 1
    return quotas.tolist()
