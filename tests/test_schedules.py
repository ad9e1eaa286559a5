"""Schedules as pure functions of the global step, pinned to the paper and to torch's one-cycle."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resnetlab.config import build_config
from resnetlab.engine.schedules import PlateauController, Schedule, WarmupController
from resnetlab.errors import ConfigError

STEPS_PER_EPOCH = 352  # 45,000 images / batch 128, last batch kept


def schedule_of(recipe: str | None = None, overrides=(), total_steps: int = 64000) -> Schedule:
    cfg = build_config(recipe, overrides=list(overrides))
    return Schedule(cfg.schedule, cfg.optim.lr, total_steps, STEPS_PER_EPOCH)


def test_he2016_cifar_lr_is_0_1_then_0_01_then_0_001_at_32k_and_48k_iterations():
    schedule = schedule_of("he2016-cifar")
    lrs = [schedule.lr_at(step) for step in range(64000)]
    assert all(lr == pytest.approx(0.1) for lr in lrs[:32000])
    assert all(lr == pytest.approx(0.01) for lr in lrs[32000:48000])
    assert all(lr == pytest.approx(0.001) for lr in lrs[48000:64000])


def test_he2016_110_warms_up_at_0_01_until_error_below_80_percent_then_returns_to_0_1():
    schedule = schedule_of("he2016-cifar-110")
    controller = WarmupController(schedule)
    for step, error in enumerate([0.92, 0.9, 0.85, 0.81]):
        assert schedule.lr_at(step, controller.done_at_step) == pytest.approx(0.01)
        controller.update(step, error)
    controller.update(4, 0.79)  # the first batch below 80%
    assert controller.done_at_step == 5 and not controller.needs_error(5)
    assert schedule.lr_at(4, controller.done_at_step) == pytest.approx(0.01)
    assert schedule.lr_at(5, controller.done_at_step) == pytest.approx(0.1)  # back to 0.1
    assert schedule.lr_at(31999, controller.done_at_step) == pytest.approx(0.1)
    assert schedule.lr_at(32000, controller.done_at_step) == pytest.approx(0.01)  # milestones unchanged
    assert schedule.lr_at(48000, controller.done_at_step) == pytest.approx(0.001)


def test_he2016_110_warm_up_is_capped_at_400_iterations():
    schedule = schedule_of("he2016-cifar-110")
    controller = WarmupController(schedule)
    for step in range(400):
        assert controller.needs_error(step)
        assert schedule.lr_at(step, controller.done_at_step) == pytest.approx(0.01)
        controller.update(step, 0.9)  # never below 80%
    assert controller.done_at_step is None and not controller.needs_error(400)
    assert schedule.lr_at(400, controller.done_at_step) == pytest.approx(0.1)


def test_multistep_in_epochs_counts_steps_per_epoch():
    schedule = schedule_of("wilber-cifar", total_steps=200 * STEPS_PER_EPOCH)
    assert schedule.lr_at(80 * STEPS_PER_EPOCH - 1) == pytest.approx(0.1)
    assert schedule.lr_at(80 * STEPS_PER_EPOCH) == pytest.approx(0.01)
    assert schedule.lr_at(160 * STEPS_PER_EPOCH) == pytest.approx(0.001)


def test_linear_warmup_then_cosine_reaches_the_peak_and_decays_to_min_lr():
    total = 30 * STEPS_PER_EPOCH
    schedule = schedule_of("fast-cifar", total_steps=total)
    warm = 2 * STEPS_PER_EPOCH
    assert schedule.lr_at(0) == pytest.approx(0.1 / warm)  # never a wasted step at lr 0
    assert schedule.lr_at(warm - 1) == pytest.approx(0.1)
    assert schedule.lr_at(warm) == pytest.approx(0.1)
    lrs = [schedule.lr_at(step) for step in range(warm, total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert schedule.lr_at((warm + total) // 2) == pytest.approx(0.05, rel=1e-3)
    assert schedule.lr_at(total - 1) < 1e-5


def test_constant_and_linear_decay():
    assert schedule_of(overrides=["schedule.kind=constant"]).lr_at(50000) == 0.1
    linear = schedule_of(overrides=["schedule.kind=linear", "schedule.min_lr=0.001"], total_steps=1000)
    assert linear.lr_at(0) == pytest.approx(0.1) and linear.lr_at(500) == pytest.approx(0.0505)
    assert linear.lr_at(1000) == pytest.approx(0.001)


@pytest.mark.parametrize("anneal", ["cos", "linear"])
def test_onecycle_matches_torch_onecyclelr_including_momentum(anneal):
    total = 200
    schedule = schedule_of(overrides=["schedule.kind=onecycle", "schedule.onecycle.max_lr=0.4",
                                      f"schedule.onecycle.anneal={anneal}"], total_steps=total)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    reference = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.4, total_steps=total, anneal_strategy=anneal)
    for step in range(total):
        group = optimizer.param_groups[0]
        assert schedule.lr_at(step) == pytest.approx(group["lr"], rel=1e-9, abs=1e-12), step
        assert schedule.momentum_at(step) == pytest.approx(group["momentum"], rel=1e-9), step
        optimizer.step()
        reference.step()


def test_momentum_is_left_alone_unless_cycling():
    assert schedule_of("fast-cifar", total_steps=100).momentum_at(10) is None


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["multistep", "cosine", "linear", "constant", "onecycle", "plateau"]),
       warmup=st.sampled_from(["none", "linear", "constant"]),
       step=st.integers(0, 5000), total=st.integers(10, 5000))
def test_every_schedule_stays_within_zero_and_its_peak(kind, warmup, step, total):
    overrides = [f"schedule.kind={kind}", "schedule.milestones=[100, 200]"]
    if kind != "onecycle" and warmup != "none":
        overrides += [f"schedule.warmup.kind={warmup}", "schedule.warmup.length=50",
                      "schedule.warmup.unit=steps", "schedule.warmup.lr=0.01"]
    lr = schedule_of(overrides=overrides, total_steps=total).lr_at(step)
    assert math.isfinite(lr) and 0 <= lr <= 0.1 + 1e-12


# --- plateau: lr = base * gamma**(decays recorded so far), floored at min_lr -------------------------

def plateau_schedule(*overrides, total_steps: int = 1000) -> Schedule:
    return schedule_of(overrides=["schedule.kind=plateau", *overrides], total_steps=total_steps)


def test_plateau_lr_is_base_times_gamma_per_recorded_decay():
    schedule = plateau_schedule()
    assert [schedule.lr_at(step) for step in (0, 500, 999)] == [0.1, 0.1, 0.1]  # no decay recorded: constant
    decays = [100, 250]
    lrs = [schedule.lr_at(step, None, decays) for step in range(400)]
    assert lrs[:100] == [pytest.approx(0.1)] * 100
    assert lrs[100:250] == [pytest.approx(0.01)] * 150  # from the decay step on, not before
    assert lrs[250:] == [pytest.approx(0.001)] * 150


def test_plateau_gamma_and_min_lr_floor():
    schedule = plateau_schedule("schedule.gamma=0.5", "schedule.min_lr=0.02")
    lrs = [schedule.lr_at(step, None, [10, 20, 30, 40]) for step in (0, 10, 20, 30, 40)]
    assert lrs == pytest.approx([0.1, 0.05, 0.025, 0.02, 0.02])  # 0.0125 and 0.00625 are below min_lr


def test_plateau_composes_with_warm_up_like_multistep():
    constant = plateau_schedule("schedule.warmup.kind=constant", "schedule.warmup.lr=0.01",
                                "schedule.warmup.length=5", "schedule.warmup.unit=steps")
    assert [constant.lr_at(s, None, [8]) for s in (0, 4, 5, 7, 8)] == pytest.approx([0.01, 0.01, 0.1, 0.1, 0.01])
    linear = plateau_schedule("schedule.warmup.kind=linear", "schedule.warmup.length=4", "schedule.warmup.unit=steps")
    assert [linear.lr_at(s) for s in range(5)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])
    until = plateau_schedule("schedule.warmup.kind=until_error", "schedule.warmup.lr=0.01")
    assert until.lr_at(3, 4, [6]) == pytest.approx(0.01) and until.lr_at(4, 4, [6]) == pytest.approx(0.1)
    assert until.lr_at(6, 4, [6]) == pytest.approx(0.01)


def feed(controller: PlateauController, errors, steps_per_epoch: int = 10) -> list[int]:
    """Feed one error per epoch; the steps at which decays were recorded."""
    for epoch, error in enumerate(errors, 1):
        controller.update(epoch * steps_per_epoch, error)
    return controller.decay_steps


def test_plateau_controller_patience_counts_epochs_without_improvement():
    # torch ReduceLROnPlateau's rule: decay after more than `patience` bad epochs in a row
    assert feed(PlateauController(plateau_schedule("schedule.plateau.patience=2")),
                [0.5, 0.5, 0.5, 0.5, 0.5]) == [40]  # epochs 2, 3, 4 bad: the 3rd bad one decays
    assert feed(PlateauController(plateau_schedule("schedule.plateau.patience=0")), [0.5, 0.5, 0.4, 0.4]) == [20, 40]
    # an improvement resets the count
    assert feed(PlateauController(plateau_schedule("schedule.plateau.patience=1")),
                [0.5, 0.5, 0.4, 0.4, 0.3, 0.3, 0.3]) == [70]


def test_plateau_controller_threshold_is_the_least_absolute_improvement_that_counts():
    controller = PlateauController(plateau_schedule("schedule.plateau.patience=0", "schedule.plateau.threshold=0.01"))
    assert feed(controller, [0.5, 0.495]) == [20]  # 0.005 better: not enough
    assert controller.best == 0.5
    controller = PlateauController(plateau_schedule("schedule.plateau.patience=0", "schedule.plateau.threshold=0.01"))
    assert feed(controller, [0.5, 0.485, 0.47]) == [] and controller.best == 0.47


def test_plateau_controller_cooldown_skips_epochs_after_a_decay():
    controller = PlateauController(plateau_schedule("schedule.plateau.patience=0", "schedule.plateau.cooldown=2"))
    assert feed(controller, [0.5, 0.5, 0.5, 0.5, 0.5]) == [20, 50]  # epochs 3 and 4 cool down


def test_plateau_controller_stops_at_min_lr_and_is_inactive_for_other_kinds():
    floored = PlateauController(plateau_schedule("schedule.plateau.patience=0", "schedule.min_lr=0.001"))
    assert feed(floored, [0.5] * 6) == [20, 30]  # 0.01, 0.001, then nothing lower to go to
    assert feed(PlateauController(schedule_of()), [0.5] * 6) == []


def test_plateau_controller_state_round_trip_continues_identically():
    overrides = ("schedule.plateau.patience=1", "schedule.plateau.cooldown=1")
    errors = [0.6, 0.5, 0.5, 0.5, 0.5, 0.45, 0.45, 0.45, 0.45, 0.45]
    whole = PlateauController(plateau_schedule(*overrides))
    feed(whole, errors)
    first = PlateauController(plateau_schedule(*overrides))
    feed(first, errors[:4])
    state = json.loads(json.dumps(first.state_dict()))  # saved as JSON with the checkpoint
    second = PlateauController(plateau_schedule(*overrides))
    second.load_state_dict(state)
    for epoch, error in enumerate(errors[4:], 5):
        second.update(epoch * 10, error)
    assert second.state_dict() == whole.state_dict() and whole.decay_steps == [40, 80]


def test_plateau_config_keys_and_errors():
    plateau = build_config(overrides=["schedule.kind=plateau"]).schedule.plateau
    assert (plateau.metric, plateau.patience, plateau.threshold, plateau.cooldown) == ("val_error", 5, 0.001, 0)
    with pytest.raises(ConfigError, match="schedule.plateau.metric"):
        build_config(overrides=["schedule.plateau.metric=val_loss"])
    with pytest.raises(ConfigError, match="schedule.plateau.patience"):
        build_config(overrides=["schedule.plateau.patience=-1"])
    with pytest.raises(ConfigError, match="did you mean 'schedule.plateau.patience'"):
        build_config(overrides=["schedule.plateau.patients=3"])
    paper = build_config("he2016-imagenet-plateau")
    assert (paper.schedule.kind, paper.schedule.gamma, paper.train.steps) == ("plateau", 0.1, 600000)
    assert paper.data.pipeline == "imagenet" and paper.optim.lr == 0.1
