"""Property-based tests (hypothesis): the config parser only ever raises a one-line ConfigError,
the CIFAR readers only ever raise DataError whatever the bytes, and the augmentation keeps shapes,
values and labels. Example counts are modest so the file runs in seconds."""
from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from resnetlab.config import RunConfig, build_config, validate_config
from resnetlab.data.augment import AugmentSpec, augment_batch
from resnetlab.data.cifar import read_binary_batches, read_python_batches, unpickle_batch
from resnetlab.data.loader import InMemoryLoader
from resnetlab.errors import ConfigError, DataError

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _known_keys(model=RunConfig, prefix="") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _known_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


KNOWN_KEYS = _known_keys()
KEY = st.one_of(st.sampled_from(KNOWN_KEYS), st.sampled_from(KNOWN_KEYS).map(lambda k: k + ".x"),
                st.text(min_size=0, max_size=20))
VALUE = st.one_of(
    st.text(max_size=20),
    st.sampled_from([".nan", ".inf", "-.inf", "null", "~", "true", "[]", "{}", "[1, 2]", "{a: 1}", "1e999", "-1", "0",
                     "&a [*a]", "!!python/object/apply:os.system ['true']", "'", "[", "{", ": :", "1e-3", "0x10"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-10**20, max_value=10**20).map(str),
)
OVERRIDE = st.one_of(st.builds(lambda k, v: f"{k}={v}", KEY, VALUE), st.text(max_size=30))


@SETTINGS
@given(st.lists(OVERRIDE, max_size=5))
def test_any_override_gives_a_config_or_one_line_config_error(overrides):
    try:
        config = build_config("fast-cifar", None, overrides, **{"data.dir": "/data", "out": "/tmp/run"})
    except ConfigError as error:
        assert "\n" not in str(error) and str(error)
    else:
        assert validate_config(config.to_dict()) == config  # whatever is accepted round-trips


JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(st.sampled_from(KNOWN_KEYS + ["model", "optim", "train"]),
                                                      st.text(max_size=8)), inner, max_size=4)),
    max_leaves=12,
)


@SETTINGS
@given(st.dictionaries(st.sampled_from(["model", "data", "optim", "schedule", "bn", "train", "runtime", "out",
                                        "recipe", "extra"]), JSONISH, max_size=4))
def test_any_nested_mapping_gives_a_config_or_one_line_config_error(data):
    try:
        validate_config(data)
    except ConfigError as error:
        assert "\n" not in str(error)


# --- CIFAR readers ----------------------------------------------------------------------------------
CLASSES = [f"class{i}" for i in range(10)]


@pytest.fixture(scope="module")
def python_folder(tmp_path_factory) -> Path:
    """A tiny cifar-10-batches-py (2 images a batch), written the way Python 3 + numpy repickle it."""
    folder = tmp_path_factory.mktemp("py") / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in CLASSES]}, protocol=2))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [1, 7]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def _mutated(original: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    data = bytearray(original)
    for position, value in edits:
        data[position % len(data)] = value
    return bytes(data[:cut] if cut is not None else data)


@SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes_as_a_python_batch_give_data_error(python_folder, payload):
    path = python_folder.parent / "random_batch"
    path.write_bytes(payload)
    with pytest.raises(DataError):
        batch = unpickle_batch(path)
        raise DataError(f"decoded to a {type(batch).__name__}")  # random bytes may rarely be a dict; fine


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
       st.one_of(st.none(), st.integers(0, 7000)), st.sampled_from(["data_batch_3", "batches.meta"]))
def test_damaged_python_batches_load_or_give_data_error(python_folder, edits, cut, name):
    path = python_folder / name
    original = path.read_bytes()
    try:
        path.write_bytes(_mutated(original, edits, cut))
        try:
            splits = read_python_batches(python_folder, ("train",))
        except DataError as error:
            assert "\n" not in str(error)
        else:
            train = splits["train"]
            assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (3, 32, 32)
            assert len(train.images) == len(train.labels)
            assert int(train.labels.min()) >= 0 and int(train.labels.max()) < len(train.classes)
    finally:
        path.write_bytes(original)


@SETTINGS
@given(st.binary(max_size=3 * 3073 + 10), st.binary(max_size=200))
def test_random_bytes_as_binary_batches_load_or_give_data_error(batch_bytes, meta_bytes):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "batches.meta.txt").write_bytes(meta_bytes)
        for name in [f"data_batch_{i}.bin" for i in range(1, 6)]:
            (folder / name).write_bytes(batch_bytes)
        try:
            train = read_binary_batches(folder, ("train",))["train"]
        except DataError as error:
            assert "\n" not in str(error)
        else:
            assert len(batch_bytes) % 3073 == 0 and len(train.labels) == 5 * len(batch_bytes) // 3073
            assert int(train.labels.max()) < len(train.classes)


# --- augmentation -----------------------------------------------------------------------------------
SPEC = st.builds(AugmentSpec, crop_padding=st.integers(0, 5), padding_mode=st.sampled_from(["zeros", "reflect"]),
                 flip=st.booleans(), cutout=st.integers(0, 10))


@SETTINGS
@given(SPEC, st.integers(1, 6), st.integers(1, 3), st.integers(6, 12), st.integers(6, 12), st.integers(0, 2**31))
def test_augmentation_keeps_shape_values_and_each_image_its_own(spec, n, channels, height, width, seed):
    # image i is the constant i + 1: any output value must be i + 1 or a zero (padding or cutout)
    x = (torch.arange(n, dtype=torch.float32) + 1).view(n, 1, 1, 1).expand(n, channels, height, width).contiguous()
    generator = torch.Generator().manual_seed(seed)
    out = augment_batch(x, spec, generator)
    assert out.shape == x.shape and out.dtype == x.dtype
    for i in range(n):
        values = set(out[i].unique().tolist())
        assert values <= {0.0, float(i + 1)}, (i, values)
        if spec.padding_mode == "reflect" and spec.cutout == 0:
            assert values == {float(i + 1)}  # reflect padding only repeats the image's own pixels
    again = augment_batch(x, spec, torch.Generator().manual_seed(seed))
    assert torch.equal(out, again)  # a function of the seed


@SETTINGS
@given(SPEC, st.integers(1, 40), st.integers(1, 16), st.integers(0, 1000), st.integers(0, 3))
def test_loader_batches_keep_labels_with_their_images(spec, n, batch_size, seed, epoch):
    labels = torch.arange(n) % 7
    images = (labels + 1).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous() * 30
    loader = InMemoryLoader(images, labels, batch_size=batch_size, seed=seed, augment=spec, channels_last=False)
    loader.set_epoch(epoch)
    seen = []
    for x, y in loader:
        assert x.shape[1:] == (3, 8, 8) and x.dtype == torch.float32 and len(x) == len(y)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        for image, label in zip(x, y):
            expected = (int(label) + 1) * 30 / 255
            assert all(abs(v) < 1e-6 or abs(v - expected) < 1e-6 for v in image.unique().tolist()), (label, image)
        seen += y.tolist()
    assert sorted(seen) == sorted(labels.tolist())  # every label once per epoch (no drop_last)
