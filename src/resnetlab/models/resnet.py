"""The ResNet body shared by both families: stem, stages of blocks, pooling, classifier, init.

Attribute names follow torchvision (`conv1, bn1, layer1.0.conv1, ..., layer2.0.downsample.0/1,
fc`), so ImageNet state_dicts are interchangeable with torchvision's and CIFAR ones use the same
scheme with three stages.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from resnetlab.kernels import bn_relu
from resnetlab.models.blocks import block_class
from resnetlab.models.layers import GlobalAvgPool, conv3x3, make_shortcut


@dataclass(frozen=True)
class ResNetConfig:
    """Everything that fixes a network's layers. `shortcut=None` builds a plain network."""

    stem: str  # "cifar": 3x3 conv; "imagenet": 7x7/2 conv + 3x3/2 max-pool
    block: str  # "basic" | "bottleneck"
    stage_blocks: tuple[int, ...]
    stage_widths: tuple[int, ...]  # planes of each stage; a bottleneck outputs 4x as many
    num_classes: int
    in_channels: int = 3
    shortcut: str | None = "A"
    variant: str = "reference"
    stride_in: str = "1x1"
    zero_init_residual: bool = False


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.cfg = cfg
        preact = cfg.variant == "preact"
        width = cfg.stage_widths[0]
        if cfg.stem == "imagenet":
            self.conv1 = nn.Conv2d(cfg.in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = conv3x3(cfg.in_channels, width)
        # The pre-activation CIFAR net feeds the stem conv straight into the first block's BN-ReLU
        # (He et al. 2016); the ImageNet stem keeps its BN-ReLU before the max-pool in both kinds.
        self.bn1 = None if preact and cfg.stem == "cifar" else nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)  # as in torchvision's module tree; the ReLUs run in bn_relu
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if cfg.stem == "imagenet" else None

        self.stage_names = tuple(f"layer{i + 1}" for i in range(len(cfg.stage_blocks)))
        in_planes = width
        for i, (name, blocks, planes) in enumerate(zip(self.stage_names, cfg.stage_blocks, cfg.stage_widths)):
            # A stem that ends in BN-ReLU has already pre-activated the first block's input.
            first_preact = not (i == 0 and self.bn1 is not None)
            stage, in_planes = self._make_stage(in_planes, planes, blocks, 1 if i == 0 else 2, first_preact)
            setattr(self, name, stage)

        # A pre-activation net ends its last block with a bare addition: BN-ReLU before pooling.
        self.final_bn = nn.BatchNorm2d(in_planes) if preact else None
        # The CIFAR pooling is the reproductions' avg_pool2d, torchvision's adaptive one for ImageNet:
        # each is bit-for-bit what the released weights of that family were run with.
        self.avgpool = GlobalAvgPool() if cfg.stem == "cifar" else nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_planes, cfg.num_classes)
        self.reset_parameters()

    def _make_stage(self, in_planes: int, planes: int, blocks: int, stride: int, first_preact: bool):
        """`blocks` blocks, the first one with `stride`; returns (stage, its output channels)."""
        cfg = self.cfg
        block = block_class(cfg.block, cfg.variant)
        out_planes = planes * block.expansion
        layers = []
        for i in range(blocks):
            block_stride = stride if i == 0 else 1
            downsample = None
            if cfg.shortcut is not None:
                downsample = make_shortcut(cfg.shortcut, in_planes, out_planes, block_stride,
                                           norm=cfg.variant != "preact")
            layers.append(block(in_planes, planes, block_stride, downsample, residual=cfg.shortcut is not None,
                                variant=cfg.variant, stride_in=cfg.stride_in, preact_input=first_preact or i > 0))
            in_planes = out_planes
        return nn.Sequential(*layers), in_planes

    def reset_parameters(self) -> None:
        """He et al. 2015 normal init for convs (fan-out, as torchvision), BN as the identity; the
        classifier keeps PyTorch's default uniform init (as torchvision does)."""
        if self.fc.weight.is_meta:  # no values to set; meta models only count params and MACs
            return
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.cfg.zero_init_residual:
            for module in self.modules():
                if hasattr(module, "zero_init_last"):
                    module.zero_init_last()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, before pooling."""
        x = self.conv1(x)
        if self.bn1 is not None:
            x = bn_relu(self.bn1, x)
        if self.maxpool is not None:
            x = self.maxpool(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        if self.final_bn is not None:
            x = bn_relu(self.final_bn, x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))
