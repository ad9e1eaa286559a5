"""What the fused BN + ReLU kernel (resnetlab.kernels) gains over the native operators.
`python benchmarks/bench_fused_bn.py [--rounds N] [--threads T]` prints, in bf16 channels_last at
batch 128: forward + backward of relu(bn(x)) and relu(bn(x) + shortcut) at ResNet-20's three
stage shapes, native against fused, then ResNet-20 training steps through the engine (the same
step `resnetlab train` and `bench train` run) with either, interleaved round by round so that a
machine whose speed drifts affects both alike."""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.bench.engine_step import EngineStepper, bench_run_config
from resnetlab.bench.train_bench import BenchConfig, synthetic_data
from resnetlab.kernels import bn_relu, fused_bn_relu, load_bn_relu_extension

BATCH = 128
STAGES = ((16, 32), (32, 16), (64, 8))  # (channels, side) of ResNet-20's three stages


def layer_ms(fused: bool, channels: int, side: int, with_shortcut: bool, repeats: int) -> float:
    """Median ms of one forward + backward of relu(bn(x) [+ shortcut]), as the blocks call it."""
    def tensor():
        x = torch.randn(BATCH, channels, side, side).to(torch.bfloat16)
        return x.contiguous(memory_format=torch.channels_last).requires_grad_()

    bn, x, grad = nn.BatchNorm2d(channels), tensor(), tensor().detach()
    shortcut = tensor() if with_shortcut else None
    times = []
    for i in range(repeats + 5):  # 5 untimed: oneDNN/allocator warm-up
        start = time.perf_counter()
        with fused_bn_relu(fused):
            out = bn_relu(bn, x, shortcut)
        out.backward(grad)
        x.grad = None  # no gradient accumulation in the timing
        if i >= 5:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def step_ms_interleaved(rounds: int, steps_per_round: int = 10) -> dict[bool, list[float]]:
    """ms per ResNet-20 engine training step, fused and native alternating round by round."""
    images, labels = synthetic_data(50_000, 32)
    steppers = {fused: EngineStepper(bench_run_config(BenchConfig(fused_bn=fused)), images, labels, 10)
                for fused in (True, False)}
    for stepper in steppers.values():
        for _ in range(5):
            stepper.step()
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for fused in ((True, False) if r % 2 == 0 else (False, True)):
            start = time.perf_counter()
            for _ in range(steps_per_round):
                steppers[fused].step()
            times[fused].append(1000 * (time.perf_counter() - start) / steps_per_round)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds of 10 ResNet-20 steps each")
    parser.add_argument("--repeats", type=int, default=40, help="timed calls per layer shape")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if load_bn_relu_extension() is None:
        raise SystemExit("the fused kernel can't be built here: nothing to compare")
    print(f"{torch.get_num_threads()} threads, bf16 channels_last, batch {BATCH}; median ms of forward + backward")
    print("| layer | native ms | fused ms | ratio |\n|---|---:|---:|---:|")
    for channels, side in STAGES:
        for with_shortcut in (False, True):
            native = layer_ms(False, channels, side, with_shortcut, args.repeats)
            fused = layer_ms(True, channels, side, with_shortcut, args.repeats)
            what = "relu(bn(x) + shortcut)" if with_shortcut else "relu(bn(x))"
            print(f"| {what}, {BATCH}x{channels}x{side}x{side} | {native:.2f} | {fused:.2f} | {native / fused:.1f}x |")
    times = step_ms_interleaved(args.rounds)
    gains = [n - f for f, n in zip(times[True], times[False])]
    print(f"\nResNet-20 engine step, {args.rounds} interleaved rounds of 10 steps: median {statistics.median(times[False]):.1f}"
          f" ms native, {statistics.median(times[True]):.1f} ms fused; median paired gain {statistics.median(gains):.1f} ms,"
          f" fused faster in {sum(g > 0 for g in gains)} of {len(gains)} rounds")


if __name__ == "__main__":
    main()
