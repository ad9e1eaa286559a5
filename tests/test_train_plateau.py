"""The plateau schedule in a training run: the epoch's error decides decays, the lr in metrics.jsonl
drops from the next step on, resume continues identically, and val_error without a val split is a
one-line config error."""
from __future__ import annotations

import csv
import json

import pytest
from evalkit import assert_one_line_error, run_cli
from test_train_resume import assert_identical_runs, interrupt_at, stopped_then_resumed
from trainkit import tiny_config, write_synthetic_cifar10

from resnetlab.engine.train import train

# threshold 1: no error can improve by more than 1, so every epoch after the first is a plateau
STALLS = {"schedule.kind": "plateau", "schedule.warmup": {"kind": "none"}, "train.log_every_steps": 1,
          "schedule.plateau": {"threshold": 1.0, "patience": 1}, "train.epochs": 4}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_cifar10(tmp_path_factory.mktemp("synthetic"), n_train=400)


def rows(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["kind"] == kind]


@pytest.mark.parametrize("metric", ["val_error", "train_error"])
def test_a_stalled_error_decays_the_lr_from_the_next_step(synthetic, tmp_path, metric):
    config = tiny_config(synthetic, tmp_path / "run", **STALLS, **{"schedule.plateau.metric": metric})
    result = train(config, progress="none")
    epochs = rows(result.run_dir, "epoch")
    # patience 1: epoch 1 sets the best, epoch 2 is the first bad one, epoch 3 the second: decay from step 15
    assert [row.get("lr_decayed_to") for row in epochs] == [None, None, pytest.approx(0.005), None]
    lr_by_step = {row["step"]: row["lr"] for row in rows(result.run_dir, "step")}  # lr of step `step` - 1
    assert sorted(lr_by_step) == list(range(1, 21))
    assert [lr_by_step[s] for s in range(1, 16)] == [pytest.approx(0.05)] * 15
    assert [lr_by_step[s] for s in range(16, 21)] == [pytest.approx(0.005)] * 5
    with (result.run_dir / "metrics.csv").open() as handle:  # the spreadsheet shows the decision too
        decided = [r["lr_decayed_to"] for r in csv.DictReader(handle) if r["kind"] == "epoch"]
    assert decided[:2] == ["", ""] and float(decided[2]) == pytest.approx(0.005) and decided[3] == ""
    state = json.loads((result.run_dir / "checkpoints" / "state.json").read_text())
    assert state["plateau"]["decay_steps"] == [15] and state["plateau"]["bad_epochs"] == 1


def test_resumed_inside_the_epoch_that_decays_is_identical(synthetic, tmp_path):
    """Stopped in epoch 3 (one bad epoch counted so far): only the restored count decays at its end."""
    hard = {**STALLS, "train.checkpoint_every_steps": 3}
    reference = train(tiny_config(synthetic, tmp_path / "a", **hard), progress="none")
    resumed = stopped_then_resumed(tiny_config(synthetic, tmp_path / "b", **hard), on_step=interrupt_at(12))
    assert_identical_runs(reference, resumed)
    lrs = [row["lr"] for row in rows(resumed.run_dir, "step")]
    assert lrs == [row["lr"] for row in rows(reference.run_dir, "step")] and lrs[-1] == pytest.approx(0.005)


def test_val_error_without_a_validation_split_is_a_one_line_error(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(capsys, "train", "--recipe", "he2016-cifar", "--data-dir", synthetic, "--out", out,
                                   "--val-size", "0", "--device", "cpu", "--epochs", "1", "--quiet",
                                   "--set", "schedule.kind=plateau")
    assert code == 2
    assert_one_line_error(code, stdout, stderr, "schedule.plateau.metric", "validation split")
    assert not out.exists()


@pytest.mark.timeout(240)
def test_two_gloo_processes_decay_as_one_process(tmp_path):
    """Under torchrun every rank feeds the controller the error summed over the ranks: the decay
    lands at the same step as in one process, and the lrs of the steps match."""
    import subprocess
    import sys

    from test_distributed import LAUNCH_TIMEOUT_S, child_env, ddp_config, write_recipe

    data = write_synthetic_cifar10(tmp_path / "data", n_train=320, n_test=20)
    stalls = {"schedule.kind": "plateau", "schedule.warmup": {"kind": "none"}, "train.epochs": 3,
              "schedule.plateau": {"threshold": 1.0, "patience": 0}}
    one = train(ddp_config(data, tmp_path / "one", **stalls), progress="none")
    recipe = write_recipe(tmp_path / "recipe.yaml", ddp_config(data, None, **stalls))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "resnetlab", "train", "--recipe-file", str(recipe), "--out", "two", "--quiet"]
    launched = subprocess.run(command, cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                              timeout=LAUNCH_TIMEOUT_S)
    assert launched.returncode == 0, launched.stderr[-3000:]
    lrs_one, lrs_two = ([row["lr"] for row in rows(run, "step")] for run in (one.run_dir, tmp_path / "two"))
    assert lrs_two == lrs_one == [pytest.approx(0.05)] * 8 + [pytest.approx(0.005)] * 4
    assert launched.stdout.count("plateaued: lr 0.005 from step 8") == 1  # printed by rank 0 only


def test_curves_mark_each_plateau_decision(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from resnetlab.artifacts.plots import plot_curves

    marked, axvline = [], Axes.axvline
    monkeypatch.setattr(Axes, "axvline", lambda ax, x, *a, **k: marked.append(x) or axvline(ax, x, *a, **k))
    epoch = {"kind": "epoch", "train_top1_error": 0.5, "val_top1_error": 0.4, "train_loss": 1.0, "val_loss": 0.9}
    rows = [{**epoch, "step": 10}, {**epoch, "step": 20, "lr_decayed_to": 0.01}, {**epoch, "step": 30}]
    plot_curves(rows, tmp_path / "curves.png")
    assert marked == [20, 20] and (tmp_path / "curves.png").stat().st_size > 1000  # both panels, once each
