"""curves.png: training error dashed and validation error solid against iterations (as in the
paper's Fig. 6), and the losses, from the rows of metrics.jsonl."""
from __future__ import annotations

from pathlib import Path


def _series(rows: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if r.get("kind") == kind and r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plateau_decays(rows: list[dict]) -> list[tuple[int, float]]:
    """(step, new lr) of every decision of the plateau schedule, from the epoch rows."""
    return [(r["step"], r["lr_decayed_to"]) for r in rows if r.get("kind") == "epoch" and r.get("lr_decayed_to")]


def plot_curves(rows: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, (ax_err, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    steps, train_err = _series(rows, "epoch", "train_top1_error")
    ax_err.plot(steps, [100 * e for e in train_err], "--", color="C0", label="train (augmented batches)")
    steps, val_err = _series(rows, "epoch", "val_top1_error")
    ax_err.plot(steps, [100 * e for e in val_err], "-", color="C0", label="validation")
    ax_err.set(xlabel="iterations", ylabel="top-1 error (%)", title="error")
    if val_err or train_err:
        low = min([100 * e for e in val_err + train_err])
        ax_err.set_ylim(max(0.0, low - 5), min(100.0, max(100 * e for e in val_err + train_err) + 5))

    steps, step_loss = _series(rows, "step", "train_loss")
    ax_loss.plot(steps, step_loss, "-", color="C1", alpha=0.3, linewidth=0.8, label="train (every N steps)")
    steps, train_loss = _series(rows, "epoch", "train_loss")
    ax_loss.plot(steps, train_loss, "--", color="C1", label="train (epoch)")
    steps, val_loss = _series(rows, "epoch", "val_loss")
    ax_loss.plot(steps, val_loss, "-", color="C1", label="validation")
    ax_loss.set(xlabel="iterations", ylabel="cross-entropy", title="loss")
    for ax in (ax_err, ax_loss):
        for number, (step, lr) in enumerate(plateau_decays(rows)):  # where the plateau schedule cut the lr
            ax.axvline(step, color="grey", linestyle=":", linewidth=1,
                       label="lr decayed (plateau)" if number == 0 else None)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
