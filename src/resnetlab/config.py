"""The typed, frozen configuration of one training run.

A run is described by one `RunConfig`: a recipe (a named or YAML partial config) merged over the
defaults, then command-line flags, then `--set section.key=value` overrides. The defaults are the
paper's CIFAR-10 recipe (He et al. 2015, section 4.2). Every section forbids unknown keys, so a typo
is an error naming the dotted key instead of a silently ignored setting.
"""
from __future__ import annotations

import copy
import difflib
import math
import re
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from resnetlab.errors import ConfigError, ResnetlabError


_EXPONENT_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info) -> Any:
        # pydantic's lax mode reads `true` as 1; `--set train.batch_size=true` is a typo, not a size.
        if isinstance(value, bool) and _is_number_type(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number, got a boolean")
        return value


def _is_number_type(annotation: Any) -> bool:
    """True for int, float and their optional forms (`int | None`): fields where a bool is a mistake."""
    members = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    numbers = [m for m in members if m is not type(None)]
    return bool(numbers) and all(m in (int, float) for m in numbers)


class ModelSection(_Section):
    name: str = "resnet20"
    # Passed to create_model(name, **options); checked there (shortcut, block, width...).
    options: dict[str, Any] = Field(default_factory=dict)
    num_classes: int | None = Field(default=None, ge=1)  # None: the data set's number of classes


class DataSection(_Section):
    dir: str | None = None  # None: $RESNETLAB_CACHE/data, downloaded when absent
    download: bool = True
    val_size: int = Field(default=5000, ge=0)  # the paper's 45k/5k split; 0 trains on everything
    split_seed: int = 0
    normalization: Literal["per_pixel", "per_channel"] = "per_pixel"  # paper: per-pixel mean
    crop_padding: int = Field(default=4, ge=0)
    padding_mode: Literal["zeros", "reflect"] = "zeros"
    flip: bool = True
    # "random" (each epoch, probability 1/2) or "alternate" (every other epoch per image, cifar pipeline)
    flip_mode: Literal["random", "alternate"] = "random"
    cutout: int = Field(default=0, ge=0)
    skip_bad_images: bool = False
    # Seeded random subsets, for tests and quick looks (None: everything).
    limit_train: int | None = Field(default=None, ge=1)
    limit_val: int | None = Field(default=None, ge=1)
    # "cifar": every image in memory, batched augmentation on the device (crop_padding, cutout).
    # "imagenet": image folders decoded per image in DataLoader workers with the paper's scale
    # augmentation (He et al. 2015, section 3.4); the keys below apply to it only.
    pipeline: Literal["cifar", "imagenet"] = "cifar"
    image_size: int = Field(default=224, ge=1)  # training crop and validation centre crop
    scale_range: tuple[int, int] = (256, 480)  # training: shorter side drawn uniformly from [lo, hi]
    eval_resize: int = Field(default=256, ge=1)  # validation: shorter side, then the centre crop
    color_pca: float = Field(default=0.1, ge=0, allow_inf_nan=False)  # AlexNet PCA noise std; 0 = off
    workers: int | None = Field(default=None, ge=0)  # decoding processes; None: min(8, CPU cores)

    @model_validator(mode="after")
    def _crops_fit(self) -> "DataSection":
        low, high = self.scale_range
        if not self.image_size <= low <= high:
            raise ValueError(f"need image_size <= scale_range[0] <= scale_range[1], "
                             f"got {self.image_size}, {list(self.scale_range)}")
        if self.eval_resize < self.image_size:
            raise ValueError(f"eval_resize ({self.eval_resize}) must be at least image_size ({self.image_size})")
        if self.flip_mode == "alternate" and (self.pipeline != "cifar" or not self.flip):
            raise ValueError("flip_mode 'alternate' needs flip: true and the cifar pipeline")
        return self


class OptimSection(_Section):
    name: Literal["sgd", "rmsprop", "adagrad", "adadelta", "adam", "adamw"] = "sgd"
    lr: float = Field(default=0.1, gt=0, allow_inf_nan=False)
    momentum: float = Field(default=0.9, ge=0, allow_inf_nan=False)
    nesterov: bool = False
    weight_decay: float = Field(default=1e-4, ge=0, allow_inf_nan=False)
    no_wd_bn_bias: bool = False  # no weight decay on BN weights/biases and fc bias
    betas: tuple[float, float] = (0.9, 0.999)  # adam/adamw
    eps: float = Field(default=1e-8, gt=0, allow_inf_nan=False)
    alpha: float = Field(default=0.99, ge=0, le=1)  # rmsprop smoothing
    rho: float = Field(default=0.9, ge=0, le=1)  # adadelta
    # lr as given ("none"), or scaled with the global batch (train.batch_size) relative to
    # lr_reference_batch: "linear" multiplies by batch/reference (Goyal et al. 2017), "sqrt" by its
    # square root. The factor applies to every lr of the schedule (warm-up, min_lr, one-cycle max_lr).
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    lr_reference_batch: int = Field(default=128, ge=1)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError("both betas must lie in [0, 1)")
        return betas


class WarmupSection(_Section):
    """Warm-up before the main schedule. constant/until_error hold `lr`; linear rises from `lr`
    (default 0) to the schedule's value at the end of the warm-up."""

    kind: Literal["none", "constant", "linear", "until_error"] = "none"
    lr: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    length: float = Field(default=0, ge=0, allow_inf_nan=False)  # in `unit`; constant/linear
    unit: Literal["steps", "epochs"] = "epochs"
    # until_error (paper section 4.2, ResNet-110): warm up until the training error of a batch falls
    # below the threshold, but never longer than cap_steps.
    error_threshold: float = Field(default=0.8, gt=0, le=1)
    cap_steps: int = Field(default=400, ge=1)

    @model_validator(mode="after")
    def _complete(self) -> "WarmupSection":
        if self.kind in ("constant", "until_error") and self.lr is None:
            raise ValueError(f"warm-up kind {self.kind!r} needs warmup.lr")
        if self.kind in ("constant", "linear") and self.length <= 0:
            raise ValueError(f"warm-up kind {self.kind!r} needs warmup.length > 0")
        return self


class OneCycleSection(_Section):
    """One-cycle (Smith 2018; torch's OneCycleLR conventions)."""

    max_lr: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # None: optim.lr
    pct_start: float = Field(default=0.3, gt=0, lt=1)
    div_factor: float = Field(default=25.0, gt=0, allow_inf_nan=False)
    final_div_factor: float = Field(default=1e4, gt=0, allow_inf_nan=False)
    anneal: Literal["cos", "linear"] = "cos"
    cycle_momentum: bool = True
    base_momentum: float = Field(default=0.85, ge=0, le=1)  # at the lr peak
    max_momentum: float = Field(default=0.95, ge=0, le=1)  # at the start and the end


class PlateauSection(_Section):
    """kind plateau: the lr is multiplied by gamma (never below min_lr) when the epoch's error
    plateaus (He et al. 2015, section 3.4), in torch ReduceLROnPlateau's terms: an epoch that does
    not beat the best error by more than `threshold` (absolute) is bad; after more than `patience`
    bad epochs in a row the lr decays, then `cooldown` epochs are not counted."""

    metric: Literal["val_error", "train_error"] = "val_error"  # top-1, of the whole epoch / validation split
    patience: int = Field(default=5, ge=0)
    threshold: float = Field(default=0.001, ge=0, allow_inf_nan=False)
    cooldown: int = Field(default=0, ge=0)


class ScheduleSection(_Section):
    kind: Literal["multistep", "cosine", "onecycle", "constant", "linear", "plateau"] = "multistep"
    # Paper: lr / 10 at 32k and 48k iterations.
    milestones: list[float] = Field(default_factory=lambda: [32000, 48000])
    unit: Literal["steps", "epochs"] = "steps"
    gamma: float = Field(default=0.1, gt=0, allow_inf_nan=False)
    min_lr: float = Field(default=0.0, ge=0, allow_inf_nan=False)  # end of cosine/linear decay; plateau's floor
    warmup: WarmupSection = Field(default_factory=WarmupSection)
    onecycle: OneCycleSection = Field(default_factory=OneCycleSection)
    plateau: PlateauSection = Field(default_factory=PlateauSection)

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, milestones: list[float]) -> list[float]:
        if any(m < 0 or not math.isfinite(m) for m in milestones) or milestones != sorted(milestones):
            raise ValueError("milestones must be finite, >= 0 and increasing")
        return milestones

    @model_validator(mode="after")
    def _no_double_warmup(self) -> "ScheduleSection":
        if self.kind == "onecycle" and self.warmup.kind != "none":
            raise ValueError("one-cycle has its own warm-up (onecycle.pct_start); set warmup.kind to none")
        return self


class BNSection(_Section):
    # torch convention: momentum = weight of the new batch. "dynamic": 1/(1+n), n = batches seen
    # this epoch, reset every epoch (seed 000), i.e. the running stats are the epoch's average.
    policy: Literal["fixed", "dynamic"] = "fixed"
    momentum: float = Field(default=0.1, ge=0, le=1)
    reestimate: bool = False  # recompute running statistics over the training set after training
    reestimate_batches: int | None = Field(default=None, ge=1)  # None: one pass over the training set


class TrainSection(_Section):
    # The budget: `epochs`, `steps` or both (training stops at whichever comes first).
    epochs: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    steps: int | None = Field(default=64000, ge=1)  # paper: stop at 64k iterations
    # The global batch: images per optimizer step, summed over all processes (torchrun) and the
    # accumulation micro-steps; each process computes batch_size / (world_size * accum_steps) at once.
    batch_size: int = Field(default=128, ge=1)
    accum_steps: int = Field(default=1, ge=1)  # gradient accumulation: micro-batches per optimizer step
    sync_bn: bool = False  # with several processes, BN statistics over the global (micro-)batch
    drop_last: bool = False
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    ema_decay: float | None = Field(default=None, gt=0, lt=1)  # EMA of weights, evaluated instead
    seed: int = 0
    log_every_steps: int = Field(default=50, ge=1)
    checkpoint_every_steps: int | None = Field(default=None, ge=1)  # besides every epoch
    eval_batch_size: int = Field(default=512, ge=1)
    eval_tta: Literal["none", "flip", "flip-shift"] = "none"  # flip-shift: 10 views (data.augment)
    # After the last epoch, the final model is also evaluated on the validation split with each of these
    # test-time augmentations, in fp32 as `resnetlab eval` does: summary.json "final_tta" and the last line.
    final_tta: tuple[Literal["flip", "flip-shift"], ...] = ()

    @model_validator(mode="after")
    def _has_budget(self) -> "TrainSection":
        if self.epochs is None and self.steps is None:
            raise ValueError("set train.epochs or train.steps")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"train.batch_size {self.batch_size} is not a multiple of "
                             f"train.accum_steps {self.accum_steps}")
        return self


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


class RuntimeSection(_Section):
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"
    # torch.compile of the model. auto: on for single-process CUDA training (where Triton can
    # compile), in CUDA-graph mode (fast-cifar ResNet-20 on an H200:
    # 30 epochs in 140 s with CUDA graphs, compile included; eager took 225 s for 29 of them;
    # benchmarks/RESULTS-cuda.md); off on the CPU, where the eager step with the fused BN kernel is
    # faster (benchmarks/RESULTS.md).
    compile: bool | Literal["auto"] = "auto"
    # torch.compile's mode. "reduce-overhead" records CUDA graphs on CUDA (one launch per step instead
    # of hundreds: what launch-bound small nets need); on the CPU it compiles as "default" does.
    # auto: reduce-overhead on CUDA, default elsewhere.
    compile_mode: Literal[("auto", *COMPILE_MODES)] = "auto"
    threads: int | None = Field(default=None, ge=1)  # torch intra-op threads; None: torch's default
    # BN + (residual addition +) ReLU as one C++ kernel (resnetlab/kernels), built on first use,
    # and with it the weight gradient of the 3x3 convolutions from a C++ kernel where the CPU has
    # AVX-512 BF16 (kernels/conv3x3.py). auto: on for CPU training in bf16 channels_last without
    # compile, where it is measured faster and the BN kernel builds; true: required (an error where
    # it can't run); false: native operators.
    fused_bn: bool | Literal["auto"] = "auto"
    # Where the 3x3 convolutions' weight gradient comes from while fused_bn is on: "kernel" (the
    # AVX-512 BF16 kernel, fp32 result), "kernel-bf16" (the same, rounded to bf16 as oneDNN's bf16
    # gradient is) or "native" (oneDNN). auto: "kernel" where the CPU has AVX-512 BF16.
    conv_wgrad: Literal["auto", "kernel", "kernel-bf16", "native"] = "auto"
    # The stride-1 3x3 convolutions' forward passes and input gradients, and from 32 channels their
    # weight gradients, by Winograd F(2x2, 3x3) while fused_bn is on (kernels/conv_winograd*.cpp):
    # 2.25x fewer multiply-adds, about three times the direct kernel's rounding error. auto: on where
    # the CPU has AVX-512 BF16; false: the direct kernels.
    conv_winograd: bool | Literal["auto"] = "auto"

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return device


class RunConfig(_Section):
    """Everything that determines a training run (besides the data files and the code)."""

    recipe: str | None = None  # provenance: the recipe this config started from
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    bn: BNSection = Field(default_factory=BNSection)
    train: TrainSection = Field(default_factory=TrainSection)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)
    out: str | None = None  # the run directory

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with dotted-key changes, validated: `cfg.replace(**{"train.epochs": 2})`."""
        data = self.to_dict()
        for key, value in changes.items():
            _set_dotted(data, key, value)
        return validate_config(data)


# --- building a config ------------------------------------------------------------------------------

def validate_config(data: dict) -> RunConfig:
    """A RunConfig from a (possibly partial) nested dict; ConfigError with one line naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_one_line(error)) from None
    _check_model(config.model)
    return config


def _check_model(model: ModelSection) -> None:
    """Resolve the model's options without building it (the registry checks them)."""
    from resnetlab.models import MODELS

    try:
        MODELS.get(model.name).config(model.num_classes, **model.options)
    except ResnetlabError as error:
        key = "model.options" if "model option" in str(error) else "model.name"
        raise ConfigError(f"invalid value for {key!r}: {error}") from None


def build_config(
    recipe: str | None = None,
    recipe_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    **flags: Any,
) -> RunConfig:
    """defaults <- named recipe <- recipe file <- flags (dotted keys, None = not given) <- overrides
    ("section.key=value", value parsed as YAML)."""
    data: dict = {}
    if recipe is not None:
        from resnetlab.experiments.recipes import get_recipe

        data = deep_merge(data, get_recipe(recipe).config)
        data["recipe"] = recipe
    if recipe_file is not None:
        data = deep_merge(data, read_recipe_file(recipe_file))
    for key, value in flags.items():
        if value is not None:
            _set_dotted(data, key, value)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    return validate_config(data)


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int):
        super().__init__(f"key {key!r} appears twice (line {line})")
        self.key, self.line = key, line


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping: YAML would keep the last one silently,
    so `lr: 0.1` further down a file could override a value the user is looking at."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise DuplicateKeyError(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """yaml.safe_load that raises DuplicateKeyError for a key repeated in a mapping."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def read_recipe_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = load_yaml(path.read_text())
    except DuplicateKeyError as error:
        raise ConfigError(f"recipe file {path}: {error}") from None
    except OSError as error:
        raise ConfigError(f"cannot read recipe file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"recipe file {path} is not UTF-8 text (is it a YAML file?)") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"recipe file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe file {path} must hold a mapping of config sections")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """"optim.lr=0.05" -> ("optim.lr", 0.05); the value is read as YAML (so 1e-3, true, null,
    [80, 160] work); text YAML cannot read stays a string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
    return key, value


def deep_merge(base: dict, update: dict) -> dict:
    """A new dict: `update` over `base`, merging nested mappings (lists and scalars are replaced).
    Nothing of either argument is shared with the result."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _set_dotted(data: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {'.'.join(parents[: i + 1])!r} is a value, not a section")
        node = child
    node[leaf] = value


def _one_line(error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    key, known = _dotted_key(first["loc"])
    if first["type"] == "extra_forbidden":
        parent, _, leaf = key.rpartition(".")
        close = difflib.get_close_matches(leaf, known, n=1)
        hint = f"; did you mean {'.'.join(filter(None, (parent, close[0])))!r}?" if close else (f"; known: {', '.join(known)}" if known else "")
        return f"unknown config key {key!r}{hint}"
    message = first["msg"].removeprefix("Value error, ")
    if "input" in first and first["type"] != "missing" and not isinstance(first["input"], dict):
        message += f" (got {first['input']!r})"
    return f"invalid value for {key!r}: {message}" if key else f"invalid config: {message}"


def _dotted_key(loc: tuple) -> tuple[str, list[str]]:
    """Follow `loc` through the section models: the dotted config key and the sibling keys known
    at its level. Union-member tags pydantic appends are dropped."""
    model: type[BaseModel] | None = RunConfig
    parts: list[str] = []
    known = list(RunConfig.model_fields)
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else str(item)
            continue
        if model is None:
            if parts and parts[-1].endswith("options"):
                parts.append(str(item))
            break
        fields = model.model_fields
        known = list(fields)
        parts.append(str(item))
        if item not in fields:
            break
        annotation = fields[item].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return ".".join(parts), known
