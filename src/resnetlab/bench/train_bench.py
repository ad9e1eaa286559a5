"""Steady-state training throughput of resnetlab's fast path, with the numbers that make it
comparable across machines: training FLOPs per image, the matmul peak measured in the same
process for the same dtype, MFU, and peak memory.

What is timed is a whole training step as `resnetlab train` runs it: batch indexing from the
in-memory uint8 data set, normalisation, batched pad-crop + flip, forward, loss, backward,
optimizer step, and the running metrics (accumulated on the device, no host sync per step).
Only the data are synthetic (random uint8 images): the arithmetic does not depend on the pixels.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from resnetlab.bench.contention import ForeignLoad
from resnetlab.bench.memory import PeakRSS
from resnetlab.bench.peak import measure_peak_gflops, peak_precision, synchronize
from resnetlab.engine.runtime import DTYPES
from resnetlab.errors import ConfigError
from resnetlab.models import model_info

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SUMMARY_KEYS = ("images_per_s", "mfu", "peak_gflops", "train_gflop_per_image", "peak_rss_mb")
# A CIFAR-sized synthetic set is the real one's size (50k images, 150 MB of uint8), so memory
# figures are those of a real run; larger inputs get a few batches' worth.
CIFAR_IMAGES = 50_000


@dataclass(frozen=True)
class BenchConfig:
    model: str = "resnet20"
    batch_size: int = 128
    steps: int = 60  # timed steps, split into `windows` equal windows; the best window is reported
    warmup_steps: int = 10  # untimed: oneDNN kernel selection, allocator growth, torch.compile
    precision: str = "auto"
    channels_last: bool | None = None  # None: the engine's default for the device
    compile: bool | str = "auto"  # auto: what `resnetlab train` does (compiled on CUDA, eager on the CPU)
    compile_mode: str = "auto"  # torch.compile's mode (auto: reduce-overhead, i.e. CUDA graphs, on CUDA)
    fused_bn: bool | None = None  # the fused BN + ReLU CPU kernel; None: the engine's default
    winograd: bool | None = None  # Winograd stride-1 3x3 convolutions (runtime.conv_winograd); None: the default
    device: str = "auto"
    threads: int | None = None  # torch intra-op threads; None: torch's default (the core count)
    windows: int = 3
    retry_seconds: float = 60.0  # time spent re-running windows that another process shared
    image_size: int | None = None  # None: the model's native input size
    num_images: int | None = None  # synthetic data set size; None: CIFAR's 50k (or 8 batches if larger inputs)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for key in ("batch_size", "steps", "windows"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class BenchResult:
    """One measured configuration. `summary()` is the public JSON part; the rest says what ran."""

    images_per_s: float
    mfu: float
    peak_gflops: float
    train_gflop_per_image: float
    peak_rss_mb: float
    model: str = ""
    batch_size: int = 0
    precision: str = ""
    peak_precision: str = ""  # the dtype of peak_gflops: fp32 where bf16 is emulated
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    fused_bn: bool = False
    winograd: bool = False
    device: str = ""
    threads: int = 0
    step_ms: float = 0.0
    mean_images_per_s: float = 0.0  # over all timed steps, not only the best window
    warmup_s: float = 0.0  # the warm-up steps, compile included
    foreign_cores: float = 0.0  # cores other processes used during the reported window
    extra: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        return {key: round(getattr(self, key), 4) for key in SUMMARY_KEYS}

    def describe(self) -> str:
        layout = "channels_last" if self.channels_last else "NCHW"
        mode = "" if self.compile_mode == "default" else f" ({self.compile_mode})"
        return (f"{self.model} batch {self.batch_size} {self.precision} {layout}"
                f"{' compiled' + mode if self.compile else ' eager'}{' fused-BN' if self.fused_bn else ''}"
                f"{' Winograd' if self.winograd else ''} on {self.device} ({self.threads} threads)")


def mfu(images_per_s: float, train_gflop_per_image: float, peak_gflops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the measured matmul peak."""
    return images_per_s * train_gflop_per_image / peak_gflops if peak_gflops > 0 else 0.0


def train_flops_per_image(model_name: str, image_size: int, batch: int = 2) -> float:
    """Forward + backward FLOPs of one training image, counted (not assumed 3x forward) by
    `torch.utils.flop_counter` on the meta device: nothing is allocated or computed. Batch 2 so
    that BatchNorm in training mode sees more than one value per channel everywhere."""
    from resnetlab.models import create_model

    with torch.device("meta"):
        model = create_model(model_name)
        x = torch.zeros(batch, model.default_cfg["input_size"][0], image_size, image_size)
        y = torch.zeros(batch, dtype=torch.int64)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / batch


def default_num_images(image_size: int, batch_size: int) -> int:
    return CIFAR_IMAGES if image_size <= 32 else 8 * batch_size




def synthetic_data(count: int, image_size: int, channels: int = 3, classes: int = 10, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, channels, image_size, image_size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, classes, (count,), generator=generator)
    return images, labels


@dataclass(frozen=True)
class Window:
    seconds: float
    steps: int
    foreign_cores: float  # cores other processes kept busy meanwhile

    def rate(self, batch_size: int) -> float:
        return self.steps * batch_size / self.seconds


def time_windows(step: Callable[[], None], steps: int, windows: int, device: torch.device,
                 max_foreign_cores: float = 0.15, extra_windows: int | None = None,
                 retry_seconds: float = 60.0) -> list[Window]:
    """Time `windows` windows of steps // windows steps (device synchronised at each end). A window
    during which other processes kept more than `max_foreign_cores` cores busy does not count and is
    run again, at most `extra_windows` times (default 2 x windows) and not after `retry_seconds`
    spent on retries; all windows are returned, shared ones included."""
    per_window = max(1, steps // windows)
    extra = 2 * windows if extra_windows is None else extra_windows
    done: list[Window] = []
    while len(done) < windows or (
        sum(w.foreign_cores <= max_foreign_cores for w in done) < windows and len(done) < windows + extra
        and sum(w.seconds for w in done[windows:]) < retry_seconds
    ):
        with ForeignLoad() as load:
            start = time.perf_counter()
            for _ in range(per_window):
                step()
            synchronize(device)
            seconds = time.perf_counter() - start
        done.append(Window(seconds, per_window, load.cores))
    return done


def warm_up_and_time(step: Callable[[], None], cfg: "BenchConfig", device: torch.device) -> tuple[float, list[Window]]:
    """Run cfg.warmup_steps untimed steps (compilation, allocator and cache warm-up), then the timed
    windows; returns (warm-up seconds, windows). Shared by the engine bench and the baseline so both
    are measured the same way."""
    start = time.perf_counter()
    for _ in range(cfg.warmup_steps):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    return warmup_s, time_windows(step, cfg.steps, cfg.windows, device, retry_seconds=cfg.retry_seconds)


def best_window(windows: list[Window], max_foreign_cores: float = 0.15) -> Window:
    """The fastest clean window, or the fastest of all when none was clean."""
    clean = [w for w in windows if w.foreign_cores <= max_foreign_cores] or windows
    return min(clean, key=lambda w: w.seconds / w.steps)


def run_train_bench(cfg: BenchConfig, peak_gflops: float | None = None) -> BenchResult:
    """Measure `cfg` with the engine's own training step. `peak_gflops`, when given, is reused
    instead of measured again."""
    previous = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_train_bench(cfg, peak_gflops)
    finally:
        torch.set_num_threads(previous)


def _run_train_bench(cfg: BenchConfig, peak_gflops: float | None) -> BenchResult:
    from resnetlab.bench.engine_step import EngineStepper, bench_run_config

    config = bench_run_config(cfg)
    runtime = config.runtime
    device = torch.device(runtime.device)
    info = model_info(cfg.model)
    image_size = cfg.image_size or info["input_size"][-1]
    count = cfg.num_images or default_num_images(image_size, cfg.batch_size)
    images, labels = synthetic_data(count, image_size, info["input_size"][0], info["num_classes"], cfg.seed)

    with PeakRSS() as rss:
        stepper = EngineStepper(config, images, labels, info["num_classes"])
        warmup_s, windows = warm_up_and_time(stepper.step, cfg, device)
        stepper.check_finite()
    best = best_window(windows)
    rate = best.rate(cfg.batch_size)
    flops = train_flops_per_image(cfg.model, image_size) / 1e9
    peak_dtype = peak_precision(runtime.precision, device)
    peak = peak_gflops if peak_gflops is not None else measure_peak_gflops(DTYPES[peak_dtype], device)
    total_steps = sum(w.steps for w in windows)
    return BenchResult(
        images_per_s=rate, mfu=mfu(rate, flops, peak), peak_gflops=peak, train_gflop_per_image=flops,
        peak_rss_mb=rss.peak_mb, model=cfg.model, batch_size=cfg.batch_size, precision=runtime.precision,
        peak_precision=peak_dtype, channels_last=bool(runtime.channels_last), compile=runtime.compile, compile_mode=runtime.compile_mode,
        fused_bn=runtime.fused_bn, winograd=runtime.conv_winograd, device=str(device),
        threads=torch.get_num_threads(), step_ms=1000 * best.seconds / best.steps, warmup_s=warmup_s,
        mean_images_per_s=total_steps * cfg.batch_size / sum(w.seconds for w in windows),
        foreign_cores=best.foreign_cores,
    )
