"""The 3x3 convolutions: resnetlab's CPU kernels (kernels/conv_fwd.cpp for the forward pass and the
input gradient, kernels/conv_winograd.cpp for the same by Winograd F(2x2, 3x3) at stride 1,
kernels/conv_wgrad.cpp for the weight gradient, kernels/conv_winograd_wgrad.cpp for the same by
Winograd at stride 1, used from 32 channels) against oneDNN's, per ResNet-20 layer shape, then whole
ResNet-20 training steps (the engine's, as `bench train` runs them) with all kernels, with Winograd
for the forward passes and input gradients only, with the direct kernels only (no Winograd), with
oneDNN's forward pass and input gradient, and with oneDNN only, interleaved round by round so that a machine whose speed drifts affects all alike. Winograd's
GFLOP/s count the direct form's multiply-adds and its times include the weight transform.

    python benchmarks/bench_conv3x3.py [--rounds 16] [--batch 128]

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
from resnetlab.kernels import load_conv_fwd_extension, load_conv_wgrad_extension, load_conv_winograd_extension
from resnetlab.kernels.build import load_conv_winograd_wgrad_extension

# ResNet-20's 3x3 convolutions with 16k channels: (in, out, input size, stride, layers per net)
LAYERS = ((16, 16, 32, 1, 6), (16, 32, 32, 2, 1), (32, 32, 16, 1, 5), (32, 64, 16, 2, 1), (64, 64, 8, 1, 5))
STEP_FORMS = ("kernels", "Winograd forward and input gradient only", "direct kernels (no Winograd)", "oneDNN forward and input gradient", "oneDNN only")


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
    """Per layer shape and pass (forward, input gradient, weight gradient): oneDNN's, the direct
    kernel's and, for the stride-1 layers, Winograd's median ms (its weight gradient is used from
    WINOGRAD_WGRAD_MIN_CHANNELS channels only)."""
    forward_kernel, wgrad_kernel = load_conv_fwd_extension(), load_conv_wgrad_extension()
    winograd, winograd_wgrad = load_conv_winograd_extension(), load_conv_winograd_wgrad_extension()
    rows = []
    for cin, cout, size, stride, count in LAYERS:
        out_size = (size - 1) // stride + 1
        x = torch.randn(batch, cin, size, size).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        w = torch.randn(cout, cin, 3, 3).to(torch.bfloat16)
        dy = torch.randn(batch, cout, out_size, out_size).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        conv_args = (None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1)
        passes = {
            "forward": (lambda: torch.ops.aten.convolution(x, w, *conv_args),
                        lambda: forward_kernel.convolution(x, w, stride, False)),
            "input gradient": (lambda: torch.ops.aten.convolution_backward(dy, x, w, *conv_args, [True, False, False]),
                               (lambda: forward_kernel.convolution(dy, w, 1, True)) if stride == 1 else
                               (lambda: forward_kernel.input_grad_stride2(dy, w, size, size))),
            "weight gradient": (lambda: torch.ops.aten.convolution_backward(dy, x, w, *conv_args, [False, True, False]),
                                lambda: wgrad_kernel.weight_grad(dy, x, stride)),
        }
        winograd_passes = {
            "forward": lambda: winograd.winograd(x, winograd.winograd_weights(w, False), cout),
            "input gradient": lambda: winograd.winograd(dy, winograd.winograd_weights(w, True), cin),
            "weight gradient": lambda: winograd_wgrad.winograd_weight_grad(dy, x),
        } if stride == 1 and winograd is not None and winograd_wgrad is not None else {}
        gflop = 2 * batch * cout * cin * 9 * out_size * out_size / 1e9
        for name, (onednn, kernel) in passes.items():
            onednn_ms = median_ms(onednn, repeats)
            kernel_ms = median_ms(kernel, repeats)
            winograd_ms = median_ms(winograd_passes[name], repeats) if name in winograd_passes else None
            rows.append({"layer": f"{cin}->{cout}, {size}x{size}, stride {stride}", "pass": name, "count": count,
                         "onednn_ms": onednn_ms, "kernel_ms": kernel_ms, "onednn_gflops": gflop / onednn_ms * 1e3,
                         "kernel_gflops": gflop / kernel_ms * 1e3, "winograd_ms": winograd_ms,
                         "winograd_gflops": gflop / winograd_ms * 1e3 if winograd_ms else None})
    return rows


def _use(form: str) -> None:
    conv3x3_module.FORWARD_KERNEL = form in STEP_FORMS[:3]
    conv3x3_module.winograd_applies = _shipped_winograd_applies if form in STEP_FORMS[:2] else (lambda *args: False)
    conv3x3_module.WINOGRAD_WGRAD_MIN_CHANNELS = _SHIPPED_WGRAD_MIN_CHANNELS if form == "kernels" else 10**9
    conv3x3_module.kernel_applies = _shipped_applies if form != "oneDNN only" else (lambda conv, x: False)


_shipped_applies = conv3x3_module.kernel_applies
_shipped_winograd_applies = conv3x3_module.winograd_applies
_SHIPPED_WGRAD_MIN_CHANNELS = conv3x3_module.WINOGRAD_WGRAD_MIN_CHANNELS


def paired_step_ms(rounds: int, batch: int, steps_per_round: int = 4) -> dict[str, list[float]]:
    """Engine training steps of the paper's recipe (ResNet-20, the CPU defaults) in each of
    STEP_FORMS, interleaved (the order rotating round by round)."""
    config = resolved_config(build_config("he2016-cifar", overrides=[f"train.batch_size={batch}",
                                                                     "train.drop_last=true"]))
    images, labels = synthetic_data(20 * batch, 32)
    stepper = EngineStepper(config, images, labels, 10)
    times: dict[str, list[float]] = {form: [] for form in STEP_FORMS}
    try:
        for form in (*STEP_FORMS, *STEP_FORMS):  # warm-up of all
            _use(form)
            for _ in range(2):
                stepper.step()
        for r in range(rounds):
            shift = r % len(STEP_FORMS)
            for form in STEP_FORMS[shift:] + STEP_FORMS[:shift]:
                _use(form)
                stepper.step()  # the first step after a switch allocates differently
                start = time.perf_counter()
                for _ in range(steps_per_round):
                    stepper.step()
                times[form].append((time.perf_counter() - start) / steps_per_round * 1e3)
    finally:
        _use("kernels")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    if load_conv_fwd_extension() is None or load_conv_wgrad_extension() is None:
        sys.exit("bench_conv3x3: the kernels are not available here (need AVX-512 BF16 and a C++ compiler)")
    print(f"bf16, channels_last, batch {args.batch}, {torch.get_num_threads()} threads\n")
    print("| 3x3 layer | per net | pass | oneDNN ms (GFLOP/s) | kernel ms (GFLOP/s) | Winograd ms (GFLOP/s) |\n"
          "|---|---:|---|---:|---:|---:|")
    for row in layer_rows(args.batch):
        kernel = f"{row['kernel_ms']:.2f} ({row['kernel_gflops']:.0f})"
        winograd = f"{row['winograd_ms']:.2f} ({row['winograd_gflops']:.0f})" if row["winograd_ms"] else "-"
        print(f"| {row['layer']} | {row['count']} | {row['pass']} | {row['onednn_ms']:.2f} ({row['onednn_gflops']:.0f}) "
              f"| {kernel} | {winograd} |")
    print(f"\nWinograd's weight gradient is used from {_SHIPPED_WGRAD_MIN_CHANNELS} channels in and out.")
    times = paired_step_ms(args.rounds, args.batch)
    print(f"\n| ResNet-20 training step, {args.rounds} interleaved rounds | min ms | median ms |\n|---|---:|---:|")
    for form, values in times.items():
        print(f"| {form} | {min(values):.1f} | {statistics.median(values):.1f} |")
    print()
    for other in STEP_FORMS[1:]:
        gains = [b - a for a, b in zip(times["kernels"], times[other])]
        print(f"kernels against {other}: faster in {sum(g > 0 for g in gains)} of {len(gains)} rounds, "
              f"median paired gain {statistics.median(gains):.2f} ms per step")


if __name__ == "__main__":
    main()
