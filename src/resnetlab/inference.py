"""Predict the classes of arbitrary image files with a resnetlab checkpoint.

Images are prepared the way the model saw its data: RGB, resized so that they cover the model's
input size (shorter side first, then a centre crop), as uint8, then normalised with the statistics
stored in the checkpoint's metadata. A model trained with the ImageNet pipeline is fed as its
validation was: shorter side `eval_resize` (256), then the centre `image_size` crop (224).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from resnetlab.data._decode import as_eight_bit
from resnetlab.errors import CheckpointError, DataError


@dataclass(frozen=True)
class Prediction:
    """The `top` most probable classes of one image, most probable first."""

    image: str
    classes: list[str]
    probabilities: list[float]

    def to_dict(self) -> dict:
        return {
            "image": self.image,
            "predictions": [{"class": c, "probability": p} for c, p in zip(self.classes, self.probabilities)],
        }


def input_hw(metadata: dict) -> tuple[int, int]:
    """The model's (height, width) from metadata "input_size" (an int, [H, W] or [C, H, W]), else
    the native size of the model family (32 x 32 CIFAR, 224 x 224 ImageNet)."""
    size = metadata.get("input_size")
    if size is None:
        from resnetlab.models import model_info

        size = model_info(metadata["model"])["input_size"]
    dims = [size] if isinstance(size, int) else list(size)
    if len(dims) == 1:
        dims = dims * 2
    try:
        height, width = (int(d) for d in dims[-2:])
    except (TypeError, ValueError):
        raise CheckpointError(f"checkpoint metadata has an invalid input_size {size!r}") from None
    return height, width


def normalizer_from_metadata(metadata: dict):
    from resnetlab.data import Normalizer

    if "normalization" not in metadata:
        raise CheckpointError("checkpoint metadata has no normalization; it cannot be used on new images")
    return Normalizer.from_dict(metadata["normalization"])


def class_names(metadata: dict) -> list[str]:
    classes = metadata.get("classes")
    if not classes:
        raise CheckpointError("checkpoint metadata has no class names")
    return list(classes)


def read_image(path: str | Path) -> Image.Image:
    """Open an image file fully (decoding errors surface here) as RGB; DataError naming the file."""
    try:
        with Image.open(path) as image:
            return as_eight_bit(image).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        reason = "no such file" if isinstance(error, FileNotFoundError) else str(error).splitlines()[0]
        raise DataError(f"cannot read image {path}: {reason}") from None


def resize_center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale so the image covers height x width (the shorter side, for a square target), then crop
    the centre. An image already of that size is returned unchanged."""
    if image.size == (width, height):
        return image
    scale = max(height / image.height, width / image.width)
    resized_w = max(width, round(image.width * scale))
    resized_h = max(height, round(image.height * scale))
    image = image.resize((resized_w, resized_h), Image.Resampling.BILINEAR)
    left, top = (resized_w - width) // 2, (resized_h - height) // 2
    return image.crop((left, top, left + width, top + height))


def load_images(paths: Sequence[str | Path], height: int, width: int) -> torch.Tensor:
    """Read, resize and stack image files as a uint8 tensor (N, 3, height, width)."""
    arrays = [np.asarray(resize_center_crop(read_image(p), height, width)) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_images_for(metadata: dict, paths: Sequence[str | Path]) -> torch.Tensor:
    """The images as the checkpoint's validation saw them (uint8, N x 3 x H x W)."""
    data = metadata.get("data") or {}
    if data.get("pipeline") == "imagenet":
        from resnetlab.data.imagenet import EvalTransform

        center = EvalTransform("center", int(data["eval_resize"]), int(data["image_size"]))
        return torch.stack([center(str(p)) for p in paths])
    return load_images(paths, *input_hw(metadata))


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    metadata: dict,
    paths: Sequence[str | Path],
    *,
    top: int = 5,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> list[Prediction]:
    """The `top` most probable classes of each image file, with softmax probabilities."""
    classes = class_names(metadata)
    normalizer = normalizer_from_metadata(metadata)
    images = load_images_for(metadata, paths)
    top = max(1, min(top, len(classes)))
    model.to(device).eval()
    results = []
    for start in range(0, len(paths), batch_size):
        batch = normalizer(images[start : start + batch_size].to(device))
        probs, indices = model(batch).float().softmax(dim=1).topk(top, dim=1)
        for i, (p_row, i_row) in enumerate(zip(probs.cpu().tolist(), indices.cpu().tolist())):
            results.append(Prediction(str(paths[start + i]), [classes[j] for j in i_row], p_row))
    return results
