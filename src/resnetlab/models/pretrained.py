"""Load third-party weights into resnetlab models without ever running code from the file.

Accepted: `.safetensors` (read by safetensors), any other suffix (`.pth`, `.th`, `.pt`...) through
`torch.load(weights_only=True)`, which refuses pickles that would import or call anything. The
state_dict may be bare or held under "state_dict" (akamaster's .th files) or "model"; the usual
renamings are undone: a `module.` prefix (DataParallel/DDP), an `_orig_mod.` prefix (torch.compile),
and the names of the common CIFAR code (akamaster's): `linear.*` -> `fc.*` and, for its option-B
projections, `layerX.Y.shortcut.*` -> `layerX.Y.downsample.*`.
"""
from __future__ import annotations

import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors_file
from torch import nn

from resnetlab.errors import CheckpointError

_WRAPPER_KEYS = ("state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")
_RENAMES = (("linear.", "fc."),)
_PART_RENAMES = {"shortcut": "downsample"}


def load_pretrained(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load the weights in `path` into `model` (in place) and return the model.

    strict=True: every key must match in name and shape, else CheckpointError listing the
    missing, unexpected and wrongly shaped keys. strict=False loads what matches and warns about
    the rest (e.g. an ImageNet checkpoint into a 10-class model: everything but `fc`).
    """
    state_dict = adapt_keys(load_state_dict_file(path))
    missing, unexpected, wrong_shape = compare_state_dict(model, state_dict)
    if missing or unexpected or wrong_shape:
        problems = describe_mismatch(model, state_dict, missing, unexpected, wrong_shape)
        if strict:
            raise CheckpointError(f"{path} does not fit {_model_name(model)}: {problems}")
        warnings.warn(f"load_pretrained({path}, strict=False) skipped {problems}", stacklevel=2)
    skip = set(unexpected) | set(wrong_shape)
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in skip}, strict=False)
    return model


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, unwrapped from a "state_dict"/"model" entry, keys untouched."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_safetensors_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(error)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses any global outside tensors and plain containers: the file would
        # have imported or called something (or is no pickle at all). It is reported, never run.
        raise CheckpointError(
            f"refusing to load {path}: torch.load(weights_only=True) does not accept it ({_unpickling_reason(error)}); "
            "files holding code or custom objects are never unpickled here: save a plain state_dict or safetensors") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path} is truncated or not a torch weights file ({_first_line(error)})") from None
    return _unwrap(obj, path)


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path} holds no state_dict (expected a dict of tensors, or one under "
                              f"{' or '.join(map(repr, _WRAPPER_KEYS))})")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: state_dict entries that are not tensors: {_shorten(not_tensors)}")
    return dict(obj)


def adapt_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo the wrappers' prefixes and map other codebases' names onto resnetlab's (torchvision's)."""
    adapted = {}
    for key, value in state_dict.items():
        for prefix in _PREFIXES:
            key = key.removeprefix(prefix)
        for old, new in _RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
        adapted[".".join(_PART_RENAMES.get(part, part) for part in key.split("."))] = value
    return adapted


def compare_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong_shape) keys of `state_dict` against `model`. A missing BN
    `num_batches_tracked` is not counted: files saved before PyTorch 0.4.1 lack it and torch fills it."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    return missing, unexpected, wrong_shape


def describe_mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor], missing: list[str],
                      unexpected: list[str], wrong_shape: list[str]) -> str:
    """One line: "missing (2): a, b; unexpected (1): c; wrong shape (1): fc.weight (1000, 512) vs (10, 512)"."""
    expected = model.state_dict()
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong_shape]
    parts = [f"{label} ({len(keys)}): {_shorten(keys)}"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
    return "; ".join(parts)


def _shorten(items: list[str], limit: int = 10) -> str:
    return ", ".join(items[:limit]) + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def _unpickling_reason(error: BaseException) -> str:
    """The informative line of torch's long weights_only message ("...unsupported GLOBAL os.system...")."""
    lines = [line.strip() for line in str(error).splitlines()]
    return next((line for line in lines if "GLOBAL" in line or line.startswith("Unsupported")), _first_line(error))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _model_name(model: nn.Module) -> str:
    return getattr(model, "default_cfg", {}).get("name", type(model).__name__)
