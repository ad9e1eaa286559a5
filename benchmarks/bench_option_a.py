"""Why option A subsamples with avg_pool2d(kernel 1) instead of a strided slice: both give the same
values, but the slice's backward pass scatters into a new NCHW tensor, which with channels_last is
slow in itself and sends a gradient in the other memory format into the end of every stage.
`python benchmarks/bench_option_a.py [--rounds N] [--threads T]` prints, in bf16 channels_last at
batch 128: forward + backward of each subsampling alone at ResNet-20's two shapes, then ResNet-20
training steps (forward + backward) with either form, interleaved round by round so that a machine
whose speed drifts affects both alike."""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from resnetlab.models import create_model
from resnetlab.models.layers import ZeroPadShortcut

BATCH = 128


def slice_subsample(self: ZeroPadShortcut, x: torch.Tensor) -> torch.Tensor:
    """Option A as the paper's PyTorch reproductions write it (the form used until 2026-12-03)."""
    if self.stride > 1:
        x = x[:, :, :: self.stride, :: self.stride]
    return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


FORMS = {"strided slice": slice_subsample, "avg_pool2d(kernel 1)": ZeroPadShortcut.forward}


def shortcut_ms(form, channels: int, size: int, repeats: int = 20) -> float:
    """Mean ms of forward + backward of one option-A shortcut (channels -> 2 x channels, stride 2)."""
    shortcut = ZeroPadShortcut(channels, 2 * channels, stride=2)
    x = torch.randn(BATCH, channels, size, size).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    total = 0.0
    for i in range(repeats + 3):
        start = time.perf_counter()
        out = form(shortcut, x)
        out.backward(torch.ones_like(out))
        if i >= 3:  # the first calls allocate
            total += time.perf_counter() - start
    return total / repeats * 1000


def paired_step_ms(rounds: int, steps_per_round: int = 3) -> dict[str, list[float]]:
    """ResNet-20 forward + backward ms per step for each form, interleaved round by round."""
    torch.manual_seed(0)
    model = create_model("resnet20").to(memory_format=torch.channels_last)
    x = torch.randn(BATCH, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH,))
    original = ZeroPadShortcut.forward

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {name: [] for name in FORMS}
    try:
        for name, form in FORMS.items():  # warm-up of both
            ZeroPadShortcut.forward = form
            step(), step()
        for _ in range(rounds):
            for name, form in FORMS.items():
                ZeroPadShortcut.forward = form
                start = time.perf_counter()
                for _ in range(steps_per_round):
                    step()
                times[name].append((time.perf_counter() - start) / steps_per_round * 1000)
    finally:
        ZeroPadShortcut.forward = original
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25, help="interleaved rounds of ResNet-20 steps")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"bf16, channels_last, batch {BATCH}, {args.threads} threads\n")
    print("| option-A shortcut, forward + backward | " + " | ".join(FORMS) + " |")
    print("|---|" + "---:|" * len(FORMS))
    for channels, size in ((16, 32), (32, 16)):
        row = [f"{shortcut_ms(form, channels, size):.2f} ms" for form in FORMS.values()]
        print(f"| {channels}->{2 * channels}, {size}x{size} | " + " | ".join(row) + " |")
    times = paired_step_ms(args.rounds)
    (slice_name, slice_times), (pool_name, pool_times) = times.items()
    print(f"\n| ResNet-20 step (forward + backward), {args.rounds} interleaved rounds | min ms | median ms |")
    print("|---|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {min(values):.1f} | {statistics.median(values):.1f} |")
    gains = [a - b for a, b in zip(slice_times, pool_times)]
    faster = sum(gain > 0 for gain in gains)
    print(f"\n{pool_name} faster in {faster} of {len(gains)} rounds; median paired gain "
          f"{statistics.median(gains):.1f} ms per step")


if __name__ == "__main__":
    main()
