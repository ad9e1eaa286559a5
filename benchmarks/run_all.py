"""`make bench`: every benchmark of resnetlab on this machine, written to benchmarks/RESULTS.md.

- the machine: CPU/GPU, cores, torch and oneDNN versions, the measured matmul peaks;
- data: JPEG folder decode and cached reload, batched augmentation (benchmarks/bench_data.py);
- training: ResNet-20 against the standard recipe (the speed-up), ResNet-20 under each precision /
  memory format / compile setting, ResNet-56, ResNet-110, and ResNet-50 at 224 px with batch 32.

Each training row is what `resnetlab bench train` prints for the command shown next to it (the CLI
calls the same function). Usage: `python benchmarks/run_all.py [--quick] [--out PATH]`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from resnetlab.artifacts.env import git_commit, git_patch
from resnetlab.bench import breakdown
from resnetlab.bench.peak import measure_peak_gflops, peak_precision
from resnetlab.bench.report import compare
from resnetlab.bench.train_bench import BenchConfig, BenchResult, mfu, run_train_bench
from resnetlab.engine.runtime import has_native_bf16, resolve_device, resolve_precision

HERE = Path(__file__).resolve().parent


@dataclass
class Case:
    label: str
    cfg: BenchConfig
    baseline: bool = False
    flags: list[str] = field(default_factory=list)  # the CLI flags that give this cfg

    @property
    def command(self) -> str:
        return " ".join(["resnetlab bench train", f"--model {self.cfg.model}", f"--batch {self.cfg.batch_size}",
                         f"--steps {self.cfg.steps}", f"--warmup-steps {self.cfg.warmup_steps}", *self.flags,
                         *(["--baseline"] if self.baseline else [])])


def training_cases(quick: bool, bf16: bool = True, default_precision: str = "bf16") -> list[Case]:
    """The training rows. `bf16=False` (a CPU that only emulates bf16) leaves out the rows that force
    bf16, which would run for hours; the compile and batch-256 rows use the default precision."""
    s = 3 if quick else 1  # --quick: a third of the steps

    def cfg(model="resnet20", batch=128, steps=60, warmup=10, **kw) -> BenchConfig:
        return BenchConfig(model=model, batch_size=batch, steps=max(3, steps // s), warmup_steps=max(2, warmup // s),
                           **kw)

    p, tag = default_precision, default_precision
    cases = [
        Case("ResNet-20, resnetlab defaults vs the standard recipe", cfg(), baseline=True),
        Case("ResNet-20, fp32, NCHW, eager", cfg(precision="fp32", channels_last=False, compile=False),
             flags=["--precision fp32", "--no-channels-last", "--no-compile"]),
        Case("ResNet-20, fp32, channels_last, eager", cfg(precision="fp32", channels_last=True, compile=False),
             flags=["--precision fp32", "--channels-last", "--no-compile"]),
    ]
    if bf16:
        cases += [
            Case("ResNet-20, bf16, NCHW, eager", cfg(precision="bf16", channels_last=False, compile=False),
                 flags=["--precision bf16", "--no-channels-last", "--no-compile"]),
            Case("ResNet-20, bf16, channels_last, eager", cfg(precision="bf16", channels_last=True, compile=False),
                 flags=["--precision bf16", "--channels-last", "--no-compile"]),
            Case("ResNet-20, bf16, channels_last, eager, direct convolutions (no Winograd)",
                 cfg(precision="bf16", channels_last=True, winograd=False, compile=False),
                 flags=["--precision bf16", "--channels-last", "--no-winograd", "--no-compile"]),
            Case("ResNet-20, bf16, channels_last, eager, native BN + ReLU (no fused kernel)",
                 cfg(precision="bf16", channels_last=True, fused_bn=False, compile=False),
                 flags=["--precision bf16", "--channels-last", "--no-fused-bn", "--no-compile"]),
        ]
    return cases + [
        Case(f"ResNet-20, {tag}, channels_last, torch.compile", cfg(precision=p, channels_last=True, compile=True),
             flags=[f"--precision {p}", "--channels-last", "--compile"]),
        Case(f"ResNet-20, {tag}, channels_last, batch 256", cfg(batch=256, steps=30, precision=p, channels_last=True),
             flags=[f"--precision {p}", "--channels-last"]),
        Case("ResNet-56", cfg("resnet56", steps=30, warmup=5)),
        Case("ResNet-110", cfg("resnet110", steps=15, warmup=3)),
        Case("ResNet-50, 224 px, batch 32", cfg("resnet50", batch=32, steps=12, warmup=3)),
    ]


def machine_description() -> dict:
    device = resolve_device("auto")
    info = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "resnetlab commit": _commit(),
        "cpu": _cpu_model(),
        "cores (usable)": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "CPU kernels": f"{torch.backends.cpu.get_cpu_capability()}, oneDNN "
                       f"{'on' if torch.backends.mkldnn.is_available() else 'off'}",
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "default precision": resolve_precision("auto", device),
    }
    flags = _cpu_flags()
    if flags:
        info["CPU features"] = ", ".join(flags)
    scheduling = _scheduling()
    if scheduling:
        info["scheduling of this benchmark"] = scheduling
    return info


def _commit() -> str:
    """The code the report measured: the short commit, marked when tracked files were changed."""
    commit = git_commit()
    if commit is None:
        return "unknown (not a git checkout)"
    return commit[:7] + (" + uncommitted changes" if git_patch() else "")


def _scheduling() -> str:
    """Said when this process ran with a raised priority (to measure on a machine shared with other
    work): its nice value and, on Linux, its autogroup's."""
    parts = []
    nice = os.nice(0) if hasattr(os, "nice") else 0
    if nice:
        parts.append(f"nice {nice}")
    try:
        group = Path("/proc/self/autogroup").read_text().split()
        if group[-1] != "0":
            parts.append(f"autogroup nice {group[-1]}")
    except (OSError, IndexError):
        pass
    return ", ".join(parts)


def _cpu_model() -> str:
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                key, value = (part.strip() for part in line.split(":", 1))
                fields.setdefault(key, value)
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name", platform.machine())
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return name


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile")
    return [flag for flag in wanted if flag in flags]


def measure_peaks(device: torch.device) -> dict[str, float]:
    """fp32 and bf16 (and fp16 on CUDA) matmul peaks; an emulated bf16 is measured too (its small
    sizes only: see measure_peak_gflops) and reported as such, so the report says why it is left out."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if device.type == "cuda":
        dtypes["fp16"] = torch.float16
    return {name: measure_peak_gflops(dtype, device) for name, dtype in dtypes.items()}


def best_peaks(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The better of two peak measurements per dtype: a VM slowed by its host for the seconds of one
    measurement (a bf16 peak of 214 GFLOP/s against 410-439 in the runs around it, 2026-12-04) would
    otherwise inflate every MFU of the report."""
    return {name: max(value, after.get(name, 0.0)) for name, value in before.items()}


def with_peak(result: BenchResult, peaks: dict[str, float]) -> BenchResult:
    """`result` with its MFU against the report's final peak for its dtype."""
    peak = peaks.get(result.peak_precision or result.precision, result.peak_gflops)
    return dataclasses.replace(result, peak_gflops=peak, mfu=mfu(result.images_per_s, result.train_gflop_per_image, peak))


def data_rows() -> str:
    path = HERE / "bench_data.py"
    if not path.exists():
        return "_benchmarks/bench_data.py is absent: no data-loading rows._"
    spec = importlib.util.spec_from_file_location("bench_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.to_markdown(module.run())


def training_table(results: list[tuple[Case, BenchResult]]) -> str:
    lines = ["| # | configuration | images/s | ms/step | MFU | peak GFLOP/s | MFLOP/image | peak RSS MB | "
             "warm-up s | busy other cores |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for index, (case, r) in enumerate(results, 1):
        what = f"{case.label}: {r.describe()}"
        lines.append(f"| {index} | {what} | {r.images_per_s:,.0f} | {r.step_ms:.1f} | {r.mfu:.3f} | "
                     f"{r.peak_gflops:.0f} ({r.peak_precision or r.precision}) | {r.train_gflop_per_image * 1000:,.1f} | "
                     f"{r.peak_rss_mb:,.0f} | {r.warmup_s:.1f} | {r.foreign_cores:.2f} |")
    return "\n".join(lines)


def commands(results: list[tuple[Case, BenchResult]]) -> str:
    return "\n".join(f"{i:>2}. {case.command}" for i, (case, _) in enumerate(results, 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a third of the steps (a smoke run, noisier)")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--skip-data", action="store_true", help="no data-loading rows")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    machine = machine_description()
    device = resolve_device("auto")
    print("measuring matmul peaks ...", file=sys.stderr)
    peaks = measure_peaks(device)
    data = "" if args.skip_data else data_rows()
    results: list[tuple[Case, BenchResult]] = []
    headline = None
    bf16 = has_native_bf16(device)
    if not bf16:
        machine["bf16"] = (f"emulated on this {device.type} (matmul {peaks['bf16']:.1f} GFLOP/s against "
                           f"{peaks['fp32']:.0f} in fp32): bf16 rows left out, the default is fp32")
    for case in training_cases(args.quick, bf16=bf16, default_precision=resolve_precision("auto", device)):
        print(f"{case.label} ...", file=sys.stderr)
        if case.baseline:
            headline = compare(case.cfg, baseline=True, peaks=peaks)
            results.append((case, headline.resnetlab))
            results.append((Case("the standard recipe (baseline, same run)", case.cfg,
                                 flags=["(printed by the --baseline run above)"]), headline.baseline))
        else:
            precision = peak_precision(resolve_precision(case.cfg.precision, device), device)
            results.append((case, run_train_bench(case.cfg, peak_gflops=peaks.get(precision))))
        print(f"  {results[-1][1].images_per_s:,.0f} images/s", file=sys.stderr)
    where = ""
    if device.type == "cpu":  # CPU operator times; on a GPU they would only show the launches
        print("profiling the default ResNet-20 step ...", file=sys.stderr)
        where = (breakdown.to_markdown(breakdown.step_breakdown(BenchConfig())) + "\n\n"
                 + breakdown.conv_rates_markdown(breakdown.conv_rates(precision=resolve_precision("auto", device))))
    print("measuring matmul peaks again ...", file=sys.stderr)
    peaks_after = measure_peaks(device)
    machine["matmul peaks before / after the training rows"] = ", ".join(
        f"{name} {peaks[name]:,.0f} / {peaks_after[name]:,.0f} GFLOP/s" for name in peaks)
    peaks = best_peaks(peaks, peaks_after)
    results = [(case, with_peak(result, peaks)) for case, result in results]
    if headline is not None:
        headline = dataclasses.replace(headline, resnetlab=with_peak(headline.resnetlab, peaks),
                                       baseline=headline.baseline and with_peak(headline.baseline, peaks))
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    text = render(machine, peaks, data, results, headline, load_before, load_after, time.perf_counter() - started,
                  where)
    args.out.write_text(text)
    print(text)
    return 0


def render(machine, peaks, data, results, headline, load_before, load_after, seconds, where="") -> str:
    out = ["# resnetlab benchmarks", "",
           "Written by `make bench` (`python benchmarks/run_all.py`). Throughput is the fastest of 3 timed "
           "windows after the warm-up steps; a window during which other processes kept more than 0.15 "
           "cores busy is run again (up to 60 s), and the last column says how busy the rest of the "
           "machine was during the reported window. Training data are synthetic uint8 images of the "
           "model's input size; each step includes batch indexing, normalisation and pad-crop/flip "
           "augmentation, exactly as `resnetlab train` runs it.", "",
           "## Machine", "", "| | |", "|---|---|"]
    if "scheduling of this benchmark" in machine:
        out[-4:-4] = ["This run was started with a raised scheduling priority (its own session, nice and "
                      "autogroup nice -20) because other processes were using the machine; the baseline's "
                      "DataLoader workers inherit it, so both sides ran under the same conditions.", ""]
    out += [f"| {key} | {value} |" for key, value in machine.items()]
    out += [f"| matmul peak {name} | {value:,.0f} GFLOP/s (measured in this run: the better of before and after) |"
            if value >= 10 else f"| matmul peak {name} | {value:.2f} GFLOP/s (measured in this run) |"
            for name, value in peaks.items()]
    if load_before is not None:
        out.append(f"| load average (1/5/15 min) before / after | {_load(load_before)} / {_load(load_after)} |")
    out.append(f"| wall time of this benchmark | {seconds / 60:.1f} min |")
    if headline is not None and headline.baseline is not None:
        r, b = headline.resnetlab, headline.baseline
        out += ["", "## Headline", "",
                f"ResNet-20 training: **{r.images_per_s:,.0f} images/s** (MFU {r.mfu:.2f} against the measured "
                f"{r.peak_precision or r.precision} peak of {r.peak_gflops:.0f} GFLOP/s) versus {b.images_per_s:,.0f} images/s for "
                f"the standard recipe measured in the same run: **{headline.speedup:.2f}x**.", "",
                "| issue 5 target | measured | met |", "|---|---:|---|",
                f"| >= 1,000 images/s | {r.images_per_s:,.0f} | {_yes(r.images_per_s >= 1000)} |",
                f"| MFU >= 0.65 (vs the measured {r.peak_precision or r.precision} peak) | {r.mfu:.2f} | {_yes(r.mfu >= 0.65)} |",
                f"| >= 3x the standard recipe | {headline.speedup:.2f}x | {_yes(headline.speedup >= 3)} |"]
    out += ["", "## Training throughput", "", training_table(results), "", "Commands:", "", "```",
            commands(results), "```"]
    if where:
        out += ["", "## Where the time goes (ResNet-20, default configuration)", "",
                "`python -m resnetlab.bench.breakdown`: torch.profiler over 10 steps (self CPU time of the "
                "operators, grouped; profiling adds overhead, read the shares), then each distinct convolution "
                "of the CIFAR ResNets timed alone in the default precision and memory format.", "", where]
    if data:
        out += ["", "## Data loading and augmentation", "", "`python benchmarks/bench_data.py`", "", data]
    return "\n".join(out) + "\n"


def _yes(met: bool) -> str:
    return "yes" if met else "no"


def _load(values) -> str:
    return "/".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    raise SystemExit(main())
