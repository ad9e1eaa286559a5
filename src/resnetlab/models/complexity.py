"""Parameter and multiply-add counts. Counting on the meta device allocates nothing and takes
milliseconds even for resnet1202/resnet152, so the CLI and the tests build models there."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """All parameters (trainable or not); buffers such as BN running stats are not parameters."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: Sequence[int]) -> int:
    """Forward multiply-adds for one input of `input_size` (C, H, W), or for a batch when given
    (N, C, H, W), counted by `torch.utils.flop_counter` (convolutions and the classifier, as the
    paper counts; one multiply-add = 2 FLOPs). Runs in eval mode on the model's own device and
    dtype (meta works), then restores the training flag, so BN running stats are left untouched."""
    shape = tuple(input_size) if len(input_size) == 4 else (1, *input_size)
    first = next(model.parameters())
    x = torch.zeros(shape, device=first.device, dtype=first.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def complexity(name: str, **options: Any) -> dict[str, Any]:
    """Params and forward MACs of a registered model at its native input size, counted on the
    meta device: {"params", "macs", "input_size"}."""
    from resnetlab.models.factory import create_model

    with torch.device("meta"):
        model = create_model(name, **options)
    input_size = model.default_cfg["input_size"]
    return {"params": count_params(model), "macs": count_macs(model, input_size), "input_size": input_size}
