"""One training step exactly as `resnetlab train` runs it: the engine's Trainer (built by the
engine's own `build_trainer` from a RunConfig, so precision, channels_last, compile and the
optimizer are resolved the same way) fed by the engine's InMemoryLoader over synthetic data."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from resnetlab.config import RunConfig
from resnetlab.data import InMemoryLoader, compute_normalizer
from resnetlab.engine.data import augment_spec
from resnetlab.engine.loop import default_bn_momentum
from resnetlab.engine.setup import build_trainer, resolved_config
from resnetlab.errors import DivergenceError


def bench_run_config(cfg) -> RunConfig:
    """The default training config (the paper's recipe) with the benchmark's model, batch and
    runtime; "auto" values resolved for this machine."""
    changes = {"model.name": cfg.model, "train.batch_size": cfg.batch_size, "train.drop_last": True,
               "train.seed": cfg.seed, "runtime.device": cfg.device, "runtime.precision": cfg.precision,
               "runtime.compile": cfg.compile, "runtime.compile_mode": cfg.compile_mode}
    if cfg.channels_last is not None:
        changes["runtime.channels_last"] = cfg.channels_last
    if cfg.fused_bn is not None:
        changes["runtime.fused_bn"] = cfg.fused_bn
    if cfg.winograd is not None:
        changes["runtime.conv_winograd"] = cfg.winograd
    return resolved_config(RunConfig().replace(**changes))


@dataclass
class _SyntheticData:
    """What build_trainer reads of engine.data.TrainData."""

    loader: InMemoryLoader
    num_classes: int
    steps_per_epoch: int
    total_steps: int


class EngineStepper:
    """`step()` takes the next batch from the loader (a new epoch when one ends), or the next
    train.accum_steps micro-batches, and runs `Trainer.train_step` on it."""

    def __init__(self, config: RunConfig, images: torch.Tensor, labels: torch.Tensor, num_classes: int):
        runtime = config.runtime
        self.accum_steps = config.train.accum_steps
        loader = InMemoryLoader(
            images, labels, batch_size=config.train.batch_size // self.accum_steps, shuffle=True, drop_last=True, seed=config.train.seed,
            device=runtime.device, normalizer=compute_normalizer(images, config.data.normalization),
            augment=augment_spec(config), channels_last=runtime.channels_last is True,
        )  # fmt: skip
        data = _SyntheticData(loader, num_classes, len(loader) // self.accum_steps, total_steps=10**9)
        self.trainer = build_trainer(config, data)
        default_bn_momentum(self.trainer)
        self.batches = self._endless(loader)

    @staticmethod
    def _endless(loader: InMemoryLoader):
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from enumerate(loader)
            epoch += 1

    def step(self) -> None:
        batch, (x, y) = next(self.batches)
        more = [next(self.batches)[1] for _ in range(self.accum_steps - 1)]
        self.trainer.train_step(x, y, batch // self.accum_steps, more)

    def check_finite(self) -> None:
        loss, _, _ = self.trainer.epoch_meter.read()
        if not math.isfinite(loss):
            raise DivergenceError(f"the benchmark's training loss became {loss}")
