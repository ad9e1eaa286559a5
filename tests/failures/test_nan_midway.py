"""A NaN appearing in the middle of training (one poisoned pixel in the batch of step 7): the run
stops with one DivergenceError line naming the last good checkpoint, every checkpoint on disk is
finite and loadable (`resnetlab eval` uses it), no summary claims the run finished, and resuming
from the kept checkpoint (once the NaN source is gone) finishes exactly like a run that never saw
it."""
from __future__ import annotations

import json
import math

import pytest
import torch
from trainkit import tiny_config, write_synthetic_cifar10

from resnetlab.artifacts.checkpoint import read_checkpoint, read_tensors
from resnetlab.cli import main
from resnetlab.engine import loop
from resnetlab.engine.train import resume, train
from resnetlab.errors import DivergenceError

POISONED_STEP = 7  # counted from 1; epochs are 5 steps, so this is inside epoch 2


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_cifar10(tmp_path_factory.mktemp("synthetic"))


def poison(patch) -> None:
    """One NaN pixel in the batch of step POISONED_STEP."""
    real_step = loop.Trainer.train_step

    def train_step(self, x, y, batch_in_epoch):
        if self.step + 1 == POISONED_STEP:
            x = x.clone()
            x[0, 0, 0, 0] = math.nan
        return real_step(self, x, y, batch_in_epoch)

    patch.setattr(loop.Trainer, "train_step", train_step)


@pytest.mark.parametrize("every, log_every, kept_step", [
    (3, 3, 6),  # caught by the step-9 log line; the step-6 checkpoint is the last good one
    (3, 100, 6),  # no log line: the step-9 checkpoint checks the loss first and is refused
    (None, 100, 5),  # only epoch checkpoints: caught at the end of epoch 2; epoch 1 is kept
])
def test_nan_midway_stops_with_one_line_and_keeps_the_last_good_checkpoint(
        synthetic, tmp_path, capsys, monkeypatch, every, log_every, kept_step):
    out = tmp_path / "run"
    config = tiny_config(synthetic, out, **{"train.checkpoint_every_steps": every, "train.log_every_steps": log_every})
    poison(monkeypatch)
    with pytest.raises(DivergenceError) as error:
        train(config, progress="none")
    message = str(error.value)
    assert "\n" not in message and "diverged" in message and f"step {kept_step}) is kept" in message, message
    assert not (out / "summary.json").exists()
    for name in ("last.safetensors", "best.safetensors", "state.safetensors"):
        tensors, _ = read_tensors(out / "checkpoints" / name)
        assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()), name
    _, metadata = read_checkpoint(out / "checkpoints" / "last.safetensors")
    assert metadata["step"] == kept_step
    assert json.loads((out / "checkpoints" / "state.json").read_text())["step"] == kept_step

    code = main(["eval", str(out), "--data-dir", str(synthetic), "--json", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert math.isfinite(json.loads(captured.out)["loss"])


def test_resume_after_the_nan_source_is_gone_equals_a_clean_run(synthetic, tmp_path, monkeypatch):
    extra = {"train.checkpoint_every_steps": 3}
    with monkeypatch.context() as patch, pytest.raises(DivergenceError):
        poison(patch)
        train(tiny_config(synthetic, tmp_path / "run", **extra), progress="none")
    resumed = resume(tmp_path / "run", progress="none")
    clean = train(tiny_config(synthetic, tmp_path / "clean", **extra), progress="none")
    a, _ = read_tensors(clean.run_dir / "checkpoints" / "state.safetensors")
    b, _ = read_tensors(resumed.run_dir / "checkpoints" / "state.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.summary["final"] == clean.summary["final"]
