"""One row per finished run (read back from its run directory) and per-config statistics over seeds:
mean, sample std, min and max of the final validation error, and the same of the best-on-validation
error, which is kept apart because choosing the best epoch on the validation split flatters it."""
from __future__ import annotations

import csv
import json
import math
import re
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from resnetlab.artifacts.run_dir import RunDir
from resnetlab.errors import ResnetlabError

RUNS_CSV_COLUMNS = ("experiment", "config", "model", "seed", "epochs", "final_train_error", "final_val_error",
                    "best_val_error", "wall_s")


@dataclass(frozen=True)
class RunRow:
    """A finished run; errors are fractions (0.0829 = 8.29%), None when the run had no validation split."""

    experiment: str
    config: str
    model: str
    seed: int
    epochs: int
    final_train_error: float | None
    final_val_error: float | None
    best_val_error: float | None
    wall_s: float
    run_dir: str = ""
    group: str = ""
    steps: int = 0


def read_run(run_dir: str | Path, experiment: str = "", config: str | None = None, group: str = "") -> RunRow:
    """The row of a finished run directory. Without `config` the name comes from the layout
    `<config>/seed<N>` the runner writes, else from the model name."""
    run = RunDir(Path(run_dir))
    if not run.summary.is_file():
        raise ResnetlabError(f"{run.root} holds no finished run (no summary.json)")
    summary = json.loads(run.summary.read_text())
    run_config = json.loads(run.config.read_text()) if run.config.is_file() else {}
    model = summary.get("model") or run_config.get("model", {}).get("name", "?")
    seed = run_config.get("train", {}).get("seed", 0)
    if config is None:
        config = run.root.parent.name if re.fullmatch(r"seed\d+", run.root.name) else model
    final, best = summary.get("final") or {}, summary.get("best") or {}
    return RunRow(experiment, config, model, int(seed), int(summary.get("epochs", 0)), final.get("train_top1_error"),
                  final.get("val_top1_error"), best.get("val_top1_error"), float(summary.get("wall_seconds", 0.0)),
                  str(run.root), group, int(summary.get("steps", 0)))


def write_runs_csv(rows: list[RunRow], path: Path) -> None:
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(RUNS_CSV_COLUMNS)
        for row in rows:
            values = asdict(row)
            writer.writerow([_csv_value(values[c]) for c in RUNS_CSV_COLUMNS])


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


@dataclass(frozen=True)
class Stats:
    n: int
    mean: float
    std: float  # sample standard deviation (n - 1); NaN for a single run
    min: float
    max: float

    @classmethod
    def of(cls, values) -> "Stats":
        values = [v for v in values if v is not None and math.isfinite(v)]
        if not values:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        return cls(len(values), statistics.fmean(values), std, min(values), max(values))


@dataclass(frozen=True)
class ConfigStats:
    config: str
    model: str
    group: str
    runs: int
    final_val: Stats
    best_val: Stats  # best-on-validation: optimistic, labelled as such wherever it is shown
    final_train: Stats
    epochs: float
    steps: float
    wall_s: float  # mean per run


def aggregate(rows: list[RunRow]) -> list[ConfigStats]:
    """Per-config statistics, configs in the order they first appear in `rows`."""
    by_config: dict[str, list[RunRow]] = {}
    for row in rows:
        by_config.setdefault(row.config, []).append(row)
    return [
        ConfigStats(name, runs[0].model, runs[0].group, len(runs), Stats.of(r.final_val_error for r in runs),
                    Stats.of(r.best_val_error for r in runs), Stats.of(r.final_train_error for r in runs),
                    statistics.fmean(r.epochs for r in runs), statistics.fmean(r.steps for r in runs),
                    statistics.fmean(r.wall_s for r in runs))
        for name, runs in by_config.items()
    ]
