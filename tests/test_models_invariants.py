"""Architecture invariants: the shortcut options, the building-block variants, plain nets, the
pre-activation block, torchvision's state_dict layout and output equivalence with independent
re-implementations of torchvision's ResNet (v1.5) and akamaster's CIFAR ResNet."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.models import ZeroPadShortcut, count_params, create_model, list_models, load_pretrained, model_info
from test_models import _one_thread, meta_model  # noqa: F401  (autouse fixture)

POST_ACTIVATION = ["reference", "no_relu", "bn_after_add", "bn_after_add_no_relu"]


def blocks_of(model: nn.Module):
    return [block for name in model.stage_names for block in getattr(model, name)]


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere, BN affine parameters and running statistics included, so that
    an eval-mode comparison exercises every tensor of the state_dict."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():  # num_batches_tracked
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.dim() == 1:  # BN gamma around 1; BN beta, running means, fc bias around 0
                tensor.copy_(0.1 * noise + (1.0 if name.endswith("weight") else 0.0))
            else:
                tensor.copy_(noise * (2.0 / tensor[0].numel()) ** 0.5)
    return model


# --- shortcuts ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in list_models("resnet*") if model_info(n)["family"] == "cifar"])
def test_option_a_shortcuts_have_no_parameters(name):
    model = meta_model(name)
    shortcuts = [b.downsample for b in blocks_of(model) if b.downsample is not None]
    assert len(shortcuts) == 2  # the first block of stages 2 and 3
    assert all(isinstance(s, ZeroPadShortcut) and count_params(s) == 0 for s in shortcuts)
    assert count_params(model) == count_params(meta_model(name.replace("resnet", "plain")))


def test_option_a_is_a_visible_module_that_pads_half_before_half_after():
    model = create_model("resnet20")
    assert "ZeroPadShortcut(16, 32, stride=2)" in repr(model)
    shortcut = model.layer2[0].downsample
    x = torch.randn(2, 16, 32, 32)
    out = shortcut(x)
    assert out.shape == (2, 32, 16, 16)
    # akamaster's layout: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4)).
    assert torch.equal(out, F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8)))
    assert torch.all(out[:, :8] == 0) and torch.all(out[:, 24:] == 0)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])


@pytest.mark.parametrize("size", [32, 7])
def test_option_a_subsamples_exactly_like_a_strided_slice_forward_and_backward(size):
    shortcut = ZeroPadShortcut(16, 32, stride=2)
    x = torch.randn(2, 16, size, size, dtype=torch.float64, requires_grad=True)
    out = shortcut(x)
    assert torch.equal(out, F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8)))
    upstream = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, upstream)
    expected = torch.zeros_like(x)
    expected[:, :, ::2, ::2] = upstream[:, 8:24]
    assert torch.equal(grad, expected)


def test_channels_last_gradients_stay_channels_last_through_option_a():
    # A gradient in another memory format sends the backward pass at the end of each stage down
    # slower mixed-format kernels; every block's output gradient must keep channels_last.
    model = create_model("resnet20").to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    formats = []

    def record_gradient_format(module, args, out):
        out.register_hook(lambda grad: formats.append(grad.is_contiguous(memory_format=torch.channels_last)))

    for block in [*model.layer1, *model.layer2, *model.layer3]:
        block.register_forward_hook(record_gradient_format)
    model(x).sum().backward()
    assert len(formats) == 9 and all(formats)


def test_option_a_pads_odd_channel_differences():
    out = ZeroPadShortcut(3, 8, stride=1)(torch.ones(1, 3, 4, 4))
    assert out[0, :, 0, 0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]


def reshapes(block: nn.Module) -> bool:
    out_channels = (block.bn3 if hasattr(block, "bn3") else block.bn2).num_features
    strided = block.conv1.stride != (1, 1) or block.conv2.stride != (1, 1)
    return strided or block.conv1.in_channels != out_channels


@pytest.mark.parametrize("name, projections, blocks", [("resnet20", 2, 9), ("resnet34", 3, 16), ("resnet50", 4, 16)])
def test_option_b_projects_where_the_shape_changes_and_c_everywhere(name, projections, blocks):
    model_b, model_c = meta_model(name, shortcut="B"), meta_model(name, shortcut="C")
    projected = [b for b in blocks_of(model_b) if b.downsample is not None]
    assert projected == [b for b in blocks_of(model_b) if reshapes(b)] and len(projected) == projections
    for block in projected + [b for b in blocks_of(model_c)]:
        conv, bn = block.downsample
        assert conv.kernel_size == (1, 1) and isinstance(bn, nn.BatchNorm2d)
    assert len(blocks_of(model_c)) == blocks


def test_plain_nets_have_no_shortcut_at_all():
    for name in list_models("plain*"):
        model = meta_model(name)
        assert all(b.downsample is None and not b.residual for b in blocks_of(model))
        assert "downsample" not in " ".join(model.state_dict())


def test_a_plain_block_is_the_residual_block_without_the_addition():
    resnet, plain = create_model("resnet8").eval(), create_model("plain8").eval()
    randomize_(resnet)
    plain.load_state_dict(resnet.state_dict())  # same keys: option A adds none
    x = torch.randn(2, 16, 8, 8)
    r, p = resnet.layer1[0], plain.layer1[0]
    branch = r.bn2(r.conv2(torch.relu(r.bn1(r.conv1(x)))))
    assert torch.equal(p(x), torch.relu(branch))
    assert torch.equal(r(x), torch.relu(branch + x))
    images = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(resnet(images), plain(images))


# --- building-block variants (seed 000) and pre-activation ---------------------------------------

def variant_blocks(seed: int = 0) -> dict[str, nn.Module]:
    """The first block of resnet8 in each post-activation variant, all with the same weights."""
    source = randomize_(create_model("resnet8"), seed).layer1[0]
    blocks = {}
    for variant in POST_ACTIVATION:
        block = create_model("resnet8", block=variant).layer1[0]
        block.load_state_dict(source.state_dict())
        blocks[variant] = block
    return blocks


def test_block_variants_compute_the_four_orderings():
    x = torch.randn(4, 16, 8, 8)
    blocks = variant_blocks()
    for block in blocks.values():
        block.eval()
    b = blocks["reference"]
    branch = b.conv2(torch.relu(b.bn1(b.conv1(x))))
    expected = {
        "reference": torch.relu(b.bn2(branch) + x),
        "no_relu": b.bn2(branch) + x,
        "bn_after_add": torch.relu(b.bn2(branch + x)),
        "bn_after_add_no_relu": b.bn2(branch + x),
    }
    outputs = {variant: block(x) for variant, block in blocks.items()}
    for variant in POST_ACTIVATION:
        assert torch.equal(outputs[variant], expected[variant]), variant
    for i, first in enumerate(POST_ACTIVATION):
        for second in POST_ACTIVATION[i + 1:]:
            assert not torch.allclose(outputs[first], outputs[second]), (first, second)


def test_no_relu_blocks_output_negative_values_and_relu_blocks_do_not():
    x = torch.randn(4, 16, 8, 8)
    outputs = {variant: block(x) for variant, block in variant_blocks().items()}
    assert (outputs["reference"] >= 0).all() and (outputs["bn_after_add"] >= 0).all()
    assert (outputs["no_relu"] < 0).any() and (outputs["bn_after_add_no_relu"] < 0).any()
    whole = create_model("resnet20", block="no_relu").train()
    assert (whole.layer1(torch.relu(whole.bn1(whole.conv1(torch.randn(4, 3, 32, 32))))) < 0).any()


def test_bn_after_add_normalises_the_sum():
    # Training mode, fresh BN (gamma 1, beta 0): whatever the shortcut carries, the block output
    # has per-channel batch mean 0 and variance 1 when the BN comes after the addition.
    x = 3.0 + 2.0 * torch.randn(8, 16, 8, 8)
    for variant in POST_ACTIVATION:
        block = create_model("resnet8", block=variant).layer1[0].train()
        out = block(x)
        mean, var = out.mean(dim=(0, 2, 3)), out.var(dim=(0, 2, 3), unbiased=False)
        if variant == "bn_after_add_no_relu":
            torch.testing.assert_close(mean, torch.zeros(16), atol=1e-5, rtol=0)
            torch.testing.assert_close(var, torch.ones(16), atol=1e-3, rtol=0)
        elif variant == "bn_after_add":
            assert torch.all((mean - 0.3989).abs() < 0.05)  # E[relu(N(0,1))] = 1/sqrt(2 pi)
        else:
            assert torch.all(mean > 2.0)  # the shortcut's mean 3 passes through un-normalised


def test_preact_block_normalises_before_each_conv_and_ends_with_bn_relu():
    model = create_model("resnet8", block="preact").eval()
    randomize_(model)
    assert model.bn1 is None and isinstance(model.final_bn, nn.BatchNorm2d)  # CIFAR stem: conv only
    block = model.layer1[0]
    x = torch.randn(2, 16, 8, 8)
    expected = x + block.conv2(torch.relu(block.bn2(block.conv1(torch.relu(block.bn1(x))))))
    assert torch.equal(block(x), expected)
    assert (block(x) < 0).any()
    # A projection reads the pre-activated input and has no BN of its own (He et al. 2016).
    down = create_model("resnet8", block="preact", shortcut="B").eval().layer2[0]
    x = torch.randn(2, 16, 8, 8)
    pre = torch.relu(down.bn1(x))
    assert len(down.downsample) == 1
    assert torch.equal(down(x), down.downsample(pre) + down.conv2(torch.relu(down.bn2(down.conv1(pre)))))
    # Before pooling: the final BN-ReLU.
    features = model.forward_features(torch.randn(2, 3, 32, 32))
    assert (features >= 0).all()


def test_preact_imagenet_keeps_the_stem_bn_and_skips_the_first_preactivation():
    model = meta_model("resnet50", block="preact")
    assert isinstance(model.bn1, nn.BatchNorm2d) and model.layer1[0].bn1 is None
    assert all(isinstance(b.bn1, nn.BatchNorm2d) for b in blocks_of(model)[1:])
    assert count_params(model) != count_params(meta_model("resnet50"))


# --- torchvision layout and v1.5 equivalence -------------------------------------------------

STAGES = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet34": ("basic", [3, 4, 6, 3]),
          "resnet50": ("bottleneck", [3, 4, 6, 3]), "resnet101": ("bottleneck", [3, 4, 23, 3]),
          "resnet152": ("bottleneck", [3, 8, 36, 3])}


def torchvision_keys(name: str) -> dict[str, tuple[int, ...]]:
    """torchvision's state_dict keys and shapes, derived from the architecture alone."""
    kind, counts = STAGES[name]
    expansion = 1 if kind == "basic" else 4
    keys: dict[str, tuple[int, ...]] = {}

    def conv_bn(prefix_conv: str, prefix_bn: str, cin: int, cout: int, k: int) -> None:
        keys[f"{prefix_conv}.weight"] = (cout, cin, k, k)
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix_bn}.{suffix}"] = (cout,)
        keys[f"{prefix_bn}.num_batches_tracked"] = ()

    conv_bn("conv1", "bn1", 3, 64, 7)
    inplanes = 64
    for stage, (planes, count) in enumerate(zip([64, 128, 256, 512], counts), start=1):
        for i in range(count):
            p = f"layer{stage}.{i}"
            if kind == "basic":
                conv_bn(f"{p}.conv1", f"{p}.bn1", inplanes, planes, 3)
                conv_bn(f"{p}.conv2", f"{p}.bn2", planes, planes, 3)
            else:
                conv_bn(f"{p}.conv1", f"{p}.bn1", inplanes, planes, 1)
                conv_bn(f"{p}.conv2", f"{p}.bn2", planes, planes, 3)
                conv_bn(f"{p}.conv3", f"{p}.bn3", planes, planes * 4, 1)
            if i == 0 and (stage > 1 or inplanes != planes * expansion):
                conv_bn(f"{p}.downsample.0", f"{p}.downsample.1", inplanes, planes * expansion, 1)
            inplanes = planes * expansion
    keys["fc.weight"], keys["fc.bias"] = (1000, 512 * expansion), (1000,)
    return keys


@pytest.mark.parametrize("name, total", [("resnet18", 122), ("resnet34", 218), ("resnet50", 320),
                                         ("resnet101", 626), ("resnet152", 932)])
def test_imagenet_state_dict_is_torchvisions(name, total):
    state = meta_model(name).state_dict()
    expected = torchvision_keys(name)
    assert len(expected) == total
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert list(state) == list(expected)  # same order, too


def test_a_few_torchvision_keys_literally():
    r18, r50 = meta_model("resnet18").state_dict(), meta_model("resnet50").state_dict()
    assert r18["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert r18["layer2.0.downsample.1.running_var"].shape == (128,)
    assert "layer1.0.downsample.0.weight" not in r18
    assert r50["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert r50["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert r50["fc.weight"].shape == (1000, 2048)


class _TVBasic(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class _TVBottleneck(nn.Module):
    """torchvision's Bottleneck: the stride sits in the 3x3 conv ("ResNet v1.5")."""

    expansion = 4

    def __init__(self, inplanes, planes, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


class _TVResNet(nn.Module):
    def __init__(self, block, counts):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for stage, (planes, count) in enumerate(zip([64, 128, 256, 512], counts), start=1):
            layers = []
            for i in range(count):
                stride = 2 if stage > 1 and i == 0 else 1
                downsample = None
                if stride != 1 or inplanes != planes * block.expansion:
                    downsample = nn.Sequential(nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                                               nn.BatchNorm2d(planes * block.expansion))
                layers.append(block(inplanes, planes, stride, downsample))
                inplanes = planes * block.expansion
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, 1000)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.mark.parametrize("name, block", [("resnet18", _TVBasic), ("resnet50", _TVBottleneck)])
def test_stride_in_3x3_gives_torchvisions_outputs(name, block):
    ours = randomize_(create_model(name, stride_in="3x3")).eval()
    reference = _TVResNet(block, STAGES[name][1]).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)
        assert torch.equal(ours(x), expected)
        if block is _TVBottleneck:  # the paper's layout (stride in the 1x1) is another function
            v1 = create_model(name)
            v1.load_state_dict(ours.state_dict(), strict=True)
            assert not torch.allclose(v1.eval()(x), expected)


def test_torchvision_style_checkpoint_loads_strict(tmp_path):
    reference = randomize_(_TVResNet(_TVBasic, [2, 2, 2, 2]), seed=3).eval()
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(reference.state_dict(), path)
    ours = load_pretrained(create_model("resnet18"), path, strict=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))


# --- akamaster/pytorch_resnet_cifar10 equivalence ----------------------------------------------

class _AkaPad(nn.Module):
    """Their LambdaLayer(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes//4, planes//4))), lambda-free."""

    def __init__(self, planes):
        super().__init__()
        self.planes = planes

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.planes // 4, self.planes // 4), "constant", 0)


class _AkaBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _AkaPad(planes) if stride != 1 or in_planes != planes else nn.Sequential()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class _AkaResNet(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for stage, (planes, stride) in enumerate([(16, 1), (32, 2), (64, 2)], start=1):
            blocks = []
            for i in range(n):
                blocks.append(_AkaBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


@pytest.mark.parametrize("depth", [20, 32])
def test_akamaster_checkpoint_gives_exactly_their_outputs(tmp_path, depth):
    reference = randomize_(_AkaResNet((depth - 2) // 6), seed=depth).eval()
    # Their released files: DataParallel keys ("module.") under "state_dict", next to best_prec1.
    checkpoint = {"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}, "best_prec1": 91.7}
    path = tmp_path / f"resnet{depth}-12fca82f.th"
    torch.save(checkpoint, path)
    ours = load_pretrained(create_model(f"resnet{depth}"), path, strict=True).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))
        assert torch.equal(ours.train()(x), reference.train()(x))  # batch statistics too
