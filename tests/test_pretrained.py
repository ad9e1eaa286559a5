"""load_pretrained: the file formats and layouts it accepts, the renamings it undoes, and the
files it refuses (with the keys named), including pickles that would run code."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from safetensors.torch import save_file

from resnetlab.errors import CheckpointError
from resnetlab.models import create_model, load_pretrained, load_state_dict_file


@pytest.fixture
def source():
    torch.manual_seed(7)
    model = create_model("resnet8")
    model(torch.randn(4, 3, 32, 32))  # non-trivial BN running statistics
    return model.eval()


def assert_same_model(loaded, source):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), source(x))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def fresh():
    torch.manual_seed(99)
    return create_model("resnet8")


@pytest.mark.parametrize("layout", ["bare", "state_dict", "model", "module_prefix", "compiled_prefix", "linear"])
@pytest.mark.parametrize("suffix", [".pth", ".th", ".pt"])
def test_torch_files_in_every_common_layout_load(tmp_path, source, layout, suffix):
    state = source.state_dict()
    if layout == "module_prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    elif layout == "compiled_prefix":
        state = {f"_orig_mod.{k}": v for k, v in state.items()}
    elif layout == "linear":
        state = {k.replace("fc.", "linear.", 1) if k.startswith("fc.") else k: v for k, v in state.items()}
    payload = {layout: state, "epoch": 3} if layout in ("state_dict", "model") else state
    path = tmp_path / f"weights{suffix}"
    torch.save(payload, path)
    assert_same_model(load_pretrained(fresh(), path), source)


def test_option_b_shortcut_keys_of_cifar_code_load(tmp_path):
    # akamaster's option B: self.shortcut = nn.Sequential(conv1x1, BatchNorm2d).
    source = create_model("resnet8", shortcut="B").eval()
    state = {k.replace("downsample", "shortcut").replace("fc.", "linear."): v for k, v in source.state_dict().items()}
    assert "layer2.0.shortcut.0.weight" in state
    torch.save({"state_dict": state}, tmp_path / "b.th")
    torch.manual_seed(5)
    assert_same_model(load_pretrained(create_model("resnet8", shortcut="B"), tmp_path / "b.th"), source)


def test_safetensors_files_load(tmp_path, source):
    path = tmp_path / "weights.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in source.state_dict().items()}, path)
    model = fresh()
    assert load_pretrained(model, path) is model
    assert_same_model(model, source)


def test_files_without_num_batches_tracked_still_load_strict(tmp_path, source):
    # Checkpoints saved before PyTorch 0.4.1 have no num_batches_tracked buffers.
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    model = load_pretrained(fresh(), tmp_path / "old.pth")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), source(x))


def test_missing_and_unexpected_keys_are_listed(tmp_path, source):
    state = source.state_dict()
    del state["layer2.0.conv1.weight"], state["fc.bias"]
    state["head.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError) as error:
        load_pretrained(fresh(), tmp_path / "partial.pth")
    message = str(error.value)
    assert "missing (2): layer2.0.conv1.weight, fc.bias" in message
    assert "unexpected (1): head.weight" in message
    assert "partial.pth" in message and "resnet8" in message


def test_wrong_shapes_are_listed_and_strict_false_skips_them(tmp_path):
    imagenet_like = create_model("resnet8", num_classes=1000)
    torch.save(imagenet_like.state_dict(), tmp_path / "1000.pth")
    with pytest.raises(CheckpointError, match=r"wrong shape \(2\): fc.weight \(1000, 64\) vs \(10, 64\)"):
        load_pretrained(create_model("resnet8"), tmp_path / "1000.pth")
    model = create_model("resnet8")
    fc_before = model.fc.weight.clone()
    with pytest.warns(UserWarning, match="fc.weight"):
        load_pretrained(model, tmp_path / "1000.pth", strict=False)
    assert torch.equal(model.fc.weight, fc_before)
    assert torch.equal(model.conv1.weight, imagenet_like.conv1.weight)


def test_strict_false_loads_a_partial_file(tmp_path, source):
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "backbone.pth")
    model = fresh()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pretrained(model, tmp_path / "backbone.pth", strict=False)
    assert any("missing (2): fc.weight, fc.bias" in str(w.message) for w in caught)
    assert torch.equal(model.layer3[0].conv2.weight, source.layer3[0].conv2.weight)


class _RunsCode:
    """A pickle payload that would create a folder when unpickled by plain pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_a_pickle_with_code_is_refused_and_never_run(tmp_path, source):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": source.state_dict(), "extra": _RunsCode(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refusing to load .*GLOBAL os.makedirs"):
        load_pretrained(fresh(), path)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.is_dir()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04 broken zip"])
def test_corrupt_torch_files_are_refused(tmp_path, content):
    (tmp_path / "bad.pth").write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pth"):
        load_pretrained(fresh(), tmp_path / "bad.pth")


def test_truncated_torch_file_is_refused(tmp_path, source):
    torch.save(source.state_dict(), tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth"):
        load_pretrained(fresh(), tmp_path / "cut.pth")


def test_corrupt_safetensors_and_missing_files_are_refused(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pretrained(fresh(), tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(fresh(), tmp_path / "absent.pth")


@pytest.mark.parametrize("payload, match", [
    (torch.zeros(3), "holds no state_dict"),
    ({}, "holds no state_dict"),
    ({"conv1.weight": torch.zeros(1), "epoch": 3}, "not tensors: epoch"),
])
def test_files_that_hold_no_state_dict_are_refused(tmp_path, payload, match):
    torch.save(payload, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=match):
        load_state_dict_file(tmp_path / "odd.pth")
