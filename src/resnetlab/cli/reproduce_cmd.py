"""`resnetlab reproduce EXPERIMENT`: run an experiment's (config x seed) sweep, then write its
REPORT.md, runs.csv and plots. Rerunning the same command skips finished runs and resumes
interrupted ones."""
from __future__ import annotations

import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    from resnetlab.experiments.experiments import EXPERIMENTS
    from resnetlab.experiments.runner import DEFAULT_RECIPE

    parser = subparsers.add_parser(
        "reproduce", help="rerun a table or figure of the paper / seeds and write an honest report",
        description="Train every config of EXPERIMENT once per seed into OUT/runs/<config>/seed<N>, then write "
                    "OUT/REPORT.md, OUT/runs.csv and plots. Rerun the same command to continue an interrupted sweep.",
    )  # fmt: skip
    parser.add_argument("experiment", choices=list(EXPERIMENTS), metavar="EXPERIMENT",
                        help="; ".join(f"{e.name}: {e.title}" for e in EXPERIMENTS.values()))
    parser.add_argument("--data-dir", help="CIFAR-10 data (python/binary batches or image folders)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the experiment directory")
    parser.add_argument("--seeds", type=int, default=2, help="runs per config, seeds 0..N-1 (default 2)")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"named recipe (default {DEFAULT_RECIPE}: the paper's)")
    parser.add_argument("--epochs-scale", type=float, default=1.0, metavar="F",
                        help="multiply the recipe's budget, lr milestones and warm-up by F (e.g. 0.1)")
    parser.add_argument("--jobs", type=int, default=1, metavar="K", help="runs trained at the same time (processes)")
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="only these models or config names (also runs on-request ones, e.g. resnet1202)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value in every run, e.g. --set data.limit_train=256")
    parser.set_defaults(func=run)


def run(args) -> int:
    from resnetlab.experiments.report import write_report
    from resnetlab.experiments.runner import Sweep, run_sweep
    from resnetlab.engine.train import TrainingInterrupted

    sweep = Sweep(args.experiment, Path(args.out), args.data_dir, args.seeds, args.recipe, args.epochs_scale,
                  tuple(args.overrides), tuple(args.models or ()), args.jobs)
    try:
        result = run_sweep(sweep, log=lambda line: print(line, flush=True))
    except TrainingInterrupted as stop:
        print(f"resnetlab: {stop}; rerun the same reproduce command to continue the sweep", file=sys.stderr)
        return 130
    import json

    meta = json.loads((sweep.out / "experiment.json").read_text())
    report = write_report(sweep.out, meta, result.rows, result.failures)
    print(f"{len(result.rows)} runs finished ({result.trained} trained, {result.resumed} resumed, {result.skipped} "
          f"skipped), {len(result.failures)} failed; report {report}")
    return 1 if result.failures else 0
