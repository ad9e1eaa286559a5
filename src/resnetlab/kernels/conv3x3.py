"""A 3x3 convolution computed by resnetlab's CPU kernels in training: the forward pass and the input
gradient by kernels/conv_fwd.cpp, or at stride 1 by Winograd F(2x2, 3x3) in kernels/conv_winograd.cpp
(inside `conv_winograd(True)`: runtime.conv_winograd), the weight gradient by kernels/conv_wgrad.cpp (from the bf16
tensors with fp32 accumulation, returned in fp32 unless `conv_weight_grad(...)` asks for oneDNN's
bf16 rounding or oneDNN itself; runtime.conv_wgrad), or, inside `conv_winograd(True)` at stride 1 with
32 or more channels, by Winograd in kernels/conv_winograd_wgrad.cpp.

On the 2-core Zen 4 (AVX-512 BF16, no AMX) the kernels ran the ResNet-20 layers at 440-490 GFLOP/s
forward and to the input where oneDNN reached 375-490 (195-275 for the stride-2 input gradients), and
the weight gradient at 365-430 against oneDNN's 165-355 (docs/speed-notes.md). Used only inside `fused_bn_relu()` (runtime.fused_bn), in training, for bf16
channels_last CPU tensors with 16, 32, 48 or 64 channels in and out on maps up to 32x32 (where they
were measured faster); everything else runs the module unchanged.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn

from resnetlab.kernels.batch_norm_relu import fused_kernels_enabled
from resnetlab.kernels.build import (load_conv_fwd_extension, load_conv_wgrad_extension,
                                    load_conv_winograd_extension, load_conv_winograd_wgrad_extension)


# Where the kernels were measured faster than oneDNN (benchmarks/bench_conv3x3.py): the CIFAR
# ResNets' layers, 16-64 channels on maps up to 32x32. On ResNet-50's 3x3 layers (64-512 channels,
# 7x7 to 56x56, batch 32) the weight-gradient kernel was 14-30 % slower: its per-image-pair buffers
# outgrow the L2 cache.
MAX_CHANNELS = 64
MAX_PIXELS = 32 * 32
FORWARD_KERNEL = True  # off: oneDNN's forward pass and input gradient (benchmarks/bench_conv3x3.py compares)
WGRAD_MODES = ("kernel", "kernel-bf16", "native")
# Winograd F(2x2, 3x3) for the stride-1 forward passes and input gradients from this many channels in
# and out: on two threads of the 2-core Zen 4 it took 1.14 / 1.00 / 0.90 ms against 1.39 / 1.28 / 1.23 ms
# direct at 16 / 32 / 64 channels (kernels/conv_winograd.cpp, docs/speed-notes.md).
WINOGRAD_MIN_CHANNELS = 16
WINOGRAD_CHANNELS = (16, 32, 64)  # the channel counts the kernel is compiled for
WINOGRAD_TILES = 16  # 2x2 output tiles per block of the kernel: the map must hold a multiple of these
# The weight gradient by Winograd from this many channels in and out: on two threads of the 2-core Zen 4
# 1.12 / 0.88 ms against 1.41 / 1.39 ms direct at 32 / 64 channels, but 1.71 against 1.48 at 16, where
# transforming x and dy costs as much as the multiply-adds (benchmarks/bench_conv3x3.py, docs/speed-notes.md).
WINOGRAD_WGRAD_MIN_CHANNELS = 32

_wgrad_mode: contextvars.ContextVar[str] = contextvars.ContextVar("resnetlab_conv_wgrad", default="kernel")
_winograd: contextvars.ContextVar[bool] = contextvars.ContextVar("resnetlab_conv_winograd", default=False)


@contextlib.contextmanager
def conv_weight_grad(mode: str):
    """Within this context (and inside `fused_bn_relu()`), `conv3x3_train` takes the weight gradient
    from resnetlab's kernel ("kernel": fp32 result; "kernel-bf16": rounded to bf16, as oneDNN's bf16
    gradient is before it reaches the fp32 weight) or from oneDNN ("native")."""
    if mode not in WGRAD_MODES:
        raise ValueError(f"unknown weight-gradient mode {mode!r}; expected one of {WGRAD_MODES}")
    token = _wgrad_mode.set(mode)
    try:
        yield
    finally:
        _wgrad_mode.reset(token)


@contextlib.contextmanager
def conv_winograd(enabled: bool):
    """Within this context (and inside `fused_bn_relu()`), `conv3x3_train` computes the stride-1
    forward passes and input gradients of layers with at least WINOGRAD_MIN_CHANNELS channels in
    and out by Winograd F(2x2, 3x3) (fewer multiply-adds, about three times the rounding error of
    the direct kernel) instead of the direct kernel."""
    token = _winograd.set(enabled)
    try:
        yield
    finally:
        _winograd.reset(token)


def winograd_applies(x: torch.Tensor, in_channels: int, out_channels: int, stride: int) -> bool:
    h, w = x.shape[-2:]
    return (stride == 1 and in_channels in WINOGRAD_CHANNELS and out_channels in WINOGRAD_CHANNELS
            and min(in_channels, out_channels) >= WINOGRAD_MIN_CHANNELS and h % 2 == 0 and w % 2 == 0
            and (h // 2) * (w // 2) % WINOGRAD_TILES == 0 and load_conv_winograd_extension() is not None)


def winograd_wgrad_applies(x: torch.Tensor, in_channels: int, out_channels: int) -> bool:
    """Whether the weight gradient of a layer `winograd_applies` to is taken by Winograd too."""
    return (min(in_channels, out_channels) >= WINOGRAD_WGRAD_MIN_CHANNELS and x.shape[-1] % 4 == 0
            and load_conv_winograd_wgrad_extension() is not None)


class _Conv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, stride, wgrad_mode, winograd):
        weight_bf16 = weight.to(torch.bfloat16)  # what autocast would hand the native convolution
        ctx.save_for_backward(x, weight_bf16)
        ctx.stride, ctx.wgrad_mode = stride, wgrad_mode
        ctx.winograd = winograd and winograd_applies(x, weight.shape[1], weight.shape[0], stride)
        if ctx.winograd:
            kernel = load_conv_winograd_extension()
            return kernel.winograd(x, kernel.winograd_weights(weight_bf16, False), weight.shape[0])
        kernel = load_conv_fwd_extension() if FORWARD_KERNEL else None
        ctx.forward_kernel = kernel is not None
        if kernel is not None:
            return kernel.convolution(x, weight_bf16, stride, False)
        return torch.ops.aten.convolution(x, weight_bf16, None, [stride, stride], [1, 1], [1, 1], False, [0, 0], 1)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_bf16 = ctx.saved_tensors
        s = ctx.stride
        grad_out = grad_out.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        grad_x_by_winograd = ctx.needs_input_grad[0] and ctx.winograd
        grad_x_by_kernel = ctx.needs_input_grad[0] and (ctx.winograd or ctx.forward_kernel)
        grad_w_by_kernel = ctx.needs_input_grad[1] and ctx.wgrad_mode != "native"
        onednn_mask = [ctx.needs_input_grad[0] and not grad_x_by_kernel, ctx.needs_input_grad[1] and not grad_w_by_kernel]
        grad_x = grad_weight = None
        if any(onednn_mask):
            grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
                grad_out, x, weight_bf16, None, [s, s], [1, 1], [1, 1], False, [0, 0], 1, [*onednn_mask, False])
            grad_weight = grad_weight.float() if grad_weight is not None else None  # as autocast's cast passes it on
        if grad_x_by_winograd:
            kernel = load_conv_winograd_extension()
            grad_x = kernel.winograd(grad_out, kernel.winograd_weights(weight_bf16, True), x.shape[1])
        elif grad_x_by_kernel and s == 1:
            grad_x = load_conv_fwd_extension().convolution(grad_out, weight_bf16, 1, True)
        elif grad_x_by_kernel:
            grad_x = load_conv_fwd_extension().input_grad_stride2(grad_out, weight_bf16, x.shape[2], x.shape[3])
        if grad_w_by_kernel:
            if ctx.winograd and winograd_wgrad_applies(x, x.shape[1], grad_out.shape[1]):
                grad_weight = load_conv_winograd_wgrad_extension().winograd_weight_grad(grad_out, x)
            else:
                grad_weight = load_conv_wgrad_extension().weight_grad(grad_out, x, s)
            if ctx.wgrad_mode == "kernel-bf16":
                grad_weight = grad_weight.to(torch.bfloat16).float()
        return grad_x, grad_weight, None, None, None


def kernel_applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv3x3_train(conv, x)` would use resnetlab's kernels (inside `fused_bn_relu()`)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is None and conv.stride in ((1, 1), (2, 2))
            and conv.padding_mode == "zeros" and conv.weight.requires_grad and conv.weight.dtype == torch.float32
            and torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() == 4
            and conv.in_channels % 16 == 0 and conv.out_channels % 16 == 0
            and conv.in_channels <= MAX_CHANNELS and conv.out_channels <= MAX_CHANNELS and x.shape[-2] * x.shape[-1] <= MAX_PIXELS
            and x.is_contiguous(memory_format=torch.channels_last)
            and load_conv_wgrad_extension() is not None)


def conv3x3_train(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x), with resnetlab's kernels where they apply."""
    if not torch.compiler.is_compiling() and fused_kernels_enabled() and kernel_applies(conv, x):
        return _Conv3x3.apply(x, conv.weight, conv.stride[0], _wgrad_mode.get(), _winograd.get())
    return conv(x)
