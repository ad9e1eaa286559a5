"""A full disk while a checkpoint is written (an injected ENOSPC from fsync, where delayed
allocation reports it): the previous checkpoint stays intact and loadable, no temp file is left,
the error is one line naming what to do, and once there is space the run resumes to the same
result as a run that never failed."""
from __future__ import annotations

import errno
import os

import pytest
import torch
from trainkit import tiny_config, write_synthetic_cifar10

from resnetlab.artifacts.checkpoint import read_checkpoint, read_tensors
from resnetlab.cli import main
from resnetlab.engine.train import resume, train
from resnetlab.errors import ResnetlabError

EXTRA = {"train.checkpoint_every_steps": 3}
# the injection finds which file an fsync is for through /proc/self/fd (Linux)
pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd (Linux)")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_cifar10(tmp_path_factory.mktemp("synthetic"))


def fail_fsync_of(patch, name: str, nth: int) -> list:
    """ENOSPC from the `nth` fsync of a temp file for checkpoints/`name`; returns the hits."""
    real_fsync, seen = os.fsync, []

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.basename(target).startswith(f".{name}."):
            seen.append(target)
            if len(seen) == nth:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    patch.setattr(os, "fsync", fsync)
    return seen


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("name, nth, kept_step", [
    ("state.safetensors", 3, 5),  # the step-6 state fails: epoch 1 (step 5) is what resume continues from
    ("last.safetensors", 3, 6),  # the state at step 6 is written, the model file for users fails
])
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(synthetic, tmp_path, monkeypatch, name, nth, kept_step):
    out = tmp_path / "run"
    config = tiny_config(synthetic, out, **EXTRA)
    snapshots = []

    def before_step_6_save(step):
        if step == 6:
            snapshots.append(snapshot(out / "checkpoints"))

    with monkeypatch.context() as patch, pytest.raises(ResnetlabError) as error:
        hits = fail_fsync_of(patch, name, nth)
        train(config, progress="none", on_step=before_step_6_save)
    message = str(error.value)
    assert len(hits) == nth
    assert "\n" not in message and "No space left on device" in message and "--resume" in message, message
    assert f"step {kept_step}" in message, message
    files = snapshot(out / "checkpoints")
    assert not [n for n in files if n.endswith(".tmp")], "temp file left behind"
    assert files[name] == snapshots[0][name]  # the file being written when the disk filled is untouched
    tensors, metadata = read_checkpoint(out / "checkpoints" / "last.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    assert read_tensors(out / "checkpoints" / "state.safetensors")[1]["state"]["step"] == kept_step

    reference = train(tiny_config(synthetic, tmp_path / "reference", **EXTRA), progress="none")
    resumed = resume(out, progress="none")
    for file in ("last.safetensors", "best.safetensors", "state.safetensors"):
        a, _ = read_tensors(reference.run_dir / "checkpoints" / file)
        b, _ = read_tensors(resumed.run_dir / "checkpoints" / file)
        assert all(torch.equal(a[k], b[k]) for k in a), file
    assert resumed.summary["final"] == reference.summary["final"]


def test_disk_full_through_the_cli_is_one_line_not_a_traceback(synthetic, tmp_path, monkeypatch, capsys):
    fail_fsync_of(monkeypatch, "state.safetensors", 1)  # the very first checkpoint
    out = tmp_path / "run"
    argv = ["train", "--model", "resnet8", "--set", "model.options.width=0.25", "--val-size", "80", "--epochs", "1",
            "--device", "cpu", "--precision", "fp32", "--set", "train.batch_size=64", "--set", "runtime.threads=1",
            "--data-dir", str(synthetic), "--out", str(out), "--quiet"]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("resnetlab: error: "), err
    assert "No space left on device" in err[0] and "no checkpoint" in err[0], err
    assert not list(out.rglob("*.tmp"))
