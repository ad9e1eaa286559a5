"""`resnetlab train`, `recipes`, `lr-find` and `make train` through the CLI: user mistakes give one
line and a non-zero exit, and nothing existing is overwritten."""
from __future__ import annotations

import json

import pytest
import torch
from trainkit import write_synthetic_cifar10

from resnetlab.cli import main
from resnetlab.cli.make_train import train_argv

TINY = ["--model", "resnet8", "--set", "model.options.width=0.25", "--val-size", "80", "--epochs", "1",
        "--device", "cpu", "--precision", "fp32", "--set", "train.batch_size=64", "--set", "runtime.threads=1"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_cifar10(tmp_path_factory.mktemp("synthetic"))


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resnetlab: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_train_quiet_prints_epoch_lines_and_where_the_results_are(capsys, synthetic, tmp_path):
    code, out, err = run_cli(capsys, "train", *TINY, "--data-dir", synthetic, "--out", tmp_path / "run", "--quiet")
    assert code == 0, err
    assert "epoch 1/1" in out and "final val top-1 error" in out and str(tmp_path / "run" / "curves.png") in out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["recipe"] == "fast-cifar" and config["train"]["epochs"] == 1 and config["train"]["steps"] is None
    assert config["model"]["options"] == {"width": 0.25} and config["data"]["val_size"] == 80


@pytest.mark.parametrize("extra, fragments", [
    (["--set", "optim.lrr=0.1"], ["unknown config key 'optim.lrr'"]),
    (["--set", "optim.lr=nan"], ["'optim.lr'", "finite"]),
    (["--set", "train.label_smoothing=2"], ["'train.label_smoothing'"]),
    (["--set", "schedule.kind"], ["--set expects section.key=value"]),
    (["--recipe", "he2017"], ["unknown recipe 'he2017'"]),
    (["--model", "resnet21"], ["'model.name'", "6n+2"]),
    (["--precision", "fp16"], ["'runtime.precision'", "CUDA"]),
    (["--set", "model.num_classes=5"], ["'model.num_classes'", "10 classes"]),
])
def test_config_mistakes_are_one_line_and_create_nothing(capsys, synthetic, tmp_path, extra, fragments):
    code, out, err = run_cli(capsys, "train", *TINY, *extra, "--data-dir", synthetic, "--out", tmp_path / "run")
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "run").exists()


def test_cuda_on_a_machine_without_it_is_one_line(capsys, synthetic, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run_cli(capsys, "train", *TINY, "--device", "cuda", "--data-dir", synthetic, "--out", tmp_path / "run")
    assert_one_line_error(code, err, "'runtime.device'", "no CUDA device")
    assert not (tmp_path / "run").exists()


def test_missing_data_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", *TINY, "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "run")
    assert_one_line_error(code, err, "does not exist")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not CIFAR")
    code, _, err = run_cli(capsys, "train", *TINY, "--data-dir", tmp_path / "junk", "--out", tmp_path / "run")
    assert_one_line_error(code, err, "no CIFAR data found")
    assert not (tmp_path / "run").exists()


def test_unwritable_output_directory_is_one_line(capsys, synthetic, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "train", *TINY, "--data-dir", synthetic, "--out", blocker / "run")
    assert_one_line_error(code, err, "cannot write to the output directory")
    code, _, err = run_cli(capsys, "train", *TINY, "--data-dir", synthetic, "--out", blocker)
    assert_one_line_error(code, err, "it is a file")
    assert blocker.read_text() == "x"


def test_existing_runs_and_folders_are_never_overwritten(capsys, synthetic, tmp_path):
    out = tmp_path / "run"
    assert run_cli(capsys, "train", *TINY, "--data-dir", synthetic, "--out", out, "--quiet")[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = run_cli(capsys, "train", *TINY, "--data-dir", synthetic, "--out", out)
    assert_one_line_error(code, err, "already holds a finished run")
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    code, _, err = run_cli(capsys, "train", *TINY, "--data-dir", synthetic, "--out", other)
    assert_one_line_error(code, err, "not empty")
    assert [p.name for p in other.iterdir()] == ["precious.txt"]


def test_resume_mistakes_are_one_line(capsys, synthetic, tmp_path):
    out = tmp_path / "run"
    assert run_cli(capsys, "train", *TINY, "--data-dir", synthetic, "--out", out, "--quiet")[0] == 0
    code, _, err = run_cli(capsys, "train", "--resume", out)
    assert_one_line_error(code, err, "already finished")
    code, _, err = run_cli(capsys, "train", "--resume", out, "--epochs", "3")
    assert_one_line_error(code, err, "--epochs cannot be combined with --resume")
    code, _, err = run_cli(capsys, "train", "--resume", out, "--no-compile")
    assert_one_line_error(code, err, "--no-compile cannot be combined with --resume")
    (out / "summary.json").unlink()
    state = out / "checkpoints" / "state.safetensors"
    state.write_bytes(b"\x80\x04garbage")  # a pickle is never opened
    code, _, err = run_cli(capsys, "train", "--resume", out)
    assert_one_line_error(code, err, "pickle")
    state.write_bytes(b"")
    code, _, err = run_cli(capsys, "train", "--resume", out)
    assert_one_line_error(code, err, "truncated or corrupt")
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "missing")
    assert_one_line_error(code, err, "no such run directory")


def test_recipes_lists_each_recipe_on_one_line_and_shows_one(capsys):
    code, out, _ = run_cli(capsys, "recipes")
    assert code == 0
    names = [line.split()[0] for line in out.strip().splitlines()]
    assert {"he2016-cifar", "he2016-cifar-110", "wilber-cifar", "fast-cifar"} <= set(names)
    code, out, _ = run_cli(capsys, "recipes", "he2016-cifar")
    assert code == 0 and '"milestones": [\n' in out and "32000" in out


def test_lr_find_writes_plot_and_suggestion(capsys, synthetic, tmp_path):
    code, out, err = run_cli(capsys, "lr-find", "--model", "resnet8", "--data-dir", synthetic, "--out", tmp_path / "lrf",
                             "--steps", "12", "--set", "model.options.width=0.25", "--set", "data.val_size=80",
                             "--set", "train.batch_size=64", "--set", "runtime.precision=fp32",
                             "--set", "runtime.threads=1")
    assert code == 0, err
    result = json.loads(out)
    assert 1e-5 <= result["suggested_lr"] <= 10 and "steepest" in result["method"]
    assert (tmp_path / "lrf" / "lr_find.png").is_file()
    assert len(json.loads((tmp_path / "lrf" / "lr_find.json").read_text())["lrs"]) >= 5


def test_make_train_reads_data_location_and_options_from_the_environment():
    argv = train_argv({"CIFAR10_DIR": "/data/c10", "DATA_DIR": "/other", "EPOCHS": "2", "OUT": "runs/x"}, ["--quiet"])
    assert argv[:2] == ["train", "--model"] and argv[2] == "resnet20"
    assert argv[argv.index("--data-dir") + 1] == "/data/c10" and argv[argv.index("--epochs") + 1] == "2"
    assert argv[argv.index("--recipe") + 1] == "fast-cifar" and argv[argv.index("--out") + 1] == "runs/x"
    assert argv[-1] == "--quiet"
    from_data_dir = train_argv({"DATA_DIR": "/other"}, [])
    assert from_data_dir[from_data_dir.index("--data-dir") + 1] == "/other"
    assert "--data-dir" not in train_argv({}, [])  # the download cache


def test_make_train_main_trains_resnet20_and_prints_the_result(capsys, synthetic, tmp_path, monkeypatch):
    from resnetlab.cli.make_train import main as make_train

    monkeypatch.setenv("CIFAR10_DIR", str(synthetic))
    monkeypatch.setenv("OUT", str(tmp_path / "run"))
    monkeypatch.setenv("EPOCHS", "1")
    code = make_train(["--quiet", "--val-size", "80", "--precision", "fp32", "--set", "data.limit_train=64",
                       "--set", "train.batch_size=32", "--set", "runtime.threads=1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "final val top-1 error" in out and "curves.png" in out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["name"] == "resnet20"
