"""Winograd F(2x2, 3x3) for the stride-1 3x3 convolutions (kernels/conv_winograd.cpp): the transformed
weights are G w G^T, forward passes and input gradients are the float64 convolution within the
rounding of the bf16 transforms, and the training path uses it exactly where runtime.conv_winograd
and the shapes say."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.config import RuntimeSection
from resnetlab.engine.runtime import resolve_runtime
from resnetlab.errors import ConfigError
from resnetlab.kernels import conv3x3 as conv3x3_module
from resnetlab.kernels import conv3x3_train, conv_winograd, fused_bn_relu, load_conv_winograd_extension

from convkit import channels_last_bf16

needs_kernel = pytest.mark.skipif(load_conv_winograd_extension() is None,
                                  reason="the kernel needs AVX-512 BF16 and a C++ compiler with ninja")
G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
SHAPES = [(2, 16, 16, 32), (2, 32, 32, 16), (3, 64, 64, 8), (2, 16, 64, 8), (2, 64, 16, 16)]  # batch, in, out, size


def bf16_weight(out_channels: int, in_channels: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(out_channels, in_channels, 3, 3, generator=generator) / (9 * in_channels) ** 0.5).to(torch.bfloat16)


def assert_within_winograd_rounding(result: torch.Tensor, exact: torch.Tensor) -> None:
    """The bf16 transforms cost about three times the direct kernel's error (one bf16 rounding of the
    result, mean 1.4e-3 of the mean |y| on these shapes, 4.3e-3 measured here); a wrong transform,
    tile or channel index is off by the size of the values themselves."""
    assert result.dtype == torch.bfloat16 and result.shape == exact.shape
    assert result.is_contiguous(memory_format=torch.channels_last)
    error, scale = (result.double() - exact).abs(), exact.abs().mean()
    assert error.mean() < 8e-3 * scale
    assert error.max() < 6e-2 * scale


@needs_kernel
def test_the_transformed_weights_are_g_w_gt_packed_in_channel_pairs():
    kernel = load_conv_winograd_extension()
    w = bf16_weight(32, 16, seed=0)
    u = torch.einsum("ik,ockl,jl->ijoc", G, w.double(), G)  # [4][4][out][in]
    packed = kernel.winograd_weights(w, False)  # [16 positions][out/16][in/2][16 out lanes][2 in]
    assert packed.shape == (16, 2, 8, 16, 2) and packed.dtype == torch.bfloat16
    unpacked = packed.double().permute(0, 1, 3, 2, 4).reshape(4, 4, 32, 16)
    assert (unpacked - u).abs().max() <= 2**-8 * u.abs().max()
    flipped = w.flip(2, 3).transpose(0, 1).contiguous()  # the input gradient's weights
    assert torch.equal(kernel.winograd_weights(w, True), kernel.winograd_weights(flipped, False))


@needs_kernel
@pytest.mark.parametrize("batch, in_channels, out_channels, size", SHAPES)
def test_the_forward_pass_is_the_float64_convolution(batch, in_channels, out_channels, size):
    kernel = load_conv_winograd_extension()
    x, w = channels_last_bf16(batch, in_channels, size, size, seed=1), bf16_weight(out_channels, in_channels, seed=2)
    y = kernel.winograd(x, kernel.winograd_weights(w, False), out_channels)
    assert_within_winograd_rounding(y, F.conv2d(x.double(), w.double(), padding=1))


@needs_kernel
@pytest.mark.parametrize("batch, in_channels, out_channels, size", SHAPES[:3])
def test_training_uses_it_for_the_forward_pass_and_input_gradient(batch, in_channels, out_channels, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    x0 = channels_last_bf16(batch, in_channels, size, size, seed=3)
    grad_out = channels_last_bf16(batch, out_channels, size, size, seed=4)
    results = {}
    for winograd in (False, True):
        x = x0.clone().requires_grad_(True)
        conv.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16), fused_bn_relu(), conv_winograd(winograd):
            out = conv3x3_train(conv, x)
        out.backward(grad_out)
        results[winograd] = (out.detach(), x.grad, conv.weight.grad.clone())
    xd = x0.double().requires_grad_(True)
    wd = conv.weight.detach().to(torch.bfloat16).double().requires_grad_(True)
    exact = F.conv2d(xd, wd, padding=1)
    exact.backward(grad_out.double())
    out, grad_x, grad_w = results[True]
    assert_within_winograd_rounding(out, exact.detach())
    assert_within_winograd_rounding(grad_x, xd.grad)
    assert not torch.equal(out, results[False][0])  # it did take the Winograd path
    if min(in_channels, out_channels) < conv3x3_module.WINOGRAD_WGRAD_MIN_CHANNELS:
        assert torch.equal(grad_w, results[False][2])  # the direct weight-gradient kernel either way
    else:  # Winograd's (tests/test_conv_winograd_wgrad.py)
        assert not torch.equal(grad_w, results[False][2])
        assert (grad_w.double() - wd.grad).abs().mean() < 8e-3 * wd.grad.abs().mean()


@needs_kernel
@pytest.mark.parametrize("channels, size, stride", [(48, 8, 1), (16, 6, 1), (16, 10, 1), (16, 16, 2)])
def test_shapes_it_does_not_cover_take_the_direct_kernel(channels, size, stride):
    conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = channels_last_bf16(2, channels, size, size, seed=5)
    outs = []
    for winograd in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16), fused_bn_relu(), conv_winograd(winograd):
            outs.append(conv3x3_train(conv, x.clone().requires_grad_(True)))
    assert torch.equal(outs[0], outs[1])


@needs_kernel
def test_the_kernel_rejects_what_it_was_not_built_for():
    kernel = load_conv_winograd_extension()
    w = bf16_weight(16, 16, seed=0)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernel.winograd(channels_last_bf16(1, 16, 6, 6, seed=0), kernel.winograd_weights(w, False), 16)
    with pytest.raises(RuntimeError, match="do not match"):
        kernel.winograd(channels_last_bf16(1, 32, 8, 8, seed=0), kernel.winograd_weights(w, False), 16)


@needs_kernel
def test_runtime_conv_winograd_resolves_and_reaches_the_convolutions(monkeypatch):
    assert resolve_runtime(RuntimeSection(device="cpu", precision="bf16")).conv_winograd is True
    assert resolve_runtime(RuntimeSection(device="cpu", precision="bf16", conv_winograd=False)).conv_winograd is False
    assert resolve_runtime(RuntimeSection(device="cpu", precision="fp32")).conv_winograd is False
    assert resolve_runtime(RuntimeSection(device="cpu", precision="bf16", fused_bn=False)).conv_winograd is False
    with pytest.raises(ConfigError, match="conv_winograd=true needs runtime.fused_bn"):
        resolve_runtime(RuntimeSection(device="cpu", precision="bf16", fused_bn=False, conv_winograd=True))
    calls = []
    real_apply = conv3x3_module._Conv3x3.apply
    monkeypatch.setattr(conv3x3_module._Conv3x3, "apply", lambda *args: calls.append(args[4]) or real_apply(*args))
    conv, x = nn.Conv2d(16, 16, 3, padding=1, bias=False), channels_last_bf16(2, 16, 8, 8, seed=0)
    for setting in (True, False):
        with resolve_runtime(RuntimeSection(device="cpu", precision="bf16", conv_winograd=setting)).autocast():
            conv3x3_train(conv, x)
    assert calls == [True, False]


def test_runtime_conv_winograd_without_the_kernel(monkeypatch):
    from resnetlab.engine import runtime as runtime_module

    monkeypatch.setattr(runtime_module, "load_conv_winograd_extension", lambda: None)
    assert runtime_module.resolve_conv_winograd("auto", True) is False
    with pytest.raises(ConfigError, match="AVX-512 BF16"):
        runtime_module.resolve_conv_winograd(True, True)
