"""Builds the C++ kernels on first use with torch's JIT extension loader (a C++ compiler and ninja
needed; about a minute once, then cached by torch under TORCH_EXTENSIONS_DIR or ~/.cache)."""
from __future__ import annotations

import functools
import hashlib
import platform
import sys
import warnings
from pathlib import Path

import torch

BN_RELU_SOURCE = Path(__file__).with_name("bn_relu.cpp")
CONV_WGRAD_SOURCE = Path(__file__).with_name("conv_wgrad.cpp")
CONV_FWD_SOURCE = Path(__file__).with_name("conv_fwd.cpp")
CONV_WINOGRAD_SOURCE = Path(__file__).with_name("conv_winograd.cpp")
CONV_WINOGRAD_WGRAD_SOURCE = Path(__file__).with_name("conv_winograd_wgrad.cpp")


def _cpu_flags() -> str:
    """The "flags" line of /proc/cpuinfo; empty where there is none (not Linux)."""
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""


def _machine_tag() -> str:
    # The kernel is compiled for this CPU (-march=native) and this torch's ABI: a home directory
    # shared between machines or torch versions must not load another one's build.
    cpu = platform.machine() + platform.processor() + _cpu_flags()
    return hashlib.sha1(f"{cpu}|{torch.__version__}|{sys.version_info[:2]}".encode()).hexdigest()[:10]


@functools.cache
def load_bn_relu_extension():
    """The compiled bn_relu extension module, or None (with one warning) where it can't be built."""
    return _load("bn_relu", BN_RELU_SOURCE, "fused BN + ReLU kernel")


@functools.cache
def load_conv_wgrad_extension():
    """The compiled 3x3 convolution weight-gradient kernel; None without a warning on CPUs without
    AVX-512 BF16 (it needs a Zen 4, Sapphire Rapids or newer), with one where it can't be built."""
    return _load_with_avx512_bf16("conv_wgrad", CONV_WGRAD_SOURCE, "3x3 convolution weight-gradient kernel")


@functools.cache
def load_conv_fwd_extension():
    """The compiled 3x3 convolution kernel (forward pass and stride-1 input gradient); None as for
    `load_conv_wgrad_extension`."""
    return _load_with_avx512_bf16("conv_fwd", CONV_FWD_SOURCE, "3x3 convolution kernel")


@functools.cache
def load_conv_winograd_extension():
    """The compiled Winograd F(2x2, 3x3) convolution kernel (stride 1); None as for
    `load_conv_wgrad_extension`."""
    return _load_with_avx512_bf16("conv_winograd", CONV_WINOGRAD_SOURCE, "Winograd 3x3 convolution kernel")


@functools.cache
def load_conv_winograd_wgrad_extension():
    """The compiled Winograd F(2x2, 3x3) weight-gradient kernel (stride 1); None as for
    `load_conv_wgrad_extension`."""
    return _load_with_avx512_bf16("conv_winograd_wgrad", CONV_WINOGRAD_WGRAD_SOURCE,
                                  "Winograd 3x3 convolution weight-gradient kernel")


def _load_with_avx512_bf16(short_name: str, source: Path, what: str):
    # The convolution kernels are written around vdpbf16ps: elsewhere there is nothing to build.
    if "avx512_bf16" not in _cpu_flags().split():
        return None
    return _load(short_name, source, what)


def _load(short_name: str, source: Path, what: str):
    from torch.utils.cpp_extension import load  # imports setuptools machinery: only when needed

    name = f"resnetlab_{short_name}_{_machine_tag()}"
    if not _already_built(name):
        print(f"resnetlab: compiling the {what} for this CPU (once, about a minute)", file=sys.stderr)
    try:
        return load(name=name, sources=[str(source)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, a CPU the flags don't fit: the native operators still work
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"the {what} could not be built ({reason}); using the native operators", stacklevel=3)
        return None


def _already_built(name: str) -> bool:
    try:  # torch's own build-directory rule (a private helper, hence the guard)
        from torch.utils.cpp_extension import _get_build_directory

        return any(Path(_get_build_directory(name, verbose=False)).glob(f"{name}.*"))
    except Exception:
        return True  # unknown: say nothing rather than something wrong
