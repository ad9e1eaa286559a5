"""Safetensors checkpoints: written atomically, read without ever unpickling anything.

A model checkpoint is one `.safetensors` file: the tensors of `model.state_dict()` plus a JSON
metadata object (model name and options, classes, normalisation, epoch...) kept in the safetensors
header under the key "resnetlab", so a single file is enough to rebuild and use the model.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from resnetlab.errors import CheckpointError

METADATA_KEY = "resnetlab"
FORMAT_VERSION = 1
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "weights"

# First bytes of the files people most often pass by mistake: a pickle protocol 2+ stream, and
# torch.save's zip container (which holds a pickle). Neither is ever opened here.
_PICKLE_MAGIC = b"\x80"
_ZIP_MAGIC = b"PK\x03\x04"
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # reading the umask means setting it; put it straight back


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash at any moment leaves either the old file or the new
    one, never a partial file: temp file in the same folder, fsync, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temp_name, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are shared like any written file
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_tensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Save named tensors (made contiguous, on the CPU) with optional JSON metadata."""
    cpu_tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    header = {METADATA_KEY: json.dumps({"format": FORMAT_VERSION, **(metadata or {})}, sort_keys=True)}
    write_bytes_atomic(path, save_safetensors_bytes(cpu_tensors, metadata=header))


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict) -> None:
    """Save a model's state_dict and its metadata as one safetensors file, atomically."""
    save_tensors_atomic(path, state_dict, metadata)


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a safetensors file written by `save_tensors_atomic`; CheckpointError if it is missing,
    truncated, corrupt, or not a safetensors file at all (pickles are refused, never executed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    data = path.read_bytes()
    if not _looks_like_safetensors(data) and (data.startswith(_ZIP_MAGIC) or data.startswith(_PICKLE_MAGIC)):
        raise CheckpointError(
            f"{path} is a pickle/torch.save file; resnetlab checkpoints are safetensors and pickles are "
            "never loaded here (use resnetlab.load_pretrained for third-party weights)"
        )
    try:
        tensors = load_safetensors_bytes(data)
        metadata = _read_header_metadata(data)
    except (SafetensorError, ValueError, json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({reason})") from None
    return tensors, metadata


def _looks_like_safetensors(data: bytes) -> bool:
    """A safetensors file starts with its JSON header's length (u64, little-endian), then the
    header's "{". The length's first byte alone can be 0x80 (1 header length in 32), so the pickle
    magic is only trusted when this layout is absent."""
    header_length = int.from_bytes(data[:8], "little")
    return len(data) >= 9 and 8 + header_length <= len(data) and data[8:9] == b"{"


def _read_header_metadata(data: bytes) -> dict:
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a model checkpoint: (state_dict, metadata). The metadata must name the model."""
    state_dict, metadata = read_tensors(path)
    if not isinstance(metadata, dict) or "model" not in metadata:
        raise CheckpointError(f"{path} has no resnetlab metadata (model name); was it written by resnetlab?")
    for key, kind in _METADATA_TYPES.items():  # a hand-edited or foreign header must not crash the loader
        if key in metadata and not isinstance(metadata[key], kind):
            raise CheckpointError(f"{path} has malformed resnetlab metadata: {key!r} must be a {kind.__name__}, "
                                  f"got {type(metadata[key]).__name__}")
    return state_dict, metadata


_METADATA_TYPES = {"model": str, "model_options": dict, "classes": list}


def bundled_names() -> list[str]:
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.safetensors"))


def resolve_checkpoint_path(path_or_name: str | Path) -> Path:
    """A checkpoint file, a run directory (its final model, checkpoints/last.safetensors), or the
    name of a model bundled with the package (e.g. "resnet20-cifar10")."""
    candidate = Path(path_or_name)
    if candidate.is_dir():
        last = candidate / "checkpoints" / "last.safetensors"
        if not last.is_file():
            raise CheckpointError(f"run directory {candidate} has no checkpoints/last.safetensors")
        return last
    if candidate.is_file():
        return candidate
    bundled = BUNDLED_DIR / f"{path_or_name}.safetensors"
    if bundled.is_file():
        return bundled
    known = ", ".join(bundled_names()) or "none"
    raise CheckpointError(f"no checkpoint, run directory or bundled model named {str(path_or_name)!r} (bundled: {known})")


def load(path_or_name: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a model from a resnetlab checkpoint: returns (model in eval mode, metadata)."""
    from resnetlab.models import create_model  # models import nothing from artifacts: no cycle

    path = resolve_checkpoint_path(path_or_name)
    state_dict, metadata = read_checkpoint(path)
    model = create_model(metadata["model"], num_classes=metadata.get("num_classes", 10), **metadata.get("model_options", {}))
    load_state_dict_checked(model, state_dict, source=str(path))
    return model.to(device).eval(), metadata


def load_state_dict_checked(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """`load_state_dict(strict=True)` with one readable line instead of torch's multi-line error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError(f"{source} does not match {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)
