"""`resnetlab data inspect` on every format, and each bad input as one stderr line + non-zero exit."""
from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest
from PIL import Image
from test_data_formats import (
    CLASSES,
    py2_pickle,
    write_binary_cifar10,
    write_image_folder,
    write_python_cifar10,
)

from resnetlab import cli


@pytest.fixture(autouse=True)
def _data_command_only(tmp_path, monkeypatch):
    # Only the data subcommand: these tests must not depend on other commands being importable.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["data_cmd"])
    monkeypatch.setenv("RESNETLAB_CACHE", str(tmp_path / "cache"))


def inspect(capsys, *args):
    code = cli.main(["data", "inspect", "--no-download", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def inspect_error(capsys, *args) -> str:
    """Run inspect expecting failure: non-zero exit, exactly one stderr line, no traceback."""
    code, _, err = inspect(capsys, *args)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resnetlab: error: "), err
    return lines[0]


@pytest.mark.parametrize("writer", [write_python_cifar10, write_binary_cifar10])
def test_inspect_json_reports_train_val_test_counts(tmp_path, capsys, writer):
    writer(tmp_path)
    code, out, err = inspect(capsys, "--data-dir", tmp_path, "--val-size", 10, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["splits"] == {"train": 20, "val": 10, "test": 8}
    assert report["num_classes"] == 10 and report["classes"] == CLASSES
    assert report["image_shape"] == [3, 32, 32]
    assert sum(report["per_class"]["val"].values()) == 10 and set(report["per_class"]) == {"train", "val", "test"}
    assert len(report["mean"]) == len(report["std"]) == 3


def test_inspect_without_val_leaves_the_split_out(tmp_path, capsys):
    write_python_cifar10(tmp_path)
    code, out, _ = inspect(capsys, "--data-dir", tmp_path / "cifar-10-batches-py", "--val-size", 0, "--json")
    report = json.loads(out)
    assert code == 0 and report["splits"] == {"train": 30, "test": 8} and "val" not in report["per_class"]


def test_inspect_human_output_and_grid(tmp_path, capsys):
    write_python_cifar10(tmp_path)
    grid = tmp_path / "grid.png"
    code, out, err = inspect(capsys, "--data-dir", tmp_path, "--val-size", 10, "--grid", grid)
    assert code == 0, err
    assert "mean (RGB" in out and "std  (RGB" in out and "image shape: 3x32x32" in out
    assert "total" in out and "airplane" in out
    with Image.open(grid) as image:
        assert image.format == "PNG" and image.height >= 10 * 64


def test_inspect_image_folder_with_test_only(tmp_path, capsys):
    rng = np.random.default_rng(0)
    write_image_folder(tmp_path, rng.integers(0, 256, (4, 3, 16, 16), dtype=np.uint8), [0, 1, 0, 1], split="test")
    code, out, err = inspect(capsys, "--data-dir", tmp_path, "--json")
    assert code == 0, err
    assert json.loads(out)["splits"] == {"test": 4} and json.loads(out)["image_shape"] == [3, 16, 16]


# --- bad input: one line on stderr, non-zero exit, never a traceback ------------------------------
def small_folder(root, n=12, size=16):
    rng = np.random.default_rng(0)
    return write_image_folder(root, rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8), np.arange(n) % 3)


def test_missing_directory(tmp_path, capsys):
    line = inspect_error(capsys, "--data-dir", tmp_path / "absent")
    assert "absent" in line and "does not exist" in line


def test_folder_with_nothing_recognisable(tmp_path, capsys):
    (tmp_path / "readme.txt").write_text("x")
    line = inspect_error(capsys, "--data-dir", tmp_path)
    assert "no CIFAR data found" in line


def test_empty_class_folder(tmp_path, capsys):
    small_folder(tmp_path)
    (tmp_path / "train" / "zebra").mkdir()
    line = inspect_error(capsys, "--data-dir", tmp_path)
    assert "zebra has no images" in line


def test_corrupt_image_is_named_and_can_be_skipped(tmp_path, capsys, caplog):
    small_folder(tmp_path)
    bad = tmp_path / "train" / "automobile" / "0004.png"
    bad.write_bytes(b"\x89PNG broken")
    line = inspect_error(capsys, "--data-dir", tmp_path, "--val-size", 3)
    assert str(bad) in line and "--skip-bad-images" in line
    with caplog.at_level(logging.WARNING):
        code, out, err = inspect(capsys, "--data-dir", tmp_path, "--val-size", 3, "--json", "--skip-bad-images")
    assert code == 0, err
    report = json.loads(out)
    assert report["splits"] == {"train": 8, "val": 3} and report["skipped"] == 1
    assert "skipped 1 unreadable image(s)" in caplog.text and str(bad) in caplog.text


def test_mixed_image_sizes(tmp_path, capsys):
    small_folder(tmp_path)
    odd = tmp_path / "train" / "bird" / "0002.png"
    Image.new("RGB", (20, 16)).save(odd)
    line = inspect_error(capsys, "--data-dir", tmp_path, "--val-size", 0)
    assert str(odd) in line and "20x16" in line and "16x16" in line


def test_label_count_mismatch_in_a_cifar_batch(tmp_path, capsys):
    folder_path = write_python_cifar10(tmp_path)
    py2_pickle({b"labels": [0] * 5, b"data": np.zeros((6, 3072), np.uint8)}, folder_path / "data_batch_2")
    line = inspect_error(capsys, "--data-dir", tmp_path)
    assert "data_batch_2" in line and "5 labels for 6 images" in line


def test_random_bytes_in_a_cifar_batch(tmp_path, capsys):
    folder_path = write_python_cifar10(tmp_path)
    (folder_path / "test_batch").write_bytes(np.random.default_rng(0).bytes(4096))
    line = inspect_error(capsys, "--data-dir", tmp_path)
    assert "test_batch" in line and "not a valid CIFAR batch" in line


def test_pickle_with_code_in_a_cifar_batch(tmp_path, capsys):
    folder_path = write_python_cifar10(tmp_path)
    marker = tmp_path / "ran"
    payload = pickle.dumps({b"data": _Payload(str(marker))}, protocol=2)
    (folder_path / "data_batch_1").write_bytes(payload)
    line = inspect_error(capsys, "--data-dir", tmp_path)
    assert "data_batch_1" in line and "refusing to load global" in line
    assert not marker.exists()


class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_truncated_binary_batch(tmp_path, capsys):
    folder_path = write_binary_cifar10(tmp_path)
    (folder_path / "test_batch.bin").write_bytes(b"\x01" * 100)
    line = inspect_error(capsys, "--data-dir", tmp_path)
    assert "test_batch.bin" in line and "3073-byte records" in line


def test_val_size_too_large(tmp_path, capsys):
    write_python_cifar10(tmp_path)
    line = inspect_error(capsys, "--data-dir", tmp_path, "--val-size", 30)
    assert "val_size" in line


def test_unwritable_grid(tmp_path, capsys):
    write_python_cifar10(tmp_path)
    line = inspect_error(capsys, "--data-dir", tmp_path, "--val-size", 0, "--grid", tmp_path / "no" / "g.png")
    assert "cannot write grid" in line
