"""Search plots: GA fitness per generation, best validation accuracy against trials spent for each
method, and Optuna's optimisation history and parameter importances (matplotlib backend)."""
from __future__ import annotations

import warnings
from pathlib import Path

from resnetlab.search.leaderboard import best_so_far


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    return plt


def plot_ga_fitness(rows: list[dict], path: Path) -> None:
    """Each evaluated genome's fitness by generation, with the best so far."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    gens = sorted({r["generation"] for r in rows if r["generation"] is not None})
    best, best_line = 0.0, []
    for g in gens:
        scores = [r["val_accuracy"] or 0.0 for r in rows if r["generation"] == g]
        ax.scatter([g] * len(scores), scores, color="C0", alpha=0.6, s=18, label="genome" if g == gens[0] else None)
        best = max(best, *scores)
        best_line.append(best)
    ax.plot(gens, best_line, "-o", color="C3", label="best so far")
    ax.set(xlabel="generation", ylabel="fitness (val accuracy)", title="genetic algorithm (seed 004)")
    ax.set_xticks(gens)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_comparison(rows_by_method: dict[str, list[dict]], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, rows in rows_by_method.items():
        curve = best_so_far(rows)
        ax.step(range(1, len(curve) + 1), curve, where="post", label=method)
    ax.set(xlabel="trials spent", ylabel="best val accuracy", title="search methods at equal budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_optuna(study, prefix: Path) -> list[Path]:
    """<prefix>_history.png and, with enough completed trials, <prefix>_importance.png (PED-ANOVA:
    optuna's default fANOVA evaluator needs scikit-learn, which resnetlab does not depend on)."""
    import optuna
    from optuna.visualization import matplotlib as ovm

    plt = _pyplot()
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning
        written.append(_save_axes(plt, ovm.plot_optimization_history(study), prefix, "history", (7, 4.5)))
        complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
        if len(complete) >= 4:
            try:
                ax = ovm.plot_param_importances(study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
            except (ValueError, RuntimeError, ImportError):  # too few distinct trials to rank parameters
                return written
            written.append(_save_axes(plt, ax, prefix, "importance", (7, 3.5)))
    return written


def _save_axes(plt, ax, prefix: Path, suffix: str, size: tuple[float, float]) -> Path:
    """Save the figure of one of optuna's matplotlib plots as PREFIX_SUFFIX.png and close it."""
    path = prefix.with_name(f"{prefix.name}_{suffix}.png")
    ax.figure.set_size_inches(*size)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=110)
    plt.close(ax.figure)
    return path
