"""Bad configurations through the CLI -- `--set`, `--epochs`, `--recipe-file` and a hand-edited
config.json of a run being resumed: wrong types, NaN/inf numbers, negative epochs, unknown keys,
files that are not YAML -- always one line naming the key or file, exit 2, no run directory, and a
YAML tag never constructs an object. (tests/test_config.py covers the parser's basic cases and
tests/test_cli_train.py the first few CLI ones.)"""
from __future__ import annotations

import json
import os
import shutil

import pytest
from evalkit import assert_one_line_error, run_cli
from trainkit import tiny_config, write_synthetic_cifar10

from resnetlab.engine.train import train

SET_CASES = [
    (["--set", "optim.lr=.inf"], ["'optim.lr'", "finite"]),
    (["--set", "optim.lr=.nan"], ["'optim.lr'", "finite"]),
    (["--set", "optim.lr=1e999"], ["'optim.lr'", "finite"]),
    (["--set", "optim.lr=-0.1"], ["'optim.lr'", "greater than 0"]),
    (["--set", "optim.lr=[0.1]"], ["'optim.lr'", "number"]),
    (["--set", "optim.lr=fast"], ["'optim.lr'", "'fast'"]),
    (["--set", "train.epochs=-3"], ["'train.epochs'", "greater than 0"]),
    (["--epochs", "-1"], ["'train.epochs'", "greater than 0"]),
    (["--epochs", "nan"], ["'train.epochs'", "finite"]),
    (["--set", "train.batch_size=1.5"], ["'train.batch_size'", "integer"]),
    (["--set", "train.batch_size=0"], ["'train.batch_size'"]),
    (["--set", "schedule.milestones=[3,1]"], ["'schedule.milestones'", "increasing"]),
    (["--set", "schedule.milestones=[.nan]"], ["'schedule.milestones'", "finite"]),
    (["--set", "model=3"], ["'model'", "dictionary"]),
    (["--set", "model.options.width=-1"], ["'model.options'", "width"]),
    (["--set", "model.options.depth=20"], ["model option 'depth'"]),
    (["--set", "optim.lr.value=1"], ["'optim.lr' is a value, not a section"]),
    (["--set", "optimizer.lr=0.1"], ["unknown config key 'optimizer'", "'optim'"]),
    (["--set", "train.epoch=3"], ["unknown config key 'train.epoch'", "'train.epochs'"]),
    (["--set", "=1"], ["--set expects section.key=value"]),
    (["--set", "bn.momentum=2"], ["'bn.momentum'"]),
    (["--checkpoint-every", "0"], ["'train.checkpoint_every_steps'"]),
]


@pytest.mark.parametrize("extra, fragments", SET_CASES, ids=[" ".join(c[0]) for c in SET_CASES])
def test_bad_flags_and_overrides_are_one_line_and_create_nothing(capsys, tmp_path, extra, fragments):
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", "--model", "resnet8", *extra, "--data-dir", tmp_path / "no-data",
                                "--out", out)
    assert_one_line_error(code, stdout, err, *fragments)
    assert not out.exists()


def test_a_yaml_tag_in_an_override_or_recipe_never_runs(capsys, tmp_path):
    marker = tmp_path / "executed"
    tag = f"!!python/object/apply:os.system ['touch {marker}']"
    code, out, err = run_cli(capsys, "train", "--set", f"optim.lr={tag}", "--data-dir", tmp_path,
                             "--out", tmp_path / "r")
    assert_one_line_error(code, out, err, "'optim.lr'")
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"optim:\n  lr: {tag}\n")
    code, out, err = run_cli(capsys, "train", "--recipe-file", recipe, "--data-dir", tmp_path, "--out", tmp_path / "r")
    assert_one_line_error(code, out, err, str(recipe), "not valid YAML")
    assert not marker.exists()


RECIPE_FILES = {
    "nan-lr": ("optim:\n  lr: .nan\n", ["'optim.lr'", "finite"]),
    "negative-epochs": ("train:\n  epochs: -2\n  steps: null\n", ["'train.epochs'"]),
    "unknown-key": ("optim:\n  lrr: 0.1\n", ["unknown config key 'optim.lrr'", "'optim.lr'"]),
    "unknown-section": ("optimiser:\n  lr: 0.1\n", ["unknown config key 'optimiser'"]),
    "wrong-type": ("train:\n  batch_size: [128]\n", ["'train.batch_size'", "integer"]),
    "string-number": ("optim:\n  lr: ten\n", ["'optim.lr'", "'ten'"]),
    "section-is-a-value": ("optim: 0.1\n", ["'optim'"]),
    "a-list": ("- optim\n- train\n", ["must hold a mapping"]),
    "a-scalar": ("42\n", ["must hold a mapping"]),
    "broken-yaml": ("optim: {lr: 0.1\n", ["not valid YAML", "line 2"]),
    "tab-indented": ("optim:\n\tlr: 0.1\n", ["not valid YAML"]),
    "integer-key": ("optim:\n  1: 0.1\n", ["'optim", "strings"]),
    "duplicate-key": ("optim:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.5\n", ["key 'lr' appears twice", "line 4"]),
    "duplicate-section": ("train:\n  epochs: 3\noptim:\n  lr: 0.1\ntrain:\n  seed: 1\n", ["'train' appears twice"]),
    "binary": (os.urandom(256) + b"\xff\xfe", ["not UTF-8 text"]),
    "latin-1": ("optim:\n  lr: 0.1  # caf\xe9\n".encode("latin-1"), ["not UTF-8 text"]),
}


@pytest.mark.parametrize("name", list(RECIPE_FILES))
def test_bad_recipe_files_are_one_line_and_create_nothing(capsys, tmp_path, name):
    content, fragments = RECIPE_FILES[name]
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", "--recipe-file", recipe, "--model", "resnet8",
                                "--data-dir", tmp_path / "no-data", "--out", out)
    assert_one_line_error(code, stdout, err, *fragments)
    assert not out.exists()


def test_missing_or_folder_recipe_file_is_one_line(capsys, tmp_path):
    for path, fragment in ((tmp_path / "nope.yaml", "No such file"), (tmp_path, "Is a directory")):
        code, out, err = run_cli(capsys, "train", "--recipe-file", path, "--data-dir", tmp_path,
                                 "--out", tmp_path / "r")
        assert_one_line_error(code, out, err, "cannot read recipe file", fragment)


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    synthetic = write_synthetic_cifar10(root / "data", n_train=200)
    result = train(tiny_config(synthetic, root / "run", **{"train.epochs": 1, "data.val_size": 40}), progress="none")
    (result.run_dir / "summary.json").unlink()
    return result.run_dir


@pytest.mark.parametrize("edit, fragments", [
    (lambda c: c["optim"].update(lr=float("nan")), ["'optim.lr'", "finite"]),
    (lambda c: c["train"].update(epochs=-1), ["'train.epochs'"]),
    (lambda c: c["optim"].update(lrr=0.1), ["unknown config key 'optim.lrr'"]),
    (lambda c: "not json {", ["config.json", "not valid JSON"]),
    (lambda c: [1, 2], ["mapping"]),
])
def test_a_hand_edited_config_json_is_one_line_on_resume(capsys, tmp_path, unfinished_run, edit, fragments):
    run = shutil.copytree(unfinished_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    changed = edit(config)
    text = changed if isinstance(changed, str) else json.dumps(config if changed is None else changed)
    (run / "config.json").write_text(text)
    before = (run / "checkpoints" / "state.safetensors").read_bytes()
    code, out, err = run_cli(capsys, "train", "--resume", run)
    assert_one_line_error(code, out, err, *fragments)
    assert (run / "checkpoints" / "state.safetensors").read_bytes() == before
