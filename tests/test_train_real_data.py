"""The acceptance run on the shared JPEG copy of CIFAR-10: a 2-epoch ResNet-20 on a small subset
writes every artifact, and stopped after epoch 1 then resumed it finishes identical (CPU, same seed)."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from trainkit import tiny_config

from resnetlab.artifacts.checkpoint import load, read_tensors
from resnetlab.artifacts.metrics import TIMING_COLUMNS
from resnetlab.engine.train import TrainingInterrupted, resume, train

pytestmark = pytest.mark.shared_data

ARTIFACTS = ("config.json", "env.json", "patch.diff", "metrics.jsonl", "metrics.csv", "curves.png", "summary.json",
             "checkpoints/last.safetensors", "checkpoints/best.safetensors", "checkpoints/state.safetensors",
             "checkpoints/state.json")


def resnet20_config(data_dir, out):
    return tiny_config(data_dir, out, **{
        "model": {"name": "resnet20", "options": {}}, "data.val_size": 5000, "data.limit_train": 512,
        "data.limit_val": 256, "train.log_every_steps": 4, "optim.lr": 0.1})


def test_resnet20_two_epochs_on_jpeg_subset_writes_every_artifact_and_resumes_identically(cifar_jpeg_dir, tmp_path):
    reference = train(resnet20_config(cifar_jpeg_dir, tmp_path / "a"), progress="none")
    for name in ARTIFACTS:
        assert (reference.run_dir / name).is_file(), name
    assert reference.summary["steps"] == 16 and reference.summary["data"]["train_images"] == 512
    assert reference.summary["data"]["val_images"] == 256
    model, metadata = load(reference.run_dir)
    assert metadata["model"] == "resnet20" and len(metadata["classes"]) == 10

    def stop_after_epoch_1(row):
        if row["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train(resnet20_config(cifar_jpeg_dir, tmp_path / "b"), progress="none", on_epoch_end=stop_after_epoch_1)
    resumed = resume(tmp_path / "b", progress="none")

    for name in ("last.safetensors", "best.safetensors", "state.safetensors"):
        a, _ = read_tensors(reference.run_dir / "checkpoints" / name)
        b, _ = read_tensors(resumed.run_dir / "checkpoints" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    def rows(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_COLUMNS} for line in lines]

    assert rows(reference.run_dir) == rows(resumed.run_dir)
    assert (resumed.final_val_error, resumed.best_val_error) == (reference.final_val_error, reference.best_val_error)
