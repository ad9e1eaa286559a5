"""Resume: a run stopped by SIGINT/SIGTERM (after an epoch or inside one) and resumed finishes
bit-identical to the uninterrupted run on the CPU -- weights, optimizer, metrics, summary."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from trainkit import tiny_config, write_synthetic_cifar10

from resnetlab.artifacts.checkpoint import read_tensors
from resnetlab.artifacts.metrics import TIMING_COLUMNS
from resnetlab.engine.train import TrainingInterrupted, resume, train
from resnetlab.errors import CheckpointError, ResnetlabError

# Dynamic BN, EMA, an until-error warm-up and step checkpoints: every piece of state resume must carry.
HARD_MODE = {
    "bn.policy": "dynamic", "train.ema_decay": 0.8, "train.checkpoint_every_steps": 3, "schedule.kind": "multistep",
    "schedule.milestones": [7], "schedule.unit": "steps",
    "schedule.warmup": {"kind": "until_error", "lr": 0.01, "error_threshold": 0.9, "cap_steps": 5},
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_cifar10(tmp_path_factory.mktemp("synthetic"))


def metrics_without_timing(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]


def assert_identical_runs(a, b):
    for name in ("last.safetensors", "best.safetensors", "state.safetensors"):
        tensors_a, _ = read_tensors(a.run_dir / "checkpoints" / name)
        tensors_b, _ = read_tensors(b.run_dir / "checkpoints" / name)
        assert tensors_a.keys() == tensors_b.keys(), name
        different = [k for k in tensors_a if not torch.equal(tensors_a[k], tensors_b[k])]
        assert not different, (name, different[:5])
    assert metrics_without_timing(a.run_dir) == metrics_without_timing(b.run_dir)
    keys = ("final", "best", "epochs", "steps", "bn_reestimate")
    assert {k: a.summary[k] for k in keys} == {k: b.summary[k] for k in keys}


def interrupt_at(step: int, signum=signal.SIGINT):
    def hook(current: int) -> None:
        if current == step:
            os.kill(os.getpid(), signum)

    return hook


def stopped_then_resumed(config, *, on_step=None, on_epoch_end=None):
    with pytest.raises(TrainingInterrupted, match="--resume") as stop:
        train(config, progress="none", on_step=on_step, on_epoch_end=on_epoch_end)
    assert "\n" not in str(stop.value)
    assert not os.path.exists(os.path.join(config["out"], "summary.json"))
    return resume(config["out"], progress="none")


def test_stopped_after_epoch_1_and_resumed_is_identical(synthetic, tmp_path):
    reference = train(tiny_config(synthetic, tmp_path / "a"), progress="none")
    stop_after_first = lambda row: os.kill(os.getpid(), signal.SIGINT) if row["epoch"] == 1 else None  # noqa: E731
    resumed = stopped_then_resumed(tiny_config(synthetic, tmp_path / "b"), on_epoch_end=stop_after_first)
    assert_identical_runs(reference, resumed)


@pytest.mark.parametrize("signum, stop_step", [(signal.SIGINT, 3), (signal.SIGTERM, 7)])
def test_stopped_inside_an_epoch_and_resumed_is_identical(synthetic, tmp_path, signum, stop_step):
    reference = train(tiny_config(synthetic, tmp_path / "a", **HARD_MODE), progress="none")
    resumed = stopped_then_resumed(tiny_config(synthetic, tmp_path / "b", **HARD_MODE),
                                   on_step=interrupt_at(stop_step, signum))
    assert_identical_runs(reference, resumed)


def test_resuming_twice_from_step_checkpoints_is_identical(synthetic, tmp_path):
    """A crash (no chance to save) loses only the steps since the last --checkpoint-every save."""
    reference = train(tiny_config(synthetic, tmp_path / "a", **HARD_MODE), progress="none")
    config = tiny_config(synthetic, tmp_path / "b", **HARD_MODE)

    class Crash(Exception):
        pass

    def crash_at_step_8(step):
        if step == 8:
            raise Crash  # like a power cut: the state on disk is the step-6 checkpoint
    with pytest.raises(Crash):
        train(config, progress="none", on_step=crash_at_step_8)
    state = json.loads((tmp_path / "b" / "checkpoints" / "state.json").read_text())
    assert state["step"] == 6
    assert_identical_runs(reference, resume(tmp_path / "b", progress="none"))


def test_resume_refuses_finished_missing_and_corrupt_runs(synthetic, tmp_path):
    finished = train(tiny_config(synthetic, tmp_path / "done", **{"train.epochs": 1}), progress="none")
    with pytest.raises(ResnetlabError, match="already finished"):
        resume(finished.run_dir, progress="none")
    with pytest.raises(ResnetlabError, match="no such run directory"):
        resume(tmp_path / "nothing", progress="none")
    (finished.run_dir / "summary.json").unlink()
    state = finished.run_dir / "checkpoints" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match="truncated or corrupt") as error:
        resume(finished.run_dir, progress="none")
    assert "\n" not in str(error.value)
