"""The one in-memory form every reader produces: uint8 N x 3 x H x W images, int64 labels, class names."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from resnetlab.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass
class ImageSet:
    """Images (uint8, N x 3 x H x W, contiguous), labels (int64, N) and the class names they index."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise DataError(f"images must be uint8 N x 3 x H x W, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"{self.labels.numel()} labels for {self.images.shape[0]} images (labels must be int64, one per image)"
            )
        self.images = self.images.contiguous()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: torch.Tensor) -> "ImageSet":
        """A copy holding only `indices` (in that order)."""
        return ImageSet(self.images[indices], self.labels[indices], self.classes)

    def class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, counts))


@dataclass
class DataSplits:
    """What `load_dataset` returns. `val` is carved from the source's training images; `test` is the
    source's own test split. A split that was not requested (`need`) or does not exist is None
    (`train` is None only when `need` asks for neither "train" nor "val")."""

    train: ImageSet | None
    val: ImageSet | None
    test: ImageSet | None
    classes: list[str]
    source: str
    skipped: list[str] = field(default_factory=list)  # unreadable files left out (skip_bad_images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def present(self) -> dict[str, ImageSet]:
        """The splits that exist, in train/val/test order."""
        found = {name: getattr(self, name) for name in SPLITS}
        return {name: split for name, split in found.items() if split is not None}
