"""Where the stride-2 convolutions' backward time goes, and whether an exact rewrite helps.

`python -m resnetlab.bench.breakdown` shows the backward pass of ResNet-20's two stride-2 3x3
convolutions running at a third to half the GFLOP/s of the stride-1 ones. This script times, in
bf16 channels_last at batch 128 (the CPU fast path), each stride-2 convolution next to the stride-1
convolution that follows it:

- the input gradient and the weight gradient alone (`aten.convolution_backward` with one output
  mask set), and both together as autograd asks for them;
- forward + backward of the convolution as written, against the space-to-depth form: a stride-2
  3x3 convolution equals a stride-1 2x2 convolution over `pixel_unshuffle(x, 2)` (4x the channels,
  padded one row and column at the top and left) with the 3x3 kernel scattered into the 2x2 one
  (7 of the 16 taps per channel are zero, so it computes 16/9 of the FLOPs, in a stride-1 kernel).

Rounds are interleaved so that a machine whose speed drifts affects every form alike; the medians
are printed. Usage: `python benchmarks/bench_stride2.py [--rounds N] [--threads T]`.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

BATCH = 128
# ResNet-20's stride-2 convolutions and the stride-1 convolution after each: (in, out, input size, stride)
SHAPES = ((16, 32, 32, 2), (32, 32, 16, 1), (32, 64, 16, 2), (64, 64, 8, 1))
# Where each 3x3 tap of a stride-2 convolution lands after pixel_unshuffle: tap offset a in
# {-1, 0, 1} reads row 2i + a = 2(i + p) + q, i.e. (2x2 kernel index p + 1, sub-pixel q).
_TAP = {0: (0, 1), 1: (1, 0), 2: (1, 1)}


def space_to_depth_weight(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) -> (out, 4 * in, 2, 2) for a stride-1 convolution over pixel_unshuffle(x, 2)."""
    out_channels, in_channels = weight.shape[:2]
    scattered = weight.new_zeros(out_channels, in_channels, 2, 2, 2, 2)  # out, in, qy, qx, ky, kx
    for ay, (ky, qy) in _TAP.items():
        for ax, (kx, qx) in _TAP.items():
            scattered[:, :, qy, qx, ky, kx] = weight[:, :, ay, ax]
    return scattered.reshape(out_channels, 4 * in_channels, 2, 2)


def space_to_depth_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The same values as F.conv2d(x, weight, stride=2, padding=1) for a 3x3 weight and even sizes."""
    unshuffled = F.pad(F.pixel_unshuffle(x, 2), (1, 0, 1, 0))
    return F.conv2d(unshuffled, space_to_depth_weight(weight))


def direct_conv(stride: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda x, weight: F.conv2d(x, weight, stride=stride, padding=1)


def _channels_last(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous(memory_format=torch.channels_last)


def make_timers(in_channels: int, out_channels: int, size: int, stride: int) -> dict[str, Callable[[], None]]:
    """Callables that run one measured operation each on fixed bf16 channels_last tensors."""
    generator = torch.Generator().manual_seed(0)
    x = _channels_last(torch.randn(BATCH, in_channels, size, size, generator=generator).bfloat16())
    weight = (torch.randn(out_channels, in_channels, 3, 3, generator=generator) * 0.1).bfloat16()
    grad = _channels_last(torch.randn(BATCH, out_channels, size // stride, size // stride, generator=generator).bfloat16())

    def backward(mask: tuple[bool, bool, bool]) -> Callable[[], None]:
        return lambda: torch.ops.aten.convolution_backward(
            grad, x, weight, None, [stride, stride], [1, 1], [1, 1], False, [0, 0], 1, list(mask))

    def forward_backward(conv) -> Callable[[], None]:
        def run() -> None:
            inputs, weights = x.detach().requires_grad_(True), weight.detach().requires_grad_(True)
            conv(inputs, weights).backward(grad)
        return run

    timers = {"input gradient": backward((True, False, False)), "weight gradient": backward((False, True, False)),
              "both gradients": backward((True, True, False)), "forward + backward": forward_backward(direct_conv(stride))}
    if stride == 2:
        timers["space-to-depth forward + backward"] = forward_backward(space_to_depth_conv)
    return timers


def backward_gflop(in_channels: int, out_channels: int, size: int, stride: int) -> float:
    """FLOPs of both gradients: twice the forward's multiply-adds, each 2 FLOPs."""
    out_size = size // stride
    return 2 * 2 * BATCH * out_channels * out_size * out_size * in_channels * 9 / 1e9


def time_interleaved(timers: dict[str, Callable[[], None]], rounds: int, repeats: int = 5) -> dict[str, float]:
    """Median ms per call of each timer over `rounds` rounds that run every timer in turn."""
    for run in timers.values():  # warm-up: oneDNN primitive creation, allocator growth
        run(), run()
    samples: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, run in timers.items():
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            samples[name].append((time.perf_counter() - start) / repeats * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per convolution")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"bf16, channels_last, batch {BATCH}, {args.threads} threads, median of {args.rounds} interleaved rounds\n")
    print("| convolution | input grad ms | weight grad ms | both ms | backward GFLOP/s | fwd + bwd ms "
          "| space-to-depth fwd + bwd ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for in_channels, out_channels, size, stride in SHAPES:
        ms = time_interleaved(make_timers(in_channels, out_channels, size, stride), args.rounds)
        rate = backward_gflop(in_channels, out_channels, size, stride) / ms["both gradients"] * 1000
        s2d = ms.get("space-to-depth forward + backward")
        print(f"| {in_channels}->{out_channels}, {size}x{size}, stride {stride} | {ms['input gradient']:.2f} "
              f"| {ms['weight gradient']:.2f} | {ms['both gradients']:.2f} | {rate:.0f} | {ms['forward + backward']:.2f} "
              f"| {'' if s2d is None else f'{s2d:.2f}'} |")


if __name__ == "__main__":
    main()
