"""`resnetlab export`: a checkpoint as a TorchScript or ONNX file, checked against PyTorch."""
from __future__ import annotations

import argparse
from pathlib import Path

from resnetlab.errors import ResnetlabError

DESCRIPTION = """\
Export a checkpoint (file, run directory or bundled name) to TorchScript or ONNX.

The exported model takes float32 RGB images scaled to [0, 1], shape N x 3 x H x W, and returns
logits (N x classes): the normalisation stored in the checkpoint is part of the exported graph
(--no-normalization exports the bare network, whose inputs must then be normalised by the caller).
Class names, normalisation and input size are stored in the file (TorchScript extra file /
ONNX metadata_props "resnetlab.json").

Before anything is written, the exported model is reloaded (torch.jit.load, or onnxruntime for
ONNX) and compared with the PyTorch model on a random batch; the command fails, leaving any
existing output file untouched, when the outputs differ by more than --atol.
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export a checkpoint to TorchScript or ONNX (checked against PyTorch)",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="CHECKPOINT|RUN_DIR|BUNDLED_NAME")
    # Checked in run(), not by argparse choices, so a wrong value is a one-line error (exit 2).
    parser.add_argument("--format", required=True, metavar="{torchscript,onnx}", help="output format")
    parser.add_argument("--out", required=True, type=Path, metavar="FILE", help="output file (e.g. model.pt, model.onnx)")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                        help="input height and width (default: the checkpoint's input_size)")
    parser.add_argument("--batch", type=int, default=1, metavar="N", help="batch size of the traced input (default 1)")
    parser.add_argument("--dynamic-batch", action="store_true",
                        help="ONNX: make the batch dimension dynamic (a TorchScript trace accepts any batch); "
                             "both formats: also check batches of 1 and 3")
    parser.add_argument("--opset", type=int, metavar="N", help="ONNX opset version (default: torch.onnx's)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest accepted |exported - PyTorch| (default 1e-4)")
    parser.add_argument("--no-normalization", action="store_true",
                        help="export the bare network: inputs must be normalised as in training")
    parser.add_argument("--no-check", action="store_true", help="write without comparing against PyTorch")
    parser.set_defaults(func=run)


def run(args) -> int:
    import torch

    from resnetlab.artifacts.checkpoint import load, resolve_checkpoint_path
    from resnetlab.export import FORMATS, export, with_normalization

    if args.format not in FORMATS:
        raise ResnetlabError(f"unknown --format {args.format!r}; choose one of {', '.join(FORMATS)}")
    check_numbers(args)
    path = resolve_checkpoint_path(args.source)
    model, metadata = load(path, "cpu")
    normalized = bool(metadata.get("normalization")) and not args.no_normalization
    if normalized:
        model = with_normalization(model, metadata)
    height, width = input_size(args, metadata, model)
    channels = int((metadata.get("model_options") or {}).get("in_channels") or 3)
    example = torch.rand(args.batch, channels, height, width, generator=torch.Generator().manual_seed(0))
    report = export(model, args.out, args.format, example, dynamic_batch=args.dynamic_batch, opset=args.opset,
                    check=not args.no_check, atol=args.atol, metadata=file_metadata(metadata, normalized, example, args))
    print(summary(report, path, normalized, args))
    return 0


def check_numbers(args) -> None:
    if args.batch < 1:
        raise ResnetlabError(f"--batch must be at least 1, got {args.batch}")
    if args.input_size and min(args.input_size) < 1:
        raise ResnetlabError(f"--input-size must be positive, got {args.input_size[0]} {args.input_size[1]}")
    if not args.atol >= 0:
        raise ResnetlabError(f"--atol must be a non-negative number, got {args.atol}")
    if args.opset is not None and args.format != "onnx":
        raise ResnetlabError("--opset applies to --format onnx only")


def input_size(args, metadata: dict, model) -> tuple[int, int]:
    """--input-size, else the checkpoint's. A per-pixel mean (the paper's) fixes the size it was
    computed at, so another size is refused when the normalisation is part of the export."""
    from resnetlab.export import Normalized
    from resnetlab.inference import input_hw

    height, width = args.input_size or input_hw(metadata)
    mean_hw = tuple(model.mean.shape[1:]) if isinstance(model, Normalized) else (1, 1)
    if mean_hw not in ((1, 1), (height, width)):
        raise ResnetlabError(f"--input-size {height} {width} does not fit the checkpoint's per-pixel mean "
                             f"({mean_hw[0]} x {mean_hw[1]}); use that size or --no-normalization")
    return height, width


def file_metadata(metadata: dict, normalized: bool, example, args) -> dict:
    """What a deployment needs to use the file, stored inside it."""
    return {
        "model": metadata.get("model"),
        "classes": metadata.get("classes"),
        "input": {"name": "images", "shape": [batch_dim(args, example.shape[0]), *example.shape[1:]], "dtype": "float32",
                  "range": "[0, 1] RGB" if normalized else "normalised as in training"},
        "normalization": metadata.get("normalization") if not normalized else "included",
    }


def batch_dim(args, traced: int) -> int | str:
    """"N" where the file accepts any batch size (a dynamic ONNX batch, any TorchScript trace)."""
    return "N" if args.dynamic_batch or args.format == "torchscript" else traced


def summary(report, source: Path, normalized: bool, args) -> str:
    inputs = "float32 RGB in [0, 1]" if normalized else "normalised float32 (normalisation NOT included)"
    shape = "x".join(map(str, report.input_shape[1:]))
    batch = batch_dim(args, report.input_shape[0])
    check = ("not checked (--no-check)" if report.max_abs_diff is None else
             f"max abs difference vs PyTorch {report.max_abs_diff:.3g} (atol {args.atol:g})")
    return (f"wrote {report.path} ({args.format}, {report.size_bytes / 1e6:.1f} MB) from {source}: "
            f"input {batch}x{shape} {inputs}, output logits x{report.output_shape[1]}; {check}")
