"""Data-parallel training (issue 8): two gloo processes on the CPU, launched as users launch them,
against one process with the same global batch; gradient accumulation; the batch and lr settings.

Why the two runs can agree to float rounding: with augmentation off, rank r of 2 takes positions
r, r+2, r+4... of the epoch's permutation, so the union of the ranks' k-th micro-batches is the
one-process run's k-th micro-batch; SyncBN normalises with the statistics of that union; DDP
averages the gradients of equal shards. Only summation order differs: the first step's loss agrees
to 1e-6 (relative); later steps drift as rounding differences are amplified by training (ReLU kinks
flipping). Measured on this set-up: at most 2.4e-5 relative over 4 steps, the same size as one
process in channels_last vs NCHW layout; without SyncBN the first step alone differs by 1.2e-3.
Hence 1e-4 for the later steps.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from resnetlab.config import validate_config
from resnetlab.engine.data import micro_batch_size
from resnetlab.engine.loop import Trainer
from resnetlab.engine.optim import build_optimizer
from resnetlab.engine.runtime import resolve_runtime
from resnetlab.engine.schedules import Schedule, WarmupController
from resnetlab.engine.setup import lr_scale
from resnetlab.engine.train import train
from resnetlab.errors import ConfigError
from trainkit import tiny_config, write_synthetic_cifar10

LAUNCH_TIMEOUT_S = 150  # two processes importing torch on a loaded 2-core machine


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    # 320 images, 64 held out: 256 training images, 4 global batches of 64 per epoch
    return write_synthetic_cifar10(tmp_path_factory.mktemp("ddp-data"), n_train=320, n_test=20)


def ddp_config(data_dir: Path, out: Path | None, **overrides) -> dict:
    """Augmentation off (it is drawn per rank), SyncBN on, one line per step."""
    settings = {"data.val_size": 64, "data.crop_padding": 0, "data.flip": False, "train.epochs": 1,
                "train.batch_size": 64, "train.log_every_steps": 1, "train.sync_bn": True, **overrides}
    return tiny_config(data_dir, out, **settings)


def rows(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["kind"] == kind]


def files(run: Path) -> set[str]:
    return {str(path.relative_to(run)) for path in run.rglob("*")}


def assert_same_training(one: Path, two: Path, first_step: int = 1) -> None:
    """Per-step losses, validation and final weights agree to float rounding (see the module's
    docstring); the same files and metric rows."""
    steps_one, steps_two = rows(one, "step"), rows(two, "step")
    assert [r["step"] for r in steps_two] == [r["step"] for r in steps_one]
    for a, b in zip(steps_one, steps_two):
        tolerance = 1e-6 if a["step"] == first_step else 1e-4
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=tolerance), a["step"]
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12)
    epochs_one, epochs_two = rows(one, "epoch"), rows(two, "epoch")
    assert len(epochs_two) == len(epochs_one)
    for a, b in zip(epochs_one, epochs_two):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    weights_one = load_file(one / "checkpoints" / "last.safetensors")
    weights_two = load_file(two / "checkpoints" / "last.safetensors")
    assert weights_one.keys() == weights_two.keys()  # SyncBN leaves the checkpoint's keys alone
    for key, value in weights_one.items():  # weights of size ~0.5 drift like the losses (up to 3e-4 measured)
        torch.testing.assert_close(weights_two[key].double(), value.double(), rtol=1e-3, atol=1e-3, msg=key)
    assert files(two) == files(one)


def write_recipe(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump({k: v for k, v in config.items() if k != "out"}))
    return path


def child_env(**extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


@pytest.mark.timeout(240)
def test_torchrun_two_gloo_processes_match_one_process_with_the_same_global_batch(data_dir, tmp_path):
    one = train(ddp_config(data_dir, tmp_path / "one"), progress="none")
    workdir = tmp_path / "launch"
    workdir.mkdir()
    recipe = write_recipe(workdir / "recipe.yaml", ddp_config(data_dir, None))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "resnetlab", "train", "--recipe-file", str(recipe), "--out", "run", "--quiet"]
    launched = subprocess.run(command, cwd=workdir, env=child_env(), capture_output=True, text=True,
                              timeout=LAUNCH_TIMEOUT_S)
    assert launched.returncode == 0, launched.stderr[-3000:]
    run = workdir / "run"
    assert_same_training(one.run_dir, run)
    # rank 1 printed nothing and appended no rows of its own
    assert launched.stdout.count("final val top-1 error") == 1 and launched.stdout.count("epoch 1/1") == 1
    assert len(rows(run, "step")) == 4 and sorted(os.listdir(workdir)) == ["recipe.yaml", "run"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["batch"] == {"world_size": 2, "global_batch": 64, "accum_steps": 1, "micro_batch": 32,
                                "sync_bn": True, "lr_scale": 1.0}
    assert summary["steps"] == 4 and summary["data"]["train_images"] == 256


@pytest.mark.timeout(240)
def test_an_error_on_rank_zero_stops_every_rank_and_is_printed_once(data_dir, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("not a run")
    recipe = write_recipe(tmp_path / "recipe.yaml", ddp_config(data_dir, None))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "resnetlab", "train", "--recipe-file", str(recipe), "--out", "run", "--quiet"]
    launched = subprocess.run(command, cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                              timeout=LAUNCH_TIMEOUT_S)
    assert launched.returncode != 0
    assert launched.stderr.count("resnetlab: error:") == 1 and "is not empty and holds no run" in launched.stderr
    assert sorted(os.listdir(tmp_path / "run")) == ["notes.txt"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.timeout(240)
def test_rank_one_writes_nothing_and_accumulation_matches_across_world_sizes(data_dir, tmp_path):
    """Ranks started by hand, as torchrun would, each in its own directory with the same relative
    --out: rank 1's directory stays empty. 2 processes x 2 micro-batches of 16 = 1 process x 2 of 32."""
    one = train(ddp_config(data_dir, tmp_path / "one", **{"train.accum_steps": 2}), progress="none")
    recipe = write_recipe(tmp_path / "recipe.yaml", ddp_config(data_dir, None, **{"train.accum_steps": 2}))
    port = str(free_port())
    children = []
    for rank in (0, 1):
        cwd = tmp_path / f"rank{rank}"
        cwd.mkdir()
        env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        command = [sys.executable, "-m", "resnetlab", "train", "--recipe-file", str(recipe), "--out", "run", "--quiet"]
        children.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True))
    try:
        outputs = [child.communicate(timeout=LAUNCH_TIMEOUT_S) for child in children]
    finally:
        for child in children:
            child.kill()
    assert [child.returncode for child in children] == [0, 0], [err[-3000:] for _, err in outputs]
    assert list((tmp_path / "rank1").iterdir()) == [] and outputs[1][0] == ""
    assert_same_training(one.run_dir, tmp_path / "rank0" / "run")
    assert one.summary["batch"]["micro_batch"] == 32 and one.summary["steps"] == 4


@pytest.mark.timeout(240)
def test_a_two_process_run_resumes_a_one_process_checkpoint_exactly(data_dir, tmp_path):
    """Every rank loads rank 0's checkpoint: a 2-epoch run interrupted after epoch 1 (one process)
    and resumed by two processes ends as the uninterrupted one-process run."""
    config = ddp_config(data_dir, tmp_path / "whole", **{"train.epochs": 2})
    whole = train(config, progress="none")

    def stop(row):
        raise KeyboardInterrupt

    partial = tmp_path / "partial"
    with pytest.raises(KeyboardInterrupt):
        train({**config, "out": str(partial)}, progress="none", on_epoch_end=stop)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "resnetlab", "train", "--resume", str(partial), "--quiet"]
    launched = subprocess.run(command, cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                              timeout=LAUNCH_TIMEOUT_S)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert_same_training(whole.run_dir, partial, first_step=5)


@pytest.mark.timeout(240)
def test_the_imagenet_pipeline_shards_by_rank_too(tmp_path):
    """Its crops are a function of (seed, epoch, image), not of the rank: 2 processes match 1."""
    from test_imagenet import tiny_imagenet_config, write_folder

    folder = write_folder(tmp_path / "images", {"train": 8, "val": 2})  # 24 training images, 6 validation
    config = tiny_imagenet_config(folder, tmp_path / "one")
    config["model"] = {"name": "resnet8", "options": {"width": 0.25}}
    config["data"]["workers"] = 1
    config["train"].update(batch_size=8, steps=None, epochs=1, log_every_steps=1, sync_bn=True)
    one = train(config, progress="none")
    recipe = write_recipe(tmp_path / "recipe.yaml", config)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "resnetlab", "train", "--recipe-file", str(recipe), "--out", "two", "--quiet"]
    launched = subprocess.run(command, cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                              timeout=LAUNCH_TIMEOUT_S)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert_same_training(one.run_dir, tmp_path / "two")
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["steps"] == 3


# --- gradient accumulation in one process: exact where no BN is involved ----------------------------

def linear_trainer(**overrides) -> Trainer:
    """A BN-free model (BN would normalise each micro-batch with its own statistics)."""
    config = validate_config(tiny_config(Path("unused"), None, **{"schedule.kind": "constant",
                                                                  "schedule.warmup.kind": "none", **overrides}))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    runtime = resolve_runtime(config.runtime)
    schedule = Schedule(config.schedule, config.optim.lr, total_steps=10, steps_per_epoch=10)
    return Trainer(cfg=config, model=model, forward=model, optimizer=build_optimizer(model, config.optim),
                   schedule=schedule, warmup=WarmupController(schedule), runtime=runtime,
                   scaler=runtime.grad_scaler(), bn_layers=[], lr_scale=lr_scale(config.optim, config.train.batch_size))


@pytest.mark.parametrize("split", [32, 40, 8])
def test_accumulated_micro_batches_give_the_big_batch_step(split):
    """Micro-batches of unequal size are weighted by their share of the step's images."""
    x, y = torch.randn(2, 64, 3, 8, 8), torch.randint(0, 10, (2, 64))
    big, accumulated = linear_trainer(), linear_trainer()
    for step in range(2):
        big.train_step(x[step], y[step], step)
        accumulated.train_step(x[step, :split], y[step, :split], step, more=[(x[step, split:], y[step, split:])])
    for a, b in zip(big.model.parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert big.epoch_meter.read() == pytest.approx(accumulated.epoch_meter.read(), rel=1e-6)


# --- the batch and lr settings ------------------------------------------------------------------

def test_linear_lr_scaling_multiplies_every_lr_of_the_schedule():
    trainer = linear_trainer(**{"optim.lr_scaling": "linear", "optim.lr_reference_batch": 16, "train.batch_size": 64})
    trainer.train_step(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)), 0)
    assert trainer.lr_scale == 4 and trainer.lr == pytest.approx(4 * 0.05)


def test_lr_scale_rules():
    optim = validate_config({}).optim
    assert lr_scale(optim, 1024) == 1.0  # "none": existing recipes are unchanged
    assert lr_scale(optim.model_copy(update={"lr_scaling": "linear"}), 1024) == 8.0  # reference batch 128
    assert lr_scale(optim.model_copy(update={"lr_scaling": "sqrt", "lr_reference_batch": 256}), 1024) == 2.0


def test_the_global_batch_must_split_into_processes_and_accumulation_steps():
    config = validate_config({"train": {"batch_size": 96, "accum_steps": 3}})
    assert micro_batch_size(config, 1) == 32 and micro_batch_size(config, 2) == 16
    with pytest.raises(ConfigError, match="multiple of 15"):
        micro_batch_size(config, 5)
    with pytest.raises(ConfigError, match="not a multiple of train.accum_steps"):
        validate_config({"train": {"batch_size": 100, "accum_steps": 3}})
    assert validate_config({}).train.accum_steps == 1 and validate_config({}).train.sync_bn is False
