"""In-memory batch loader (airbench's approach): the uint8 data set sits on the training device and
each batch is indexed, normalised and augmented there in a few tensor ops -- no worker processes."""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from resnetlab.data.augment import AugmentSpec, augment_batch
from resnetlab.data.normalize import Normalizer
from resnetlab.errors import ConfigError


def _epoch_seed(*parts: int) -> int:
    """Mix (seed, epoch, ...) into one 63-bit seed; nearby inputs give unrelated streams."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class InMemoryLoader:
    """Yields (x, y) per batch: x float32/bf16 N x 3 x H x W on `device` (channels_last memory
    format if asked), y int64. Order is a function of (seed, epoch) only; call `set_epoch` each
    epoch. With world_size > 1 every rank takes a disjoint, equally long slice of the epoch's
    permutation (the last len % world_size samples of that permutation are left out that epoch)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        normalizer: Normalizer | None = None,
        augment: AugmentSpec | None = None,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ConfigError("InMemoryLoader needs uint8 N x C x H x W images and N labels")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}/{world_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device)  # once, up front
        self.labels = labels.to(self.device, dtype=torch.int64)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.epoch = seed, 0
        self.normalizer, self.augment = normalizer, augment
        self.dtype, self.channels_last = dtype, channels_last
        self.rank, self.world_size = rank, world_size
        self.flip_phase = None
        if augment is not None and augment.flip and augment.flip_mode == "alternate":
            # drawn once per image from the seed alone: the same on every rank and every epoch
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, 0x666C6970))
            self.flip_phase = torch.randint(0, 2, (len(images),), generator=generator, dtype=torch.bool).to(self.device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def samples_per_rank(self) -> int:
        return len(self.images) // self.world_size if self.world_size > 1 else len(self.images)

    def __len__(self) -> int:
        count = self.samples_per_rank / self.batch_size
        return math.floor(count) if self.drop_last else math.ceil(count)

    def epoch_indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in order (CPU, int64)."""
        total = len(self.images)
        if self.shuffle:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            order = torch.randperm(total, generator=generator)
        else:
            order = torch.arange(total)
        if self.world_size > 1:
            order = order[: self.samples_per_rank * self.world_size][self.rank :: self.world_size]
        return order

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.epoch_indices().to(self.device)
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch, self.rank, 1))
        for batch in range(len(self)):
            index = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield self._prepare(self.images[index], generator, self.flip_mask(index)), self.labels[index]

    def flip_mask(self, index: torch.Tensor) -> torch.Tensor | None:
        """Alternating flips: image i is mirrored in this epoch iff its phase differs from the epoch's
        parity. None with random flips (the augmentation draws them)."""
        if self.flip_phase is None:
            return None
        return self.flip_phase[index] ^ bool(self.epoch % 2)

    def _prepare(self, images: torch.Tensor, generator: torch.Generator, flip_mask: torch.Tensor | None) -> torch.Tensor:
        # normalise first, then pad: zero padding then equals the mean, as in the paper
        x = self.normalizer(images) if self.normalizer is not None else images.float().div_(255)
        if self.augment is not None:
            x = augment_batch(x, self.augment, generator, flip_mask)
        x = x.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
