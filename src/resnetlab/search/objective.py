"""One trial: the base config with the sampled values, trained for the short budget; its score
is the validation accuracy (top-1) after the last epoch. A diverging run scores nothing (None)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from resnetlab.config import RunConfig
from resnetlab.errors import ConfigError, DivergenceError


@dataclass(frozen=True)
class TrialOutcome:
    accuracy: float | None  # val top-1 accuracy after the last epoch; None: diverged
    epochs: int  # epochs trained (fewer than the budget when pruned)
    error: str | None = None


def trial_config(base: RunConfig, params: dict[str, float], out: Path | None) -> RunConfig:
    """`base` with the searched values and the trial's run directory; no final TTA evaluation (trials
    are scored without it, and it would add about a tenth of a short trial's time). compile "auto"
    becomes eager: trials are short and vary the batch size, so CUDA graphs would be compiled again
    for most of them (about 25 s each on an H200, more than a few epochs of ResNet-20 save)."""
    changes = {"train.final_tta": []}
    if base.runtime.compile == "auto":
        changes["runtime.compile"] = False
    return base.replace(**params, **changes, out=None if out is None else str(out))


def run_trial(base: RunConfig, params: dict[str, float], out: Path,
              on_epoch: Callable[[int, float], None] | None = None) -> TrialOutcome:
    """Train one trial into `out`; `on_epoch(epoch, val_accuracy)` may raise to stop it (pruning)."""
    from resnetlab.engine.train import train

    config = trial_config(base, params, out)
    if config.data.val_size == 0:
        raise ConfigError("search scores trials on the validation split; set --val-size > 0")
    epochs = 0

    def epoch_end(row: dict) -> None:
        nonlocal epochs
        epochs = row["epoch"]
        if on_epoch is not None:
            on_epoch(epochs, 1.0 - row["val_top1_error"])

    try:
        with _no_curves():
            result = train(config, progress="none", on_epoch_end=epoch_end)
    except DivergenceError as error:
        return TrialOutcome(None, epochs, str(error).split(";")[0])
    return TrialOutcome(1.0 - result.final_val_error, result.summary["epochs"])


@contextlib.contextmanager
def _no_curves():
    """Skip the run's curves.png: drawing it takes seconds on a loaded CPU, as long as a whole short
    trial, and the search draws its own plots. train() has no switch for it (yet), so the drawing
    method is replaced for the duration of the trial (trials run one per process at a time)."""
    from resnetlab.engine.train import Session

    original = Session._plot
    Session._plot = lambda self, force=False: None
    try:
        yield
    finally:
        Session._plot = original
