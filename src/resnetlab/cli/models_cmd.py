"""`resnetlab models [PATTERN] [--json | --markdown]`: the registered models with their size and
forward cost at their native input size (counted on the meta device: nothing is allocated)."""
from __future__ import annotations

import argparse
import json

from resnetlab.errors import ResnetlabError
from resnetlab.models import MODELS, complexity, list_models, model_info

COLUMNS = ("name", "family", "depth", "params", "MACs", "input")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models", help="list the registered models with parameters and multiply-adds",
        description="List the registered models with their parameter count and forward multiply-adds "
                    "(torch.utils.flop_counter, one image at the native input size).")
    parser.add_argument("pattern", nargs="?", default="*",
                        help="fnmatch pattern such as 'resnet*', or any resolvable name such as resnet164 (default: all)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print a JSON list of {name, params, macs, input_size, family}")
    output.add_argument("--markdown", action="store_true", help="print a Markdown table (the README's)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = model_rows(args.pattern)
    if args.json:
        keys = ("name", "params", "macs", "input_size", "family")
        print(json.dumps([{key: row[key] for key in keys} for row in rows], indent=2))
    elif args.markdown:
        print(markdown_table(rows))
    else:
        print(text_table(rows))
    return 0


def model_rows(pattern: str) -> list[dict]:
    names = list_models(pattern)
    if not names and pattern in MODELS:  # an unlisted name that resolves, e.g. resnet164
        names = [pattern]
    if not names:
        raise ResnetlabError(f"no model matches {pattern!r}; `resnetlab models` lists them all")
    return [{**model_info(name), **complexity(name)} for name in names]


def _cells(row: dict) -> list[str]:
    return [row["name"], row["family"], str(row["depth"]), f"{row['params']:,}", format_macs(row["macs"]),
            "x".join(map(str, row["input_size"]))]


def text_table(rows: list[dict]) -> str:
    table = [list(COLUMNS)] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    right = {2, 3, 4}  # numbers
    return "\n".join("  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
                     for line in table)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | family | depth | params | multiply-adds | input |", "|---|---|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def format_macs(macs: int) -> str:
    return f"{macs / 1e9:.2f}G" if macs >= 1e9 else f"{macs / 1e6:.2f}M"
