"""Helpers for the training tests: a tiny synthetic CIFAR-10 (binary batch format, so no pickles)
whose classes are learnable in a few steps, and tiny configs."""
from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_synthetic_cifar10(root: Path, n_train: int = 400, n_test: int = 50, seed: int = 0) -> Path:
    """`root/cifar-10-batches-bin` with 5 training batches and a test batch. Each class has its own
    mean colour and a bright square at a class-dependent place, plus noise."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "batches.meta.txt").write_text("\n".join(CLASSES) + "\n")

    def records(n: int) -> bytes:
        labels = rng.integers(0, 10, n).astype(np.uint8)
        colours = rng.integers(40, 215, (10, 3))
        images = rng.normal(0, 30, (n, 3, 32, 32)) + colours[labels][:, :, None, None]
        for i, label in enumerate(labels):
            row, col = 4 + 6 * (label // 4), 4 + 6 * (label % 4)
            images[i, :, row : row + 8, col : col + 8] = 250
        pixels = np.clip(images, 0, 255).astype(np.uint8).reshape(n, -1)
        return np.concatenate([labels[:, None], pixels], axis=1).tobytes()

    per_batch = n_train // 5
    for index in range(1, 6):
        (folder / f"data_batch_{index}.bin").write_bytes(records(per_batch))
    (folder / "test_batch.bin").write_bytes(records(n_test))
    return root


def tiny_config(data_dir: Path, out: Path | None, **overrides) -> dict:
    """A config dict for a seconds-long CPU run: resnet8 at quarter width, 2 epochs of 5 steps
    (320 training images, batch 64; 80 validation images)."""
    config = {
        "model": {"name": "resnet8", "options": {"width": 0.25}},
        "data": {"dir": str(data_dir), "val_size": 80, "download": False},
        "optim": {"lr": 0.05, "nesterov": True, "weight_decay": 5e-4},
        "schedule": {"kind": "cosine", "warmup": {"kind": "linear", "length": 2, "unit": "steps"}},
        "train": {"epochs": 2, "steps": None, "batch_size": 64, "log_every_steps": 3},
        "runtime": {"device": "cpu", "precision": "fp32", "threads": 1},
        "out": str(out) if out is not None else None,
    }
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config
