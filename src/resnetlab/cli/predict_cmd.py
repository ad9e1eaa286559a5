"""`resnetlab predict`: the most probable classes of image files."""
from __future__ import annotations

import json
from pathlib import Path

DEFAULT_CHECKPOINT = "resnet20-cifar10"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("predict", help="classify image files with a checkpoint")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    parser.add_argument(
        "--checkpoint",
        default=DEFAULT_CHECKPOINT,
        help=f"checkpoint file, run directory or bundled model name (default: {DEFAULT_CHECKPOINT})",
    )
    parser.add_argument("--top", type=int, default=3, metavar="K", help="classes shown per image (default 3)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.set_defaults(func=run)


def run(args) -> int:
    from resnetlab.artifacts.checkpoint import BUNDLED_DIR, load
    from resnetlab.engine.runtime import resolve_device
    from resnetlab.errors import CheckpointError, ResnetlabError
    from resnetlab.inference import predict

    if args.top < 1:
        raise ResnetlabError(f"--top must be at least 1, got {args.top}")
    bundled = BUNDLED_DIR / f"{DEFAULT_CHECKPOINT}.safetensors"
    if args.checkpoint == DEFAULT_CHECKPOINT and not bundled.is_file() and not Path(args.checkpoint).exists():
        raise CheckpointError(
            f"the default model {DEFAULT_CHECKPOINT!r} is not bundled in this build; pass --checkpoint FILE|RUN_DIR"
        )
    device = resolve_device(args.device)
    model, metadata = load(args.checkpoint, device)
    predictions = predict(model, metadata, args.images, top=args.top, device=device)
    if args.json:
        print(json.dumps([p.to_dict() for p in predictions], indent=2))
        return 0
    for prediction in predictions:
        shown = ", ".join(f"{c} {p:.1%}" for c, p in zip(prediction.classes, prediction.probabilities))
        print(f"{prediction.image}: {shown}")
    return 0
