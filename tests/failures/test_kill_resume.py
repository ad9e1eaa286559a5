"""kill -9 of `resnetlab train` at chosen and at random moments -- inside a step, while a checkpoint
is being written, between two checkpoint files -- then `train --resume`: the finished run equals a
run that was never interrupted, bit for bit (CPU, same seed). A SIGKILL runs no handler, so only
what the atomic writes put on disk survives."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from trainkit import tiny_config, write_synthetic_cifar10

from resnetlab.artifacts.checkpoint import read_checkpoint, read_tensors
from resnetlab.artifacts.metrics import TIMING_COLUMNS
from resnetlab.cli import main
from resnetlab.engine.train import train

KILLABLE = Path(__file__).with_name("_killable.py")
# 2 epochs of 5 steps, a checkpoint at steps 3, 5 (epoch end), 6, 9 and 10 (the end)
EVERY = 3
SEED = 20261122
# SIGKILL and /proc/self/fd (used to find the file a half-write targets): POSIX, Linux
pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs SIGKILL and /proc/self/fd (Linux)")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    data = write_synthetic_cifar10(root / "data", n_train=400)
    config = tiny_config(data, None, **{"train.checkpoint_every_steps": EVERY, "train.log_every_steps": 2})
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(config))
    reference = train({**config, "out": str(root / "reference")}, progress="none")
    return recipe, reference.run_dir


def killed_run(recipe: Path, out: Path, moment: str, n: int) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(KILLABLE), moment, str(n), "train", "--recipe-file", str(recipe), "--out", str(out),
            "--quiet"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=240, env=_env())


def _env() -> dict:
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}


def resume_cli(out: Path, capsys) -> None:
    code = main(["train", "--resume", str(out), "--quiet"])
    _, err = capsys.readouterr()
    assert code == 0, err


def saved_step(out: Path) -> int | None:
    path = out / "checkpoints" / "state.safetensors"
    return read_tensors(path)[1]["state"]["step"] if path.exists() else None


def assert_same_as_reference(reference: Path, run: Path) -> None:
    for name in ("last.safetensors", "best.safetensors", "state.safetensors"):
        a, _ = read_tensors(reference / "checkpoints" / name)
        b, _ = read_tensors(run / "checkpoints" / name)
        assert a.keys() == b.keys(), name
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, (name, different[:5])
    assert _metrics(reference) == _metrics(run)
    keys = ("final", "best", "epochs", "steps")
    summary_a, summary_b = (json.loads((p / "summary.json").read_text()) for p in (reference, run))
    assert {k: summary_a[k] for k in keys} == {k: summary_b[k] for k in keys}


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]


# (moment, n, the step of the checkpoint on disk after the kill)
MOMENTS = [
    pytest.param("backward", 8, 6, id="inside-step-8"),
    pytest.param("rename:state.safetensors", 2, 3, id="state-temp-complete-not-renamed"),
    pytest.param("rename:last.safetensors", 3, 6, id="between-state-and-last"),
    pytest.param("halfwrite:state.safetensors", 4, 6, id="state-half-written"),
]


@pytest.mark.parametrize("moment, n, on_disk", MOMENTS)
def test_killed_at_a_chosen_moment_then_resumed_is_identical(setup, tmp_path, capsys, moment, n, on_disk):
    recipe, reference = setup
    out = tmp_path / "run"
    killed = killed_run(recipe, out, moment, n)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert saved_step(out) == on_disk  # at most the steps since the last checkpoint are lost
    _, metadata = read_checkpoint(out / "checkpoints" / "last.safetensors")  # the model file is whole too
    assert metadata["step"] <= on_disk
    resume_cli(out, capsys)
    assert_same_as_reference(reference, out)


def test_killed_at_a_random_moment_then_resumed_is_identical(setup, tmp_path, capsys):
    """A kill from outside at a seeded random delay after the first checkpoint appears: it may land
    anywhere (a step, a log line, a checkpoint write, the plot). A torn last metrics line (what a
    power cut can leave; a kill cannot tear one small write) is dropped on resume."""
    recipe, reference = setup
    rng = random.Random(SEED)
    out = tmp_path / "run"
    argv = [sys.executable, str(KILLABLE), "none", "0", "train", "--recipe-file", str(recipe), "--out", str(out),
            "--quiet"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    state = out / "checkpoints" / "state.safetensors"
    deadline = time.monotonic() + 180
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    with (out / "metrics.jsonl").open("ab") as metrics:  # and a power cut tore the line being appended
        metrics.write(b'{"kind": "step", "epoch": 2, "st' + b"\x00" * 7)
    resume_cli(out, capsys)
    assert_same_as_reference(reference, out)


def test_killed_before_the_first_checkpoint_says_to_start_again(setup, tmp_path, capsys):
    recipe, _ = setup
    out = tmp_path / "run"
    killed = killed_run(recipe, out, "backward", 2)
    assert killed.returncode == -signal.SIGKILL
    code = main(["train", "--resume", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no checkpoint yet" in err, err


def test_killed_while_finishing_with_bn_reestimation_then_resumed_is_identical(tmp_path, capsys):
    """The end of a run re-estimates BN, logs a "final" row and rewrites last.safetensors before
    summary.json marks it finished; a kill just before that mark must not leave a second final row."""
    data = write_synthetic_cifar10(tmp_path / "data", n_train=200)
    config = tiny_config(data, None, **{"train.epochs": 1, "data.val_size": 40, "bn.reestimate": True,
                                        "bn.reestimate_batches": 2})
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(config))
    reference = train({**config, "out": str(tmp_path / "reference")}, progress="none").run_dir
    out = tmp_path / "run"
    killed = killed_run(recipe, out, "rename:summary.json", 1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resume_cli(out, capsys)
    assert [r["kind"] for r in _metrics(out)].count("final") == 1
    assert_same_as_reference(reference, out)
