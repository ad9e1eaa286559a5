"""The model registry: names -> architectures, options checked once, `create_model`/`list_models`/
`model_info`. The families register their names in cifar.py and imagenet.py."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from resnetlab.errors import ConfigError
from resnetlab.models.blocks import VARIANTS
from resnetlab.models.resnet import ResNet, ResNetConfig
from resnetlab.registry import Registry


@dataclass(frozen=True)
class Family:
    input_size: tuple[int, int, int]
    num_classes: int
    stage_widths: tuple[int, ...]
    stem: str
    shortcut: str  # the paper's default option for this family


FAMILIES = {
    # Paper section 4.2: 32x32 inputs, stages of 16/32/64 filters, option A everywhere.
    "cifar": Family((3, 32, 32), 10, (16, 32, 64), stem="cifar", shortcut="A"),
    # Paper Table 1: 224x224 crops, 64..512 planes; option B for the tables' ResNets.
    "imagenet": Family((3, 224, 224), 1000, (64, 128, 256, 512), stem="imagenet", shortcut="B"),
}


@dataclass(frozen=True)
class ArchSpec:
    """What a registered name fixes: the family and the layer stack; options vary the rest."""

    family: str
    depth: int
    block: str  # "basic" | "bottleneck"
    stage_blocks: tuple[int, ...]
    plain: bool = False


@dataclass(frozen=True)
class ModelOptions:
    """The `create_model` options; None means the family's default."""

    shortcut: str | None = None
    block: str = "reference"
    stride_in: str = "1x1"
    zero_init_residual: bool = False
    width: float = 1.0
    in_channels: int = 3


_CHOICES = {"shortcut": ("A", "B", "C"), "block": VARIANTS, "stride_in": ("1x1", "3x3")}
OPTION_NAMES = tuple(field.name for field in dataclasses.fields(ModelOptions))


class ModelBuilder:
    """The registered callable of one model name: `builder(num_classes=None, **options)`."""

    def __init__(self, name: str, spec: ArchSpec):
        self.name, self.spec = name, spec

    def __call__(self, num_classes: int | None = None, **options: Any) -> ResNet:
        model = ResNet(self.config(num_classes, **options))
        model.default_cfg = self.default_cfg(model.cfg, width=options.get("width") or 1.0)
        return model

    def config(self, num_classes: int | None = None, **options: Any) -> ResNetConfig:
        """Check the options (ConfigError naming the first bad one) and resolve the layer config."""
        family = FAMILIES[self.spec.family]
        opts = _check_options(self.name, options)
        if self.spec.plain and opts.shortcut is not None:
            raise ConfigError(f"model option 'shortcut' does not apply to {self.name}: plain nets have no shortcuts")
        if self.spec.plain and opts.zero_init_residual:
            raise ConfigError(f"model option 'zero_init_residual' does not apply to {self.name}: it has no residual branch")
        num_classes = family.num_classes if num_classes is None else num_classes
        _check_positive_int("num_classes", num_classes)
        widths = tuple(round(w * opts.width) for w in family.stage_widths)
        if min(widths) < 1:
            raise ConfigError(f"model option 'width' = {opts.width} leaves a stage with no channels")
        return ResNetConfig(
            stem=family.stem, block=self.spec.block, stage_blocks=self.spec.stage_blocks, stage_widths=widths,
            num_classes=num_classes, in_channels=opts.in_channels,
            shortcut=None if self.spec.plain else (opts.shortcut or family.shortcut),
            variant=opts.block, stride_in=opts.stride_in, zero_init_residual=opts.zero_init_residual,
        )

    def info(self) -> dict[str, Any]:
        family = FAMILIES[self.spec.family]
        return {
            "name": self.name, "family": self.spec.family, "depth": self.spec.depth, "block_type": self.spec.block,
            "stage_blocks": list(self.spec.stage_blocks), "plain": self.spec.plain,
            "input_size": list(family.input_size), "num_classes": family.num_classes,
            "shortcut": None if self.spec.plain else family.shortcut,
        }

    def default_cfg(self, cfg: ResNetConfig, width: float) -> dict[str, Any]:
        """The family hint every model carries (like timm's `default_cfg`): `info()` for this
        instance plus the options it was built with, JSON-ready, so evaluation code knows its input
        size and `create_model(name, num_classes=..., **options)` rebuilds it."""
        info = self.info()
        info["input_size"][0] = cfg.in_channels
        options = {"shortcut": cfg.shortcut, "block": cfg.variant, "stride_in": cfg.stride_in,
                   "zero_init_residual": cfg.zero_init_residual, "width": width, "in_channels": cfg.in_channels}
        return {**info, "num_classes": cfg.num_classes, "shortcut": cfg.shortcut, "options": options}


def _check_options(model_name: str, options: dict[str, Any]) -> ModelOptions:
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ConfigError(f"unknown model option {unknown[0]!r} for {model_name}; known: {', '.join(OPTION_NAMES)}")
    given = {key: value for key, value in options.items() if value is not None}
    for key, choices in _CHOICES.items():
        if key in given and given[key] not in choices:
            raise ConfigError(f"model option {key!r} must be one of {', '.join(map(repr, choices))}, got {given[key]!r}")
    if "zero_init_residual" in given and not isinstance(given["zero_init_residual"], bool):
        raise ConfigError(f"model option 'zero_init_residual' must be true or false, got {given['zero_init_residual']!r}")
    if "width" in given and (isinstance(given["width"], bool) or not isinstance(given["width"], (int, float))
                             or not given["width"] > 0):
        raise ConfigError(f"model option 'width' must be a positive number, got {given['width']!r}")
    if "in_channels" in given:
        _check_positive_int("in_channels", given["in_channels"])
    return ModelOptions(**given)


def _check_positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model option {key!r} must be a positive integer, got {value!r}")


MODELS: Registry[nn.Module] = Registry("model")


def register(name: str, spec: ArchSpec) -> None:
    MODELS.register(name)(ModelBuilder(name, spec))


def create_model(name: str, num_classes: int | None = None, **options: Any) -> ResNet:
    """Build a registered model, e.g. `create_model("resnet56")`, `create_model("resnet50",
    stride_in="3x3")`, `create_model("plain20", block="no_relu")`. `num_classes` defaults to the
    family's (10 CIFAR, 1000 ImageNet). ResnetlabError for an unknown name, ConfigError for a bad
    option. Build on the meta device (`with torch.device("meta"):`) to count without allocating."""
    return MODELS.get(name)(num_classes=num_classes, **options)


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching the fnmatch `pattern`, CIFAR first, each family by depth. Other
    CIFAR depths (6n+2: resnet8, resnet164, plain14...) resolve by name without being listed."""
    return MODELS.names(pattern)


def model_info(name: str) -> dict[str, Any]:
    """Family, depth, block kind, native input size and default classes of a model, without
    building it: {"name", "family", "depth", "block_type" ("basic"/"bottleneck"), "stage_blocks", "plain", "input_size",
    "num_classes", "shortcut"}."""
    return MODELS.get(name).info()
