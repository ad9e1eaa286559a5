"""EMA of the weights: parameters and BN running statistics are averaged, batch counters copied."""
import torch
from torch import nn

from resnetlab.engine.ema import EMA


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model.train()
    optimizer.zero_grad()
    model(torch.randn(8, 3, 6, 6)).square().mean().backward()
    optimizer.step()


def test_ema_averages_parameters_and_bn_statistics_and_copies_counters():
    model = _net()
    ema = EMA(model, decay=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = {name: tensor.clone() for name, tensor in ema.state_dict().items()}
    _train_step(model, optimizer)
    ema.update()
    decay = min(0.5, 2 / 11)  # the first update's warm-up decay
    live = model.state_dict()
    for name, tensor in ema.state_dict().items():
        if tensor.is_floating_point():
            expected = decay * before[name] + (1 - decay) * live[name]
            assert not torch.allclose(live[name], before[name]), name  # the step changed it
            torch.testing.assert_close(tensor, expected, msg=name)
        else:
            assert torch.equal(tensor, live[name]), name


def test_ema_running_variance_matches_the_averaged_weights():
    """With averaged statistics, the EMA model in eval mode normalises its own activations to about
    unit variance; the live model's statistics (copied) would not."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8, momentum=None, affine=False))
    ema = EMA(model, decay=0.9)
    data = torch.randn(64, 3, 8, 8)
    for _ in range(60):
        with torch.no_grad():  # drift the live weights' scale upward, step after step
            model[0].weight.mul_(1.05)
        model[1].reset_running_stats()
        model.train()
        model(data)
        ema.update()
    out = ema.module.eval()(data)
    live_out = model.eval()(data)
    assert abs(live_out.var().item() - 1) < 0.1  # the live model is consistent with its own stats
    assert abs(out.var().item() - 1) < 0.35
    copied = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8, affine=False)).eval()
    copied.load_state_dict({**ema.module.state_dict(), **{k: v for k, v in model.state_dict().items() if "running" in k}})
    assert abs(copied(data).var().item() - 1) > 0.35  # what copying the statistics gave
