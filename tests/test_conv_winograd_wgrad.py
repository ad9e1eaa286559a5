"""The weight gradient of the stride-1 3x3 convolutions by Winograd F(2x2, 3x3)
(kernels/conv_winograd_wgrad.cpp): the float64 weight gradient within the rounding of the bf16
transforms, on every channel count and map the ResNets have, and used in training exactly where
runtime.conv_winograd and the channel counts say."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from resnetlab.kernels import conv3x3 as conv3x3_module
from resnetlab.kernels import conv3x3_train, conv_winograd, fused_bn_relu
from resnetlab.kernels.build import load_conv_wgrad_extension, load_conv_winograd_wgrad_extension

from convkit import channels_last_bf16

needs_kernel = pytest.mark.skipif(load_conv_winograd_wgrad_extension() is None,
                                  reason="the kernel needs AVX-512 BF16 and a C++ compiler with ninja")
# batch, in, out, size: the CIFAR ResNets' maps, unequal channel counts, an odd batch, a map that is
# not square in tiles, and batches whose tile pairs split unevenly between the threads
SHAPES = [(2, 16, 16, 32), (4, 32, 32, 16), (3, 64, 64, 8), (2, 16, 64, 8), (3, 64, 32, 12), (5, 32, 16, 4),
          (17, 64, 64, 8)]


def float64_weight_grad(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    weight = torch.zeros(grad_out.shape[1], x.shape[1], 3, 3, dtype=torch.float64)
    return torch.ops.aten.convolution_backward(grad_out.double(), x.double(), weight, None, [1, 1], [1, 1], [1, 1],
                                               False, [0, 0], 1, [False, True, False])[1]


def assert_within_winograd_rounding(result: torch.Tensor, exact: torch.Tensor) -> None:
    """Each product carries the bf16 rounding of both transforms (about 4e-3 of the mean |dW| measured
    on these shapes, where the direct kernel's exact products give 1e-6); a wrong transform, tile or
    channel index is off by the size of the values themselves."""
    assert result.dtype == torch.float32 and result.shape == exact.shape and result.is_contiguous()
    error, scale = (result.double() - exact).abs(), exact.abs().mean()
    assert error.mean() < 8e-3 * scale
    assert error.max() < 6e-2 * scale


@needs_kernel
@pytest.mark.parametrize("batch, in_channels, out_channels, size", SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_the_weight_gradient_is_the_float64_one(batch, in_channels, out_channels, size, threads):
    x = channels_last_bf16(batch, in_channels, size, size, seed=1)
    grad_out = channels_last_bf16(batch, out_channels, size, size, seed=2)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        grad_w = load_conv_winograd_wgrad_extension().winograd_weight_grad(grad_out, x)
    finally:
        torch.set_num_threads(previous)
    assert_within_winograd_rounding(grad_w, float64_weight_grad(grad_out, x))


@needs_kernel
def test_the_zero_border_is_part_of_every_edge_tap():
    # x of ones: dW[o][i][kh][kw] counts the output pixels whose tap (kh, kw) lands inside the map,
    # so a missed or doubled border row or column shows as a whole unit of difference.
    x = torch.ones(1, 16, 8, 8, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    grad_out = torch.ones(1, 16, 8, 8, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    grad_w = load_conv_winograd_wgrad_extension().winograd_weight_grad(grad_out, x)
    counts = torch.tensor([[49, 56, 49], [56, 64, 56], [49, 56, 49]], dtype=torch.float32)
    assert torch.allclose(grad_w, counts.expand(16, 16, 3, 3), rtol=1e-2)


@needs_kernel
def test_the_kernel_rejects_what_it_was_not_built_for():
    kernel = load_conv_winograd_wgrad_extension()
    with pytest.raises(RuntimeError, match="divisible by 4"):
        kernel.winograd_weight_grad(channels_last_bf16(1, 16, 6, 6, seed=0), channels_last_bf16(1, 16, 6, 6, seed=0))
    with pytest.raises(RuntimeError, match="multiples of 16"):
        kernel.winograd_weight_grad(channels_last_bf16(1, 16, 8, 8, seed=0), channels_last_bf16(1, 8, 8, 8, seed=0))
    with pytest.raises(RuntimeError, match="batch and map size"):
        kernel.winograd_weight_grad(channels_last_bf16(1, 16, 4, 4, seed=0), channels_last_bf16(1, 16, 8, 8, seed=0))
    with pytest.raises(RuntimeError, match="channels_last"):
        kernel.winograd_weight_grad(torch.zeros(1, 16, 8, 8, dtype=torch.bfloat16), channels_last_bf16(1, 16, 8, 8, seed=0))


@needs_kernel
@pytest.mark.parametrize("channels, winograd, expected", [(32, True, "winograd"), (64, True, "winograd"),
                                                          (16, True, "direct"), (32, False, "direct")])
def test_training_takes_it_from_32_channels_inside_conv_winograd(monkeypatch, channels, winograd, expected):
    calls = []
    for name, loader, function in (("winograd", load_conv_winograd_wgrad_extension, "winograd_weight_grad"),
                                   ("direct", load_conv_wgrad_extension, "weight_grad")):
        kernel = loader()

        class Recorder:  # the extension module's attributes are read-only: wrap it
            def __getattr__(self, attribute, kernel=kernel, name=name, function=function):
                if attribute == function:
                    calls.append(name)
                return getattr(kernel, attribute)

        monkeypatch.setattr(conv3x3_module, loader.__name__, lambda recorder=Recorder(): recorder)
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = channels_last_bf16(2, channels, 8, 8, seed=3).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16), fused_bn_relu(), conv_winograd(winograd):
        conv3x3_train(conv, x).float().sum().backward()
    assert calls == [expected]
