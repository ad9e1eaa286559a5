"""Data-parallel training over processes started by torchrun: one process per GPU (NCCL), or K
processes on a CPU machine (gloo); several machines through torchrun's rendezvous.

    torchrun --standalone --nproc_per_node 2 -m resnetlab train --device cpu ...   # gloo on the CPU
    torchrun --standalone --nproc_per_node 8 -m resnetlab train ...                  # NCCL, GPU i = LOCAL_RANK

The process group is read from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT). Every helper here also works in a plain single process, where it does nothing, so the
engine has one code path.
"""
from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from resnetlab.errors import ConfigError, ResnetlabError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the process's index on its own machine: its GPU

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run directory and prints."""
        return self.rank == 0


SINGLE = DistInfo()


class FailedElsewhere(ResnetlabError):
    """Another rank failed and reports why; this one stops too (and the CLI says nothing more)."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def env_info() -> DistInfo:
    """The ranks torchrun put in the environment; a single process when they are absent."""
    info = DistInfo(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise ConfigError(f"RANK={info.rank} and WORLD_SIZE={info.world_size} are inconsistent (set by torchrun)")
    return info


def current() -> DistInfo:
    """This process's place in the initialised process group (SINGLE when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    rank = dist.get_rank()
    return DistInfo(rank, dist.get_world_size(), _env_int("LOCAL_RANK", rank))


@contextlib.contextmanager
def process_group() -> Iterator[DistInfo]:
    """Join torchrun's process group for the duration of a run and leave it afterwards. Nothing
    happens in a single process or when the caller has joined a group already (which it then keeps).
    CPU tensors travel over gloo and CUDA tensors over NCCL, so `--device cpu` works on a GPU host."""
    info = env_info()
    if not info.enabled or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; it cannot train with several processes")
    cuda = torch.cuda.is_available()
    if cuda and info.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(info.local_rank)  # NCCL and "cuda" without an index mean this rank's GPU
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
    try:
        yield current()
        dist.all_reduce(torch.zeros(1))  # leave together (a barrier over gloo, whatever the device)
    finally:
        # DistributedDataParallel sits in a reference cycle; left to the interpreter's final garbage
        # collection, its destruction aborts the process now and then ("terminate called without an
        # active exception", about 1 run in 20 here). Collect it while everything is alive.
        gc.collect()
        dist.destroy_process_group()


def device_for_rank(device: torch.device, info: DistInfo) -> torch.device:
    """With several processes on a machine, the process of LOCAL_RANK i computes on GPU i (any
    index in the config is overridden: the same config.json serves every rank and a resume)."""
    if device.type != "cuda" or not info.enabled:
        return device
    if info.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK {info.local_rank} has no GPU ({torch.cuda.device_count()} on this machine): "
                          "start at most one process per GPU (--nproc_per_node) or train with --device cpu")
    return torch.device("cuda", info.local_rank)


# --- collectives ------------------------------------------------------------------------------------

def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place (no-op in a single process)."""
    if current().enabled:
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when `flag` is true on any (a CPU tensor: gloo, no GPU sync)."""
    if not info.enabled:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` (picklable) on every rank."""
    if not info.enabled:
        return obj
    holder = [obj if info.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def on_main(info: DistInfo, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only and return its result on every rank. When it fails there, every rank
    raises (rank 0 its own error, the others the same message), so no rank waits for a partner that
    has stopped."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as caught:  # noqa: BLE001 -- re-raised below, on every rank
            error = caught
    if info.enabled:
        message = None if error is None else (str(error) if isinstance(error, ResnetlabError) else repr(error))
        result, message = broadcast_object((result, message), info)
        if message is not None and not info.is_main:
            raise FailedElsewhere(message)
    if error is not None:
        raise error
    return result


def together(info: DistInfo, fn: Callable[[], Any]) -> Any:
    """Run `fn` on every rank; when it fails on any, every rank stops (the failing ones with their own
    error, the others naming the first failed rank) instead of waiting in the next collective."""
    error = None
    try:
        result = fn()
    except Exception as caught:  # noqa: BLE001 -- re-raised below
        result, error = None, caught
    if info.enabled:
        failed = torch.tensor([info.world_size if error is None else info.rank], dtype=torch.int32)
        dist.all_reduce(failed, op=dist.ReduceOp.MIN)
        if error is None and failed.item() < info.world_size:
            raise FailedElsewhere(f"rank {failed.item()} failed (that rank prints its error); "
                                  f"rank {info.rank} stops too")
    if error is not None:
        raise error
    return result


@torch.no_grad()
def broadcast_module_(module: nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's parameters and buffers (BN statistics drift apart per rank without
    SyncBN: DDP re-broadcasts them only at the start of a training forward pass)."""
    if info.enabled:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


@torch.no_grad()
def average_bn_stats_(layers: list, info: DistInfo) -> None:
    """Average the BN running statistics over the ranks: after a re-estimation in which every rank
    saw the same number of batches of its own shard, this is the average over all the batches,
    exactly what one process re-estimating over the whole training set computes."""
    if not info.enabled:
        return
    for layer in layers:
        for stat in (layer.running_mean, layer.running_var):
            dist.all_reduce(stat)
            stat.div_(info.world_size)


# --- model wrapping ---------------------------------------------------------------------------------

class _AllReduceSum(torch.autograd.Function):
    """y = the sum of x over the ranks; the gradient of each rank's x is the sum of the gradients
    of y over the ranks (every rank's loss depends on every rank's x)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are taken over the batch of all ranks, for CPU
    processes (gloo), on which torch's SyncBatchNorm refuses to run. The two reductions are
    autograd-aware all-reduces, so the backward pass is that of one BN over the global batch. In
    eval mode, and in a single process, it is plain BatchNorm2d (same state_dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and current().enabled):
            return super().forward(x)
        x32 = x.float()
        local = torch.cat([x32.sum(dim=(0, 2, 3)), x32.new_tensor([x32.numel() / x32.shape[1]])])
        total = _AllReduceSum.apply(local)
        count = total[-1].detach()
        mean = total[:-1] / count
        centred = x32 - mean[None, :, None, None]
        var = _AllReduceSum.apply(centred.square().sum(dim=(0, 2, 3))) / count  # two passes: no cancellation
        self._update_running_stats(mean.detach(), var.detach(), float(count))
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return y.to(x.dtype).contiguous(memory_format=layout)  # the next convolution keeps its fast layout

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        if not self.track_running_stats:
            return
        self.num_batches_tracked.add_(1)
        # torch's conventions: momentum None = cumulative average; the running variance is unbiased
        weight = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), weight)
        unbiased = var * count / max(count - 1, 1)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), weight)


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d normalised with the statistics of the global batch: torch's SyncBatchNorm
    on GPUs, GlobalBatchNorm2d on the CPU. Weights and statistics are kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                            child.track_running_stats)
            replacement.load_state_dict(child.state_dict())
            setattr(model, name, replacement.train(child.training))
        else:
            convert_sync_bn(child, device)
    return model


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `model`: rank 0's weights are broadcast now, and gradients are
    averaged over the ranks during each backward pass (unless inside `no_sync()`)."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)
