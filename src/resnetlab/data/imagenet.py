"""The ImageNet pipeline: image folders too large for memory, decoded and transformed per image in
DataLoader worker processes, as the paper trains (He et al. 2015, section 3.4):

- training: the shorter side resized to a random length in [256, 480] ("scale augmentation"), a
  random 224 x 224 crop, a random horizontal flip, and the AlexNet PCA colour augmentation
  (Krizhevsky et al. 2012, section 4.1);
- validation: shorter side 256, the centre 224 x 224 crop;
- test-time: 10 crops (4 corners + centre, and their mirrors), or fully-convolutional multi-scale
  testing (shorter side in {224, 256, 384, 480, 640}, the whole image).

Workers return uint8 crops (a quarter of float32's bytes through shared and pinned memory); the
loader normalises them and adds the colour noise on the training device, so one batch costs a few
tensor ops there. Randomness is a function of (seed, epoch, image index) only: the same run draws the
same crops whatever the number of workers, and a resumed run draws what an uninterrupted one did.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from resnetlab.data.folder import list_split
from resnetlab.data.loader import _epoch_seed
from resnetlab.data.normalize import Normalizer, compute_normalizer
from resnetlab.data.split import stratified_split
from resnetlab.errors import ConfigError, DataError

# The eigen-decomposition of the covariance of ImageNet's RGB pixels (values in [0, 1]) used for the
# PCA colour augmentation; the numbers the Torch ResNet reproduction (fb.resnet.torch) publishes.
# Columns of PCA_EIGVEC are the eigenvectors.
PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = torch.tensor([
    [-0.5675, 0.7192, 0.4009],
    [-0.5808, -0.0045, -0.8140],
    [-0.5836, -0.6948, 0.4203],
])  # fmt: skip
MULTISCALE_SIDES = (224, 256, 384, 480, 640)  # paper, section 3.4
STATS_IMAGES = 1000  # training images (a seeded sample) the normalisation statistics are computed from


# --- image-level transforms (run in the workers: numpy and PIL) ------------------------------------
def read_rgb(path: str | Path, min_side: int | None = None):
    """Open an image as 8-bit RGB. `min_side`: let the JPEG decoder downscale by 1/2, 1/4 or 1/8
    while the shorter side stays >= min_side (decoding a large JPEG at 1/4 is several times faster)."""
    from PIL import Image

    from resnetlab.data._decode import as_eight_bit

    try:
        with Image.open(path) as image:
            if min_side is not None and image.format == "JPEG":
                scale = min_side / min(image.size)
                image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
            return as_eight_bit(image).convert("RGB")
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"cannot read image {path}: {reason}") from None


def resize_shorter(image, side: int):
    """Resize (antialiased bilinear) so that the shorter side is `side`, keeping the aspect ratio."""
    from PIL import Image

    short = min(image.size)
    if short == side:
        return image
    size = (max(side, round(image.width * side / short)), max(side, round(image.height * side / short)))
    return image.resize(size, Image.Resampling.BILINEAR)


def to_chw(image) -> np.ndarray:
    """A PIL RGB image as uint8 3 x H x W."""
    return np.frombuffer(image.tobytes(), np.uint8).reshape(image.height, image.width, 3).transpose(2, 0, 1)


def crop_offsets(height: int, width: int, size: int) -> list[tuple[int, int]]:
    """(top, left) of the 10-crop windows' first five: top-left, top-right, bottom-left,
    bottom-right, centre. The other five are their mirror images."""
    bottom, right = height - size, width - size
    return [(0, 0), (0, right), (bottom, 0), (bottom, right), (bottom // 2, right // 2)]


def ten_crop(x: torch.Tensor | np.ndarray, size: int) -> torch.Tensor:
    """(..., C, H, W) -> (..., 10, C, size, size): the four corners and the centre, then the same
    five crops mirrored left-right (the paper's 10-crop testing, after Krizhevsky et al. 2012)."""
    x = torch.as_tensor(x)
    height, width = x.shape[-2:]
    if height < size or width < size:
        raise DataError(f"a {size} x {size} crop does not fit a {width} x {height} image")
    crops = [x[..., t : t + size, l : l + size] for t, l in crop_offsets(height, width, size)]
    crops += [c.flip(-1) for c in crops]
    return torch.stack(crops, dim=-4)


@dataclass(frozen=True)
class TrainTransform:
    """Scale augmentation + random crop + flip; draws the 3 PCA colour coefficients (alpha, normal
    with std `color_pca`) that the loader applies after normalisation."""

    scale_range: tuple[int, int] = (256, 480)
    crop: int = 224
    flip: bool = True
    color_pca: float = 0.1

    def __call__(self, path: str, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        side = int(rng.integers(self.scale_range[0], self.scale_range[1] + 1))
        image = resize_shorter(read_rgb(path, side), side)
        top = int(rng.integers(0, image.height - self.crop + 1))
        left = int(rng.integers(0, image.width - self.crop + 1))
        pixels = to_chw(image.crop((left, top, left + self.crop, top + self.crop)))
        if self.flip and rng.random() < 0.5:
            pixels = pixels[:, :, ::-1]
        alpha = rng.normal(0.0, self.color_pca, 3) if self.color_pca > 0 else np.zeros(3)
        return torch.from_numpy(pixels.copy()), torch.from_numpy(alpha.astype(np.float32))


@dataclass(frozen=True)
class EvalTransform:
    """Shorter side `resize`, then: "center" the centre crop (3 x crop x crop); "10crop" the ten
    crops (10 x 3 x crop x crop); "multiscale" the whole image at each side in `scales` (a list)."""

    mode: str = "center"
    resize: int = 256
    crop: int = 224
    scales: tuple[int, ...] = MULTISCALE_SIDES

    def __call__(self, path: str, rng=None):
        if self.mode == "multiscale":
            image = read_rgb(path, max(self.scales))  # a draft below the largest side would be upscaled
            return [torch.from_numpy(to_chw(resize_shorter(image, side)).copy()) for side in self.scales]
        pixels = torch.from_numpy(to_chw(resize_shorter(read_rgb(path, self.resize), self.resize)).copy())
        if self.mode == "10crop":
            return ten_crop(pixels, self.crop)
        top, left = crop_offsets(pixels.shape[1], pixels.shape[2], self.crop)[4]
        return pixels[:, top : top + self.crop, left : left + self.crop].contiguous()


# --- the data set -----------------------------------------------------------------------------------
@dataclass
class FolderSplit:
    """Some files of an image folder: paths relative to `root`, their labels, the class names.
    `image_shape` is the shape the model is fed (3 x crop x crop), not the files' sizes."""

    root: Path
    files: list[str]
    labels: torch.Tensor
    classes: list[str]
    image_shape: tuple[int, int, int] = (3, 224, 224)

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices: torch.Tensor) -> "FolderSplit":
        index = indices.tolist()
        return FolderSplit(self.root, [self.files[i] for i in index], self.labels[indices], self.classes,
                           self.image_shape)


@dataclass
class FolderSplits:
    """What `open_image_folder` returns: the ImageNet-pipeline counterpart of DataSplits."""

    train: FolderSplit | None
    val: FolderSplit | None
    test: FolderSplit | None
    classes: list[str]
    source: str
    skipped: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def open_image_folder(
    root: str | Path, *, val_size: int = 5000, split_seed: int = 0, crop: int = 224,
    need: Sequence[str] = ("train", "val"),
) -> FolderSplits:
    """List `root/train/<class>/*` (and `root/val`, `root/test` when present) without decoding.
    val is `root/val` when it exists, else `val_size` images carved from train (class-stratified,
    seeded: the same split as the in-memory pipeline's)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    has = {name: (root / name).is_dir() for name in ("train", "val", "test")}
    wanted = set(need) - ({"val"} if not has["val"] else set()) | ({"train"} if "val" in need else set())
    missing = [name for name in sorted(wanted) if not has[name]]
    if missing:
        raise DataError(f"{root} has no {missing[0]} split ({root}/{missing[0]}/<class>/<image>)")
    listings = {name: _listing(root / name, (3, crop, crop)) for name in wanted}
    train, val, test = listings.get("train"), listings.get("val"), listings.get("test")
    if train is not None and not has["val"]:
        if val_size > 0:  # carved whenever train is read, so train never holds the val images
            train_index, val_index = stratified_split(train.labels, val_size, split_seed)
            train, val = train.subset(train_index), train.subset(val_index)
        elif "train" not in need:
            raise DataError(f"{root} has no val folder and val_size is 0: no validation split")
    present = [s for s in (train, val, test) if s is not None]
    classes = present[0].classes
    for split in present[1:]:
        if split.classes != classes:
            raise DataError(f"{split.root}: its class folders differ from {present[0].root}'s")
    return FolderSplits(train, val, test, classes, f"image folder {root} (streamed)", [])


def _listing(split_dir: Path, shape: tuple[int, int, int]) -> FolderSplit:
    listing = list_split(split_dir)
    return FolderSplit(split_dir, listing.files, torch.from_numpy(listing.labels), listing.classes, shape)


class FolderDataset(torch.utils.data.Dataset):
    """`dataset[i]` or `dataset[(i, epoch)]` -> (transform output..., label). A random transform
    gets a generator seeded by (seed, epoch, i), so its draws do not depend on the worker."""

    def __init__(self, split: FolderSplit, transform, seed: int = 0):
        self.split, self.transform, self.seed = split, transform, seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, index])
        out = self.transform(str(self.split.root / self.split.files[index]), rng)
        label = int(self.split.labels[index])
        return (*out, label) if isinstance(out, tuple) else (out, label)


class _EpochBatches(torch.utils.data.Sampler):
    """Batches of (index, epoch) keys: the order is a function of (seed, epoch); with world_size > 1
    each rank takes a disjoint, equally long slice (as InMemoryLoader does)."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int, rank: int, world_size: int):
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def __len__(self) -> int:
        count = (self.n // self.world_size) / self.batch_size
        return math.floor(count) if self.drop_last else math.ceil(count)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch)))
        else:
            order = torch.arange(self.n)
        per_rank = self.n // self.world_size
        order = order[: per_rank * self.world_size][self.rank :: self.world_size].tolist()
        for b in range(len(self)):
            yield [(i, self.epoch) for i in order[b * self.batch_size : (b + 1) * self.batch_size]]


def _collate_lists(batch):
    """Multi-scale views differ in size from image to image: keep them as lists."""
    return [views for views, _ in batch], torch.tensor([label for _, label in batch])


def data_loader(dataset, batch_sampler=None, *, batch_size: int = 1, workers: int = 0, pin: bool = False,
                persistent: bool = False, collate_fn=None) -> torch.utils.data.DataLoader:
    """A DataLoader whose workers fork (they only run PIL and numpy, never CUDA)."""
    options = dict(num_workers=workers, pin_memory=pin, collate_fn=collate_fn)
    if workers > 0:
        options.update(persistent_workers=persistent, prefetch_factor=4)
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **options)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, **options)


def worker_batches(loader: torch.utils.data.DataLoader):
    """Iterate a DataLoader; a DataError raised in a worker comes back as its own one line (the
    DataLoader re-raises it with the worker's traceback folded into the message)."""
    try:
        yield from loader
    except DataError as error:
        line = str(error).strip().splitlines()[-1]
        raise DataError(line.split("DataError: ", 1)[-1]) from None


# --- the training loader ----------------------------------------------------------------------------
def lighting_offsets(alphas: torch.Tensor) -> torch.Tensor:
    """N x 3 PCA coefficients -> the N x 3 RGB offsets (in [0, 1] pixel units) that AlexNet adds to
    every pixel: eigvec @ (alpha * eigval) (Krizhevsky et al. 2012, section 4.1)."""
    return (alphas * PCA_EIGVAL.to(alphas.device)) @ PCA_EIGVEC.to(alphas.device).T


class StreamingLoader:
    """Yields (x, y) per batch like InMemoryLoader -- x float N x 3 x crop x crop, normalised, with the
    colour noise added, on `device` -- but decodes every image in DataLoader workers. Call
    `set_epoch` each epoch; workers persist across epochs."""

    def __init__(
        self,
        split: FolderSplit,
        transform: TrainTransform,
        *,
        batch_size: int,
        normalizer: Normalizer,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        workers: int = 0,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}/{world_size}")
        self.device = torch.device(device)
        self.normalizer, self.color_pca = normalizer, transform.color_pca > 0
        self.dtype, self.channels_last = dtype, channels_last
        self.batches = _EpochBatches(len(split), batch_size, shuffle, drop_last, seed, rank, world_size)
        self.dataset = FolderDataset(split, transform, seed)
        self.loader = data_loader(self.dataset, self.batches, workers=workers, pin=self.device.type == "cuda",
                                  persistent=True)

    def set_epoch(self, epoch: int) -> None:
        self.batches.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, alphas, labels in worker_batches(self.loader):
            x = self.normalizer(images.to(self.device, non_blocking=True))
            if self.color_pca:
                offsets = lighting_offsets(alphas.to(self.device)) / self.normalizer.std.to(self.device).view(1, 3)
                x += offsets[:, :, None, None]
            x = x.to(self.dtype)
            x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
            yield x, labels.to(self.device, non_blocking=True)


# --- normalisation ----------------------------------------------------------------------------------
def folder_normalizer(split: FolderSplit, mode: str, transform: EvalTransform, *, seed: int = 0,
                      workers: int = 0, limit: int = STATS_IMAGES) -> Normalizer:
    """Train-only statistics from the centre crops of a seeded sample of `limit` training images:
    the mean image (per_pixel, the paper) or channel mean and std (per_channel)."""
    if len(split) > limit:
        order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
        split = split.subset(order[:limit].sort().values)
    loader = data_loader(FolderDataset(split, transform), batch_size=64, workers=workers)
    images = torch.cat([x for x, _ in worker_batches(loader)])
    return compute_normalizer(images, mode)


def normalize_any_size(normalizer: Normalizer, images: torch.Tensor) -> torch.Tensor:
    """Normalise uint8 images of any size: a per-pixel mean image is resized (bilinear) to the input
    first, as the whole-image (fully-convolutional) testing needs."""
    mean = normalizer.mean
    if mean.shape[-2:] in ((1, 1), images.shape[-2:]):
        return normalizer(images)
    mean = F.interpolate(mean[None].to(images.device), size=images.shape[-2:], mode="bilinear", align_corners=False)
    return (images.float() / 255 - mean) / normalizer.std.to(images.device)
