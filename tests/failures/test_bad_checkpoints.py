"""Bad checkpoints through the CLI (`eval` and `train --resume`): truncated or corrupt safetensors,
pickles of every protocol and torch.save files (refused and never executed), hostile headers and
metadata, and checkpoints of another architecture -- always one line and exit 2, never a traceback.
(tests/test_checkpoint.py covers the reader itself; tests/test_cli_eval.py the plainest CLI cases.)"""
from __future__ import annotations

import json
import pickle
import shutil
import struct

import pytest
import torch
from evalkit import assert_one_line_error, run_cli, write_checkpoint, write_image_folder
from safetensors.torch import save_file
from trainkit import tiny_config, write_synthetic_cifar10

from resnetlab.artifacts import checkpoint as ckpt
from resnetlab.engine.train import train


class Exploit:
    """Unpickling this creates `marker`: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), "test", per_class=4)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "good.safetensors")


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory):
    """A resnet8 run stopped after its first epoch (summary removed): resumable."""
    root = tmp_path_factory.mktemp("run")
    synthetic = write_synthetic_cifar10(root / "data")
    result = train(tiny_config(synthetic, root / "run", **{"train.epochs": 1}), progress="none")
    (result.run_dir / "summary.json").unlink()
    return result.run_dir


def eval_cli(capsys, checkpoint, data):
    return run_cli(capsys, "eval", checkpoint, "--data-dir", data, "--device", "cpu", "--json")


def copy_run(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickles_of_every_protocol_are_refused_and_never_run(capsys, tmp_path, data, unfinished_run, protocol):
    marker = tmp_path / "executed"
    payload = pickle.dumps({"fc.weight": Exploit(marker)}, protocol=protocol)
    evil = tmp_path / "model.safetensors"
    evil.write_bytes(payload)
    assert_one_line_error(*eval_cli(capsys, evil, data), str(evil))
    run = copy_run(unfinished_run, tmp_path)
    (run / "checkpoints" / "state.safetensors").write_bytes(payload)
    assert_one_line_error(*run_cli(capsys, "train", "--resume", run), "state.safetensors")
    assert not marker.exists(), "a pickle was executed"


def test_torch_save_of_an_exploit_is_refused_and_never_run(capsys, tmp_path, data):
    marker = tmp_path / "executed"
    evil = tmp_path / "model.pt"
    torch.save({"fc.weight": Exploit(marker)}, evil)
    assert_one_line_error(*eval_cli(capsys, evil, data), "pickle")
    assert not marker.exists()


def _with_header_length(good_bytes: bytes, length: int) -> bytes:
    return struct.pack("<Q", length) + good_bytes[8:]


@pytest.mark.parametrize("mangle", [
    pytest.param(lambda b: b[: len(b) // 2], id="truncated-half"),
    pytest.param(lambda b: b[:8], id="header-length-only"),
    pytest.param(lambda b: _with_header_length(b, 2**63), id="header-length-huge"),
    pytest.param(lambda b: _with_header_length(b, 0), id="header-length-zero"),
    pytest.param(lambda b: b[:8] + b"[" + b[9:], id="header-not-an-object"),
    pytest.param(lambda b: b[:8] + b[8:].replace(b'"F32"', b'"Q99"', 1), id="unknown-dtype"),
    pytest.param(lambda b: b[:8] + bytes(x ^ 0xFF for x in b[8:64]) + b[64:], id="flipped-header-bytes"),
    pytest.param(lambda b: b + b"trailing garbage", id="trailing-bytes"),
])
def test_corrupt_safetensors_is_one_line_for_eval_and_resume(capsys, tmp_path, data, good, unfinished_run, mangle):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(mangle(good.read_bytes()))
    assert_one_line_error(*eval_cli(capsys, bad, data), str(bad))
    run = copy_run(unfinished_run, tmp_path)
    state = run / "checkpoints" / "state.safetensors"
    state.write_bytes(mangle(state.read_bytes()))
    assert_one_line_error(*run_cli(capsys, "train", "--resume", run), "state.safetensors")


@pytest.mark.parametrize("change, fragment", [
    ({"model": 42}, "'model'"),
    ({"model": "resnet9000"}, "resnet9000"),
    ({"model_options": [1]}, "'model_options'"),
    ({"model_options": {"frobnicate": 1}}, "frobnicate"),
    ({"num_classes": "ten"}, "num_classes"),
    ({"classes": 5}, "'classes'"),
    ({"normalization": {"kind": "zzz"}}, "normali"),
])
def test_hostile_metadata_is_one_line(capsys, tmp_path, data, good, change, fragment):
    state, metadata = ckpt.read_checkpoint(good)
    path = tmp_path / "odd.safetensors"
    save_file(state, str(path), metadata={ckpt.METADATA_KEY: json.dumps({**metadata, **change})})
    assert_one_line_error(*eval_cli(capsys, path, data), fragment)


@pytest.mark.parametrize("model_name", ["resnet14", "resnet20"])
def test_weights_of_another_architecture_name_the_mismatch(capsys, tmp_path, data, model_name):
    # tensors of another model filed under metadata that says resnet8
    state, metadata = ckpt.read_checkpoint(write_checkpoint(tmp_path / "other.safetensors", model_name=model_name))
    ckpt.save_checkpoint(tmp_path / "lie.safetensors", state, {**metadata, "model": "resnet8"})
    code, out, err = eval_cli(capsys, tmp_path / "lie.safetensors", data)
    assert_one_line_error(code, out, err, "does not match")


@pytest.mark.parametrize("change", [{"name": "resnet14"}, {"options": {"width": 0.5}}])
def test_resume_with_the_state_of_another_architecture_is_one_line(capsys, tmp_path, unfinished_run, change):
    run = copy_run(unfinished_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["model"].update(change)
    (run / "config.json").write_text(json.dumps(config))
    before = (run / "checkpoints" / "state.safetensors").read_bytes()
    assert_one_line_error(*run_cli(capsys, "train", "--resume", run), "does not match")
    assert (run / "checkpoints" / "state.safetensors").read_bytes() == before
