"""Tiny image folders and checkpoints for the eval/predict tests (a few hundred KB, built in tmp)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from resnetlab.artifacts.checkpoint import save_checkpoint
from resnetlab.data import compute_normalizer
from resnetlab.models import create_model

CLASSES = ["cat", "dog", "ship"]
COLOURS = {"cat": (200, 60, 40), "dog": (60, 180, 60), "ship": (40, 70, 210)}


def write_image_folder(root: Path, split: str, per_class: int, classes=CLASSES, size: int = 32, seed: int = 0) -> Path:
    """<root>/<split>/<class>/NNN.{png,jpg}: class-coloured noise, PNG and JPEG alternating."""
    rng = np.random.default_rng(seed)
    for name in classes:
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array(COLOURS.get(name, (128, 128, 128)), dtype=np.int16)
        for i in range(per_class):
            noise = rng.integers(-50, 50, size=(size, size, 3), dtype=np.int16)
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            suffix = "png" if i % 2 == 0 else "jpg"
            Image.fromarray(pixels).save(folder / f"{i:03d}.{suffix}")
    return root


def tiny_metadata(model_name: str, classes, images: torch.Tensor, **extra) -> dict:
    return {
        "model": model_name,
        "model_options": {},
        "num_classes": len(classes),
        "classes": list(classes),
        "input_size": [3, 32, 32],
        "normalization": compute_normalizer(images, "per_channel").to_dict(),
        "epoch": 1,
        "step": 10,
        "recipe": "test",
        **extra,
    }


def write_checkpoint(path: Path, classes=CLASSES, model_name: str = "resnet8", seed: int = 0, **extra) -> Path:
    """A resnet8 checkpoint with random weights and BN statistics that are not the identity."""
    torch.manual_seed(seed)
    model = create_model(model_name, num_classes=len(classes))
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():  # one train-mode pass so running statistics differ from their init
        model.train()(images.float() / 255 - 0.5)
    save_checkpoint(path, model.state_dict(), tiny_metadata(model_name, classes, images, **extra))
    return path


def run_cli(capsys, *argv):
    """Run `resnetlab ARGV...` in-process: (exit code, stdout, stderr)."""
    from resnetlab.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, *fragments):
    """A user error: non-zero exit, nothing on stdout, one `resnetlab: error:` line holding `fragments`."""
    assert code != 0 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resnetlab: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
