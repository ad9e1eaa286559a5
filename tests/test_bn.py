"""Batch-norm momentum policies (torch convention: momentum = weight of the new batch) and BN
re-estimation over the training set."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from resnetlab.config import BNSection
from resnetlab.engine.bn import bn_layers, bn_momentum_at, reestimate_bn, set_bn_momentum
from resnetlab.engine.loop import start_dynamic_bn_epoch


def batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 4, 5, 5, generator=generator) * (i + 1) + i for i in range(n)]


def batch_mean(x):
    return x.mean(dim=(0, 2, 3))


def batch_var(x):
    return x.var(dim=(0, 2, 3), unbiased=True)  # torch keeps the unbiased variance in running_var


@pytest.mark.parametrize("n", [0, 1, 2, 9, 99])
def test_dynamic_momentum_is_one_over_one_plus_batches_seen_this_epoch(n):
    assert bn_momentum_at(n, BNSection(policy="dynamic")) == pytest.approx(1 / (1 + n))
    assert bn_momentum_at(n, BNSection(policy="fixed", momentum=0.01)) == 0.01


def test_dynamic_policy_makes_running_stats_the_average_of_this_epochs_batches_and_resets_each_epoch():
    layer = nn.BatchNorm2d(4)
    explicit = nn.BatchNorm2d(4)
    for epoch in range(2):
        data = batches(5, seed=epoch)
        start_dynamic_bn_epoch([layer])
        for n, x in enumerate(data):
            layer(x)
            explicit.momentum = bn_momentum_at(n, BNSection(policy="dynamic"))  # the value, set per batch
            explicit(x)
            torch.testing.assert_close(layer.running_mean, explicit.running_mean, rtol=0, atol=1e-6)
            torch.testing.assert_close(layer.running_var, explicit.running_var, rtol=0, atol=1e-5)
        # after the epoch: the plain average of this epoch's batch statistics (earlier epochs forgotten)
        torch.testing.assert_close(layer.running_mean, torch.stack([batch_mean(x) for x in data]).mean(0))
        torch.testing.assert_close(layer.running_var, torch.stack([batch_var(x) for x in data]).mean(0))


def test_fixed_momentum_follows_the_torch_convention():
    layer = nn.BatchNorm2d(4)
    set_bn_momentum([layer], 0.1)
    x = batches(1)[0]
    layer(x)
    torch.testing.assert_close(layer.running_mean, 0.1 * batch_mean(x))  # from 0: 0.9 * 0 + 0.1 * mean


def test_reestimation_recomputes_running_stats_over_the_given_batches_and_restores_the_model():
    model = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    model.eval()
    for layer in bn_layers(model):
        layer.momentum = 0.1
        layer.running_mean.fill_(123.0)
    data = batches(6)
    weights = [p.clone() for p in model.parameters()]
    assert reestimate_bn(model, data) == 6
    first = bn_layers(model)[0]
    with torch.no_grad():
        conv_out = [model[0](x) for x in data]
    torch.testing.assert_close(first.running_mean, torch.stack([batch_mean(c) for c in conv_out]).mean(0))
    torch.testing.assert_close(first.running_var, torch.stack([batch_var(c) for c in conv_out]).mean(0))
    assert all(layer.momentum == 0.1 for layer in bn_layers(model)) and not model.training
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
