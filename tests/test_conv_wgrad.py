"""The 3x3 convolution weight-gradient CPU kernel (kernels/conv_wgrad.cpp, kernels/conv3x3.py): the
float64 gradient from the same bf16 tensors to fp32 accuracy, nothing else changed, used exactly where
it applies; runtime.conv_wgrad's modes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.config import RuntimeSection
from resnetlab.engine.runtime import resolve_runtime
from resnetlab.errors import ConfigError
from resnetlab.kernels import conv3x3_train, conv_weight_grad, fused_bn_relu, load_conv_wgrad_extension
from resnetlab.kernels import conv3x3 as conv3x3_module
from resnetlab.models import create_model

from convkit import channels_last_bf16, train_conv3x3

needs_kernel = pytest.mark.skipif(load_conv_wgrad_extension() is None,
                                  reason="the kernel needs AVX-512 BF16 and a C++ compiler with ninja")


def float64_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, out_channels: int, stride: int) -> torch.Tensor:
    weight = torch.zeros(out_channels, x.shape[1], 3, 3, dtype=torch.float64)
    return torch.ops.aten.convolution_backward(grad_out.double(), x.double(), weight, None, [stride] * 2, [1, 1],
                                               [1, 1], False, [0, 0], 1, [False, True, False])[1]


@needs_kernel
@pytest.mark.parametrize("batch, in_channels, out_channels, size, stride", [
    (6, 16, 16, 32, 1), (5, 16, 32, 32, 2), (4, 32, 32, 16, 1), (3, 32, 64, 16, 2), (9, 64, 64, 8, 1),
    (2, 16, 48, 7, 2),  # odd sizes: the last output pixel reads the zero border
    (1, 32, 16, 5, 1),  # a single image: paired with zeros
    (19, 64, 64, 8, 1),  # several groups of pairs per thread, the last one odd: prefetches stop at the batch's end
])
def test_the_kernel_gives_the_float64_weight_gradient(batch, in_channels, out_channels, size, stride):
    x = channels_last_bf16(batch, in_channels, size, size, seed=0)
    out_size = (size - 1) // stride + 1
    grad_out = channels_last_bf16(batch, out_channels, out_size, out_size, seed=1)
    grad = load_conv_wgrad_extension().weight_grad(grad_out, x, stride)
    expected = float64_weight_grad(grad_out, x, out_channels, stride)
    assert grad.dtype == torch.float32 and grad.shape == expected.shape
    # fp32 sums of exact bf16 products: a few fp32 roundings, far below one bf16 rounding (2^-9)
    assert torch.allclose(grad.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("stride", [1, 2])
def test_with_onednns_forward_the_kernel_changes_only_the_weight_gradient(monkeypatch, stride):
    monkeypatch.setattr(conv3x3_module, "FORWARD_KERNEL", False)  # the forward kernel: tests/test_conv_fwd.py
    conv, x, out, grad_out = train_conv3x3(stride)
    kernel_x_grad, kernel_w_grad = x.grad.clone(), conv.weight.grad.clone()
    x.grad, conv.weight.grad = None, None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        native = conv(x)
    native.backward(grad_out)
    assert torch.equal(out, native) and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(kernel_x_grad, x.grad)
    assert kernel_w_grad.dtype == torch.float32 and kernel_w_grad.shape == conv.weight.shape
    expected = float64_weight_grad(grad_out, x.detach(), 32, stride)
    assert torch.allclose(kernel_w_grad.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # the native gradient went through bf16: within bf16 rounding of the kernel's
    assert torch.allclose(conv.weight.grad, kernel_w_grad, rtol=2**-7, atol=2**-7 * expected.abs().max().item())


@needs_kernel
def test_the_kernel_runs_only_where_it_applies(monkeypatch):
    calls = []
    original = conv3x3_module._Conv3x3.apply
    monkeypatch.setattr(conv3x3_module._Conv3x3, "apply", lambda *args: calls.append(1) or original(*args))
    conv16 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    x = channels_last_bf16(2, 16, 8, 8, seed=0)

    def used(conv, x, *, context=True, grad=True) -> bool:
        calls.clear()
        with fused_bn_relu(context), torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            conv3x3_train(conv, x)
        return bool(calls)

    assert used(conv16, x)
    assert not used(conv16, x, context=False)  # runtime.fused_bn off
    assert not used(conv16, x, grad=False)  # inference
    assert not used(conv16, x.float())  # fp32
    assert not used(conv16, x.contiguous())  # NCHW
    assert not used(nn.Conv2d(16, 16, 3, padding=1, bias=True), x)
    assert not used(nn.Conv2d(16, 16, 3, padding=2, dilation=2, bias=False), x)
    assert not used(nn.Conv2d(16, 24, 3, padding=1, bias=False), x)  # 24 channels: not a multiple of 16
    assert not used(nn.Conv2d(16, 16, 1, bias=False), x)
    assert not used(nn.Conv2d(16, 128, 3, padding=1, bias=False), x)  # wider than measured faster
    assert not used(conv16, channels_last_bf16(1, 16, 40, 40, seed=0))  # a larger map than measured faster


@needs_kernel
def test_resnet20_gradients_with_the_kernel_match_the_native_ones():
    """The whole model in the engine's CPU configuration: only the weight gradients of the 3x3
    convolutions change, by no more than their bf16 rounding on the native path."""
    torch.manual_seed(0)
    model = create_model("resnet20").to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    grads = []
    for use_kernel in (True, False):
        model.zero_grad(set_to_none=True)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.MonkeyPatch.context() as patch:
            if not use_kernel:
                patch.setattr(conv3x3_module, "kernel_applies", lambda conv, x: False)
            with torch.autocast("cpu", dtype=torch.bfloat16), fused_bn_relu():
                out = model(x)
            F.cross_entropy(out.float(), torch.arange(8) % 10).backward()
        model.load_state_dict(state)
        grads.append({name: p.grad for name, p in model.named_parameters()})
    kernel, native = grads
    for name in kernel:
        scale = native[name].abs().max().item()
        assert torch.allclose(kernel[name], native[name], rtol=0.05, atol=0.05 * scale), name


def test_without_the_kernel_the_native_convolution_runs(monkeypatch):
    monkeypatch.setattr(conv3x3_module, "load_conv_wgrad_extension", lambda: None)
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    x = channels_last_bf16(2, 16, 8, 8, seed=0)
    with fused_bn_relu(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not conv3x3_module.kernel_applies(conv, x)
        assert torch.equal(conv3x3_train(conv, x), conv(x))


def weight_grad_in_mode(mode: str, stride: int = 1) -> torch.Tensor:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, stride=stride, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = channels_last_bf16(4, 16, 12, 12, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16), fused_bn_relu(), conv_weight_grad(mode):
        out = conv3x3_train(conv, x)
    out.backward(channels_last_bf16(*out.shape, seed=3))
    return conv.weight.grad


@needs_kernel
@pytest.mark.parametrize("stride", [1, 2])
def test_kernel_bf16_rounds_the_kernel_gradient_as_onednn_does(stride):
    kernel, rounded, native = (weight_grad_in_mode(mode, stride) for mode in ("kernel", "kernel-bf16", "native"))
    assert rounded.dtype == torch.float32
    assert torch.equal(rounded, kernel.to(torch.bfloat16).float())
    assert not torch.equal(kernel, kernel.to(torch.bfloat16).float())  # the plain kernel's result is not rounded
    # oneDNN's bf16 gradient and the rounded kernel's differ only where the fp32 sums round differently
    close = torch.isclose(rounded, native, rtol=2**-7, atol=0)
    assert close.float().mean() > 0.99


@needs_kernel
def test_native_mode_takes_onednns_weight_gradient(monkeypatch):
    native = weight_grad_in_mode("native")

    class NoWeightGradient:
        def weight_grad(self, *args):
            pytest.fail("the weight-gradient kernel ran")

    monkeypatch.setattr(conv3x3_module, "load_conv_wgrad_extension", lambda: NoWeightGradient())
    assert torch.equal(weight_grad_in_mode("native"), native)
    with pytest.MonkeyPatch.context() as patch:  # and exactly what the native convolution under autocast gives
        patch.setattr(conv3x3_module, "kernel_applies", lambda conv, x: False)
        assert torch.equal(weight_grad_in_mode("kernel"), native)


def test_an_unknown_weight_gradient_mode_is_refused():
    with pytest.raises(ValueError, match="unknown weight-gradient mode"):
        with conv_weight_grad("fast"):
            pass


@needs_kernel
def test_runtime_conv_wgrad_resolves_to_the_kernel_where_it_runs(monkeypatch):
    assert resolve_runtime(RuntimeSection(device="cpu", precision="bf16")).conv_wgrad == "kernel"
    assert resolve_runtime(RuntimeSection(device="cpu", precision="bf16", conv_wgrad="kernel-bf16")).conv_wgrad == "kernel-bf16"
    assert resolve_runtime(RuntimeSection(device="cpu", precision="fp32")).conv_wgrad == "native"
    assert resolve_runtime(RuntimeSection(device="cpu", precision="bf16", fused_bn=False)).conv_wgrad == "native"
    with pytest.raises(ConfigError, match="conv_wgrad=kernel needs runtime.fused_bn"):
        resolve_runtime(RuntimeSection(device="cpu", precision="bf16", fused_bn=False, conv_wgrad="kernel"))
    calls = []
    real_apply = conv3x3_module._Conv3x3.apply
    monkeypatch.setattr(conv3x3_module._Conv3x3, "apply", lambda *args: calls.append(args[3]) or real_apply(*args))
    conv, x = nn.Conv2d(16, 16, 3, padding=1, bias=False), channels_last_bf16(2, 16, 8, 8, seed=0)
    for mode in ("kernel", "kernel-bf16", "native"):
        with resolve_runtime(RuntimeSection(device="cpu", precision="bf16", conv_wgrad=mode)).autocast():
            conv3x3_train(conv, x)
    assert calls == ["kernel", "kernel-bf16", "native"]  # the weight-gradient mode each call ran with


def test_runtime_conv_wgrad_without_the_kernel(monkeypatch):
    from resnetlab.engine import runtime as runtime_module
    monkeypatch.setattr(runtime_module, "load_conv_wgrad_extension", lambda: None)
    assert resolve_runtime(RuntimeSection(device="cpu", precision="fp32")).conv_wgrad == "native"
    with pytest.raises(ConfigError, match="AVX-512 BF16"):
        resolve_runtime(RuntimeSection(device="cpu", precision="fp32", conv_wgrad="kernel-bf16"))


@needs_kernel
def test_the_saved_config_says_where_the_weight_gradient_came_from():
    from resnetlab.config import RunConfig
    from resnetlab.engine.setup import resolved_config

    config = RunConfig().replace(**{"model.name": "resnet20", "runtime.device": "cpu", "runtime.precision": "bf16"})
    assert resolved_config(config).runtime.conv_wgrad == "kernel"
    assert resolved_config(config.replace(**{"runtime.conv_wgrad": "kernel-bf16"})).runtime.conv_wgrad == "kernel-bf16"
    assert resolved_config(config.replace(**{"runtime.precision": "fp32"})).runtime.conv_wgrad == "native"
