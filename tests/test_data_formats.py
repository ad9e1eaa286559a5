"""Readers of every CIFAR format, on tiny files written exactly as the official ones are; image
folders and their decoded cache; the verified download."""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnetlab.data import folder, load_dataset
from resnetlab.data import cifar as cifar_module
from resnetlab.errors import DataError

@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """A cache per test: these tests count and corrupt cache files and download into it."""
    monkeypatch.setenv("RESNETLAB_CACHE", str(tmp_path / "cache"))


CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --- writers of the official formats --------------------------------------------------------------
class _Py2StylePickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the official batches: bytes as py2 `str` opcodes
    (SHORT_BINSTRING/BINSTRING) and numpy globals under their numpy 1.x module names."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def py2_pickle(obj, path: Path) -> None:
    buffer = io.BytesIO()
    _Py2StylePickler(buffer, protocol=2).dump(obj)
    path.write_bytes(buffer.getvalue())


def make_arrays(n_train: int = 30, n_test: int = 8, seed: int = 0):
    """Random CIFAR-shaped rows (N x 3072 uint8) and labels; each class appears in train."""
    rng = np.random.default_rng(seed)
    train_rows = rng.integers(0, 256, (n_train, 3072), dtype=np.uint8)
    test_rows = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    train_labels = np.arange(n_train) % 10
    rng.shuffle(train_labels)
    test_labels = rng.integers(0, 10, n_test)
    return train_rows, train_labels, test_rows, test_labels


def write_python_cifar10(parent: Path, arrays=None) -> Path:
    train_rows, train_labels, test_rows, test_labels = arrays or make_arrays()
    folder_path = parent / "cifar-10-batches-py"
    folder_path.mkdir(parents=True)
    py2_pickle(
        {b"num_cases_per_batch": len(train_rows) // 5, b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072},
        folder_path / "batches.meta",
    )
    for i, (rows, labels) in enumerate(zip(np.array_split(train_rows, 5), np.array_split(train_labels, 5)), 1):
        batch = {
            b"batch_label": f"training batch {i} of 5".encode(),
            b"labels": [int(v) for v in labels],
            b"data": rows,
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(len(rows))],
        }
        py2_pickle(batch, folder_path / f"data_batch_{i}")
    py2_pickle(
        {b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in test_labels], b"data": test_rows,
         b"filenames": [b"t.png"] * len(test_rows)},
        folder_path / "test_batch",
    )
    return folder_path


def write_binary_cifar10(parent: Path, arrays=None) -> Path:
    train_rows, train_labels, test_rows, test_labels = arrays or make_arrays()
    folder_path = parent / "cifar-10-batches-bin"
    folder_path.mkdir(parents=True)
    (folder_path / "batches.meta.txt").write_text("\n".join(CLASSES) + "\n\n")
    for i, (rows, labels) in enumerate(zip(np.array_split(train_rows, 5), np.array_split(train_labels, 5)), 1):
        records = np.concatenate([labels.astype(np.uint8)[:, None], rows], axis=1)
        (folder_path / f"data_batch_{i}.bin").write_bytes(records.tobytes())
    records = np.concatenate([test_labels.astype(np.uint8)[:, None], test_rows], axis=1)
    (folder_path / "test_batch.bin").write_bytes(records.tobytes())
    return folder_path


def write_python_cifar100(parent: Path, n_train: int = 24, n_test: int = 6) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(1)
    folder_path = parent / "cifar-100-python"
    folder_path.mkdir(parents=True)
    fine_names = [f"fine{i:02d}".encode() for i in range(100)]
    py2_pickle({b"fine_label_names": fine_names, b"coarse_label_names": [b"c"] * 20}, folder_path / "meta")
    fine = rng.integers(0, 100, n_train)
    for name, n, labels in (("train", n_train, fine), ("test", n_test, rng.integers(0, 100, n_test))):
        py2_pickle(
            {b"filenames": [b"x"] * n, b"batch_label": name.encode(), b"fine_labels": [int(v) for v in labels],
             b"coarse_labels": [int(v) // 5 for v in labels], b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)},
            folder_path / name,
        )
    return folder_path, fine


def write_image_folder(root: Path, images: np.ndarray, labels, classes=CLASSES, split="train", ext="png") -> Path:
    """images: N x 3 x H x W uint8, saved losslessly as <root>/<split>/<class>/<i>.<ext>."""
    for i, (image, label) in enumerate(zip(images, labels)):
        class_dir = root / split / classes[int(label)]
        class_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.transpose(1, 2, 0)).save(class_dir / f"{i:04d}.{ext}")
    return root


def as_images(rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rows.reshape(-1, 3, 32, 32))


# --- CIFAR readers --------------------------------------------------------------------------------
def test_python_batches_load_exact_pixels_labels_and_classes(tmp_path):
    arrays = make_arrays()
    write_python_cifar10(tmp_path, arrays)
    splits = load_dataset(tmp_path / "cifar-10-batches-py", val_size=0, need=("train", "test"))
    assert torch.equal(splits.train.images, as_images(arrays[0]))
    assert splits.train.labels.tolist() == arrays[1].tolist()
    assert torch.equal(splits.test.images, as_images(arrays[2]))
    assert splits.test.labels.tolist() == arrays[3].tolist()
    assert splits.classes == CLASSES and splits.val is None
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.is_contiguous()
    assert splits.train.labels.dtype == torch.int64
    assert "python" in splits.source


def test_written_pickles_really_use_the_official_py2_opcodes(tmp_path):
    import pickletools

    folder_path = write_python_cifar10(tmp_path)
    listing = io.StringIO()
    pickletools.dis((folder_path / "data_batch_1").read_bytes(), out=listing)
    text = listing.getvalue()
    assert "GLOBAL     'numpy.core.multiarray _reconstruct'" in text
    assert "SHORT_BINSTRING 'data'" in text and "BINSTRING" in text


def test_binary_and_python_versions_load_to_identical_tensors(tmp_path):
    arrays = make_arrays()
    write_python_cifar10(tmp_path / "py", arrays)
    write_binary_cifar10(tmp_path / "bin", arrays)
    from_python = load_dataset(tmp_path / "py", val_size=10, need=("train", "val", "test"))
    from_binary = load_dataset(tmp_path / "bin", val_size=10, need=("train", "val", "test"))
    for name in ("train", "val", "test"):
        a, b = getattr(from_python, name), getattr(from_binary, name)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert from_binary.classes == CLASSES and "binary" in from_binary.source


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_batches_repickled_by_python3_numpy_also_load(tmp_path, protocol):
    arrays = make_arrays()
    folder_path = write_python_cifar10(tmp_path, arrays)
    batch = pickle.loads((folder_path / "test_batch").read_bytes(), encoding="bytes")
    (folder_path / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
    splits = load_dataset(folder_path, need=("test",))
    assert torch.equal(splits.test.images, as_images(arrays[2]))
    assert splits.train is None and splits.val is None


def test_cifar100_uses_fine_labels_and_names(tmp_path):
    _, fine = write_python_cifar100(tmp_path)
    splits = load_dataset(tmp_path, val_size=0, need=("train", "test"))
    assert splits.num_classes == 100 and splits.classes[7] == "fine07"
    assert splits.train.labels.tolist() == fine.tolist()
    assert len(splits.test) == 6 and "CIFAR-100" in splits.source


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    folder_path = write_python_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    (folder_path / "data_batch_3").write_bytes(pickle.dumps({b"data": _Exploit(marker)}, protocol=2))
    with pytest.raises(DataError, match="data_batch_3.*refusing to load global"):
        load_dataset(folder_path)
    assert not marker.exists()


def test_random_bytes_and_truncated_files_give_data_errors(tmp_path):
    folder_path = write_python_cifar10(tmp_path)
    rng = np.random.default_rng(0)
    for attempt in range(20):
        (folder_path / "data_batch_2").write_bytes(rng.bytes(int(rng.integers(1, 5000))))
        with pytest.raises(DataError, match="data_batch_2"):
            load_dataset(folder_path)
    good = (folder_path / "data_batch_1").read_bytes()
    (folder_path / "data_batch_2").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="data_batch_2"):
        load_dataset(folder_path)


def test_label_count_mismatch_and_bad_rows_are_named(tmp_path):
    folder_path = write_python_cifar10(tmp_path)
    rows = np.zeros((4, 3072), np.uint8)
    py2_pickle({b"labels": [1, 2, 3], b"data": rows}, folder_path / "data_batch_4")
    with pytest.raises(DataError, match=r"data_batch_4: 3 labels for 4 images"):
        load_dataset(folder_path)
    py2_pickle({b"labels": [1, 2], b"data": np.zeros((2, 100), np.uint8)}, folder_path / "data_batch_4")
    with pytest.raises(DataError, match="N x 3072"):
        load_dataset(folder_path)
    py2_pickle({b"labels": [1, 12], b"data": np.zeros((2, 3072), np.uint8)}, folder_path / "data_batch_4")
    with pytest.raises(DataError, match=r"labels must lie in 0\.\.9"):
        load_dataset(folder_path)


def test_binary_truncated_record_is_an_error(tmp_path):
    folder_path = write_binary_cifar10(tmp_path)
    path = folder_path / "data_batch_5.bin"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match="data_batch_5.bin.*3073-byte records"):
        load_dataset(folder_path)


def test_missing_split_and_missing_batch_are_errors(tmp_path):
    folder_path = write_python_cifar10(tmp_path)
    (folder_path / "data_batch_5").unlink()
    with pytest.raises(DataError, match="missing data_batch_5"):
        load_dataset(folder_path)
    (folder_path / "test_batch").unlink()
    splits_dir = write_image_folder(tmp_path / "folder", np.zeros((2, 3, 8, 8), np.uint8), [0, 1])
    with pytest.raises(DataError, match="no test split"):
        load_dataset(splits_dir, need=("test",))


# --- image folders and the decoded cache ----------------------------------------------------------
def _folder_fixture(tmp_path, n=30, size=32, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    labels = np.arange(n) % 10
    root = write_image_folder(tmp_path / "imgs", images, labels)
    return root, images, labels


def _expected_order(images, labels):
    """Folder order: classes sorted by name, files sorted by name within a class."""
    order = sorted(range(len(labels)), key=lambda i: (CLASSES[labels[i]], f"{i:04d}"))
    return torch.from_numpy(images[order]), [int(labels[i]) for i in order]


def test_image_folder_loads_lossless_files_exactly(tmp_path):
    root, images, labels = _folder_fixture(tmp_path)
    splits = load_dataset(root, val_size=0)
    expected_images, expected_labels = _expected_order(images, labels)
    assert torch.equal(splits.train.images, expected_images)
    assert splits.train.labels.tolist() == expected_labels
    assert splits.classes == sorted(CLASSES) and splits.source == f"image folder {root} (PNG)"


def test_image_folder_pool_path_matches_in_process_decode(tmp_path, monkeypatch):
    root, images, labels = _folder_fixture(tmp_path, n=40)
    monkeypatch.setattr(folder, "_POOL_MIN_FILES", 1)
    monkeypatch.setattr(folder, "_CHUNK", 7)
    splits = load_dataset(root, val_size=0)
    assert torch.equal(splits.train.images, _expected_order(images, labels)[0])


def test_grayscale_and_rgba_images_become_rgb(tmp_path):
    class_dir = tmp_path / "train" / "a"
    class_dir.mkdir(parents=True)
    Image.new("L", (8, 8), 77).save(class_dir / "g.png")
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(class_dir / "r.png")
    (class_dir / "notes.txt").write_text("ignored: not an image extension")
    (class_dir / ".hidden.png").write_bytes(b"ignored")
    images = load_dataset(tmp_path, val_size=0).train.images
    assert images.shape == (2, 3, 8, 8)
    assert images[0, :, 0, 0].tolist() == [77, 77, 77] and images[1, :, 0, 0].tolist() == [1, 2, 3]


def test_test_only_folder_serves_need_test(tmp_path):
    rng = np.random.default_rng(0)
    write_image_folder(tmp_path, rng.integers(0, 256, (6, 3, 16, 16), dtype=np.uint8), [0, 1, 2, 0, 1, 2], split="test")
    splits = load_dataset(tmp_path, need=("test",))
    assert len(splits.test) == 6 and splits.train is None and splits.classes == CLASSES[:3]
    with pytest.raises(DataError, match="no train split"):
        load_dataset(tmp_path)


def test_cache_is_used_on_the_second_load(tmp_path, monkeypatch):
    root, _, _ = _folder_fixture(tmp_path)
    first = load_dataset(root, val_size=0)
    cache_files = list((folder.cache_root() / "folders").glob("train-*.safetensors"))
    assert cache_files and not list((folder.cache_root() / "folders").glob("*.tmp"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(folder, "decode_listing", no_decoding)
    second = load_dataset(root, val_size=0)
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.train.labels, second.train.labels)


def test_changed_added_or_removed_files_invalidate_the_cache(tmp_path):
    root, images, labels = _folder_fixture(tmp_path)
    load_dataset(root, val_size=0)
    target = root / "train" / CLASSES[labels[0]] / "0000.png"
    Image.fromarray(np.full((32, 32, 3), 9, np.uint8)).save(target)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on coarse clocks
    reloaded = load_dataset(root, val_size=0).train
    position = reloaded.labels.tolist().index(int(labels[0]))  # 0000 sorts first within its class
    assert (reloaded.images[position] == 9).all()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "train" / "airplane" / "extra.png")
    assert len(load_dataset(root, val_size=0).train) == len(images) + 1
    (root / "train" / "airplane" / "extra.png").unlink()
    assert len(load_dataset(root, val_size=0).train) == len(images)


def test_a_corrupt_cache_file_is_rebuilt(tmp_path, caplog):
    root, images, labels = _folder_fixture(tmp_path)
    load_dataset(root, val_size=0)
    (cache_file,) = (folder.cache_root() / "folders").glob("train-*.safetensors")
    cache_file.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        splits = load_dataset(root, val_size=0)
    assert torch.equal(splits.train.images, _expected_order(images, labels)[0])
    assert "ignoring unreadable cache" in caplog.text
    assert cache_file.stat().st_size > 1000


def test_skip_bad_images_skips_warns_and_counts(tmp_path, caplog):
    root, images, _ = _folder_fixture(tmp_path)
    bad = root / "train" / "cat" / "0003.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=f"cannot read image {bad}.*--skip-bad-images"):
        load_dataset(root)
    with caplog.at_level(logging.WARNING):
        splits = load_dataset(root, val_size=0, skip_bad_images=True)
    assert len(splits.train) == len(images) - 1
    assert len(splits.skipped) == 1 and str(bad) in splits.skipped[0]
    assert "skipped 1 unreadable image(s)" in caplog.text
    # the cache remembers the bad file: without the flag it is still an error
    with pytest.raises(DataError, match="0003.png"):
        load_dataset(root)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "train" / "empty").mkdir(parents=True)
    with pytest.raises(DataError, match="class folder .*empty has no images"):
        load_dataset(tmp_path)
    (tmp_path / "train" / "empty").rmdir()
    with pytest.raises(DataError, match="has no class folders"):
        load_dataset(tmp_path)


def test_mixed_image_sizes_name_the_odd_file(tmp_path):
    root, _, _ = _folder_fixture(tmp_path, n=12)
    odd = root / "train" / "dog" / "0005.png"
    Image.new("RGB", (24, 20)).save(odd)
    with pytest.raises(DataError, match=f"{odd} is 24x20, other images are 32x32"):
        load_dataset(root, skip_bad_images=True, val_size=0)


def test_unrecognised_folder_is_an_error_not_a_download(tmp_path):
    (tmp_path / "something.txt").write_text("x")
    with pytest.raises(DataError, match="no CIFAR data found"):
        load_dataset(tmp_path)


# --- download -------------------------------------------------------------------------------------
def _tarball(tmp_path: Path, members: dict[str, bytes]) -> Path:
    archive = tmp_path / "archive.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def _serve(monkeypatch, archive: Path, md5: str | None = None) -> None:
    monkeypatch.setattr(cifar_module, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(cifar_module, "CIFAR10_MD5", md5 or hashlib.md5(archive.read_bytes()).hexdigest())


def test_download_verifies_md5_and_extracts_into_the_cache(tmp_path, monkeypatch):
    source = write_python_cifar10(tmp_path / "src")
    members = {f"cifar-10-batches-py/{p.name}": p.read_bytes() for p in source.iterdir()}
    _serve(monkeypatch, _tarball(tmp_path, members))
    splits = load_dataset(None, need=("train", "val", "test"), val_size=10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (20, 10, 8)
    assert (folder.cache_root() / "data" / "cifar-10-batches-py" / "test_batch").is_file()
    assert not list((folder.cache_root() / "data").glob("*.part"))
    load_dataset(None, val_size=0)  # found now: no second download needed
    monkeypatch.setattr(cifar_module, "CIFAR10_URL", "http://127.0.0.1:9/never-used")
    assert len(load_dataset(None, val_size=0).train) == 30


def test_download_with_wrong_md5_extracts_nothing(tmp_path, monkeypatch):
    archive = _tarball(tmp_path, {"cifar-10-batches-py/batches.meta": b"x"})
    _serve(monkeypatch, archive, md5="0" * 32)
    target = tmp_path / "empty_target"  # an empty folder the user named: downloaded into
    target.mkdir()
    with pytest.raises(DataError, match="expected 0000"):
        load_dataset(target)
    assert not any(target.iterdir())


@pytest.mark.parametrize("member", ["../escape.txt", "/abs.txt", "cifar-10-batches-py/../../escape.txt", "other/x"])
def test_download_refuses_path_traversal(tmp_path, monkeypatch, member):
    _serve(monkeypatch, _tarball(tmp_path, {member: b"evil"}))
    target = tmp_path / "deep" / "target"
    target.mkdir(parents=True)
    with pytest.raises(DataError, match="unsafe archive member"):
        load_dataset(target)
    assert not (tmp_path / "deep" / "escape.txt").exists() and not (tmp_path / "escape.txt").exists()
    assert not Path("/abs.txt").exists()


def test_offline_download_says_to_pass_data_dir(monkeypatch):
    monkeypatch.setattr(cifar_module, "CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset(None)
    with pytest.raises(DataError, match="download is off; pass --data-dir"):
        load_dataset(None, download=False)


def test_unreadable_class_folder_is_a_data_error(tmp_path, monkeypatch):
    root, _, _ = _folder_fixture(tmp_path, n=10)
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("cat"):  # what a folder without read permission does (root ignores chmod)
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(folder.os, "scandir", scandir)
    with pytest.raises(DataError, match=r"cannot list .*cat: Permission denied"):
        load_dataset(root, val_size=0)
