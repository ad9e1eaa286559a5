"""The leaderboard of a search: every trial of every study as CSV rows, the best trials and a
method comparison (best validation accuracy against trials spent) as Markdown, and the best
configuration as a recipe file for `resnetlab train --recipe-file`."""
from __future__ import annotations

import csv
from pathlib import Path

import yaml

from resnetlab.config import RunConfig
from resnetlab.search.objective import trial_config
from resnetlab.search.optuna_search import SPENT_STATES

COLUMNS = ("method", "trial", "state", "val_accuracy", "epochs", "generation")


def trial_rows(method: str, study, keys: list[str]) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name not in SPENT_STATES:
            continue
        state = "diverged" if t.user_attrs.get("error") else t.state.name.lower()
        value = t.value if t.state.name == "COMPLETE" else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        rows.append({"method": method, "trial": t.number, "state": state, "val_accuracy": value,
                     "epochs": t.user_attrs.get("epochs"), "generation": t.user_attrs.get("generation"),
                     **{k: t.params.get(k) for k in keys}})
    return rows


def best_so_far(rows: list[dict]) -> list[float]:
    """Best val accuracy of completed trials after 1, 2, ... trials spent (pruned/diverged count as spent)."""
    best, curve = 0.0, []
    for row in sorted(rows, key=lambda r: r["trial"]):
        if row["state"] == "complete" and row["val_accuracy"] is not None:
            best = max(best, row["val_accuracy"])
        curve.append(best)
    return curve


def write_csv(rows: list[dict], keys: list[str], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, *keys])
        writer.writeheader()
        writer.writerows(rows)


def write_markdown(rows_by_method: dict[str, list[dict]], keys: list[str], path: Path, title: str,
                   top: int = 10) -> None:
    lines = [f"# {title}", ""]
    lines += ["| method | trials spent | completed | pruned | diverged | epochs trained | best val accuracy "
              "| found at trial |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method, rows in rows_by_method.items():
        curve = best_so_far(rows)
        count = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "diverged")}
        epochs = sum(r["epochs"] or 0 for r in rows)
        best = curve[-1] if curve else 0.0
        at = next((i + 1 for i, v in enumerate(curve) if v == best), 0) if best else "-"
        lines.append(f"| {method} | {len(rows)} | {count['complete']} | {count['pruned']} | {count['diverged']} "
                     f"| {epochs} "
                     f"| {best:.4f} | {at} |")
    everything = [r for rows in rows_by_method.values() for r in rows if r["state"] == "complete"]
    everything.sort(key=lambda r: -(r["val_accuracy"] or 0))
    lines += ["", f"## Top {min(top, len(everything))} trials", "",
              "| rank | method | trial | val accuracy | epochs | " + " | ".join(keys) + " |",
              "|---:|---|---:|---:|---:|" + "---:|" * len(keys)]
    for rank, r in enumerate(everything[:top], 1):
        values = " | ".join(f"{r[k]:.4g}" for k in keys)
        lines.append(f"| {rank} | {r['method']} | {r['trial']} | {r['val_accuracy']:.4f} | {r['epochs']} | {values} |")
    path.write_text("\n".join(lines) + "\n")


def best_row(rows_by_method: dict[str, list[dict]]) -> dict | None:
    done = [r for rows in rows_by_method.values() for r in rows if r["state"] == "complete"]
    return max(done, key=lambda r: r["val_accuracy"]) if done else None


def write_best_recipe(base: RunConfig, row: dict, keys: list[str], path: Path) -> RunConfig:
    """The best trial's full config (no run directory) as YAML that `--recipe-file` reads back."""
    config = trial_config(base, {k: row[k] for k in keys}, None)
    data = config.to_dict()
    data.pop("out")
    header = (f"# Best configuration of a resnetlab search: {row['method']} trial {row['trial']}, "
              f"val accuracy {row['val_accuracy']:.4f} after {row['epochs']} epoch(s).\n"
              f"# Use: resnetlab train --recipe-file {path.name} --out RUN_DIR [--epochs E for a longer run]\n")
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return config
