"""The shared CIFAR-10 JPEG copy (../shared/data/cifar10-jpeg): 50,000 training images, the
default 45,000/5,000 split with 500 validation images per class. Decodes 50k JPEGs once per
session (the cache dir is per session); timings live in benchmarks/bench_data.py."""
from __future__ import annotations

import pytest
import torch

from resnetlab.data import load_dataset
from resnetlab.errors import DataError

pytestmark = pytest.mark.shared_data


def test_shared_jpeg_copy_loads_with_the_default_split(cifar_jpeg_dir):
    splits = load_dataset(cifar_jpeg_dir)
    assert splits.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert len(splits.train) + len(splits.val) == 50_000
    assert (len(splits.train), len(splits.val)) == (45_000, 5_000)
    assert splits.train.images.shape[1:] == splits.val.images.shape[1:] == (3, 32, 32)
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.is_contiguous()
    assert list(splits.val.class_counts().values()) == [500] * 10
    assert list(splits.train.class_counts().values()) == [4500] * 10
    assert splits.test is None and "JPEG" in splits.source

    again = load_dataset(cifar_jpeg_dir)  # from the decoded cache
    assert torch.equal(again.val.labels, splits.val.labels) and torch.equal(again.val.images, splits.val.images)
    assert torch.equal(again.train.images[:100], splits.train.images[:100])
    other = load_dataset(cifar_jpeg_dir, split_seed=1)
    assert not torch.equal(other.val.images, splits.val.images)
    assert list(other.val.class_counts().values()) == [500] * 10

    with pytest.raises(DataError, match="no test split"):
        load_dataset(cifar_jpeg_dir, need=("test",))
