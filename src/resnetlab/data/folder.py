"""Image-folder trees `<root>/<split>/<class>/<image>` (any format PIL reads), decoded once in a
process pool and kept in a fingerprinted cache so later loads take a fraction of a second."""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from resnetlab.data._decode import decode_chunk
from resnetlab.data.dataset import ImageSet
from resnetlab.errors import DataError

log = logging.getLogger(__name__)

CACHE_VERSION = "1"
_POOL_MIN_FILES = 2000  # below this a pool costs more than it saves
_CHUNK = 500


def cache_root() -> Path:
    """`$RESNETLAB_CACHE`, default `~/.cache/resnetlab`."""
    return Path(os.environ.get("RESNETLAB_CACHE") or Path.home() / ".cache" / "resnetlab")


def image_extensions() -> frozenset[str]:
    from PIL import Image

    Image.init()
    return frozenset(ext.lower() for ext in Image.registered_extensions())


@dataclass(frozen=True)
class FolderListing:
    """The files of one split folder, sorted by class then name; `stats` = (size, mtime_ns)."""

    root: Path
    classes: list[str]
    files: list[str]  # relative to root: "<class>/<name>"
    labels: np.ndarray
    stats: list[tuple[int, int]]

    def fingerprint(self) -> str:
        digest = hashlib.sha256(CACHE_VERSION.encode())
        for name, (size, mtime) in zip(self.files, self.stats):
            digest.update(f"{name}\0{size}\0{mtime}\n".encode())
        return digest.hexdigest()


def list_split(split_dir: Path) -> FolderListing:
    """Classes = sorted sub-folder names; images = files with an extension PIL knows."""
    try:
        return _list_split(split_dir, image_extensions())
    except OSError as error:  # unreadable folder or file metadata
        raise DataError(f"cannot list {error.filename or split_dir}: {error.strerror or error}") from None


def _list_split(split_dir: Path, extensions: frozenset[str]) -> FolderListing:
    class_dirs = sorted(
        (e for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name
    )
    if not class_dirs:
        raise DataError(f"{split_dir} has no class folders (expected {split_dir}/<class>/<image>)")
    files, labels, stats = [], [], []
    for label, class_dir in enumerate(class_dirs):
        entries = sorted(
            (e for e in os.scandir(class_dir.path) if _is_image_name(e.name, extensions) and e.is_file()),
            key=lambda e: e.name,
        )
        if not entries:
            raise DataError(f"class folder {class_dir.path} has no images")
        for entry in entries:
            stat = entry.stat()
            files.append(f"{class_dir.name}/{entry.name}")
            stats.append((stat.st_size, stat.st_mtime_ns))
        labels.extend([label] * len(entries))
    classes = [e.name for e in class_dirs]
    return FolderListing(split_dir, classes, files, np.asarray(labels, dtype=np.int64), stats)


def _is_image_name(name: str, extensions: frozenset[str]) -> bool:
    dot = name.rfind(".")
    return not name.startswith(".") and name[dot:].lower() in extensions


# --- decoding -------------------------------------------------------------------------------------
def _worker_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS/Windows
        return max(1, os.cpu_count() or 1)


def _pool(workers: int):
    # fork: workers start at once and need no importable __main__ (spawn re-imports the caller's
    # script in every worker, which hangs for stdin scripts and re-runs unguarded ones). The children
    # only run PIL and numpy -- never torch or CUDA -- so fork's hazard, a lock held by one of the
    # parent's other threads, does not reach them (torch's DataLoader forks for the same reason).
    # Python 3.12+ warns about forking any multi-threaded process; that warning is expected here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*multi-threaded, use of fork.*", category=DeprecationWarning)
        return multiprocessing.get_context("fork").Pool(workers)


def _can_fork() -> bool:
    return sys.platform.startswith("linux")  # elsewhere fork is unsafe or missing: decode in-process


def _first_size(listing: FolderListing) -> tuple[int, int] | None:
    """The size of the first readable image, which every other image must share."""
    for name in listing.files:
        out, _, problems = decode_chunk((str(listing.root), [name], None))
        if out is not None:
            return tuple(out.shape[2:])
    return None


def decode_listing(listing: FolderListing, *, skip_bad_images: bool) -> tuple[ImageSet, list[str], set[str]]:
    """Decode every file (a process pool for large folders, tqdm progress on a terminal)."""
    from tqdm.auto import tqdm

    size = _first_size(listing)
    if size is None:
        raise DataError(f"no readable images in {listing.root} (the first files all fail to decode)")
    tasks = [(str(listing.root), listing.files[i : i + _CHUNK], size) for i in range(0, len(listing.files), _CHUNK)]
    images = np.empty((len(listing.files), 3, *size), dtype=np.uint8)
    keep = np.ones(len(listing.files), dtype=bool)
    skipped, formats = [], set()
    workers = min(_worker_count(), len(tasks)) if len(listing.files) >= _POOL_MIN_FILES and _can_fork() else 1
    with tqdm(total=len(listing.files), desc=f"decoding {listing.root}", unit="img", disable=None) as bar:
        with _pool(workers) if workers > 1 else _NoPool() as pool:
            results = pool.imap(decode_chunk, tasks)
            for start, (task, (array, chunk_formats, problems)) in enumerate(zip(tasks, results)):
                offset = start * _CHUNK
                if array is not None:
                    images[offset : offset + len(array)] = array
                formats |= chunk_formats
                for i, kind, message in problems:
                    path = listing.root / listing.files[offset + i]
                    if kind == "size":
                        raise DataError(
                            f"{path} is {message}, other images are {size[1]}x{size[0]}; all images must share one size"
                        )
                    if not skip_bad_images:
                        raise DataError(f"cannot read image {path} ({message}); pass --skip-bad-images to leave it out")
                    skipped.append(f"{path} ({message})")
                    keep[offset + i] = False
                bar.update(len(task[1]))
    labels = listing.labels
    if not keep.all():
        images, labels = images[keep], labels[keep]
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), listing.classes), skipped, formats


class _NoPool:
    """The in-process stand-in for a Pool on small folders."""

    imap = staticmethod(map)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- cache ----------------------------------------------------------------------------------------
def _cache_path(split_dir: Path) -> Path:
    key = hashlib.sha256(str(split_dir.resolve()).encode()).hexdigest()[:20]
    return cache_root() / "folders" / f"{split_dir.name}-{key}.safetensors"


def _read_cache(path: Path, fingerprint: str):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("fingerprint") != fingerprint:
                return None
            images, labels = handle.get_tensor("images"), handle.get_tensor("labels")
        return images, labels, json.loads(meta["classes"]), json.loads(meta["skipped"]), json.loads(meta["formats"])
    except FileNotFoundError:
        return None
    except Exception as error:  # a truncated or foreign file: rebuild it
        log.warning("ignoring unreadable cache %s (%s)", path, error)
        return None


def _write_cache(path: Path, fingerprint: str, imageset: ImageSet, skipped: list[str], formats: set[str]) -> None:
    from safetensors.torch import save_file

    meta = {
        "fingerprint": fingerprint,
        "classes": json.dumps(imageset.classes),
        "skipped": json.dumps(skipped),
        "formats": json.dumps(sorted(formats)),
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"images": imageset.images, "labels": imageset.labels}, str(tmp), metadata=meta)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one, never half of one
    except OSError as error:
        tmp.unlink(missing_ok=True)
        log.warning("could not write the decoded-image cache %s (%s)", path, error)


def read_split(
    split_dir: Path, skip_bad_images: bool = False, use_cache: bool = True
) -> tuple[ImageSet, list[str], set[str]]:
    """One split folder -> (ImageSet, skipped files, image formats), through the decoded cache."""
    listing = list_split(split_dir)
    fingerprint = listing.fingerprint()
    path = _cache_path(split_dir)
    cached = _read_cache(path, fingerprint) if use_cache else None
    if cached is not None:
        images, labels, classes, skipped, formats = cached
        if skipped and not skip_bad_images:
            raise DataError(f"cannot read image {skipped[0]}; pass --skip-bad-images to leave it out")
        imageset, formats = ImageSet(images, labels, classes), set(formats)
    else:
        imageset, skipped, formats = decode_listing(listing, skip_bad_images=skip_bad_images)
        if use_cache:
            _write_cache(path, fingerprint, imageset, skipped, formats)
    if skipped:
        log.warning("skipped %d unreadable image(s) in %s, first: %s", len(skipped), split_dir, skipped[0])
    return imageset, skipped, formats
