"""The 3x3 convolutions' weight gradient: resnetlab's CPU kernel (kernels/conv_wgrad.cpp) against
oneDNN's, per ResNet-20 layer shape, then whole ResNet-20 training steps (the engine's, as `bench
train` runs them) with and without the kernel, interleaved round by round so that a machine whose
speed drifts affects both alike.

    python benchmarks/bench_conv_wgrad.py [--rounds 16] [--batch 128]

bf16 channels_last; needs a CPU with AVX-512 BF16 (else it says so and exits 1)."""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from resnetlab.bench.engine_step import EngineStepper
from resnetlab.bench.train_bench import synthetic_data
from resnetlab.config import build_config
from resnetlab.engine.setup import resolved_config
from resnetlab.kernels import conv3x3 as conv3x3_module
from resnetlab.kernels import load_conv_wgrad_extension

# ResNet-20's 3x3 convolutions with 16k channels: (in, out, input size, stride, layers per net)
LAYERS = ((16, 16, 32, 1, 6), (16, 32, 32, 2, 1), (32, 32, 16, 1, 5), (32, 64, 16, 2, 1), (64, 64, 8, 1, 5))


def median_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def layer_rows(batch: int, repeats: int = 20) -> list[dict]:
    kernel = load_conv_wgrad_extension()
    rows = []
    for cin, cout, size, stride, count in LAYERS:
        out_size = (size - 1) // stride + 1
        x = torch.randn(batch, cin, size, size).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        w = torch.randn(cout, cin, 3, 3).to(torch.bfloat16)
        dy = torch.randn(batch, cout, out_size, out_size).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        args = (None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1, [False, True, False])
        onednn = median_ms(lambda: torch.ops.aten.convolution_backward(dy, x, w, *args), repeats)
        mine = median_ms(lambda: kernel.weight_grad(dy, x, stride), repeats)
        gflop = 2 * batch * cout * cin * 9 * out_size * out_size / 1e9
        rows.append({"layer": f"{cin}->{cout}, {size}x{size}, stride {stride}", "count": count, "onednn_ms": onednn,
                     "kernel_ms": mine, "onednn_gflops": gflop / onednn * 1e3, "kernel_gflops": gflop / mine * 1e3})
    return rows


def paired_step_ms(rounds: int, batch: int, steps_per_round: int = 4) -> dict[str, list[float]]:
    """Engine training steps of the paper's recipe (ResNet-20, the CPU defaults), with the kernel
    and with oneDNN's weight gradient, interleaved (the order alternating round by round)."""
    config = resolved_config(build_config("he2016-cifar", overrides=[f"train.batch_size={batch}",
                                                                     "train.drop_last=true"]))
    images, labels = synthetic_data(20 * batch, 32)
    stepper = EngineStepper(config, images, labels, 10)
    forms = {"kernel": conv3x3_module.kernel_applies, "oneDNN": lambda conv, x: False}
    times: dict[str, list[float]] = {name: [] for name in forms}
    try:
        for form in (*forms.values(), *forms.values()):  # warm-up of both
            conv3x3_module.kernel_applies = form
            for _ in range(2):
                stepper.step()
        for r in range(rounds):
            for name in (list(forms) if r % 2 == 0 else list(forms)[::-1]):
                conv3x3_module.kernel_applies = forms[name]
                stepper.step()  # the first step after a switch allocates differently
                start = time.perf_counter()
                for _ in range(steps_per_round):
                    stepper.step()
                times[name].append((time.perf_counter() - start) / steps_per_round * 1e3)
    finally:
        conv3x3_module.kernel_applies = forms["kernel"]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    if load_conv_wgrad_extension() is None:
        sys.exit("bench_conv_wgrad: the kernel is not available here (needs AVX-512 BF16 and a C++ compiler)")
    print(f"bf16, channels_last, batch {args.batch}, {torch.get_num_threads()} threads\n")
    print("| 3x3 layer | per net | oneDNN ms (GFLOP/s) | kernel ms (GFLOP/s) |\n|---|---:|---:|---:|")
    for row in layer_rows(args.batch):
        print(f"| {row['layer']} | {row['count']} | {row['onednn_ms']:.2f} ({row['onednn_gflops']:.0f}) "
              f"| {row['kernel_ms']:.2f} ({row['kernel_gflops']:.0f}) |")
    times = paired_step_ms(args.rounds, args.batch)
    print(f"\n| ResNet-20 training step, {args.rounds} interleaved rounds | min ms | median ms |\n|---|---:|---:|")
    for name, values in times.items():
        print(f"| {name} weight gradient | {min(values):.1f} | {statistics.median(values):.1f} |")
    gains = [b - a for a, b in zip(times["kernel"], times["oneDNN"])]
    print(f"\nkernel faster in {sum(g > 0 for g in gains)} of {len(gains)} rounds; "
          f"median paired gain {statistics.median(gains):.2f} ms per step")


if __name__ == "__main__":
    main()
