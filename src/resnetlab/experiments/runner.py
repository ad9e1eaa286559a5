"""The sweep runner: every (config x seed) of an experiment, one at a time or K processes at a time,
resumable. A run whose directory holds summary.json is skipped, an interrupted one (a checkpoint
but no summary) is resumed by the engine, anything else starts afresh.

    OUT/experiment.json             the sweep's settings and its runs (what `resnetlab report OUT` reads)
    OUT/runs/<config>/seed<N>/      one engine run directory per (config, seed)
    OUT/REPORT.md, runs.csv, *.png  written by resnetlab.experiments.report
"""
from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

from resnetlab.artifacts.checkpoint import write_json_atomic
from resnetlab.artifacts.run_dir import RunDir, ensure_writable
from resnetlab.config import RunConfig, build_config
from resnetlab.errors import ConfigError, ResnetlabError
from resnetlab.experiments.aggregate import RunRow, read_run
from resnetlab.experiments.experiments import Experiment, ExperimentConfig, get_experiment

DEFAULT_RECIPE = "he2016-cifar"  # the paper's recipe; --epochs-scale shortens it
EXPERIMENT_FILE = "experiment.json"
# Compared between a planned run and an existing run directory; runtime and out may differ.
_COMPARED_SECTIONS = ("model", "data", "optim", "schedule", "bn", "train")
# What a run started but never checkpointed may hold; such a directory is cleared and started again.
_ENGINE_FILES = {"config.json", "env.json", "patch.diff", "metrics.jsonl", "metrics.csv", "curves.png", "checkpoints"}


@dataclass(frozen=True)
class Sweep:
    """What `resnetlab reproduce` was asked for."""

    experiment: str
    out: Path
    data_dir: str | None = None
    seeds: int = 2
    recipe: str = DEFAULT_RECIPE
    epochs_scale: float = 1.0
    overrides: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    jobs: int = 1

    def command(self) -> str:
        """The `resnetlab reproduce` command line that asks for this sweep (for the report)."""
        parts = ["resnetlab reproduce", self.experiment]
        if self.models:
            parts += ["--models", *self.models]
        parts += [f"--data-dir {self.data_dir}"] if self.data_dir else []
        parts += [f"--out {self.out}", f"--seeds {self.seeds}", f"--recipe {self.recipe}",
                  f"--epochs-scale {self.epochs_scale:g}", f"--jobs {self.jobs}"]
        parts += [f"--set {item}" for item in self.overrides]
        return " ".join(parts)


@dataclass(frozen=True)
class PlannedRun:
    config: ExperimentConfig
    seed: int
    run_dir: Path
    run_config: RunConfig


@dataclass
class SweepResult:
    rows: list[RunRow]
    failures: dict[str, str] = field(default_factory=dict)  # run dir -> one-line reason
    trained: int = 0
    resumed: int = 0
    skipped: int = 0


def scale_overrides(config: RunConfig, scale: float) -> list[str]:
    """`--set` items that shorten the schedule by `scale`: the budget (steps and/or epochs), the lr
    milestones and the warm-up, each in its own unit."""
    if scale <= 0:
        raise ConfigError(f"--epochs-scale must be > 0, got {scale}")
    if scale == 1:
        return []
    train, schedule = config.train, config.schedule
    items = [f"schedule.milestones={[m * scale for m in schedule.milestones]}"]
    if train.steps is not None:
        items.append(f"train.steps={max(1, round(train.steps * scale))}")
    if train.epochs is not None:
        items.append(f"train.epochs={train.epochs * scale}")
    warmup = schedule.warmup
    if warmup.kind in ("constant", "linear"):
        items.append(f"schedule.warmup.length={warmup.length * scale}")
    if warmup.kind == "until_error":
        items.append(f"schedule.warmup.cap_steps={max(1, round(warmup.cap_steps * scale))}")
    return items


def plan(sweep: Sweep) -> tuple[Experiment, list[PlannedRun]]:
    experiment = get_experiment(sweep.experiment)
    if sweep.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {sweep.seeds}")
    if sweep.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {sweep.jobs}")
    threads = [f"runtime.threads={max(1, (os.cpu_count() or 1) // sweep.jobs)}"] if sweep.jobs > 1 else []
    runs = []
    for spec in experiment.select(list(sweep.models)):
        base = build_config(sweep.recipe, overrides=spec.overrides, **{"model.name": spec.model})
        scaled = scale_overrides(base, sweep.epochs_scale)
        for seed in range(sweep.seeds):
            run_dir = sweep.out / "runs" / spec.name / f"seed{seed}"
            config = build_config(
                sweep.recipe, overrides=[*spec.overrides, *scaled, *threads, *sweep.overrides, f"train.seed={seed}"],
                **{"model.name": spec.model, "data.dir": sweep.data_dir, "out": str(run_dir)},
            )  # fmt: skip
            runs.append(PlannedRun(spec, seed, run_dir, config))
    return experiment, runs


def run_sweep(sweep: Sweep, log: Callable[[str], None] = print) -> SweepResult:
    """Run (or skip, or resume) every planned run; failures (e.g. divergence) are recorded and the
    sweep goes on. Returns the rows of the finished runs in plan order."""
    experiment, runs = plan(sweep)
    ensure_writable(sweep.out)
    states = [_prepare(run) for run in runs]  # refuses a changed config before anything is written
    write_experiment_file(sweep, experiment, runs)
    result = SweepResult(rows=[])
    todo = []
    for run, state in zip(runs, states):
        if state == "finished":
            result.skipped += 1
            log(f"{_label(run)}: finished earlier, skipped")
        else:
            todo.append((run, state == "resumable"))
    _execute_all(todo, sweep.jobs, result, log)
    for run in runs:
        if RunDir(run.run_dir).finished:
            result.rows.append(read_run(run.run_dir, experiment.name, run.config.name, run.config.group))
    return result


def _prepare(run: PlannedRun) -> str:
    """"finished", "resumable" or "new"; refuses a run directory made with another config."""
    existing = RunDir(run.run_dir)
    if existing.config.is_file():
        _check_same_config(run, json.loads(existing.config.read_text()))
    if existing.finished:
        return "finished"
    if existing.resumable:
        return "resumable"
    if existing.root.is_dir():
        foreign = sorted(p.name for p in existing.root.iterdir() if p.name not in _ENGINE_FILES)
        if foreign:
            raise ResnetlabError(f"{existing.root} holds files that are not a resnetlab run ({', '.join(foreign[:3])}); "
                                 "move them or use another --out (nothing was changed)")
    return "new"


def _check_same_config(run: PlannedRun, saved: dict) -> None:
    planned = run.run_config.to_dict()
    for section in _COMPARED_SECTIONS:
        if saved.get(section) != planned[section]:
            raise ResnetlabError(
                f"{run.run_dir} was trained with a different '{section}' config than this command asks for "
                f"(another --epochs-scale, --recipe or --set?); use another --out (nothing was changed)")


def _execute_all(todo: list[tuple[PlannedRun, bool]], jobs: int, result: SweepResult, log) -> None:
    for run, resume in todo:
        if not resume and run.run_dir.is_dir():
            shutil.rmtree(run.run_dir)  # started but never checkpointed: nothing in it can be resumed
    total = len(todo)
    if jobs == 1 or total <= 1:
        for index, (run, resume) in enumerate(todo, 1):
            log(f"[{index}/{total}] {_label(run)}: {'resuming' if resume else 'training'}")
            _record(run, resume, _execute(str(run.run_dir), run.run_config.to_dict(), resume, "lines"), result, log)
        return
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_execute, str(run.run_dir), run.run_config.to_dict(), resume, "none"): (run, resume)
                   for run, resume in todo}
        log(f"{total} runs, {jobs} at a time")
        for future in as_completed(futures):
            run, resume = futures[future]
            _record(run, resume, future.result(), result, log)


def _record(run: PlannedRun, resumed: bool, outcome: dict, result: SweepResult, log) -> None:
    if outcome["error"]:
        result.failures[str(run.run_dir)] = outcome["error"]
        log(f"{_label(run)}: FAILED: {outcome['error']}")
        return
    result.resumed += resumed
    result.trained += not resumed
    error = outcome["final_val_error"]
    shown = "n/a" if error is None else f"{error:.2%}"
    log(f"{_label(run)}: done, final val error {shown} ({outcome['seconds']:.0f} s)")


def _execute(run_dir: str, config: dict, resume: bool, progress: str) -> dict:
    """One run, in this process or a worker. User-level failures come back as text so one diverged
    run does not stop the sweep; an interrupt (Ctrl-C) propagates, its checkpoint saved."""
    from resnetlab.engine import train as engine

    started = time.perf_counter()
    try:
        if resume:
            outcome = engine.resume(run_dir, progress=progress)
        else:
            outcome = engine.train(config, progress=progress)
    except engine.TrainingInterrupted:
        raise
    except ResnetlabError as error:
        return {"error": str(error), "seconds": time.perf_counter() - started, "final_val_error": None}
    return {"error": None, "seconds": time.perf_counter() - started, "final_val_error": outcome.final_val_error}


def _label(run: PlannedRun) -> str:
    return f"{run.config.name} seed {run.seed}"


def write_experiment_file(sweep: Sweep, experiment: Experiment, runs: list[PlannedRun]) -> None:
    first = runs[0].run_config if runs else None
    write_json_atomic(sweep.out / EXPERIMENT_FILE, {
        "experiment": experiment.name, "title": experiment.title, "source": experiment.source,
        "note": experiment.note, "recipe": sweep.recipe, "epochs_scale": sweep.epochs_scale, "seeds": sweep.seeds,
        "overrides": list(sweep.overrides), "models": list(sweep.models), "data_dir": sweep.data_dir,
        "schedule": _schedule_text(first) if first else "", "command": sweep.command(),
        "runs": [{"config": r.config.name, "model": r.config.model, "group": r.config.group, "seed": r.seed,
                  "overrides": list(r.config.overrides), "note": r.config.note,
                  "run_dir": str(r.run_dir.relative_to(sweep.out))} for r in runs],
    })


def _schedule_text(config: RunConfig) -> str:
    train, schedule = config.train, config.schedule
    budget = " and ".join(filter(None, [f"{train.steps} steps" if train.steps else "",
                                        f"{train.epochs:g} epochs" if train.epochs else ""]))
    milestones = ", ".join(f"{m:g}" for m in schedule.milestones)
    decay = f"lr x{schedule.gamma:g} at {schedule.unit} {milestones}" if schedule.kind == "multistep" else schedule.kind
    return (f"{config.optim.name} lr {config.optim.lr:g}, batch {train.batch_size}, {decay}, "
            f"budget {budget} (whichever ends first)")


def collect(dirs: list[Path], out: str | Path | None, experiment: str | None = None
            ) -> tuple[dict, list[RunRow], Path, dict[str, str]]:
    """What `resnetlab report` reports: (meta, rows, output folder, unfinished runs) from experiment
    directories (their experiment.json decides the runs and names) and/or run directories (found
    recursively)."""
    metas, rows, unfinished = [], [], {}
    for folder in dirs:
        if (folder / EXPERIMENT_FILE).is_file():
            meta = json.loads((folder / EXPERIMENT_FILE).read_text())
            metas.append((folder, meta))
            for r in meta["runs"]:
                if RunDir(folder / r["run_dir"]).finished:
                    rows.append(read_run(folder / r["run_dir"], meta["experiment"], r["config"], r.get("group", "")))
                else:
                    unfinished[str(folder / r["run_dir"])] = "not finished (no summary.json); rerun reproduce to continue"
            continue
        found = [folder] if RunDir(folder).finished else sorted(p.parent for p in folder.rglob("summary.json"))
        if not found:
            raise ResnetlabError(f"{folder} holds no finished run (no summary.json) and no {EXPERIMENT_FILE}")
        rows += [_loose_row(run, experiment) for run in found]
    if len(metas) == 1 and len(dirs) == 1:
        folder, meta = metas[0]
        return meta, rows, Path(out) if out else folder, unfinished
    if out is None:
        raise ResnetlabError("--out DIR is required unless a single experiment directory is given")
    recipes = sorted({json.loads(RunDir(Path(r.run_dir)).config.read_text()).get("recipe") or "custom" for r in rows})
    meta = {"experiment": experiment or "", "title": "runs collected by resnetlab report", "recipe": ", ".join(recipes)}
    if experiment:
        exp = get_experiment(experiment)
        meta.update(title=exp.title, source=exp.source, note=exp.note)
    return meta, rows, Path(out), unfinished


def _loose_row(run_dir: Path, experiment: str | None) -> RunRow:
    row = read_run(run_dir, experiment or "")
    if experiment:
        exp = get_experiment(experiment)
        spec = next((c for c in exp.configs + exp.on_request if c.name == row.config), None)
        if spec is not None:
            return read_run(run_dir, experiment, spec.name, spec.group)
    return row
