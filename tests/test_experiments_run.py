"""`resnetlab reproduce` end to end at a tiny scale: every experiment on a synthetic CIFAR-10 (128
training images, 1 epoch, quarter-width 20-layer nets, 2 seeds) writes REPORT.md, runs.csv and its
plots (the sweep's mechanics are in test_experiments_sweep.py)."""
from __future__ import annotations

import csv

import pytest

from evalkit import run_cli
from trainkit import write_synthetic_cifar10

# 2 steps of 64 images per epoch, 64 validation images, one thread per run.
TINY = ["--set", "train.epochs=1", "--set", "train.steps=null", "--set", "data.limit_train=128",
        "--set", "data.val_size=64", "--set", "train.batch_size=64", "--set", "model.options.width=0.25",
        "--set", "runtime.threads=1", "--set", "runtime.device=cpu", "--set", "runtime.precision=fp32"]
COLUMNS = ["experiment", "config", "model", "seed", "epochs", "final_train_error", "final_val_error",
           "best_val_error", "wall_s"]
# Two configs of each experiment (all of one would take minutes on 2 cores).
CASES = {
    "table6": ["resnet20"],
    "degradation": ["plain20", "resnet20"],
    "blocks": ["no_relu-20", "preact-20"],
    "solvers": ["adadelta-20", "rmsprop-lr1e-2-20"],
    "bn-momentum": ["momentum-1", "dynamic"],
    "shortcuts": ["B-20", "C-20"],
    "responses": ["plain20", "resnet20"],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_cifar10(tmp_path_factory.mktemp("cifar"), n_train=200, n_test=20)


def reproduce(capsys, experiment, data_dir, out, *extra):
    return run_cli(capsys, "reproduce", experiment, "--data-dir", data_dir, "--out", out, "--seeds", 2, *TINY, *extra)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("experiment", list(CASES))
def test_every_experiment_runs_end_to_end(capsys, data_dir, tmp_path, experiment):
    out = tmp_path / experiment
    code, stdout, err = reproduce(capsys, experiment, data_dir, out, "--models", *CASES[experiment])
    assert code == 0, err
    runs = 2 * len(CASES[experiment])
    assert f"{runs} runs finished ({runs} trained, 0 resumed, 0 skipped), 0 failed" in stdout
    rows = read_csv(out / "runs.csv")
    assert rows[0] == COLUMNS
    assert sorted((r[1], r[3]) for r in rows[1:]) == sorted((c, s) for c in CASES[experiment] for s in "01")
    assert all(r[0] == experiment and r[4] == "1" and 0 <= float(r[6]) <= 1 for r in rows[1:])
    for plot in ("errors.png", "curves.png"):
        assert (out / plot).stat().st_size > 1000
    report = (out / "REPORT.md").read_text()
    assert f"# {experiment}:" in report and "not comparable to the paper's" in report
    assert "random subsets (data.limit_train" in report and "the references are test-set errors" in report
    assert f"Command: `resnetlab reproduce {experiment} " in report and "Trained on: " in report
    for config in CASES[experiment]:
        assert f"| {config} |" in report
    if experiment == "responses":
        assert (out / "responses.png").is_file() and "Layer responses (paper Fig. 7)" in report
        assert len(read_csv(out / "responses.csv")) == 1 + 4 * 19  # 19 3x3 layers per 20-layer net
    if experiment == "table6":
        assert "| 8.75 |" in report and "seed 001" in report  # the references sit next to our numbers
