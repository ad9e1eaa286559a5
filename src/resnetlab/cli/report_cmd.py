"""`resnetlab report DIR...`: rebuild REPORT.md, runs.csv and plots from existing run directories
(an experiment directory made by `resnetlab reproduce`, or single run directories)."""
from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="rebuild a report from experiment or run directories",
        description="An experiment directory (with experiment.json) is reported as `reproduce` would; single run "
                    "directories are grouped by config (<config>/seed<N> layout, else model name).",
    )  # fmt: skip
    parser.add_argument("dirs", nargs="+", metavar="RUN_DIR", help="experiment directories or run directories")
    parser.add_argument("--out", metavar="DIR", help="where to write the report (default: the experiment directory "
                                                     "when one is given, required otherwise)")
    parser.add_argument("--experiment", help="compare with this experiment's references (for single run directories)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from resnetlab.experiments.runner import collect

    from resnetlab.experiments.report import write_report

    meta, rows, out, unfinished = collect([Path(d) for d in args.dirs], args.out, args.experiment)
    report = write_report(out, meta, rows, unfinished)
    print(f"{len(rows)} runs" + (f" ({len(unfinished)} unfinished, listed in the report)" if unfinished else "")
          + f"; report {report}")
    return 0
