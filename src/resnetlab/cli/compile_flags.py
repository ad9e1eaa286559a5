"""`--compile [MODE]` / `--no-compile`, shared by the commands that train (`train`, `bench train`)."""
from __future__ import annotations

import argparse

from resnetlab.config import COMPILE_MODES


def add_compile_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """args.compile becomes None (the flags were not given: runtime.compile auto), False
    (--no-compile) or the mode asked for ("auto" with a bare --compile)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--compile", nargs="?", const="auto", choices=("auto", *COMPILE_MODES), metavar="MODE",
                       help=f"torch.compile the model{what}; MODE is torch.compile's (default: auto, which is "
                            "reduce-overhead, recording CUDA graphs, on CUDA and default elsewhere). Without the "
                            "flag: compiled on CUDA (single process), eager on the CPU")
    group.add_argument("--no-compile", dest="compile", action="store_const", const=False,
                       help="no torch.compile, also on CUDA")


def compile_settings(flag: str | bool | None) -> tuple[bool | str | None, str | None]:
    """(runtime.compile, runtime.compile_mode) for args.compile; None leaves the config's value."""
    if flag is None:
        return None, None
    if flag is False:
        return False, None
    return True, flag
