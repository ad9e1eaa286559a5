"""The torch.hub entry points (hubconf.py at the repository root re-exports them): one per
registered model name, `resnet20(pretrained=False, **options)`; `pretrained=True` loads the
weights bundled with the package (src/resnetlab/weights) for that model."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from resnetlab.errors import CheckpointError


def bundled_for(model_name: str) -> list[str]:
    """Bundled checkpoint names holding weights for `model_name` (their metadata's "model")."""
    from resnetlab.artifacts.checkpoint import BUNDLED_DIR, bundled_names, read_checkpoint

    return [name for name in bundled_names()
            if read_checkpoint(BUNDLED_DIR / f"{name}.safetensors")[1].get("model") == model_name]


def load_model(model_name: str, pretrained: bool = False, weights: str | None = None, normalize: bool = False,
               **options: Any) -> nn.Module:
    """`create_model(model_name, **options)`; with `pretrained` (or `weights`: a bundled name,
    checkpoint file or run directory) the trained model, in eval mode, its checkpoint metadata
    (classes, normalisation...) in `model.resnetlab_metadata`. `normalize=True` folds that
    normalisation into the model, which then takes float RGB in [0, 1]."""
    from resnetlab.models import create_model

    if not (pretrained or weights):
        if normalize:
            raise CheckpointError("normalize=True needs pretrained weights (the statistics are stored with them)")
        return create_model(model_name, **options)
    model, metadata = _load_weights(model_name, weights)
    if options:  # accepted only when they describe the architecture the weights were trained with
        wanted = create_model(model_name, **options).default_cfg
        if wanted != model.default_cfg:
            raise CheckpointError(f"{model_name} options {options} do not match the pretrained weights "
                                  f"(num_classes={metadata.get('num_classes')}, options {metadata.get('model_options')})")
    model.resnetlab_metadata = metadata
    if normalize:
        from resnetlab.export import with_normalization

        model = with_normalization(model, metadata)
        model.resnetlab_metadata = metadata
    return model


def _load_weights(model_name: str, weights: str | None) -> tuple[nn.Module, dict]:
    from resnetlab.artifacts.checkpoint import bundled_names, load

    if weights is None:
        found = bundled_for(model_name)
        if len(found) != 1:
            known = ", ".join(bundled_names()) or "none"
            reason = "no bundled weights" if not found else f"several bundled weights ({', '.join(found)}); pass weights=NAME"
            raise CheckpointError(f"{reason} for {model_name} (bundled: {known}); "
                                  "train one with `resnetlab train` and pass weights=FILE")
        weights = found[0]
    model, metadata = load(weights)
    if metadata.get("model") != model_name:
        raise CheckpointError(f"weights {weights!r} are for {metadata.get('model')}, not {model_name}")
    return model, metadata


def entry_point(model_name: str) -> Callable[..., nn.Module]:
    """The torch.hub callable for one model name, with a docstring that `torch.hub.help` shows."""
    def entry(pretrained: bool = False, weights: str | None = None, normalize: bool = False, **options: Any) -> nn.Module:
        return load_model(model_name, pretrained=pretrained, weights=weights, normalize=normalize, **options)

    entry.__name__ = entry.__qualname__ = model_name
    entry.__doc__ = (f"{model_name} (resnetlab). pretrained=True: the bundled weights for {model_name}, if any; "
                     "weights=NAME|FILE|RUN_DIR: those weights; normalize=True: inputs are float RGB in [0, 1]; "
                     "other keyword arguments are create_model options (num_classes, shortcut, block, width...).")
    return entry


def entry_points() -> dict[str, Callable[..., nn.Module]]:
    """name -> entry point, for every registered model name."""
    from resnetlab.models import list_models

    return {name: entry_point(name) for name in list_models()}
