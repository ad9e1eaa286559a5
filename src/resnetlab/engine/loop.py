"""The training loop, written out step by step: lr, momentum and BN momentum come from the pure
schedules each step; metrics are summed on the device and read back only at log intervals and at
the end of an epoch, so a GPU never waits for the host between steps. With several processes
(engine.distributed) the forward module is DistributedDataParallel and the meters sum over ranks."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.config import RunConfig
from resnetlab.engine.bn import bn_momentum_at, set_bn_momentum
from resnetlab.engine.distributed import SINGLE, DistInfo, all_reduce_sum_
from resnetlab.engine.ema import EMA
from resnetlab.engine.optim import set_lr, set_momentum
from resnetlab.engine.runtime import Runtime
from resnetlab.engine.schedules import PlateauController, Schedule, WarmupController
from resnetlab.errors import DivergenceError


class Meter:
    """Sums of loss and top-1 errors on the device (the image count on the host, where it is known
    without a sync); `read()` is the only host sync. With `reduce` (a sum over ranks, in place)
    `totals()` and `read()` are collectives: every rank calls them at the same step and gets the
    numbers of the global batch."""

    def __init__(self, device: torch.device, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # sum of loss * n, errors
        self.count = 0
        self.reduce = reduce

    @staticmethod
    def batch_sums(mean_loss: torch.Tensor, errors: torch.Tensor, n: int) -> torch.Tensor:
        """What `add` takes for one batch; computed once for all the meters it goes to (each op is a
        kernel launch on a GPU, outside the CUDA graphs)."""
        return torch.stack([mean_loss.detach().double() * n, errors.double()])

    def add(self, batch_sums: torch.Tensor, n: int) -> None:
        self.sums += batch_sums
        self.count += n

    def totals(self) -> tuple[torch.Tensor, int]:
        """(sums, images) over all ranks."""
        if self.reduce is None:
            return self.sums, self.count
        packed = self.reduce(torch.cat([self.sums, self.sums.new_tensor([float(self.count)])]))
        return packed[:2], int(packed[2].item())

    def read(self) -> tuple[float, float, int]:
        """(mean loss, top-1 error, images); NaN for an empty meter."""
        sums, count = self.totals()
        if not count:
            return math.nan, math.nan, 0
        loss_sum, errors = sums.tolist()
        return loss_sum / count, errors / count, count

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
    ddp: nn.Module | None = None  # the DistributedDataParallel wrapper inside `forward` (several processes)
    dist: DistInfo = SINGLE
    lr_scale: float = 1.0  # optim.lr_scaling's factor on every lr of the schedule
    plateau: PlateauController | None = None  # None: a new one for `schedule`
    step: int = 0
    lr: float = 0.0
    epoch_meter: Meter = field(init=False)
    interval_meter: Meter = field(init=False)

    def __post_init__(self) -> None:
        reduce = all_reduce_sum_ if self.dist.enabled else None
        if self.plateau is None:
            self.plateau = PlateauController(self.schedule)
        self.epoch_meter = Meter(self.runtime.device, reduce)
        self.interval_meter = Meter(self.runtime.device, reduce)

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def train_step(self, x: torch.Tensor, y: torch.Tensor, batch_in_epoch: int,
                   more: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> None:
        """One optimizer step on the batch (x, y), or on (x, y) and the micro-batches `more` (gradient
        accumulation). Each micro-batch's mean loss is weighted by its share of the step's images, so
        the summed gradient is the gradient of the step's mean loss, as one big batch gives it --
        exactly, but for BN, which normalises each micro-batch with its own statistics."""
        step = self.step
        self.lr = self.schedule.lr_at(step, self.warmup.done_at_step, self.plateau.decay_steps) * self.lr_scale
        set_lr(self.optimizer, self.lr)
        momentum = self.schedule.momentum_at(step)
        if momentum is not None:
            set_momentum(self.optimizer, momentum)
        if self.cfg.bn.policy == "dynamic" and batch_in_epoch == 0:
            start_dynamic_bn_epoch(self.bn_layers)

        batches = [(x, y), *more]
        images = sum(len(labels) for _, labels in batches)
        self.optimizer.zero_grad(set_to_none=True)
        if self.runtime.cuda_graphs:
            # A new iteration: the CUDA graphs may reuse the previous step's output memory (the
            # meters have already summed what they need of it, on the device).
            torch.compiler.cudagraph_mark_step_begin()
        errors = [self._micro_step(*batch, len(batch[1]) / images, sync=i == len(batches) - 1)
                  for i, batch in enumerate(batches)]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update()
        if self.warmup.needs_error(step):  # one sync per step, only during an until-error warm-up
            self.warmup.update(step, self._step_error(torch.stack(errors).sum(), images))
        self.step += 1

    def _micro_step(self, x: torch.Tensor, y: torch.Tensor, weight: float, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its top-1 error count. DDP averages the
        gradients over the ranks only in the backward pass of the step's last micro-batch."""
        skip_sync = self.ddp is not None and not sync
        with self.ddp.no_sync() if skip_sync else contextlib.nullcontext():
            with self.runtime.autocast():
                logits = self.forward(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.train.label_smoothing)
            self.scaler.scale(loss * weight).backward()
        errors = (logits.detach().argmax(dim=1) != y).sum()
        sums = Meter.batch_sums(loss, errors, len(y))
        self.epoch_meter.add(sums, len(y))
        self.interval_meter.add(sums, len(y))
        return errors

    def _step_error(self, errors: torch.Tensor, images: int) -> float:
        """The top-1 error of the step's global batch (every rank decides the warm-up alike)."""
        if not self.dist.enabled:
            return errors.item() / images
        packed = all_reduce_sum_(torch.stack([errors.double(), errors.new_tensor(images, dtype=torch.float64)]))
        return (packed[0] / packed[1]).item()


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
    """Train one epoch (from `start_batch` when resuming inside it; batches count optimizer steps).
    `on_log` runs every log_every_steps; `on_step(batch_done)` runs after each step and returns True
    to stop. `images` of the result counts this process's images."""
    loader.set_epoch(epoch)
    log_every = trainer.cfg.train.log_every_steps
    images, start = 0, time.perf_counter()
    train = trainer.cfg.train
    for batch_in_epoch, group in enumerate(step_batches(loader, train.accum_steps, train.drop_last)):
        if batch_in_epoch < start_batch:
            continue  # the loader's batches are a function of (seed, epoch): skip to where we were
        if trainer.step >= total_steps:
            break
        (x, y), *more = group
        if more:
            trainer.train_step(x, y, batch_in_epoch, more)
        else:
            trainer.train_step(x, y, batch_in_epoch)
        images += sum(len(labels) for _, labels in group)
        if progress is not None:
            progress.update(1)
        if trainer.step % log_every == 0:
            on_log()
        if on_step(batch_in_epoch + 1):
            return EpochResult(False, time.perf_counter() - start, images)
    return EpochResult(True, time.perf_counter() - start, images)


def step_batches(loader, accum_steps: int, drop_last: bool) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The loader's (micro-)batches grouped into optimizer steps of `accum_steps`; the epoch's last
    group is shorter when the epoch does not fill it, and left out with drop_last."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == accum_steps:
            yield group
            group = []
    if group and not drop_last:
        yield group


def check_finite(value: float, what: str, step: int) -> None:
    if not math.isfinite(value):
        raise DivergenceError(f"training diverged: the {what} became {value} by step {step}")


def default_bn_momentum(trainer: Trainer) -> None:
    """Set at the start (and on resume): the fixed momentum, or None (cumulative average, see
    `start_dynamic_bn_epoch`) for the dynamic policy."""
    dynamic = trainer.cfg.bn.policy == "dynamic"
    set_bn_momentum(trainer.bn_layers, None if dynamic else bn_momentum_at(0, trainer.cfg.bn))
