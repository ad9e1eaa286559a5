"""A 3x3 convolution whose weight gradient comes from resnetlab's CPU kernel (conv_wgrad.cpp): the
forward pass and the input gradient stay oneDNN's (through the native operators), the weight
gradient is computed from the bf16 tensors with fp32 accumulation and returned in fp32.

On the 2-core Zen 4 the kernel took 0.7-1.6 ms per ResNet-20 layer at batch 128 where oneDNN's
weight gradient took 1.7-2.0 ms (docs/speed-notes.md); and the gradient is no longer rounded to
bf16 on its way to the fp32 weights (unless `conv_weight_grad("kernel-bf16")` asks for oneDNN's
rounding; runtime.conv_wgrad). Used only inside `fused_bn_relu()` (runtime.fused_bn), in
training, for bf16 channels_last CPU tensors with 16, 32, 48 or 64 channels in and out on maps up
to 32x32 (where it was measured faster); everything else runs the module unchanged.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn

from resnetlab.kernels.batch_norm_relu import fused_kernels_enabled
from resnetlab.kernels.build import load_conv_wgrad_extension


# Where the kernel was measured faster than oneDNN (benchmarks/bench_conv_wgrad.py): the CIFAR
# ResNets' layers, 16-64 channels on maps up to 32x32. On ResNet-50's 3x3 layers (64-512 channels,
# 7x7 to 56x56, batch 32) it was 14-30 % slower: its per-image-pair buffers outgrow the L2 cache.
MAX_CHANNELS = 64
MAX_PIXELS = 32 * 32
WGRAD_MODES = ("kernel", "kernel-bf16", "native")

_wgrad_mode: contextvars.ContextVar[str] = contextvars.ContextVar("resnetlab_conv_wgrad", default="kernel")


@contextlib.contextmanager
def conv_weight_grad(mode: str):
    """Within this context (and inside `fused_bn_relu()`), `conv3x3_train` takes the weight gradient
    from the kernel ("kernel": fp32 result; "kernel-bf16": rounded to bf16, as oneDNN's bf16
    gradient is before it reaches the fp32 weight) or from oneDNN ("native")."""
    if mode not in WGRAD_MODES:
        raise ValueError(f"unknown weight-gradient mode {mode!r}; expected one of {WGRAD_MODES}")
    token = _wgrad_mode.set(mode)
    try:
        yield
    finally:
        _wgrad_mode.reset(token)


class _Conv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, stride, round_to_bf16):
        weight_bf16 = weight.to(torch.bfloat16)  # what autocast would hand the native convolution
        ctx.save_for_backward(x, weight_bf16)
        ctx.stride = stride
        ctx.round_to_bf16 = round_to_bf16
        return torch.ops.aten.convolution(x, weight_bf16, None, [stride, stride], [1, 1], [1, 1], False, [0, 0], 1)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_bf16 = ctx.saved_tensors
        s = ctx.stride
        grad_out = grad_out.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad_out, x, weight_bf16, None, [s, s], [1, 1], [1, 1], False,
                                                         [0, 0], 1, [True, False, False])[0]
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = load_conv_wgrad_extension().weight_grad(grad_out, x, s)
            if ctx.round_to_bf16:
                grad_weight = grad_weight.to(torch.bfloat16).float()
        return grad_x, grad_weight, None, None


def kernel_applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv3x3_train(conv, x)` would use the weight-gradient kernel (inside `fused_bn_relu()`)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is None and conv.stride in ((1, 1), (2, 2))
            and conv.padding_mode == "zeros" and conv.weight.requires_grad and conv.weight.dtype == torch.float32
            and torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() == 4
            and conv.in_channels % 16 == 0 and conv.out_channels % 16 == 0
            and conv.in_channels <= MAX_CHANNELS and conv.out_channels <= MAX_CHANNELS and x.shape[-2] * x.shape[-1] <= MAX_PIXELS
            and x.is_contiguous(memory_format=torch.channels_last)
            and load_conv_wgrad_extension() is not None)


def conv3x3_train(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x), with the weight-gradient kernel where it applies."""
    if (not torch.compiler.is_compiling() and fused_kernels_enabled() and _wgrad_mode.get() != "native"
            and kernel_applies(conv, x)):
        return _Conv3x3.apply(x, conv.weight, conv.stride[0], _wgrad_mode.get() == "kernel-bf16")
    return conv(x)
