"""relu(batch_norm(x) [+ residual]) as one fused CPU kernel in training mode, with the native
operators as the fallback everywhere else (CUDA, fp32, NCHW, eval mode, torch.compile, SyncBN...).

The running statistics are updated here, in Python, exactly as `nn.BatchNorm2d` does: reading
`bn.momentum` at every call, so the momentum policies of `engine/bn.py` work unchanged.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.kernels.build import load_bn_relu_extension

CHANNEL_COUNTS = (16, 32, 64, 128, 256, 512, 1024, 2048)  # the kernel's compiled widths
_ROW_LANES = 32  # the kernel walks rows of max(C, 32) values

_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("resnetlab_fused_bn_relu", default=False)


@contextlib.contextmanager
def fused_bn_relu(enabled: bool = True):
    """Within this context `bn_relu` uses the fused kernel wherever it applies, and `conv3x3_train`
    (kernels/conv3x3.py) its weight-gradient kernel."""
    token = _enabled.set(enabled)
    try:
        yield
    finally:
        _enabled.reset(token)


def fused_kernels_enabled() -> bool:
    """Whether the calling code runs inside `fused_bn_relu()`."""
    return _enabled.get()


class _BatchNormReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps):
        y, mean, invstd, var = load_bn_relu_extension().forward(x, weight, bias, residual, eps)
        # Without a residual the backward pass recomputes the ReLU mask from x: y is not kept.
        ctx.save_for_backward(x, y if residual is not None else None, weight, bias, mean, invstd)
        ctx.has_residual = residual is not None
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, y, weight, bias, mean, invstd = ctx.saved_tensors
        grad_y = grad_y.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        grads = load_bn_relu_extension().backward(grad_y, x, y, weight, bias, mean, invstd)
        grad_residual = grads[3] if ctx.has_residual else None
        return grads[0], grads[1], grads[2], grad_residual, None


def _same_layout(t: torch.Tensor, x: torch.Tensor) -> bool:
    return t.dtype == x.dtype and t.shape == x.shape and t.is_contiguous(memory_format=torch.channels_last)


def fused_kernel_applies(bn: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """Whether `bn_relu(bn, x, residual)` would run the fused kernel (inside `fused_bn_relu()`)."""
    return (type(bn) is nn.BatchNorm2d  # not SyncBatchNorm nor other subclasses with their own forward
            and bn.training and bn.affine and bn.weight.dtype == torch.float32
            and x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() == 4
            and x.shape[1] in CHANNEL_COUNTS and x.numel() % max(x.shape[1], _ROW_LANES) == 0
            and x.is_contiguous(memory_format=torch.channels_last)
            and (residual is None or _same_layout(residual, x))
            and load_bn_relu_extension() is not None)


def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    if bn.running_mean is None:  # track_running_stats=False: batch statistics only, nothing to keep
        return
    bn.num_batches_tracked.add_(1)
    # torch's convention: momentum is the weight of the new batch; None means a cumulative average
    factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    with torch.no_grad():
        bn.running_mean.lerp_(mean, factor)
        bn.running_var.lerp_(var * (count / max(count - 1, 1)), factor)  # the unbiased estimate, as torch keeps


def bn_relu(bn: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """relu(bn(x) + residual), or relu(bn(x)) without a residual."""
    # is_compiling first: under torch.compile (and FX tracing) the native operators are what traces
    if not torch.compiler.is_compiling() and _enabled.get() and fused_kernel_applies(bn, x, residual):
        y, mean, var = _BatchNormReLU.apply(x, bn.weight, bn.bias, residual, bn.eps)
        _update_running_stats(bn, mean, var, x.numel() // x.shape[1])
        return y
    out = bn(x)
    if residual is not None:
        out = out + residual
    return F.relu(out, inplace=True)
