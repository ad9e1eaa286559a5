"""Learning-rate and momentum schedules as pure functions of the global step (0-based: the lr used
by optimizer step `step`). `Schedule` is immutable; the only run-time inputs besides the step are
the step at which an until-error warm-up ended, which `WarmupController` decides from the training
error, and the steps at which a plateau schedule divided the lr, which `PlateauController` decides
from each epoch's error; the run saves both with its checkpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from resnetlab.config import ScheduleSection


def to_steps(amount: float, unit: str, steps_per_epoch: int) -> int:
    """A length in "steps" or "epochs" as a whole number of steps."""
    return int(round(amount * steps_per_epoch)) if unit == "epochs" else int(round(amount))


@dataclass(frozen=True)
class Schedule:
    cfg: ScheduleSection
    base_lr: float
    total_steps: int
    steps_per_epoch: int

    @property
    def milestone_steps(self) -> list[int]:
        return [to_steps(m, self.cfg.unit, self.steps_per_epoch) for m in self.cfg.milestones]

    def warmup_steps(self, warmup_done_at_step: int | None = None) -> int:
        """Steps of warm-up: fixed for constant/linear; for until_error the step at which the error
        fell below the threshold, capped at cap_steps (the cap while it has not happened yet)."""
        warmup = self.cfg.warmup
        if warmup.kind == "none":
            return 0
        if warmup.kind == "until_error":
            done = warmup.cap_steps if warmup_done_at_step is None else warmup_done_at_step
            return min(done, warmup.cap_steps)
        return to_steps(warmup.length, warmup.unit, self.steps_per_epoch)

    def lr_at(self, step: int, warmup_done_at_step: int | None = None, decay_steps: Sequence[int] = ()) -> float:
        """`decay_steps`: the steps from which a plateau schedule multiplied the lr by gamma."""
        warmup = self.cfg.warmup
        warmup_end = self.warmup_steps(warmup_done_at_step)
        if step < warmup_end:
            if warmup.kind == "linear":
                start, target = warmup.lr or 0.0, self._main_lr(warmup_end, warmup_end, decay_steps)
                return start + (target - start) * (step + 1) / warmup_end
            return float(warmup.lr)
        return self._main_lr(step, warmup_end, decay_steps)

    def plateau_lr(self, decays: int) -> float:
        """The plateau schedule's lr after `decays` decays: base * gamma**decays, never below min_lr."""
        return max(self.base_lr * self.cfg.gamma**decays, self.cfg.min_lr)

    def _main_lr(self, step: int, warmup_end: int, decay_steps: Sequence[int] = ()) -> float:
        kind, base = self.cfg.kind, self.base_lr
        if kind == "constant":
            return base
        if kind == "multistep":
            # lr / 10 from each milestone on: he2016 gives 0.1 on 0..31999, 0.01 from 32000
            passed = sum(step >= m for m in self.milestone_steps)
            return base * self.cfg.gamma**passed
        if kind == "plateau":
            return self.plateau_lr(sum(step >= d for d in decay_steps))
        if kind == "onecycle":
            return self._onecycle(step)[0]
        # cosine / linear decay from the end of the warm-up to the end of training
        span = max(self.total_steps - warmup_end, 1)
        progress = min(max((step - warmup_end) / span, 0.0), 1.0)
        if kind == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * progress))
        else:
            shape = 1 - progress
        return self.cfg.min_lr + (base - self.cfg.min_lr) * shape

    def momentum_at(self, step: int) -> float | None:
        """The momentum (SGD/RMSprop momentum, Adam beta1) for `step`; None = leave the optimizer's."""
        if self.cfg.kind == "onecycle" and self.cfg.onecycle.cycle_momentum:
            return self._onecycle(step)[1]
        return None

    def _onecycle(self, step: int) -> tuple[float, float]:
        """(lr, momentum) of one-cycle (Smith 2018) in torch OneCycleLR's conventions: lr rises from
        max_lr/div_factor to max_lr over pct_start of the steps while momentum falls from
        max_momentum to base_momentum, then lr anneals to initial/final_div_factor as momentum rises."""
        oc = self.cfg.onecycle
        max_lr = oc.max_lr or self.base_lr
        initial, final = max_lr / oc.div_factor, max_lr / oc.div_factor / oc.final_div_factor
        peak = max(float(oc.pct_start * self.total_steps) - 1, 1.0)
        end = max(float(self.total_steps - 1), peak + 1)
        if step <= peak:
            t = step / peak
            return _anneal(initial, max_lr, t, oc.anneal), _anneal(oc.max_momentum, oc.base_momentum, t, oc.anneal)
        t = min((step - peak) / (end - peak), 1.0)
        return _anneal(max_lr, final, t, oc.anneal), _anneal(oc.base_momentum, oc.max_momentum, t, oc.anneal)


def _anneal(start: float, end: float, t: float, how: str) -> float:
    if how == "cos":
        return end + (start - end) / 2 * (1 + math.cos(math.pi * t))
    return start + (end - start) * t


class WarmupController:
    """Decides when an until-error warm-up ends (paper section 4.2: "we use 0.01 to warm up the
    training until the training error is below 80% (about 400 iterations), and then go back to
    0.1"). Fed the training error of each batch while the warm-up runs; its whole state is
    `done_at_step`, saved with the checkpoints."""

    def __init__(self, schedule: Schedule, done_at_step: int | None = None):
        warmup = schedule.cfg.warmup
        self.active_kind = warmup.kind == "until_error"
        self.threshold, self.cap = warmup.error_threshold, warmup.cap_steps
        self.done_at_step = done_at_step

    def needs_error(self, step: int) -> bool:
        """Whether the training error of `step` must be read (one host sync per warm-up step)."""
        return self.active_kind and self.done_at_step is None and step < self.cap

    def update(self, step: int, batch_error: float) -> None:
        """Record the error of batch `step`; the warm-up ends after the first batch below threshold."""
        if self.needs_error(step) and batch_error < self.threshold:
            self.done_at_step = step + 1


class PlateauController:
    """Decides when a plateau schedule divides the lr (He et al. 2015, section 3.4: "the learning rate
    starts from 0.1 and is divided by 10 when the error plateaus"), in torch ReduceLROnPlateau's
    terms (mode min, absolute threshold): fed the epoch's error (validation or training, every rank
    the same global number), an epoch counts as bad unless it beats the best error by more than
    `threshold`; after more than `patience` bad epochs in a row the lr is multiplied by gamma from
    the next step on, then `cooldown` epochs are not counted. Decays that would not lower the lr
    (already at min_lr) are not recorded. Its state (`state_dict`) is saved with the checkpoints."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self.active = schedule.cfg.kind == "plateau"
        self.cfg = schedule.cfg.plateau
        self.decay_steps: list[int] = []
        self.best: float | None = None
        self.bad_epochs = 0
        self.cooldown_left = 0

    @property
    def metric(self) -> str:
        return self.cfg.metric

    def update(self, step: int, error: float) -> bool:
        """Record the error of the epoch that ended before `step`; True when the lr is decayed
        from `step` on. NaN counts as no improvement."""
        if not self.active:
            return False
        if self.best is None or error < self.best - self.cfg.threshold:
            self.best, self.bad_epochs = error, 0
        else:
            self.bad_epochs += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_epochs = 0
        if self.bad_epochs <= self.cfg.patience:
            return False
        self.bad_epochs = 0
        self.cooldown_left = self.cfg.cooldown
        decays = len(self.decay_steps)
        if self.schedule.plateau_lr(decays + 1) >= self.schedule.plateau_lr(decays) * (1 - 1e-9):
            return False  # at min_lr already (up to rounding), or gamma >= 1: nothing to record
        self.decay_steps.append(step)
        return True

    def state_dict(self) -> dict:
        return {"decay_steps": list(self.decay_steps), "best": self.best, "bad_epochs": self.bad_epochs,
                "cooldown_left": self.cooldown_left}

    def load_state_dict(self, state: dict) -> None:
        self.decay_steps = [int(s) for s in state["decay_steps"]]
        self.best, self.bad_epochs, self.cooldown_left = state["best"], state["bad_epochs"], state["cooldown_left"]
