"""A training run end to end: every artifact of the run directory, checkpoints usable by
resnetlab.load, divergence, EMA, BN re-estimation and the until-error warm-up in a real loop."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from trainkit import tiny_config, write_synthetic_cifar10

from resnetlab.artifacts.checkpoint import load, read_checkpoint
from resnetlab.artifacts.metrics import COLUMNS
from resnetlab.data import Normalizer, load_dataset
from resnetlab.engine.train import train
from resnetlab.errors import DivergenceError, ResnetlabError
from resnetlab.evaluate import evaluate

EPOCH_KEYS = {"epoch", "step", "train_loss", "train_top1_error", "val_loss", "val_top1_error", "val_top5_error",
              "lr", "epoch_seconds", "images_per_s"}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_cifar10(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def finished_run(synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    result = train(tiny_config(synthetic, out), progress="none")
    return result


def test_run_directory_holds_every_artifact(finished_run):
    run = finished_run.run_dir
    for name in ("config.json", "env.json", "patch.diff", "metrics.jsonl", "metrics.csv", "curves.png", "summary.json",
                 "checkpoints/last.safetensors", "checkpoints/best.safetensors", "checkpoints/state.safetensors",
                 "checkpoints/state.json"):
        assert (run / name).is_file(), name
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((run / "config.json").read_text())
    assert config["runtime"]["device"] == "cpu" and config["runtime"]["precision"] == "fp32"  # resolved, no "auto"
    assert config["model"]["name"] == "resnet8" and config["train"]["epochs"] == 2
    env = json.loads((run / "env.json").read_text())
    assert {"python", "torch", "cpu", "git_commit", "runtime"} <= set(env) and env["runtime"]["device"] == "cpu"


def test_metrics_have_epoch_rows_and_step_rows(finished_run):
    run = finished_run.run_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    steps = [r for r in rows if r["kind"] == "step"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all(EPOCH_KEYS <= set(r) for r in epochs)
    assert epochs[-1]["step"] == 10  # 320 training images / batch 64 = 5 steps per epoch
    assert [r["step"] for r in steps] == [3, 6, 9] and all(r["lr"] > 0 for r in steps)
    with (run / "metrics.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert tuple(table[0]) == COLUMNS and len(table) == len(rows)


def test_summary_and_result_report_final_and_best_validation(finished_run):
    summary = json.loads((finished_run.run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (finished_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["kind"] == "epoch"][-1]
    assert summary["final"]["val_top1_error"] == last["val_top1_error"] == finished_run.final_val_error
    assert summary["best"]["val_top1_error"] == finished_run.best_val_error <= finished_run.final_val_error
    assert summary["epochs"] == 2 and summary["steps"] == 10 and summary["wall_seconds"] > 0
    assert finished_run.final_val_loss == last["val_loss"]


def test_checkpoints_load_by_run_dir_and_reproduce_the_logged_validation_error(finished_run, synthetic):
    model, metadata = load(finished_run.run_dir)
    assert metadata["model"] == "resnet8" and metadata["model_options"] == {"width": 0.25}
    assert metadata["classes"][0] == "airplane" and metadata["input_size"] == [3, 32, 32]
    assert metadata["epoch"] == 2 and metadata["step"] == 10 and metadata["data"]["val_size"] == 80
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in model.state_dict())
    val = load_dataset(synthetic, val_size=80, download=False).val
    result = evaluate(model, val.images, val.labels, Normalizer.from_dict(metadata["normalization"]))
    assert result.top1_error == pytest.approx(finished_run.final_val_error)
    _, best = read_checkpoint(finished_run.run_dir / "checkpoints" / "best.safetensors")
    assert best["val_top1_error"] == finished_run.best_val_error


def test_a_finished_run_is_never_overwritten(finished_run, synthetic):
    before = {p: p.read_bytes() for p in finished_run.run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ResnetlabError, match="already holds a finished run") as error:
        train(tiny_config(synthetic, finished_run.run_dir), progress="none")
    assert "\n" not in str(error.value)
    assert before == {p: p.read_bytes() for p in finished_run.run_dir.rglob("*") if p.is_file()}


def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(synthetic, tmp_path):
    # lr x 1e10 after the first epoch: the weights overflow within a few steps
    config = tiny_config(synthetic, tmp_path / "run", **{
        "schedule.kind": "multistep", "schedule.milestones": [1], "schedule.unit": "epochs", "schedule.gamma": 1e10,
        "train.epochs": 3})
    with pytest.raises(DivergenceError) as error:
        train(config, progress="none")
    message = str(error.value)
    assert "\n" not in message and "diverged" in message and "epoch 1, step 5" in message
    _, metadata = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert metadata["step"] == 5
    state, _ = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    assert not (tmp_path / "run" / "summary.json").exists()


def test_ema_bn_reestimation_and_until_error_warmup_run(synthetic, tmp_path):
    config = tiny_config(synthetic, tmp_path / "run", **{
        "train.ema_decay": 0.9, "bn.reestimate": True, "bn.reestimate_batches": 3, "schedule.kind": "multistep",
        "schedule.warmup": {"kind": "until_error", "lr": 0.01, "error_threshold": 0.95, "cap_steps": 6}})
    result = train(config, progress="none")
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["kind"] == "final"]
    assert len(final) == 1 and final[0]["val_top1_error"] == result.final_val_error
    assert result.summary["bn_reestimate"]["batches"] == 3
    _, metadata = read_checkpoint(result.run_dir / "checkpoints" / "last.safetensors")
    assert metadata["weights"] == "ema" and metadata["bn_reestimated"] is True
    state = json.loads((result.run_dir / "checkpoints" / "state.json").read_text())
    assert 1 <= state["warmup_done_at_step"] <= 6
    step_rows = [r for r in rows if r["kind"] == "step"]
    assert step_rows[-1]["lr"] == pytest.approx(0.05)  # back to the base lr after the warm-up


def test_without_a_validation_split_there_is_no_best_and_flip_tta_is_accepted(synthetic, tmp_path):
    result = train(tiny_config(synthetic, tmp_path / "run", **{"data.val_size": 0, "train.epochs": 1}), progress="none")
    assert result.final_val_error is None and result.best_val_error is None
    assert not (result.run_dir / "checkpoints" / "best.safetensors").exists()
    _, metadata = read_checkpoint(result.run_dir / "checkpoints" / "last.safetensors")
    assert metadata["data"]["val_size"] == 0
    for tta in ("flip", "flip-shift"):
        run = train(tiny_config(synthetic, tmp_path / tta, **{"train.eval_tta": tta, "train.epochs": 1}), progress="none")
        assert 0 <= run.final_val_error <= 1


def test_flip_shift_validation_fills_as_the_crops_were_padded_and_the_checkpoint_says_how(synthetic, tmp_path):
    settings = {"train.eval_tta": "flip-shift", "train.epochs": 1, "data.padding_mode": "reflect"}
    run = train(tiny_config(synthetic, tmp_path / "run", **settings), progress="none")
    model, metadata = load(run.run_dir)
    assert metadata["data"]["padding_mode"] == "reflect"
    val = load_dataset(synthetic, val_size=80, download=False).val
    normalizer = Normalizer.from_dict(metadata["normalization"])
    by_fill = {fill: evaluate(model, val.images, val.labels, normalizer, tta="flip-shift", shift_padding=fill)
               for fill in ("zeros", "reflect")}
    assert by_fill["reflect"].loss == pytest.approx(run.final_val_loss, rel=1e-5)
    assert by_fill["zeros"].loss != pytest.approx(run.final_val_loss, rel=1e-5)


def test_the_package_exports_train_and_the_config():
    import resnetlab

    assert resnetlab.train is train and resnetlab.RunConfig().optim.lr == 0.1


def test_a_run_needs_an_out_directory(synthetic):
    with pytest.raises(ResnetlabError, match="'out'"):
        train(tiny_config(synthetic, None), progress="none")


def test_missing_data_leaves_no_run_directory(tmp_path):
    with pytest.raises(ResnetlabError, match="does not exist"):
        train(tiny_config(tmp_path / "no-such-data", tmp_path / "run"), progress="none")
    assert not (tmp_path / "run").exists()


def test_auto_precision_is_what_was_measured_fastest(monkeypatch):
    import torch

    from resnetlab.engine import runtime

    # CUDA: fp32 (autocast's casts slowed every CIFAR/ImageNet net timed on an H100); the device
    # object needs no GPU to exist.
    assert runtime.resolve_precision("auto", torch.device("cuda")) == "fp32"
    assert runtime.resolve_precision("fp16", torch.device("cuda")) == "fp16"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.resolve_precision("auto", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_auto_channels_last_avoids_the_avx2_onednn_crash_of_narrow_projections(monkeypatch):
    # torch 2.13 + oneDNN AVX2: a channels_last 1x1 stride-2 conv with < 8 input channels corrupts
    # memory in backward; "auto" must resolve to NCHW for such a net there, and only there
    from resnetlab.config import RunConfig
    from resnetlab.engine.setup import resolved_config

    narrow = RunConfig().replace(**{"model.name": "resnet20", "model.options": {"shortcut": "B", "width": 0.25},
                                    "runtime.device": "cpu"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert resolved_config(narrow).runtime.channels_last is False
    assert resolved_config(narrow.replace(**{"model.options": {"shortcut": "B"}})).runtime.channels_last is True
    assert resolved_config(narrow.replace(**{"model.options": {"width": 0.25}})).runtime.channels_last is True  # option A
    assert resolved_config(narrow.replace(**{"runtime.channels_last": True})).runtime.channels_last is True
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert resolved_config(narrow).runtime.channels_last is True


def test_bf16_asked_for_on_a_cpu_that_emulates_it_warns(monkeypatch, recwarn):
    from resnetlab.config import RuntimeSection
    from resnetlab.engine import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="bf16 is emulated"):
        assert runtime.resolve_runtime(RuntimeSection(device="cpu", precision="bf16")).precision == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    recwarn.clear()
    runtime.resolve_runtime(RuntimeSection(device="cpu", precision="bf16"))
    assert not [w for w in recwarn if "emulated" in str(w.message)]
