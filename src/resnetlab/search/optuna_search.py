"""Optuna studies: storage (SQLite in the output directory by default, or any RDB URL shared by
several machines), TPE/random sampling with pruning on per-epoch validation accuracy, and
parallel worker processes. Rerunning a search continues its study up to the requested trials."""
from __future__ import annotations

import multiprocessing
import warnings
from dataclasses import dataclass
from pathlib import Path

from resnetlab.config import RunConfig, validate_config
from resnetlab.errors import ConfigError
from resnetlab.search.objective import run_trial
from resnetlab.search.space import SearchSpace

METHODS = ("ga", "tpe", "random")
PRUNERS = ("median", "halving", "none")
# Trials that used their budget. A diverged run is COMPLETE with value 0 and an "error" attribute;
# FAIL means a crash or a user error (bad data...), which a rerun should not count.
SPENT_STATES = ("COMPLETE", "PRUNED")


@dataclass(frozen=True)
class StudySpec:
    """What a worker process needs to open the study and run trials (picklable)."""

    storage: str
    name: str
    method: str
    base: dict  # RunConfig as a dict
    space: SearchSpace
    out: str  # trial run directories go under out/trials/<study name>/
    seed: int = 0
    pruner: str = "median"


def storage_url(out: Path, storage: str | None) -> str:
    return storage or f"sqlite:///{(Path(out) / 'search.db').resolve()}"


def open_storage(url: str, heartbeat: bool = True):
    import optuna

    # A heartbeat lets a rerun mark the RUNNING trials of a killed process as failed (Study.optimize
    # only; the GA marks its own).
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning
            if heartbeat:
                return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=90)
            return optuna.storages.RDBStorage(url)
    except Exception as error:  # sqlalchemy's errors vary with the backend
        raise ConfigError(f"cannot open study storage {url}: {error}") from None


def make_sampler(method: str, seed: int):
    import optuna

    if method == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)
    if method in ("random", "ga"):  # the GA asks for enqueued values only
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"unknown search method {method!r}; choose from {', '.join(METHODS)}")


def make_pruner(name: str):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"unknown pruner {name!r}; choose from {', '.join(PRUNERS)}")


def open_study(spec: StudySpec, seed_offset: int = 0):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failing trial's error reaches the user anyway
    study = optuna.create_study(
        storage=open_storage(spec.storage, heartbeat=spec.method != "ga"), study_name=spec.name,
        direction="maximize", load_if_exists=True,
        sampler=make_sampler(spec.method, spec.seed + seed_offset), pruner=make_pruner(spec.pruner),
    )  # fmt: skip
    study.set_user_attr("method", spec.method)
    study.set_user_attr("space", spec.space.to_dict())
    return study


def spent(study) -> int:
    return sum(t.state.name in SPENT_STATES for t in study.get_trials(deepcopy=False))


def trial_dir(spec: StudySpec, number: int) -> Path:
    return Path(spec.out) / "trials" / spec.name / f"{number:04d}"


def objective(spec: StudySpec, base: RunConfig):
    import optuna

    def run(trial) -> float:
        params = spec.space.suggest(trial)

        def report(epoch: int, accuracy: float) -> None:
            trial.report(accuracy, epoch)
            trial.set_user_attr("epochs", epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch} at val accuracy {accuracy:.4f}")

        outcome = run_trial(base, params, trial_dir(spec, trial.number), report)
        trial.set_user_attr("epochs", outcome.epochs)
        if outcome.accuracy is None:
            trial.set_user_attr("error", outcome.error)
            return 0.0  # diverged: the worst score, so the sampler learns to avoid the region
        return outcome.accuracy

    return run


def _work(spec: StudySpec, n_trials: int, worker: int) -> None:
    """One worker: run trials until the study holds `n_trials` spent ones."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's ExperimentalWarning for heartbeats
        study = open_study(spec, seed_offset=worker)
        stop = MaxTrialsCallback(n_trials, states=tuple(TrialState[s] for s in SPENT_STATES))
        remaining = n_trials - spent(study)
        if remaining > 0:
            study.optimize(objective(spec, validate_config(spec.base)), n_trials=remaining, callbacks=[stop],
                           gc_after_trial=False)


def run_optuna(spec: StudySpec, n_trials: int, workers: int = 1):
    """Run TPE or random search until the study holds `n_trials` spent trials; `workers` > 1 runs
    them in that many processes sharing the storage. Returns the study."""
    if workers <= 1:
        _work(spec, n_trials, 0)
    else:
        context = multiprocessing.get_context("spawn")  # no forked torch/sqlite state
        procs = [context.Process(target=_work, args=(spec, n_trials, i)) for i in range(workers)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        if any(proc.exitcode != 0 for proc in procs):
            raise ConfigError(f"a search worker failed (exit codes {[p.exitcode for p in procs]}); rerun to continue")
    return open_study(spec)
