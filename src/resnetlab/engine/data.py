"""The training data of a run: the splits in memory, the train-only normaliser, the batch loader
and the step budget that follows from them."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from resnetlab.config import RunConfig, RuntimeSection
from resnetlab.data import AugmentSpec, DataSplits, ImageSet, InMemoryLoader, Normalizer, compute_normalizer, load_dataset
from resnetlab.engine.distributed import SINGLE, DistInfo
from resnetlab.errors import ConfigError, DataError


@dataclass
class TrainData:
    splits: DataSplits
    normalizer: Normalizer
    loader: InMemoryLoader
    steps_per_epoch: int
    total_steps: int
    pipeline: dict = field(default_factory=dict)  # what checkpoints record of a non-default pipeline

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


def load_train_data(config: RunConfig, runtime: RuntimeSection, dist: DistInfo = SINGLE) -> TrainData:
    """The data of one process: with several (`dist`), the loader yields this rank's share of each
    global batch (its micro-batches, when accumulating)."""
    if config.data.pipeline == "imagenet":
        return _load_streamed(config, runtime, dist)
    cfg = config.data
    splits = load_dataset(cfg.dir, val_size=cfg.val_size, split_seed=cfg.split_seed,
                          skip_bad_images=cfg.skip_bad_images, download=cfg.download, need=("train", "val"))
    splits.train = _subset(splits.train, cfg.limit_train, cfg.split_seed)
    splits.val = _subset(splits.val, cfg.limit_val, cfg.split_seed)
    if splits.train is None or len(splits.train) == 0:
        raise DataError(f"no training images in {splits.source}")
    normalizer = compute_normalizer(splits.train.images, cfg.normalization)
    loader = InMemoryLoader(
        splits.train.images, splits.train.labels, batch_size=micro_batch_size(config, dist.world_size), shuffle=True,
        drop_last=config.train.drop_last, seed=config.train.seed, device=runtime.device, normalizer=normalizer,
        augment=augment_spec(config), channels_last=runtime.channels_last is True,
        rank=dist.rank, world_size=dist.world_size,
    )  # fmt: skip
    steps_per_epoch = steps_in_epoch(len(loader), config.train.accum_steps, config.train.drop_last)
    if steps_per_epoch == 0:
        raise DataError(f"{len(splits.train)} training images make no full batch of {config.train.batch_size} (drop_last)")
    return TrainData(splits, normalizer, loader, steps_per_epoch, total_steps(config, steps_per_epoch))


def _load_streamed(config: RunConfig, runtime: RuntimeSection, dist: DistInfo) -> TrainData:
    """The ImageNet pipeline: image files listed, not read; decoded per batch in worker processes."""
    from resnetlab.data.imagenet import (EvalTransform, StreamingLoader, TrainTransform, folder_normalizer,
                                         open_image_folder)

    cfg = config.data
    if cfg.dir is None:
        raise ConfigError("invalid value for 'data.dir': the imagenet pipeline needs an image folder "
                          "DIR/train/<class>/<image>")
    splits = open_image_folder(cfg.dir, val_size=cfg.val_size, split_seed=cfg.split_seed, crop=cfg.image_size)
    splits.train = _subset(splits.train, cfg.limit_train, cfg.split_seed)
    splits.val = _subset(splits.val, cfg.limit_val, cfg.split_seed)
    if len(splits.train) == 0:
        raise DataError(f"no training images in {splits.source}")
    workers = data_workers(config)
    center = EvalTransform("center", cfg.eval_resize, cfg.image_size)
    normalizer = folder_normalizer(splits.train, cfg.normalization, center, seed=cfg.split_seed, workers=workers)
    loader = StreamingLoader(
        splits.train, TrainTransform(tuple(cfg.scale_range), cfg.image_size, cfg.flip, cfg.color_pca),
        batch_size=micro_batch_size(config, dist.world_size), normalizer=normalizer, shuffle=True,
        drop_last=config.train.drop_last, seed=config.train.seed, device=runtime.device, workers=workers,
        channels_last=runtime.channels_last is True, rank=dist.rank, world_size=dist.world_size,
    )  # fmt: skip
    steps_per_epoch = steps_in_epoch(len(loader), config.train.accum_steps, config.train.drop_last)
    if steps_per_epoch == 0:
        raise DataError(f"{len(splits.train)} training images make no full batch of {config.train.batch_size} "
                        "(drop_last)")
    pipeline = {"pipeline": "imagenet", "image_size": cfg.image_size, "eval_resize": cfg.eval_resize}
    return TrainData(splits, normalizer, loader, steps_per_epoch, total_steps(config, steps_per_epoch), pipeline)


def data_workers(config: RunConfig) -> int:
    """data.workers, or min(8, the CPU cores this process may use)."""
    if config.data.workers is not None:
        return config.data.workers
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def evaluate_val(data: TrainData, model: torch.nn.Module, config: RunConfig, device, precision: str):
    """The validation EvalResult (top-1 and top-5) of `model`, or None without a val split."""
    val = data.splits.val
    if val is None:
        return None
    common = dict(device=device, tta=config.train.eval_tta, precision=precision, num_classes=data.num_classes,
                  topk=(1, 5))
    if data.pipeline.get("pipeline") == "imagenet":
        from resnetlab.evaluate_stream import evaluate_stream, stream_batches

        cfg = config.data
        batches = stream_batches(val, config.train.eval_tta, resize=cfg.eval_resize, crop=cfg.image_size,
                                 batch_size=config.train.eval_batch_size, workers=data_workers(config),
                                 pin=torch.device(device).type == "cuda")
        return evaluate_stream(model, batches, data.normalizer, **common)
    from resnetlab.evaluate import evaluate

    return evaluate(model, val.images, val.labels, data.normalizer, batch_size=config.train.eval_batch_size,
                    shift_padding=config.data.padding_mode, **common)


def micro_batch_size(config: RunConfig, world_size: int) -> int:
    """What one process computes at once: the global train.batch_size split over the processes and
    the accumulation steps."""
    batch, accum = config.train.batch_size, config.train.accum_steps
    if batch % (world_size * accum):
        raise ConfigError(f"invalid value for 'train.batch_size': the global batch {batch} does not split into "
                          f"{world_size} processes x {accum} accumulation steps "
                          f"(make it a multiple of {world_size * accum})")
    return batch // (world_size * accum)


def steps_in_epoch(micro_batches: int, accum_steps: int, drop_last: bool) -> int:
    """Optimizer steps in an epoch of `micro_batches` (as engine.loop.step_batches groups them)."""
    return micro_batches // accum_steps if drop_last else math.ceil(micro_batches / accum_steps)


def augment_spec(config: RunConfig) -> AugmentSpec | None:
    cfg = config.data
    if not (cfg.crop_padding or cfg.flip or cfg.cutout):
        return None
    return AugmentSpec(crop_padding=cfg.crop_padding, padding_mode=cfg.padding_mode, flip=cfg.flip, cutout=cfg.cutout,
                       flip_mode=cfg.flip_mode)


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
