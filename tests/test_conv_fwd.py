"""The 3x3 convolution CPU kernels for the forward pass and the input gradient (kernels/conv_fwd.cpp): float64 results from the same bf16 tensors within one bf16 rounding, the
output's layout and dtype as oneDNN's, used inside the training path where it applies."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resnetlab.kernels import conv3x3 as conv3x3_module
from resnetlab.kernels import load_conv_fwd_extension

from convkit import channels_last_bf16, train_conv3x3

needs_kernel = pytest.mark.skipif(load_conv_fwd_extension() is None,
                                  reason="the kernel needs AVX-512 BF16 and a C++ compiler with ninja")
SHAPES = [  # batch, in channels, out channels, size, stride
    (4, 16, 16, 32, 1), (3, 16, 32, 32, 2), (2, 32, 32, 16, 1), (2, 32, 64, 16, 2), (3, 64, 64, 8, 1),
    (2, 48, 16, 9, 1), (2, 16, 48, 7, 2),  # odd sizes: partial pixel blocks and the zero border
    (1, 32, 16, 5, 1),
]


def bf16_weight(out_channels: int, in_channels: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out_channels, in_channels, 3, 3, generator=generator).to(torch.bfloat16)


def assert_one_bf16_rounding_of(result: torch.Tensor, exact: torch.Tensor) -> None:
    """fp32 sums of exact bf16 products, rounded once to bf16: within half a bf16 step (2^-8 of the
    value's power of two) plus a little fp32 summation error."""
    assert result.dtype == torch.bfloat16 and result.shape == exact.shape
    assert result.is_contiguous(memory_format=torch.channels_last)
    error = (result.double() - exact).abs()
    assert (error <= 2**-8 * exact.abs() + 1e-5 * exact.abs().max()).all()


@needs_kernel
@pytest.mark.parametrize("batch, in_channels, out_channels, size, stride", SHAPES)
def test_the_forward_pass_is_the_float64_convolution_rounded_once(batch, in_channels, out_channels, size, stride):
    x, w = channels_last_bf16(batch, in_channels, size, size, seed=0), bf16_weight(out_channels, in_channels, seed=1)
    y = load_conv_fwd_extension().convolution(x, w, stride, False)
    assert_one_bf16_rounding_of(y, F.conv2d(x.double(), w.double(), stride=stride, padding=1))


@needs_kernel
@pytest.mark.parametrize("batch, in_channels, out_channels, size, stride", [s for s in SHAPES if s[-1] == 1])
def test_transposed_weights_give_the_float64_input_gradient(batch, in_channels, out_channels, size, stride):
    x = channels_last_bf16(batch, in_channels, size, size, seed=0).double().requires_grad_(True)
    w, grad_out = bf16_weight(out_channels, in_channels, seed=1), channels_last_bf16(batch, out_channels, size, size, seed=2)
    F.conv2d(x, w.double(), padding=1).backward(grad_out.double())
    assert_one_bf16_rounding_of(load_conv_fwd_extension().convolution(grad_out, w, 1, True), x.grad)


@needs_kernel
@pytest.mark.parametrize("batch, in_channels, out_channels, size", [
    (3, 16, 32, 32), (2, 32, 64, 16),  # ResNet-20's two stride-2 layers
    (2, 16, 48, 7), (2, 48, 16, 9), (1, 16, 16, 5), (1, 16, 16, 2), (1, 16, 16, 1),  # odd and tiny maps
])
def test_the_stride2_input_gradient_is_the_float64_one_rounded_once(batch, in_channels, out_channels, size):
    x = torch.zeros(batch, in_channels, size, size, dtype=torch.float64, requires_grad=True)
    w = bf16_weight(out_channels, in_channels, seed=1)
    grad_out = channels_last_bf16(batch, out_channels, (size - 1) // 2 + 1, (size - 1) // 2 + 1, seed=2)
    F.conv2d(x, w.double(), stride=2, padding=1).backward(grad_out.double())
    assert_one_bf16_rounding_of(load_conv_fwd_extension().input_grad_stride2(grad_out, w, size, size), x.grad)


@needs_kernel
def test_bad_shapes_are_refused():
    kernel = load_conv_fwd_extension()
    x = channels_last_bf16(1, 16, 8, 8, seed=0)
    with pytest.raises(RuntimeError, match="do not match"):
        kernel.convolution(x, bf16_weight(16, 32, seed=0), 1, False)
    with pytest.raises(RuntimeError, match="stride 1, or 2 without transpose"):
        kernel.convolution(x, bf16_weight(16, 16, seed=0), 2, True)
    with pytest.raises(RuntimeError, match="channels_last"):
        kernel.convolution(x.contiguous(), bf16_weight(16, 16, seed=0), 1, False)
    with pytest.raises(RuntimeError, match="does not match a 3x3, padding-1, stride-2"):
        kernel.input_grad_stride2(x, bf16_weight(16, 16, seed=0), 8, 8)  # dy of an 8x8 input is 4x4


@needs_kernel
@pytest.mark.parametrize("stride", [1, 2])
def test_the_training_convolution_uses_it_and_matches_onednn(monkeypatch, stride):
    calls = []
    real = load_conv_fwd_extension()

    class Counting:
        def convolution(self, *args):
            calls.append("transposed" if args[-1] else "forward")
            return real.convolution(*args)

        def input_grad_stride2(self, *args):
            calls.append("stride-2 input gradient")
            return real.input_grad_stride2(*args)

    monkeypatch.setattr(conv3x3_module, "load_conv_fwd_extension", lambda: Counting())
    conv, x, out, grad_out = train_conv3x3(stride)
    assert calls == ["forward", "transposed" if stride == 1 else "stride-2 input gradient"]
    kernel_out, kernel_grad = out.detach(), x.grad.clone()
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        native = conv(x)
    native.backward(grad_out)
    # both round fp32 sums of the same products once: equal but where the summation order tips a rounding
    for mine, theirs in ((kernel_out, native.detach()), (kernel_grad, x.grad)):
        assert mine.dtype == theirs.dtype and mine.is_contiguous(memory_format=torch.channels_last)
        assert torch.isclose(mine.float(), theirs.float(), rtol=2**-7, atol=0).float().mean() > 0.99
