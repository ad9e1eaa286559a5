"""The training data of a run: the splits in memory, the train-only normaliser, the batch loader
and the step budget that follows from them."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from resnetlab.config import RunConfig, RuntimeSection
from resnetlab.data import AugmentSpec, DataSplits, ImageSet, InMemoryLoader, Normalizer, compute_normalizer, load_dataset
from resnetlab.errors import DataError


@dataclass
class TrainData:
    splits: DataSplits
    normalizer: Normalizer
    loader: InMemoryLoader
    steps_per_epoch: int
    total_steps: int

    @property
    def num_epochs(self) -> int:
        """Epochs started, the last possibly partial (a budget in steps need not fill it)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    @property
    def num_classes(self) -> int:
        return self.splits.num_classes

    @property
    def description(self) -> dict:
        splits = self.splits
        return {"source": splits.source, "train_images": len(splits.train),
                "val_images": len(splits.val) if splits.val is not None else 0,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps}


def load_train_data(config: RunConfig, runtime: RuntimeSection) -> TrainData:
    cfg = config.data
    splits = load_dataset(cfg.dir, val_size=cfg.val_size, split_seed=cfg.split_seed,
                          skip_bad_images=cfg.skip_bad_images, download=cfg.download, need=("train", "val"))
    splits.train = _subset(splits.train, cfg.limit_train, cfg.split_seed)
    splits.val = _subset(splits.val, cfg.limit_val, cfg.split_seed)
    if splits.train is None or len(splits.train) == 0:
        raise DataError(f"no training images in {splits.source}")
    normalizer = compute_normalizer(splits.train.images, cfg.normalization)
    loader = InMemoryLoader(
        splits.train.images, splits.train.labels, batch_size=config.train.batch_size, shuffle=True,
        drop_last=config.train.drop_last, seed=config.train.seed, device=runtime.device, normalizer=normalizer,
        augment=augment_spec(config), channels_last=runtime.channels_last is True,
    )  # fmt: skip
    if len(loader) == 0:
        raise DataError(f"{len(splits.train)} training images make no full batch of {config.train.batch_size} (drop_last)")
    steps_per_epoch = len(loader)
    return TrainData(splits, normalizer, loader, steps_per_epoch, total_steps(config, steps_per_epoch))


def augment_spec(config: RunConfig) -> AugmentSpec | None:
    cfg = config.data
    if not (cfg.crop_padding or cfg.flip or cfg.cutout):
        return None
    return AugmentSpec(crop_padding=cfg.crop_padding, padding_mode=cfg.padding_mode, flip=cfg.flip, cutout=cfg.cutout)


def total_steps(config: RunConfig, steps_per_epoch: int) -> int:
    """The step budget: train.epochs, train.steps, or the smaller of the two when both are set."""
    budgets = []
    if config.train.epochs is not None:
        budgets.append(max(1, round(config.train.epochs * steps_per_epoch)))
    if config.train.steps is not None:
        budgets.append(config.train.steps)
    return min(budgets)


def _subset(images: ImageSet | None, limit: int | None, seed: int) -> ImageSet | None:
    """A seeded random subset of `limit` images (kept in their original order)."""
    if images is None or limit is None or limit >= len(images):
        return images
    generator = torch.Generator().manual_seed(seed)
    return images.subset(torch.randperm(len(images), generator=generator)[:limit].sort().values)
