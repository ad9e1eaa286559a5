"""Experiment definitions, schedule scaling, aggregation math, references and layer responses
(no training here; the end-to-end sweeps are in test_experiments_run.py)."""
from __future__ import annotations

import math

import pytest
import torch

from resnetlab.config import build_config
from resnetlab.errors import ConfigError
from resnetlab.experiments.aggregate import RunRow, Stats, aggregate
from resnetlab.experiments.experiments import EXPERIMENTS, get_experiment
from resnetlab.experiments.report import load_references, results_table
from resnetlab.experiments.responses import layer_responses, response_layers
from resnetlab.experiments.runner import DEFAULT_RECIPE, scale_overrides
from resnetlab.models import create_model


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_config_of_every_experiment_is_a_valid_run_config(name):
    experiment = EXPERIMENTS[name]
    for spec in experiment.configs + experiment.on_request:
        config = build_config(DEFAULT_RECIPE, overrides=spec.overrides, **{"model.name": spec.model})
        assert config.model.name == spec.model


def test_table6_and_degradation_hold_the_papers_depths():
    assert [c.model for c in get_experiment("table6").configs] == ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
    assert [c.model for c in get_experiment("table6").select(["resnet1202"])] == ["resnet1202"]
    assert [c.model for c in get_experiment("degradation").configs] == [
        "plain20", "plain32", "plain44", "plain56", "resnet20", "resnet32", "resnet44", "resnet56"]


def test_resnet110_configs_warm_up_as_in_the_paper():
    config = next(c for c in get_experiment("table6").configs if c.model == "resnet110")
    warmup = build_config(DEFAULT_RECIPE, overrides=config.overrides).schedule.warmup
    assert (warmup.kind, warmup.lr, warmup.error_threshold, warmup.cap_steps) == ("until_error", 0.01, 0.8, 400)


def test_solvers_use_seed_000s_learning_rates():
    built = {c.name: build_config(DEFAULT_RECIPE, overrides=c.overrides) for c in get_experiment("solvers").configs}
    assert set(built) == {"nesterov-lr0.1-20", "rmsprop-lr1e-2-20", "adadelta-20", "adagrad-lr1e-1-20"}
    assert built["nesterov-lr0.1-20"].optim.nesterov and built["nesterov-lr0.1-20"].optim.lr == 0.1
    assert (built["rmsprop-lr1e-2-20"].optim.name, built["rmsprop-lr1e-2-20"].optim.lr) == ("rmsprop", 1e-2)
    adadelta = built["adadelta-20"]
    assert (adadelta.optim.rho, adadelta.schedule.kind) == (0.3, "constant")
    assert built["adagrad-lr1e-1-20"].optim.lr == 0.1
    every = {c.name for c in get_experiment("solvers-lrs").configs}
    assert {"rmsprop-lr1e-4-20", "rmsprop-lr1e-3-20", "adagrad-lr1e-3-20", "adagrad-lr1e-2-20"} <= every
    assert "rmsprop-lr1e-1-110" in {c.name for c in get_experiment("solvers-lrs").on_request}


def test_blocks_and_bn_momentum_configs():
    blocks = {c.name: build_config(DEFAULT_RECIPE, overrides=c.overrides, **{"model.name": c.model})
              for c in get_experiment("blocks").configs}
    assert len(blocks) == 10 and blocks["bn_after_add-110"].model.options == {"block": "bn_after_add"}
    assert blocks["preact-20"].model.name == "resnet20"
    bn = {c.name: build_config(DEFAULT_RECIPE, overrides=c.overrides).bn for c in get_experiment("bn-momentum").configs}
    assert (bn["momentum-1"].momentum, bn["momentum-0.01"].momentum, bn["dynamic"].policy) == (1, 0.01, "dynamic")


def test_unknown_experiment_or_model_filter_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown experiment 'tabel6'"):
        get_experiment("tabel6")
    with pytest.raises(ConfigError, match="no model or config resnet8"):
        get_experiment("table6").select(["resnet8"])


def test_every_reference_names_a_config_of_its_experiment_and_a_source():
    refs = load_references()
    assert refs["experiments"]["table6"]["resnet20"][0] == {"source": "paper", "value": 8.75}
    for experiment, entries in refs["experiments"].items():
        spec = get_experiment(experiment)
        names = {c.name for c in spec.configs + spec.on_request}
        assert set(entries) <= names, experiment
        for values in entries.values():
            assert all(v["source"] in refs["sources"] for v in values)


# --- scaling ----------------------------------------------------------------------------------------

def test_epochs_scale_shortens_budget_milestones_and_warmup_in_their_units():
    paper = build_config("he2016-cifar-110")
    scaled = build_config("he2016-cifar-110", overrides=scale_overrides(paper, 0.1))
    assert scaled.train.steps == 6400 and scaled.schedule.milestones == [3200, 4800]
    assert scaled.schedule.warmup.cap_steps == 40 and scaled.schedule.unit == "steps"
    fast = build_config("fast-cifar")
    short = build_config("fast-cifar", overrides=scale_overrides(fast, 0.5))
    assert short.train.epochs == 15 and short.schedule.warmup.length == 1
    assert scale_overrides(paper, 1.0) == []
    with pytest.raises(ConfigError, match="epochs-scale"):
        scale_overrides(paper, 0)


# --- aggregation ------------------------------------------------------------------------------------

def _row(config, seed, val, best=None, train=0.5):
    return RunRow("x", config, "resnet20", seed, 1, train, val, best if best is not None else val, 1.0, steps=10)


def test_stats_mean_sample_std_min_max():
    stats = Stats.of([0.1, 0.2, 0.3, None])
    assert stats.n == 3 and stats.mean == pytest.approx(0.2) and stats.std == pytest.approx(0.1)
    assert (stats.min, stats.max) == (0.1, 0.3)
    single = Stats.of([0.4])
    assert single.n == 1 and single.mean == 0.4 and math.isnan(single.std)
    assert Stats.of([None]).n == 0


def test_aggregate_groups_by_config_in_order_and_keeps_best_on_val_apart():
    rows = [_row("b", 0, 0.30, best=0.20), _row("a", 0, 0.10), _row("b", 1, 0.50, best=0.40)]
    stats = aggregate(rows)
    assert [s.config for s in stats] == ["b", "a"]
    b = stats[0]
    assert b.runs == 2 and b.final_val.mean == pytest.approx(0.4) and b.best_val.mean == pytest.approx(0.3)
    assert b.final_val.std == pytest.approx(math.sqrt(0.02))
    table = "\n".join(results_table(stats, {"a": [{"source": "paper", "value": 8.75}]}))
    assert "| b | resnet20 | 2 | 10 | 40.00 ± 14.14 | 30.00 | 50.00 |" in table
    assert "best-on-val error % (optimistic)" in table and "| 8.75 |" in table


# --- responses --------------------------------------------------------------------------------------

def test_response_layers_are_the_bns_after_each_3x3_conv():
    torch.manual_seed(0)
    for name in ("resnet20", "plain20"):
        names = [n for n, _ in response_layers(create_model(name))]
        assert len(names) == 19 and names[0] == "bn1" and names[1] == "layer1.0.bn1" and names[-1] == "layer3.2.bn2"


def test_layer_responses_match_a_direct_computation():
    torch.manual_seed(0)
    model = create_model("resnet8", width=0.5).eval()
    with torch.no_grad():  # non-trivial BN statistics
        for bn in model.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 1.5)
    images = torch.randn(6, 3, 32, 32)
    stds = layer_responses(model, images, batch_size=4)
    with torch.no_grad():
        stem = model.bn1(model.conv1(images))
        first = model.layer1[0].bn1(model.layer1[0].conv1(torch.relu(stem)))
    assert len(stds) == 7
    assert stds[0] == pytest.approx(stem.double().std(unbiased=False).item(), rel=1e-5)
    assert stds[1] == pytest.approx(first.double().std(unbiased=False).item(), rel=1e-5)


def test_responses_refuse_pre_activation_nets():
    from resnetlab.errors import ResnetlabError

    with pytest.raises(ResnetlabError, match="pre-activation"):
        response_layers(create_model("resnet8", block="preact"))
