"""Where a training step's host time goes, for a recipe as `resnetlab train` runs it.

On an H200 a CUDA-graph ResNet-20 step of fast-cifar (batch 64) took about 5 ms in training against
4.3 ms for `bench train`'s batch-128 step of the paper recipe (benchmarks/RESULTS-cuda.md): the
graphs replay the forward and backward passes, so what is left is host work around them
(augmentation, loss, optimizer, EMA, meters). This prints the step time and the operators with the
most self CPU time, and on CUDA the kernel and graph launches per step, for the next lent GPU:

    python benchmarks/profile_step.py [--recipe fast-cifar] [--batch 64] [--device cuda]
                                      [--compile reduce-overhead] [--accum-steps 1] [--steps 30]

Synthetic CIFAR-sized data; `PYTHONPATH=src` or an installed resnetlab.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from resnetlab.bench.engine_step import EngineStepper
from resnetlab.bench.train_bench import synthetic_data
from resnetlab.config import build_config
from resnetlab.engine.setup import resolved_config

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")


def stepper_for(args: argparse.Namespace) -> EngineStepper:
    overrides = [f"model.name={args.model}", f"train.batch_size={args.batch}", "train.drop_last=true",
                 f"train.accum_steps={args.accum_steps}", f"runtime.device={args.device}"]
    if args.compile == "none":
        overrides.append("runtime.compile=false")
    elif args.compile != "auto":
        overrides += ["runtime.compile=true", f"runtime.compile_mode={args.compile}"]
    config = resolved_config(build_config(args.recipe, overrides=overrides))
    images, labels = synthetic_data(50_000, 32)
    return EngineStepper(config, images, labels, 10)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="fast-cifar")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", default="auto", help="auto (the default's choice), none, or a torch.compile mode")
    parser.add_argument("--accum-steps", type=int, default=1, help="micro-batches per step (gradient accumulation)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=20)
    args = parser.parse_args()

    stepper = stepper_for(args)
    runtime = stepper.trainer.runtime
    for _ in range(args.warmup_steps):  # compile, CUDA-graph recording, allocator growth
        stepper.step()
    synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        stepper.step()
    synchronize()
    step_ms = (time.perf_counter() - start) / args.steps * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runtime.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            stepper.step()
        synchronize()
    events = prof.key_averages()
    accum = f" in {args.accum_steps} micro-batches" if args.accum_steps > 1 else ""
    print(f"{args.recipe}, {args.model}, batch {args.batch}{accum}: {runtime.describe()}")
    print(f"{step_ms:.2f} ms per step ({args.batch / step_ms * 1e3:,.0f} images/s) unprofiled, mean of {args.steps}")
    launches = {e.key: e.count / args.steps for e in events if e.key in LAUNCHES}
    if launches:
        print("launches per step: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(launches.items())))
    print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
