"""resnetlab: the ResNet paper's networks, recipes and experiments, runnable with one command."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public API, imported lazily so that `import resnetlab` stays cheap and subpackages stay
# independent (data flows one way: config -> models, data -> engine -> experiments -> cli).
_EXPORTS = {
    "create_model": "resnetlab.models",
    "list_models": "resnetlab.models",
    "load_pretrained": "resnetlab.models",
    "load_dataset": "resnetlab.data",
    "train": "resnetlab.engine.train",
    "load": "resnetlab.artifacts.checkpoint",
    "RunConfig": "resnetlab.config",
    "ResnetlabError": "resnetlab.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'resnetlab' has no attribute {name!r}")
