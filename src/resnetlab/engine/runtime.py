"""Where and how a run computes: device, precision (autocast), memory format, compilation, seeding
and the RNG state that checkpoints carry."""
from __future__ import annotations

import contextlib
import importlib.util
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from resnetlab.artifacts.env import cpu_name
from resnetlab.config import RuntimeSection
from resnetlab.errors import ConfigError
from resnetlab.kernels import (conv_weight_grad, conv_winograd, fused_bn_relu, load_bn_relu_extension,
                               load_conv_wgrad_extension, load_conv_winograd_extension)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """The resolved runtime section: no "auto" left."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    compile: bool
    compile_mode: str = "default"  # torch.compile's mode, when compile is on
    fused_bn: bool = False  # the fused BN + ReLU CPU kernel inside autocast() (resnetlab.kernels)
    conv_wgrad: str = "native"  # the 3x3 weight gradient with fused_bn: kernel | kernel-bf16 | native
    conv_winograd: bool = False  # stride-1 3x3 convolutions by Winograd (weight gradients from 32 channels), with fused_bn

    @property
    def cuda_graphs(self) -> bool:
        """Whether torch.compile records CUDA graphs (its "reduce-overhead" and "max-autotune"
        modes do, on CUDA only)."""
        return self.compile and self.device.type == "cuda" and self.compile_mode in ("reduce-overhead", "max-autotune")

    def compiled(self, module: nn.Module) -> nn.Module:
        # Inductor suggests TF32 matmuls for fp32 on CUDA; the only matmul here is the classifier's
        # (the convolutions already use cuDNN's TF32 by PyTorch's default), so the hint is noise.
        warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores", category=UserWarning)
        return torch.compile(module, mode=self.compile_mode)

    def autocast(self):
        """The forward-pass context: autocast to bf16/fp16 (with the fused BN + ReLU kernel where it
        is on), or nothing for exact fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        context = contextlib.ExitStack()
        context.enter_context(torch.autocast(device_type=self.device.type, dtype=DTYPES[self.precision]))
        if self.fused_bn:
            context.enter_context(fused_bn_relu())
            context.enter_context(conv_weight_grad(self.conv_wgrad))
            context.enter_context(conv_winograd(self.conv_winograd))
        return context

    def grad_scaler(self) -> torch.amp.GradScaler:
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def prepare(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """Move the model; returns (model, forward_module). Checkpoints always use the first, so
        their keys never carry torch.compile's `_orig_mod.` prefix."""
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model, (self.compiled(model) if self.compile else model)

    def describe(self) -> dict:
        return {"device": str(self.device), "device_name": device_name(self.device), "precision": self.precision,
                "channels_last": self.channels_last, "compile": self.compile,
                "compile_mode": self.compile_mode if self.compile else None, "fused_bn": self.fused_bn,
                "conv_wgrad": self.conv_wgrad, "conv_winograd": self.conv_winograd,
                "threads": torch.get_num_threads()}


def resolve_runtime(cfg: RuntimeSection, *, distributed: bool = False) -> Runtime:
    """`distributed` only matters to compile "auto" (see resolve_compile)."""
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if precision == "bf16" and not has_native_bf16(device):
        warnings.warn(f"bf16 is emulated on this {device.type} (no AVX-512 BF16 / AMX, or a GPU before Ampere): "
                      "expect it to run many times slower than fp32 (runtime.precision auto picks fp32 here)",
                      stacklevel=1)  # one location: shown once per process however many runtimes
    # faster in both CPU precisions measured (see resolve_precision), and on an H100 too: ResNet-20
    # fp32 18,203 images/s channels_last vs 13,918 NCHW (benchmarks/RESULTS-cuda.md)
    channels_last = cfg.channels_last if cfg.channels_last != "auto" else True
    compile, compile_mode = resolve_compile(cfg.compile, cfg.compile_mode, device, distributed)
    fused_bn = resolve_fused_bn(cfg.fused_bn, device, precision, channels_last, compile)
    conv_wgrad = resolve_conv_wgrad(cfg.conv_wgrad, fused_bn)
    winograd = resolve_conv_winograd(cfg.conv_winograd, fused_bn)
    return Runtime(device, precision, channels_last, compile, compile_mode, fused_bn, conv_wgrad, winograd)


def resolve_compile(setting: bool | str, mode: str, device: torch.device, distributed: bool) -> tuple[bool, str]:
    """(compile, mode) with no "auto" left. compile auto: on CUDA only, where these nets are
    launch-bound and CUDA graphs replay the whole forward and backward pass as one launch: on an
    H200 (torch 2.11) ResNet-20 batch 128 trained at 30,069 images/s against 10,852 eager, and a
    fast-cifar run trained its 30 epochs in 140 s, compile included, where eager took 225 s for 29 of
    them. With gradient accumulation too (two replays per step): a batch of 128 in two micro-batches
    of 64 took 7.9 ms per fast-cifar step against 9.8 ms for one eager batch of 64
    (benchmarks/RESULTS-cuda.md). Not under several processes, where CUDA graphs were never tried
    on a GPU. On the CPU the compiled step was slower than the eager one with the fused kernels
    (1,060 against 1,253 images/s, benchmarks/RESULTS.md). mode auto: reduce-overhead (CUDA graphs) on
    CUDA, default elsewhere."""
    if mode == "auto":
        mode = "reduce-overhead" if device.type == "cuda" else "default"
    if setting == "auto":
        setting = device.type == "cuda" and not distributed and triton_supports(device)
    return setting, mode


def triton_supports(device: torch.device) -> bool:
    """torch.compile's CUDA kernels are Triton's: Triton must be installed, and it compiles for GPUs
    of compute capability 7.0 (Volta) and newer only."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.get_device_capability(device) >= (7, 0)


def resolve_fused_bn(setting: bool | str, device: torch.device, precision: str, channels_last: bool,
                     compile: bool) -> bool:
    """runtime.fused_bn resolved. The kernel is written for bf16 channels_last CPU tensors; under
    torch.compile the compiled graph runs the native operators. auto: on where it applies and builds
    (ResNet-20 training steps about 9 % faster on the 2-core Zen 4: docs/speed-notes.md)."""
    applies = device.type == "cpu" and precision == "bf16" and channels_last and not compile
    if setting is False or (setting == "auto" and not applies):
        return False
    if not applies:
        raise ConfigError("runtime.fused_bn=true needs runtime.device=cpu, precision=bf16, channels_last "
                          "and compile off (the kernel is for bf16 channels_last CPU tensors)")
    if load_bn_relu_extension() is None:
        if setting is True:
            raise ConfigError("runtime.fused_bn=true but the fused kernel could not be built here "
                              "(needs a C++ compiler and ninja); set runtime.fused_bn=auto or false")
        return False
    return True


def resolve_conv_wgrad(setting: str, fused_bn: bool) -> str:
    """runtime.conv_wgrad resolved. The kernel runs inside the fused-kernel context only and needs
    AVX-512 BF16. auto: "kernel" there (ResNet-20 steps 7.5 ms faster on the 2-core Zen 4:
    docs/speed-notes.md), "native" elsewhere."""
    available = fused_bn and load_conv_wgrad_extension() is not None
    if setting == "auto":
        return "kernel" if available else "native"
    if setting != "native" and not available:
        raise ConfigError(f"runtime.conv_wgrad={setting} needs runtime.fused_bn on and a CPU with AVX-512 BF16 "
                          "(the kernel's instruction); set runtime.conv_wgrad=auto or native")
    return setting


def resolve_conv_winograd(setting: bool | str, fused_bn: bool) -> bool:
    """runtime.conv_winograd resolved. The kernel runs inside the fused-kernel context only and needs
    AVX-512 BF16. auto: on there (docs/speed-notes.md), off elsewhere."""
    available = fused_bn and load_conv_winograd_extension() is not None
    if setting is True and not available:
        raise ConfigError("runtime.conv_winograd=true needs runtime.fused_bn on and a CPU with AVX-512 BF16 "
                          "(the kernel's instruction); set runtime.conv_winograd=auto or false")
    return available if setting == "auto" else setting


@contextlib.contextmanager
def use_threads(threads: int | None):
    """torch's intra-op thread count for the duration of a run, restored afterwards (it is
    process-wide state; None leaves it alone)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("invalid value for 'runtime.device': CUDA was asked for but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"invalid value for 'runtime.device': {name} does not exist ({torch.cuda.device_count()} GPUs)")
    return device


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: the CPU computes bf16 matmuls natively (Zen 4, Sapphire Rapids...)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


def has_native_bf16(device: torch.device) -> bool:
    """bf16 matmuls run in hardware on `device`; elsewhere autocast to bf16 is emulated and many
    times slower than fp32 (a Zen 3 CPU: about 1 GFLOP/s against 125)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return cpu_has_native_bf16()


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": whatever was measured to train fastest. On the CPU, bf16 where it is native, else
    fp32: ResNet-20 training (batch 128, this engine's loop, one thread of a Zen 4 EPYC, images per
    CPU-second): fp32 NCHW 245, fp32 channels_last 304, bf16 NCHW 444, bf16 channels_last 487.
    On CUDA, fp32 (with PyTorch's default TF32 convolutions): on an H100 (torch 2.11, channels_last,
    eager) these nets are launch-bound and autocast adds cast kernels: ResNet-20 batch 128 trained
    at 16,846 images/s in fp32 vs 12,148 in bf16, ResNet-50 at 224 px batch 32 at 1,945 vs 1,385;
    only ResNet-56 gained (6,863 vs 7,089, +3%). bf16/fp16 stay one switch away
    (benchmarks/RESULTS-cuda.md)."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("invalid value for 'runtime.precision': fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def seed_everything(seed: int) -> None:
    """Seed every generator a run may touch; on the CPU the same seed gives the same numbers."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, torch.Tensor]:
    """The global generators' states as tensors (what a checkpoint stores; no pickles)."""
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch_cuda{index}"] = cuda_state
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    if "torch_cpu" in state:
        torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            if f"torch_cuda{index}" in state:
                torch.cuda.set_rng_state(state[f"torch_cuda{index}"], index)
