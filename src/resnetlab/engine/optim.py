"""Optimizers from the config, and the per-step setters the loop uses for lr and momentum."""
from __future__ import annotations

import torch
from torch import nn

from resnetlab.config import OptimSection


def param_groups(model: nn.Module, cfg: OptimSection) -> list[dict]:
    """One group, or two when `no_wd_bn_bias`: tensors with one dimension (BN weights and biases,
    the fc bias) get no weight decay, as in Goyal et al. 2017's "no bias decay"."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not cfg.no_wd_bn_bias:
        return [{"params": params, "weight_decay": cfg.weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    # foreach: one kernel per op over all tensors instead of one per parameter; fused (SGD, Adam,
    # AdamW, on the CPU and CUDA): one kernel for the whole update. Fused SGD gave the foreach
    # update's weights bit for bit on the CPU in 0.21 instead of 0.47 ms per ResNet-20 step; on an
    # H200 the foreach step's host time was about 1 ms of a 5 ms CUDA-graph step
    # (benchmarks/RESULTS-cuda.md).
    common = {"lr": cfg.lr, "foreach": True}
    fused = {"lr": cfg.lr, "fused": True}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, **fused)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(groups, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum, **common)
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(groups, eps=cfg.eps, **common)
    if cfg.name == "adadelta":
        return torch.optim.Adadelta(groups, rho=cfg.rho, eps=cfg.eps, **common)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, betas=cfg.betas, eps=cfg.eps, **fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, betas=cfg.betas, eps=cfg.eps, **fused)
    raise AssertionError(f"unhandled optimizer {cfg.name}")  # the config's Literal rules this out


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def set_momentum(optimizer: torch.optim.Optimizer, momentum: float) -> None:
    """SGD/RMSprop `momentum`, Adam's beta1; optimizers without momentum are left alone."""
    for group in optimizer.param_groups:
        if "betas" in group:
            group["betas"] = (momentum, group["betas"][1])
        elif "momentum" in group:
            group["momentum"] = momentum

