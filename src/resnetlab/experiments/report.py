"""REPORT.md, runs.csv and the plots of an experiment directory, from its finished runs: our
final-epoch numbers (mean ± std over seeds) next to the paper's and the seeds' reference values,
with the recipe, its scale and the data set stated so nobody mistakes a short run for the paper's."""
from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from pathlib import Path

from resnetlab.artifacts import metrics as metrics_io
from resnetlab.artifacts.run_dir import RunDir
from resnetlab.experiments.aggregate import ConfigStats, RunRow, Stats, aggregate, write_runs_csv

REFERENCES = Path(__file__).resolve().parent.parent / "reference" / "references.json"
PAPER_STEPS = 64000  # the paper's CIFAR budget (section 4.2)
SOURCE_COLUMNS = {"paper": "paper", "paper-mean": "paper (mean ± std)", "seed000": "seed 000", "seed001": "seed 001"}


@lru_cache(maxsize=1)
def load_references() -> dict:
    return json.loads(REFERENCES.read_text())


def references_for(experiment: str) -> dict[str, list[dict]]:
    return load_references()["experiments"].get(experiment, {})


def write_report(out: Path, meta: dict, rows: list[RunRow], failures: dict[str, str] | None = None) -> Path:
    """Write REPORT.md, runs.csv, errors.png and curves.png (and the responses of `responses`) into
    `out`; returns the path of REPORT.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_runs_csv(rows, out / "runs.csv")
    stats = aggregate(rows)
    plots = []
    if rows:
        plot_error_bars(stats, rows, references_for(meta.get("experiment", "")), out / "errors.png")
        plot_curves_by_config(rows, out / "curves.png", meta)
        plots += [("errors.png", "final validation error per config: mean ± std over seeds, dots = seeds, "
                   "crosses = references (test error of full-length training)"),
                  ("curves.png", _curves_caption(meta))]
    extra = []
    if meta.get("experiment") == "responses" and rows:
        from resnetlab.experiments.responses import write_responses

        extra = write_responses(rows, out)
        plots.append(("responses.png", "std of each 3x3 layer's response (after BN, before addition/ReLU), "
                      "top: in layer order, bottom: sorted by magnitude (paper Fig. 7)"))
    text = render(meta, rows, stats, failures or {}, plots, extra)
    (out / "REPORT.md").write_text(text)
    return out / "REPORT.md"


def _curves_caption(meta: dict) -> str:
    if meta.get("experiment") == "degradation":
        return ("training error (dashed) and validation error (solid) against iterations, mean over seeds; "
                "left plain nets, right ResNets (paper Fig. 6)")
    return "training error (dashed) and validation error (solid) against iterations, mean over seeds"


# --- REPORT.md --------------------------------------------------------------------------------------

def render(meta: dict, rows: list[RunRow], stats: list[ConfigStats], failures: dict[str, str], plots, extra) -> str:
    name = meta.get("experiment") or "custom"
    lines = [f"# {name}: {meta.get('title') or 'runs'}", ""]
    if meta.get("source"):
        lines += [f"Reproduces: {meta['source']}.", ""]
    if meta.get("note"):
        lines += [meta["note"], ""]
    lines += ["## How these numbers were made (read this before comparing)", ""]
    lines += [f"- {line}" for line in provenance(meta, rows)]
    lines += ["", "## Results", ""]
    lines += results_table(stats, references_for(name))
    lines += ["", "Errors are top-1 in percent. `final` = the model after the last epoch (what we compare); "
              "`best-on-val` = the lowest validation error over epochs, chosen on the same split it is measured on, "
              "so it is optimistic and shown only for completeness. ± is the sample standard deviation over seeds "
              "(n - 1); a config with one run has none.", ""]
    lines += reference_sources(name)
    if failures:
        lines += ["## Failed or unfinished runs (not in the table)", ""]
        lines += [f"- `{run}`: {reason}" for run, reason in failures.items()] + [""]
    if plots:
        lines += ["## Plots", ""]
        for path, caption in plots:
            lines += [f"![{caption}]({path})", "", f"*{caption}*", ""]
    lines += extra
    lines += ["## Runs", "", f"One row per run in [runs.csv](runs.csv) ({len(rows)} runs; errors there are fractions). "
              "Each run directory holds its resolved config, environment, metrics and curves.", ""]
    return "\n".join(lines)


def provenance(meta: dict, rows: list[RunRow]) -> list[str]:
    """The plain statements about recipe, scale, data and split that qualify every number."""
    items = []
    recipe, scale = meta.get("recipe") or "unknown", meta.get("epochs_scale")
    steps = sorted({r.steps for r in rows})
    steps_text = f"{steps[0]}" if len(steps) == 1 else (f"{steps[0]}-{steps[-1]}" if steps else "?")
    if scale is None:
        items.append(f"Recipe: {recipe}; runs collected from existing run directories ({steps_text} steps each).")
    elif scale == 1 and recipe.startswith("he2016-cifar") and not meta.get("overrides"):
        items.append(f"Recipe: {recipe}, the paper's schedule at full length (epochs-scale 1).")
    else:
        items.append(f"Recipe: {recipe} at epochs-scale {scale:g}: every run trained {steps_text} steps "
                     f"(the paper trains {PAPER_STEPS}). Absolute errors are not comparable to the paper's; "
                     "compare the configs with each other.")
    if meta.get("schedule"):
        items.append(f"Schedule of the first config: {meta['schedule']}.")
    if meta.get("overrides"):
        items.append("Extra settings (--set): " + ", ".join(f"`{o}`" for o in meta["overrides"]) + ".")
    if rows:
        items += _data_statements(rows)
        items += _machine_statements(meta, rows)
    seeds = sorted({r.seed for r in rows})
    items.append(f"Seeds: {', '.join(map(str, seeds)) or 'none'} (initialisation, batch order and augmentation; "
                 "the train/validation split is the same for all runs).")
    return items


def _data_statements(rows: list[RunRow]) -> list[str]:
    run = RunDir(Path(rows[0].run_dir))
    summary = json.loads(run.summary.read_text()) if run.summary.is_file() else {}
    config = json.loads(run.config.read_text()) if run.config.is_file() else {}
    data, data_cfg = summary.get("data") or {}, config.get("data") or {}
    source = data.get("source", "unknown")
    items = [f"Data: {source}; {data.get('train_images', '?')} training and {data.get('val_images', '?')} "
             "validation images."]
    if data_cfg.get("limit_train") or data_cfg.get("limit_val"):
        items.append("The training/validation sets are random subsets (data.limit_train / data.limit_val): "
                     "a test-scale run, the numbers say nothing about the paper's.")
    if re.search(r"\bjpe?g\b", source.lower()):
        items.append("This is a JPEG copy of CIFAR-10: compression artefacts make every error higher than on the "
                     "lossless original the paper and the seeds used.")
    else:
        items.append("The references were measured on the original, lossless CIFAR-10.")
    items.append("Our errors are on the validation split held out of the training set (never trained on, never "
                 "used for choosing the reported epoch); the references are test-set errors.")
    return items


def _machine_statements(meta: dict, rows: list[RunRow]) -> list[str]:
    """The command, and where the runs were made (the first run's env.json): the device and the
    numeric settings, so a reader knows what the wall times in runs.csv measure."""
    items = [f"Command: `{meta['command']}`."] if meta.get("command") else []
    try:
        env = json.loads((Path(rows[0].run_dir) / "env.json").read_text())
    except (OSError, ValueError):
        return items
    runtime = env.get("runtime") or {}
    device = runtime.get("device_name") or env.get("gpu") or env.get("cpu") or "unknown device"
    settings = [f"torch {env.get('torch', '?')}", f"{runtime.get('precision', '?')} precision"]
    if runtime.get("channels_last"):
        settings.append("channels_last")
    if runtime.get("compile"):
        mode = runtime.get("compile_mode") or "default"
        settings.append("torch.compile" + ("" if mode == "default" else f" ({mode})"))
    items.append(f"Trained on: {device} ({', '.join(settings)}); `wall_s` in runs.csv is each run's own wall "
                 "time, with the sweep's other runs sharing the machine when --jobs > 1.")
    return items


def results_table(stats: list[ConfigStats], references: dict[str, list[dict]]) -> list[str]:
    sources = [s for s in SOURCE_COLUMNS if any(r["source"] == s for c in stats for r in references.get(c.config, []))]
    head = ["config", "model", "runs", "steps", "final val error % (mean ± std)", "min", "max",
            "final train error %", "best-on-val error % (optimistic)"] + [SOURCE_COLUMNS[s] for s in sources]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in stats:
        refs = {r["source"]: r for r in references.get(c.config, [])}
        cells = [c.config, c.model, str(c.runs), f"{c.steps:.0f}", _mean_std(c.final_val), _pct(c.final_val.min),
                 _pct(c.final_val.max), _mean_std(c.final_train), _mean_std(c.best_val)]
        cells += [_reference(refs.get(s)) for s in sources]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def reference_sources(experiment: str) -> list[str]:
    refs = references_for(experiment)
    used = {r["source"] for entries in refs.values() for r in entries}
    if not used:
        return ["No reference numbers exist for this experiment on CIFAR-10.", ""]
    sources = load_references()["sources"]
    return ["Reference sources (from resnetlab/reference/references.json):", ""] + [
        f"- {SOURCE_COLUMNS[s]}: {sources[s]}" for s in SOURCE_COLUMNS if s in used] + [""]


def _pct(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _mean_std(stats: Stats) -> str:
    if stats.n == 0:
        return "–"
    return _pct(stats.mean) if stats.n == 1 else f"{_pct(stats.mean)} ± {_pct(stats.std)}"


def _reference(ref: dict | None) -> str:
    if ref is None:
        return "–"
    text = f"{ref['value']:g}" + (f" ± {ref['std']:g}" if "std" in ref else "")
    return text + (f" ({ref['note']})" if ref.get("note") else "")


# --- plots ------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_error_bars(stats: list[ConfigStats], rows: list[RunRow], references: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(stats) + 2), 4))
    for i, c in enumerate(stats):
        seeds = [100 * r.final_val_error for r in rows if r.config == c.config and r.final_val_error is not None]
        ax.scatter([i] * len(seeds), seeds, s=12, color="C0", alpha=0.6, zorder=3)
        if c.final_val.n:
            std = 0.0 if math.isnan(c.final_val.std) else 100 * c.final_val.std
            ax.errorbar([i], [100 * c.final_val.mean], yerr=[std], fmt="o", color="C0", capsize=5, zorder=4,
                        label="ours: final val error" if i == 0 else None)
        for j, source in enumerate(SOURCE_COLUMNS):
            ref = next((r for r in references.get(c.config, []) if r["source"] == source), None)
            if ref is not None:
                ax.scatter([i + 0.12 * (j + 1)], [ref["value"]], marker="x", color=f"C{j + 1}", zorder=4,
                           label=SOURCE_COLUMNS[source] if source not in ax.get_legend_handles_labels()[1] else None)
    ax.set_xticks(range(len(stats)), [c.config for c in stats], rotation=30, ha="right")
    ax.set(ylabel="top-1 error (%)", title="final validation error per config")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mean_curve(rows: list[RunRow], key: str) -> tuple[list[int], list[float]]:
    """The epoch-end values of `key` averaged over the runs, aligned by epoch (as far as all reach)."""
    series = []
    for row in rows:
        epochs = [r for r in metrics_io.read_metrics(RunDir(Path(row.run_dir)).metrics_jsonl)
                  if r.get("kind") == "epoch" and r.get(key) is not None]
        series.append(epochs)
    length = min((len(s) for s in series), default=0)
    steps = [series[0][i]["step"] for i in range(length)]
    values = [sum(s[i][key] for s in series) / len(series) for i in range(length)]
    return steps, values


def plot_curves_by_config(rows: list[RunRow], path: Path, meta: dict) -> None:
    plt = _pyplot()
    groups = list(dict.fromkeys(r.group or "runs" for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False, sharey=True)
    for ax, group in zip(axes[0], groups):
        configs = list(dict.fromkeys(r.config for r in rows if (r.group or "runs") == group))
        for k, config in enumerate(configs):
            runs = [r for r in rows if r.config == config]
            for key, style, marker, suffix in (("train_top1_error", "--", "x", " train"), ("val_top1_error", "-", "o", " val")):
                steps, values = mean_curve(runs, key)
                ax.plot(steps, [100 * v for v in values], style, color=f"C{k % 10}", label=config + suffix,
                        marker=marker if len(steps) < 3 else None)  # a lone point needs a marker to be seen
        ax.set(xlabel="iterations", ylabel="top-1 error (%)", title=group)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{meta.get('experiment') or 'runs'}: train dashed, validation solid (mean over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
