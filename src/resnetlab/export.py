"""Export a model to TorchScript or ONNX, and check that the file reproduces PyTorch's outputs.

The exported model takes float32 RGB images in [0, 1], N x 3 x H x W, and returns logits: the
normalisation a checkpoint was trained with (its metadata "normalization") is folded into the
graph by `with_normalization`, so a deployment needs no resnetlab code to prepare its inputs.

A file is built in memory, reloaded from those bytes (torch.jit.load / onnxruntime) and compared
with the eager model on a random batch, and only then written, atomically: a failed export or a
failed check leaves an existing output file as it was.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from resnetlab.artifacts.checkpoint import write_bytes_atomic
from resnetlab.errors import ResnetlabError

FORMATS = ("torchscript", "onnx")
INPUT_NAME, OUTPUT_NAME = "images", "logits"
METADATA_NAME = "resnetlab.json"  # TorchScript extra file / ONNX metadata_props key
DEFAULT_ATOL = 1e-4


class ExportError(ResnetlabError):
    """The exporter failed, a package it needs is missing, or the exported file disagrees with PyTorch."""


class Normalized(nn.Module):
    """`model((x - mean) / std)` for x float RGB in [0, 1]: the normaliser folded into the graph.
    `mean` is 3 x H x W (the paper's per-pixel mean, which fixes the input size) or 3 x 1 x 1."""

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("inv_std", 1.0 / std.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) * self.inv_std)


@dataclass(frozen=True)
class ExportReport:
    path: Path
    format: str
    size_bytes: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    max_abs_diff: float | None  # None when the check was skipped


def with_normalization(model: nn.Module, metadata: dict) -> nn.Module:
    """The model behind its checkpoint's normaliser (inputs in [0, 1]); the model itself when the
    metadata stores no normalisation."""
    record = metadata.get("normalization")
    if not record:
        return model
    from resnetlab.data import Normalizer

    normalizer = Normalizer.from_dict(record)
    return Normalized(model, normalizer.mean, normalizer.std).eval()


def export(model: nn.Module, path: str | Path, fmt: str, example: torch.Tensor, *, dynamic_batch: bool = False,
           opset: int | None = None, check: bool = True, atol: float = DEFAULT_ATOL,
           metadata: dict | None = None) -> ExportReport:
    """Export `model` (eval mode, on the CPU) traced with `example` to `path` in format `fmt`;
    with `check`, ExportError unless the reloaded file matches the eager model within `atol`."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if Path(path).is_dir():
        raise ExportError(f"--out {path} is a directory; give a file name")
    model = model.cpu().eval()
    if fmt == "torchscript":
        data = torchscript_bytes(model, example, metadata)
    else:
        data = onnx_bytes(model, example, dynamic_batch=dynamic_batch, opset=opset, metadata=metadata)
    diff = None
    if check:
        diff = verify(data, fmt, model, check_batches(example, dynamic_batch))
        if not diff <= atol:  # also catches NaN
            raise ExportError(f"the exported {fmt} model differs from PyTorch by {diff:.3g} (> atol {atol:g}); "
                              f"{Path(path)} was not written")
    try:
        write_bytes_atomic(path, data)
        os.chmod(path, 0o644)  # a deployable file, readable by a serving user (the temp file was 0600)
    except OSError as error:
        raise ExportError(f"cannot write {path}: {error.strerror or error}") from None
    with torch.no_grad():
        output_shape = tuple(model(example).shape)
    return ExportReport(Path(path), fmt, len(data), tuple(example.shape), output_shape, diff)


def export_torchscript(model: nn.Module, example: torch.Tensor, path: str | Path, **kwargs) -> ExportReport:
    return export(model, path, "torchscript", example, **kwargs)


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, **kwargs) -> ExportReport:
    return export(model, path, "onnx", example, **kwargs)


def check_batches(example: torch.Tensor, dynamic_batch: bool, seed: int = 0) -> list[torch.Tensor]:
    """Random [0, 1] batches, unlike the tracing example: its shape, and with a dynamic batch also
    batches of 1 and 3 images (a batch size baked into the graph shows up there)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [example.shape[0]] + ([1, 3] if dynamic_batch else [])
    return [torch.rand((n, *example.shape[1:]), generator=generator) for n in sizes]


def torchscript_bytes(model: nn.Module, example: torch.Tensor, metadata: dict | None = None) -> bytes:
    """A traced TorchScript archive. Tracing (not scripting): the ResNets have no data-dependent
    control flow, and a trace of them accepts any batch size."""
    buffer = io.BytesIO()
    with _quiet(), torch.no_grad():
        try:
            traced = torch.jit.trace(model, example, check_trace=False)
            torch.jit.save(traced, buffer, _extra_files={METADATA_NAME: json.dumps(metadata or {})})
        except Exception as error:  # the tracer raises many types; one line for the user
            raise ExportError(f"TorchScript export failed: {_first_line(error)}") from error
    return buffer.getvalue()


def onnx_bytes(model: nn.Module, example: torch.Tensor, *, dynamic_batch: bool = False, opset: int | None = None,
               metadata: dict | None = None) -> bytes:
    """An ONNX model (one self-contained file) from torch.onnx's torch.export-based exporter."""
    onnx = _require("onnx", "ONNX export")
    _require("onnxscript", "ONNX export (torch.onnx's exporter)")
    # Trace with 2 images when the batch is dynamic: torch.export specialises a size of 1.
    if dynamic_batch and example.shape[0] == 1:
        example = example.expand(2, *example.shape[1:]).contiguous()
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    with _quiet():
        try:
            program = torch.onnx.export(model, (example,), None, dynamo=True, verbose=False, external_data=False,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        opset_version=opset, dynamic_shapes=shapes)
            proto = program.model_proto
        except Exception as error:
            raise ExportError(f"ONNX export failed: {_first_line(error)}") from error
    onnx.helper.set_model_props(proto, {METADATA_NAME: json.dumps(metadata or {})})
    return proto.SerializeToString()


def verify(data: bytes | str | Path, fmt: str, model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Max |exported - eager| over the outputs of `batches`, the exported model read from `data`
    (its bytes or a file path)."""
    if isinstance(data, (str, Path)):
        data = Path(data).read_bytes()
    run = load_runner(data, fmt)
    worst = 0.0
    with torch.no_grad():
        for batch in batches:
            expected = model(batch).float()
            got = run(batch)
            if got.shape != expected.shape:
                raise ExportError(f"the exported {fmt} model returned shape {tuple(got.shape)} for input "
                                  f"{tuple(batch.shape)}; PyTorch returns {tuple(expected.shape)}")
            worst = max(worst, (got - expected).abs().max().item())
    return worst


def load_runner(data: bytes, fmt: str):
    """A function batch -> logits tensor running the exported model held in `data`."""
    if fmt == "torchscript":
        with _quiet():
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        return lambda batch: module(batch).float()
    ort = _require("onnxruntime", "checking an ONNX export (or pass --no-check)")
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise ExportError(f"onnxruntime cannot load the exported model: {_first_line(error)}") from error
    return lambda batch: torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]).float()


def read_metadata(path: str | Path) -> dict:
    """The resnetlab metadata stored in an exported file (classes, normalisation, input spec)."""
    path = Path(path)
    if path.read_bytes()[:2] == b"PK":  # TorchScript archives are zip files
        extra = {METADATA_NAME: ""}
        with _quiet():
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        return json.loads(extra[METADATA_NAME] or "{}")
    onnx = _require("onnx", "reading ONNX metadata")
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(props.get(METADATA_NAME, "{}"))


def _require(module: str, purpose: str):
    try:
        return __import__(module)
    except ImportError:
        raise ExportError(f"{purpose} needs the '{module}' package: pip install 'resnetlab[export]' "
                          "(onnx, onnxscript, onnxruntime)") from None


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' chatter: torch.jit's deprecation notices (torch.export is upstream's
    successor; TorchScript still loads in C++ and older runtimes), and torch.onnx's progress lines
    and its warnings about optional torchvision ops."""
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        onnx_logger.setLevel(level)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
