"""Optimizers from the config: every solver of the seeds' comparison, weight-decay groups, setters."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resnetlab.config import OptimSection
from resnetlab.engine.optim import build_optimizer, param_groups, set_lr, set_momentum
from resnetlab.models import create_model

SOLVERS = {
    "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adagrad": torch.optim.Adagrad,
    "adadelta": torch.optim.Adadelta, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
}

FUSED = ("sgd", "adam", "adamw")


def tiny_model():
    torch.manual_seed(0)
    return create_model("resnet8", width=0.25)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_each_solver_builds_uses_fused_or_foreach_updates_and_lowers_the_loss(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    lr = {"sgd": 0.05, "rmsprop": 1e-3, "adagrad": 0.05, "adadelta": 1.0, "adam": 3e-3, "adamw": 3e-3}[name]
    optimizer = build_optimizer(model, OptimSection(name=name, lr=lr, weight_decay=1e-4))
    assert type(optimizer) is SOLVERS[name]
    batched = "fused" if name in FUSED else "foreach"  # one kernel for the update, or one per op
    assert optimizer.param_groups[0][batched] is True
    x, y = torch.randn(32, 3, 8, 8), torch.arange(32) % 10
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_nesterov_is_on_only_with_momentum():
    model = tiny_model()
    assert build_optimizer(model, OptimSection(nesterov=True)).param_groups[0]["nesterov"] is True
    assert build_optimizer(model, OptimSection(nesterov=True, momentum=0)).param_groups[0]["nesterov"] is False


def test_no_weight_decay_on_bn_and_biases_when_asked():
    model = tiny_model()
    assert len(param_groups(model, OptimSection())) == 1
    decay, no_decay = param_groups(model, OptimSection(no_wd_bn_bias=True, weight_decay=5e-4))
    bn_and_bias = {id(p) for n, p in model.named_parameters() if p.ndim == 1}
    assert {id(p) for p in no_decay["params"]} == bn_and_bias and no_decay["weight_decay"] == 0
    assert decay["weight_decay"] == 5e-4 and all(p.ndim == 4 or p.ndim == 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_setters_change_lr_momentum_and_adam_beta1():
    model = tiny_model()
    sgd = build_optimizer(model, OptimSection(no_wd_bn_bias=True))
    set_lr(sgd, 0.3)
    set_momentum(sgd, 0.85)
    assert all(g["lr"] == 0.3 and g["momentum"] == 0.85 for g in sgd.param_groups)
    adam = build_optimizer(model, OptimSection(name="adam", lr=1e-3, betas=(0.9, 0.99)))
    set_momentum(adam, 0.8)
    assert adam.param_groups[0]["betas"] == (0.8, 0.99)
    adagrad = build_optimizer(model, OptimSection(name="adagrad"))
    set_momentum(adagrad, 0.5)  # no momentum: nothing to set, no error
    assert "momentum" not in adagrad.param_groups[0]


@pytest.mark.parametrize("name", FUSED)
def test_the_fused_update_gives_the_foreach_update_on_the_cpu(name):
    """The fused kernels replace the foreach ones for speed only: same weights after steps with
    changing lr, momentum and gradients, two weight-decay groups."""
    cfg = OptimSection(name=name, lr=0.05, weight_decay=5e-4, no_wd_bn_bias=True, nesterov=True)
    models = [tiny_model(), tiny_model()]
    fused = build_optimizer(models[0], cfg)
    foreach = type(fused)(param_groups(models[1], cfg), lr=cfg.lr, foreach=True,
                          **{k: fused.defaults[k] for k in ("momentum", "nesterov", "betas", "eps") if k in fused.defaults})
    torch.manual_seed(1)
    for step in range(5):
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        for model, optimizer in zip(models, (fused, foreach)):
            for param, grad in zip(model.parameters(), grads):
                param.grad = grad.clone()
            set_lr(optimizer, 0.05 * (1 - step / 10))
            set_momentum(optimizer, 0.85 + step / 100)
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
