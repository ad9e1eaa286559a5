"""The machine's matmul peak for one dtype, measured rather than taken from a data sheet: the best
rate of large square matmuls after warm-up. MFU divides by this number, so it is measured in the
same process (same threads, same clocks, same load) as the throughput it is compared with."""
from __future__ import annotations

import time

import torch

from resnetlab.bench.contention import ForeignLoad
from resnetlab.engine.runtime import has_native_bf16

# Square sizes tried; the best rate over them is the peak. CPUs reach it at 1-4k (the blocking
# fits the caches), GPUs only at the larger sizes.
CPU_SIZES = (1024, 2048, 4096)
CUDA_SIZES = (4096, 8192)


def peak_precision(precision: str, device: torch.device) -> str:
    """The dtype whose matmul peak bounds a run in `precision`: itself where the hardware has it;
    fp32 for bf16 that is only emulated (the emulation computes in fp32, and its own matmul rate,
    ~1 GFLOP/s, would give MFUs far above 1: oneDNN's emulated bf16 convolutions are faster)."""
    if precision == "bf16" and not has_native_bf16(device):
        return "fp32"
    return precision


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(n: int, dtype: torch.dtype, device: torch.device, min_seconds: float = 0.3, repeats: int = 3,
                  max_foreign_cores: float = 0.15) -> float:
    """Best GFLOP/s of an n x n by n x n matmul (2 n^3 FLOPs) over `repeats` timed windows of at
    least `min_seconds` each, after one untimed warm-up call. Windows during which other processes
    kept more than `max_foreign_cores` cores busy are repeated (up to 3 x repeats windows in all)
    and count only when no clean window was had."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up: packing buffers, kernel selection, clocks
    synchronize(device)
    rates: list[tuple[float, bool]] = []  # (GFLOP/s, clean)
    while sum(clean for _, clean in rates) < repeats and len(rates) < 3 * repeats:
        with ForeignLoad() as load:
            calls, start = 0, time.perf_counter()
            while True:
                torch.matmul(a, b, out=out)
                calls += 1
                synchronize(device)
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds:
                    break
        rates.append((2 * n**3 * calls / elapsed / 1e9, load.cores <= max_foreign_cores))
    return max(rate for rate, clean in rates if clean or not any(c for _, c in rates))


def measure_peak_gflops(dtype: torch.dtype, device: torch.device | str = "cpu", sizes: tuple[int, ...] | None = None,
                        min_seconds: float = 0.3, repeats: int = 3, max_call_seconds: float = 3.0) -> float:
    """The machine's matmul peak for `dtype` in GFLOP/s: the best rate over `sizes`, smallest first.
    A size whose single matmul would take longer than `max_call_seconds` at the best rate seen so
    far is not tried: a dtype the CPU only emulates (bf16 without AVX-512 BF16: about 1 GFLOP/s on
    a Zen 3, against 125 in fp32) would otherwise spend minutes per 4096 x 4096 matmul."""
    device = torch.device(device)
    sizes = sorted(sizes or (CUDA_SIZES if device.type == "cuda" else CPU_SIZES))
    best = 0.0
    with torch.no_grad():
        for n in sizes:
            if best > 0 and 2 * n**3 / (best * 1e9) > max_call_seconds:
                break
            best = max(best, matmul_gflops(n, dtype, device, min_seconds, repeats))
    return best
