"""The 3x3 convolution CPU kernels for the forward pass and the input gradient (kernels/conv_fwd.cpp): float64 results from the same bf16 tensors within one bf16 rounding, the
output's layout and dtype as oneDNN's, used inside the training path where it applies."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resnetlab.kernels import conv3x3 as conv3x3_module
from resnetlab.kernels import ConvBeforeBatchNorm, ConvOutput, bn_relu, conv3x3_train, fused_bn_relu, load_conv_fwd_extension
from resnetlab.kernels import bn_relu_conv as bn_relu_conv_module
from resnetlab.models import blocks as blocks_module
from resnetlab.models.blocks import BasicBlock
from resnetlab.models.layers import ZeroPadShortcut

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
@pytest.mark.parametrize("batch, in_channels, out_channels, size, stride", [
    (2, 16, 16, 32, 1), (2, 32, 16, 9, 1), (3, 16, 32, 32, 2), (2, 32, 64, 16, 2), (2, 16, 48, 7, 2),
])
def test_an_addend_is_added_before_the_one_rounding(batch, in_channels, out_channels, size, stride):
    # the input gradient of a block's first convolution plus its shortcut's gradient (blocks.py)
    x = torch.zeros(batch, in_channels, size, size, dtype=torch.float64, requires_grad=True)
    w = bf16_weight(out_channels, in_channels, seed=1)
    out_size = (size - 1) // stride + 1
    grad_out = channels_last_bf16(batch, out_channels, out_size, out_size, seed=2)
    addend = channels_last_bf16(batch, in_channels, size, size, seed=3)
    F.conv2d(x, w.double(), stride=stride, padding=1).backward(grad_out.double())
    kernel = load_conv_fwd_extension()
    result = (kernel.convolution(grad_out, w, 1, True, addend) if stride == 1
              else kernel.input_grad_stride2(grad_out, w, size, size, addend))
    assert_one_bf16_rounding_of(result, x.grad + addend.double())
    assert not torch.equal(result, kernel.convolution(grad_out, w, 1, True) if stride == 1
                           else kernel.input_grad_stride2(grad_out, w, size, size))


@needs_kernel
@pytest.mark.parametrize("batch, in_channels, out_channels, size, stride", [(3, 16, 16, 32, 1), (2, 32, 64, 16, 2), (2, 48, 16, 9, 1)])
def test_the_forward_pass_with_sums_gives_the_same_output_and_its_channel_sums(batch, in_channels, out_channels, size, stride):
    x, w = channels_last_bf16(batch, in_channels, size, size, seed=0), bf16_weight(out_channels, in_channels, seed=1)
    kernel = load_conv_fwd_extension()
    y, sums = kernel.convolution_with_sums(x, w, stride)
    assert torch.equal(y, kernel.convolution(x, w, stride, False))
    assert sums.dtype == torch.float64 and sums.shape == (2, out_channels)
    exact = torch.stack([y.double().sum((0, 2, 3)), y.double().square().sum((0, 2, 3))])
    torch.testing.assert_close(sums, exact, rtol=1e-6, atol=1e-6 * exact.abs().max().item())


@needs_kernel
def test_a_misshapen_addend_is_refused():
    kernel = load_conv_fwd_extension()
    x, w = channels_last_bf16(1, 16, 8, 8, seed=0), bf16_weight(16, 16, seed=0)
    for addend in (channels_last_bf16(1, 16, 4, 4, seed=1), channels_last_bf16(1, 16, 8, 8, seed=1).contiguous(),
                   channels_last_bf16(1, 16, 8, 8, seed=1).float()):
        with pytest.raises(RuntimeError, match="addend must be a bf16 channels_last tensor of the output's shape"):
            kernel.convolution(x, w, 1, True, addend)
    with pytest.raises(RuntimeError, match="addend must be"):
        kernel.input_grad_stride2(channels_last_bf16(1, 16, 4, 4, seed=0), w, 8, 8, x[:, :, :4, :4])


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
        def convolution(self, x, w, stride, transpose, addend=None):
            calls.append("transposed" if transpose else "forward")
            return real.convolution(x, w, stride, transpose, addend)

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


@needs_kernel
@pytest.mark.parametrize("stride", [1, 2])  # an identity shortcut, and option A's
def test_a_residual_block_adds_its_shortcut_gradient_in_the_input_gradient_kernel(monkeypatch, stride):
    calls = []
    real = load_conv_fwd_extension()

    class Recording:
        def convolution_with_sums(self, x, w, stride):
            calls.append("forward with sums")
            return real.convolution_with_sums(x, w, stride)

        def input_grad_with_bn_sums(self, *args):
            calls.append("input gradient with the BN's sums")
            return real.input_grad_with_bn_sums(*args)

        def convolution(self, x, w, stride, transpose, addend=None):
            calls.append(("forward" if not transpose else "input gradient") + (" + addend" if addend is not None else ""))
            return real.convolution(x, w, stride, transpose, addend)

        def input_grad_stride2(self, dy, w, h, width, addend=None):
            calls.append("input gradient" + (" + addend" if addend is not None else ""))
            return real.input_grad_stride2(dy, w, h, width, addend)

    torch.manual_seed(0)
    planes = 16 * stride
    block = BasicBlock(16, planes, stride, ZeroPadShortcut(16, planes, stride) if stride == 2 else None)
    block = block.to(memory_format=torch.channels_last)
    x = channels_last_bf16(4, 16, 12, 12, seed=2)
    grad = channels_last_bf16(4, planes, 12 // stride, 12 // stride, seed=3)

    def input_gradient() -> torch.Tensor:
        inputs = x.detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16), fused_bn_relu():
            block(inputs).backward(grad)
        return inputs.grad

    monkeypatch.setattr(conv3x3_module, "load_conv_fwd_extension", lambda: Recording())
    monkeypatch.setattr(bn_relu_conv_module, "load_conv_fwd_extension", lambda: Recording())
    fused = input_gradient()
    # conv1 and (fused with bn1) conv2 forward, then conv2's and conv1's input gradients
    assert calls == ["forward with sums"] * 2 + ["input gradient with the BN's sums", "input gradient + addend"]
    # the same block with autograd adding the two gradients afterwards (a second bf16 rounding)
    monkeypatch.setattr(blocks_module, "conv3x3_before_bn",
                        lambda conv, inputs, share_input=False: ConvBeforeBatchNorm(conv3x3_train(conv, inputs), None, inputs))
    monkeypatch.setattr(blocks_module, "bn_relu_conv3x3",
                        lambda bn, conv, inputs, sums=None: ConvOutput(conv3x3_train(conv, bn_relu(bn, inputs)), None))
    separate = input_gradient()
    assert fused.dtype == separate.dtype == torch.bfloat16
    fused, separate = fused.float(), separate.float()
    # rounded once against twice: mostly equal; elsewhere a bf16 step apart, relative to the value or,
    # where the two gradients cancel, to their scale (a lost or doubled shortcut gradient is far outside)
    assert (fused == separate).float().mean() > 0.8
    assert ((fused - separate).abs() / (separate.abs() + separate.std())).max() < 2**-6
