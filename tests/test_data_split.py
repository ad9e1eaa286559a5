"""The validation split: deterministic, stratified, disjoint, exactly val_size."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resnetlab.data import stratified_split
from resnetlab.errors import DataError


def cifar_like_labels() -> torch.Tensor:
    return torch.arange(50_000) % 10


def test_5000_of_50000_is_500_per_class_and_disjoint():
    labels = cifar_like_labels()
    train, val = stratified_split(labels, 5000, seed=0)
    assert len(train) == 45_000 and len(val) == 5000
    assert torch.bincount(labels[val]).tolist() == [500] * 10
    assert torch.bincount(labels[train]).tolist() == [4500] * 10
    assert torch.equal(torch.sort(torch.cat([train, val])).values, torch.arange(50_000))
    assert train.dtype == val.dtype == torch.int64


def test_same_seed_same_split_other_seed_other_split():
    labels = cifar_like_labels()
    a, b = stratified_split(labels, 5000, 0), stratified_split(labels, 5000, 0)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    c = stratified_split(labels, 5000, 1)
    assert not torch.equal(a[1], c[1])


def test_split_is_pinned_across_versions():
    # the first validation indices for seed 0 (legacy RandomState stream, frozen by NEP 19): a
    # change here silently changes every reported validation number
    _, val = stratified_split(torch.arange(100) % 2, 10, seed=0)
    assert val.tolist() == sorted(val.tolist())
    assert val.tolist() == [4, 5, 20, 22, 27, 33, 47, 56, 61, 82]


def test_val_size_zero_keeps_everything_for_training():
    train, val = stratified_split(cifar_like_labels(), 0, 0)
    assert len(train) == 50_000 and len(val) == 0


@pytest.mark.parametrize("size", [-1, 100])
def test_impossible_sizes_are_data_errors(size):
    with pytest.raises(DataError, match="val_size"):
        stratified_split(torch.arange(100) % 10, size, 0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=2, max_size=300), st.integers(0, 10_000), st.data())
def test_unbalanced_classes_get_proportional_shares_summing_exactly(labels, seed, data):
    labels = torch.tensor(labels)
    val_size = data.draw(st.integers(0, len(labels) - 1))
    train, val = stratified_split(labels, val_size, seed)
    assert len(val) == val_size and len(train) + len(val) == len(labels)
    assert not set(train.tolist()) & set(val.tolist())
    counts = torch.bincount(labels, minlength=7).double()
    shares = torch.bincount(labels[val], minlength=7).double()
    assert ((shares - counts * val_size / len(labels)).abs() < 1 + 1e-9).all()
