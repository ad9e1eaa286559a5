"""CIFAR data: readers for every official format and image folders, an honest validation split,
train-only normalisation, batched augmentation and an in-memory loader."""
from resnetlab.data import augment
from resnetlab.data.augment import AugmentSpec, flip_tta_logits
from resnetlab.data.dataset import DataSplits, ImageSet
from resnetlab.data.load import Source, default_data_root, find_source, load_dataset, locate_source
from resnetlab.data.loader import InMemoryLoader
from resnetlab.data.normalize import Normalizer, compute_normalizer
from resnetlab.data.split import stratified_split
from resnetlab.errors import DataError

__all__ = [
    "AugmentSpec",
    "DataError",
    "DataSplits",
    "ImageSet",
    "InMemoryLoader",
    "Normalizer",
    "Source",
    "augment",
    "compute_normalizer",
    "default_data_root",
    "find_source",
    "flip_tta_logits",
    "load_dataset",
    "locate_source",
    "stratified_split",
]
