"""The model registry and what every registered model must do: exact sizes, forward/backward,
export, pickling, state_dict round trips. Parametrised over `list_models()` itself, so a newly
registered model is tested without touching this file."""
from __future__ import annotations

import io
import math
import pickle

import pytest
import torch
from torch import nn

import resnetlab
from resnetlab.errors import ConfigError, ResnetlabError
from resnetlab.models import (
    OPTION_NAMES, VARIANTS, count_macs, count_params, create_model, list_models, model_info,
)

CIFAR_NAMES = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
               "plain20", "plain32", "plain44", "plain56", "plain110"]
IMAGENET_NAMES = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "plain18", "plain34"]
# Models too big for batch 2 in a quick suite run at batch 1; ImageNet ones run on 64x64 inputs.
BATCH_ONE = {"resnet1202", "resnet152", "resnet101"}


@pytest.fixture(autouse=True)
def _one_thread():
    # These nets run thousands of tiny convs: a second intra-op thread gains nothing there and,
    # on a shared 2-core machine, spin-waiting threads make them several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def meta_model(name: str, **options) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **options)


# --- registry -------------------------------------------------------------------------------

def test_registry_lists_exactly_the_papers_models():
    assert list_models() == CIFAR_NAMES + IMAGENET_NAMES
    assert list_models("plain*") == ["plain20", "plain32", "plain44", "plain56", "plain110", "plain18", "plain34"]
    assert list_models("resnet1*") == ["resnet110", "resnet1202", "resnet18", "resnet101", "resnet152"]
    assert list_models("nothing*") == []


def test_top_level_package_exports_the_model_api():
    assert resnetlab.create_model is create_model
    assert resnetlab.list_models is list_models


@pytest.mark.parametrize("name, n, plain", [("resnet8", 1, False), ("resnet14", 2, False), ("resnet164", 27, False),
                                            ("plain14", 2, True), ("plain8", 1, True)])
def test_any_6n_plus_2_depth_resolves_by_name(name, n, plain):
    model = meta_model(name)
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [n, n, n]
    assert model_info(name)["family"] == "cifar" and model_info(name)["plain"] is plain
    assert (model.cfg.shortcut is None) is plain


def test_registered_names_win_over_the_cifar_pattern():
    # 50 = 6*8+2 and 152 = 6*25+2, but these names are the ImageNet networks.
    assert model_info("resnet50")["family"] == "imagenet"
    assert model_info("resnet152")["family"] == "imagenet"


@pytest.mark.parametrize("name", ["resnet21", "resnet2", "plain19", "resnext50", "vgg16", "resnet", ""])
def test_unknown_model_names_are_refused_by_name(name):
    with pytest.raises(ResnetlabError, match=repr(name) if name else "unknown model"):
        create_model(name)


@pytest.mark.parametrize("options, key", [
    ({"shortcut": "D"}, "shortcut"),
    ({"shortcut": "a"}, "shortcut"),
    ({"block": "bottleneck"}, "block"),
    ({"stride_in": "2x2"}, "stride_in"),
    ({"width": 0}, "width"),
    ({"width": -1.0}, "width"),
    ({"width": "2"}, "width"),
    ({"width": 0.01}, "width"),
    ({"in_channels": 0}, "in_channels"),
    ({"in_channels": 1.5}, "in_channels"),
    ({"zero_init_residual": "yes"}, "zero_init_residual"),
    ({"num_classes": 0}, "num_classes"),
    ({"num_classes": True}, "num_classes"),
    ({"dropout": 0.1}, "dropout"),
])
def test_invalid_options_raise_config_error_naming_the_option(options, key):
    with pytest.raises(ConfigError, match=key):
        create_model("resnet8", **options)


@pytest.mark.parametrize("options, key", [({"shortcut": "B"}, "shortcut"), ({"zero_init_residual": True}, "zero_init_residual")])
def test_plain_nets_refuse_shortcut_options(options, key):
    with pytest.raises(ConfigError, match=key):
        create_model("plain20", **options)


def test_none_options_mean_the_family_default():
    assert meta_model("resnet20", shortcut=None).cfg.shortcut == "A"
    assert meta_model("resnet18", shortcut=None).cfg.shortcut == "B"
    assert meta_model("plain20", shortcut=None).cfg.shortcut is None


@pytest.mark.parametrize("name", CIFAR_NAMES + IMAGENET_NAMES)
def test_model_info_and_default_cfg_describe_the_family(name):
    info = model_info(name)
    cifar = name in CIFAR_NAMES
    assert info["family"] == ("cifar" if cifar else "imagenet")
    assert info["input_size"] == ([3, 32, 32] if cifar else [3, 224, 224])
    assert info["num_classes"] == (10 if cifar else 1000)
    assert info["depth"] == int(name.removeprefix("resnet").removeprefix("plain"))
    model = meta_model(name)
    assert model.default_cfg["family"] == info["family"]
    assert model.default_cfg["input_size"] == info["input_size"]
    assert model.fc.out_features == info["num_classes"]


def test_default_cfg_follows_the_options_and_rebuilds_the_model():
    model = meta_model("resnet20", num_classes=100, in_channels=1, shortcut="B", width=2)
    cfg = model.default_cfg
    assert cfg["input_size"] == [1, 32, 32] and cfg["num_classes"] == 100 and cfg["shortcut"] == "B"
    rebuilt = meta_model(cfg["name"], num_classes=cfg["num_classes"], **cfg["options"])
    assert rebuilt.cfg == model.cfg
    assert count_params(model) == count_params(rebuilt)


def test_every_option_name_is_accepted():
    assert set(OPTION_NAMES) == {"shortcut", "block", "stride_in", "zero_init_residual", "width", "in_channels"}


# --- paper invariants: sizes and cost ---------------------------------------------------------

PARAMS = {
    "resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018,
    "resnet110": 1_727_962, "resnet1202": 19_421_274,
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
    "resnet101": 44_549_160, "resnet152": 60_192_808,
}


@pytest.mark.parametrize("name, expected", PARAMS.items())
def test_exact_parameter_counts(name, expected):
    assert count_params(meta_model(name)) == expected


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "resnet18", "resnet34", "resnet50"])
def test_shortcut_options_order_parameters_a_b_c(name):
    a, b, c = (count_params(meta_model(name, shortcut=s)) for s in "ABC")
    assert a < b < c


def test_plain_nets_have_the_parameters_of_option_a():
    # Option A adds no parameters, so a ResNet-A and its plain counterpart are the same size.
    for depth in (20, 56, 110):
        assert count_params(meta_model(f"plain{depth}")) == count_params(meta_model(f"resnet{depth}"))
    assert count_params(meta_model("plain34")) == count_params(meta_model("resnet34", shortcut="A")) == 21_623_848


MACS = [
    ("resnet20", {}, 40.55e6), ("resnet18", {}, 1.82e9), ("resnet34", {}, 3.66e9),
    ("resnet50", {"stride_in": "1x1"}, 3.86e9), ("resnet50", {"stride_in": "3x3"}, 4.09e9),
    ("resnet101", {}, 7.57e9), ("resnet152", {}, 11.28e9),
]


@pytest.mark.parametrize("name, options, expected", MACS)
def test_forward_multiply_adds_match_the_paper(name, options, expected):
    model = meta_model(name, **options)
    macs = count_macs(model, model.default_cfg["input_size"])
    assert abs(macs - expected) / expected < 0.02


def test_resnet20_multiply_adds_exactly():
    # 3x3 convs + the classifier: 442,368 + 6*2,359,296 + 2*(1,179,648 + 5*2,359,296) + 640.
    assert count_macs(meta_model("resnet20"), (3, 32, 32)) == 40_551_040


def test_count_macs_leaves_the_model_as_it_was():
    model = create_model("resnet8")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.training
    count_macs(model, (3, 32, 32))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert count_macs(model, (4, 3, 32, 32)) == 4 * count_macs(model, (3, 32, 32))


# --- every registered model runs ------------------------------------------------------------

@pytest.mark.parametrize("name", list_models())
def test_forward_and_backward_of_every_registered_model(name):
    info = model_info(name)
    model = create_model(name, num_classes=7)
    batch = 1 if name in BATCH_ONE else 2
    # ImageNet nets are fully convolutional up to the pooling: 64x64 keeps the test fast.
    size = 32 if info["family"] == "cifar" else 64
    x = torch.randn(batch, info["input_size"][0], size, size, requires_grad=True)
    out = model(x)
    assert out.shape == (batch, 7)
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters())


COMBOS = [(b, s) for b in VARIANTS for s in "ABC"]


@pytest.mark.parametrize("block, shortcut", COMBOS)
def test_every_block_and_shortcut_combination_runs(block, shortcut):
    for name, size in (("resnet8", 16), ("resnet50", 64)):
        model = create_model(name, block=block, shortcut=shortcut, num_classes=3, width=0.25)
        out = model(torch.randn(2, 3, size, size))
        assert out.shape == (2, 3)
        out.sum().backward()


@pytest.mark.parametrize("block", VARIANTS)
@pytest.mark.parametrize("name", ["plain8", "plain18"])
def test_plain_nets_take_every_block_variant(name, block):
    model = create_model(name, block=block, num_classes=3, width=0.25)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_width_and_in_channels_change_the_layers():
    model = create_model("resnet20", width=2, in_channels=1)
    assert model.conv1.weight.shape == (32, 1, 3, 3)
    assert model.fc.in_features == 128
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


# --- init -----------------------------------------------------------------------------------

def test_he_init_for_convs_and_identity_batchnorm():
    torch.manual_seed(0)
    model = create_model("resnet56")
    conv = model.layer2[1].conv1  # 32 -> 32, 3x3: fan_out = 32 * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (32 * 9)), rel=0.05)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)


@pytest.mark.parametrize("name", ["resnet20", "resnet50"])
def test_zero_init_residual_makes_every_block_start_as_the_shortcut(name):
    model = create_model(name, zero_init_residual=True, width=0.25).eval()
    last_bn = "bn3" if model_info(name)["block_type"] == "bottleneck" else "bn2"
    for stage in model.stage_names:
        for block in getattr(model, stage):
            assert torch.all(getattr(block, last_bn).weight == 0)
            x = torch.randn(2, block.conv1.in_channels, 16, 16)
            shortcut = x if block.downsample is None else block.downsample(x)
            assert torch.equal(block(x), torch.relu(shortcut))
    assert not torch.all(create_model(name, width=0.25).layer1[0].get_submodule(last_bn).weight == 0)


@pytest.mark.parametrize("block", ["preact", "bn_after_add", "bn_after_add_no_relu"])
def test_zero_init_residual_zeroes_the_branch_when_it_ends_in_a_conv(block):
    model = create_model("resnet8", block=block, zero_init_residual=True)
    assert torch.all(model.layer1[0].conv2.weight == 0)


# --- export, pickling, state_dict round trip -------------------------------------------------

def test_resnet20_exports_with_torch_export():
    model = create_model("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x))


@pytest.mark.parametrize("name, options", [("resnet20", {}), ("resnet20", {"shortcut": "B"}), ("plain20", {}),
                                           ("resnet8", {"block": "preact"}), ("resnet18", {"width": 0.25})])
def test_models_pickle_and_keep_their_outputs(name, options):
    model = create_model(name, **options).eval()
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(clone(x), model(x))
    assert clone.default_cfg == model.default_cfg


@pytest.mark.parametrize("name, options", [("resnet20", {}), ("resnet20", {"shortcut": "C"}), ("resnet8", {"block": "preact"}),
                                           ("resnet50", {"width": 0.25, "block": "preact"}), ("plain18", {"width": 0.25})])
def test_state_dict_round_trip_reproduces_the_outputs(name, options):
    torch.manual_seed(1)
    model = create_model(name, **options)
    model(torch.randn(4, 3, 32, 32))  # move the BN running stats away from their init
    model.eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(2)
    other = create_model(name, **options).eval()
    other.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(other(x), model(x))
