"""Checkpoints are safetensors, written atomically, and never unpickled."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from resnetlab.artifacts import checkpoint as ckpt
from resnetlab.errors import CheckpointError


def _state():
    return {"conv.weight": torch.randn(4, 3, 3, 3), "bn.running_mean": torch.zeros(4), "step": torch.tensor(7)}


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    path = tmp_path / "model.safetensors"
    state = _state()
    ckpt.save_checkpoint(path, state, {"model": "resnet20", "classes": ["a", "b"], "epoch": 3})
    loaded, metadata = ckpt.read_checkpoint(path)
    assert set(loaded) == set(state)
    for name in state:
        assert torch.equal(loaded[name], state[name])
    assert metadata["model"] == "resnet20" and metadata["classes"] == ["a", "b"] and metadata["epoch"] == 3
    assert metadata["format"] == ckpt.FORMAT_VERSION
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "temp file left behind"


@pytest.mark.parametrize("keep_bytes", [0, 7, 100, -10])
def test_truncated_file_gives_checkpoint_error(tmp_path, keep_bytes):
    path = tmp_path / "model.safetensors"
    ckpt.save_checkpoint(path, _state(), {"model": "resnet20"})
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes] if keep_bytes >= 0 else data[:keep_bytes])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ckpt.read_checkpoint(path)


def test_random_bytes_give_checkpoint_error(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError):
        ckpt.read_checkpoint(path)


class _Exploit:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(_Exploit(marker), protocol=4))
    with pytest.raises(CheckpointError, match="pickle"):
        ckpt.read_checkpoint(path)
    assert not marker.exists()


def test_header_length_starting_with_the_pickle_byte_still_loads(tmp_path):
    # A safetensors file starts with its header length; when that is 128 mod 256 the first byte is
    # 0x80, the pickle protocol marker. Such a valid checkpoint must load, not be refused.
    path = tmp_path / "model.safetensors"
    for filler in range(300):
        ckpt.save_checkpoint(path, _state(), {"model": "resnet8", "note": "x" * filler})
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no metadata size gave a header length of 128 mod 256")
    state, metadata = ckpt.read_checkpoint(path)
    assert metadata["note"] == "x" * filler and torch.equal(state["step"], torch.tensor(7))


def test_torch_save_file_is_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(_state(), path)
    with pytest.raises(CheckpointError, match="pickle"):
        ckpt.read_checkpoint(path)


def test_file_without_resnetlab_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="metadata"):
        ckpt.read_checkpoint(path)


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    ckpt.save_checkpoint(path, _state(), {"model": "resnet20", "epoch": 1})
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        ckpt.save_checkpoint(path, _state(), {"model": "resnet20", "epoch": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"], "temp file left behind"


def test_resolve_run_dir_and_unknown_name(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="last.safetensors"):
        ckpt.resolve_checkpoint_path(run)
    ckpt.save_checkpoint(run / "checkpoints" / "last.safetensors", _state(), {"model": "resnet20"})
    assert ckpt.resolve_checkpoint_path(run) == run / "checkpoints" / "last.safetensors"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ckpt.resolve_checkpoint_path("no-such-model-name")


def test_mismatched_state_dict_lists_keys():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    state = {"0.weight": torch.zeros(2, 4), "extra": torch.zeros(1)}
    with pytest.raises(CheckpointError) as info:
        ckpt.load_state_dict_checked(model, state, source="x.safetensors")
    message = str(info.value)
    assert "missing: 0.bias" in message and "unexpected: extra" in message and "wrong shape: 0.weight" in message
    assert "\n" not in message


def test_written_files_follow_the_umask_not_mkstemps_0600(tmp_path):
    path = tmp_path / "model.safetensors"
    ckpt.save_checkpoint(path, _state(), {"model": "resnet8"})
    assert path.stat().st_mode & 0o777 == 0o666 & ~ckpt._UMASK
