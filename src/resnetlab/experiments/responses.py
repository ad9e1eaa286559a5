"""Layer responses (paper Fig. 7): the standard deviation of each 3x3 layer's output after its BN
and before the addition / ReLU, for trained plain and residual nets, on validation images.

A response is read with a forward hook on the BN that directly follows a 3x3 conv (the stem's and
both of each basic block's), in the network's order. The std is taken over all elements of the
response (images x channels x positions), in eval mode (running BN statistics). This reading holds
for the post-activation blocks the paper uses; a pre-activation net has no such BN and is refused."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from torch import nn

from resnetlab.artifacts.checkpoint import load
from resnetlab.artifacts.run_dir import RunDir
from resnetlab.errors import ResnetlabError
from resnetlab.experiments.aggregate import RunRow

MAX_IMAGES = 500


def response_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """(name, BN) of every BN that directly follows a 3x3 conv (convK -> bnK in the same module)."""
    layers = []
    for prefix, module in model.named_modules():
        for k in (1, 2, 3):
            conv, bn = getattr(module, f"conv{k}", None), getattr(module, f"bn{k}", None)
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and isinstance(bn, nn.BatchNorm2d):
                layers.append((f"{prefix}.bn{k}" if prefix else f"bn{k}", bn))
    if getattr(getattr(model, "cfg", None), "variant", None) == "preact":
        raise ResnetlabError("layer responses are defined for post-activation blocks; this model is pre-activation")
    return layers


@torch.no_grad()
def layer_responses(model: nn.Module, images: torch.Tensor, batch_size: int = 250) -> list[float]:
    """The std of each response layer's output over `images` (already normalised), in layer order."""
    layers = response_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    squares = torch.zeros(len(layers), dtype=torch.float64)
    counts = torch.zeros(len(layers), dtype=torch.float64)

    def hook(index):
        def record(module, inputs, output):
            values = output.detach().double()
            sums[index] += values.sum()
            squares[index] += values.square().sum()
            counts[index] += values.numel()
        return record

    handles = [bn.register_forward_hook(hook(i)) for i, (_, bn) in enumerate(layers)]
    try:
        model.eval()
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    mean = sums / counts
    return (squares / counts - mean.square()).clamp_min(0).sqrt().tolist()


def _validation_images(config: dict) -> torch.Tensor:
    """The first MAX_IMAGES validation images of the run's split, as uint8."""
    from resnetlab.data import load_dataset

    data = config["data"]
    splits = load_dataset(data["dir"], val_size=data["val_size"], split_seed=data["split_seed"],
                          skip_bad_images=data.get("skip_bad_images", False), download=False, need=("val",))
    if splits.val is None:
        raise ResnetlabError("layer responses need a validation split (data.val_size > 0)")
    return splits.val.images[:MAX_IMAGES]


def run_responses(run_dir: str | Path, cache: dict | None = None) -> list[float]:
    """Layer responses of the final model of a finished run."""
    from resnetlab.data import Normalizer

    run = RunDir(Path(run_dir))
    config = json.loads(run.config.read_text())
    key = (config["data"]["dir"], config["data"]["val_size"], config["data"]["split_seed"])
    cache = {} if cache is None else cache
    if key not in cache:
        cache[key] = _validation_images(config)
    model, metadata = load(run.last)
    normalizer = Normalizer.from_dict(metadata["normalization"])
    return layer_responses(model.float(), normalizer(cache[key]))


def write_responses(rows: list[RunRow], out: Path) -> list[str]:
    """responses.csv (config, seed, layer, std) and responses.png (mean over seeds); returns the
    REPORT.md section."""
    cache: dict = {}
    per_config: dict[str, list[list[float]]] = {}
    groups: dict[str, str] = {}
    with (out / "responses.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["config", "model", "seed", "layer", "std"])
        for row in rows:
            stds = run_responses(row.run_dir, cache)
            per_config.setdefault(row.config, []).append(stds)
            groups[row.config] = row.group
            writer.writerows([row.config, row.model, row.seed, i + 1, f"{s:.6g}"] for i, s in enumerate(stds))
    means = {c: [sum(v) / len(v) for v in zip(*runs)] for c, runs in per_config.items()}
    plot_responses(means, groups, out / "responses.png")
    lines = ["## Layer responses (paper Fig. 7)", "",
             f"Std of each 3x3 layer's response after BN, before the addition/ReLU, on up to {MAX_IMAGES} validation "
             "images, final models, mean over seeds; per layer in [responses.csv](responses.csv).", "",
             "| config | layers | mean std | max std |", "|---|---|---|---|"]
    lines += [f"| {c} | {len(m)} | {sum(m) / len(m):.3f} | {max(m):.3f} |" for c, m in means.items()]
    return lines + [""]


def plot_responses(means: dict[str, list[float]], groups: dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6))
    for k, (config, stds) in enumerate(means.items()):
        style = "--" if groups.get(config) == "plain" else "-"  # the paper draws plain nets dashed
        layers = range(1, len(stds) + 1)
        top.plot(layers, stds, style, color=f"C{k % 10}", label=config)
        bottom.plot(layers, sorted(stds, reverse=True), style, color=f"C{k % 10}", label=config)
    top.set(xlabel="layer index (original order)", ylabel="std", title="responses of the 3x3 layers")
    bottom.set(xlabel="layer index (sorted by magnitude)", ylabel="std")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
