"""A Trainer's complete state as (named tensors, JSON) -- what resume needs, with no pickle:
model and EMA weights, optimizer buffers, device-side metric sums and RNG states as tensors;
hyperparameters, counters and the grad scaler as JSON. With several processes the metric sums saved
are those of all ranks (a collective: every rank calls `training_state`), and on loading rank 0
carries them on while the others start from zero."""
from __future__ import annotations

import torch

from resnetlab.engine.loop import Trainer
from resnetlab.engine.runtime import rng_state, set_rng_state
from resnetlab.errors import CheckpointError


def training_state(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    if trainer.ema is not None:
        tensors.update({f"ema.{k}": v for k, v in trainer.ema.state_dict().items()})
    optim_tensors, optim_json = _split_optimizer_state(trainer.optimizer.state_dict())
    tensors.update(optim_tensors)
    tensors.update({f"rng.{k}": v for k, v in rng_state().items()})
    epoch_sums, epoch_count = trainer.epoch_meter.totals()
    interval_sums, interval_count = trainer.interval_meter.totals()
    tensors["meter.epoch"] = epoch_sums
    tensors["meter.interval"] = interval_sums
    state = {
        "step": trainer.step, "lr": trainer.lr, "warmup_done_at_step": trainer.warmup.done_at_step,
        "plateau": trainer.plateau.state_dict(),
        "optimizer": optim_json, "scaler": trainer.scaler.state_dict(),
        "ema_updates": trainer.ema.updates if trainer.ema is not None else None,
        "meter_counts": {"epoch": epoch_count, "interval": interval_count},
    }
    return tensors, state


def load_training_state(trainer: Trainer, tensors: dict[str, torch.Tensor], state: dict) -> None:
    try:
        trainer.model.load_state_dict(_prefixed(tensors, "model."))
        if trainer.ema is not None:
            trainer.ema.load_state_dict(_prefixed(tensors, "ema."), state["ema_updates"])
        trainer.optimizer.load_state_dict(_join_optimizer_state(tensors, state["optimizer"]))
        _match_parameter_layouts(trainer.optimizer)
    except (RuntimeError, KeyError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"the training state does not match this run's config ({reason})") from None
    if state["scaler"]:
        trainer.scaler.load_state_dict(state["scaler"])
    set_rng_state(_prefixed(tensors, "rng."))
    device = trainer.runtime.device
    for name, meter in (("epoch", trainer.epoch_meter), ("interval", trainer.interval_meter)):
        meter.reset()
        if trainer.dist.is_main:  # the saved sums are all ranks'; counting them once is enough
            meter.sums.copy_(tensors[f"meter.{name}"].to(device))
            meter.count = state["meter_counts"][name]
    trainer.step, trainer.lr = state["step"], state["lr"]
    trainer.warmup.done_at_step = state["warmup_done_at_step"]
    if "plateau" in state:  # checkpoints written before the plateau schedule existed lack it
        trainer.plateau.load_state_dict(state["plateau"])


def _match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Buffers come back from safetensors contiguous, while a channels_last weight keeps its layout.
    torch's fused updates walk a parameter, its gradient and its buffers as flat memory, so a
    momentum buffer in another layout than its weight is silently misread (on the CPU, torch 2.13:
    weights off by about 1 after one step); it gets its weight's layout back."""
    for param, per_param in optimizer.state.items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                per_param[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch's optimizer state_dict -> tensors "optim.<param>.<key>" + JSON for everything else."""
    tensors, scalars = {}, {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], saved: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, values in saved["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in saved["param_groups"]]
    return {"state": state, "param_groups": groups}
