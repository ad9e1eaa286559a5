"""torch.hub entry points for resnetlab: one per registered model name.

    model = torch.hub.load("/path/to/resnetlab", "resnet20", source="local", pretrained=True)
    model = torch.hub.load("/path/to/resnetlab", "resnet56", source="local", num_classes=100)

(torch.hub.list and torch.hub.help read GitHub repositories only; `resnetlab models` lists the names.)

pretrained=True loads the weights bundled with the package (a clear error where a model has none);
weights=NAME|FILE|RUN_DIR loads a resnetlab checkpoint; normalize=True folds the checkpoint's
normalisation into the model so it takes float RGB in [0, 1]. Other keyword arguments are
`resnetlab.create_model` options. Implementation: resnetlab/hub.py.
"""
import importlib.util as _importlib_util
import pathlib as _pathlib
import sys as _sys

# Modules torch.hub checks before importing this file (resnetlab's own import-time needs).
dependencies = ["torch", "safetensors", "numpy"]

# A checkout used without `pip install`: import resnetlab from its src/ folder.
if _importlib_util.find_spec("resnetlab") is None:
    _sys.path.insert(0, str(_pathlib.Path(__file__).resolve().parent / "src"))

from resnetlab.hub import entry_points as _entry_points  # noqa: E402

globals().update(_entry_points())
