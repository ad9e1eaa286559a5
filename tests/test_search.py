"""`resnetlab search` with a tiny model on tiny synthetic data (about a second per trial): every
method, pruning, the reports, the best recipe's round trip, and the CLI's user errors."""
from __future__ import annotations

import csv

import optuna
import pytest
import yaml

from evalkit import assert_one_line_error, run_cli
from resnetlab.config import build_config, validate_config
from resnetlab.search.driver import SearchRequest, ga_settings_for, ga_trials, run_search
from resnetlab.search.genetic import GASettings
from resnetlab.search.optuna_search import StudySpec, objective
from resnetlab.search.space import seed004_space
from trainkit import tiny_config, write_synthetic_cifar10


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_cifar10(tmp_path_factory.mktemp("search-data"), n_train=400, n_test=20)


def base(data_dir, **overrides):
    return validate_config(tiny_config(data_dir, None, **{"train.epochs": 1, **overrides}))


def test_all_methods_spend_the_same_budget_and_report(data_dir, tmp_path):
    request = SearchRequest(("ga", "tpe", "random"), base(data_dir), seed004_space(), tmp_path, trials=3,
                            ga=GASettings(population=2, seed=1), pruner="none")
    report = run_search(request, log=lambda *_: None)
    assert {m: len(rows) for m, rows in report.rows.items()} == {"ga": 3, "tpe": 3, "random": 3}
    assert [r["generation"] for r in report.rows["ga"]] == [0, 0, 1]  # survivors are not retrained
    for name in ("leaderboard.md", "leaderboard.csv", "ga_fitness.png", "comparison.png", "tpe_history.png",
                 "random_history.png", "best_recipe.yaml", "search.db"):
        assert (tmp_path / name).is_file(), name
    with open(tmp_path / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and all(0 <= float(r["val_accuracy"]) <= 1 for r in rows)
    table = (tmp_path / "leaderboard.md").read_text()
    assert "| ga | 3 |" in table and "| tpe | 3 |" in table and "| random | 3 |" in table
    best = max(float(r["val_accuracy"]) for r in rows)
    assert report.best["val_accuracy"] == pytest.approx(best)

    # the best configuration round-trips through the recipe file that `train --recipe-file` reads
    recipe = yaml.safe_load((tmp_path / "best_recipe.yaml").read_text())
    assert "out" not in recipe
    assert build_config(recipe_file=tmp_path / "best_recipe.yaml") == report.best_config
    assert report.best_config.optim.lr == pytest.approx(report.best["optim.lr"])
    run_dir = str(tmp_path / "run")
    assert build_config(recipe_file=tmp_path / "best_recipe.yaml", out=run_dir).out == run_dir
    assert not (tmp_path / "trials" / "resnetlab-ga" / "0000" / "curves.png").exists()  # the search draws its own


class PruneEverything(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_pruning_stops_a_trial_after_its_first_epoch(data_dir, tmp_path):
    config = base(data_dir, **{"train.epochs": 3})
    spec = StudySpec("unused", "prune", "tpe", config.to_dict(), seed004_space(), str(tmp_path))
    study = optuna.create_study(direction="maximize", pruner=PruneEverything())
    study.optimize(objective(spec, config), n_trials=1)
    trial = study.trials[0]
    assert trial.state.name == "PRUNED" and trial.user_attrs["epochs"] == 1
    assert list(trial.intermediate_values) == [1]


def test_ga_generations_follow_the_trial_budget():
    assert ga_trials(GASettings()) == 10 + 4 * 5  # seed 004: population 10, 5 generations, half survive
    assert ga_settings_for(GASettings(population=10), 30).generations == 5
    assert ga_settings_for(GASettings(population=4), 9).generations == 4  # 4 + 2 + 2 + 1


def test_cli_search_writes_a_recipe_train_accepts(data_dir, tmp_path, capsys):
    out = tmp_path / "search"
    code, stdout, err = run_cli(
        capsys, "search", "--method", "random", "--model", "resnet8", "--data-dir", data_dir, "--out", out,
        "--budget-epochs", 1, "--trials", 2, "--val-size", 80, "--set", "model.options.width=0.25",
        "--set", "train.batch_size=64", "--set", "runtime.device=cpu", "--set", "runtime.threads=1",
    )  # fmt: skip
    assert code == 0, err
    assert "leaderboard" in stdout and (out / "best_recipe.yaml").is_file()
    from resnetlab.cli import build_parser
    from resnetlab.cli.train_cmd import config_from_args

    args = build_parser().parse_args(["train", "--recipe-file", str(out / "best_recipe.yaml"),
                                      "--out", str(tmp_path / "r")])
    config = config_from_args(args)
    recipe = yaml.safe_load((out / "best_recipe.yaml").read_text())
    assert config.optim.lr == recipe["optim"]["lr"] and config.model.name == "resnet8"


@pytest.mark.parametrize("argv, fragment", [
    (["--space", "SPACE"], "--allow-unsafe-momentum"),
    (["--workers", "0"], "--workers"),
    (["--val-size", "0"], "validation"),
    (["--set", "optim.lrr=1"], "optim.lr"),
])
def test_cli_user_errors_are_one_line(data_dir, tmp_path, capsys, argv, fragment):
    space = tmp_path / "space.yaml"
    space.write_text("optim.momentum: {low: 0.5, high: 1.2}\n")
    argv = [str(space) if a == "SPACE" else a for a in argv]
    code, out, err = run_cli(capsys, "search", "--method", "tpe", "--model", "resnet8", "--data-dir", data_dir,
                             "--out", tmp_path / "s", "--trials", 1, "--budget-epochs", 1, *argv)
    assert_one_line_error(code, out, err, fragment)


def test_a_search_space_with_a_repeated_key_is_refused(tmp_path):
    from resnetlab.errors import ConfigError
    from resnetlab.search.space import load_space

    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {low: 1e-4, high: 0.3, log: true}\noptim.lr: {low: 0.01, high: 0.1}\n")
    with pytest.raises(ConfigError, match="'optim.lr' appears twice"):
        load_space(space)


def test_trials_skip_the_recipes_final_tta(tmp_path):
    from resnetlab.search.objective import trial_config

    config = trial_config(build_config("fast-cifar"), {"optim.lr": 0.05}, tmp_path / "trial")
    assert config.train.final_tta == () and config.optim.lr == 0.05


def test_trials_train_eagerly_unless_compile_is_asked_for(tmp_path):
    from resnetlab.search.objective import trial_config

    assert trial_config(build_config("fast-cifar"), {}, tmp_path / "trial").runtime.compile is False  # was auto
    asked = build_config("fast-cifar", overrides=["runtime.compile=true"])
    assert trial_config(asked, {}, tmp_path / "trial").runtime.compile is True
