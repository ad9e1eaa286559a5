"""The sweep's mechanics at a tiny scale: resuming an interrupted run, skipping finished ones,
refusing a changed config, `resnetlab report` rebuilding a report from run directories, parallel
runs giving the numbers of sequential ones, and one-line errors."""
from __future__ import annotations

import shutil

import pytest

from evalkit import assert_one_line_error, run_cli, write_image_folder
from test_experiments_run import TINY, data_dir, read_csv, reproduce  # noqa: F401 (data_dir: the fixture)


@pytest.mark.timeout(180)
def test_rerun_skips_finished_runs_and_resumes_interrupted_ones_identically(capsys, data_dir, tmp_path):
    from resnetlab.engine.train import train
    from resnetlab.experiments.runner import Sweep, plan

    two_epochs = ["--set", "train.epochs=2"]
    code, _, err = reproduce(capsys, "table6", data_dir, tmp_path / "whole", "--models", "resnet20", *two_epochs)
    assert code == 0, err
    # interrupt seed 1 of a second sweep after its first epoch (checkpointed), as a crash would
    out = tmp_path / "interrupted"
    overrides = (*TINY[1::2], "train.epochs=2")
    _, runs = plan(Sweep("table6", out, str(data_dir), 2, overrides=overrides, models=("resnet20",)))

    def crash(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(runs[1].run_config, progress="none", on_step=crash)
    # seed 0 started but died before its first checkpoint: restarted from scratch
    runs[0].run_dir.mkdir(parents=True)
    shutil.copy(tmp_path / "whole" / "runs" / "resnet20" / "seed0" / "config.json", runs[0].run_dir)
    code, stdout, err = reproduce(capsys, "table6", data_dir, out, "--models", "resnet20", *two_epochs)
    assert code == 0, err
    assert "(1 trained, 1 resumed, 0 skipped)" in stdout
    assert [r[5:8] for r in read_csv(out / "runs.csv")] == [r[5:8] for r in read_csv(tmp_path / "whole" / "runs.csv")]
    summary_before = (out / "runs" / "resnet20" / "seed0" / "summary.json").stat().st_mtime_ns
    code, stdout, err = reproduce(capsys, "table6", data_dir, out, "--models", "resnet20", *two_epochs)
    assert code == 0 and "(0 trained, 0 resumed, 2 skipped)" in stdout and "finished earlier, skipped" in stdout
    assert (out / "runs" / "resnet20" / "seed0" / "summary.json").stat().st_mtime_ns == summary_before


@pytest.mark.timeout(180)
def test_a_changed_config_is_refused_and_report_rebuilds_from_run_dirs(capsys, tmp_path):
    data_dir = write_image_folder(tmp_path / "img", "train", 60)  # PNG and JPEG files: labelled as JPEG
    write_image_folder(data_dir, "test", 2)
    out = tmp_path / "deg"
    code, _, err = reproduce(capsys, "degradation", data_dir, out, "--models", "plain20", "--epochs-scale", "0.5")
    assert code == 0, err
    report = (out / "REPORT.md").read_text()
    assert "he2016-cifar at epochs-scale 0.5" in report and "not comparable to the paper's" in report
    assert "JPEG copy of CIFAR-10" in report
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

    (out / "runs" / "plain20" / "seed1" / "summary.json").unlink()  # as if seed 1 never finished
    code, stdout, err = run_cli(capsys, "report", out)
    assert code == 0 and "1 runs (1 unfinished, listed in the report)" in stdout, err
    assert "## Failed or unfinished runs" in (out / "REPORT.md").read_text() and len(read_csv(out / "runs.csv")) == 2

    assert_one_line_error(*run_cli(capsys, "report", loose), "--out DIR is required")
    assert_one_line_error(*run_cli(capsys, "report", tmp_path / "rebuilt", "--out", tmp_path / "x"), "no finished run")


@pytest.mark.timeout(300)  # two spawned workers import torch: slow on a loaded machine
def test_parallel_jobs_give_the_numbers_of_sequential_runs(capsys, data_dir, tmp_path):
    common = ["--models", "momentum-0.1"]
    code, _, err = reproduce(capsys, "bn-momentum", data_dir, tmp_path / "one", *common)
    assert code == 0, err
    code, stdout, err = reproduce(capsys, "bn-momentum", data_dir, tmp_path / "two", *common, "--jobs", "2")
    assert code == 0 and "2 runs, 2 at a time" in stdout, err
    one, two = read_csv(tmp_path / "one" / "runs.csv"), read_csv(tmp_path / "two" / "runs.csv")
    assert [r[:8] for r in one] == [r[:8] for r in two]
    assert "original, lossless CIFAR-10" in (tmp_path / "two" / "REPORT.md").read_text()


def test_reproduce_refuses_bad_arguments_with_one_line(capsys, data_dir, tmp_path):
    assert_one_line_error(*reproduce(capsys, "table6", data_dir, tmp_path / "a", "--models", "resnet8"),
                          "has no model or config resnet8")
    assert_one_line_error(*reproduce(capsys, "table6", data_dir, tmp_path / "b", "--epochs-scale", "0"),
                          "--epochs-scale must be > 0")
    assert_one_line_error(*reproduce(capsys, "table6", data_dir, tmp_path / "c", "--set", "optim.lrr=1"),
                          "unknown config key 'optim.lrr'")
    foreign = tmp_path / "d" / "runs" / "resnet20" / "seed0"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    assert_one_line_error(*reproduce(capsys, "table6", data_dir, tmp_path / "d", "--models", "resnet20"),
                          "not a resnetlab run (notes.txt)")
    assert (foreign / "notes.txt").read_text() == "mine"
