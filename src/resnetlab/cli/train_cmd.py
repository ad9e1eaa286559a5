"""`resnetlab train`: flags -> RunConfig -> resnetlab.engine.train; `--resume RUN_DIR` continues a run."""
from __future__ import annotations

import sys

from resnetlab.cli.compile_flags import add_compile_flags, compile_settings
from resnetlab.errors import ResnetlabError

# Flags that describe a new run; with --resume the run's own config.json decides them.
CONFIG_FLAGS = ("model", "recipe", "recipe_file", "data_dir", "out", "epochs", "seed", "val_size", "device",
                "precision", "compile", "overrides", "checkpoint_every", "skip_bad_images")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model into a run directory (or --resume one)",
        description="Train a model. Config precedence: defaults (the paper's CIFAR recipe) < --recipe < "
                    "--recipe-file < flags < --set. Without --recipe the default recipe is used.",
    )  # fmt: skip
    parser.add_argument("--model", help="registered model name, e.g. resnet20, resnet110, plain56")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--recipe", help="named recipe (see `resnetlab recipes`; default: fast-cifar)")
    source.add_argument("--recipe-file", metavar="FILE.yaml", help="a YAML config (full or partial) used as the recipe")
    parser.add_argument("--data-dir", help="CIFAR data (python/binary batches or image folders); "
                                           "default: the cache, downloaded when absent")
    parser.add_argument("--out", metavar="RUN_DIR", help="the run directory to create (must be new or empty)")
    parser.add_argument("--epochs", type=float, help="train exactly this many epochs (replaces the recipe's budget)")
    parser.add_argument("--seed", type=int, help="seed of initialisation, batch order and augmentation")
    parser.add_argument("--val-size", type=int, help="validation images held out of the training set (0: none)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"))
    add_compile_flags(parser, "")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=0.05 --set schedule.milestones=[80,160]")
    parser.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="also checkpoint every STEPS steps")
    parser.add_argument("--skip-bad-images", action="store_true", default=None,
                        help="leave unreadable images of an image folder out (warns) instead of stopping")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bars: one line per epoch (for logs)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from resnetlab.engine.distributed import FailedElsewhere, env_info
    from resnetlab.engine.train import TrainingInterrupted, resume, train

    progress = "lines" if args.quiet else "bar"
    main = env_info().is_main  # under torchrun only rank 0 prints (errors excepted)
    try:
        if args.resume:
            _refuse_flags_with_resume(args)
            result = resume(args.resume, progress=progress)
        else:
            result = train(config_from_args(args), progress=progress)
    except TrainingInterrupted as stop:
        if main:
            print(f"resnetlab: {stop}", file=sys.stderr)
        return 130
    except FailedElsewhere:
        return 2  # the failing rank has printed the error
    if main:
        print(result_line(result))
    return 0


def config_from_args(args):
    from resnetlab.config import build_config
    from resnetlab.experiments.recipes import DEFAULT_RECIPE

    if not args.out:
        raise ResnetlabError("--out RUN_DIR is required (or --resume RUN_DIR)")
    compiling, compile_mode = compile_settings(args.compile)
    flags = {
        "model.name": args.model, "data.dir": args.data_dir, "out": args.out, "train.seed": args.seed,
        "data.val_size": args.val_size, "runtime.device": args.device, "runtime.precision": args.precision,
        "runtime.compile": compiling, "runtime.compile_mode": compile_mode,
        "train.checkpoint_every_steps": args.checkpoint_every,
        "data.skip_bad_images": args.skip_bad_images,
    }  # fmt: skip
    recipe = args.recipe or (None if args.recipe_file else DEFAULT_RECIPE)
    overrides = list(args.overrides)
    if args.epochs is not None:
        overrides = [f"train.epochs={args.epochs}", "train.steps=null", *overrides]
    return build_config(recipe, args.recipe_file, overrides, **flags)


def _refuse_flags_with_resume(args) -> None:
    given = [name for name in CONFIG_FLAGS if getattr(args, name) not in (None, [], False)]
    if args.compile is False:  # --no-compile: False here is a given flag, not a store_true default
        given.append("no_compile")
    if given:
        flag = "--" + given[0].replace("_", "-").replace("overrides", "set")
        raise ResnetlabError(f"{flag} cannot be combined with --resume: a resumed run keeps its config.json")


def result_line(result) -> str:
    def pct(value):
        return "n/a (no validation split)" if value is None else f"{value:.2%}"

    tta = "".join(f", {name} TTA {pct(numbers['val_top1_error'])}"
                  for name, numbers in (result.summary.get("final_tta") or {}).items())
    return (f"final val top-1 error {pct(result.final_val_error)}{tta} (best {pct(result.best_val_error)}); "
            f"run directory {result.run_dir}, curves {result.run_dir / 'curves.png'}")
