"""bf16 channels_last tensors and one training pass of a 3x3 convolution through
`conv3x3_train`, for the convolution-kernel tests."""
from __future__ import annotations

import torch
from torch import nn

from resnetlab.kernels import conv3x3_train, fused_bn_relu


def channels_last_bf16(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


def train_conv3x3(stride: int) -> tuple[nn.Conv2d, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 16 -> 32 convolution's forward and backward pass on a bf16 channels_last batch inside the
    fused-kernel context: (conv, x, out, grad_out), with x.grad and conv.weight.grad filled."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, stride=stride, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = channels_last_bf16(4, 16, 12, 12, seed=2).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16), fused_bn_relu():
        out = conv3x3_train(conv, x)
    grad_out = channels_last_bf16(*out.shape, seed=3)
    out.backward(grad_out)
    return conv, x, out, grad_out
