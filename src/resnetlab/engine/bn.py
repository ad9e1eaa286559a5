"""Batch-norm momentum policies and re-estimation of the running statistics.

torch's convention throughout: momentum is the weight of the new batch,
running = (1 - momentum) * running + momentum * batch.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from torch import nn

from resnetlab.config import BNSection


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def bn_momentum_at(batch_in_epoch: int, cfg: BNSection) -> float:
    """The momentum for the `batch_in_epoch`-th batch of an epoch (0-based, so n = batches seen
    before it). "dynamic" (seed 000) is 1/(1+n): the first batch replaces the statistics and the
    k-th averages in with weight 1/k, so after each batch the running stats are the plain average
    of this epoch's batch statistics."""
    if cfg.policy == "dynamic":
        return 1.0 / (1 + batch_in_epoch)
    return cfg.momentum


def set_bn_momentum(layers: Iterable[nn.Module], momentum: float | None) -> None:
    for layer in layers:
        layer.momentum = momentum


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[torch.Tensor], autocast: Callable | None = None) -> int:
    """Recompute every BN layer's running mean/var as the average over `batches` of inputs (for
    example one pass over the training set), with the model's weights fixed. Uses momentum=None,
    torch's cumulative moving average. Returns the number of batches used."""
    layers = bn_layers(model)
    if not layers:
        return 0
    saved = [layer.momentum for layer in layers]
    was_training = model.training
    for layer in layers:
        layer.reset_running_stats()
    set_bn_momentum(layers, None)
    model.train()
    count = 0
    try:
        for x in batches:
            with autocast() if autocast is not None else contextlib.nullcontext():
                model(x)
            count += 1
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum
        model.train(was_training)
    return count
