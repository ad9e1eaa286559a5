"""`make train`: train ResNet-20 with the default recipe on CIFAR-10 and say where the results are.

Data: $CIFAR10_DIR, else $DATA_DIR (`make train DATA_DIR=...`), else the cache, downloading the
official archive when absent. Optional: EPOCHS, SEED, RECIPE, OUT (the run directory; default
runs/resnet20-<recipe>-<time>), DEVICE, PRECISION, QUIET=1. Further arguments are passed on to
`resnetlab train`, e.g. `python -m resnetlab.cli.make_train --set train.batch_size=256`.
"""
from __future__ import annotations

import os
import sys
import time

from resnetlab.cli import main as cli_main


def train_argv(environ: dict[str, str], extra: list[str]) -> list[str]:
    from resnetlab.experiments.recipes import DEFAULT_RECIPE

    recipe = environ.get("RECIPE") or DEFAULT_RECIPE
    out = environ.get("OUT") or os.path.join("runs", f"resnet20-{recipe}-{time.strftime('%Y%m%d-%H%M%S')}")
    argv = ["train", "--model", "resnet20", "--recipe", recipe, "--out", out]
    data_dir = environ.get("CIFAR10_DIR") or environ.get("DATA_DIR")
    if data_dir:
        argv += ["--data-dir", data_dir]
    for variable, flag in (("EPOCHS", "--epochs"), ("SEED", "--seed"), ("DEVICE", "--device"),
                           ("PRECISION", "--precision")):
        if environ.get(variable):
            argv += [flag, environ[variable]]
    if environ.get("QUIET") not in (None, "", "0"):
        argv.append("--quiet")
    return argv + extra


def main(argv: list[str] | None = None) -> int:
    args = train_argv(dict(os.environ), sys.argv[1:] if argv is None else argv)
    where = next((args[i + 1] for i, a in enumerate(args) if a == "--data-dir"), "the download cache")
    print(f"make train: resnetlab {' '.join(args)}  (data: {where})", flush=True)
    return cli_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
