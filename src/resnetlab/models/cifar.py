"""CIFAR-10 ResNets and plain nets (paper section 4.2, Table 6): depth 6n+2, three stages of n
basic blocks on 32x32/16x16/8x8 maps with 16/32/64 filters, option-A shortcuts by default."""
from __future__ import annotations

import re

from resnetlab.errors import ResnetlabError
from resnetlab.models.factory import MODELS, ArchSpec, ModelBuilder, register


def cifar_arch(depth: int, plain: bool = False) -> ArchSpec:
    n, rest = divmod(depth - 2, 6)
    if rest or n < 1:
        kind = "plain" if plain else "resnet"
        raise ResnetlabError(
            f"unknown model '{kind}{depth}': CIFAR depths are 6n+2 (8, 14, 20, 26, ...); "
            "ImageNet models are resnet18/34/50/101/152 and plain18/34")
    return ArchSpec("cifar", depth, "basic", (n, n, n), plain)


# The depths of the paper's Table 6 / Fig. 6.
for _depth in (20, 32, 44, 56, 110, 1202):
    register(f"resnet{_depth}", cifar_arch(_depth))
for _depth in (20, 32, 44, 56, 110):
    register(f"plain{_depth}", cifar_arch(_depth, plain=True))


def _any_depth(match: re.Match[str]) -> ModelBuilder:
    kind, depth = match.group(1), int(match.group(2))
    return ModelBuilder(match.group(0), cifar_arch(depth, plain=kind == "plain"))


# Registered names win, so resnet50 and resnet152 (also 6n+2) stay the ImageNet models.
MODELS.register_pattern(r"(resnet|plain)([1-9][0-9]*)", _any_depth)
