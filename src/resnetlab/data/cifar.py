"""Readers for the official CIFAR distributions (python pickles, binary records, CIFAR-100) and a
verified, traversal-safe download of the CIFAR-10 python archive."""
from __future__ import annotations

import codecs
import hashlib
import os
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from resnetlab.data.dataset import ImageSet
from resnetlab.errors import DataError

try:  # numpy >= 2 moved the pickle helpers to numpy._core
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # published on the CIFAR page

PYTHON10_DIR = "cifar-10-batches-py"
BINARY10_DIR = "cifar-10-batches-bin"
PYTHON100_DIR = "cifar-100-python"

IMAGE_BYTES = 3 * 32 * 32  # one row: 1024 red, 1024 green, 1024 blue values, each plane row-major
PYTHON10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
BINARY10_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
PYTHON100_FILES = {"train": ["train"], "test": ["test"]}


# --- python pickles -------------------------------------------------------------------------------
# pickle.load runs whatever callables the stream names, so a batch file from the internet could
# execute code. The CIFAR batches only need numpy's array reconstruction (and _codecs.encode, which
# Python 3 uses for bytes in protocol-2 pickles); everything else is refused.
class _NdarrayToken:
    """Stands in for numpy.ndarray so that the stream can name the class but never call it."""


def _reconstruct(subtype, shape, dtype):
    if subtype is not _NdarrayToken:
        raise pickle.UnpicklingError("array reconstruction of a type other than numpy.ndarray")
    return _multiarray._reconstruct(np.ndarray, shape, dtype)


def _frombuffer(buffer, dtype, shape, order):
    if not isinstance(buffer, (bytes, bytearray, pickle.PickleBuffer)) or not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError("array from a non-bytes buffer")
    return _numeric._frombuffer(buffer, dtype, shape, order)


def _encode(text, encoding="latin1"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode other than a string to latin1 bytes")
    return codecs.encode(text, encoding)


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,  # protocol 5 (re-pickled by numpy >= 1.16)
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _NdarrayToken,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _encode,
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def unpickle_batch(path: Path) -> dict[str, object]:
    """Load one CIFAR python batch/meta file with the restricted unpickler; keys become str."""
    try:
        with open(path, "rb") as handle:
            obj = _CifarUnpickler(handle, encoding="bytes").load()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from None
    except Exception as error:  # random bytes raise almost anything; none of it may escape
        raise DataError(f"{path} is not a valid CIFAR batch file ({type(error).__name__}: {error})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a valid CIFAR batch file (holds a {type(obj).__name__}, not a dict)")
    return {key.decode("latin1") if isinstance(key, bytes) else str(key): value for key, value in obj.items()}


def _field(batch: dict[str, object], key: str, path: Path) -> object:
    if key not in batch:
        raise DataError(f"{path} has no {key!r} entry (found: {', '.join(sorted(batch)) or 'nothing'})")
    return batch[key]


def _rows_and_labels(data: object, labels: object, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: 'data' must be a uint8 array of N x {IMAGE_BYTES}, got {type(data).__name__} {shape}")
    try:
        label_array = np.asarray(labels)
    except Exception:
        label_array = np.asarray([])
    if label_array.ndim != 1 or not np.issubdtype(label_array.dtype, np.integer):
        raise DataError(f"{path}: labels must be a list of integers")
    if len(label_array) != len(data):
        raise DataError(f"{path}: {len(label_array)} labels for {len(data)} images (the counts must match)")
    return data, label_array.astype(np.int64)


def _names(meta: dict[str, object], key: str, path: Path) -> list[str]:
    names = _field(meta, key, path)
    if not isinstance(names, list) or not names or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{path}: {key!r} must be a non-empty list of names")
    return [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]


def _to_imageset(rows: list[np.ndarray], labels: list[np.ndarray], classes: list[str], where: Path) -> ImageSet:
    data = np.concatenate(rows) if len(rows) > 1 else rows[0]
    targets = np.concatenate(labels) if len(labels) > 1 else labels[0]
    if targets.size and (targets.min() < 0 or targets.max() >= len(classes)):
        raise DataError(f"{where}: labels must lie in 0..{len(classes) - 1} ({len(classes)} classes)")
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32))
    return ImageSet(images, torch.from_numpy(targets), classes)


def _require(folder: Path, names: list[str]) -> list[Path]:
    paths = [folder / name for name in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{folder} is missing {', '.join(missing)}")
    return paths


def read_python_batches(folder: Path, splits: tuple[str, ...], *, cifar100: bool = False) -> dict[str, ImageSet]:
    """CIFAR-10 `cifar-10-batches-py` or CIFAR-100 `cifar-100-python` (fine labels)."""
    files, meta_name = (PYTHON100_FILES, "meta") if cifar100 else (PYTHON10_FILES, "batches.meta")
    label_key, names_key = ("fine_labels", "fine_label_names") if cifar100 else ("labels", "label_names")
    meta_path = _require(folder, [meta_name])[0]
    classes = _names(unpickle_batch(meta_path), names_key, meta_path)
    result = {}
    for split in splits:
        rows, labels = [], []
        for path in _require(folder, files[split]):
            batch = unpickle_batch(path)
            data, targets = _rows_and_labels(_field(batch, "data", path), _field(batch, label_key, path), path)
            rows.append(data)
            labels.append(targets)
        result[split] = _to_imageset(rows, labels, classes, folder)
    return result


def read_binary_batches(folder: Path, splits: tuple[str, ...]) -> dict[str, ImageSet]:
    """CIFAR-10 `cifar-10-batches-bin`: records of 1 label byte + 3072 pixel bytes."""
    meta_path = _require(folder, ["batches.meta.txt"])[0]
    try:
        classes = [line.strip() for line in meta_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read class names from {meta_path}: {error}") from None
    if not classes:
        raise DataError(f"{meta_path} lists no class names")
    record = 1 + IMAGE_BYTES
    result = {}
    for split in splits:
        rows, labels = [], []
        for path in _require(folder, BINARY10_FILES[split]):
            try:
                raw = np.fromfile(path, dtype=np.uint8)
            except OSError as error:
                raise DataError(f"cannot read {path}: {error.strerror or error}") from None
            if raw.size == 0 or raw.size % record:
                raise DataError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte records (truncated?)")
            raw = raw.reshape(-1, record)
            rows.append(raw[:, 1:])
            labels.append(raw[:, 0].astype(np.int64))
        result[split] = _to_imageset(rows, labels, classes, folder)
    return result


# --- download -------------------------------------------------------------------------------------
def download_cifar10(root: Path) -> Path:
    """Fetch the official python archive into `root`, check its MD5, extract it safely and return
    the `cifar-10-batches-py` folder. Offline: DataError telling the user to pass --data-dir."""
    from tqdm.auto import tqdm

    root.mkdir(parents=True, exist_ok=True)
    partial = root / "cifar-10-python.tar.gz.part"
    try:
        response = urllib.request.urlopen(CIFAR10_URL, timeout=30)
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise DataError(
            f"no CIFAR data found and downloading {CIFAR10_URL} failed ({reason}); "
            "pass --data-dir DIR (cifar-10-batches-py, cifar-10-batches-bin, cifar-100-python or an image folder)"
        ) from None
    digest = hashlib.md5()
    total = int(response.headers.get("Content-Length") or 0) or None
    try:
        with response, open(partial, "wb") as out, tqdm(
            total=total, unit="B", unit_scale=True, desc="CIFAR-10", disable=None
        ) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise DataError(f"download of {CIFAR10_URL} interrupted ({error}); try again or pass --data-dir") from None
    if digest.hexdigest() != CIFAR10_MD5:
        partial.unlink(missing_ok=True)
        raise DataError(f"downloaded archive has MD5 {digest.hexdigest()}, expected {CIFAR10_MD5}; not extracted")
    try:
        extract_safely(partial, root, top=PYTHON10_DIR)
    finally:
        partial.unlink(missing_ok=True)
    return root / PYTHON10_DIR


def extract_safely(archive: Path, root: Path, *, top: str) -> None:
    """Extract a tar archive whose members must be plain files/folders under `top/`; anything else
    (absolute paths, '..', links, devices) is refused before a single byte is written."""
    staging = root / f".{top}.extracting"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                parts = Path(member.name).parts
                if (
                    member.name.startswith(("/", "\\"))
                    or os.path.isabs(member.name)
                    or ".." in parts
                    or not parts
                    or parts[0] != top
                    or not (member.isfile() or member.isdir())
                ):
                    raise DataError(f"{archive.name}: refusing unsafe archive member {member.name!r}")
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(staging, members=members, **kwargs)
    except (tarfile.TarError, EOFError, OSError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"cannot extract {archive.name}: {error}") from None
    except DataError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    target = root / top
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging / top, target)
    shutil.rmtree(staging, ignore_errors=True)
