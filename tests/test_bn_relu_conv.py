"""conv(relu(bn(x))) as one step (kernels/bn_relu_conv.py): the same output, statistics and gradients
as the separate steps, with the batch norm's backward sums gathered by the input-gradient kernel."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from resnetlab.kernels import bn_relu, bn_relu_conv3x3, conv3x3_before_bn, fused_bn_relu, load_bn_relu_extension
from resnetlab.kernels import bn_relu_conv as fused_module
from resnetlab.kernels import load_conv_fwd_extension

from convkit import channels_last_bf16

needs_kernels = pytest.mark.skipif(load_conv_fwd_extension() is None or load_bn_relu_extension() is None,
                                   reason="the kernels need AVX-512 BF16 and a C++ compiler with ninja")


def layers(channels: int, out_channels: int, stride: int = 1) -> tuple[nn.BatchNorm2d, nn.Conv2d]:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.3)
    conv = nn.Conv2d(channels, out_channels, 3, stride=stride, padding=1, bias=False).to(memory_format=torch.channels_last)
    return bn, conv


def run(step, bn: nn.BatchNorm2d, conv: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor):
    """step(bn, conv, x) -> (out, sums), then backward: out, sums, x.grad, the parameters' gradients, running stats."""
    for p in (*bn.parameters(), *conv.parameters()):
        p.grad = None
    bn.reset_running_stats()
    x = x.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16), fused_bn_relu():
        out, sums = step(bn, conv, x)
    out.backward(grad)
    return (out.detach(), sums, x.grad, bn.weight.grad, bn.bias.grad, conv.weight.grad,
            bn.running_mean.clone(), bn.running_var.clone())


def separate_steps(bn, conv, x):
    result = conv3x3_before_bn(conv, bn_relu(bn, x))
    return result.out, result.sums


@needs_kernels
@pytest.mark.parametrize("channels, out_channels, size, batch", [(16, 16, 32, 4), (32, 32, 16, 6), (64, 64, 8, 8), (16, 32, 10, 3)])
def test_one_step_gives_what_the_separate_steps_give(monkeypatch, channels, out_channels, size, batch):
    calls = []
    real = load_conv_fwd_extension()

    class Recording:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

    bn, conv = layers(channels, out_channels)
    x = channels_last_bf16(batch, channels, size, size, seed=1)
    grad = channels_last_bf16(batch, out_channels, size, size, seed=2)
    want = run(separate_steps, bn, conv, x, grad)
    monkeypatch.setattr(fused_module, "load_conv_fwd_extension", lambda: Recording())
    got = run(bn_relu_conv3x3, bn, conv, x, grad)
    assert "input_grad_with_bn_sums" in calls
    # forward: the same kernels on the same values
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[6:], want[6:])
    # backward: the batch norm's sums gathered in another order (fp32 partial sums), so its three
    # gradients agree to fp32 rounding, and dx to one bf16 step; the convolution's weight gradient is the same
    torch.testing.assert_close(got[3], want[3], rtol=1e-4, atol=1e-4 * want[3].abs().max().item())
    torch.testing.assert_close(got[4], want[4], rtol=1e-4, atol=1e-4 * want[4].abs().max().item())
    assert torch.equal(got[5], want[5])
    mine, theirs = got[2].float(), want[2].float()
    assert (mine == theirs).float().mean() > 0.9
    assert ((mine - theirs).abs() <= 2**-7 * theirs.abs() + 1e-3 * theirs.abs().max()).all()


@needs_kernels
def test_the_backward_sums_are_those_of_the_masked_gradient():
    bn_kernel, conv_kernel = load_bn_relu_extension(), load_conv_fwd_extension()
    bn, conv = layers(32, 16)
    x = channels_last_bf16(3, 32, 10, 10, seed=1)
    with torch.no_grad():
        y, mean, invstd, _ = bn_kernel.forward(x, bn.weight, bn.bias, None, bn.eps)
    scale, shift = bn_kernel.affine(bn.weight.detach(), bn.bias.detach(), mean, invstd)
    weight = conv.weight.detach().to(torch.bfloat16)
    grad_out = channels_last_bf16(3, 16, 10, 10, seed=2)
    dy, sums = conv_kernel.input_grad_with_bn_sums(grad_out, weight, x, scale, shift, mean)
    assert torch.equal(dy, conv_kernel.convolution(grad_out, weight, 1, True))
    assert torch.equal(y > 0, (x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)) > 0)  # the same mask
    g = dy.double() * (y > 0)
    want = torch.stack([g.sum((0, 2, 3)), (g * (x.double() - mean.double().view(1, -1, 1, 1))).sum((0, 2, 3))])
    torch.testing.assert_close(sums, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@needs_kernels
def test_misfit_batch_norm_arguments_are_refused():
    conv_kernel = load_conv_fwd_extension()
    weight, grad_out = torch.zeros(16, 16, 3, 3, dtype=torch.bfloat16), channels_last_bf16(1, 16, 8, 8, seed=0)
    x, stats = channels_last_bf16(1, 16, 8, 8, seed=1), torch.zeros(16)
    with pytest.raises(RuntimeError, match="bn_x must be a bf16 channels_last tensor"):
        conv_kernel.input_grad_with_bn_sums(grad_out, weight, x[:, :, :4], stats, stats, stats)
    with pytest.raises(RuntimeError, match="one value per channel"):
        conv_kernel.input_grad_with_bn_sums(grad_out, weight, x, stats[:8], stats, stats)


@needs_kernels
@pytest.mark.parametrize("why", ["stride 2", "fp32", "outside the context"])
def test_elsewhere_it_is_the_separate_steps(monkeypatch, why):
    monkeypatch.setattr(fused_module, "_BatchNormReLUConv3x3", None)  # any use of the one step fails
    bn, conv = layers(16, 32, stride=2 if why == "stride 2" else 1)
    x = channels_last_bf16(2, 16, 8, 8, seed=1)
    if why == "fp32":
        x = x.float()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=why != "fp32"), fused_bn_relu(why != "outside the context"):
        out, sums = bn_relu_conv3x3(bn, conv, x)
    assert out.shape == (2, 32, 8 // conv.stride[0], 8 // conv.stride[0])
    assert sums is None or why == "stride 2"  # the stride-2 convolution still gathers the next BN's sums
