"""The ResNet model zoo: every network of the paper behind one registry.

    create_model("resnet56")                      # CIFAR, option A, 10 classes
    create_model("resnet50", stride_in="3x3")     # ImageNet, torchvision's v1.5 layout
    create_model("plain20", block="preact")       # any family/option combination
    list_models("resnet*"); model_info("resnet20")
    load_pretrained(model, "weights.pth")         # torchvision / akamaster / safetensors files
"""
from __future__ import annotations

from resnetlab.models import cifar, imagenet  # noqa: F401  (registers the names)
from resnetlab.models.blocks import VARIANTS
from resnetlab.models.complexity import complexity, count_macs, count_params
from resnetlab.models.factory import MODELS, OPTION_NAMES, create_model, list_models, model_info
from resnetlab.models.layers import ZeroPadShortcut
from resnetlab.models.pretrained import load_pretrained, load_state_dict_file
from resnetlab.models.resnet import ResNet, ResNetConfig

__all__ = [
    "MODELS", "OPTION_NAMES", "VARIANTS", "ResNet", "ResNetConfig", "ZeroPadShortcut", "complexity",
    "count_macs", "count_params", "create_model", "list_models", "load_pretrained", "load_state_dict_file",
    "model_info",
]
