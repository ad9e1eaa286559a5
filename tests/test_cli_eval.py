"""`resnetlab eval` through resnetlab.cli.main: metrics, artifacts, split handling, and one-line errors."""
from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

import resnetlab
from evalkit import CLASSES, assert_one_line_error, run_cli, write_checkpoint, write_image_folder
from resnetlab.artifacts import checkpoint as ckpt
from resnetlab.cli.eval_cmd import remap_labels
from resnetlab.data import Normalizer, load_dataset
from resnetlab.errors import DataError
from resnetlab.evaluate import evaluate

PER_CLASS = 14  # 42 test images


@pytest.fixture(scope="module")
def test_only_data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data"), "test", PER_CLASS)


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture
def run_dir(tmp_path, checkpoint_file):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint_file, tmp_path / "run" / "checkpoints" / "last.safetensors")
    return tmp_path / "run"


def test_json_has_the_five_keys_and_matches_evaluate(capsys, test_only_data, checkpoint_file):
    code, out, err = run_cli(capsys, "eval", checkpoint_file, "--data-dir", test_only_data, "--json", "--device", "cpu")
    assert code == 0, err
    summary = json.loads(out)
    assert set(summary) == {"top1_error", "top3_error", "top5_error", "loss", "n"}
    assert summary["n"] == 3 * PER_CLASS
    assert summary["top3_error"] == 0.0 and summary["top5_error"] == 0.0  # 3 classes

    model, metadata = resnetlab.load(checkpoint_file)
    test = load_dataset(test_only_data, need=("test",)).test
    expected = evaluate(model, test.images, test.labels, Normalizer.from_dict(metadata["normalization"]))
    assert summary == pytest.approx(expected.summary())

    code, out, err = run_cli(capsys, "eval", checkpoint_file, "--data-dir", test_only_data, "--json", "--device", "cpu",
                             "--tta", "flip-shift")
    assert code == 0, err
    shifted = evaluate(model, test.images, test.labels, Normalizer.from_dict(metadata["normalization"]), tta="flip-shift")
    assert json.loads(out) == pytest.approx(shifted.summary())
    assert shifted.loss != pytest.approx(expected.loss)


def test_flip_shift_fills_as_the_checkpoint_was_trained_unless_told(capsys, tmp_path, test_only_data):
    reflect = write_checkpoint(tmp_path / "reflect.safetensors", data={"padding_mode": "reflect"})
    model, metadata = resnetlab.load(reflect)
    test = load_dataset(test_only_data, need=("test",)).test
    normalizer = Normalizer.from_dict(metadata["normalization"])
    expected = {fill: evaluate(model, test.images, test.labels, normalizer, tta="flip-shift", shift_padding=fill).summary()
                for fill in ("zeros", "reflect")}
    assert expected["zeros"]["loss"] != pytest.approx(expected["reflect"]["loss"])
    for option, fill in ((), "reflect"), (("--shift-padding", "zeros"), "zeros"):
        code, out, err = run_cli(capsys, "eval", reflect, "--data-dir", test_only_data, "--json", "--device", "cpu",
                                 "--tta", "flip-shift", *option)
        assert code == 0, err
        assert json.loads(out) == pytest.approx(expected[fill])
    code, out, err = run_cli(capsys, "eval", reflect, "--data-dir", test_only_data, "--device", "cpu", "--tta", "flip-shift")
    assert code == 0 and "tta flip-shift (reflect fill)" in out


def test_run_dir_gets_confusion_png_and_per_class_table(capsys, test_only_data, run_dir):
    code, out, err = run_cli(capsys, "eval", run_dir, "--data-dir", test_only_data, "--tta", "flip", "--batch-size", "8")
    assert code == 0, err
    for name in CLASSES:
        assert name in out
    assert "top-1 error" in out and "top-5 error" in out and "loss" in out
    png = run_dir / "confusion-test-flip.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and str(png) in out


def test_confusion_path_option_and_no_png_for_a_loose_file(capsys, tmp_path, test_only_data, checkpoint_file):
    code, _, err = run_cli(capsys, "eval", checkpoint_file, "--data-dir", test_only_data, "--json")
    assert code == 0, err
    assert not list(checkpoint_file.parent.glob("*.png"))
    target = tmp_path / "figs" / "c.png"
    code, out, err = run_cli(capsys, "eval", checkpoint_file, "--data-dir", test_only_data, "--json", "--confusion", target)
    assert code == 0, err
    assert target.is_file() and json.loads(out)["n"] == 3 * PER_CLASS  # stdout stays pure JSON


def test_val_split_is_recomputed_from_checkpoint_metadata(capsys, tmp_path):
    data = write_image_folder(tmp_path / "data", "train", 10)
    checkpoint = write_checkpoint(tmp_path / "c.safetensors", data={"val_size": 6, "split_seed": 3})
    code, out, err = run_cli(capsys, "eval", checkpoint, "--data-dir", data, "--json", "--device", "cpu")  # no test: val
    assert code == 0, err
    model, metadata = resnetlab.load(checkpoint)
    val = load_dataset(data, need=("val",), val_size=6, split_seed=3).val
    expected = evaluate(model, val.images, val.labels, Normalizer.from_dict(metadata["normalization"]))
    assert json.loads(out) == pytest.approx(expected.summary()) and expected.n == 6

    code, out, err = run_cli(capsys, "eval", checkpoint, "--data-dir", data, "--split", "train", "--json")
    assert code == 0 and json.loads(out)["n"] == 30 - 6


def test_val_split_refused_when_checkpoint_trained_on_everything(capsys, tmp_path):
    data = write_image_folder(tmp_path / "data", "train", 4)
    checkpoint = write_checkpoint(tmp_path / "c.safetensors", data={"val_size": 0, "split_seed": 0})
    assert_one_line_error(*run_cli(capsys, "eval", checkpoint, "--data-dir", data), "val_size 0")


def test_bundled_name_resolves(capsys, monkeypatch, tmp_path, test_only_data, checkpoint_file):
    monkeypatch.setattr(ckpt, "BUNDLED_DIR", tmp_path)
    shutil.copy(checkpoint_file, tmp_path / "tiny-bundle.safetensors")
    assert ckpt.resolve_checkpoint_path("tiny-bundle") == tmp_path / "tiny-bundle.safetensors"
    model, metadata = resnetlab.load("tiny-bundle")
    assert not model.training and metadata["classes"] == CLASSES
    code, out, err = run_cli(capsys, "eval", "tiny-bundle", "--data-dir", test_only_data, "--json")
    assert code == 0, err
    assert json.loads(out)["n"] == 3 * PER_CLASS


def test_class_order_is_mapped_and_mismatch_is_one_line(capsys, tmp_path, test_only_data):
    labels = torch.tensor([0, 1, 2])
    assert remap_labels(labels, ["cat", "dog", "ship"], ["ship", "cat", "dog"], "d").tolist() == [1, 2, 0]
    with pytest.raises(DataError, match="not in checkpoint: frog"):
        remap_labels(labels, ["cat", "dog", "frog"], CLASSES, "d")
    other = write_checkpoint(tmp_path / "other.safetensors", classes=["cat", "dog", "frog"])
    assert_one_line_error(*run_cli(capsys, "eval", other, "--data-dir", test_only_data), "do not match", "ship", "frog")


def test_truncated_checkpoint(capsys, tmp_path, test_only_data, checkpoint_file):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(checkpoint_file.read_bytes()[:-500])
    assert_one_line_error(*run_cli(capsys, "eval", bad, "--data-dir", test_only_data), "truncated or corrupt")


def test_corrupt_checkpoint(capsys, tmp_path, test_only_data):
    bad = tmp_path / "noise.safetensors"
    bad.write_bytes(bytes(range(256)) * 8)
    assert_one_line_error(*run_cli(capsys, "eval", bad, "--data-dir", test_only_data), str(bad))


def test_pickle_is_refused(capsys, tmp_path, test_only_data):
    evil = tmp_path / "model.pt"
    torch.save({"fc.weight": torch.zeros(3, 64)}, evil)
    assert_one_line_error(*run_cli(capsys, "eval", evil, "--data-dir", test_only_data), "pickle")
    raw = tmp_path / "model.pkl"
    raw.write_bytes(pickle.dumps({"a": 1}))
    assert_one_line_error(*run_cli(capsys, "eval", raw, "--data-dir", test_only_data), "pickle")


def test_checkpoint_of_another_architecture(capsys, tmp_path, test_only_data):
    # tensors of a resnet14 under metadata that says resnet8
    state, metadata = ckpt.read_checkpoint(write_checkpoint(tmp_path / "r14.safetensors", model_name="resnet14"))
    ckpt.save_checkpoint(tmp_path / "lie.safetensors", state, {**metadata, "model": "resnet8"})
    assert_one_line_error(*run_cli(capsys, "eval", tmp_path / "lie.safetensors", "--data-dir", test_only_data), "unexpected")


def test_checkpoint_with_other_num_classes(capsys, tmp_path, test_only_data, checkpoint_file):
    state, metadata = ckpt.read_checkpoint(checkpoint_file)
    ckpt.save_checkpoint(tmp_path / "c4.safetensors", state, {**metadata, "num_classes": 4})
    assert_one_line_error(*run_cli(capsys, "eval", tmp_path / "c4.safetensors", "--data-dir", test_only_data), "fc.weight")


def test_missing_checkpoint(capsys, tmp_path, test_only_data):
    assert_one_line_error(*run_cli(capsys, "eval", tmp_path / "nope.safetensors", "--data-dir", test_only_data), "nope")


def test_missing_data_dir(capsys, tmp_path, checkpoint_file):
    assert_one_line_error(*run_cli(capsys, "eval", checkpoint_file, "--data-dir", tmp_path / "absent"), "absent")


def test_missing_split(capsys, test_only_data, checkpoint_file):
    code, out, err = run_cli(capsys, "eval", checkpoint_file, "--data-dir", test_only_data, "--split", "val")
    assert_one_line_error(code, out, err, "no train split")


def test_empty_data_dir_is_not_downloaded_into(capsys, tmp_path, checkpoint_file):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(*run_cli(capsys, "eval", checkpoint_file, "--data-dir", tmp_path / "empty"), "no CIFAR data")
    assert not any((tmp_path / "empty").iterdir())


def test_unwritable_confusion_path(capsys, tmp_path, test_only_data, checkpoint_file):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out, err = run_cli(
        capsys, "eval", checkpoint_file, "--data-dir", test_only_data, "--confusion", blocker / "c.png"
    )
    assert_one_line_error(code, out, err, "confusion")


def test_eval_of_a_trained_run_reproduces_its_logged_validation(capsys, tmp_path):
    """The contract with the trainer: the run's metadata is enough to rebuild the same val split
    (here a non-default seed) and the same numbers."""
    from trainkit import tiny_config, write_synthetic_cifar10

    from resnetlab.engine.train import train

    data = write_synthetic_cifar10(tmp_path / "data", n_train=600, n_test=100)
    overrides = {"train.epochs": 1, "data.val_size": 100, "data.split_seed": 5, "data.limit_train": 128}
    result = train(tiny_config(data, tmp_path / "run", **overrides), progress="none")
    code, out, err = run_cli(capsys, "eval", result.run_dir, "--data-dir", data, "--split", "val", "--json", "--device", "cpu")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["n"] == 100
    assert summary["top1_error"] == pytest.approx(result.final_val_error)
    assert summary["loss"] == pytest.approx(result.summary["final"]["val_loss"], rel=1e-6)
    code, out, err = run_cli(capsys, "eval", result.run_dir, "--data-dir", data, "--json")  # default: test split
    assert code == 0, err
    assert json.loads(out)["n"] == 100


def test_final_tta_of_a_run_equals_eval_with_that_tta(capsys, tmp_path):
    """train.final_tta: the summary's TTA numbers are what `resnetlab eval RUN --tta T` prints for the
    final checkpoint (fp32, the flip-shift border as the crops were padded), and the last line shows them."""
    from trainkit import tiny_config, write_synthetic_cifar10

    from resnetlab.cli.train_cmd import result_line
    from resnetlab.engine.train import train

    data = write_synthetic_cifar10(tmp_path / "data", n_train=600, n_test=100)
    overrides = {"train.epochs": 1, "data.val_size": 100, "data.limit_train": 128, "data.padding_mode": "reflect",
                 "train.final_tta": ["flip", "flip-shift"]}
    result = train(tiny_config(data, tmp_path / "run", **overrides), progress="none")
    assert list(result.summary["final_tta"]) == ["flip", "flip-shift"]
    for tta, numbers in result.summary["final_tta"].items():
        code, out, err = run_cli(capsys, "eval", result.run_dir, "--data-dir", data, "--split", "val", "--tta", tta,
                                 "--json", "--device", "cpu")
        assert code == 0, err
        summary = json.loads(out)
        assert numbers["val_top1_error"] == pytest.approx(summary["top1_error"])
        assert numbers["val_loss"] == pytest.approx(summary["loss"], rel=1e-5)
    line = result_line(result)
    assert f"flip-shift TTA {result.summary['final_tta']['flip-shift']['val_top1_error']:.2%}" in line


def test_final_tta_without_validation_split_is_empty(tmp_path):
    from trainkit import tiny_config, write_synthetic_cifar10

    from resnetlab.engine.train import train

    data = write_synthetic_cifar10(tmp_path / "data", n_train=200, n_test=20)
    config = tiny_config(data, tmp_path / "run", **{"train.epochs": 1, "data.val_size": 0, "train.final_tta": ["flip"]})
    assert train(config, progress="none").summary["final_tta"] == {}
