"""Data-layer timings: first decode and cached reload of the 50k CIFAR-10 JPEG folder, and batched
augmentation throughput. Standalone: `python benchmarks/bench_data.py [--data-dir DIR]` prints a
Markdown table; `run()` returns the rows for benchmarks/run_all.py."""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from resnetlab.data import augment, compute_normalizer, load_dataset
from resnetlab.data.augment import AugmentSpec
from resnetlab.data.loader import InMemoryLoader

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg"
BATCH = 128


def _rate(fn, batch: int, seconds: float = 1.0) -> float:
    """Images per second of fn() over about `seconds`, after a warm-up; best of three rounds."""
    for _ in range(5):
        fn()
    best = 0.0
    for _ in range(3):
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            fn()
            calls += 1
        best = max(best, calls * batch / (time.perf_counter() - start))
    return best


def bench_augment(device: str = "cpu") -> list[dict]:
    x = torch.randn(BATCH, 3, 32, 32, device=device)
    generator = torch.Generator().manual_seed(0)
    cases = {
        "pad 4 + crop + flip (fused)": lambda: augment.random_crop_flip(x, 4, generator=generator),
        "pad 4 + crop, then flip": lambda: augment.random_flip(augment.random_crop(x, 4, generator=generator),
                                                                generator),
        "pad 4 reflect + crop + flip": lambda: augment.random_crop_flip(x, 4, "reflect", generator=generator),
        "crop + flip + cutout 16": lambda: augment.augment_batch(x, AugmentSpec(cutout=16), generator),
    }
    rows = [{"case": f"{name}, {BATCH} x 3x32x32 float32 ({device})", "value": _rate(fn, BATCH), "unit": "images/s"}
            for name, fn in cases.items()]
    images = torch.randint(0, 256, (10 * BATCH, 3, 32, 32), dtype=torch.uint8)
    loader = InMemoryLoader(images, torch.zeros(len(images), dtype=torch.int64), batch_size=BATCH, device=device,
                            normalizer=compute_normalizer(images), augment=AugmentSpec())
    batches = iter(())

    def next_batch():
        nonlocal batches
        try:
            next(batches)
        except StopIteration:
            batches = iter(loader)
            next(batches)

    rows.append({"case": f"InMemoryLoader batch: index + normalise + crop/flip + channels_last ({device})",
                 "value": _rate(next_batch, BATCH), "unit": "images/s"})
    return rows


def bench_folder(data_dir: Path) -> list[dict]:
    """Time the first load (decode + cache write) in a fresh cache dir, then cached reloads."""
    cache = Path(tempfile.mkdtemp(prefix="resnetlab-bench-cache-"))
    previous = os.environ.get("RESNETLAB_CACHE")
    os.environ["RESNETLAB_CACHE"] = str(cache)
    try:
        start = time.perf_counter()
        splits = load_dataset(data_dir)
        first = time.perf_counter() - start
        reloads = []
        for _ in range(3):
            start = time.perf_counter()
            load_dataset(data_dir)
            reloads.append(time.perf_counter() - start)
    finally:
        if previous is None:
            os.environ.pop("RESNETLAB_CACHE", None)
        else:
            os.environ["RESNETLAB_CACHE"] = previous
        shutil.rmtree(cache, ignore_errors=True)
    n = len(splits.train) + (len(splits.val) if splits.val is not None else 0)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        {"case": f"first load of {n} images ({cpus} CPUs): decode + cache write + split", "value": first,
         "unit": "s"},
        {"case": f"cached reload of {n} images: fingerprint + read + split (best of 3)", "value": min(reloads),
         "unit": "s"},
    ]


def run(data_dir: Path | None = None) -> list[dict]:
    rows = bench_augment("cpu")
    if torch.cuda.is_available():
        rows += bench_augment("cuda")
    data_dir = Path(data_dir) if data_dir else DEFAULT_DATA
    if (data_dir / "train").is_dir():
        rows += bench_folder(data_dir)
    else:
        rows.append({"case": f"JPEG folder timings skipped: {data_dir} absent", "value": float("nan"), "unit": ""})
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = ["| data benchmark | value | unit |", "|---|---:|---|"]
    for row in rows:
        value = row["value"]
        shown = f"{value:,.0f}" if row["unit"] == "images/s" else f"{value:.2f}"
        lines.append(f"| {row['case']} | {shown} | {row['unit']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help=f"JPEG image folder (default {DEFAULT_DATA})")
    print(to_markdown(run(parser.parse_args().data_dir)))
