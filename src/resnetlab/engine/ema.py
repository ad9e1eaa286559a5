"""Exponential moving average of the weights (Polyak averaging), evaluated instead of the raw model."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """shadow = decay_t * shadow + (1 - decay_t) * weights after every optimizer step, with
    decay_t = min(decay, (1 + t) / (10 + t)) so that early, random weights are forgotten quickly.
    BN running statistics are averaged alike (as timm's ModelEmaV2 and torch's AveragedModel with
    use_buffers=True do): statistics copied from the live model describe the live weights'
    activations, not the averaged weights', and that mismatch cost 1.7 points of validation accuracy
    on a 15-epoch ResNet-20 (README). Integer buffers (BN's batch counters) are copied."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        pairs = list(zip(self.module.parameters(), model.parameters()))
        float_buffers, self._copied = [], []
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            (float_buffers if mine.is_floating_point() else self._copied).append((mine, theirs))
        self._averaged = pairs + float_buffers

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        shadow, live = zip(*self._averaged)
        torch._foreach_lerp_(list(shadow), list(live), 1 - decay)
        if self._copied:  # one launch for all BN counters, not one each (they add up on a GPU)
            mine, theirs = zip(*self._copied)
            torch._foreach_copy_(list(mine), list(theirs))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = updates
