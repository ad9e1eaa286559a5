"""`load_dataset`: find which CIFAR layout a folder holds, read the splits asked for, carve val."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from resnetlab.data import cifar, folder
from resnetlab.data.dataset import SPLITS, DataSplits, ImageSet
from resnetlab.data.split import stratified_split
from resnetlab.errors import DataError


@dataclass(frozen=True)
class Source:
    """A recognised data layout: `splits` are the source's own ("train", and "test" if present)."""

    kind: str  # "cifar10-python" | "cifar10-binary" | "cifar100-python" | "image-folder"
    path: Path
    splits: tuple[str, ...]
    description: str


# (official folder name, kind, files per split, meta file, description)
_CIFAR_LAYOUTS = [
    (cifar.PYTHON10_DIR, "cifar10-python", cifar.PYTHON10_FILES, "batches.meta", "CIFAR-10 python batches"),
    (cifar.BINARY10_DIR, "cifar10-binary", cifar.BINARY10_FILES, "batches.meta.txt", "CIFAR-10 binary batches"),
    (cifar.PYTHON100_DIR, "cifar100-python", cifar.PYTHON100_FILES, "meta", "CIFAR-100 python (fine labels)"),
]


def find_source(root: Path) -> Source | None:
    """The layout at `root`, or at the official folder name inside it; None when nothing matches."""
    for dir_name, kind, files, meta, label in _CIFAR_LAYOUTS:
        for path in (root, root / dir_name):
            splits = tuple(s for s, names in files.items() if (path / names[0]).is_file())
            if splits and (path / meta).is_file():
                return Source(kind, path, splits, f"{label} {path}")
    splits = tuple(s for s in ("train", "test") if (root / s).is_dir())
    if splits:
        return Source("image-folder", root, splits, f"image folder {root}")
    return None


def default_data_root() -> Path:
    """Where data goes when no --data-dir is given: `$RESNETLAB_CACHE/data`."""
    return folder.cache_root() / "data"


def locate_source(data_dir: str | Path | None, download: bool = True) -> Source:
    """The data set at `data_dir` (None: the default root), downloading CIFAR-10 if allowed."""
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_root()
    if data_dir is not None and not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    source = find_source(root) if root.is_dir() else None
    if source is not None:
        return source
    # download only into the default location or an empty folder the user named for it
    empty = not root.exists() or not any(root.iterdir())
    if download and (data_dir is None or empty):
        return find_source(cifar.download_cifar10(root).parent)
    if data_dir is None:
        raise DataError(f"no CIFAR data in {root} and download is off; pass --data-dir DIR")
    raise DataError(
        f"no CIFAR data found in {root}: expected {cifar.PYTHON10_DIR}, {cifar.BINARY10_DIR}, "
        f"{cifar.PYTHON100_DIR} (the folder or its parent) or an image folder {root}/train/<class>/<image>"
    )


def _read(source: Source, splits: tuple[str, ...], skip_bad_images: bool):
    """-> ({split: ImageSet}, skipped files, description)."""
    if source.kind == "cifar10-python":
        return cifar.read_python_batches(source.path, splits), [], source.description
    if source.kind == "cifar100-python":
        return cifar.read_python_batches(source.path, splits, cifar100=True), [], source.description
    if source.kind == "cifar10-binary":
        return cifar.read_binary_batches(source.path, splits), [], source.description
    sets, skipped, formats = {}, [], set()
    for split in splits:
        sets[split], split_skipped, split_formats = folder.read_split(source.path / split, skip_bad_images)
        skipped += split_skipped
        formats |= split_formats
    return sets, skipped, f"{source.description} ({', '.join(sorted(formats))})"


def load_dataset(
    data_dir: str | Path | None = None,
    *,
    val_size: int = 5000,
    split_seed: int = 0,
    skip_bad_images: bool = False,
    download: bool = True,
    need: tuple[str, ...] | list[str] = ("train", "val"),
) -> DataSplits:
    """Read a CIFAR-10/100 data set into memory as train / val (carved from train) / test.

    `need` names the splits to load: "train" or "val" read the source's training images (val is
    always carved out of them first, so train never contains val images unless val_size=0), "test"
    reads its test split. Asking for a split the source lacks is a DataError. With no data_dir the
    data live in $RESNETLAB_CACHE/data and the official archive is downloaded there if absent.
    """
    unknown = set(need) - set(SPLITS)
    if unknown or not need:
        raise DataError(f"need must name some of {', '.join(SPLITS)}, got {tuple(need)}")
    source = locate_source(data_dir, download)
    wanted = tuple(s for s in ("train", "test") if s in need or (s == "train" and "val" in need))
    missing = [s for s in wanted if s not in source.splits]
    if missing:
        raise DataError(f"{source.description} has no {' or '.join(missing)} split")
    sets, skipped, description = _read(source, wanted, skip_bad_images)
    train = val = None
    if "train" in sets:
        train, val = _carve_val(sets["train"], val_size, split_seed)
    test = sets.get("test")
    classes = (train if train is not None else test).classes
    if train is not None and test is not None and test.classes != train.classes:
        raise DataError(f"{source.path}: the test split's classes differ from the training split's")
    return DataSplits(train, val, test, classes, description, skipped)


def _carve_val(full: ImageSet, val_size: int, seed: int) -> tuple[ImageSet, ImageSet | None]:
    if val_size == 0:
        return full, None
    train_index, val_index = stratified_split(full.labels, val_size, seed)
    return full.subset(train_index), full.subset(val_index)
