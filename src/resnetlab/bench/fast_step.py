"""The fast training step the benchmark times: in-memory batched data, autocast, channels_last,
optional torch.compile, a fused/foreach SGD step and metrics kept on the device.

This mirrors what the engine's loop does per step; the benchmark switches to the engine's own step
once that lands, so that it measures exactly what `resnetlab train` runs."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.data import AugmentSpec, InMemoryLoader, compute_normalizer
from resnetlab.errors import DivergenceError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def default_channels_last(device: torch.device) -> bool:
    # oneDNN (CPU) and cuDNN (tensor cores) both run convolutions natively in NHWC.
    return True


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def sgd(model: nn.Module, device: torch.device, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4,
        impl: str = "auto") -> torch.optim.SGD:
    """SGD with momentum; impl "fused" (one kernel for all parameters), "foreach" (a few multi-tensor
    ops) or "loop" (one op per tensor, torch's default on CPU). auto picks fused (CPU and CUDA
    kernels exist since torch 2.4)."""
    impl = "fused" if impl == "auto" else impl
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, **kwargs)


class FastTrainer:
    """Owns the model, optimiser and in-memory loader; `step()` runs one training step."""

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int,
                 device: torch.device, precision: str = "bf16", channels_last: bool = True, compile: bool = False,
                 optimizer_impl: str = "auto", seed: int = 0):
        self.device, self.precision = device, precision
        self.model = model.to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.optimizer = sgd(self.model, device, impl=optimizer_impl)
        self.forward = torch.compile(self.model) if compile else self.model
        # fp16 needs loss scaling; bf16 has fp32's exponent range and does not.
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        loader = InMemoryLoader(images, labels, batch_size=batch_size, shuffle=True, drop_last=True, seed=seed,
                                device=device, normalizer=compute_normalizer(images), augment=AugmentSpec(),
                                channels_last=channels_last)
        self.batches = _endless(loader)
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)

    def step(self) -> None:
        x, y = next(self.batches)
        with autocast(self.device, self.precision):
            logits = self.forward(x)
            loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        with torch.no_grad():  # running metrics on the device: no host sync per step
            self.loss_sum += loss.detach().float()
            self.correct += (logits.argmax(1) == y).sum()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def check_finite(self) -> None:
        if not torch.isfinite(self.loss_sum):
            raise DivergenceError("benchmark training produced a non-finite loss")


def _endless(loader: InMemoryLoader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1
