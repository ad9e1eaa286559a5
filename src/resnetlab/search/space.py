"""The search space: one declaration of the tuned config keys, shared by every method. Optuna
samplers read it as distributions; the genetic algorithm draws genes from it."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from resnetlab.config import DuplicateKeyError, load_yaml
from resnetlab.errors import ConfigError

# Momentum at or above 1 makes SGD's velocity grow without bound (the step is a geometric sum
# with ratio >= 1), so such trials diverge; seed 004 searched 0.1..1.5 all the same.
SAFE_MOMENTUM_MAX = 0.99


@dataclass(frozen=True)
class Param:
    """One tuned value: the dotted RunConfig key and its range (log-uniform when `log`)."""

    key: str
    low: float
    high: float
    log: bool = False

    def __post_init__(self):
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ConfigError(f"search space {self.key!r}: need finite low < high, got {self.low}..{self.high}")
        if self.log and self.low <= 0:
            raise ConfigError(f"search space {self.key!r}: a log range needs low > 0, got {self.low}")

    def sample(self, rng: np.random.Generator) -> float:
        if self.log:
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return float(rng.uniform(self.low, self.high))

    def distribution(self):
        import optuna

        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log)


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def distributions(self) -> dict:
        return {p.key: p.distribution() for p in self.params}

    def sample(self, rng: np.random.Generator) -> dict[str, float]:
        return {p.key: p.sample(rng) for p in self.params}

    def suggest(self, trial) -> dict[str, float]:
        return {p.key: trial.suggest_float(p.key, p.low, p.high, log=p.log) for p in self.params}

    def to_dict(self) -> dict:
        return {p.key: {"low": p.low, "high": p.high, "log": p.log} for p in self.params}


def seed004_space(allow_unsafe_momentum: bool = False) -> SearchSpace:
    """Seed 004's ranges: lr 1e-6..1e-2 (log), weight decay 0..0.1, momentum 0.1..1.5; momentum
    is capped at 0.99 unless `allow_unsafe_momentum`."""
    return SearchSpace((
        Param("optim.lr", 1e-6, 1e-2, log=True),
        Param("optim.weight_decay", 0.0, 0.1),
        Param("optim.momentum", 0.1, 1.5 if allow_unsafe_momentum else SAFE_MOMENTUM_MAX),
    ))


def load_space(path: str | Path) -> SearchSpace:
    """A YAML mapping `dotted.key: {low: .., high: .., log: bool}`, e.g.
    `optim.lr: {low: 1e-4, high: 0.3, log: true}`."""
    try:
        data = load_yaml(Path(path).read_text())
    except DuplicateKeyError as error:
        raise ConfigError(f"search space {path}: {error}") from None
    except OSError as error:
        raise ConfigError(f"cannot read search space {path}: {error.strerror or error}") from None
    except yaml.YAMLError:
        raise ConfigError(f"search space {path} is not valid YAML") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"search space {path} must map config keys to {{low, high, log}}")
    params = []
    for key, spec in data.items():
        if not isinstance(spec, dict) or set(spec) - {"low", "high", "log"} or not {"low", "high"} <= set(spec):
            raise ConfigError(f"search space {path}: {key!r} needs low and high (and optionally log)")
        try:
            params.append(Param(str(key), float(spec["low"]), float(spec["high"]), bool(spec.get("log", False))))
        except (TypeError, ValueError):
            raise ConfigError(f"search space {path}: {key!r} low/high must be numbers") from None
    return SearchSpace(tuple(params))


def check_space(space: SearchSpace, allow_unsafe_momentum: bool) -> None:
    """Refuse momentum >= 1 unless asked for; warn when it is."""
    for p in space.params:
        if p.key.endswith("momentum") and p.high >= 1:
            if not allow_unsafe_momentum:
                raise ConfigError(f"search space {p.key!r} reaches {p.high} >= 1, where SGD diverges; "
                                  f"lower it or pass --allow-unsafe-momentum")
            warnings.warn(f"{p.key} up to {p.high}: trials with momentum >= 1 will diverge and score 0", stacklevel=2)
