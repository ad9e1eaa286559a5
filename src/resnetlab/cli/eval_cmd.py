"""`resnetlab eval`: top-1/3/5 error, loss, per-class accuracy and a confusion matrix of a checkpoint
on one split of a data set, using the normalisation, classes and split recorded in the checkpoint."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

from resnetlab.errors import DataError, ResnetlabError

SPLITS = ("val", "test", "train")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a checkpoint, run directory or bundled model")
    parser.add_argument("checkpoint", metavar="CHECKPOINT|RUN_DIR|BUNDLED_NAME")
    parser.add_argument("--data-dir", required=True, type=Path, help="data set root (e.g. holding test/<class>/)")
    parser.add_argument("--split", choices=SPLITS, help="split to evaluate (default: test if the data has one, else val)")
    parser.add_argument(
        "--tta", choices=("none", "flip", "flip-shift", "10crop", "multiscale"), default="none",
        help="flip: average the logits of each image and its mirror; flip-shift: of 10 views (the image and "
             "its mirror, each also shifted by one pixel along the 4 diagonals, the border filled as --shift-padding); "
             "10crop / multiscale (imagenet-pipeline "
             "checkpoints): average the softmax of 4 corner + centre crops and their mirrors / of the whole image "
             "at each --scales side and its mirror (He et al. 2015, section 3.4)",
    )  # fmt: skip
    parser.add_argument(
        "--shift-padding", choices=("auto", "zeros", "reflect"), default="auto",
        help="flip-shift: fill of the shifted views' border (default auto: as the checkpoint's training crops were "
             "padded, its data.padding_mode; zeros for checkpoints that do not record it)",
    )  # fmt: skip
    parser.add_argument("--scales", type=_sides, default=None, metavar="S1,S2,...",
                        help="multiscale: shorter sides (default 224,256,384,480,640)")
    parser.add_argument("--workers", type=int, default=None,
                        help="imagenet pipeline: decoding processes (default min(8, cores))")
    parser.add_argument("--batch-size", type=int, default=512, help="images per batch (10crop: crops per batch)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
        help="autocast of the forward pass (default fp32; a run's own precision reproduces its logged numbers)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print only the JSON summary on stdout")
    parser.add_argument("--confusion", type=Path, metavar="FILE.png", help="confusion-matrix PNG (default: in the run directory)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from resnetlab.artifacts.checkpoint import load, resolve_checkpoint_path
    from resnetlab.engine.runtime import resolve_device
    from resnetlab.evaluate import evaluate
    from resnetlab.inference import class_names, normalizer_from_metadata

    if args.batch_size < 1:
        raise ResnetlabError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = resolve_device(args.device)
    path = resolve_checkpoint_path(args.checkpoint)
    model, metadata = load(path, device)
    model = model.to(memory_format=torch.channels_last)  # as training runs it; about 1.5x faster on CPU
    classes = class_names(metadata)
    normalizer = normalizer_from_metadata(metadata)
    streamed = (metadata.get("data") or {}).get("pipeline") == "imagenet"
    if args.tta in ("10crop", "multiscale") and not streamed:
        raise ResnetlabError(
            f"--tta {args.tta} crops the un-cropped images of the imagenet pipeline; this checkpoint was trained on "
            "in-memory images already at the model's input size (use --tta none or flip)"
        )
    fill = shift_padding(args.shift_padding, metadata)
    split = choose_split(args.data_dir, args.split)
    if streamed:
        result = evaluate_streamed(model, metadata, classes, normalizer, args, split, device)
    else:
        images, labels = load_split(args.data_dir, split, metadata, classes)
        result = evaluate(
            model, images, labels, normalizer, batch_size=args.batch_size, device=device,
            tta=args.tta, shift_padding=fill, precision=args.precision,
            num_classes=len(classes),
        )  # fmt: skip
    confusion_path = args.confusion or default_confusion_path(Path(args.checkpoint), path, split, args.tta)
    if confusion_path is not None:
        from resnetlab.artifacts.confusion import save_confusion_png

        title = f"{metadata['model']} on {split} (n={result.n}, top-1 error {result.top1_error:.2%})"
        save_confusion_png(result.confusion, classes, confusion_path, title=title)
    if args.json:
        print(json.dumps(result.summary()))
        if confusion_path is not None:
            print(f"confusion matrix: {confusion_path}", file=sys.stderr)
        return 0
    epoch = f" epoch {metadata['epoch']}" if "epoch" in metadata else ""
    tta = f"flip-shift ({fill} fill)" if args.tta == "flip-shift" and not streamed else args.tta
    heading = f"{metadata['model']}{epoch} ({path}) on {split} of {args.data_dir}, tta {tta}, {args.precision}"
    print(format_report(result, classes, heading))
    if confusion_path is not None:
        print(f"confusion matrix: {confusion_path}")
    return 0


def shift_padding(choice: str, metadata: dict) -> str:
    """The flip-shift fill: as asked, or ("auto") the padding of the checkpoint's training crops."""
    if choice != "auto":
        return choice
    return (metadata.get("data") or {}).get("padding_mode", "zeros")


def evaluate_streamed(model, metadata: dict, classes: list[str], normalizer, args, split: str, device):
    """The imagenet pipeline's evaluation: images decoded in worker processes, resized and cropped
    as the checkpoint's training validated them (its data.eval_resize and data.image_size)."""
    from resnetlab.data.imagenet import open_image_folder
    from resnetlab.evaluate_stream import evaluate_stream, stream_batches
    from resnetlab.inference import input_hw

    data = metadata.get("data") or {}
    crop = int(data.get("image_size", input_hw(metadata)[0]))
    resize = int(data.get("eval_resize", round(crop * 256 / 224)))
    params = split_parameters(metadata)
    splits = open_image_folder(args.data_dir, crop=crop, need=(split,), **params)
    subset = getattr(splits, split)
    if subset is None or len(subset) == 0:
        raise DataError(f"{args.data_dir} has no {split} split")
    subset.labels = remap_labels(subset.labels, list(splits.classes), classes, args.data_dir)
    workers = args.workers if args.workers is not None else min(8, len(os.sched_getaffinity(0)))
    if workers < 0:
        raise ResnetlabError(f"--workers must be at least 0, got {workers}")
    batches = stream_batches(subset, args.tta, resize=resize, crop=crop, batch_size=args.batch_size, workers=workers,
                             pin=device.type == "cuda", scales=args.scales)
    return evaluate_stream(model, batches, normalizer, tta=args.tta, device=device, precision=args.precision,
                           num_classes=len(classes))


def _sides(text: str) -> tuple[int, ...]:
    import argparse

    try:
        sides = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sides or min(sides) < 1:
        raise argparse.ArgumentTypeError(f"sides must be positive, got {text!r}")
    return sides


def split_parameters(metadata: dict) -> dict:
    """The train/val split the checkpoint was trained with (so "val" is the same held-out images)."""
    data = metadata.get("data") or {}
    params = {}
    for key in ("val_size", "split_seed"):
        value = data.get(key, metadata.get(key))
        if value is not None:
            params[key] = int(value)
    return params


def choose_split(data_dir: Path, requested: str | None) -> str:
    """The split asked for, else the source's own test split when it has one, else val."""
    from resnetlab.data import find_source

    if requested:
        return requested
    source = find_source(data_dir) if data_dir.is_dir() else None
    return "test" if source is not None and "test" in source.splits else "val"


def load_split(data_dir: Path, split: str, metadata: dict, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The uint8 images and labels of one split, labels numbered in the checkpoint's class order.
    Only that split is read; val is carved with the checkpoint's own val_size and split_seed."""
    from resnetlab.data import load_dataset

    params = split_parameters(metadata)
    if split == "val" and params.get("val_size") == 0:
        raise DataError(
            "this checkpoint was trained on every training image (val_size 0), so no val split is held out;"
            " evaluate a test split (--split test)"
        )
    splits = load_dataset(data_dir, need=(split,), download=False, **params)
    if split in ("val", "train") and "val_size" not in params:
        print("resnetlab: note: the checkpoint records no train/val split; using the defaults", file=sys.stderr)
    subset = getattr(splits, split)
    if subset is None or len(subset) == 0:
        raise DataError(f"{data_dir} has no {split} split")
    return subset.images, remap_labels(subset.labels, list(splits.classes), classes, data_dir)


def remap_labels(labels: torch.Tensor, data_classes: list[str], checkpoint_classes: list[str], data_dir) -> torch.Tensor:
    """Renumber data labels into the checkpoint's class order; DataError if the class sets differ."""
    if data_classes == checkpoint_classes:
        return labels
    if sorted(data_classes) != sorted(checkpoint_classes):
        extra = sorted(set(data_classes) - set(checkpoint_classes))
        missing = sorted(set(checkpoint_classes) - set(data_classes))
        raise DataError(
            f"classes of {data_dir} do not match the checkpoint's {len(checkpoint_classes)} classes"
            f" (not in checkpoint: {', '.join(extra) or 'none'}; missing from data: {', '.join(missing) or 'none'})"
        )
    order = torch.tensor([checkpoint_classes.index(name) for name in data_classes])
    return order[labels]


def default_confusion_path(argument: Path, checkpoint_path: Path, split: str, tta: str) -> Path | None:
    """Inside the run directory when one was given (or the checkpoint lies in RUN/checkpoints/);
    no figure for a loose file or a bundled model unless --confusion asks for one."""
    suffix = f"{split}" + (f"-{tta}" if tta != "none" else "")
    if argument.is_dir():
        return argument / f"confusion-{suffix}.png"
    if checkpoint_path.parent.name == "checkpoints" and argument.is_file():
        return checkpoint_path.parent.parent / f"confusion-{suffix}-{checkpoint_path.stem}.png"
    return None


def format_report(result, classes: list[str], heading: str) -> str:
    lines = [heading, f"images       {result.n}"]
    lines += [f"top-{k} error  {error:.2%}" for k, error in result.topk_errors.items()]
    lines += [f"loss         {result.loss:.4f}", "", f"{'class':<{_width(classes)}}  accuracy  images"]
    counts = result.confusion.sum(dim=1).tolist()
    for name, accuracy, count in zip(classes, result.per_class_accuracy, counts):
        shown = "-" if math.isnan(accuracy) else f"{accuracy:.2%}"
        lines.append(f"{name:<{_width(classes)}}  {shown:>8}  {count:>6}")
    return "\n".join(lines)


def _width(classes: list[str]) -> int:
    return max(5, *(len(c) for c in classes))
