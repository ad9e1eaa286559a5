"""Smoke tests of the benchmark: tiny runs, the JSON contract, the MFU arithmetic, the baseline's
transforms against torchvision's semantics. Timings themselves are never asserted."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from resnetlab.bench import baseline as baseline_mod
from resnetlab.bench import breakdown
from resnetlab.bench import train_bench
from resnetlab.bench.baseline import (BaselineConfig, Normalize, RandomCrop, RandomHorizontalFlip, run_baseline,
                                      standard_train_transform, to_tensor)
from resnetlab.bench.contention import ForeignLoad
from resnetlab.bench.memory import PeakRSS
from resnetlab.bench import peak as peak_mod
from resnetlab.bench.peak import measure_peak_gflops, peak_precision
from resnetlab.bench.report import Comparison, compare
from resnetlab.bench.train_bench import (SUMMARY_KEYS, BenchConfig, BenchResult, Window, best_window, mfu,
                                         run_train_bench, train_flops_per_image)
from resnetlab.cli import main
from resnetlab.errors import ConfigError

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = dict(model="resnet8", batch_size=8, steps=2, warmup_steps=1, windows=1, num_images=32, retry_seconds=0)


@pytest.fixture
def fake_peak(monkeypatch):
    """A fixed peak instead of seconds of matmuls."""
    monkeypatch.setattr(train_bench, "measure_peak_gflops", lambda dtype, device: 100.0)
    monkeypatch.setattr(baseline_mod, "measure_peak_gflops", lambda dtype, device: 50.0)


def fake_result(images_per_s: float) -> BenchResult:
    return BenchResult(images_per_s=images_per_s, mfu=0.5, peak_gflops=345.0, train_gflop_per_image=0.2424,
                       peak_rss_mb=600.0)


def test_mfu_is_achieved_flops_over_peak():
    # 1,000 ResNet-20 images/s at 242.4 MFLOP each against a 345 GFLOP/s peak
    assert mfu(1000, 0.2424, 345.0) == pytest.approx(242.4 / 345.0)
    assert mfu(1000, 0.2424, 0.0) == 0.0


def test_training_flops_are_counted_not_assumed():
    flops = train_flops_per_image("resnet20", 32)
    forward = 2 * 40_551_040  # ResNet-20: 40.55 M multiply-adds per 32x32 image (paper, FACTS.md)
    assert 2.9 * forward < flops < 3.0 * forward  # the first conv needs no input gradient


def test_peak_is_positive_for_a_small_matmul():
    assert measure_peak_gflops(torch.float32, "cpu", sizes=(64,), min_seconds=0.01, repeats=1) > 0


def test_peak_skips_sizes_whose_single_matmul_would_be_too_slow(monkeypatch):
    # an emulated dtype (bf16 on a CPU without AVX-512 BF16: ~1 GFLOP/s) must not spend minutes
    # on 4096 x 4096 matmuls; a fast one still tries every size
    tried = []

    def fake_rate(rate):
        def measure(n, dtype, device, min_seconds, repeats):
            tried.append(n)
            return rate
        return measure

    monkeypatch.setattr(peak_mod, "matmul_gflops", fake_rate(1.0))
    assert measure_peak_gflops(torch.bfloat16, "cpu", sizes=(4096, 1024, 2048)) == 1.0
    assert tried == [1024]  # 2048 would take 2 * 2048^3 / 1e9 = 17 s per call at 1 GFLOP/s
    tried.clear()
    monkeypatch.setattr(peak_mod, "matmul_gflops", fake_rate(200.0))
    measure_peak_gflops(torch.float32, "cpu", sizes=(1024, 2048, 4096))
    assert tried == [1024, 2048, 4096]


def test_emulated_bf16_is_measured_against_the_fp32_peak(monkeypatch):
    monkeypatch.setattr(peak_mod, "has_native_bf16", lambda device: False)
    assert peak_precision("bf16", torch.device("cpu")) == "fp32"
    assert peak_precision("fp32", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(peak_mod, "has_native_bf16", lambda device: True)
    assert peak_precision("bf16", torch.device("cpu")) == "bf16"


def _load_run_all(monkeypatch):
    # benchmarks/run_all.py is a script, not a package module: load it from its path
    spec = importlib.util.spec_from_file_location("run_all", BENCHMARKS / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "run_all", run_all)  # its dataclasses look their module up there
    spec.loader.exec_module(run_all)
    return run_all


def test_bench_rows_without_native_bf16_force_no_bf16(monkeypatch):
    run_all = _load_run_all(monkeypatch)
    native = run_all.training_cases(quick=True, bf16=True, default_precision="bf16")
    emulated = run_all.training_cases(quick=True, bf16=False, default_precision="fp32")
    assert sum(case.cfg.precision == "bf16" for case in native) == 6
    assert all(case.cfg.precision != "bf16" for case in emulated)
    assert any(case.cfg.compile and case.cfg.precision == "fp32" for case in emulated)
    assert len(native) - len(emulated) == 4  # the forced-bf16 eager rows (NCHW, channels_last, direct convolutions, unfused BN)


def test_bench_report_names_the_commit_it_measured(monkeypatch):
    run_all = _load_run_all(monkeypatch)
    monkeypatch.setattr(run_all, "git_commit", lambda: "0123456789abcdef")
    monkeypatch.setattr(run_all, "git_patch", lambda: "")
    assert run_all.machine_description()["resnetlab commit"] == "0123456"
    monkeypatch.setattr(run_all, "git_patch", lambda: "diff --git a/x b/x")
    assert run_all.machine_description()["resnetlab commit"] == "0123456 + uncommitted changes"
    monkeypatch.setattr(run_all, "git_commit", lambda: None)
    assert run_all.machine_description()["resnetlab commit"].startswith("unknown")


def test_best_window_prefers_clean_windows():
    fast_but_shared = Window(seconds=1.0, steps=10, foreign_cores=1.5)
    clean = Window(seconds=2.0, steps=10, foreign_cores=0.0)
    assert best_window([fast_but_shared, clean]) is clean
    assert best_window([fast_but_shared]) is fast_but_shared  # nothing clean: the best there is


def test_comparison_json_has_the_documented_keys():
    alone = Comparison(fake_result(900.0)).as_json()
    assert list(alone) == ["resnetlab"] and list(alone["resnetlab"]) == list(SUMMARY_KEYS)
    both = Comparison(fake_result(900.0), fake_result(300.0)).as_json()
    assert list(both) == ["resnetlab", "baseline", "speedup"]
    assert list(both["baseline"]) == list(SUMMARY_KEYS)
    assert both["speedup"] == pytest.approx(3.0)


def test_bench_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="precision"):
        BenchConfig(precision="int8")
    with pytest.raises(ConfigError, match="steps"):
        BenchConfig(steps=0)


def test_tiny_fast_path_run(fake_peak):
    result = run_train_bench(BenchConfig(precision="fp32", channels_last=True, **TINY))
    assert result.images_per_s > 0 and result.peak_gflops == 100.0
    assert result.mfu == pytest.approx(result.images_per_s * result.train_gflop_per_image / 100.0)
    assert result.peak_rss_mb > 0 and result.channels_last and result.precision == "fp32"


def test_the_report_takes_the_better_peak_and_recomputes_each_mfu(monkeypatch, fake_peak):
    run_all = _load_run_all(monkeypatch)
    assert run_all.best_peaks({"fp32": 100.0, "bf16": 214.0}, {"fp32": 90.0, "bf16": 430.0}) == {"fp32": 100.0,
                                                                                                "bf16": 430.0}
    result = run_train_bench(BenchConfig(precision="fp32", channels_last=True, **TINY))  # peak 100 (fake)
    rescored = run_all.with_peak(result, {"fp32": 200.0, "bf16": 400.0})
    assert rescored.peak_gflops == 200.0 and rescored.mfu == pytest.approx(result.mfu / 2)
    assert rescored.images_per_s == result.images_per_s


def test_tiny_baseline_run_without_workers(fake_peak):
    result = run_baseline(BaselineConfig(model="resnet8", batch_size=8, steps=2, warmup_steps=1, windows=1, num_workers=0,
                                         num_images=32, retry_seconds=0))
    assert result.images_per_s > 0 and result.precision == "fp32" and not result.channels_last
    assert result.peak_gflops == 50.0


def test_compare_measures_both_and_reuses_given_peaks(fake_peak):
    report = compare(BenchConfig(precision="fp32", **TINY), baseline=True, baseline_workers=0, peaks={"fp32": 80.0})
    out = report.as_json()
    assert list(out) == ["resnetlab", "baseline", "speedup"]
    assert out["resnetlab"]["peak_gflops"] == out["baseline"]["peak_gflops"] == 80.0
    # The JSON rounds the speed-up to 3 decimals, so it can differ from the exact ratio by up to 5e-4.
    assert out["speedup"] == round(report.speedup, 3)
    assert report.speedup == pytest.approx(report.resnetlab.images_per_s / report.baseline.images_per_s)
    assert "speed-up" in report.text()


def test_cli_json(fake_peak, capsys):
    assert main(["bench", "train", "--model", "resnet8", "--batch", "8", "--steps", "2", "--warmup-steps", "1",
                 "--precision", "fp32", "--retry-seconds", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["resnetlab"] and set(out["resnetlab"]) == set(SUMMARY_KEYS)


def test_cli_compile_flag_reaches_the_engine_config(monkeypatch, capsys):
    from resnetlab.bench import report
    from resnetlab.bench.engine_step import bench_run_config

    seen = []
    monkeypatch.setattr(report, "compare", lambda cfg, **kwargs: seen.append(cfg) or Comparison(None, None))
    monkeypatch.setattr(Comparison, "text", lambda self: "")
    cases = [(["--compile", "reduce-overhead"], True, "reduce-overhead"), (["--compile"], True, "default"),
             ([], False, "default"), (["--no-compile"], False, "default")]  # on the CPU: auto is eager
    for flags, compiled, mode in cases:
        assert main(["bench", "train", "--model", "resnet8", "--device", "cpu", *flags]) == 0
        runtime = bench_run_config(seen[-1]).runtime
        assert runtime.compile is compiled
        assert runtime.compile_mode == mode


def test_random_crop_is_a_window_of_the_zero_padded_image():
    image = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    torch.manual_seed(0)
    seen = set()
    for _ in range(50):
        crop = RandomCrop(32, padding=4)(image)
        assert crop.shape == (32, 32, 3)
        matches = [(t, l) for t in range(9) for l in range(9) if np.array_equal(padded[t:t + 32, l:l + 32], crop)]
        assert matches
        seen.add(matches[0])
    assert len(seen) > 10  # offsets vary over the 9 x 9 positions


def test_flip_to_tensor_and_normalize_follow_torchvision():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    flips = {RandomHorizontalFlip(0.5)(image)[0, 0, 0] for _ in range(40)}
    assert flips == {image[0, 0, 0], image[0, -1, 0]}
    tensor = to_tensor(image)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert torch.equal(tensor, torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    normalized = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(tensor)
    assert torch.allclose(normalized, (tensor - 0.5) / 0.25)
    assert standard_train_transform()(image).shape == (3, 32, 32)


def test_peak_rss_sees_an_allocation():
    with PeakRSS() as rss:
        block = np.ones(64 * 1024 * 1024 // 8)  # 64 MB, touched
        block[::512] = 2
    assert rss.peak_mb > 64


def test_foreign_load_is_a_nonnegative_core_count():
    with ForeignLoad() as load:
        sum(range(10_000))
    assert load.cores >= 0.0


def test_step_breakdown_and_conv_rates_are_positive():
    rows = breakdown.step_breakdown(BenchConfig(model="resnet8", batch_size=8, num_images=32), steps=2, warmup=1)
    groups = dict(rows)
    assert groups["convolution forward"] > 0 and groups["convolution backward"] > 0
    assert "| convolution backward |" in breakdown.to_markdown(rows)
    rates = breakdown.conv_rates(batch=2, repeats=1, calls=1)
    assert len(rates) == len(breakdown.CIFAR_CONVS)
    assert all(r["forward GFLOP/s"] > 0 and r["backward GFLOP/s"] > 0 for r in rates)


def test_option_a_benchmark_times_both_forms_and_restores_the_model_code():
    spec = importlib.util.spec_from_file_location("bench_option_a", BENCHMARKS / "bench_option_a.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from resnetlab.models.layers import ZeroPadShortcut

    shipped = ZeroPadShortcut.forward
    assert bench.shortcut_ms(bench.slice_subsample, 16, 8, repeats=1) > 0
    times = bench.paired_step_ms(rounds=1, steps_per_round=1)
    assert set(times) == set(bench.FORMS) and all(len(v) == 1 and v[0] > 0 for v in times.values())
    assert ZeroPadShortcut.forward is shipped


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("size", [8, 16])
def test_space_to_depth_form_equals_the_stride_2_convolution_forward_and_backward(size):
    bench = _load_benchmark("bench_stride2")
    torch.manual_seed(size)
    x = torch.randn(2, 5, size, size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 7, size // 2, size // 2, dtype=torch.float64)
    direct = F.conv2d(x, weight, stride=2, padding=1)
    direct_grads = torch.autograd.grad(direct, (x, weight), grad)
    rewritten = bench.space_to_depth_conv(x, weight)
    rewritten_grads = torch.autograd.grad(rewritten, (x, weight), grad)
    torch.testing.assert_close(rewritten, direct)
    for got, expected in zip(rewritten_grads, direct_grads):
        torch.testing.assert_close(got, expected)


def test_stride_2_benchmark_times_every_form():
    bench = _load_benchmark("bench_stride2")
    timers = bench.make_timers(4, 8, 8, stride=2)
    assert "space-to-depth forward + backward" in timers
    ms = bench.time_interleaved(timers, rounds=1, repeats=1)
    assert set(ms) == set(timers) and all(value > 0 for value in ms.values())
    assert "space-to-depth forward + backward" not in bench.make_timers(4, 4, 8, stride=1)
    assert bench.backward_gflop(16, 32, 32, 2) == pytest.approx(4 * 128 * 32 * 16 * 16 * 16 * 9 / 1e9)


def test_conv3x3_benchmark_times_every_form_and_restores_the_switches():
    from resnetlab.kernels import conv3x3 as conv3x3_module
    from resnetlab.kernels import load_conv_fwd_extension, load_conv_wgrad_extension

    if load_conv_wgrad_extension() is None or load_conv_fwd_extension() is None:
        pytest.skip("the convolution kernels need AVX-512 BF16 and a C++ compiler")
    bench = _load_benchmark("bench_conv3x3")
    shipped, shipped_winograd = conv3x3_module.kernel_applies, conv3x3_module.winograd_applies
    shipped_wgrad_min = conv3x3_module.WINOGRAD_WGRAD_MIN_CHANNELS
    rows = bench.layer_rows(batch=4, repeats=1)
    assert len(rows) == 3 * len(bench.LAYERS) and all(r["onednn_ms"] > 0 and r["kernel_ms"] > 0 for r in rows)
    assert {r["pass"] for r in rows} == {"forward", "input gradient", "weight gradient"}
    with_winograd = {(r["layer"], r["pass"]) for r in rows if r["winograd_ms"]}
    stride1 = {r["layer"] for r in rows if r["layer"].endswith("stride 1")}
    assert with_winograd == {(layer, p) for layer in stride1 for p in ("forward", "input gradient", "weight gradient")}
    times = bench.paired_step_ms(rounds=1, batch=8, steps_per_round=1)
    assert set(times) == set(bench.STEP_FORMS) and all(len(v) == 1 and v[0] > 0 for v in times.values())
    assert conv3x3_module.kernel_applies is shipped and conv3x3_module.FORWARD_KERNEL is True
    assert conv3x3_module.winograd_applies is shipped_winograd
    assert conv3x3_module.WINOGRAD_WGRAD_MIN_CHANNELS == shipped_wgrad_min


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_cuda_check_script_stops_with_one_line_where_there_is_no_gpu(tmp_path):
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", str(root / "benchmarks" / "cuda_check.sh"), str(tmp_path / "out")], cwd=root,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["cuda_check: torch sees no CUDA device"]
    assert list((tmp_path / "out").iterdir()) == []  # nothing measured, nothing written


def test_the_step_profile_script_runs_a_recipe_step_on_the_cpu():
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    command = [sys.executable, str(root / "benchmarks" / "profile_step.py"), "--device", "cpu", "--batch", "8",
               "--steps", "2", "--warmup-steps", "1"]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("fast-cifar, resnet20, batch 8: ") and "'device': 'cpu'" in lines[0]
    assert " ms per step (" in lines[1] and "aten::convolution_backward" in done.stdout
