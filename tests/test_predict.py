"""`resnetlab predict`, image preprocessing, and the bundled-model mechanism."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import resnetlab
from evalkit import CLASSES, assert_one_line_error, run_cli, write_checkpoint
from resnetlab.artifacts import checkpoint as ckpt
from resnetlab.data import Normalizer
from resnetlab.inference import input_hw, load_images, resize_center_crop


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    square = folder / "square.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(square)
    wide = folder / "wide photo.jpg"
    Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(wide)
    grey = folder / "grey.bmp"
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), mode="L").save(grey)
    return [square, wide, grey]


def test_predict_json_matches_the_model(capsys, checkpoint_file, images):
    code, out, err = run_cli(
        capsys, "predict", "--checkpoint", checkpoint_file, "--top", "2", "--json", "--device", "cpu", *images
    )
    assert code == 0, err
    results = json.loads(out)
    assert [r["image"] for r in results] == [str(p) for p in images]
    for result in results:
        probabilities = [p["probability"] for p in result["predictions"]]
        assert len(probabilities) == 2 and probabilities == sorted(probabilities, reverse=True)
        assert {p["class"] for p in result["predictions"]} <= set(CLASSES)

    model, metadata = resnetlab.load(checkpoint_file)
    pixels = torch.from_numpy(np.array(Image.open(images[0]))).permute(2, 0, 1)[None]
    with torch.no_grad():
        probs = model(Normalizer.from_dict(metadata["normalization"])(pixels)).softmax(1)[0]
    top = probs.topk(2)
    assert [p["class"] for p in results[0]["predictions"]] == [CLASSES[i] for i in top.indices]
    assert [p["probability"] for p in results[0]["predictions"]] == pytest.approx(top.values.tolist(), rel=1e-5)


def test_predict_text_output_and_top_capped_at_class_count(capsys, checkpoint_file, images):
    code, out, err = run_cli(capsys, "predict", "--checkpoint", checkpoint_file, "--top", "10", images[1])
    assert code == 0, err
    line = out.strip()
    assert line.startswith(f"{images[1]}: ") and all(name in line for name in CLASSES)


def test_default_checkpoint_is_the_bundled_model(capsys, monkeypatch, tmp_path, checkpoint_file, images):
    monkeypatch.setattr(ckpt, "BUNDLED_DIR", tmp_path)
    assert_one_line_error(*run_cli(capsys, "predict", images[0]), "resnet20-cifar10", "not bundled")
    shutil.copy(checkpoint_file, tmp_path / "resnet20-cifar10.safetensors")
    assert ckpt.bundled_names() == ["resnet20-cifar10"]
    code, out, err = run_cli(capsys, "predict", "--json", images[0])
    assert code == 0, err
    assert len(json.loads(out)[0]["predictions"]) == 3


@pytest.mark.parametrize("kind", ["missing", "text", "truncated"])
def test_unreadable_image_names_the_file(capsys, tmp_path, checkpoint_file, images, kind):
    bad = tmp_path / f"bad-{kind}.jpg"
    if kind == "text":
        bad.write_text("not an image")
    elif kind == "truncated":
        bad.write_bytes(images[1].read_bytes()[:300])
    assert_one_line_error(*run_cli(capsys, "predict", "--checkpoint", checkpoint_file, images[0], bad), str(bad))


def test_predict_refuses_a_pickle_checkpoint(capsys, tmp_path, images):
    evil = tmp_path / "model.pth"
    torch.save({"fc.weight": torch.zeros(3, 64)}, evil)
    assert_one_line_error(*run_cli(capsys, "predict", "--checkpoint", evil, images[0]), "pickle")


def test_resize_center_crop_keeps_the_centre():
    # 64 wide x 32 high: left quarter red, centre half green, right quarter blue
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :16, 0] = 255
    pixels[:, 16:48, 1] = 255
    pixels[:, 48:, 2] = 255
    cropped = np.asarray(resize_center_crop(Image.fromarray(pixels), 32, 32))
    assert cropped.shape == (32, 32, 3)
    assert (cropped[:, :, 1] == 255).all() and (cropped[:, :, [0, 2]] == 0).all()
    # shorter side first: a 100 x 50 image is scaled to 64 x 32 before the crop
    big = Image.fromarray(np.repeat(np.repeat(pixels, 2, axis=0), 2, axis=1)[:, 14:114])
    assert resize_center_crop(big, 32, 32).size == (32, 32)
    # non-square target: cover then crop
    assert resize_center_crop(Image.fromarray(pixels), 20, 50).size == (50, 20)


def test_load_images_gives_uint8_batches(images):
    batch = load_images(images, 32, 32)
    assert batch.dtype == torch.uint8 and batch.shape == (3, 3, 32, 32)
    assert torch.equal(batch[0], torch.from_numpy(np.array(Image.open(images[0]))).permute(2, 0, 1))


def test_input_size_forms():
    assert input_hw({"input_size": [3, 32, 32]}) == (32, 32)
    assert input_hw({"input_size": [24, 40]}) == (24, 40)
    assert input_hw({"input_size": 28}) == (28, 28)
    assert input_hw({"model": "resnet50"}) == (224, 224)


@pytest.mark.parametrize("name", ckpt.bundled_names())
def test_every_bundled_model_loads_by_name(name):
    """Each file shipped in resnetlab/weights rebuilds its model and carries what predict needs."""
    model, metadata = resnetlab.load(name)
    assert not model.training
    assert len(metadata["classes"]) == metadata["num_classes"]
    Normalizer.from_dict(metadata["normalization"])
    x = torch.zeros(2, *metadata.get("input_size", [3, 32, 32]))
    with torch.no_grad():
        assert model(x).shape == (2, metadata["num_classes"])
