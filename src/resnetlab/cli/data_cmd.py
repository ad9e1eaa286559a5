"""`resnetlab data inspect`: what a data folder holds (splits, classes, counts, shape, mean/std)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("data", help="inspect CIFAR data folders", description=__doc__)
    actions = parser.add_subparsers(dest="data_action", metavar="ACTION")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    inspect = actions.add_parser("inspect", help="splits, classes, per-class counts, image size, mean/std")
    inspect.add_argument("--data-dir", type=Path, default=None,
                         help="CIFAR folder (python, binary, CIFAR-100) or image folder; default: download CIFAR-10")
    inspect.add_argument("--val-size", type=int, default=5000, help="images carved from train for val (0: none)")
    inspect.add_argument("--split-seed", type=int, default=0, help="seed of the stratified val split")
    inspect.add_argument("--skip-bad-images", action="store_true", help="leave unreadable images out (warns)")
    inspect.add_argument("--no-download", action="store_true", help="never download; fail if no data is found")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    inspect.add_argument("--grid", type=Path, metavar="FILE.png", help="write a PNG grid of sample images per class")
    inspect.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from resnetlab.data import load_dataset, locate_source
    from resnetlab.data.inspect import format_summary, save_grid, summarize

    source = locate_source(args.data_dir, download=not args.no_download)
    need = (("train", "val") if "train" in source.splits else ()) + (("test",) if "test" in source.splits else ())
    splits = load_dataset(
        source.path, val_size=args.val_size, split_seed=args.split_seed,
        skip_bad_images=args.skip_bad_images, download=False, need=need,
    )
    summary = summarize(splits)
    print(json.dumps(summary) if args.json else format_summary(summary))
    if args.grid:
        grid_source = splits.train if splits.train is not None else splits.test
        path = save_grid(grid_source, args.grid)
        if not args.json:
            print(f"grid: {path}")
    return 0
