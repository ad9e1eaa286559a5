"""The standard PyTorch CIFAR recipe as users write it, measured as the reference for the speed-up.

Faithful, not a straw man: a `torch.utils.data.Dataset` over uint8 HWC images whose
`__getitem__` applies the per-sample transforms of torchvision's CIFAR examples --
RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(), Normalize(mean, std) -- written
out here in torch/numpy with torchvision's semantics (torchvision is not a dependency); a
`DataLoader` with 2 worker processes, batch 128, shuffling, no pinned memory on the CPU; an eager
fp32 NCHW model; SGD with momentum 0.9 and weight decay; and the running loss read with
`loss.item()` each step, as tutorials print it. The model is resnetlab's own, so the comparison
isolates the training machinery.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from resnetlab.bench.memory import PeakRSS, maxrss_mb
from resnetlab.bench.peak import measure_peak_gflops
from resnetlab.bench.train_bench import (BenchResult, best_window, default_num_images, mfu, synthetic_data,
                                         train_flops_per_image, warm_up_and_time)
from resnetlab.engine.runtime import resolve_device

# The usual CIFAR-10 channel statistics of the tutorials.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class RandomCrop:
    """torchvision.transforms.RandomCrop(size, padding) on an HWC uint8 image: zero-pad every side
    (fill 0, the PIL/tensor default), then cut a window at an offset drawn with torch.randint."""

    def __init__(self, size: int, padding: int = 4):
        self.size, self.padding = size, padding

    def __call__(self, image: np.ndarray) -> np.ndarray:
        p = self.padding
        padded = np.pad(image, ((p, p), (p, p), (0, 0)))
        h, w = padded.shape[:2]
        top = int(torch.randint(0, h - self.size + 1, size=(1,)).item())
        left = int(torch.randint(0, w - self.size + 1, size=(1,)).item())
        return padded[top:top + self.size, left:left + self.size]


class RandomHorizontalFlip:
    """torchvision.transforms.RandomHorizontalFlip(p): mirror when torch.rand(1) < p."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return image[:, ::-1] if torch.rand(1).item() < self.p else image


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """torchvision.transforms.ToTensor: HWC uint8 -> CHW float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous().float().div(255)


class Normalize:
    """torchvision.transforms.Normalize(mean, std) on a CHW float tensor."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.sub(self.mean).div(self.std)


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image):
        for transform in self.transforms:
            image = transform(image)
        return image


def standard_train_transform(size: int = 32, padding: int = 4) -> Compose:
    return Compose([RandomCrop(size, padding), RandomHorizontalFlip(), to_tensor, Normalize(CIFAR_MEAN, CIFAR_STD)])


class HWCImageDataset(Dataset):
    """Images as an N x H x W x C uint8 array (what torchvision's CIFAR10 keeps in `.data`)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


@dataclass(frozen=True)
class BaselineConfig:
    model: str = "resnet20"
    batch_size: int = 128
    steps: int = 30
    warmup_steps: int = 5  # also absorbs the workers' start-up
    num_workers: int = 2
    windows: int = 3
    retry_seconds: float = 60.0
    device: str = "auto"
    image_size: int | None = None  # None: the model's native input size
    num_images: int | None = None  # None: as the fast-path benchmark
    seed: int = 0


def run_baseline(cfg: BaselineConfig, peak_gflops: float | None = None) -> BenchResult:
    """Measure the standard recipe; the peak is the fp32 matmul peak (its compute dtype)."""
    from resnetlab.models import create_model, model_info

    device = resolve_device(cfg.device)
    info = model_info(cfg.model)
    size = cfg.image_size or info["input_size"][-1]
    count = cfg.num_images or default_num_images(size, cfg.batch_size)
    images, labels = synthetic_data(count, size, info["input_size"][0], info["num_classes"], cfg.seed)
    dataset = HWCImageDataset(images.permute(0, 2, 3, 1).numpy(), labels.numpy(), standard_train_transform(size))
    torch.manual_seed(cfg.seed)
    with PeakRSS() as rss:
        loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
                            pin_memory=device.type == "cuda", drop_last=True)
        model = create_model(cfg.model).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        trainer = _StandardLoop(model, optimizer, loader, device)
        warmup_s, windows = warm_up_and_time(trainer.step, cfg, device)
        trainer.close()
    best = best_window(windows)
    rate = best.rate(cfg.batch_size)
    flops = train_flops_per_image(cfg.model, size) / 1e9
    peak = peak_gflops if peak_gflops is not None else measure_peak_gflops(torch.float32, device)
    total_steps = sum(w.steps for w in windows)
    return BenchResult(
        images_per_s=rate, mfu=mfu(rate, flops, peak), peak_gflops=peak, train_gflop_per_image=flops,
        peak_rss_mb=rss.peak_mb, model=cfg.model, batch_size=cfg.batch_size, precision="fp32",
        channels_last=False, compile=False, device=str(device), threads=torch.get_num_threads(),
        step_ms=1000 * best.seconds / best.steps, warmup_s=warmup_s,
        mean_images_per_s=total_steps * cfg.batch_size / sum(w.seconds for w in windows),
        foreign_cores=best.foreign_cores,
        extra={"num_workers": cfg.num_workers, "worker_peak_rss_mb": maxrss_mb_children()},
    )


def maxrss_mb_children() -> float:
    import resource

    return maxrss_mb(resource.RUSAGE_CHILDREN)


class _StandardLoop:
    """`for x, y in loader:` with the textbook body, one iteration per `step()`; a new epoch (and
    new worker processes, as without persistent_workers) when the loader runs out."""

    def __init__(self, model, optimizer, loader, device):
        self.model, self.optimizer, self.loader, self.device = model, optimizer, loader, device
        self.iterator = iter(loader)
        self.running_loss = 0.0

    def step(self) -> None:
        try:
            x, y = next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.loader)
            x, y = next(self.iterator)
        x, y = x.to(self.device), y.to(self.device)
        outputs = self.model(x)
        loss = F.cross_entropy(outputs, y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.running_loss += loss.item()

    def close(self) -> None:
        del self.iterator  # shuts the worker processes down
