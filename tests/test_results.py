"""The committed results under results/ are what their run directories say: rebuilding each report
from its committed runs gives the same table and the same runs.csv (no number was edited by hand)."""
from __future__ import annotations

from pathlib import Path

import pytest

from resnetlab.experiments.report import write_report
from resnetlab.experiments.runner import collect

RESULTS = Path(__file__).resolve().parents[1] / "results"
EXPERIMENT_DIRS = sorted(p.parent for p in RESULTS.glob("*/experiment.json"))


def _table(report: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith("| ")]


@pytest.mark.parametrize("experiment_dir", EXPERIMENT_DIRS, ids=lambda p: p.name)
def test_committed_report_rebuilds_from_its_runs(experiment_dir, tmp_path):
    meta, rows, _, unfinished = collect([experiment_dir], tmp_path)
    assert rows and not unfinished
    write_report(tmp_path, meta, rows, unfinished)
    assert _table((tmp_path / "REPORT.md").read_text()) == _table((experiment_dir / "REPORT.md").read_text())
    assert (tmp_path / "runs.csv").read_text() == (experiment_dir / "runs.csv").read_text()


def test_the_required_results_are_committed():
    assert {"degradation", "blocks"} <= {p.name for p in EXPERIMENT_DIRS}
