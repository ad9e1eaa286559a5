"""The experiments `resnetlab reproduce` knows: each is a list of configs (a name, a model and the
`--set` overrides that make it differ from the recipe), trained once per seed. Every config names
the reference numbers it is compared with (keys into resnetlab/reference/references.json)."""
from __future__ import annotations

from dataclasses import dataclass, field

from resnetlab.errors import ConfigError

# The paper's ResNet-110 warm-up (section 4.2): lr 0.01 until the training error is below 80%
# (about 400 iterations), then 0.1. Applied to every 110-layer config.
WARMUP_110 = ("schedule.warmup.kind=until_error", "schedule.warmup.lr=0.01",
              "schedule.warmup.error_threshold=0.8", "schedule.warmup.cap_steps=400")


@dataclass(frozen=True)
class ExperimentConfig:
    """One row of an experiment's table: `model` trained with `overrides` over the recipe."""

    name: str
    model: str
    overrides: tuple[str, ...] = ()
    group: str = ""  # the panel of the curves plot (e.g. "plain" / "residual")
    note: str = ""


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    source: str  # what in the paper / seeds it reproduces
    configs: tuple[ExperimentConfig, ...]
    note: str = ""
    on_request: tuple[ExperimentConfig, ...] = field(default=())  # only when --models names them

    def select(self, models: list[str] | None) -> list[ExperimentConfig]:
        """The configs whose model or config name is in `models` (all default configs when None)."""
        if not models:
            return list(self.configs)
        pool = self.configs + self.on_request
        chosen = [c for c in pool if c.model in models or c.name in models]
        unknown = sorted(set(models) - {c.model for c in chosen} - {c.name for c in chosen})
        if unknown or not chosen:
            known = sorted({c.model for c in pool} | {c.name for c in pool})
            raise ConfigError(f"experiment {self.name!r} has no model or config {', '.join(unknown) or models}; "
                              f"it has: {', '.join(known)}")
        return chosen


def _depth_overrides(model: str) -> tuple[str, ...]:
    return WARMUP_110 if model.endswith("110") else ()


def _model(model: str, *overrides: str, group: str = "", name: str | None = None, note: str = "") -> ExperimentConfig:
    return ExperimentConfig(name or model, model, _depth_overrides(model) + tuple(overrides), group, note)


def _table6() -> Experiment:
    return Experiment(
        "table6", "CIFAR-10 ResNets by depth",
        "He et al. 2015, Table 6 (and seeds 000/001 for the same depths)",
        tuple(_model(f"resnet{d}", group="residual") for d in (20, 32, 44, 56, 110)),
        note="resnet110 warms up at lr 0.01 until the training error is below 80% (paper section 4.2).",
        on_request=(_model("resnet1202", group="residual"),),
    )


def _degradation() -> Experiment:
    depths = (20, 32, 44, 56)
    return Experiment(
        "degradation", "plain versus residual nets (the degradation problem)",
        "He et al. 2015, Fig. 6 (left: plain nets, middle: ResNets)",
        tuple(_model(f"plain{d}", group="plain") for d in depths)
        + tuple(_model(f"resnet{d}", group="residual") for d in depths),
        note="Expected shape: plain nets get worse with depth (training error too), ResNets get better.",
    )


BLOCK_VARIANTS = {
    "reference": "BN before add, ReLU after add",
    "no_relu": "BN before add, no ReLU after add",
    "bn_after_add": "BN after add, ReLU after add",
    "bn_after_add_no_relu": "BN after add, no ReLU",
    "preact": "pre-activation (He et al. 2016)",
}


def _blocks() -> Experiment:
    configs = tuple(
        _model(f"resnet{d}", f"model.options.block={variant}", group=f"{d} layers", name=f"{variant}-{d}", note=text)
        for d in (20, 110) for variant, text in BLOCK_VARIANTS.items()
    )
    return Experiment("blocks", "building-block ablations", "seed 000 (Torch reproduction), block table", configs)


# Seed 000's solvers and learning rates. The first of each solver is the seed's best one, used by
# `solvers`; `solvers-lrs` runs them all. Adadelta has no learning rate in Torch (lr 1) and no schedule.
SOLVERS = {
    "nesterov": (("0.1",), ("optim.name=sgd", "optim.nesterov=true", "optim.momentum=0.9")),
    "rmsprop": (("1e-2", "1e-4", "1e-3", "1e-1"), ("optim.name=rmsprop", "optim.momentum=0")),
    "adadelta": ((None,), ("optim.name=adadelta", "optim.rho=0.3", "optim.lr=1.0", "schedule.kind=constant")),
    "adagrad": (("1e-1", "1e-3", "1e-2"), ("optim.name=adagrad",)),
}


def _solver_configs(depths: tuple[int, ...], all_lrs: bool) -> tuple[ExperimentConfig, ...]:
    configs = []
    for depth in depths:
        for solver, (lrs, overrides) in SOLVERS.items():
            for lr in lrs if all_lrs else lrs[:1]:
                lr_part = () if lr is None else (f"optim.lr={lr}",)
                name = f"{solver}-lr{lr}-{depth}" if lr is not None else f"{solver}-{depth}"
                configs.append(_model(f"resnet{depth}", *overrides, *lr_part, group=f"{depth} layers", name=name))
    return tuple(configs)


def _solvers(all_lrs: bool) -> Experiment:
    name = "solvers-lrs" if all_lrs else "solvers"
    what = "every learning rate of seed 000" if all_lrs else "seed 000's best learning rate of each"
    return Experiment(
        name, f"solvers ({what})", "seed 000 (Torch reproduction), solver table",
        _solver_configs((20,), all_lrs), on_request=_solver_configs((110,), all_lrs),
        note="RMSprop without momentum, Adadelta rho 0.3 with no lr schedule (as in seed 000). "
             "The 110-layer configs run on request (--models resnet110).",
    )


def _bn_momentum() -> Experiment:
    settings = {"momentum-1": ("bn.momentum=1",), "momentum-0.01": ("bn.momentum=0.01",),
                "momentum-0.1": ("bn.momentum=0.1",), "dynamic": ("bn.policy=dynamic",)}
    return Experiment(
        "bn-momentum", "batch-norm momentum (torch convention: weight of the new batch)",
        "seed 000 (Torch reproduction), BN momentum table",
        tuple(_model("resnet20", *o, name=name, group="20 layers") for name, o in settings.items()),
        note="dynamic: momentum 1/(1+n), n = batches seen this epoch, so the running statistics are the epoch's average.",
    )


def _shortcuts() -> Experiment:
    return Experiment(
        "shortcuts", "shortcut options A/B/C on CIFAR",
        "He et al. 2015, section 3.3 / Table 3 (measured there on ImageNet only)",
        tuple(_model(f"resnet{d}", f"model.options.shortcut={o}", name=f"{o}-{d}", group=f"{d} layers")
              for d in (20, 56) for o in "ABC"),
        note="The paper compares A/B/C on ImageNet (Table 3: C < B < A by small margins); it gives no CIFAR numbers.",
    )


def _responses() -> Experiment:
    depths = (20, 56, 110)
    return Experiment(
        "responses", "layer responses of plain and residual nets",
        "He et al. 2015, Fig. 7 (std of each 3x3 layer's response after BN, before addition/ReLU)",
        tuple(_model(f"plain{d}", group="plain") for d in depths)
        + tuple(_model(f"resnet{d}", group="residual") for d in depths),
        note="Expected shape: ResNets respond less than plain nets, deeper ResNets less still.",
    )


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    _table6(), _degradation(), _blocks(), _solvers(False), _solvers(True), _bn_momentum(), _shortcuts(), _responses(),
)}


def get_experiment(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise ConfigError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}") from None
