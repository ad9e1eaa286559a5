"""The fused BN + (residual +) ReLU CPU kernel (resnetlab.kernels): same values, gradients and
running statistics as the native operators, used exactly where it applies, and a clean fallback."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.config import RuntimeSection
from resnetlab.engine.runtime import resolve_runtime
from resnetlab.errors import ConfigError
from resnetlab.kernels import bn_relu, fused_bn_relu, fused_kernel_applies, load_bn_relu_extension
from resnetlab.kernels import batch_norm_relu, build
from resnetlab.models import create_model

needs_kernel = pytest.mark.skipif(load_bn_relu_extension() is None,
                                  reason="the fused kernel can't be built here (no C++ compiler or ninja)")
BF16_ULP = 2.0**-8  # bf16 keeps 8 significant bits: one rounding is at most half of this, relative


def channels_last_bf16(*shape: int, seed: int = 0, scale: float = 2.0, shift: float = 0.5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator) * scale + shift
    return x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


def batch_norm(channels: int, seed: int = 0) -> nn.BatchNorm2d:
    generator = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=generator) * 0.2)
    return bn


def reference(bn: nn.BatchNorm2d, x: torch.Tensor, residual: torch.Tensor | None, grad: torch.Tensor):
    """relu(bn(x) + residual) in float64 from the same bf16 inputs: outputs and gradients."""
    x64 = x.double().requires_grad_()
    w64, b64 = bn.weight.double().detach().requires_grad_(), bn.bias.double().detach().requires_grad_()
    r64 = None if residual is None else residual.double().requires_grad_()
    out = F.batch_norm(x64, None, None, w64, b64, training=True, eps=bn.eps)
    out = F.relu(out if r64 is None else out + r64)
    out.backward(grad.double())
    return out, x64.grad, w64.grad, b64.grad, (None if r64 is None else r64.grad)


def fused_run(bn: nn.BatchNorm2d, x: torch.Tensor, residual: torch.Tensor | None, grad: torch.Tensor):
    x = x.detach().requires_grad_()
    residual = None if residual is None else residual.detach().requires_grad_()
    with fused_bn_relu():
        out = bn_relu(bn, x, residual)
    out.backward(grad)
    return out, x.grad, bn.weight.grad, bn.bias.grad, (None if residual is None else residual.grad)


@needs_kernel
@pytest.mark.parametrize("channels, size", [(16, 8), (32, 6), (64, 4), (256, 2)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_outputs_and_gradients_match_float64_batch_norm_within_bf16_rounding(channels, size, with_residual):
    x = channels_last_bf16(8, channels, size, size)
    residual = channels_last_bf16(8, channels, size, size, seed=1) if with_residual else None
    grad = channels_last_bf16(8, channels, size, size, seed=2, scale=1.0, shift=0.0)
    bn = batch_norm(channels)
    assert fused_kernel_applies(bn, x, residual)
    got = fused_run(bn, x, residual, grad)
    want = reference(bn, x, residual, grad)
    out, grad_x = got[0].double(), got[1].double()
    assert got[0].dtype == torch.bfloat16 and got[0].is_contiguous(memory_format=torch.channels_last)
    assert (out - want[0]).abs().max() <= BF16_ULP * want[0].abs().max()
    assert (out == 0).equal(want[0] <= 0)  # the ReLU's zeros exactly where the reference's are
    assert (grad_x - want[1]).abs().max() <= BF16_ULP * want[1].abs().max()
    torch.testing.assert_close(got[2].double(), want[2], rtol=1e-4, atol=1e-4)  # weight and bias: fp32 sums
    torch.testing.assert_close(got[3].double(), want[3], rtol=1e-4, atol=1e-4)
    if with_residual:
        torch.testing.assert_close(got[4].double(), want[4])  # the masked gradient itself, exact in bf16


@needs_kernel
@pytest.mark.parametrize("channels", [16, 64])
def test_the_backward_pass_recomputes_the_forward_relu_mask_exactly(channels):
    """Without a residual the backward pass does not keep y: it recomputes y > 0 from x. The bias
    gradient is the sum of the masked output gradient, so one element masked differently from the
    forward pass would move it by about |dy| (here >= 0.5), far beyond fp32 summation error."""
    x = channels_last_bf16(16, channels, 8, 8, scale=1.0, shift=0.0)  # about half the values at or below the kink
    generator = torch.Generator().manual_seed(3)
    grad = (torch.rand(x.shape, generator=generator) + 0.5).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    bn = batch_norm(channels)
    out, _, _, grad_bias, _ = fused_run(bn, x, None, grad)
    want = (grad.double() * (out > 0)).sum(dim=(0, 2, 3))
    torch.testing.assert_close(grad_bias.double(), want, rtol=0, atol=0.05)


@needs_kernel
def test_a_batch_with_a_large_mean_keeps_its_variance():
    # statistics from sums of x and x^2: the double accumulation must keep var accurate when |mean| >> std
    x = channels_last_bf16(16, 16, 8, 8, scale=0.05, shift=8.0)
    grad = channels_last_bf16(16, 16, 8, 8, seed=2, scale=1.0, shift=0.0)
    bn = batch_norm(16)
    got, want = fused_run(bn, x, None, grad), reference(bn, x, None, grad)
    assert (got[0].double() - want[0]).abs().max() <= BF16_ULP * want[0].abs().max()


@needs_kernel
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])  # None: torch's cumulative average
def test_running_statistics_follow_nn_batchnorm2d_for_each_momentum(momentum):
    fused_bn, native_bn = batch_norm(32), batch_norm(32)
    fused_bn.momentum = native_bn.momentum = momentum
    for step in range(3):
        x = channels_last_bf16(8, 32, 4, 4, seed=step, shift=step)
        with fused_bn_relu():
            bn_relu(fused_bn, x)
        native_bn(x.float())
    torch.testing.assert_close(fused_bn.running_mean, native_bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_bn.running_var, native_bn.running_var, rtol=1e-5, atol=1e-6)
    assert fused_bn.num_batches_tracked.item() == native_bn.num_batches_tracked.item() == 3


@needs_kernel
def test_without_running_statistics_only_the_batch_statistics_are_used():
    bn = nn.BatchNorm2d(16, track_running_stats=False)
    x = channels_last_bf16(4, 16, 4, 4)
    with fused_bn_relu():
        out = bn_relu(bn, x)
    torch.testing.assert_close(out.float(), F.relu(bn(x.float())), rtol=BF16_ULP, atol=BF16_ULP)


def test_outside_the_context_and_wherever_the_kernel_does_not_apply_the_native_operators_run(monkeypatch):
    calls = []
    monkeypatch.setattr(batch_norm_relu._BatchNormReLU, "apply", lambda *args: calls.append(args))
    bn, x = batch_norm(16), channels_last_bf16(4, 16, 4, 4)
    assert torch.equal(bn_relu(bn, x), F.relu(bn(x)))  # no context: native
    cases = {
        "fp32": (bn, x.float()),
        "NCHW": (bn, x.contiguous()),
        "eval mode": (batch_norm(16).eval(), x),
        "an uncompiled width": (batch_norm(24), channels_last_bf16(4, 24, 4, 4)),
        "SyncBatchNorm": (nn.SyncBatchNorm(16), x),
        "no affine parameters": (nn.BatchNorm2d(16, affine=False), x),
    }
    for name, (layer, inputs) in cases.items():
        assert not fused_kernel_applies(layer, inputs), name
    for layer, inputs in [cases["fp32"], cases["NCHW"], cases["eval mode"], cases["an uncompiled width"]]:
        with fused_bn_relu():
            bn_relu(layer, inputs)
    assert not fused_kernel_applies(bn, x, x.float())  # a residual of another dtype
    assert calls == []


@needs_kernel
def test_a_resnet_training_step_is_as_close_to_fp32_as_the_native_bf16_step():
    """ResNet-20 (stem, both BN+ReLU forms, option-A shortcuts) one step in fp32, then under bf16
    autocast with native and with fused BN + ReLU: bf16 alone moves some conv gradients by ~25 %
    at initialisation, so the fused step must be as close to fp32 as the native bf16 step is."""
    torch.manual_seed(0)
    nets = [create_model("resnet20").to(memory_format=torch.channels_last) for _ in range(3)]
    for net in nets[1:]:
        net.load_state_dict(nets[0].state_dict())
    images = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (64,))
    F.cross_entropy(nets[0](images), labels).backward()
    for net, fused in ((nets[1], False), (nets[2], True)):
        with torch.autocast("cpu", dtype=torch.bfloat16), fused_bn_relu(fused):
            F.cross_entropy(net(images), labels).backward()
    fp32, native, fused = (dict(net.named_parameters()) for net in nets)

    def mean_relative_error(grads: dict) -> float:  # per parameter tensor, then averaged over the 65 tensors
        errors = [(grads[name].grad - want.grad).norm() / want.grad.norm() for name, want in fp32.items()]
        return torch.stack(errors).mean().item()

    # per tensor the two bf16 errors scatter either way (0.19 vs 0.26 for one BN weight, 0.20 vs 0.13 for another)
    assert mean_relative_error(fused) <= 1.1 * mean_relative_error(native)
    fp32_buffers, fused_buffers = dict(nets[0].named_buffers()), dict(nets[2].named_buffers())
    for name, want in fp32_buffers.items():
        torch.testing.assert_close(fused_buffers[name].float(), want.float(), rtol=0.02, atol=0.02, msg=name)


@needs_kernel
def test_runtime_auto_uses_the_kernel_for_cpu_bf16_channels_last_only():
    assert resolve_runtime(RuntimeSection(device="cpu", precision="bf16")).fused_bn
    assert not resolve_runtime(RuntimeSection(device="cpu", precision="fp32")).fused_bn
    assert not resolve_runtime(RuntimeSection(device="cpu", precision="bf16", channels_last=False)).fused_bn
    assert not resolve_runtime(RuntimeSection(device="cpu", precision="bf16", compile=True)).fused_bn
    assert not resolve_runtime(RuntimeSection(device="cpu", precision="bf16", fused_bn=False)).fused_bn
    with pytest.raises(ConfigError, match="fused_bn=true needs"):
        resolve_runtime(RuntimeSection(device="cpu", precision="fp32", fused_bn=True))


@needs_kernel
def test_the_runtime_autocast_context_turns_the_kernel_on(monkeypatch):
    calls = []
    real_apply = batch_norm_relu._BatchNormReLU.apply
    monkeypatch.setattr(batch_norm_relu._BatchNormReLU, "apply", lambda *a: calls.append(1) or real_apply(*a))
    bn, x = batch_norm(16), channels_last_bf16(4, 16, 4, 4)
    for fused in (False, True):
        with resolve_runtime(RuntimeSection(device="cpu", precision="bf16", fused_bn=fused)).autocast():
            bn_relu(bn, x)
    assert calls == [1]


def test_a_kernel_that_cannot_be_built_falls_back_with_one_warning(monkeypatch):
    import torch.utils.cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    build.load_bn_relu_extension.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not be built .Ninja is required"):
            assert build.load_bn_relu_extension() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert build.load_bn_relu_extension() is None  # cached: warned once
            assert not resolve_runtime(RuntimeSection(device="cpu", precision="bf16")).fused_bn
        with pytest.raises(ConfigError, match="could not be built here"):
            resolve_runtime(RuntimeSection(device="cpu", precision="bf16", fused_bn=True))
        bn, x = batch_norm(16), channels_last_bf16(4, 16, 4, 4)
        with fused_bn_relu():
            assert torch.equal(bn_relu(bn, x), F.relu(bn(x)))
    finally:
        build.load_bn_relu_extension.cache_clear()


@needs_kernel
def test_the_first_build_is_announced_and_later_loads_are_not(tmp_path, monkeypatch):
    name = load_bn_relu_extension().__name__
    assert build._already_built(name)  # this process loaded it: its build directory holds it
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert not build._already_built(name)  # an empty extensions directory: the build would be announced
