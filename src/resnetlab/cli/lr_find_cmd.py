"""`resnetlab lr-find`: the lr range test; writes OUT/lr_find.png and OUT/lr_find.json and prints
the suggested maximum lr."""
from __future__ import annotations

import json
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "lr-find", help="lr range test: loss-vs-lr plot and a suggested maximum lr",
        description="Train from fresh weights while the lr grows exponentially, plot the loss against "
                    "the lr and suggest a maximum lr (the steepest descent of the smoothed loss; the "
                    "minimum-loss lr / 10 is shown too).",
    )  # fmt: skip
    parser.add_argument("--model", help="registered model name (default: the recipe's)")
    parser.add_argument("--recipe", help="named recipe whose data, optimizer and runtime are used (default: fast-cifar)")
    parser.add_argument("--data-dir", help="CIFAR data directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for lr_find.png and lr_find.json")
    parser.add_argument("--start-lr", type=float, default=1e-5)
    parser.add_argument("--end-lr", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.set_defaults(func=run)


def run(args) -> int:
    from resnetlab.artifacts.checkpoint import write_json_atomic
    from resnetlab.artifacts.run_dir import ensure_writable
    from resnetlab.config import build_config
    from resnetlab.engine.lr_find import lr_range_test, plot_lr_find
    from resnetlab.experiments.recipes import DEFAULT_RECIPE

    out = Path(args.out)
    ensure_writable(out)
    config = build_config(args.recipe or DEFAULT_RECIPE, None, args.overrides,
                          **{"model.name": args.model, "data.dir": args.data_dir})
    result = lr_range_test(config, start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps)
    plot_lr_find(result, out / "lr_find.png", title=f"lr range test: {config.model.name}, {config.optim.name}")
    write_json_atomic(out / "lr_find.json", result.to_dict())
    print(json.dumps({"suggested_lr": result.suggested_lr, "method": result.method,
                      "min_loss_lr_over_10": result.min_loss_lr / 10, "plot": str(out / "lr_find.png")}))
    return 0
