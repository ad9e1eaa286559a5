"""What `resnetlab data inspect` reports: split sizes, per-class counts, image shape, train-split
mean/std, and a PNG grid of sample images per class."""
from __future__ import annotations

from pathlib import Path

from resnetlab.data.dataset import DataSplits, ImageSet
from resnetlab.data.normalize import compute_normalizer
from resnetlab.errors import DataError


def summarize(splits: DataSplits) -> dict:
    """The JSON object of `inspect --json`; splits that do not exist are left out. `mean`/`std` are
    per-channel statistics of the training split in [0, 1] pixel units."""
    present = splits.present()
    if not present:
        raise DataError("no splits loaded")
    summary = {
        "splits": {name: len(images) for name, images in present.items()},
        "num_classes": splits.num_classes,
        "classes": list(splits.classes),
        "per_class": {name: images.class_counts() for name, images in present.items()},
        "image_shape": list(next(iter(present.values())).image_shape),
        "source": splits.source,
    }
    reference = splits.train if splits.train is not None else next(iter(present.values()))
    stats = compute_normalizer(reference.images, mode="per_channel")
    summary["mean"] = [round(v, 6) for v in stats.mean.flatten().tolist()]
    summary["std"] = [round(v, 6) for v in stats.std.flatten().tolist()]
    if splits.skipped:
        summary["skipped"] = len(splits.skipped)
    return summary


def format_summary(summary: dict) -> str:
    """A human-readable table: one row per class, one column per split."""
    names = list(summary["splits"])
    width = max(12, *(len(c) for c in summary["classes"])) + 2
    shape = "x".join(str(v) for v in summary["image_shape"])
    lines = [
        f"source:      {summary['source']}",
        f"classes:     {summary['num_classes']}",
        f"image shape: {shape}",
        "mean (RGB, 0-1 units): " + " ".join(f"{v:.4f}" for v in summary["mean"]),
        "std  (RGB, 0-1 units): " + " ".join(f"{v:.4f}" for v in summary["std"]),
        "",
        "class".ljust(width) + "".join(name.rjust(9) for name in names),
    ]
    for cls in summary["classes"]:
        lines.append(cls.ljust(width) + "".join(str(summary["per_class"][n][cls]).rjust(9) for n in names))
    lines.append("total".ljust(width) + "".join(str(summary["splits"][n]).rjust(9) for n in names))
    return "\n".join(lines)


def save_grid(images: ImageSet, path: str | Path, per_class: int = 8, scale: int = 2) -> Path:
    """Write a PNG: one row per class (its name, then its first `per_class` images, enlarged)."""
    from PIL import Image, ImageDraw

    _, height, width = images.image_shape
    cell_h, cell_w, label_w, gap = height * scale, width * scale, 110, 2
    canvas = Image.new("RGB", (label_w + per_class * (cell_w + gap), len(images.classes) * (cell_h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, name in enumerate(images.classes):
        top = row * (cell_h + gap)
        draw.text((4, top + cell_h // 2 - 6), name[:18], fill="black")
        members = (images.labels == row).nonzero().squeeze(1)[:per_class]
        for col, index in enumerate(members.tolist()):
            pixels = images.images[index].permute(1, 2, 0).contiguous().numpy()
            tile = Image.fromarray(pixels).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (label_w + col * (cell_w + gap), top))
    path = Path(path)
    try:
        canvas.save(path, format="PNG")
    except (OSError, ValueError) as error:
        raise DataError(f"cannot write grid {path}: {error}") from None
    return path


__all__ = ["format_summary", "save_grid", "summarize"]
