"""Assemble a Trainer from a config: runtime, seeded model, optimizer, schedule, EMA."""
from __future__ import annotations

from resnetlab.config import RunConfig
from resnetlab.engine.bn import bn_layers
from resnetlab.engine.data import TrainData
from resnetlab.engine.ema import EMA
from resnetlab.engine.loop import Trainer
from resnetlab.engine.optim import build_optimizer
from resnetlab.engine.runtime import resolve_runtime, seed_everything
from resnetlab.engine.schedules import Schedule, WarmupController
from resnetlab.errors import ConfigError


def resolved_config(config: RunConfig) -> RunConfig:
    """The config with the runtime's "auto" values replaced by what this machine gives, so the
    saved config.json says exactly how the run computed."""
    runtime = resolve_runtime(config.runtime)
    return config.replace(**{
        "runtime.device": str(runtime.device), "runtime.precision": runtime.precision,
        "runtime.channels_last": runtime.channels_last,
    })


def build_trainer(config: RunConfig, data: TrainData) -> Trainer:
    from resnetlab.models import create_model

    runtime = resolve_runtime(config.runtime)
    seed_everything(config.train.seed)  # the model's initial weights follow from the seed
    num_classes = config.model.num_classes or data.num_classes
    if num_classes < data.num_classes:
        raise ConfigError(f"invalid value for 'model.num_classes': {num_classes}, but the data have {data.num_classes} classes")
    model, forward = runtime.prepare(create_model(config.model.name, num_classes=num_classes, **config.model.options))
    optimizer = build_optimizer(model, config.optim)
    schedule = Schedule(config.schedule, config.optim.lr, data.total_steps, data.steps_per_epoch)
    ema = EMA(model, config.train.ema_decay) if config.train.ema_decay else None
    return Trainer(
        cfg=config, model=model, forward=forward, optimizer=optimizer, schedule=schedule,
        warmup=WarmupController(schedule), runtime=runtime, scaler=runtime.grad_scaler(),
        bn_layers=bn_layers(model), ema=ema,
    )  # fmt: skip
