"""`resnetlab models`: table, JSON and Markdown output, patterns, errors."""
from __future__ import annotations

import json

import pytest

import resnetlab.cli
from resnetlab.models import list_models


@pytest.fixture(autouse=True)
def _only_this_command(monkeypatch):
    # Test this subcommand on its own, whichever other subcommands exist in this checkout.
    monkeypatch.setattr(resnetlab.cli, "COMMAND_MODULES", ["models_cmd"])


def test_json_lists_every_registered_model(capsys):
    assert resnetlab.cli.main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == list_models()
    assert all(set(row) == {"name", "params", "macs", "input_size", "family"} for row in rows)
    by_name = {row["name"]: row for row in rows}
    assert by_name["resnet20"] == {"name": "resnet20", "params": 269_722, "macs": 40_551_040,
                                   "input_size": [3, 32, 32], "family": "cifar"}
    assert by_name["resnet50"]["params"] == 25_557_032 and by_name["resnet50"]["input_size"] == [3, 224, 224]
    assert abs(by_name["resnet152"]["macs"] / 11.28e9 - 1) < 0.02


def test_table_filters_by_pattern(capsys):
    assert resnetlab.cli.main(["models", "resnet5*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "family", "depth", "params", "MACs", "input"]
    assert [line.split()[0] for line in lines[1:]] == ["resnet56", "resnet50"]
    assert lines[1].split() == ["resnet56", "cifar", "56", "853,018", "125.49M", "3x32x32"]
    assert lines[2].split() == ["resnet50", "imagenet", "50", "25,557,032", "3.86G", "3x224x224"]


def test_an_unlisted_resolvable_name_is_shown(capsys):
    assert resnetlab.cli.main(["models", "resnet164", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == "resnet164" and row["family"] == "cifar"


def test_markdown_table(capsys):
    assert resnetlab.cli.main(["models", "plain*", "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| model | family | depth | params | multiply-adds | input |"
    assert lines[2] == "| plain20 | cifar | 20 | 269,722 | 40.55M | 3x32x32 |"
    assert len(lines) == 2 + len(list_models("plain*"))


def test_no_match_is_a_clear_error(capsys):
    assert resnetlab.cli.main(["models", "vgg*"]) == 2
    assert "no model matches 'vgg*'" in capsys.readouterr().err
