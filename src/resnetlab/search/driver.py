"""`run_search`: one or all methods at the same trial budget into an output directory, then the
leaderboard, the plots and the best configuration as a recipe file."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from resnetlab.config import RunConfig
from resnetlab.errors import ConfigError
from resnetlab.search.genetic import GASettings, run_genetic
from resnetlab.search.leaderboard import best_row, trial_rows, write_best_recipe, write_csv, write_markdown
from resnetlab.search.optuna_search import METHODS, StudySpec, run_optuna, storage_url
from resnetlab.search.plots import plot_comparison, plot_ga_fitness, plot_optuna
from resnetlab.search.space import SearchSpace


@dataclass(frozen=True)
class SearchRequest:
    methods: tuple[str, ...]  # a subset of METHODS
    base: RunConfig  # every trial's config before the searched values (out unset)
    space: SearchSpace
    out: Path
    trials: int | None = None  # per method; None: what the GA's population x generations spends
    ga: GASettings = field(default_factory=GASettings)
    storage: str | None = None  # None: sqlite in `out`
    workers: int = 1
    pruner: str = "median"
    seed: int = 0
    study_prefix: str = "resnetlab"


@dataclass(frozen=True)
class SearchReport:
    out: Path
    rows: dict[str, list[dict]]
    best: dict | None
    best_config: RunConfig | None
    files: list[Path]


def ga_trials(settings: GASettings) -> int:
    """Evaluations the GA spends: all of generation 0, then the non-surviving members each generation."""
    return settings.population + (settings.generations - 1) * (settings.population - settings.population // 2)


def ga_settings_for(settings: GASettings, trials: int) -> GASettings:
    """As many generations as `trials` evaluations need, so that the GA spends the same budget as
    the other methods (the last generation may be cut short)."""
    from dataclasses import replace

    keep = settings.population // 2
    needed = 1 + max(0, -(-(trials - settings.population) // (settings.population - keep)))
    return replace(settings, generations=needed)


def run_search(request: SearchRequest, log=print) -> SearchReport:
    if request.base.data.val_size == 0:
        raise ConfigError("search scores trials on the validation split; set --val-size > 0")
    out = Path(request.out)
    out.mkdir(parents=True, exist_ok=True)
    trials = request.trials or ga_trials(request.ga)
    url = storage_url(out, request.storage)
    studies = {}
    for method in request.methods:
        spec = StudySpec(url, f"{request.study_prefix}-{method}", method, request.base.to_dict(), request.space,
                         str(out), request.seed, request.pruner if method != "ga" else "none")
        log(f"{method}: study {spec.name} in {url}, {trials} trials of {request.base.train.epochs} epoch(s)")
        if method == "ga":
            settings = ga_settings_for(request.ga, trials)
            studies[method] = run_genetic(spec, settings, max_trials=trials, workers=request.workers, log=log)
        else:
            studies[method] = run_optuna(spec, trials, request.workers)
    return write_report(request, studies, log, trials)


def write_report(request: SearchRequest, studies: dict, log=print, trials: int | None = None) -> SearchReport:
    """Reports over the first `trials` spent trials of each study: parallel workers may finish up to
    K-1 more than asked, which the comparison at equal budget leaves out."""
    out, keys = Path(request.out), request.space.keys
    rows = {m: sorted(trial_rows(m, s, keys), key=lambda r: r["trial"])[:trials] for m, s in studies.items()}
    files = [out / "leaderboard.md", out / "leaderboard.csv"]
    title = f"Search: {request.base.model.name}, {request.base.train.epochs} epoch(s) per trial"
    write_markdown(rows, keys, files[0], title)
    write_csv([r for rs in rows.values() for r in rs], keys, files[1])
    if "ga" in rows:
        files.append(out / "ga_fitness.png")
        plot_ga_fitness(rows["ga"], files[-1])
    for method, study in studies.items():
        files += plot_optuna(study, out / method)
    if len(rows) > 1:
        files.append(out / "comparison.png")
        plot_comparison(rows, files[-1])
    best = best_row(rows)
    best_config = None
    if best is not None:
        files.append(out / "best_recipe.yaml")
        best_config = write_best_recipe(request.base, best, keys, files[-1])
        log(f"best: {best['method']} trial {best['trial']} val accuracy {best['val_accuracy']:.4f} "
            + " ".join(f"{k}={best[k]:.4g}" for k in keys))
    return SearchReport(out, rows, best, best_config, files)
