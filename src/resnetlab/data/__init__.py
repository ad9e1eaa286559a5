"""CIFAR data: readers for every official format and image folders, an honest validation split,
train-only normalisation, batched augmentation and an in-memory loader."""
from __future__ import annotations

import importlib

# Imported lazily, like the top-level package: `resnetlab.data.<name>` loads only the module it needs.
_EXPORTS = {
    "AugmentSpec": "resnetlab.data.augment",
    "flip_tta_logits": "resnetlab.data.augment",
    "tta_logits": "resnetlab.data.augment",
    "DataSplits": "resnetlab.data.dataset",
    "ImageSet": "resnetlab.data.dataset",
    "Source": "resnetlab.data.load",
    "default_data_root": "resnetlab.data.load",
    "find_source": "resnetlab.data.load",
    "load_dataset": "resnetlab.data.load",
    "locate_source": "resnetlab.data.load",
    "InMemoryLoader": "resnetlab.data.loader",
    "Normalizer": "resnetlab.data.normalize",
    "compute_normalizer": "resnetlab.data.normalize",
    "stratified_split": "resnetlab.data.split",
    "DataError": "resnetlab.errors",
}

__all__ = sorted([*_EXPORTS, "augment"])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name == "augment":
        return importlib.import_module("resnetlab.data.augment")
    raise AttributeError(f"module 'resnetlab.data' has no attribute {name!r}")
