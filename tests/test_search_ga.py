"""The genetic algorithm of seed 004: its operators, its seeded determinism, resuming a study,
and diverging trials (all with a fake fitness, no training)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from resnetlab.config import validate_config
from resnetlab.errors import ConfigError, DivergenceError
from resnetlab.search import genetic
from resnetlab.search.genetic import GASettings, crossover, mutate, next_generation, run_genetic, select
from resnetlab.search.objective import TrialOutcome
from resnetlab.search.optuna_search import StudySpec
from resnetlab.search.space import Param, SearchSpace, check_space, load_space, seed004_space

SPACE = seed004_space()


def test_seed004_space_caps_momentum_unless_asked():
    assert [(p.key, p.low, p.high, p.log) for p in SPACE.params] == [
        ("optim.lr", 1e-6, 1e-2, True), ("optim.weight_decay", 0.0, 0.1, False), ("optim.momentum", 0.1, 0.99, False)]
    unsafe = seed004_space(allow_unsafe_momentum=True)
    assert unsafe.params[2].high == 1.5
    with pytest.raises(ConfigError, match="allow-unsafe-momentum"):
        check_space(unsafe, allow_unsafe_momentum=False)
    with pytest.warns(UserWarning, match="diverge"):
        check_space(unsafe, allow_unsafe_momentum=True)


def test_space_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("optim.lr: {low: 1.0e-3, high: 0.5, log: true}\ntrain.label_smoothing: {low: 0, high: 0.2}\n")
    space = load_space(path)
    assert space.keys == ["optim.lr", "train.label_smoothing"] and space.params[0].log
    path.write_text("optim.lr: {low: 0, high: 0.5, log: true}\n")
    with pytest.raises(ConfigError, match="log range"):
        load_space(path)


def test_samples_stay_in_range_and_lr_is_log_uniform():
    rng = np.random.default_rng(0)
    draws = [SPACE.sample(rng) for _ in range(4000)]
    for p in SPACE.params:
        values = [d[p.key] for d in draws]
        assert p.low <= min(values) and max(values) <= p.high
    # log-uniform over four decades: about a quarter of the draws in each decade
    below_1e4 = np.mean([d["optim.lr"] < 1e-4 for d in draws])
    assert abs(below_1e4 - 0.5) < 0.04


def test_selection_keeps_the_fittest_half():
    population = [{"x": float(i)} for i in range(10)]
    fitness = [0.3, 0.9, 0.1, 0.5, 0.0, 0.8, 0.2, 0.7, 0.4, 0.6]
    kept, kept_fitness = select(population, fitness, keep=5)
    assert kept_fitness == [0.9, 0.8, 0.7, 0.6, 0.5]
    assert [g["x"] for g in kept] == [1, 5, 7, 9, 3]


def test_crossover_point_is_the_middle_gene():
    a = {"p0": 0.0, "p1": 1.0, "p2": 2.0, "p3": 3.0}
    b = {"p0": 10.0, "p1": 11.0, "p2": 12.0, "p3": 13.0}
    assert crossover(a, b, ["p0", "p1", "p2", "p3"]) == {"p0": 0.0, "p1": 1.0, "p2": 12.0, "p3": 13.0}
    three = ["p0", "p1", "p2"]  # seed 004's genome (lr, wd, momentum): the cut is before the middle gene
    assert crossover(a, b, three) == {"p0": 0.0, "p1": 11.0, "p2": 12.0}


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_mutation_frequency_matches_the_rate(rate):
    rng = np.random.default_rng(1)
    genome = {"optim.lr": 1e-3, "optim.weight_decay": 0.05, "optim.momentum": 0.5}
    n = 3000
    changed = sum(v != genome[k] for _ in range(n) for k, v in mutate(genome, SPACE, rate, rng).items())
    frequency = changed / (3 * n)
    sigma = math.sqrt(max(rate * (1 - rate), 1e-12) / (3 * n))
    assert abs(frequency - rate) <= 4 * sigma + 1e-12


def test_children_mix_survivor_genes():
    rng = np.random.default_rng(2)
    survivors = [SPACE.sample(rng) for _ in range(3)]
    children = next_generation(survivors, 5, SPACE, rate=0.0, rng=rng)
    assert len(children) == 5
    for child in children:  # no mutation: every gene comes from some survivor
        for key in SPACE.keys:
            assert child[key] in {s[key] for s in survivors}


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="population"):
        GASettings(population=1)
    with pytest.raises(ConfigError, match="mutation"):
        GASettings(mutation_rate=1.5)


# --- the whole GA against a fake fitness (the distance of lr from 1e-3 in decades) ---------------------
def fake_fitness(calls):
    def run_trial(base, params, out, on_epoch=None):
        calls.append(dict(params))
        if params["optim.momentum"] > 0.8:  # stands for a diverging run
            return TrialOutcome(None, 0, "training loss is nan")
        return TrialOutcome(1.0 / (1.0 + abs(math.log10(params["optim.lr"]) + 3)), 1)

    return run_trial


def spec(tmp_path, name="ga"):
    base = validate_config({"data": {"dir": str(tmp_path)}, "train": {"epochs": 1, "steps": None}})
    return StudySpec(f"sqlite:///{tmp_path / 'search.db'}", name, "ga", base.to_dict(), SPACE, str(tmp_path))


def finished(study):
    return sorted((t.user_attrs["generation"], t.user_attrs["member"], t.state.name, t.value, tuple(t.params.values()))
                  for t in study.get_trials() if t.state.name == "COMPLETE")


def test_ga_is_seeded_improves_and_scores_divergence_zero(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(genetic, "run_trial", fake_fitness(calls))
    settings = GASettings(population=4, generations=3, seed=3)
    study = run_genetic(spec(tmp_path / "a"), settings, log=lambda *_: None)
    assert len(calls) == 4 + 2 * 2  # survivors are not retrained
    trials = study.get_trials()
    assert {t.user_attrs["generation"] for t in trials} == {0, 1, 2}
    best_by_gen = [max((t.value or 0) for t in trials if t.user_attrs["generation"] <= g) for g in range(3)]
    assert best_by_gen == sorted(best_by_gen)
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert all(t.params["optim.momentum"] > 0.8 for t in failed)
    again = run_genetic(spec(tmp_path / "b"), settings, log=lambda *_: None)
    assert finished(again) == finished(study)


def test_ga_resumes_a_killed_study_without_retraining(tmp_path, monkeypatch):
    settings = GASettings(population=4, generations=3, seed=5)
    calls = []
    monkeypatch.setattr(genetic, "run_trial", fake_fitness(calls))
    reference = finished(run_genetic(spec(tmp_path / "ref"), settings, log=lambda *_: None))

    calls.clear()
    crash_after = 5

    def crashing(base, params, out, on_epoch=None):
        if len(calls) == crash_after:
            raise KeyboardInterrupt  # the process dies mid-trial
        return fake_fitness(calls)(base, params, out)

    monkeypatch.setattr(genetic, "run_trial", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_genetic(spec(tmp_path / "run"), settings, log=lambda *_: None)
    assert len(calls) == crash_after
    monkeypatch.setattr(genetic, "run_trial", fake_fitness(calls))
    study = run_genetic(spec(tmp_path / "run"), settings, log=lambda *_: None)
    assert finished(study) == reference
    assert len(calls) == len(reference)  # each genome trained exactly once over both runs


def test_divergence_from_the_engine_is_a_failed_trial(tmp_path, monkeypatch):
    import resnetlab.engine.train as engine

    def diverge(config, **kwargs):
        raise DivergenceError("training loss is inf at step 3")

    monkeypatch.setattr(engine, "train", diverge)
    study = run_genetic(spec(tmp_path), GASettings(population=2, generations=1), log=lambda *_: None)
    assert [(t.state.name, t.value) for t in study.get_trials()] == [("COMPLETE", 0.0)] * 2
    assert "inf" in study.get_trials()[0].user_attrs["error"]
