"""Where a training step's time goes: torch.profiler over a few engine steps, the operators
grouped into what they do (convolution forward/backward, batch norm, ReLU, additions, optimizer,
data). Profiling adds overhead, so the shares matter more than the absolute milliseconds."""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.profiler import profile

from resnetlab.bench.train_bench import BenchConfig, default_num_images, synthetic_data

# operator name -> group; anything else is "other" (autograd bookkeeping, casts, allocation...)
GROUPS = {
    "aten::mkldnn_convolution": "convolution forward",
    "aten::convolution_backward": "convolution backward",
    # resnetlab.kernels.conv3x3: the forward's oneDNN call is aten::mkldnn_convolution above; the
    # backward's self time is the weight-gradient kernel (its input gradient is aten's, above)
    "_Conv3x3": "convolution forward",
    "_Conv3x3Backward": "convolution backward",
    "aten::native_batch_norm": "batch norm forward",
    "aten::native_batch_norm_backward": "batch norm backward",
    "_BatchNormReLU": "fused batch norm + ReLU (+ shortcut addition) forward",  # resnetlab.kernels
    "_BatchNormReLUBackward": "fused batch norm + ReLU (+ shortcut addition) backward",
    "aten::clamp_min_": "ReLU forward",
    "aten::relu_": "ReLU forward",
    "aten::threshold_backward": "ReLU backward",
    "aten::add": "additions (shortcuts, gradient accumulation)",
    "aten::add_": "additions (shortcuts, gradient accumulation)",
    "aten::avg_pool2d": "pooling (option-A subsampling, global average)",
    "aten::avg_pool2d_backward": "pooling (option-A subsampling, global average)",
    "aten::constant_pad_nd": "zero padding and fills (option-A channels, pooling gradients)",
    "aten::fill_": "zero padding and fills (option-A channels, pooling gradients)",
    "aten::take": "data (index, normalise, crop/flip)",
    "aten::index": "data (index, normalise, crop/flip)",
    "aten::sub_": "data (index, normalise, crop/flip)",
}


def step_breakdown(cfg: BenchConfig, steps: int = 10, warmup: int = 8) -> list[tuple[str, float]]:
    """[(group, ms per step)] from the operators' self CPU time, largest first; the optimizer
    step is its own group (its record_function scope)."""
    from resnetlab.bench.engine_step import EngineStepper, bench_run_config
    from resnetlab.models import model_info

    config = bench_run_config(cfg)
    info = model_info(cfg.model)
    size = cfg.image_size or info["input_size"][-1]
    images, labels = synthetic_data(cfg.num_images or default_num_images(size, cfg.batch_size), size)
    stepper = EngineStepper(config, images, labels, info["num_classes"])
    for _ in range(warmup):
        stepper.step()
    with profile() as prof:
        for _ in range(steps):
            stepper.step()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("Optimizer.step"):
            totals["optimizer step"] += event.cpu_time_total  # inclusive: its ops are not counted below
            continue
        if event.key.startswith(("Optimizer.", "ProfilerStep")):
            continue
        totals[GROUPS.get(event.key, "other")] += event.self_cpu_time_total
    optimizer_ops = sum(e.self_cpu_time_total for e in prof.events() if _inside_optimizer(e))
    totals["other"] -= optimizer_ops  # already in "optimizer step"
    return sorted(((name, us / steps / 1000) for name, us in totals.items()), key=lambda item: -item[1])


def _inside_optimizer(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return GROUPS.get(event.name, "other") == "other"
        parent = parent.cpu_parent
    return False


# (what, in channels, out channels, input side, stride): the distinct 3x3 convolutions of the CIFAR ResNets
CIFAR_CONVS = (("stem", 3, 16, 32, 1), ("stage 1", 16, 16, 32, 1), ("stage 2, first (stride 2)", 16, 32, 32, 2),
               ("stage 2", 32, 32, 16, 1), ("stage 3, first (stride 2)", 32, 64, 16, 2), ("stage 3", 64, 64, 8, 1))


def conv_rates(batch: int = 128, precision: str = "bf16", channels_last: bool = True,
               repeats: int = 5, calls: int = 10) -> list[dict]:
    """GFLOP/s of each CIFAR ResNet convolution alone, forward and backward (input and weight
    gradients; the stem needs no input gradient), best of `repeats` x `calls`; as the engine runs
    them: fp32 weights, autocast for bf16, and in bf16 channels_last resnetlab's kernels where they
    apply, Winograd's included (resnetlab.kernels.conv3x3; its GFLOP/s count the direct form's
    multiply-adds, as MFU does)."""
    import contextlib
    import time

    from torch import nn

    from resnetlab.kernels import conv3x3_train, conv_winograd, fused_bn_relu, load_conv_winograd_extension

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    rows = []
    for name, cin, cout, side, stride in CIFAR_CONVS:
        x = torch.randn(batch, cin, side, side, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(cin != 3)
        conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False).to(memory_format=fmt)

        def context():
            if dtype is torch.float32:
                return contextlib.nullcontext()
            stack = contextlib.ExitStack()
            stack.enter_context(torch.autocast("cpu", dtype=dtype))
            stack.enter_context(fused_bn_relu())
            stack.enter_context(conv_winograd(load_conv_winograd_extension() is not None))  # runtime.conv_winograd auto
            return stack

        def forward():
            with context():
                return conv3x3_train(conv, x)

        out = forward()
        grad = torch.randn_like(out)
        wanted = (x, conv.weight) if x.requires_grad else (conv.weight,)
        macs = out.numel() * cin * 9

        def backward():
            torch.autograd.grad(out, wanted, grad, retain_graph=True)

        row = {"conv": f"{name}: {cin}->{cout}, {side}x{side}", "batch": batch}
        for label, fn, flops in (("forward", forward, 2 * macs), ("backward", backward, 2 * macs * len(wanted))):
            for _ in range(3):
                fn()
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                best = min(best, (time.perf_counter() - start) / calls)
            row[f"{label} ms"] = best * 1000
            row[f"{label} GFLOP/s"] = flops / best / 1e9
        rows.append(row)
    return rows


def conv_rates_markdown(rows: list[dict]) -> str:
    batch = rows[0]["batch"] if rows else "?"
    lines = [f"| convolution (batch {batch}) | forward ms | forward GFLOP/s | backward ms | backward GFLOP/s |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['conv']} | {r['forward ms']:.2f} | {r['forward GFLOP/s']:.0f} | {r['backward ms']:.2f} | "
              f"{r['backward GFLOP/s']:.0f} |" for r in rows]
    return "\n".join(lines)


def to_markdown(rows: list[tuple[str, float]]) -> str:
    total = sum(ms for _, ms in rows) or 1.0
    lines = ["| part of the step | ms per step | share |", "|---|---:|---:|"]
    lines += [f"| {name} | {ms:.1f} | {100 * ms / total:.0f}% |" for name, ms in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    torch.manual_seed(0)
    print(to_markdown(step_breakdown(BenchConfig())))
    print()
    print(conv_rates_markdown(conv_rates()))
