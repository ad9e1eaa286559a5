"""Assemble a Trainer from a config: runtime, seeded model, optimizer, schedule, EMA, and with
several processes SyncBN and the DistributedDataParallel wrapper."""
from __future__ import annotations

import math

from resnetlab.config import OptimSection, RunConfig
from resnetlab.engine.bn import bn_layers
from resnetlab.engine.data import TrainData
from resnetlab.engine.distributed import SINGLE, DistInfo, convert_sync_bn, device_for_rank, wrap_ddp
from resnetlab.engine.ema import EMA
from resnetlab.engine.loop import Trainer
from resnetlab.engine.optim import build_optimizer
from resnetlab.engine.runtime import resolve_runtime, seed_everything
from resnetlab.engine.schedules import PlateauController, Schedule, WarmupController
from resnetlab.errors import ConfigError


def resolved_config(config: RunConfig, dist: DistInfo = SINGLE) -> RunConfig:
    """The config with the runtime's "auto" values replaced by what this machine gives, so the
    saved config.json says exactly how the run computed (with several processes: rank 0's GPU)."""
    runtime = resolve_runtime(config.runtime, distributed=dist.enabled)
    channels_last = runtime.channels_last
    if channels_last and config.runtime.channels_last == "auto" and onednn_channels_last_unsafe(config, runtime.device):
        channels_last = False
    return config.replace(**{
        "runtime.device": str(device_for_rank(runtime.device, dist)), "runtime.precision": runtime.precision,
        "runtime.channels_last": channels_last, "runtime.fused_bn": runtime.fused_bn and channels_last,
        "runtime.conv_wgrad": runtime.conv_wgrad if runtime.fused_bn and channels_last else "native",
        "runtime.conv_winograd": runtime.conv_winograd and runtime.fused_bn and channels_last,
        "runtime.compile": runtime.compile, "runtime.compile_mode": runtime.compile_mode,
    })


def onednn_channels_last_unsafe(config: RunConfig, device) -> bool:
    """torch 2.13's CPU build without AVX-512 (oneDNN's AVX2 kernels) corrupts memory in the backward
    pass of a channels_last 1x1 stride-2 convolution with fewer than 8 input channels (a segfault or
    abort; seen on a Zen 3 EPYC). Only narrow nets have one (projection shortcuts at width 0.25), and
    "auto" trains them in NCHW there. The model is built on the meta device: no memory, no RNG."""
    import torch
    from torch import nn

    from resnetlab.models import create_model

    if device.type != "cpu" or torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        model = create_model(config.model.name, num_classes=config.model.num_classes or 10, **config.model.options)
    return any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1) and m.in_channels < 8
               for m in model.modules())


def build_trainer(config: RunConfig, data: TrainData, dist: DistInfo = SINGLE) -> Trainer:
    """The Trainer; with several processes (`dist`) every rank builds the same seeded model, and
    DDP broadcasts rank 0's weights anyway."""
    from resnetlab.models import create_model

    runtime = resolve_runtime(config.runtime)
    seed_everything(config.train.seed)  # the model's initial weights follow from the seed
    num_classes = config.model.num_classes or data.num_classes
    if num_classes < data.num_classes:
        raise ConfigError(f"invalid value for 'model.num_classes': {num_classes}, but the data have {data.num_classes} classes")
    model = create_model(config.model.name, num_classes=num_classes, **config.model.options)
    if config.train.sync_bn and dist.enabled:
        model = convert_sync_bn(model, runtime.device)
    model, forward = runtime.prepare(model)
    ddp = None
    if dist.enabled:
        ddp = wrap_ddp(model, runtime.device)
        forward = runtime.compiled(ddp) if runtime.compile else ddp
    optimizer = build_optimizer(model, config.optim)
    schedule = Schedule(config.schedule, config.optim.lr, data.total_steps, data.steps_per_epoch)
    ema = EMA(model, config.train.ema_decay) if config.train.ema_decay else None
    return Trainer(
        cfg=config, model=model, forward=forward, optimizer=optimizer, schedule=schedule,
        warmup=WarmupController(schedule), plateau=PlateauController(schedule), runtime=runtime,
        scaler=runtime.grad_scaler(), bn_layers=bn_layers(model), ema=ema, ddp=ddp, dist=dist,
        lr_scale=lr_scale(config.optim, config.train.batch_size),
    )  # fmt: skip


def lr_scale(optim: OptimSection, global_batch: int) -> float:
    """optim.lr_scaling's factor for the global batch: 1 ("none"), batch / reference ("linear",
    Goyal et al. 2017) or its square root ("sqrt")."""
    ratio = global_batch / optim.lr_reference_batch
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[optim.lr_scaling]
