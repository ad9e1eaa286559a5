"""The ImageNet pipeline on a tiny generated image folder (images of assorted sizes, 32-pixel crops):
scale augmentation, PCA colour noise, 10-crop and multi-scale testing, training through `train`."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evalkit import assert_one_line_error, run_cli, write_checkpoint
from evalkit import write_image_folder as write_square_folder
from resnetlab.config import build_config
from resnetlab.data import Normalizer
from resnetlab.data.imagenet import (PCA_EIGVAL, PCA_EIGVEC, EvalTransform, FolderDataset, StreamingLoader,
                                     TrainTransform, lighting_offsets, normalize_any_size, open_image_folder,
                                     read_rgb, resize_shorter, ten_crop, to_chw)
from resnetlab.engine.train import train
from resnetlab.errors import ConfigError, DataError
from resnetlab.evaluate_stream import crop_scores, evaluate_stream, multiscale_scores, stream_batches
from resnetlab.models import create_model

CLASSES = ("ant", "bee", "cat")
SCALES = dict(scale_range=(40, 64), crop=32)


def write_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """root/<split>/<class>/NN.{png,jpg}: class-coloured noise, every image its own size (44-79 px a side)."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                height, width = rng.integers(44, 80, 2)
                pixels = np.clip(rng.normal(50 + 75 * c, 25, (height, width, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:02d}.{'png' if i % 2 else 'jpg'}")
    return root


def gradient_png(path: Path, width: int = 70, height: int = 50) -> Path:
    """An image whose every pixel differs from its neighbours, so a wrong window cannot match."""
    x = np.arange(width)[None, :, None] * 3 + np.arange(height)[:, None, None] * 5 + np.array([0, 40, 80])
    Image.fromarray((x % 256).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("images"), {"train": 6, "val": 2})


# --- transforms ---------------------------------------------------------------------------------------
def test_train_crop_is_a_window_of_the_image_rescaled_to_a_random_shorter_side(tmp_path):
    path = str(gradient_png(tmp_path / "g.png"))
    transform = TrainTransform(**SCALES, flip=False, color_pca=0.0)
    for seed in range(5):
        pixels, alpha = transform(path, np.random.default_rng(seed))
        replay = np.random.default_rng(seed)
        side = int(replay.integers(40, 65))
        resized = resize_shorter(read_rgb(path), side)
        top, left = int(replay.integers(0, resized.height - 31)), int(replay.integers(0, resized.width - 31))
        assert min(resized.size) == side and resized.size[0] == round(70 * side / 50)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32)
        assert torch.equal(pixels, torch.from_numpy(to_chw(resized)[:, top : top + 32, left : left + 32].copy()))
        assert torch.equal(alpha, torch.zeros(3))


def test_train_flip_mirrors_half_the_crops(tmp_path):
    path = str(gradient_png(tmp_path / "g.png"))
    plain, flipping = TrainTransform(**SCALES, flip=False), TrainTransform(**SCALES, flip=True)
    mirrored = 0
    for seed in range(40):
        a, _ = plain(path, np.random.default_rng(seed))
        b, _ = flipping(path, np.random.default_rng(seed))
        assert torch.equal(a, b) or torch.equal(a.flip(-1), b)
        mirrored += not torch.equal(a, b)
    assert 8 <= mirrored <= 32


def test_eval_transforms_centre_ten_crops_and_scales(tmp_path):
    path = str(gradient_png(tmp_path / "g.png"))
    resized = torch.from_numpy(to_chw(resize_shorter(read_rgb(path), 40)).copy())  # 40 x 56
    centre = EvalTransform("center", resize=40, crop=32)(path)
    assert torch.equal(centre, resized[:, 4:36, 12:44])
    crops = EvalTransform("10crop", resize=40, crop=32)(path)
    assert crops.shape == (10, 3, 32, 32) and torch.equal(crops[4], centre) and torch.equal(crops[9], centre.flip(-1))
    views = EvalTransform("multiscale", scales=(32, 40, 48))(path)
    assert [tuple(v.shape) for v in views] == [(3, 32, 45), (3, 40, 56), (3, 48, 67)]


def test_ten_crop_takes_the_corners_the_centre_and_their_mirrors():
    x = torch.arange(2 * 3 * 6 * 9).view(2, 3, 6, 9)
    crops = ten_crop(x, 4)
    assert crops.shape == (2, 10, 3, 4, 4)
    windows = [x[..., 0:4, 0:4], x[..., 0:4, 5:9], x[..., 2:6, 0:4], x[..., 2:6, 5:9], x[..., 1:5, 2:6]]
    for i, window in enumerate(windows):
        assert torch.equal(crops[:, i], window)
        assert torch.equal(crops[:, i + 5], window.flip(-1))
    with pytest.raises(DataError, match="does not fit"):
        ten_crop(x, 7)


# --- colour augmentation and the loader -----------------------------------------------------------------
def test_pca_lighting_noise_has_zero_mean_and_the_eigen_covariance():
    alphas = torch.from_numpy(np.random.default_rng(0).normal(0, 0.1, (40000, 3)).astype(np.float32))
    offsets = lighting_offsets(alphas).double()
    expected = PCA_EIGVEC.double() @ torch.diag((0.1 * PCA_EIGVAL.double()) ** 2) @ PCA_EIGVEC.double().T
    std = expected.diagonal().sqrt()
    assert (offsets.mean(0).abs() < 4 * std / 200).all()  # 4 standard errors of the mean
    assert torch.allclose(offsets.T.cov(), expected, rtol=0.05, atol=1e-6)


def _loader(folder: Path, **options) -> StreamingLoader:
    split = open_image_folder(folder, val_size=0, crop=32, need=("train",)).train
    normalizer = Normalizer("per_channel", torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25))
    kwargs = dict(batch_size=5, normalizer=normalizer, seed=3, channels_last=False)
    transform = TrainTransform(**SCALES, color_pca=options.pop("color_pca", 0.1))
    return StreamingLoader(split, transform, **{**kwargs, **options})


def test_loader_batches_depend_on_seed_and_epoch_not_on_worker_processes(folder):
    in_process, workers = _loader(folder, workers=0), _loader(folder, workers=2)
    first = list(in_process)
    assert len(first) == len(in_process) == 4 and first[0][0].shape == (5, 3, 32, 32) and first[-1][0].shape[0] == 3
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in first)
    for (x0, y0), (x1, y1) in zip(first, workers, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    in_process.set_epoch(1)
    assert not torch.equal(next(iter(in_process))[0], first[0][0])


def test_colour_noise_shifts_each_channel_of_an_image_by_one_constant(folder):
    (x_lit, y_lit), = [next(iter(_loader(folder)))]
    x, y = next(iter(_loader(folder, color_pca=0.0)))  # same seed: the same crops
    assert torch.equal(y, y_lit)
    shift = x_lit - x
    per_channel = shift.mean(dim=(2, 3))
    assert torch.allclose(shift, per_channel[:, :, None, None].expand_as(shift), atol=1e-5)
    assert per_channel.abs().max() > 1e-3  # the noise is there (std 0.1 * eigval / 0.25 per channel)


def test_normalize_any_size_resizes_a_mean_image():
    mean = torch.rand(3, 4, 4)
    normalizer = Normalizer("per_pixel", mean, torch.ones(3, 1, 1))
    small = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)
    assert torch.allclose(normalize_any_size(normalizer, small), normalizer(small))
    flat = Normalizer("per_pixel", torch.full((3, 4, 4), 0.25), torch.ones(3, 1, 1))
    large = torch.randint(0, 256, (1, 3, 8, 12), dtype=torch.uint8)
    assert torch.allclose(normalize_any_size(flat, large), large.float() / 255 - 0.25, atol=1e-6)


def test_bad_image_in_a_worker_is_one_line_naming_it(tmp_path):
    root = write_folder(tmp_path, {"train": 2})
    (root / "train" / "bee" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError) as caught:
        list(_loader(root, workers=1))
    message = str(caught.value)
    assert "broken.jpg" in message and "\n" not in message and message.startswith("cannot read image")


def test_val_is_carved_from_train_when_there_is_no_val_folder(tmp_path):
    root = write_folder(tmp_path, {"train": 4})
    splits = open_image_folder(root, val_size=3, split_seed=1, crop=32)
    assert len(splits.train) == 9 and len(splits.val) == 3 and splits.classes == list(CLASSES)
    assert sorted(splits.val.labels.tolist()) == [0, 1, 2]  # stratified: one per class
    assert not set(splits.val.files) & set(splits.train.files)
    assert open_image_folder(root, val_size=3, split_seed=1, crop=32, need=("val",)).val.files == splits.val.files


# --- test-time augmentation -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resnet18", num_classes=3).eval()


def test_ten_crop_score_is_the_mean_of_the_crop_softmaxes(model):
    crops = torch.randn(2, 10, 3, 32, 32)
    with torch.no_grad():
        expected = torch.stack([model(crops[:, i]).softmax(dim=1) for i in range(10)]).mean(0)
        scores = crop_scores(model, crops)
    assert scores.shape == (2, 3) and torch.allclose(scores, expected, atol=1e-6)
    assert torch.allclose(scores.sum(1), torch.ones(2))


def test_multiscale_score_averages_scales_and_mirrors(model):
    normalizer = Normalizer("per_channel", torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25))
    views = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((32, 45), (48, 67))]
    with torch.no_grad():
        probs = [model(normalizer(v[None]).flip(3) if mirror else normalizer(v[None])).softmax(1)[0]
                 for v in views for mirror in (False, True)]
        scores = multiscale_scores(model, views, normalizer)
    assert scores.shape == (3,) and torch.allclose(scores, torch.stack(probs).mean(0), atol=1e-6)


def test_ten_crop_evaluation_averages_softmaxes_over_the_val_folder(folder, model):
    val = open_image_folder(folder, crop=32, need=("val",)).val
    normalizer = Normalizer("per_channel", torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25))
    batches = list(stream_batches(val, "10crop", resize=40, crop=32, batch_size=40))  # 40 crops: 4 images
    assert [tuple(v.shape) for v, _ in batches] == [(4, 10, 3, 32, 32), (2, 10, 3, 32, 32)]
    result = evaluate_stream(model, batches, normalizer, tta="10crop", num_classes=3, topk=(1, 2))
    dataset = FolderDataset(val, EvalTransform("10crop", resize=40, crop=32))
    with torch.no_grad():
        scores = torch.cat([crop_scores(model, normalizer(dataset[i][0]).unsqueeze(0)) for i in range(len(val))])
    nll = -scores[torch.arange(6), val.labels].log().mean().item()
    assert result.n == 6 and result.loss == pytest.approx(nll, rel=1e-5)
    assert result.top1_error == pytest.approx((scores.argmax(1) != val.labels).double().mean().item())
    assert result.confusion.sum() == 6


# --- training and the CLI ---------------------------------------------------------------------------------
def tiny_imagenet_config(folder: Path, out: Path, **data) -> dict:
    return {
        "model": {"name": "resnet18"},
        "data": {"dir": str(folder), "pipeline": "imagenet", "image_size": 32, "scale_range": [40, 64],
                 "eval_resize": 40, "download": False, "workers": 2, **data},
        "optim": {"lr": 0.02},
        "schedule": {"kind": "multistep", "milestones": [1], "unit": "epochs"},
        "train": {"steps": 4, "epochs": None, "batch_size": 6, "log_every_steps": 2},
        "runtime": {"device": "cpu", "precision": "fp32", "threads": 1},
        "out": str(out),
    }


def test_resnet18_trains_through_the_imagenet_pipeline_and_evaluates_with_10crop(folder, tmp_path, capsys):
    result = train(tiny_imagenet_config(folder, tmp_path / "run"), progress="none")
    assert result.summary["steps"] == 4 and result.summary["data"]["train_images"] == 18
    assert result.summary["data"]["val_images"] == 6 and np.isfinite(result.final_val_loss)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train_loss"]) for r in rows)
    from resnetlab.artifacts.checkpoint import read_checkpoint

    _, metadata = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert metadata["data"]["pipeline"] == "imagenet" and metadata["input_size"] == [3, 32, 32]
    assert torch.tensor(metadata["normalization"]["mean"]).shape == (3, 32, 32)  # per-pixel mean (the default)

    code, out, _ = run_cli(capsys, "eval", tmp_path / "run", "--data-dir", folder, "--json", "--workers", "0")
    assert code == 0 and json.loads(out.splitlines()[0])["loss"] == pytest.approx(result.final_val_loss, rel=1e-5)
    for tta in ("10crop", "multiscale"):
        code, out, _ = run_cli(capsys, "eval", tmp_path / "run", "--data-dir", folder, "--tta", tta,
                               "--scales", "32,48", "--json", "--workers", "1")
        summary = json.loads(out.splitlines()[0])
        assert code == 0 and summary["n"] == 6 and np.isfinite(summary["loss"])
    assert (tmp_path / "run" / "confusion-val-10crop.png").is_file()

    # predict prepares a new image as validation did (shorter side eval_resize, centre crop): its
    # probabilities on the val files give the validation loss
    from resnetlab.artifacts.checkpoint import load
    from resnetlab.inference import predict

    val_files = sorted((folder / "val").glob("*/*"))
    model, _ = load(tmp_path / "run")
    predictions = predict(model, metadata, val_files, top=len(CLASSES))
    nll = [-math.log(dict(zip(p.classes, p.probabilities))[Path(p.image).parent.name]) for p in predictions]
    assert sum(nll) / len(nll) == pytest.approx(result.final_val_loss, rel=1e-4)


def test_10crop_on_an_in_memory_checkpoint_is_one_line(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "ckpt.safetensors")
    data = write_square_folder(tmp_path / "data", "test", per_class=2)
    code, out, err = run_cli(capsys, "eval", checkpoint, "--data-dir", data, "--tta", "10crop")
    assert_one_line_error(code, out, err, "--tta 10crop", "imagenet pipeline")


def test_config_keys_and_the_paper_recipe():
    with pytest.raises(ConfigError, match="'data'.*scale_range"):
        build_config(overrides=["data.pipeline=imagenet", "data.image_size=300"])
    with pytest.raises(ConfigError, match="data.pipline"):
        build_config(overrides=["data.pipline=imagenet"])
    paper = build_config("he2016-imagenet")
    data, train_, optim = paper.data, paper.train, paper.optim
    assert (data.pipeline, data.scale_range, data.image_size, data.color_pca) == ("imagenet", (256, 480), 224, 0.1)
    assert (train_.batch_size, train_.epochs, optim.lr, optim.weight_decay) == (256, 90, 0.1, 1e-4)
    assert (paper.schedule.milestones, paper.schedule.unit, paper.schedule.gamma) == ([30, 60], "epochs", 0.1)
    assert paper.model.name == "resnet50"


def test_imagenet_pipeline_needs_a_data_dir(tmp_path):
    config = tiny_imagenet_config(tmp_path, tmp_path / "run")
    config["data"]["dir"] = None
    with pytest.raises(ConfigError, match="data.dir"):
        train(config, progress="none")
    assert not (tmp_path / "run").exists()


def test_a_run_resumed_inside_an_epoch_matches_the_uninterrupted_run(folder, tmp_path):
    import os
    import signal

    from resnetlab.artifacts.checkpoint import read_tensors
    from resnetlab.engine.train import TrainingInterrupted, resume

    def config(name: str) -> dict:
        cfg = tiny_imagenet_config(folder, tmp_path / name, workers=0)
        cfg["model"]["options"] = {"width": 0.25}
        return cfg

    whole = train(config("whole"), progress="none")

    def stop_at_two(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = config("stopped")
    stopped["train"]["checkpoint_every_steps"] = 1
    with pytest.raises(TrainingInterrupted):
        train(stopped, progress="none", on_step=stop_at_two)
    resumed = resume(tmp_path / "stopped", progress="none")
    assert resumed.summary["final"] == whole.summary["final"]
    a, _ = read_tensors(tmp_path / "whole" / "checkpoints" / "last.safetensors")
    b, _ = read_tensors(tmp_path / "stopped" / "checkpoints" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
