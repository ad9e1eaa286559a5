"""`resnetlab reproduce` / `resnetlab report` end to end at a tiny scale: every experiment on a
synthetic CIFAR-10 (a few hundred images, 1 epoch, quarter-width 20-layer nets, 2 seeds), resuming,
skipping, refusing a changed config, and rebuilding a report from run directories."""
from __future__ import annotations

import csv
import json
import shutil

import pytest

from evalkit import assert_one_line_error, run_cli, write_image_folder
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
    for config in CASES[experiment]:
        assert f"| {config} |" in report
    if experiment == "responses":
        assert (out / "responses.png").is_file() and "Layer responses (paper Fig. 7)" in report
        assert len(read_csv(out / "responses.csv")) == 1 + 4 * 19  # 19 3x3 layers per 20-layer net
    if experiment == "table6":
        assert "| 8.75 |" in report and "seed 001" in report  # the references sit next to our numbers


@pytest.mark.timeout(120)
def test_rerun_skips_finished_runs_and_resumes_interrupted_ones_identically(capsys, data_dir, tmp_path):
    from resnetlab.engine.train import train
    from resnetlab.experiments.runner import Sweep, plan

    two_epochs = ["--set", "train.epochs=2"]
    code, _, err = reproduce(capsys, "table6", data_dir, tmp_path / "whole", "--models", "resnet20", *two_epochs)
    assert code == 0, err
    # interrupt seed 1 of a second sweep after its first epoch (checkpointed), as a crash would
    out = tmp_path / "interrupted"
    overrides = tuple(TINY[1::2]) + ("train.epochs=2",)
    _, runs = plan(Sweep("table6", out, str(data_dir), 2, overrides=overrides, models=("resnet20",)))

    def crash(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(runs[1].run_config, progress="none", on_step=crash)
    summary_before = None
    code, stdout, err = reproduce(capsys, "table6", data_dir, out, "--models", "resnet20", *two_epochs)
    assert code == 0, err
    assert "(1 trained, 1 resumed, 0 skipped)" in stdout
    assert read_csv(out / "runs.csv")[1:][1][5:8] == read_csv(tmp_path / "whole" / "runs.csv")[1:][1][5:8]
    summary_before = (out / "runs" / "resnet20" / "seed0" / "summary.json").stat().st_mtime_ns
    code, stdout, err = reproduce(capsys, "table6", data_dir, out, "--models", "resnet20", *two_epochs)
    assert code == 0 and "(0 trained, 0 resumed, 2 skipped)" in stdout and "finished earlier, skipped" in stdout
    assert (out / "runs" / "resnet20" / "seed0" / "summary.json").stat().st_mtime_ns == summary_before


@pytest.mark.timeout(120)
def test_a_changed_config_is_refused_and_report_rebuilds_from_run_dirs(capsys, data_dir, tmp_path):
    out = tmp_path / "deg"
    code, _, err = reproduce(capsys, "degradation", data_dir, out, "--models", "plain20", "--epochs-scale", "0.5")
    assert code == 0, err
    report = (out / "REPORT.md").read_text()
    assert "he2016-cifar at epochs-scale 0.5" in report and "not comparable to the paper's" in report
    runs_csv = (out / "runs.csv").read_text()

    assert_one_line_error(*reproduce(capsys, "degradation", data_dir, out, "--models", "plain20"),
                          "different 'schedule' config", "use another --out")

    (out / "REPORT.md").unlink()
    (out / "runs.csv").unlink()
    code, stdout, err = run_cli(capsys, "report", out)
    assert code == 0 and "2 runs" in stdout, err
    assert (out / "runs.csv").read_text() == runs_csv and "epochs-scale 0.5" in (out / "REPORT.md").read_text()

    loose = tmp_path / "loose"
    shutil.copytree(out / "runs" / "plain20", loose / "plain20")
    code, stdout, err = run_cli(capsys, "report", loose / "plain20" / "seed0", loose / "plain20" / "seed1",
                                "--out", tmp_path / "rebuilt", "--experiment", "degradation")
    assert code == 0, err
    rows = read_csv(tmp_path / "rebuilt" / "runs.csv")
    assert [r[:4] for r in rows[1:]] == [["degradation", "plain20", "plain20", "0"], ["degradation", "plain20", "plain20", "1"]]
    assert "runs collected from existing run directories" in (tmp_path / "rebuilt" / "REPORT.md").read_text()

    assert_one_line_error(*run_cli(capsys, "report", loose), "--out DIR is required")
    assert_one_line_error(*run_cli(capsys, "report", tmp_path / "rebuilt", "--out", tmp_path / "x"), "no finished run")


@pytest.mark.timeout(120)
def test_parallel_jobs_give_the_same_numbers_and_jpeg_data_is_labelled(capsys, tmp_path):
    data = write_image_folder(tmp_path / "img", "train", 60)  # PNG and JPEG files: labelled as JPEG
    write_image_folder(data, "test", 2)
    common = ["--set", "data.val_size=48", "--set", "data.limit_train=null", "--models", "momentum-0.1"]
    code, _, err = reproduce(capsys, "bn-momentum", data, tmp_path / "one", *common)
    assert code == 0, err
    code, stdout, err = reproduce(capsys, "bn-momentum", data, tmp_path / "two", *common, "--jobs", "2")
    assert code == 0 and "2 runs, 2 at a time" in stdout, err
    one, two = read_csv(tmp_path / "one" / "runs.csv"), read_csv(tmp_path / "two" / "runs.csv")
    assert [r[:8] for r in one] == [r[:8] for r in two]
    assert "JPEG copy of CIFAR-10" in (tmp_path / "one" / "REPORT.md").read_text()


def test_reproduce_refuses_bad_arguments_with_one_line(capsys, data_dir, tmp_path):
    assert_one_line_error(*reproduce(capsys, "table6", data_dir, tmp_path / "a", "--models", "resnet8"),
                          "has no model or config resnet8")
    assert_one_line_error(*reproduce(capsys, "table6", data_dir, tmp_path / "b", "--epochs-scale", "0"),
                          "--epochs-scale must be > 0")
    assert_one_line_error(*reproduce(capsys, "table6", data_dir, tmp_path / "c", "--set", "optim.lrr=1"),
                          "unknown config key 'optim.lrr'")
