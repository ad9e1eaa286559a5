"""Metrics of a run as JSON lines (the record) and CSV (for spreadsheets), appended row by row.

Rows have a "kind": "epoch" (train and validation numbers at the end of an epoch), "step" (the
training loss and lr every N steps) or "final" (after BN re-estimation). Errors are fractions.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from resnetlab.errors import ResnetlabError

COLUMNS = (
    "kind", "epoch", "step", "train_loss", "train_top1_error", "val_loss", "val_top1_error", "val_top5_error",
    "lr", "epoch_seconds", "images_per_s", "wall_seconds", "lr_decayed_to",  # the last: a plateau decision
)
TIMING_COLUMNS = ("epoch_seconds", "images_per_s", "wall_seconds")


class MetricsLog:
    def __init__(self, jsonl: Path, csv_path: Path):
        self.jsonl, self.csv_path = Path(jsonl), Path(csv_path)

    def append(self, row: dict) -> None:
        row = {key: _clean(value) for key, value in row.items()}
        with self.jsonl.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        new_file = not self.csv_path.exists()
        with self.csv_path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)

    def rows(self) -> list[dict]:
        return read_metrics(self.jsonl)

    def truncate_after(self, step: int) -> None:
        """Drop the rows logged after the checkpoint at `step`, so a resumed run does not repeat
        them; the CSV is rewritten from the JSON lines. A "final" row shares the last checkpoint's
        step but belongs to the end of the run, which a resumed run redoes: it goes too."""
        kept = [r for r in self.rows() if r.get("step", 0) <= step and r.get("kind") != "final"]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.csv_path.unlink(missing_ok=True)
        with self.csv_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl. A last line cut short (power lost while it was appended) is
    left out -- resume then rewrites the file without it; a damaged line elsewhere is an error."""
    if not Path(path).is_file():
        return []
    lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ResnetlabError(f"{path} line {number} is not valid JSON; repair or delete that line") from None
    return rows


def _clean(value):
    # JSON has no NaN/inf; a diverged value is recorded as null
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
