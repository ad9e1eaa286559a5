"""The training loop, written out step by step: lr, momentum and BN momentum come from the pure
schedules each step; metrics are summed on the device and read back only at log intervals and at
the end of an epoch, so a GPU never waits for the host between steps."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.config import RunConfig
from resnetlab.engine.bn import bn_momentum_at, set_bn_momentum
from resnetlab.engine.ema import EMA
from resnetlab.engine.optim import set_lr, set_momentum
from resnetlab.engine.runtime import Runtime
from resnetlab.engine.schedules import Schedule, WarmupController
from resnetlab.errors import DivergenceError


class Meter:
    """Sums of loss and top-1 errors on the device (the image count on the host, where it is known
    without a sync); `read()` is the only host sync."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # sum of loss * n, errors
        self.count = 0

    def add(self, mean_loss: torch.Tensor, errors: torch.Tensor, n: int) -> None:
        self.sums += torch.stack([mean_loss.detach().double() * n, errors.double()])
        self.count += n

    def read(self) -> tuple[float, float, int]:
        """(mean loss, top-1 error, images); NaN for an empty meter."""
        if not self.count:
            return math.nan, math.nan, 0
        loss_sum, errors = self.sums.tolist()
        return loss_sum / self.count, errors / self.count, self.count

    def reset(self) -> None:
        self.sums.zero_()
        self.count = 0


@dataclass
class Trainer:
    """What one training step touches. `step` counts optimizer steps since the start of the run."""

    cfg: RunConfig
    model: nn.Module  # the module whose weights are saved
    forward: nn.Module  # model, or its torch.compile wrapper
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    warmup: WarmupController
    runtime: Runtime
    scaler: torch.amp.GradScaler
    bn_layers: list
    ema: EMA | None = None
    step: int = 0
    lr: float = 0.0
    epoch_meter: Meter = field(init=False)
    interval_meter: Meter = field(init=False)

    def __post_init__(self) -> None:
        self.epoch_meter = Meter(self.runtime.device)
        self.interval_meter = Meter(self.runtime.device)

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def train_step(self, x: torch.Tensor, y: torch.Tensor, batch_in_epoch: int) -> None:
        step = self.step
        self.lr = self.schedule.lr_at(step, self.warmup.done_at_step)
        set_lr(self.optimizer, self.lr)
        momentum = self.schedule.momentum_at(step)
        if momentum is not None:
            set_momentum(self.optimizer, momentum)
        if self.cfg.bn.policy == "dynamic" and batch_in_epoch == 0:
            start_dynamic_bn_epoch(self.bn_layers)

        with self.runtime.autocast():
            logits = self.forward(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.train.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update()

        errors = (logits.detach().argmax(dim=1) != y).sum()
        self.epoch_meter.add(loss, errors, len(y))
        self.interval_meter.add(loss, errors, len(y))
        if self.warmup.needs_error(step):  # one sync per step, only during an until-error warm-up
            self.warmup.update(step, errors.item() / len(y))
        self.step += 1


def start_dynamic_bn_epoch(layers: list) -> None:
    """BN momentum 1/(1+n) for the n-th batch of the epoch, n counted from 0. torch's momentum=None
    uses 1/num_batches_tracked after incrementing it, which is exactly 1/(1+n) once the counter is
    zeroed at the start of the epoch; as the counter is a buffer (not a Python number), a compiled
    model is not recompiled for each new value."""
    for layer in layers:
        layer.momentum = None
        layer.num_batches_tracked.zero_()


@dataclass
class EpochResult:
    completed: bool  # False: stopped early (stop request); the epoch is to be continued
    seconds: float
    images: int


def run_epoch(
    trainer: Trainer,
    loader,
    epoch: int,
    *,
    start_batch: int = 0,
    total_steps: int,
    on_log: Callable[[], None],
    on_step: Callable[[int], bool],
    progress=None,
) -> EpochResult:
    """Train one epoch (from `start_batch` when resuming inside it). `on_log` runs every
    log_every_steps; `on_step(batch_done)` runs after each step and returns True to stop."""
    loader.set_epoch(epoch)
    log_every = trainer.cfg.train.log_every_steps
    images, start = 0, time.perf_counter()
    for batch_in_epoch, (x, y) in enumerate(loader):
        if batch_in_epoch < start_batch:
            continue  # the loader's batches are a function of (seed, epoch): skip to where we were
        if trainer.step >= total_steps:
            break
        trainer.train_step(x, y, batch_in_epoch)
        images += len(y)
        if progress is not None:
            progress.update(1)
        if trainer.step % log_every == 0:
            on_log()
        if on_step(batch_in_epoch + 1):
            return EpochResult(False, time.perf_counter() - start, images)
    return EpochResult(True, time.perf_counter() - start, images)


def check_finite(value: float, what: str, step: int) -> None:
    if not math.isfinite(value):
        raise DivergenceError(f"training diverged: the {what} became {value} by step {step}")


def default_bn_momentum(trainer: Trainer) -> None:
    """Set at the start (and on resume): the fixed momentum, or None (cumulative average, see
    `start_dynamic_bn_epoch`) for the dynamic policy."""
    dynamic = trainer.cfg.bn.policy == "dynamic"
    set_bn_momentum(trainer.bn_layers, None if dynamic else bn_momentum_at(0, trainer.cfg.bn))
