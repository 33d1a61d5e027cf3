"""The training loop every method shares.

One iteration: draw the batch of this iteration (a pure function of the seed and the
iteration index, see :mod:`semiseg.data.sampling`), ask the method for its named loss terms,
weight and sum them, step one SGD optimiser with the poly schedule, let the method update its
EMA teachers. Every ``checkpoint_every`` iterations (and at the end) the complete state is
written atomically to ``checkpoints/last.pt``; every ``validate_every`` iterations the
inference network is scored on the eval cases by sliding-window Dice and the best one is kept
as ``checkpoints/best.pt``. Logs go to ``log.csv`` and TensorBoard; progress to tqdm.

One trainer at a time works in a run folder (its lock, ``state.json``, the clean-up of stray
temporaries and the stop on SIGINT / SIGTERM are :mod:`semiseg.engine.run_folder`). A resume
reads ``checkpoints/last.pt`` before any data is opened, so a config that does not fit the
checkpoint is refused at once.

Under ``torchrun`` the same loop runs data-parallel (:mod:`semiseg.engine.distributed`): each
rank draws its slice of the global batch, DDP averages gradients, validation cases are split
over the ranks, and only rank 0 writes files. With one process all of that is a no-op.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from semiseg.config import Config, save_config
from semiseg.engine import distributed, precision, run_folder
from semiseg.engine.checkpoint import (
    BEST,
    LAST,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from semiseg.engine.inference import predict_volume
from semiseg.engine.logging import RunLogger
from semiseg.engine.optim import build_optimizer, learning_rate
from semiseg.engine.setup import (
    RunData,
    batch_loader,
    build_method_for,
    iterations_per_epoch,
    prepare_run_data,
    training_data_record,
)
from semiseg.engine.validation import CaseScores, ValidationScores, score_case
from semiseg.errors import (
    CheckpointError,
    ConfigError,
    NumericsError,
    OutputError,
    RunInterruptedError,
)
from semiseg.methods.base import Batch, Method, StepInfo
from semiseg.utils.io import atomic_write_json
from semiseg.utils.seed import seed_everything


@dataclass
class TrainResult:
    run_dir: Path
    iterations: int
    best_score: float
    best_iteration: int
    max_iterations: int = 0
    seconds: float = 0.0  # wall time of this fit() call, data preparation included
    validated: bool = True  # False: no validation ran, best.pt holds the final weights


class Trainer:
    """Runs one configured training job in ``run_dir``."""

    def __init__(self, config: Config, run_dir: str | Path, resume: bool = False,
                 show_progress: bool = True, stop_after: int | None = None) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.show_progress = show_progress
        # ``stop_after`` ends the loop early as if killed (tests of resume, smoke runs).
        self.stop_after = stop_after
        train = config.train
        if train.max_iterations <= 0:
            raise ConfigError("train.max_iterations must be positive")
        if not 0 < train.labeled_batch_size <= train.batch_size:
            raise ConfigError("train.labeled_batch_size must be in 1..train.batch_size")

    # ------------------------------------------------------------------ construction
    def _setup(self) -> None:
        cfg = self.config
        train = cfg.train
        self.dist = distributed.init_from_env(train.distributed_backend, cfg.experiment.device)
        seed_everything(cfg.experiment.seed, cfg.experiment.deterministic)
        torch.backends.cudnn.benchmark = train.cudnn_benchmark and not cfg.experiment.deterministic
        self.device = self.dist.device
        # Before the data: a refused precision should not wait for a phantom to be generated.
        self.amp_dtype = precision.resolve_amp_dtype(train.amp, self.device)
        precision.configure_tf32(train.amp, self.device)
        # Rank 0 first: it may generate the phantom, which the others then only read.
        with distributed.main_process_first(self.dist):
            self.data: RunData = prepare_run_data(cfg, show_progress=self.show_progress)
        self.training_data = training_data_record(self.data)
        if self.dist.is_distributed:
            batches = self.data.batches
            self.data.batches = batches.shard(self.dist.rank, self.dist.world_size)
            # An "epoch" counts global batches, as a single process with the global batch.
            world = self.dist.world_size
            self.data.iterations_per_epoch = iterations_per_epoch(
                len(self.data.labeled_ids), len(self.data.unlabeled_ids),
                batches.batch_size * world, batches.num_labeled * world)
        self.method: Method = build_method_for(cfg, self.data).to(self.device)
        self.precision_check: dict[str, object] | None = None
        if self.amp_dtype is not None:
            # Before DDP, compile and channels-last: the check copies the plain method.
            self.precision_check = self._check_precision()
        if distributed.resolve_sync_batchnorm(train.sync_batchnorm, self.dist, self.method):
            self.method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
        if train.channels_last:
            self.method.to(memory_format=torch.channels_last_3d)
        if train.compile:
            distributed.compile_networks(self.method)
        self.optimizer = build_optimizer(self.method.parameter_groups(train.weight_decay), train)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_dtype == torch.float16)
        # DDP (several processes) broadcasts rank 0's weights here, EMA teachers included.
        self._forward = distributed.wrap_for_training(
            distributed.TrainingForward(self.method, cfg.train.loss_weights, self.device.type,
                                        self.amp_dtype), self.dist)
        if self.dist.rank > 0:
            # Own dropout masks and noise per rank (rank 0 keeps the single-process stream).
            distributed.seed_rank(cfg.experiment.seed, self.dist.rank)
        self.iteration = 0
        self.checkpoint_iteration: int | None = None
        self.best_score = -math.inf
        self.best_iteration = -1

    def _checkpoint_payload(self) -> dict[str, Any]:
        """The checkpoint contents; a collective call (gathers every rank's RNG state)."""
        rng = rng_state()
        extra: dict[str, Any] = {}
        if self.dist.is_distributed:
            extra["rng_per_rank"] = distributed.gather_objects(rng, self.dist)
        return {
            "iteration": self.iteration,
            "method_name": self.config.method.name,
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            **extra,
            "world_size": self.dist.world_size,
            "best_score": self.best_score,
            "best_iteration": self.best_iteration,
            "config": self.config.to_dict(),
            "class_set": self.data.class_set.name,
            # How the training arrays were made, so `semiseg predict` prepares new scans alike.
            "preprocessing": self.data.store.preprocessing,
            "intensity": self.data.store.intensity,
            # Where the weights come from, so `semiseg predict` can warn about unlike inputs.
            "training_data": self.training_data,
        }

    def _save(self, path: Path) -> None:
        """Write a checkpoint from rank 0 (every rank calls this: the payload is collective)."""
        # Per-process BatchNorm statistics: every rank keeps rank 0's, the ones written (DDP
        # would overwrite the others' at the next forward anyway).
        distributed.broadcast_buffers(self.method, self.dist)
        payload = self._checkpoint_payload()
        if self.dist.is_main:
            save_checkpoint(path, payload)
        if path.name == LAST:
            self.checkpoint_iteration = self.iteration

    def _resumable(self) -> dict[str, Any] | None:
        """The checkpoint to resume (read before any data is opened), or None for a new run;
        refuses a new run over an old one and a resume whose config does not fit."""
        last = self.run_dir / "checkpoints" / LAST
        if not self.resume:
            if last.exists():
                raise CheckpointError(f"{self.run_dir} already holds a run; pass --resume to "
                                      "continue it or choose another --out folder")
            return None
        if not last.exists():
            raise CheckpointError(f"{last}: nothing to resume (no checkpoint in {self.run_dir})")
        payload = load_checkpoint(last)
        run_folder.check_resumable(payload.get("config") or {}, self.config.to_dict(), last)
        return payload

    def _restore(self, payload: dict[str, Any]) -> None:
        try:
            self.method.load_state_dict(payload["method"])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"{self.run_dir / 'checkpoints' / LAST}: the weights do not "
                                  f"fit the configured method ({first})") from None
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scaler.load_state_dict(payload["scaler"])
        self.iteration = int(payload["iteration"])
        self.checkpoint_iteration = self.iteration
        self.best_score = float(payload["best_score"])
        self.best_iteration = int(payload["best_iteration"])
        per_rank = payload.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == self.dist.world_size:
            restore_rng_state(per_rank[self.dist.rank])
        elif self.dist.rank == 0:
            restore_rng_state(payload["rng"])
        else:
            # Resumed with more processes than wrote the checkpoint: a fresh per-rank stream.
            distributed.seed_rank(self.config.experiment.seed, self.dist.rank, self.iteration)

    # ------------------------------------------------------------------ loop
    def _batches(self) -> Iterator[Batch]:
        loader = batch_loader(self.data.batches, self.iteration, self.config.train.max_iterations,
                              self.config.data.num_workers, pin_memory=self.device.type == "cuda")
        for item in loader:
            yield Batch.from_dict(item)

    def _validate(self) -> ValidationScores:
        """Per-organ Dice and voxel counts of the inference network on the eval cases (split
        over the ranks of a data-parallel run, gathered back in case order)."""
        # Per-process BatchNorm statistics differ by the last step; score rank 0's everywhere.
        distributed.broadcast_buffers(self.method, self.dist)
        net = self.method.inference_network()
        inf = self.config.inference
        cases = list(self.data.split.eval)
        mine: dict[int, CaseScores] = {}
        for index in range(self.dist.rank, len(cases), self.dist.world_size):
            case_id = cases[index]
            pred = predict_volume(net, self.data.store.image(case_id), inf.patch_size,
                                  inf.validation_stride, inf.sw_batch_size, inf.mode, self.device,
                                  self.amp_dtype)
            mine[index] = score_case(pred, self.data.store.label(case_id),
                                     self.data.class_set.num_classes)
        gathered: dict[int, CaseScores] = {}
        for part in distributed.gather_objects(mine, self.dist):
            gathered.update(part)
        return ValidationScores(tuple(gathered[index] for index in range(len(cases))))

    def _step(self, batch: Batch, step: StepInfo) -> dict[str, float]:
        train = self.config.train
        lr = learning_rate(train, step.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = batch.to(self.device)
        if train.channels_last:
            batch.image = batch.image.contiguous(memory_format=torch.channels_last_3d)
        # Autocast, the method's step and the weighting (combine_losses), under DDP if several
        # processes run; the loss values to log are averaged over ranks.
        total, terms, weights = self._forward(batch, step)
        total_value, values = distributed.average_losses(total, terms, self.dist)
        logs: dict[str, float] = {}
        for name in terms:
            weight = weights.get(name, 1.0) * train.loss_weights.get(name, 1.0)
            logs[f"loss/{name}"] = values[name]
            if name in weights:
                logs[f"weight/{name}"] = weight
        unknown = set(train.loss_weights) - set(terms)
        if unknown and step.iteration == 0:
            raise ConfigError(
                f"train.loss_weights names {sorted(unknown)}, but method "
                f"{self.config.method.name!r} returns {sorted(terms)}"
            )
        if not math.isfinite(total_value):
            raise NumericsError(precision.loss_failure_message(
                total_value, step.iteration, values, self.amp_dtype))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_step(step)
        logs["loss/total"] = total_value
        logs["lr"] = lr
        return logs

    def _check_precision(self) -> dict[str, object]:
        """The numerics self-check of :mod:`semiseg.engine.precision` with the run's first
        batch and every scheduled loss term switched on (the last step's weights); every rank
        checks its own device and all stop if one fails."""
        batch = Batch.from_dict(self.data.batches[0]).to(self.device)
        last = StepInfo(self.config.train.max_iterations - 1, self.config.train.max_iterations,
                        self.data.iterations_per_epoch)
        result = precision.measure_method_precision(
            self.method, batch, last, self.config.train.loss_weights, self.amp_dtype,
            self.device, seed=self.config.experiment.seed)
        bound = precision.BOUNDS[self.amp_dtype]
        verdicts = distributed.gather_objects((result, result.failures(bound)), self.dist)
        for rank_result, failures in verdicts:
            if failures:
                raise NumericsError(precision.precision_failure_message(rank_result, failures))
        return result.to_dict()

    def fit(self) -> TrainResult:
        started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            if distributed.is_main_process():  # rank 0 alone writes, so it alone locks
                stack.enter_context(run_folder.training_lock(self.run_dir))
            # Held as an attribute so that _fit can drop the only reference once restored.
            self._resume_payload = self._resumable()
            try:
                self._setup()
                result = self._fit()
            finally:
                if hasattr(self, "dist"):
                    distributed.teardown(self.dist)
        result.seconds = time.perf_counter() - started
        return result

    def _fit(self) -> TrainResult:
        main = self.dist.is_main
        ckpt_dir = self.run_dir / "checkpoints"
        last = ckpt_dir / LAST
        payload, self._resume_payload = self._resume_payload, None
        if payload is not None:
            self._restore(payload)
            del payload  # the weights are in the method now; free the copy
        if main:  # rank 0 alone writes files
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.run_dir / "config.yaml")
            if self.precision_check is not None:
                atomic_write_json(self.run_dir / "precision_check.json", self.precision_check)
        train = self.config.train
        logger = RunLogger(self.run_dir, start_iteration=self.iteration) if main else None
        self.method.train()
        bar = tqdm(total=train.max_iterations, initial=self.iteration,
                   disable=not (self.show_progress and main),
                   desc=f"train {self.config.method.name}", dynamic_ncols=True)
        # Several processes must stop together; there, a signal keeps its default meaning.
        # Installed before "running" is announced: a signal from then on is handled.
        signals = run_folder.StopSignals(enabled=not self.dist.is_distributed).install()
        self._write_state("running")
        timer, timed = time.perf_counter(), 0
        try:
            for batch in self._batches():
                logged = ((self.iteration + 1) % train.log_every == 0
                          or self.iteration + 1 == train.max_iterations)
                step = StepInfo(self.iteration, train.max_iterations,
                                self.data.iterations_per_epoch, log=logged)
                logs = self._step(batch, step)
                self.iteration += 1
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss/total']:.4f}", refresh=False)
                done = self.iteration == train.max_iterations
                timed += 1
                if logged:
                    logs["time/iter_s"] = (time.perf_counter() - timer) / timed
                    timer, timed = time.perf_counter(), 0
                    logs.update({f"diag/{name}": value
                                 for name, value in self.method.diagnostics().items()})
                else:
                    logs = {}
                if train.validate_every > 0 and (self.iteration % train.validate_every == 0
                                                 or done):
                    validation_started = time.perf_counter()
                    logs.update(self._validate_and_keep_best(ckpt_dir))
                    # Keep validation out of the per-iteration timing.
                    timer += time.perf_counter() - validation_started
                if logs and logger is not None:
                    logger.log(self.iteration, logs)
                saved = self.iteration % train.checkpoint_every == 0 or done
                if saved:
                    self._save(last)
                if signals.received is not None and not done:
                    self._stop_on_signal(signals, saved)
                if logs or saved:
                    self._write_state("running")  # state.json follows the log and checkpoints
                if self.stop_after is not None and self.iteration >= self.stop_after:
                    break
        except KeyboardInterrupt:
            # A second signal (or one before the loop could react): what last.pt holds stays.
            with signals.held():  # a third one must not tear the record
                self._write_state("interrupted")
            raise
        except RunInterruptedError:
            raise
        except Exception as exc:
            if signals.stopped_at_once:  # the second signal, come out of C++ as its error
                with signals.held():
                    self._write_state("interrupted")
                raise KeyboardInterrupt from exc
            self._write_state_if_possible("failed", f"{type(exc).__name__}: {exc}")
            raise
        finally:
            signals.restore()
            bar.close()
            if logger is not None:
                logger.close()
        finished = self.iteration >= train.max_iterations
        validated = self.best_iteration >= 0
        if finished and not validated:
            # No validation configured: the final weights are the ones to evaluate.
            self._save(ckpt_dir / BEST)
            self.best_iteration = self.iteration
        self._write_state("finished" if finished else "stopped")
        # Nobody leaves (and possibly resumes) before rank 0 has written everything.
        distributed.barrier(self.dist)
        return TrainResult(self.run_dir, self.iteration, self.best_score, self.best_iteration,
                           train.max_iterations, validated=validated)

    def _stop_on_signal(self, signals: run_folder.StopSignals, saved: bool) -> None:
        """Save what a resume needs (unless this iteration's checkpoint just did), record an
        honest state, and end the run with the command that continues it."""
        last = self.run_dir / "checkpoints" / LAST
        if not saved:
            self._save(last)
        with signals.held():
            self._write_state("interrupted")
        raise RunInterruptedError(
            f"stopped by {signals.name} after iteration {self.iteration}/"
            f"{self.config.train.max_iterations}, saved in {last}", signals.exit_code,
            f"semiseg train --out {self.run_dir} --resume")

    def _validate_and_keep_best(self, ckpt_dir: Path) -> dict[str, float]:
        """Score the eval cases, keep the best checkpoint; returns the values to log."""
        if not self.data.split.eval:
            return {}
        scores = self._validate()
        score = scores.mean_dice
        self.method.train()
        if score > self.best_score:
            self.best_score = score
            self.best_iteration = self.iteration
            self._save(ckpt_dir / BEST)
        return scores.logs(self.data.class_set.abbreviations)

    def _write_state(self, status: str, error: str | None = None) -> None:
        if not self.dist.is_main:
            return
        run_folder.write_state(
            self.run_dir, status, iteration=self.iteration,
            max_iterations=self.config.train.max_iterations,
            checkpoint_iteration=self.checkpoint_iteration, best_score=self.best_score,
            best_iteration=self.best_iteration, error=error)

    def _write_state_if_possible(self, status: str, error: str) -> None:
        """Record a failure; when even that write fails (a full disk), the original error is
        the one to report."""
        with contextlib.suppress(OutputError):
            self._write_state(status, error)
