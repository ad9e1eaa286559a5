"""Command-line entry point. Each subcommand lives in its own module with `add_parser(subparsers)`
registering a parser whose `func(args) -> int` runs it; the argparse namespace stops in cli/."""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import warnings

from resnetlab.errors import ResnetlabError

# Module names under resnetlab.cli, in the order they appear in `resnetlab --help`; any other
# `*_cmd` module found in the package is added after them, so a new command needs no edit here.
_ORDERED_COMMANDS = [
    "models_cmd",
    "data_cmd",
    "train_cmd",
    "eval_cmd",
    "predict_cmd",
    "recipes_cmd",
    "lr_find_cmd",
    "bench_cmd",
]


def _discover_commands() -> list[str]:
    found = {info.name for info in pkgutil.iter_modules(__path__) if info.name.endswith("_cmd")}
    return [name for name in _ORDERED_COMMANDS if name in found] + sorted(found - set(_ORDERED_COMMANDS))


COMMAND_MODULES = _discover_commands()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnetlab", description="Build, train, evaluate and reproduce the ResNets of He et al. 2015.")
    from resnetlab import __version__

    parser.add_argument("--version", action="version", version=f"resnetlab {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(f"resnetlab.cli.{module_name}").add_parser(subparsers)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    # the CLI's warnings read like its errors: one line, no source path
    return f"resnetlab: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    previous_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return _run(argv)
    finally:
        warnings.formatwarning = previous_format  # main() is also called in-process (tests, notebooks)


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ResnetlabError as error:
        print(f"resnetlab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("resnetlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `resnetlab eval ... | head`: the reader left; stop quietly as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
