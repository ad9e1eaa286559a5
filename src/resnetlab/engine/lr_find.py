"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates", section 3.3; used by seed 004
to pick one-cycle's maximum lr): train from the config's initial weights while the lr grows
exponentially from `start_lr` to `end_lr`, record the loss of each step, and suggest a maximum lr.

The suggestion is the lr where the smoothed loss falls fastest against log(lr) (the steepest
descent before the minimum); the lr of the minimum loss divided by 10, the other common rule, is
reported beside it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resnetlab.config import RunConfig
from resnetlab.engine.data import load_train_data
from resnetlab.engine.loop import default_bn_momentum
from resnetlab.engine.runtime import use_threads
from resnetlab.engine.setup import build_trainer, resolved_config
from resnetlab.errors import ConfigError


@dataclass(frozen=True)
class ExponentialSweep:
    """lr_at(step) = start * (end / start) ** (step / (steps - 1)); duck-types engine Schedule."""

    start_lr: float
    end_lr: float
    steps: int

    def lr_at(self, step: int, warmup_done_at_step: int | None = None, decay_steps=()) -> float:
        return self.start_lr * (self.end_lr / self.start_lr) ** (step / max(self.steps - 1, 1))

    def momentum_at(self, step: int) -> None:
        return None


@dataclass(frozen=True)
class LrFindResult:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggested_lr: float  # steepest descent of the smoothed loss
    min_loss_lr: float
    method: str = "steepest descent of the smoothed loss vs log(lr)"

    def to_dict(self) -> dict:
        return {"suggested_lr": self.suggested_lr, "suggestion_method": self.method,
                "min_loss_lr": self.min_loss_lr, "min_loss_lr_over_10": self.min_loss_lr / 10,
                "lrs": self.lrs, "losses": self.losses, "smoothed_losses": self.smoothed}


def lr_range_test(config: RunConfig, *, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100,
                  smoothing: float = 0.9, stop_factor: float = 4.0) -> LrFindResult:
    if not 0 < start_lr < end_lr or steps < 5:
        raise ConfigError(f"lr-find needs 0 < start lr < end lr and at least 5 steps, got {start_lr}, {end_lr}, {steps}")
    with use_threads(config.runtime.threads):
        return _sweep(config, ExponentialSweep(start_lr, end_lr, steps), smoothing, stop_factor)


def _sweep(config: RunConfig, sweep: ExponentialSweep, smoothing: float, stop_factor: float) -> LrFindResult:
    if config.runtime.compile == "auto":  # a probe of ~100 steps: compiling would cost more than it saves
        config = config.replace(**{"runtime.compile": False})
    config = resolved_config(config)
    data = load_train_data(config, config.runtime)
    trainer = build_trainer(config, data)
    default_bn_momentum(trainer)
    trainer.schedule = sweep
    lrs, losses, smoothed = [], [], []
    average = 0.0
    for batch, (x, y) in _endless(data.loader):
        if trainer.step >= sweep.steps:
            break
        trainer.train_step(x, y, batch)
        loss, _, _ = trainer.interval_meter.read()  # one sync per step: this is a short probe
        trainer.interval_meter.reset()
        average = smoothing * average + (1 - smoothing) * loss
        lrs.append(trainer.lr)
        losses.append(loss)
        smoothed.append(average / (1 - smoothing ** len(losses)))  # bias-corrected EMA
        if not math.isfinite(loss) or smoothed[-1] > stop_factor * min(smoothed):
            break  # diverged: larger lrs tell nothing more
    return _suggest(lrs, losses, smoothed)


def _endless(loader):
    """(batch index in epoch, batch) over as many epochs as it takes."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from enumerate(loader)
        epoch += 1


def _suggest(lrs: list[float], losses: list[float], smoothed: list[float]) -> LrFindResult:
    """Steepest descent of the smoothed loss against log(lr) up to its minimum, as a centred
    difference over a window of ~5% of the sweep; the first 10% of the steps are skipped (the
    smoothed loss is still settling there)."""
    values = np.array([s if math.isfinite(s) else np.inf for s in smoothed])
    lowest = int(np.argmin(values))
    log_lr = np.log(np.array(lrs))
    skip, window = max(1, len(values) // 10), max(1, len(values) // 20)
    slopes = {}
    for i in range(skip, lowest):
        left, right = max(i - window, 0), min(i + window, lowest)
        slopes[i] = (values[right] - values[left]) / (log_lr[right] - log_lr[left])
    steepest = min(slopes, key=slopes.get) if slopes else lowest
    return LrFindResult(lrs, losses, smoothed, suggested_lr=lrs[steepest], min_loss_lr=lrs[lowest])


def plot_lr_find(result: LrFindResult, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    finite = [(lr, loss) for lr, loss in zip(result.lrs, result.losses) if math.isfinite(loss)]
    ax.plot([p[0] for p in finite], [p[1] for p in finite], color="C0", alpha=0.3, label="loss per step")
    ax.plot(result.lrs, result.smoothed, color="C0", label="smoothed")
    ax.axvline(result.suggested_lr, color="C3", linestyle="--", label=f"suggested max lr {result.suggested_lr:.3g}")
    ax.axvline(result.min_loss_lr / 10, color="C2", linestyle=":", label=f"min-loss lr / 10 = {result.min_loss_lr / 10:.3g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title=title or "lr range test")
    low, high = min(result.smoothed), result.smoothed[0]
    if math.isfinite(low) and math.isfinite(high) and high > low:
        ax.set_ylim(low - 0.1 * (high - low), high + 0.5 * (high - low))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
