"""conv(relu(bn(x))) for a 3x3, stride-1 convolution: the middle of a basic residual block, as one
autograd step where resnetlab's CPU kernels apply, so that each kernel does a little of the next one's
work on data it has at hand:

- forward, the convolution kernel gathers the per-channel sums of its output for the batch norm after it
  (`.sums`, for `bn_relu(..., sums=)`);
- backward, the convolution's input-gradient kernel gathers, as it writes dy, the two per-channel sums of
  this batch norm's backward pass (kernels/conv_fwd.cpp: input_grad_with_bn_sums), which then reads dy
  and x once instead of twice.

Elsewhere (CUDA, fp32, stride 2, shapes the kernels don't take, torch.compile) it is
`conv3x3_before_bn(conv, bn_relu(bn, x, sums=sums))`, the same computation by separate steps.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from resnetlab.kernels import conv3x3 as conv3x3_module
from resnetlab.kernels.batch_norm_relu import (_update_running_stats, _usable_sums, bn_relu, fused_kernel_applies,
                                               fused_kernels_enabled)
from resnetlab.kernels.build import load_bn_relu_extension, load_conv_fwd_extension
from resnetlab.kernels.conv3x3 import conv3x3_before_bn, kernels_apply, weight_gradient


class ConvOutput(NamedTuple):
    out: torch.Tensor
    sums: torch.Tensor | None  # [2, C] float64: per-channel sums of out and of its squares; None: not gathered


class _BatchNormReLUConv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, eps, sums, conv_weight, wgrad_mode):
        bn_kernel, conv_kernel = load_bn_relu_extension(), load_conv_fwd_extension()
        y, mean, invstd, var = bn_kernel.forward(x, bn_weight, bn_bias, None, eps, sums)
        weight_bf16 = conv_weight.to(torch.bfloat16)  # what autocast would hand the native convolution
        out, out_sums = conv_kernel.convolution_with_sums(y, weight_bf16, 1)
        ctx.save_for_backward(x, y, bn_weight, bn_bias, mean, invstd, weight_bf16)
        ctx.wgrad_mode = wgrad_mode
        ctx.mark_non_differentiable(out_sums, mean, var)
        return out, out_sums, mean, var

    @staticmethod
    def backward(ctx, grad_out, _grad_sums, _grad_mean, _grad_var):
        x, y, bn_weight, bn_bias, mean, invstd, weight_bf16 = ctx.saved_tensors
        bn_kernel = load_bn_relu_extension()
        grad_out = grad_out.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        scale, shift = bn_kernel.affine(bn_weight, bn_bias, mean, invstd)
        grad_y, bn_sums = load_conv_fwd_extension().input_grad_with_bn_sums(grad_out, weight_bf16, x, scale, shift, mean)
        grad_conv_weight = weight_gradient(grad_out, y, weight_bf16, 1, ctx.wgrad_mode) if ctx.needs_input_grad[5] else None
        grad_x, grad_bn_weight, grad_bn_bias = bn_kernel.backward(grad_y, x, None, bn_weight, bn_bias, mean, invstd,
                                                                  bn_sums)
        return grad_x, grad_bn_weight, grad_bn_bias, None, None, grad_conv_weight, None


def _fused_step_applies(bn: nn.Module, conv: nn.Conv2d, x: torch.Tensor) -> bool:
    return (not torch.compiler.is_compiling() and fused_kernels_enabled() and conv.stride == (1, 1)
            and conv3x3_module.FORWARD_KERNEL and fused_kernel_applies(bn, x) and kernels_apply(conv, x)
            and load_conv_fwd_extension() is not None)


def bn_relu_conv3x3(bn: nn.Module, conv: nn.Conv2d, x: torch.Tensor, sums: torch.Tensor | None = None) -> ConvOutput:
    """conv(relu(bn(x))), and the per-channel sums of the result for a `bn_relu` after it (or None).
    `sums`: x's own per-channel sums and sums of squares (from `conv3x3_before_bn`), if at hand."""
    if _fused_step_applies(bn, conv, x):
        out, out_sums, mean, var = _BatchNormReLUConv3x3.apply(x, bn.weight, bn.bias, bn.eps, _usable_sums(sums, x),
                                                               conv.weight, conv3x3_module._wgrad_mode.get())
        _update_running_stats(bn, mean, var, x.numel() // x.shape[1])
        return ConvOutput(out, out_sums)
    result = conv3x3_before_bn(conv, bn_relu(bn, x, sums=sums))
    return ConvOutput(result.out, result.sums)
