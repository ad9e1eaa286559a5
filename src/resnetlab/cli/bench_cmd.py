"""`resnetlab bench train --model M [--batch 128] [--steps N] [--precision ...] [--baseline] [--json]`:
steady-state training throughput, FLOPs per image, measured matmul peak, MFU and peak memory; with
--baseline also the standard PyTorch recipe, measured in the same invocation, and the speed-up."""
from __future__ import annotations

import argparse
import json

from resnetlab.bench.train_bench import PRECISIONS
from resnetlab.cli.compile_flags import add_compile_flags, compile_settings


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="measure training throughput and MFU",
                                   description="Benchmarks of this machine.")
    kinds = parser.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    train = kinds.add_parser(
        "train", help="steady-state training throughput, MFU and memory of one model",
        description="Time training steps after a warm-up, augmentation included, on synthetic uint8 data. "
                    "MFU = images/s x training FLOPs per image (flop_counter) / the matmul peak measured "
                    "in the same run for the same dtype.")
    train.add_argument("--model", default="resnet20", help="a registered model name (default: resnet20)")
    train.add_argument("--batch", type=_positive, default=128, help="batch size (default: 128)")
    train.add_argument("--steps", type=_positive, default=60,
                       help="timed steps, in 3 windows; the fastest window is reported (default: 60)")
    train.add_argument("--warmup-steps", type=_non_negative, default=10,
                       help="untimed steps first: kernel selection, torch.compile (default: 10)")
    train.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="auto: bf16 where the CPU/GPU computes it natively, else fp32 (default: auto)")
    train.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="NHWC memory format (default: what `resnetlab train` uses on this device)")
    add_compile_flags(train, " (compile time is reported separately)")
    train.add_argument("--fused-bn", action=argparse.BooleanOptionalAction, default=None,
                       help="the fused BN + ReLU CPU kernel (default: what `resnetlab train` uses here)")
    train.add_argument("--winograd", action=argparse.BooleanOptionalAction, default=None,
                       help="Winograd F(2x2, 3x3) for the stride-1 3x3 convolutions with the fused kernels "
                            "(runtime.conv_winograd; default: what `resnetlab train` uses here)")
    train.add_argument("--baseline", action="store_true",
                       help="also measure the standard recipe (fp32, NCHW, per-sample transforms in a "
                            "DataLoader with 2 workers, eager) and print the speed-up")
    train.add_argument("--baseline-workers", type=_non_negative, default=2,
                       help="DataLoader worker processes of the baseline (default: 2)")
    train.add_argument("--retry-seconds", type=float, default=60.0,
                       help="time to spend re-running windows during which other processes were busy "
                            "(0: never; default: 60)")
    train.add_argument("--threads", type=_positive, default=None,
                       help="torch intra-op threads (default: torch's, one per core)")
    train.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    train.add_argument("--json", action="store_true", help="print the results as JSON")
    train.set_defaults(func=run_train)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def run_train(args: argparse.Namespace) -> int:
    from resnetlab.bench.report import compare
    from resnetlab.bench.train_bench import BenchConfig

    compiling, compile_mode = compile_settings(args.compile)
    cfg = BenchConfig(model=args.model, batch_size=args.batch, steps=args.steps, warmup_steps=args.warmup_steps,
                      precision=args.precision, channels_last=args.channels_last,
                      compile="auto" if compiling is None else compiling, compile_mode=compile_mode or "auto",
                      fused_bn=args.fused_bn, winograd=args.winograd, device=args.device, threads=args.threads,
                      retry_seconds=args.retry_seconds)
    report = compare(cfg, baseline=args.baseline, baseline_workers=args.baseline_workers)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print(report.text())
    return 0
