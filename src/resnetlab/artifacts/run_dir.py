"""The layout of a run directory; the only module that knows its paths.

    RUN/config.json            resolved configuration
    RUN/env.json               versions, device, CPU/GPU name, git commit
    RUN/patch.diff             uncommitted changes of the source tree (empty when clean)
    RUN/metrics.jsonl|csv      one row per epoch and every N steps ("kind" column)
    RUN/curves.png             error and loss against iterations
    RUN/summary.json           final and best validation numbers; written when the run finishes
    RUN/checkpoints/last.safetensors    the model after the latest checkpoint (weights + metadata)
    RUN/checkpoints/best.safetensors    the model with the lowest validation error so far
    RUN/checkpoints/state.safetensors   everything resume needs (model, optimizer, EMA, RNG,
                                        loop accumulators; the JSON state in its header), one file
                                        written atomically so a crash never leaves a mixed state
    RUN/checkpoints/state.json          a readable copy of that JSON state
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from resnetlab.errors import ResnetlabError


@dataclass(frozen=True)
class RunDir:
    root: Path

    config = property(lambda self: self.root / "config.json")
    env = property(lambda self: self.root / "env.json")
    patch = property(lambda self: self.root / "patch.diff")
    metrics_jsonl = property(lambda self: self.root / "metrics.jsonl")
    metrics_csv = property(lambda self: self.root / "metrics.csv")
    curves = property(lambda self: self.root / "curves.png")
    summary = property(lambda self: self.root / "summary.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    last = property(lambda self: self.root / "checkpoints" / "last.safetensors")
    best = property(lambda self: self.root / "checkpoints" / "best.safetensors")
    state = property(lambda self: self.root / "checkpoints" / "state.safetensors")
    state_json = property(lambda self: self.root / "checkpoints" / "state.json")

    @property
    def finished(self) -> bool:
        return self.summary.is_file()

    @property
    def resumable(self) -> bool:
        return self.config.is_file() and self.state.is_file()


def create_run_dir(path: str | Path) -> RunDir:
    """A new run directory at `path` (created, or an existing empty folder). Never touches an
    existing run: a finished one or one that can be resumed is refused with one line."""
    run = RunDir(Path(path))
    if run.root.exists() and not run.root.is_dir():
        raise ResnetlabError(f"cannot use {run.root} as the run directory: it is a file")
    if run.finished:
        raise ResnetlabError(f"{run.root} already holds a finished run; choose another --out (nothing was overwritten)")
    if run.resumable:
        raise ResnetlabError(f"{run.root} holds an unfinished run; continue it with --resume {run.root} or choose another --out")
    if run.root.is_dir() and any(run.root.iterdir()):
        raise ResnetlabError(f"{run.root} is not empty and holds no run; choose another --out (nothing was overwritten)")
    ensure_writable(run.root)
    return run


def open_run_dir(path: str | Path) -> RunDir:
    """An existing run directory to resume."""
    run = RunDir(Path(path))
    if not run.root.is_dir():
        raise ResnetlabError(f"cannot resume {run.root}: no such run directory")
    if not run.config.is_file():
        raise ResnetlabError(f"cannot resume {run.root}: it has no config.json (not a resnetlab run directory)")
    if not run.state.is_file():
        raise ResnetlabError(f"cannot resume {run.root}: it has no checkpoint yet (checkpoints/state.safetensors); delete it and start the run again")
    ensure_writable(run.root)
    return run


def ensure_writable(folder: Path) -> None:
    """Create `folder` and check a file can be written there; one line if not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ResnetlabError(f"cannot write to the output directory {folder}: {reason}") from None
    if not os.access(folder, os.W_OK):
        raise ResnetlabError(f"cannot write to the output directory {folder}: permission denied")
