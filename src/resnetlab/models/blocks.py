"""Residual building blocks. Every block class has the same constructor, so a stage is built the
same way whatever the block: `Block(in_planes, planes, stride, downsample, residual=, variant=,
stride_in=, preact_input=)`; `expansion` is out_channels / planes.

Post-activation blocks (He et al. 2015) come in the four variants compared in seed 000:
  reference             BN before the addition, ReLU after it
  no_relu               BN before the addition, no ReLU after it
  bn_after_add          BN after the addition, then ReLU
  bn_after_add_no_relu  BN after the addition, no ReLU
The "preact" variant is the pre-activation block of He et al. 2016 (BN-ReLU-conv, nothing after
the addition). `residual=False` drops the addition: the plain networks of the paper.
"""
from __future__ import annotations

import torch
from torch import nn

from resnetlab.kernels import bn_relu, conv3x3_train
from resnetlab.models.layers import conv1x1, conv3x3

POST_ACTIVATION_VARIANTS = ("reference", "no_relu", "bn_after_add", "bn_after_add_no_relu")
VARIANTS = POST_ACTIVATION_VARIANTS + ("preact",)


class _PostActivationBlock(nn.Module):
    """What the four post-activation variants share: they differ only in how the branch's last BN,
    the addition and the final ReLU are ordered (`_merge`)."""

    expansion = 1

    def __init__(self, residual: bool, variant: str):
        super().__init__()
        if variant not in POST_ACTIVATION_VARIANTS:
            raise ValueError(f"unknown post-activation block variant {variant!r}")
        self.residual = residual
        self.variant = variant
        self.bn_after_add = variant.startswith("bn_after_add")
        self.relu_after_add = not variant.endswith("no_relu")

    def _merge(self, branch: torch.Tensor, x: torch.Tensor, last_bn: nn.BatchNorm2d) -> torch.Tensor:
        shortcut = None
        if self.residual:
            shortcut = x if self.downsample is None else self.downsample(x)
            if self.bn_after_add:
                branch, shortcut = branch + shortcut, None
        if self.relu_after_add:
            return bn_relu(last_bn, branch, shortcut)  # relu(bn(branch) [+ shortcut])
        out = last_bn(branch)
        return out if shortcut is None else out + shortcut

    def _zero_init(self, last_conv: nn.Conv2d, last_bn: nn.BatchNorm2d) -> None:
        # Start each residual branch at zero, so the block starts as (close to) the identity
        # (Goyal et al. 2017). When the BN sits after the addition it scales the shortcut too,
        # so the branch's own last layer is the conv.
        nn.init.zeros_(last_conv.weight if self.bn_after_add else last_bn.weight)

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}" + ("" if self.residual else ", residual=False")


class BasicBlock(_PostActivationBlock):
    """Two 3x3 convs (paper Fig. 5 left); the stride sits in the first one."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, *,
                 residual: bool = True, variant: str = "reference", stride_in: str = "1x1", preact_input: bool = True):
        super().__init__(residual, variant)
        # Modules in torchvision's order, so that printed models and state_dicts read the same.
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)  # as in torchvision's module tree; the ReLUs run in bn_relu
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = bn_relu(self.bn1, conv3x3_train(self.conv1, x))
        return self._merge(conv3x3_train(self.conv2, out), x, self.bn2)

    def zero_init_last(self) -> None:
        self._zero_init(self.conv2, self.bn2)


class Bottleneck(_PostActivationBlock):
    """1x1 reduce, 3x3, 1x1 expand (paper Fig. 5 right). `stride_in="1x1"` puts the stride in the
    first 1x1 conv as the paper's Torch code did; "3x3" puts it in the 3x3 conv, which is
    torchvision's "ResNet v1.5" (more multiply-adds, about +0.5% top-1)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, *,
                 residual: bool = True, variant: str = "reference", stride_in: str = "1x1", preact_input: bool = True):
        super().__init__(residual, variant)
        stride_1x1, stride_3x3 = (stride, 1) if stride_in == "1x1" else (1, stride)
        self.conv1 = conv1x1(in_planes, planes, stride_1x1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride_3x3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)  # as in torchvision's module tree; the ReLUs run in bn_relu
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = bn_relu(self.bn1, self.conv1(x))
        out = bn_relu(self.bn2, conv3x3_train(self.conv2, out))
        return self._merge(self.conv3(out), x, self.bn3)

    def zero_init_last(self) -> None:
        self._zero_init(self.conv3, self.bn3)


class _PreActivationBlock(nn.Module):
    """He et al. 2016 ("Identity Mappings in Deep Residual Networks"): BN and ReLU come before each
    conv and nothing follows the addition, so the shortcut path is a pure identity. A projection
    shortcut reads the pre-activated input, as in the authors' code. `preact_input=False` is for the
    first block after a stem that already ends in BN-ReLU (the ImageNet stem)."""

    expansion = 1

    def __init__(self, in_planes: int, residual: bool, preact_input: bool):
        super().__init__()
        self.residual = residual
        self.bn1 = nn.BatchNorm2d(in_planes) if preact_input else None
        self.relu = nn.ReLU(inplace=True)  # as in torchvision's module tree; the ReLUs run in bn_relu

    def _preactivate(self, x: torch.Tensor) -> torch.Tensor:
        # Not in place: the identity shortcut still needs x.
        return x if self.bn1 is None else bn_relu(self.bn1, x)

    def _add_shortcut(self, branch: torch.Tensor, x: torch.Tensor, preactivated: torch.Tensor) -> torch.Tensor:
        if not self.residual:
            return branch
        return branch + (x if self.downsample is None else self.downsample(preactivated))

    def extra_repr(self) -> str:
        return "variant='preact'" + ("" if self.residual else ", residual=False")


class PreActBasicBlock(_PreActivationBlock):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, *,
                 residual: bool = True, variant: str = "preact", stride_in: str = "1x1", preact_input: bool = True):
        super().__init__(in_planes, residual, preact_input)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self._preactivate(x)
        out = conv3x3_train(self.conv1, pre)
        out = conv3x3_train(self.conv2, bn_relu(self.bn2, out))
        return self._add_shortcut(out, x, pre)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv2.weight)  # the branch ends in a conv, not a BN


class PreActBottleneck(_PreActivationBlock):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, *,
                 residual: bool = True, variant: str = "preact", stride_in: str = "1x1", preact_input: bool = True):
        super().__init__(in_planes, residual, preact_input)
        stride_1x1, stride_3x3 = (stride, 1) if stride_in == "1x1" else (1, stride)
        self.conv1 = conv1x1(in_planes, planes, stride_1x1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride_3x3)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self._preactivate(x)
        out = self.conv1(pre)
        out = conv3x3_train(self.conv2, bn_relu(self.bn2, out))
        out = self.conv3(bn_relu(self.bn3, out))
        return self._add_shortcut(out, x, pre)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.weight)


def block_class(kind: str, variant: str) -> type[nn.Module]:
    """The block class for `kind` ("basic" or "bottleneck") and a variant of VARIANTS."""
    if variant == "preact":
        return PreActBasicBlock if kind == "basic" else PreActBottleneck
    return BasicBlock if kind == "basic" else Bottleneck
