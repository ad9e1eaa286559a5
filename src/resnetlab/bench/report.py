"""resnetlab's fast path against the standard recipe, measured in one invocation."""
from __future__ import annotations

from dataclasses import dataclass

from resnetlab.bench.train_bench import BenchConfig, BenchResult, run_train_bench


@dataclass
class Comparison:
    resnetlab: BenchResult
    baseline: BenchResult | None = None

    @property
    def speedup(self) -> float | None:
        if self.baseline is None or self.baseline.images_per_s <= 0:
            return None
        return self.resnetlab.images_per_s / self.baseline.images_per_s

    def as_json(self) -> dict:
        """{"resnetlab": {...}, "baseline": {...}, "speedup": x}; only the first without a baseline."""
        out = {"resnetlab": self.resnetlab.summary()}
        if self.baseline is not None:
            out["baseline"] = self.baseline.summary()
            out["speedup"] = round(self.speedup, 3)
        return out

    def text(self) -> str:
        lines = [_block("resnetlab", self.resnetlab)]
        if self.baseline is not None:
            lines.append(_block("baseline (standard recipe)", self.baseline))
            lines.append(f"speed-up: {self.speedup:.2f}x")
        return "\n".join(lines)


def _block(title: str, r: BenchResult) -> str:
    lines = [f"{title}: {r.describe()}",
             f"  {r.images_per_s:,.0f} images/s ({r.step_ms:.1f} ms/step; mean over all windows "
             f"{r.mean_images_per_s:,.0f}), warm-up {r.warmup_s:.1f} s",
             f"  {r.train_gflop_per_image * 1000:.1f} MFLOP per training image, peak {r.peak_gflops:.0f} GFLOP/s "
             f"({_peak_label(r)}) -> MFU {r.mfu:.3f}",
             f"  peak RSS {r.peak_rss_mb:,.0f} MB"]
    if r.foreign_cores > 0.15:
        lines.append(f"  note: other processes kept {r.foreign_cores:.1f} cores busy during the best window; "
                     "the figures are low")
    return "\n".join(lines)


def _peak_label(r: BenchResult) -> str:
    dtype = r.peak_precision or r.precision
    return f"{dtype} matmul" if dtype == r.precision else f"{dtype} matmul; {r.precision} is emulated here"


def compare(cfg: BenchConfig, baseline: bool = False, baseline_workers: int = 2,
            peaks: dict[str, float] | None = None) -> Comparison:
    """Measure `cfg`, then (optionally) the standard recipe with the same model, batch and steps.
    `peaks` ({"fp32": GFLOP/s, "bf16": ...}) reuses matmul peaks already measured in this process."""
    from resnetlab.bench.baseline import BaselineConfig, run_baseline
    from resnetlab.bench.peak import peak_precision
    from resnetlab.engine.runtime import resolve_device, resolve_precision

    peaks = peaks or {}
    device = resolve_device(cfg.device)
    ours = run_train_bench(cfg, peak_gflops=peaks.get(peak_precision(resolve_precision(cfg.precision, device), device)))
    if not baseline:
        return Comparison(ours)
    base_cfg = BaselineConfig(model=cfg.model, batch_size=cfg.batch_size, steps=cfg.steps,
                              warmup_steps=max(cfg.warmup_steps, 3), num_workers=baseline_workers,
                              windows=cfg.windows, retry_seconds=cfg.retry_seconds, device=cfg.device, seed=cfg.seed,
                              image_size=cfg.image_size, num_images=cfg.num_images)
    return Comparison(ours, run_baseline(base_cfg, peak_gflops=peaks.get("fp32")))
