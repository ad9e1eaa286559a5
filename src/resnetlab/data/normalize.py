"""Input normalisation computed from the training split only (never val or test).

Pixel values are first scaled to [0, 1]; `mean` and `std` are in those units.
- "per_pixel": subtract the mean image (3 x H x W), std 1 -- the paper (He et al. 2015, section 4.2:
  "the per-pixel mean subtracted").
- "per_channel": subtract the channel mean and divide by the channel std -- common practice.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from resnetlab.errors import DataError

MODES = ("per_pixel", "per_channel")
_CHUNK = 4096


@dataclass(frozen=True, eq=False)
class Normalizer:
    """`mean`: float32 3 x H x W (per_pixel) or 3 x 1 x 1; `std`: float32 3 x 1 x 1 (ones for
    per_pixel). Both broadcast to N x 3 x H x W. Calling it maps a uint8 batch to float32."""

    mode: str
    mean: torch.Tensor
    std: torch.Tensor
    _on_device: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise DataError(f"normalisation mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mean.dim() != 3 or self.std.shape != (3, 1, 1) or self.mean.shape[0] != 3:
            raise DataError(f"normaliser mean/std have shapes {tuple(self.mean.shape)}/{tuple(self.std.shape)}")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x H x W (any device) -> float32 (x / 255 - mean) / std on the same device."""
        shift, scale = self._constants(images.device)
        return images.float().sub_(shift).mul_(scale)

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # (x/255 - mean)/std == (x - 255*mean) * 1/(255*std): two in-place ops; cached per device
        key = str(device)
        if key not in self._on_device:
            shift = (self.mean.double() * 255).float()
            scale = (1.0 / (self.std.double() * 255)).float()
            self._on_device[key] = (shift.to(device), scale.to(device))
        return self._on_device[key]

    def to_dict(self) -> dict:
        """JSON-serialisable (nested lists); `from_dict` inverts it exactly (float32 values)."""
        return {"mode": self.mode, "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "Normalizer":
        try:
            mean = torch.tensor(data["mean"], dtype=torch.float32)
            std = torch.tensor(data["std"], dtype=torch.float32)
            return cls(data["mode"], mean, std)
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"invalid normaliser record ({error})") from None


def compute_normalizer(train_images: torch.Tensor, mode: str = "per_pixel") -> Normalizer:
    """Statistics of uint8 N x 3 x H x W training images (float64 sums over chunks, so 50k images
    never need a 1 GB float copy)."""
    if mode not in MODES:
        raise DataError(f"normalisation mode must be one of {', '.join(MODES)}, got {mode!r}")
    if train_images.dtype != torch.uint8 or train_images.dim() != 4 or len(train_images) == 0:
        raise DataError("normalisation needs a non-empty uint8 N x 3 x H x W training set")
    total = torch.zeros(train_images.shape[1:], dtype=torch.float64)
    squares = torch.zeros(train_images.shape[1], dtype=torch.float64)
    for start in range(0, len(train_images), _CHUNK):
        chunk = train_images[start : start + _CHUNK].cpu().double().div_(255)
        total += chunk.sum(0)
        if mode == "per_channel":
            squares += chunk.square().sum((0, 2, 3))
    pixel_mean = total / len(train_images)
    if mode == "per_pixel":
        return Normalizer(mode, pixel_mean.float(), torch.ones(3, 1, 1))
    count = len(train_images) * train_images.shape[2] * train_images.shape[3]
    channel_mean = pixel_mean.mean((1, 2))
    channel_std = (squares / count - channel_mean.square()).clamp_min(1e-12).sqrt()
    return Normalizer(mode, channel_mean.float().view(3, 1, 1), channel_std.float().view(3, 1, 1))
