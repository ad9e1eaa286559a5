"""torch.compile in training: the compiled step trains like the eager one, checkpoints keep plain
keys, and the compile mode (CUDA graphs on CUDA) is chosen by config and CLI."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from trainkit import tiny_config, write_synthetic_cifar10

from resnetlab.artifacts.checkpoint import read_checkpoint
from resnetlab.cli import main as cli_main
from resnetlab.config import validate_config
from resnetlab.engine import runtime as runtime_module
from resnetlab.engine.runtime import Runtime, resolve_compile
from resnetlab.engine.train import train
from resnetlab.errors import ConfigError

needs_compiler = pytest.mark.skipif(
    not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")),
    reason="torch.compile on the CPU needs a C++ compiler",
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_cifar10(tmp_path_factory.mktemp("synthetic"), n_train=200)


def _one_epoch(synthetic, out, **runtime):
    config = tiny_config(synthetic, out, **{"train.epochs": 1, "data.val_size": 40})
    config["runtime"].update(runtime)
    return train(validate_config(config), progress="none")


@needs_compiler
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_a_compiled_run_trains_like_the_eager_run(synthetic, tmp_path, mode):
    eager = _one_epoch(synthetic, tmp_path / "eager")
    compiled = _one_epoch(synthetic, tmp_path / "compiled", compile=True, compile_mode=mode)
    # Same seed, data and schedule; inductor fuses and reorders float arithmetic, so close, not equal.
    assert compiled.summary["final"]["train_loss"] == pytest.approx(eager.summary["final"]["train_loss"], rel=1e-3)
    assert compiled.summary["final"]["val_loss"] == pytest.approx(eager.summary["final"]["val_loss"], rel=1e-3)
    tensors, _ = read_checkpoint(tmp_path / "compiled" / "checkpoints" / "last.safetensors")
    assert not any("_orig_mod" in key for key in tensors)  # loadable by an eager model
    saved = json.loads((tmp_path / "compiled" / "config.json").read_text())
    assert saved["runtime"]["compile"] is True and saved["runtime"]["compile_mode"] == mode


def test_cuda_graphs_only_when_compiled_on_cuda_in_a_graph_mode():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device objects need no GPU
    assert Runtime(cuda, "fp32", True, True, "reduce-overhead").cuda_graphs
    assert Runtime(cuda, "fp32", True, True, "max-autotune").cuda_graphs
    assert not Runtime(cuda, "fp32", True, True, "default").cuda_graphs
    assert not Runtime(cuda, "fp32", True, True, "max-autotune-no-cudagraphs").cuda_graphs
    assert not Runtime(cuda, "fp32", True, False, "reduce-overhead").cuda_graphs
    assert not Runtime(cpu, "bf16", True, True, "reduce-overhead").cuda_graphs


def test_an_unknown_compile_mode_is_a_config_error(synthetic, tmp_path):
    config = tiny_config(synthetic, tmp_path / "run")
    config["runtime"]["compile_mode"] = "fastest"
    with pytest.raises(ConfigError, match="compile_mode"):
        validate_config(config)


def test_the_train_flag_sets_compile_and_its_mode(monkeypatch):
    from resnetlab.cli import train_cmd

    seen = {}
    monkeypatch.setattr("resnetlab.engine.train.train", lambda config, progress: seen.setdefault("config", config))
    monkeypatch.setattr(train_cmd, "result_line", lambda result: "")
    assert cli_main(["train", "--out", "unused", "--compile", "reduce-overhead"]) == 0
    assert seen["config"].runtime.compile is True and seen["config"].runtime.compile_mode == "reduce-overhead"
    seen.clear()
    assert cli_main(["train", "--out", "unused", "--compile"]) == 0
    assert seen["config"].runtime.compile is True and seen["config"].runtime.compile_mode == "auto"
    seen.clear()
    assert cli_main(["train", "--out", "unused", "--no-compile"]) == 0
    assert seen["config"].runtime.compile is False
    seen.clear()
    assert cli_main(["train", "--out", "unused"]) == 0
    assert seen["config"].runtime.compile == "auto" and seen["config"].runtime.compile_mode == "auto"


def test_compile_and_no_compile_flags_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["train", "--out", "unused", "--compile", "--no-compile"])
    assert stop.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_auto_compiles_with_cuda_graphs_on_a_single_cuda_process_only(monkeypatch):
    monkeypatch.setattr(runtime_module, "triton_supports", lambda device: True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device objects need no GPU
    assert resolve_compile("auto", "auto", cuda, distributed=False) == (True, "reduce-overhead")
    assert resolve_compile("auto", "auto", cuda, distributed=True)[0] is False
    assert resolve_compile("auto", "auto", cpu, distributed=False) == (False, "default")
    # what is asked for explicitly is kept
    assert resolve_compile(True, "auto", cpu, distributed=False) == (True, "default")
    assert resolve_compile(True, "auto", cuda, distributed=True) == (True, "reduce-overhead")
    assert resolve_compile(False, "auto", cuda, distributed=False) == (False, "reduce-overhead")
    assert resolve_compile("auto", "max-autotune", cuda, distributed=False) == (True, "max-autotune")


def test_auto_trains_eagerly_on_cuda_where_triton_cannot_compile(monkeypatch):
    monkeypatch.setattr(runtime_module, "triton_supports", lambda device: False)  # not installed, or an old GPU
    cuda = torch.device("cuda")
    assert resolve_compile("auto", "auto", cuda, distributed=False) == (False, "reduce-overhead")
    assert resolve_compile(True, "auto", cuda, distributed=False)[0] is True  # asked for: kept


def test_the_saved_config_says_whether_the_run_compiled(synthetic, tmp_path):
    """compile auto on the CPU trains eagerly, and config.json records the resolved values."""
    _one_epoch(synthetic, tmp_path / "run", device="cpu")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["runtime"]["compile"] is False and saved["runtime"]["compile_mode"] == "default"


def test_an_unknown_compile_flag_value_exits_2(capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["train", "--out", "unused", "--compile", "fastest"])
    assert stop.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("policy, accum_steps", [("fixed", 1), ("dynamic", 1), ("fixed", 2)])
def test_a_cuda_graph_run_trains_like_the_eager_run_on_cuda(synthetic, tmp_path, policy, accum_steps):
    """CUDA graphs replay recorded kernels on fixed memory: the per-step lr, the meters summed on the
    device while the graphs reuse their output memory, the dynamic BN momentum (a counter buffer
    zeroed between replays) and gradient accumulation (two forward and backward replays per step,
    their gradients summed) must still give the eager run's numbers."""
    common = {"device": "cuda", "precision": "fp32", "channels_last": True}

    def run(out, **runtime):
        config = tiny_config(synthetic, out, **{"train.epochs": 2, "data.val_size": 40, "bn.policy": policy,
                                                "train.accum_steps": accum_steps})
        config["runtime"].update(common, **runtime)
        return train(validate_config(config), progress="none")

    eager = run(tmp_path / "eager")
    graphs = run(tmp_path / "graphs", compile=True, compile_mode="reduce-overhead")
    for key in ("train_loss", "val_loss"):
        assert graphs.summary["final"][key] == pytest.approx(eager.summary["final"][key], rel=1e-3)
    eager_state, _ = read_checkpoint(tmp_path / "eager" / "checkpoints" / "last.safetensors")
    graph_state, _ = read_checkpoint(tmp_path / "graphs" / "checkpoints" / "last.safetensors")
    for key in (k for k in eager_state if "running_" in k):  # BN statistics follow the same momentum
        assert torch.allclose(graph_state[key], eager_state[key], rtol=1e-2, atol=1e-3), key
