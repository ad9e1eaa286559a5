"""`train(config) -> RunResult`: one training run, from a config to a self-describing run directory,
with checkpoints every epoch, exact resume, clean stops on SIGINT/SIGTERM and divergence checks.

    from resnetlab.config import build_config
    result = train(build_config("fast-cifar", **{"data.dir": "data/cifar10", "out": "runs/r20"}))
    result = resume("runs/r20")   # continue an interrupted run

Started by torchrun with several processes (engine.distributed), every rank runs the same Session
in lockstep: the data are sharded by rank, metrics are summed over the ranks, and only rank 0
writes the run directory and prints.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from resnetlab.artifacts import metrics as metrics_io
from resnetlab.artifacts.checkpoint import read_tensors, save_checkpoint, save_tensors_atomic, write_json_atomic
from resnetlab.artifacts.env import environment, git_patch
from resnetlab.artifacts.run_dir import RunDir, create_run_dir, open_run_dir
from resnetlab.config import RunConfig, validate_config
from resnetlab.engine.data import TrainData, evaluate_val, load_train_data
from resnetlab.engine.distributed import (SINGLE, DistInfo, any_rank, average_bn_stats_, on_main, process_group,
                                          together)
from resnetlab.engine.loop import Trainer, check_finite, default_bn_momentum, run_epoch
from resnetlab.engine.runtime import use_threads
from resnetlab.engine.state import load_training_state, training_state
from resnetlab.engine.validation import validate
from resnetlab.engine.setup import build_trainer, resolved_config
from resnetlab.errors import ConfigError, DivergenceError, ResnetlabError

PROGRESS_MODES = ("bar", "lines", "none")
PLOT_EVERY_SECONDS = 60.0


class TrainingInterrupted(ResnetlabError):
    """SIGINT/SIGTERM stopped the run after saving a checkpoint it can be resumed from."""


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    final_val_error: float | None  # top-1, fraction; after BN re-estimation when that is on
    best_val_error: float | None
    final_val_loss: float | None
    summary: dict


def train(config: RunConfig | dict, *, progress: str = "bar", on_epoch_end: Callable[[dict], None] | None = None,
          on_step: Callable[[int], None] | None = None) -> RunResult:
    """Train a new run into `config.out` (which must be new or empty). `progress`: "bar" (a bar per
    epoch), "lines" (one line per epoch, for logs) or "none". The hooks are for tests and tools."""
    config = config if isinstance(config, RunConfig) else validate_config(config)
    if config.out is None:
        raise ConfigError("invalid value for 'out': the run directory is not set (--out RUN_DIR)")
    with process_group() as dist, use_threads(config.runtime.threads):
        return _start(config, progress, dist).fit(on_epoch_end, on_step)


def _start(config: RunConfig, progress: str, dist: DistInfo) -> "Session":
    existed = Path(config.out).exists()
    run = on_main(dist, lambda: create_run_dir(config.out))
    try:
        return Session.start(config, run, progress, dist)
    except BaseException:
        if dist.is_main and not existed and run.root.is_dir() and not any(run.root.iterdir()):
            run.root.rmdir()  # bad data or options: leave no empty run directory behind
        raise


def resume(run_dir: str | Path, *, progress: str = "bar", on_epoch_end: Callable[[dict], None] | None = None,
           on_step: Callable[[int], None] | None = None) -> RunResult:
    """Continue the run in `run_dir` from its latest checkpoint; on the CPU the result is identical
    to a run that was never interrupted."""
    with process_group() as dist:
        run, saved = on_main(dist, lambda: _open_for_resume(run_dir))  # the other ranks need no copy of it
        config = validate_config(saved)
        with use_threads(config.runtime.threads):
            return Session.restore(config, run, progress, dist).fit(on_epoch_end, on_step)


def _open_for_resume(run_dir: str | Path) -> tuple[RunDir, dict]:
    run = open_run_dir(run_dir)
    if run.finished:
        raise ResnetlabError(f"{run.root} already finished (summary.json exists); nothing to resume")
    try:
        return run, json.loads(run.config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:  # a hand-edited or damaged file
        raise ConfigError(f"{run.config} is not valid JSON ({error}); the run cannot be resumed without it") from None


@dataclass
class Session:
    """A run in progress: the trainer plus everything around it (data, run directory, bookkeeping)."""

    config: RunConfig
    run: RunDir
    data: TrainData
    trainer: Trainer
    progress: str
    dist: DistInfo = SINGLE  # this process among the training processes (rank 0 writes)
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches done in the epoch in progress (resume inside an epoch)
    best: dict = field(default_factory=dict)  # val_top1_error, val_loss, epoch, step of the best epoch
    last_eval: dict = field(default_factory=dict)
    elapsed: float = 0.0  # wall seconds of earlier sessions of this run
    train_seconds: float = 0.0
    train_images: int = 0
    started: float = field(default_factory=time.perf_counter)
    stop_requested: bool = False
    saved_at: tuple[int, int] | None = None  # (epoch, step) of the latest checkpoint
    plotted_at: float = -math.inf
    logged_at: float = 0.0  # when the progress bar's images/s was last measured

    # --- setup ------------------------------------------------------------------------------------
    @classmethod
    def start(cls, config: RunConfig, run: RunDir, progress: str, dist: DistInfo = SINGLE) -> "Session":
        session = cls._build(config, run, progress, dist)
        on_main(dist, session._describe_run)
        return session

    def _describe_run(self) -> None:
        write_json_atomic(self.run.config, self.config.to_dict())
        write_json_atomic(self.run.env, environment({**self.trainer.runtime.describe(), **self.batch_layout}))
        self.run.patch.write_text(git_patch())

    @classmethod
    def restore(cls, config: RunConfig, run: RunDir, progress: str, dist: DistInfo = SINGLE) -> "Session":
        session = cls._build(config, run, progress, dist)
        tensors, meta = on_main(dist, lambda: read_tensors(run.state))  # every rank resumes rank 0's state
        state = meta["state"]
        load_training_state(session.trainer, tensors, state)
        session.epoch, session.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        session.best, session.last_eval = state["best"], state["last_eval"]
        session.elapsed, session.train_seconds = state["elapsed_seconds"], state["train_seconds"]
        session.train_images = state["train_images"]
        session.saved_at = (session.epoch, session.trainer.step)
        if dist.is_main:
            metrics_io.MetricsLog(run.metrics_jsonl, run.metrics_csv).truncate_after(session.trainer.step)
        return session

    @classmethod
    def _build(cls, config: RunConfig, run: RunDir, progress: str, dist: DistInfo) -> "Session":
        if progress not in PROGRESS_MODES:
            raise ConfigError(f"progress must be one of {', '.join(PROGRESS_MODES)}, got {progress!r}")
        config = resolved_config(config, dist)  # "auto" device/precision/channels_last made concrete
        data = together(dist, lambda: _checked_plateau(config, load_train_data(config, config.runtime, dist)))
        trainer = build_trainer(config, data, dist)
        default_bn_momentum(trainer)
        return cls(config, run, data, trainer, progress if dist.is_main else "none", dist)

    @property
    def batch_layout(self) -> dict:
        """How the global batch is computed: processes x accumulation steps x micro-batch."""
        train, world = self.config.train, self.dist.world_size
        return {"world_size": world, "global_batch": train.batch_size, "accum_steps": train.accum_steps,
                "micro_batch": train.batch_size // (world * train.accum_steps), "sync_bn": train.sync_bn and world > 1,
                "lr_scale": self.trainer.lr_scale}

    @property
    def metrics(self) -> metrics_io.MetricsLog:
        return metrics_io.MetricsLog(self.run.metrics_jsonl, self.run.metrics_csv)

    def _append(self, row: dict) -> None:
        if self.dist.is_main:
            self.metrics.append(row)

    # --- the run ----------------------------------------------------------------------------------
    def fit(self, on_epoch_end=None, on_step=None) -> RunResult:
        try:
            return self._fit(on_epoch_end, on_step)
        except DivergenceError as error:
            kept = (f"the last good checkpoint (epoch {self.saved_at[0]}, step {self.saved_at[1]}) is kept in "
                    f"{self.run.checkpoints}" if self.saved_at else "no checkpoint had been written yet")
            raise DivergenceError(f"{error}; {kept}. Try a lower learning rate or a warm-up.") from None
        except OSError as error:  # a full disk, a lost mount: the atomic writes kept the last checkpoint whole
            raise ResnetlabError(self._write_failed(error)) from None
        finally:
            if self.trainer.ddp is not None:  # unreachable now (even from a traceback): process_group() collects it
                self.trainer.forward, self.trainer.ddp = self.trainer.model, None

    def _write_failed(self, error: OSError) -> str:
        reason = f"cannot write to the run directory {self.run.root}: {error.strerror or error}"
        if self.saved_at is None:
            return f"{reason}; no checkpoint had been written yet: free some space, delete it and start the run again"
        return (f"{reason}; the checkpoint of epoch {self.saved_at[0]}, step {self.saved_at[1]} is kept. "
                f"Free some space and continue with: resnetlab train --resume {self.run.root}")

    def _fit(self, on_epoch_end, on_step) -> RunResult:
        data, trainer = self.data, self.trainer
        with _stop_on_signals(self):
            while self.epoch < data.num_epochs and trainer.step < data.total_steps:
                bar = self._progress_bar()
                self.logged_at = time.perf_counter()
                result = run_epoch(
                    trainer, data.loader, self.epoch, start_batch=self.batch_in_epoch, total_steps=data.total_steps,
                    on_log=lambda: self._log_step(bar), on_step=lambda done: self._after_step(done, on_step), progress=bar,
                )
                if bar is not None:
                    bar.close()
                self.train_seconds += result.seconds
                self.train_images += result.images * self.dist.world_size  # every rank trains on as many
                if not result.completed:
                    self._interrupted()
                row = self._end_epoch(result)
                if on_epoch_end is not None:
                    on_epoch_end(row)
        return self._finish()

    def _after_step(self, batch_done: int, on_step) -> bool:
        self.batch_in_epoch = batch_done
        # a signal may reach the ranks at different steps: all stop at the same one
        self.stop_requested = any_rank(self.stop_requested, self.dist)
        if on_step is not None:
            on_step(self.trainer.step)
        every = self.config.train.checkpoint_every_steps
        epoch_end = batch_done == self.data.steps_per_epoch or self.trainer.step == self.data.total_steps
        if every and self.trainer.step % every == 0 and not epoch_end:  # the epoch's own checkpoint follows
            self._check_training_loss()
            self.save_state()
        return self.stop_requested

    def _interrupted(self) -> None:
        self._check_training_loss()
        self.save_state()
        self._plot(force=True)
        raise TrainingInterrupted(
            f"stopped at step {self.trainer.step} (epoch {self.epoch + 1}); checkpoint saved. "
            f"Continue with: resnetlab train --resume {self.run.root}"
        )

    def _check_training_loss(self) -> None:
        loss, _, count = self.trainer.epoch_meter.read()
        if count:
            check_finite(loss, "training loss", self.trainer.step)

    def _log_step(self, bar) -> None:
        trainer = self.trainer
        loss, error, count = trainer.interval_meter.read()
        check_finite(loss, "training loss", trainer.step)
        trainer.interval_meter.reset()
        self._append({"kind": "step", "epoch": self.epoch + 1, "step": trainer.step, "train_loss": loss,
                             "train_top1_error": error, "lr": trainer.lr, "wall_seconds": self.wall_seconds})
        if bar is not None:
            now = time.perf_counter()
            images_per_s = count / max(now - self.logged_at, 1e-9)
            self.logged_at = now
            bar.set_postfix_str(f"loss {loss:.3f} err {error:.1%} lr {trainer.lr:.3g} {images_per_s:.0f} img/s",
                                refresh=False)

    def _end_epoch(self, result) -> dict:
        trainer = self.trainer
        loss, error, _ = trainer.epoch_meter.read()
        check_finite(loss, "training loss", trainer.step)
        trainer.epoch_meter.reset()
        self.epoch += 1
        self.batch_in_epoch = 0
        row = {"kind": "epoch", "epoch": self.epoch, "step": trainer.step, "train_loss": loss,
               "train_top1_error": error, **self._validate(), "lr": trainer.lr,
               "epoch_seconds": result.seconds,
               "images_per_s": result.images * self.dist.world_size / max(result.seconds, 1e-9),
               "wall_seconds": self.wall_seconds}
        self._feed_plateau(row)
        self._append(row)
        self._update_best(row)
        self.save_state()
        if trainer.step < self.data.total_steps:  # the last epoch's curves are drawn once, by _finish
            self._plot()
        self._print_epoch(row)
        return row

    def _validate(self) -> dict:
        """Validation loss and top-1/top-5 error of the evaluated model (the EMA when it is on)."""
        numbers = validate(self.data, self.trainer, self.config, self.dist)
        if numbers:
            self.last_eval = {**numbers, "step": self.trainer.step}
        return numbers

    def _feed_plateau(self, row: dict) -> None:
        """Give a plateau schedule the epoch's error (global: summed over the ranks, so all decide
        alike); a decay from the next step on shows in the row as `lr_decayed_to`."""
        trainer, plateau = self.trainer, self.trainer.plateau
        if not plateau.active:
            return
        error = row["val_top1_error" if plateau.metric == "val_error" else "train_top1_error"]
        if plateau.update(trainer.step, error):
            lr = trainer.schedule.lr_at(trainer.step, trainer.warmup.done_at_step, plateau.decay_steps)
            row["lr_decayed_to"] = lr * trainer.lr_scale

    def _update_best(self, row: dict) -> None:
        error = row.get("val_top1_error")
        if error is None or (self.best and error >= self.best["val_top1_error"]):
            return
        self.best = {"val_top1_error": error, "val_loss": row["val_loss"], "epoch": row["epoch"], "step": row["step"]}
        if self.dist.is_main:
            save_checkpoint(self.run.best, self.trainer.eval_model.state_dict(), self.model_metadata())

    def _finish(self) -> RunResult:
        bn_note = self._reestimate_bn() if self.config.bn.reestimate else None
        self._plot(force=True)
        final_tta = on_main(self.dist, self._evaluate_final_tta)
        summary = on_main(self.dist, lambda: self._write_summary(bn_note, final_tta))
        final = summary["final"]
        return RunResult(self.run.root, final.get("val_top1_error"), self.best.get("val_top1_error"),
                         final.get("val_loss"), summary)

    def _reestimate_bn(self) -> dict:
        """Recompute the BN statistics over the training set (augmented as in training) with the
        final weights, then evaluate again; the last checkpoint holds the re-estimated model."""
        from resnetlab.engine.bn import bn_layers, reestimate_bn

        data, trainer = self.data, self.trainer
        before = dict(self.last_eval)
        data.loader.set_epoch(data.num_epochs)
        limit = self.config.bn.reestimate_batches
        batches = (x for x, _ in itertools.islice(data.loader, limit))
        used = reestimate_bn(trainer.eval_model, batches, trainer.runtime.autocast)
        average_bn_stats_(bn_layers(trainer.eval_model), self.dist)  # each rank saw its own shard
        after = self._validate()
        self._append({"kind": "final", "epoch": self.epoch, "step": trainer.step, **after,
                      "wall_seconds": self.wall_seconds})
        if self.dist.is_main:
            save_checkpoint(self.run.last, trainer.eval_model.state_dict(), self.model_metadata(bn_reestimated=True))
        return {"batches": used, "before": before, "after": after}

    def _evaluate_final_tta(self) -> dict:
        """{tta: {val_loss, val_top1_error, val_top5_error}} of the final model for each of
        train.final_tta, in fp32 (the numbers `resnetlab eval RUN --tta T` gives); {} without a val split."""
        numbers = {}
        for tta in self.config.train.final_tta:
            config = self.config.model_copy(update={"train": self.config.train.model_copy(update={"eval_tta": tta})})
            result = evaluate_val(self.data, self.trainer.eval_model, config, self.trainer.runtime.device, "fp32")
            if result is None:
                return {}
            numbers[tta] = {"val_loss": result.loss, "val_top1_error": result.top1_error,
                            "val_top5_error": result.top5_error}
        return numbers

    def _write_summary(self, bn_note: dict | None, final_tta: dict) -> dict:
        summary = self._summary(bn_note, final_tta)
        write_json_atomic(self.run.summary, summary)
        return summary

    def _summary(self, bn_note: dict | None, final_tta: dict) -> dict:
        rows = [r for r in metrics_io.read_metrics(self.run.metrics_jsonl) if r["kind"] == "epoch"]
        last = rows[-1] if rows else {}
        final = {k: last.get(k) for k in ("train_loss", "train_top1_error", "val_loss", "val_top1_error", "val_top5_error")}
        if bn_note is not None:
            final.update(bn_note["after"])
        return {
            "model": self.config.model.name, "recipe": self.config.recipe, "run_dir": str(self.run.root),
            "epochs": self.epoch, "steps": self.trainer.step, "final": final, "final_tta": final_tta,
            "best": self.best or None,
            "bn_reestimate": bn_note, "wall_seconds": self.wall_seconds,
            "train_images_per_s": self.train_images / max(self.train_seconds, 1e-9),
            "runtime": self.trainer.runtime.describe(), "data": self.data.description, "batch": self.batch_layout,
        }

    # --- checkpoints ------------------------------------------------------------------------------
    def save_state(self) -> None:
        """Everything resume needs in one atomically written file, then the model for users. Every
        rank calls it (the metric sums are reduced); rank 0 writes."""
        tensors, state = training_state(self.trainer)
        state.update({"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "best": self.best,
                      "last_eval": self.last_eval, "elapsed_seconds": self.wall_seconds,
                      "train_seconds": self.train_seconds, "train_images": self.train_images})
        if self.dist.is_main:
            save_tensors_atomic(self.run.state, tensors, {"state": state})
        self.saved_at = (self.epoch, self.trainer.step)  # resume starts here even if a later write fails
        if self.dist.is_main:
            save_checkpoint(self.run.last, self.trainer.eval_model.state_dict(), self.model_metadata())
            write_json_atomic(self.run.state_json, state)

    def model_metadata(self, **extra) -> dict:
        cfg, data = self.config, self.data
        return {
            "model": cfg.model.name, "model_options": cfg.model.options, "num_classes": data.num_classes,
            "classes": list(data.splits.classes), "input_size": list(data.splits.train.image_shape),
            "normalization": data.normalizer.to_dict(), "recipe": cfg.recipe,
            "data": {"source": data.splits.source, "val_size": cfg.data.val_size, "split_seed": cfg.data.split_seed,
                     "limit_train": cfg.data.limit_train, **self._augmentation_metadata(), **data.pipeline},
            "epoch": self.epoch, "step": self.trainer.step,
            "val_top1_error": self.last_eval.get("val_top1_error"), "val_loss": self.last_eval.get("val_loss"),
            "evaluated_at_step": self.last_eval.get("step"), "weights": "ema" if self.trainer.ema else "model",
            "precision": self.trainer.runtime.precision, **extra,
        }

    def _augmentation_metadata(self) -> dict:
        """What evaluation needs to know of the training crops (flip-shift TTA fills its shifted
        views as they were padded); the imagenet pipeline has no padded crops."""
        cfg = self.config.data
        return {"padding_mode": cfg.padding_mode} if cfg.pipeline == "cifar" else {}

    # --- output -----------------------------------------------------------------------------------
    @property
    def wall_seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self.started

    def _plot(self, force: bool = False) -> None:
        """Redraw curves.png: at the end, and after an epoch when the last drawing is a minute old
        (drawing takes about a second, too much to repeat after every short epoch)."""
        if not self.dist.is_main or (not force and time.perf_counter() - self.plotted_at < PLOT_EVERY_SECONDS):
            return
        self.plotted_at = time.perf_counter()
        from resnetlab.artifacts.plots import plot_curves

        title = f"{self.config.model.name} ({self.config.recipe or 'custom recipe'}), {self.run.root.name}"
        plot_curves(metrics_io.read_metrics(self.run.metrics_jsonl), self.run.curves, title)

    def _progress_bar(self):
        if self.progress != "bar":
            return None
        from tqdm import tqdm

        return tqdm(total=self.data.steps_per_epoch, initial=self.batch_in_epoch, unit="step", leave=False,
                    desc=f"epoch {self.epoch + 1}/{self.data.num_epochs}", dynamic_ncols=True, file=sys.stderr)

    def _print_epoch(self, row: dict) -> None:
        if self.progress == "none":
            return
        val = (f"  val loss {row['val_loss']:.4f} err {row['val_top1_error']:.2%}" if "val_loss" in row else "")
        print(f"epoch {row['epoch']}/{self.data.num_epochs}  step {row['step']}  train loss {row['train_loss']:.4f} "
              f"err {row['train_top1_error']:.2%}{val}  lr {row['lr']:.4g}  {row['images_per_s']:.0f} img/s  "
              f"{row['epoch_seconds']:.1f}s", flush=True)
        if "lr_decayed_to" in row:
            print(f"the {self.config.schedule.plateau.metric.replace('_', ' ')} plateaued: "
                  f"lr {row['lr_decayed_to']:.4g} from step {row['step']}", flush=True)


def _checked_plateau(config: RunConfig, data: TrainData) -> TrainData:
    """A plateau schedule on the validation error needs a validation split."""
    schedule = config.schedule
    if schedule.kind == "plateau" and schedule.plateau.metric == "val_error" and not data.splits.val:
        raise ConfigError("invalid value for 'schedule.plateau.metric': val_error needs a validation split "
                          "(data.val_size > 0, or a val folder); use train_error or hold out images")
    return data


@contextlib.contextmanager
def _stop_on_signals(session: Session):
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary and save; a second SIGINT
    aborts at once. Only the main thread can install handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if session.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        session.stop_requested = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
