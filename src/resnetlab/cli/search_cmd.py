"""`resnetlab search`: tune lr, weight decay and momentum with seed 004's genetic algorithm,
Optuna TPE or random search (or all three at one budget); writes a leaderboard, plots and the
best configuration as a recipe file."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

from resnetlab.errors import ResnetlabError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "search", help="hyperparameter search: genetic algorithm (seed 004), TPE, random, or all at one budget",
        description="Search the learning rate, weight decay and momentum (or the keys of --space) with short "
                    "training runs scored by validation accuracy. Studies live in SQLite in --out (or --storage); "
                    "rerunning the same command continues them.",
    )  # fmt: skip
    parser.add_argument("--method", choices=("ga", "tpe", "random", "all"), default="all")
    parser.add_argument("--model", default="resnet20", help="registered model name (default resnet20)")
    parser.add_argument("--recipe", default="fast-cifar", help="named recipe the trials start from (default: %(default)s)")
    parser.add_argument("--data-dir", help="CIFAR data (batches or image folders)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (reused to resume)")
    parser.add_argument("--budget-epochs", type=float, default=2, help="epochs per trial (default 2)")
    parser.add_argument("--trials", type=int, help="trials per method (default: what the GA spends, "
                                                   "population + (generations-1) x population/2)")
    parser.add_argument("--population", type=int, default=10)
    parser.add_argument("--generations", type=int, default=5)
    parser.add_argument("--mutation-rate", type=float, default=0.3, help="chance that a child's gene is re-drawn")
    parser.add_argument("--space", metavar="FILE.yaml", help="search space: key: {low, high, log} per config key")
    parser.add_argument("--allow-unsafe-momentum", action="store_true",
                        help="search momentum up to 1.5 as seed 004 did (values >= 1 diverge)")
    parser.add_argument("--storage", metavar="URL", help="Optuna RDB URL shared by several machines "
                                                         "(default: sqlite in --out)")
    parser.add_argument("--workers", type=int, default=1, help="trials run in parallel processes")
    parser.add_argument("--pruner", choices=("median", "halving", "none"), default="median",
                        help="stop unpromising TPE/random trials after an epoch")
    parser.add_argument("--val-size", type=int, help="validation images held out (the trials' score)")
    parser.add_argument("--limit-train", type=int, help="train each trial on a seeded subset of this many images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samplers and the GA")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the trials' base config, e.g. --set schedule.warmup.kind=none")
    parser.set_defaults(func=run)


def run(args) -> int:
    from resnetlab.search.driver import SearchRequest, run_search
    from resnetlab.search.genetic import GASettings

    if args.workers < 1:
        raise ResnetlabError(f"--workers must be at least 1, got {args.workers}")
    if args.trials is not None and args.trials < 1:
        raise ResnetlabError(f"--trials must be at least 1, got {args.trials}")
    methods = ("ga", "tpe", "random") if args.method == "all" else (args.method,)
    request = SearchRequest(
        methods=methods, base=base_config(args), space=space_from_args(args), out=Path(args.out), trials=args.trials,
        ga=GASettings(args.population, args.generations, args.mutation_rate, args.seed), storage=args.storage,
        workers=args.workers, pruner=args.pruner, seed=args.seed,
    )  # fmt: skip
    from resnetlab.engine.train import TrainingInterrupted

    try:
        report = run_search(request)
    except TrainingInterrupted:
        print("resnetlab: search stopped; the finished trials are kept in the study. "
              "Rerun the same command to continue it.", file=sys.stderr)
        return 130
    print(f"leaderboard {report.out / 'leaderboard.md'}; best config {report.out / 'best_recipe.yaml'} "
          f"(resnetlab train --recipe-file ... --epochs E --out RUN_DIR)")
    return 0


def base_config(args):
    from resnetlab.config import build_config

    if args.budget_epochs <= 0:
        raise ResnetlabError(f"--budget-epochs must be positive, got {args.budget_epochs}")
    flags = {"model.name": args.model, "data.dir": args.data_dir, "data.val_size": args.val_size,
             "data.limit_train": args.limit_train, "train.epochs": args.budget_epochs, "train.seed": args.seed}
    return build_config(args.recipe, None, [*args.overrides, "train.steps=null"], **flags)


def space_from_args(args):
    from resnetlab.search.space import check_space, load_space, seed004_space

    space = load_space(args.space) if args.space else seed004_space(args.allow_unsafe_momentum)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_space(space, args.allow_unsafe_momentum)
    for warning in caught:
        print(f"resnetlab: warning: {warning.message}", file=sys.stderr)
    return space
