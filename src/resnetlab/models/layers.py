"""Small building pieces shared by every ResNet: conv helpers, the three shortcut kinds and the
global pooling. Every piece is a real `nn.Module` (picklable, visible when a model is printed)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BatchNorm follows, its shift is the bias)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A: parameter-free shortcut (He et al. 2015, sections 3.3 and 4.2). Subsamples by taking
    every `stride`-th pixel and zero-pads the new channels, half before and half after the existing
    ones: the layout of akamaster/pytorch_resnet_cifar10, whose released weights load unchanged."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option A can only add channels ({in_channels} -> {out_channels})")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.pad_before = (out_channels - in_channels) // 2
        self.pad_after = out_channels - in_channels - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            # Exactly x[:, :, ::stride, ::stride] (the mean of one pixel is that pixel, in every
            # dtype), but the gradient of a slice is scattered into a new NCHW tensor, while
            # avg_pool2d's keeps the input's memory format: with channels_last the slice sent an
            # NCHW gradient into the end of each stage followed by a downsampling block, where the
            # ReLU, BN and convolution backward passes then took mixed-format paths (about 6 % of a
            # ResNet-20 step: benchmarks/bench_option_a.py).
            x = F.avg_pool2d(x, kernel_size=1, stride=self.stride)
        # F.pad's last pair pads dim 1 (channels) of an NCHW tensor.
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def projection_shortcut(in_channels: int, out_channels: int, stride: int, norm: bool = True) -> nn.Sequential:
    """Options B/C: 1x1 projection (stride 2 where the map shrinks), then BN. Kept as a Sequential so
    that the keys are torchvision's `downsample.0` (conv) and `downsample.1` (BN). Pre-activation
    blocks project their already normalised input, so they use the conv alone (He et al. 2016)."""
    layers: list[nn.Module] = [conv1x1(in_channels, out_channels, stride)]
    if norm:
        layers.append(nn.BatchNorm2d(out_channels))
    return nn.Sequential(*layers)


def make_shortcut(kind: str, in_channels: int, out_channels: int, stride: int, norm: bool = True) -> nn.Module | None:
    """The shortcut module of one block for option `kind` ("A", "B" or "C"); None means identity."""
    reshapes = stride != 1 or in_channels != out_channels
    if kind == "C" or (kind == "B" and reshapes):
        return projection_shortcut(in_channels, out_channels, stride, norm)
    if kind == "A" and reshapes:
        return ZeroPadShortcut(in_channels, out_channels, stride)
    return None


class GlobalAvgPool(nn.Module):
    """Average over the whole feature map with `avg_pool2d`, as the CIFAR code of the paper's
    PyTorch reproductions does; it is bit-for-bit what their released weights were evaluated with
    (`AdaptiveAvgPool2d` sums in another order, so its last bit can differ)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, kernel_size=x.shape[-2:])
