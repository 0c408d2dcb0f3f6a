"""The one training loop behind pretrain, finetune and distill.

One step, as data flows::

    progress -> xi -> knob values -> written in place into the optimizer groups (weight
    decay, momentum) and the clipper, handed to the task's loss (temperatures, focal mix,
    KD weights) -> forward -> backward -> unscale -> clip -> optimizer step -> EMA -> LR

The knob values that are applied are the values that are logged and checkpointed. The
step never waits for the device except at the log interval: loss parts are summed on the
device and read once per logged point. On CUDA the step runs under autocast (bf16, or
fp16 with a gradient scaler) with channels_last; on the CPU the same code runs in fp32
with the scaler and autocast disabled.

Reliability, without a per-step wait:

* Faults: each step folds "is the loss finite, are the gradients finite" into a device-side
  record of the first faulty step, read with the loss means at the log interval and before
  every checkpoint. A fault stops the run (:class:`~gctkd.errors.NumericalFault`) without
  writing anything, so ``last.pt`` stays the last good state. ``--skip-nonfinite`` skips
  such steps instead, at the price of one device read per step. With an fp16 gradient
  scaler, infinite gradients are the scaler's business (it skips those steps itself) and
  only the loss is checked.
* Checkpoints: ``last.pt`` at every epoch end and every ``--checkpoint-every`` steps, with
  the position in the epoch, the pending loss sums and the RNG states; SIGTERM writes one at
  the end of the current step and stops (:class:`~gctkd.errors.Interrupted`).
* Resume (:meth:`Trainer.load_state_dict`): weights (raw into the model, EMA into the EMA),
  optimizer, scaler, progress and RNG states come back, the LR is recomputed from the step,
  and the epoch's batches are replayed from ``(seed, epoch)`` skipping those already done.
  On the CPU with ``--workers 0`` the resumed run is bit-identical to an uninterrupted one.
"""

import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from gctkd.config import RunConfig
from gctkd.cycle import run_progress
from gctkd.engine import distributed
from gctkd.engine.checkpoint import (
    BEST_NAME,
    LAST_NAME,
    capture_rng_states,
    restore_rng_states,
    save_checkpoint,
    save_last,
)
from gctkd.engine.distributed import SINGLE, DistributedContext
from gctkd.engine.metrics import EvalAccumulator
from gctkd.engine.precision import Precision
from gctkd.engine.task import Task
from gctkd.engine.tensorboard import NullLogger, RunLogger
from gctkd.errors import Interrupted, NumericalFault, UserError, nearest_names
from gctkd.knobs import KnobSchedule

_logger = logging.getLogger(__name__)

# knobs the engine applies itself; every other knob is the task's business
_OPTIMIZER_KNOBS = ("weight_decay", "momentum")


class Trainer:
    """Runs a task for ``config.epochs`` epochs with the knob schedule.

    Args:
        task: model, trainable modules and the loss.
        schedule: knob values as a function of progress.
        config: the run's settings (optimizer, LR schedule, clipping, AMP, EMA, logging).
        train_loader: training batches ``(images, targets)``.
        val_loader: validation batches, evaluated after every epoch.
        run_dir: where checkpoints, config and TensorBoard events go.
        device: where to train.
        distributed_context: this process's place among several (rank 0 writes the run
            folder); the default is a single process.
    """

    def __init__(
        self,
        task: Task,
        schedule: KnobSchedule,
        config: RunConfig,
        train_loader: DataLoader,
        val_loader: DataLoader,
        run_dir: Path,
        device: torch.device,
        distributed_context: DistributedContext = SINGLE,
    ) -> None:
        self.task = task
        self.schedule = schedule
        self.config = config
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.run_dir = run_dir
        self.device = device
        self.dist = distributed_context
        self.precision = Precision(device, config.amp)
        task.to(device, self.precision.memory_format)

        self.trainable = nn.ModuleDict(task.trainable_modules())
        for module in self.trainable.values():
            distributed.synchronize_batch_norm(module, self.dist)
        self.optimizer = self._build_optimizer()
        self.steps_per_epoch = len(train_loader)
        self.total_steps = config.epochs * self.steps_per_epoch
        try:
            self.scheduler, _ = create_scheduler_v2(
                self.optimizer,
                sched=config.sched,
                num_epochs=config.epochs,
                warmup_epochs=config.warmup_epochs,
                min_lr=config.min_lr,
                step_on_epochs=False,
                updates_per_epoch=self.steps_per_epoch,
            )
        except ValueError as error:
            raise UserError(
                f"--sched {config.sched}: timm says '{error}': pass a timm schedule name "
                "(cosine, tanh, step, multistep, plateau, poly)"
            ) from None
        self.ema = ModelEmaV3(task.model, decay=config.ema_decay) if config.ema_decay else None
        self._clip = schedule.knobs.get("clip")
        self._clip_parameters = [p for p in self.trainable.parameters() if p.requires_grad]
        self._cyclical_optimizer_knobs = [
            name
            for name in _OPTIMIZER_KNOBS
            if name in schedule.knobs and schedule.knobs[name].is_cyclical
        ]

        # several processes: DDP over the trainable modules only (never a frozen teacher)
        self._forward = (
            distributed.wrap_training_forward(task, self.trainable, self.dist, device)
            if self.dist.enabled
            else None
        )

        self.epoch = 0
        self.global_step = 0
        self.epoch_step = 0  # batches of the current epoch already trained on
        self.best_top1 = -math.inf
        self.last_knobs = schedule.values(0.0)
        self.history: list[dict[str, Any]] = []
        self.skipped_steps = 0
        self.resumed_from: int | None = None
        self._reset_epoch_sums()
        # first faulty step (1-based, 0 = none) of [loss, gradients], kept on the device
        self._fault = torch.zeros(2, device=device, dtype=torch.float64)
        self._check_gradients = not self.precision.scaler.is_enabled()
        self._stop_signal: int | None = None
        self._stop_agreed = False
        self._last_saved_step: int | None = None
        self._resume_rng: list[dict[str, Any]] | None = None

    def _reset_epoch_sums(self) -> None:
        self._sums: torch.Tensor | None = None  # loss parts summed since the last log point
        self._sums_steps = 0
        self._part_names: list[str] = []
        self._epoch_loss_sum = 0.0
        self._epoch_points = 0

    def _build_optimizer(self) -> torch.optim.Optimizer:
        knobs = self.schedule.knobs
        decay = knobs.get("weight_decay")
        # build with the largest decay so timm splits decaying from non-decaying groups
        largest_decay = max(decay.easy, decay.hard) if decay is not None else 0.0
        momentum = knobs["momentum"].at(1.0) if "momentum" in knobs else 0.9
        try:
            optimizer = create_optimizer_v2(
                self.trainable,
                opt=self.config.opt,
                lr=self.config.lr,
                weight_decay=largest_decay,
                momentum=momentum,
            )
        except ValueError:
            if self.config.opt.lower() in list_optimizers():
                raise  # a known optimizer refusing its arguments is not the user's typo
            raise UserError(
                f"unknown optimizer '{self.config.opt}'"
                f"{nearest_names(self.config.opt.lower(), list_optimizers())}: pass a timm "
                "optimizer name (timm.optim.list_optimizers() lists them)"
            ) from None
        # CWD acts on decaying groups only, chosen by role, never by position
        self._decay_groups = [g for g in optimizer.param_groups if g.get("weight_decay", 0) > 0]
        self._apply_optimizer_knobs(optimizer.param_groups, self.schedule.values(0.0), knobs)
        return optimizer

    def _apply_optimizer_knobs(
        self, groups: list[dict[str, Any]], values: dict[str, float], names: Any
    ) -> None:
        if "weight_decay" in names:
            for group in self._decay_groups:
                group["weight_decay"] = values["weight_decay"]
        if "momentum" in names:
            momentum = values["momentum"]
            for group in groups:
                if "momentum" in group:
                    group["momentum"] = momentum
                elif "betas" in group:
                    group["betas"] = (momentum, *group["betas"][1:])

    def progress(self) -> float:
        """The run's progress in [0, 1] at the next update."""
        if self.config.progress_unit == "epoch":
            return run_progress(self.epoch, self.config.epochs)
        return run_progress(self.global_step, self.total_steps)

    def knobs_at_step(self, step: int) -> dict[str, float]:
        """The knob values in force at update ``step`` (1-based): a pure function of progress."""
        if self.config.progress_unit == "epoch":
            return self.schedule.values(
                run_progress((step - 1) // self.steps_per_epoch, self.config.epochs)
            )
        return self.schedule.values(run_progress(step - 1, self.total_steps))

    def fit(self) -> dict[str, Any]:
        """Train to the end; returns the summary written to ``summary.json``.

        Raises:
            NumericalFault: a non-finite loss, gradient or weight (nothing saved after it).
            Interrupted: SIGTERM arrived; ``last.pt`` holds the state at the step it stopped.
        """
        started = time.perf_counter()
        self._log_setup()
        if self.dist.is_main:
            if self.resumed_from is not None:
                self._trim_metrics()
            run_logger: Any = RunLogger(
                self.run_dir,
                purge_step=self.global_step + 1 if self.resumed_from is not None else None,
            )
        else:
            run_logger = NullLogger()
        previous_handler = self._catch_sigterm()
        try:
            with run_logger:
                self.run_logger = run_logger
                while self.epoch < self.config.epochs:
                    epoch_started = time.perf_counter()
                    train_loss = self._train_epoch()
                    metrics = self.evaluate()
                    self.epoch += 1
                    self.epoch_step = 0
                    self._end_epoch(metrics, train_loss, time.perf_counter() - epoch_started)
                    if self._should_stop() and self.epoch < self.config.epochs:
                        self._stop()
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
        summary = {
            "epochs": self.epoch,
            "steps": self.global_step,
            "best_top1": self.best_top1,
            "final": self.history[-1] if self.history else {},
            "skipped_steps": self.skipped_steps,
            "resumed_from_step": self.resumed_from,
            "wall_seconds": time.perf_counter() - started,
        }
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _catch_sigterm(self) -> Any:
        """Turn SIGTERM into "checkpoint at the end of this step, then stop"."""

        def request_stop(signum: int, frame: Any) -> None:
            # only a flag here: the loop saves and stops at the next step boundary
            self._stop_signal = signum

        try:
            return signal.signal(signal.SIGTERM, request_stop)
        except ValueError:  # not the main thread: signals stay with the caller
            return None

    def _should_stop(self) -> bool:
        # several processes stop together, at a step they agreed on (see _read_device)
        if self.dist.enabled:
            return self._stop_agreed
        return self._stop_signal is not None

    def _stop(self) -> None:
        raise Interrupted(
            f"SIGTERM: stopped at step {self.global_step} (epoch {self.epoch + 1}, batch "
            f"{self.epoch_step} of {self.steps_per_epoch}) after writing "
            f"{self.run_dir / LAST_NAME}: continue with --resume {self.run_dir}"
        )

    def _trim_metrics(self) -> None:
        """Drop the epochs an interrupted process logged after the checkpoint resumed from."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("epoch", 0) <= self.epoch
        ]
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text("".join(line + "\n" for line in kept))
        temporary.replace(path)

    def _log_setup(self) -> None:
        _logger.info(
            f"{self.config.epochs} epochs x {self.steps_per_epoch} steps = {self.total_steps} "
            f"steps, batch {self.config.batch_size}, {self.config.opt} lr {self.config.lr:g}, "
            f"{self.precision.describe()}"
        )
        _logger.info(f"knobs: {self.schedule.describe()} (per {self.config.progress_unit})")
        _logger.info(f"writing to {self.run_dir} (tensorboard --logdir {self.run_dir})")
        if self.resumed_from is not None:
            _logger.info(
                f"resuming at step {self.global_step} of {self.total_steps} (epoch "
                f"{self.epoch + 1}, batch {self.epoch_step} of {self.steps_per_epoch})"
            )

    def _epoch_batches(self) -> Iterator[Any]:
        """This epoch's batches, without the ``epoch_step`` ones already trained on."""
        set_epoch = getattr(self.train_loader, "set_epoch", None)
        if set_epoch is not None:
            # the order is a pure function of (seed, epoch): resuming skips without loading
            set_epoch(self.epoch, skip_batches=self.epoch_step)
            batches = iter(self.train_loader)
        else:
            # a loader without epoch control: replay its batches and drop the done ones
            batches = iter(self.train_loader)
            for _ in range(self.epoch_step):
                next(batches)
        if self._resume_rng is not None:
            # the random states of the moment the checkpoint was taken, right before the
            # next batch is drawn (augmentations in the main process draw from them)
            restore_rng_states(self._resume_rng[min(self.dist.rank, len(self._resume_rng) - 1)])
            self._resume_rng = None
        return batches

    def _train_epoch(self) -> float:
        self.trainable.train()
        if self.epoch_step == 0:
            self._reset_epoch_sums()
        # `disable` is passed off the main rank only: an explicit value would override tqdm's
        # own TQDM_DISABLE=1, which benchmarks and batch jobs use to keep their logs clean
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.epoch_step,
            desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
            leave=False,
            dynamic_ncols=True,
            **({} if self.dist.is_main else {"disable": True}),
        )
        try:
            for images, targets in self._epoch_batches():
                knobs = self.schedule.values(self.progress())
                self._accumulate(self._train_step(images, targets, knobs))
                self.last_knobs = knobs
                self.global_step += 1
                self.epoch_step += 1
                self._maybe_log(knobs, bar)
                bar.update()
                self._maybe_save_or_stop()
        finally:
            # also when a fault or SIGTERM ends the epoch: the error line starts clean
            bar.close()
        if self._sums is not None:
            means = self._read_device(with_means=True)
            self._epoch_loss_sum += means["loss"]
            self._epoch_points += 1
        return self._epoch_loss_sum / max(self._epoch_points, 1)

    def _accumulate(self, parts: dict[str, torch.Tensor] | None) -> None:
        # summed on the device; read at the next log point
        if parts is None:
            return
        stacked = torch.stack([value.detach().float() for value in parts.values()])
        self._sums = stacked if self._sums is None else self._sums + stacked
        self._part_names = list(parts)
        self._sums_steps += 1

    def _maybe_log(self, knobs: dict[str, float], bar: tqdm) -> None:
        step = self.global_step
        if step % self.config.log_interval and step != 1 and step != self.total_steps:
            return
        means = self._read_device(with_means=True)
        if means is None:  # every step since the last point was skipped
            return
        self._log_step(means, knobs)
        self._epoch_loss_sum += means["loss"]
        self._epoch_points += 1
        bar.set_postfix(loss=f"{means['loss']:.4f}", xi=f"{knobs['xi']:.3f}")

    def _maybe_save_or_stop(self) -> None:
        if self._should_stop():
            self._save_last()
            self._stop()
        every = self.config.checkpoint_every
        # the epoch's end writes last.pt anyway, after evaluation
        if every and self.global_step % every == 0 and self.epoch_step < self.steps_per_epoch:
            self._save_last()

    def _read_device(self, with_means: bool) -> dict[str, float] | None:
        """One read from the device; raises NumericalFault when the fault record is set.

        It reads the loss means since the last read, the fault record and, with several
        processes, whether any rank was asked to stop. Returns the means (averaged over the
        ranks), or None without pending sums.
        """
        with_means = with_means and self._sums is not None
        pieces = [(self._sums / self._sums_steps).double()] if with_means else []
        if self.dist.enabled:
            if with_means:
                distributed.all_reduce(pieces[0], self.dist)
                pieces[0] /= self.dist.world_size
            # the earliest fault of any rank, and whether any rank was asked to stop
            faults = torch.where(self._fault > 0, self._fault, math.inf)
            stop = faults.new_full((1,), -1.0 if self._stop_signal is not None else 0.0)
            pieces.append(distributed.all_reduce(torch.cat([faults, stop]), self.dist, op="min"))
        else:
            pieces.append(self._fault)
        values = torch.cat(pieces).tolist()
        count = len(self._part_names) if with_means else 0
        means, flags = values[:count], values[count:]
        if self.dist.enabled:
            self._stop_agreed = self._stop_agreed or flags[2] < 0
            flags = [0.0 if math.isinf(flag) else flag for flag in flags[:2]]
        if any(flags):
            self._raise_fault(*flags)
        if not with_means:
            return None
        self._sums, self._sums_steps = None, 0
        return dict(zip(self._part_names, means))

    def _raise_fault(self, loss_step: float, gradient_step: float, what: str = "") -> None:
        candidates = [(int(loss_step), "loss"), (int(gradient_step), "gradient")]
        # a non-finite loss makes non-finite gradients too: name the loss then
        found = [candidate for candidate in candidates if candidate[0] > 0]
        step, what = min(found, key=lambda c: c[0]) if found else (self.global_step, what)
        knobs = ", ".join(f"{name} {value:.4g}" for name, value in self.knobs_at_step(step).items())
        if self._last_saved_step is None:
            # nothing to resume from: the same command again, told to skip such steps
            kept = "no checkpoint was written yet"
            skip = "or run again with --overwrite --skip-nonfinite to skip such steps"
        else:
            kept = f"{self.run_dir / LAST_NAME} (step {self._last_saved_step}) is kept"
            skip = f"or --resume {self.run_dir} --skip-nonfinite to skip such steps"
        raise NumericalFault(
            f"non-finite {what} at step {step} (epoch {(step - 1) // self.steps_per_epoch + 1}; "
            f"{knobs}): stopped, {kept}; lower --lr or the hard knob values, clip with --clip, "
            f"{skip}"
        )

    def _train_step(
        self, images: torch.Tensor, targets: torch.Tensor, knobs: dict[str, float]
    ) -> dict[str, torch.Tensor] | None:
        """One update; returns the loss parts, or None for a step skipped as non-finite."""
        images = self.precision.images_to_device(images)
        targets = targets.to(self.device, non_blocking=True)
        # constants were written once at start; only cyclical knobs change per step
        if self._cyclical_optimizer_knobs:
            self._apply_optimizer_knobs(
                self.optimizer.param_groups, knobs, self._cyclical_optimizer_knobs
            )

        with self.precision.autocast():
            if self._forward is not None:
                parts = self._forward(images, targets, knobs)
            else:
                parts = self.task.training_loss(images, targets, knobs)
        loss = parts["loss"]

        scaler = self.precision.scaler
        scaler.scale(loss).backward()
        checks = self._finite_checks(loss)
        if self.config.skip_nonfinite:
            bad = (~torch.isfinite(checks)).float()
            # every rank skips the same steps
            distributed.all_reduce(bad, self.dist, op="max")
            # the one device read per step that --skip-nonfinite costs
            if bool(bad.any()):
                self._skip_step(knobs, bad)
                return None
        else:
            self._record_faults(checks)
        if self._clip is not None:
            # unscale first: the threshold is in real gradient units
            scaler.unscale_(self.optimizer)
            dispatch_clip_grad(self._clip_parameters, knobs["clip"], mode=self.config.clip_mode)
        scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

        if self.ema is not None:
            self.ema.update(self.task.model, step=self.global_step)
        self.scheduler.step_update(num_updates=self.global_step + 1)
        return parts

    def _finite_checks(self, loss: torch.Tensor) -> torch.Tensor:
        """``[loss, largest |gradient|]`` on the device (the loss alone under an fp16 scaler)."""
        loss = loss.detach().float().reshape(1)
        if not self._check_gradients:
            return loss
        gradients = [p.grad for p in self._clip_parameters if p.grad is not None]
        if not gradients:
            return loss
        peaks = torch._foreach_norm(gradients, float("inf"))
        return torch.cat([loss, torch.stack(peaks).max().reshape(1).float()])

    def _record_faults(self, checks: torch.Tensor) -> None:
        # first faulty step of each kind, updated on the device: no wait
        first = self._fault[: checks.numel()]
        first.add_(((first == 0) & ~torch.isfinite(checks)) * (self.global_step + 1))

    def _skip_step(self, knobs: dict[str, float], bad: torch.Tensor) -> None:
        step = self.global_step + 1
        self.skipped_steps += 1
        kinds = [name for name, flag in zip(("loss", "gradient"), bad.tolist()) if flag]
        _logger.warning(
            f"skipped step {step}: non-finite {' and '.join(kinds)} (xi {knobs['xi']:.3f}); "
            f"{self.skipped_steps} skipped so far"
        )
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step_update(num_updates=step)

    def _log_step(self, means: dict[str, float], knobs: dict[str, float]) -> None:
        step = self.global_step
        scalars = {"cycle/xi": knobs["xi"], "train/lr": self.optimizer.param_groups[0]["lr"]}
        scalars["train/loss"] = means["loss"]
        scalars.update({f"loss/{name}": value for name, value in means.items() if name != "loss"})
        scalars.update({f"knob/{name}": value for name, value in knobs.items() if name != "xi"})
        self.run_logger.scalars(scalars, step)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation metrics of the model (and its EMA), T = 1."""
        metrics = self._evaluate_model(self.task.model, "val")
        if self.ema is not None:
            metrics.update(self._evaluate_model(self.ema.module, "val_ema"))
        return metrics

    def _evaluate_model(self, model: nn.Module, prefix: str) -> dict[str, float]:
        was_training = model.training
        model.eval()
        accumulator = EvalAccumulator(self.task.meta["num_classes"], self.device)
        extras: dict[str, torch.Tensor] = {}
        for images, targets in self.val_loader:
            images = self.precision.images_to_device(images)
            targets = targets.to(self.device, non_blocking=True)
            with self.precision.autocast():
                logits = self.task.eval_logits(images, model)
            accumulator.update(logits, targets)
            for name, value in self.task.validation_extras(images, logits).items():
                extras[name] = extras.get(name, 0) + value.double()
        model.train(was_training)
        if self.dist.enabled:
            self._reduce_evaluation(accumulator, extras)
        metrics = accumulator.compute()
        count = max(accumulator.count.item(), 1)
        metrics.update({name: 100.0 * value.item() / count for name, value in extras.items()})
        return {f"{prefix}/{name}": value for name, value in metrics.items()}

    def _reduce_evaluation(
        self, accumulator: EvalAccumulator, extras: dict[str, torch.Tensor]
    ) -> None:
        """Sum each rank's share of the validation set into the whole set's sums."""
        names = sorted(extras)
        scalars = [accumulator.count, accumulator.top1, accumulator.top5, accumulator.loss]
        packed = torch.cat(
            [torch.stack(scalars), accumulator.bins.flatten()]
            + [extras[name].reshape(1).to(self.device) for name in names]
        )
        distributed.all_reduce(packed, self.dist)
        for index, tensor in enumerate(scalars):
            tensor.copy_(packed[index])
        size = accumulator.bins.numel()
        accumulator.bins.copy_(packed[4 : 4 + size].view_as(accumulator.bins))
        for offset, name in enumerate(names):
            extras[name] = packed[4 + size + offset]

    def _end_epoch(self, metrics: dict[str, float], train_loss: float, seconds: float) -> None:
        self.run_logger.scalars({**metrics, "train/epoch_loss": train_loss}, self.global_step)
        self.run_logger.flush()
        score_key = "val_ema/top1" if self.ema is not None else "val/top1"
        record = {"epoch": self.epoch, "step": self.global_step, "train_loss": train_loss,
                  "xi": self.last_knobs["xi"], "seconds": seconds, **metrics}
        self.history.append(record)
        if self.dist.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as stream:
                stream.write(json.dumps(record) + "\n")

        improved = metrics[score_key] > self.best_top1
        if improved:
            self.best_top1 = metrics[score_key]
        self._save_last()
        if improved:
            self._save_best()
        _logger.info(
            f"epoch {self.epoch}/{self.config.epochs}: train loss {train_loss:.4f}, "
            f"val top1 {metrics['val/top1']:.2f} top5 {metrics['val/top5']:.2f} "
            f"loss {metrics['val/loss']:.4f} ece {metrics['val/ece']:.4f}, "
            f"xi {self.last_knobs['xi']:.3f}, {seconds:.1f}s" + (" *" if improved else "")
        )

    def state_dict(self, with_optimizer: bool = True) -> dict[str, Any]:
        """Plain-data checkpoint of the run where it stands (mid-epoch included).

        With ``with_optimizer`` it holds everything :meth:`load_state_dict` needs to resume:
        optimizer, scaler, the position in the epoch, the pending loss sums and the RNG
        states of every rank. With several processes every rank must call it (the RNG
        states are gathered to rank 0).
        """
        window = self.schedule.window
        # progress of the last update taken, i.e. where the cycle stands now
        if self.config.progress_unit == "epoch":
            progress_done = run_progress(self.epoch - 1, self.config.epochs)
        else:
            progress_done = run_progress(self.global_step - 1, self.total_steps)
        trainable = self.task.trainable_modules()
        state = {
            **self.task.meta,
            "model": self.task.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "helpers": {
                name: module.state_dict() for name, module in trainable.items() if name != "model"
            },
            "config": self.config.to_dict(),
            "cycle": {
                **window.state_dict(),
                "progress_unit": self.config.progress_unit,
                "run_progress": progress_done,
                "cycle_progress": window.cycle_progress(progress_done),
                "xi": self.last_knobs["xi"],
                "knobs": dict(self.last_knobs),
            },
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best_top1": self.best_top1,
            "metrics": self.history[-1] if self.history else {},
        }
        if with_optimizer:
            state["optimizer"] = self.optimizer.state_dict()
            state["scaler"] = self.precision.scaler.state_dict()
            state["resume"] = self._resume_state()
        if self.ema is not None:
            # the exported weights of a run with EMA are the EMA weights; raw ones stay apart
            state["raw_model"] = state["model"]
            state["model"] = state["ema"]
        return state

    def _resume_state(self) -> dict[str, Any]:
        rng = capture_rng_states()
        if self.dist.enabled:
            gathered: list[Any] = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, rng)
            rng_states = gathered
        else:
            rng_states = [rng]
        return {
            "epoch_step": self.epoch_step,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "world_size": self.dist.world_size,
            "pending_sums": self._sums.detach().cpu() if self._sums is not None else None,
            "pending_steps": self._sums_steps,
            "part_names": list(self._part_names),
            "epoch_loss_sum": self._epoch_loss_sum,
            "epoch_points": self._epoch_points,
            "skipped_steps": self.skipped_steps,
            "history": [dict(record) for record in self.history],
            "rng": rng_states,
        }

    def _check_before_save(self) -> None:
        """Raise rather than save after a fault: the fault record, then the weights."""
        self._read_device(with_means=False)
        parameters = [p.detach() for p in self.trainable.parameters()]
        peak = torch.stack(torch._foreach_norm(parameters, float("inf"))).max().reshape(1)
        bad = (~torch.isfinite(peak)).float()
        distributed.all_reduce(bad, self.dist, op="max")
        if bool(bad.item()):
            self._raise_fault(0, 0, what="weights")

    def _save_last(self) -> None:
        """``last.pt`` (and the step copies of --keep-last); never after a fault."""
        self._check_before_save()
        state = self.state_dict(with_optimizer=True)
        if self.dist.is_main:
            save_last(state, self.run_dir, self.config.keep_last)
        self._last_saved_step = self.global_step
        distributed.barrier(self.dist)

    def _save_best(self) -> None:
        # called right after _save_last, which checked for faults
        state = self.state_dict(with_optimizer=False)
        if self.dist.is_main:
            save_checkpoint(state, self.run_dir / BEST_NAME)
        distributed.barrier(self.dist)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``last.pt`` that :meth:`state_dict` wrote.

        The raw weights go into the model and the EMA weights into the EMA; the optimizer,
        scaler, progress, pending loss sums and RNG states come back; the LR is recomputed
        from the step (timm schedules are functions of the update count).

        Raises:
            UserError: a checkpoint without resume state (best.pt, an older gctkd), or one
                whose run does not fit this one (steps per epoch, weights).
        """
        resume = state.get("resume")
        if resume is None or "optimizer" not in state:
            raise UserError(
                "the checkpoint has no resume state (a best.pt, or one written by an older "
                "gctkd): resume from the last.pt of a run, or start a new run from it with "
                "finetune --from"
            )
        for name, here in (("steps_per_epoch", self.steps_per_epoch),
                           ("total_steps", self.total_steps)):
            if int(resume[name]) != here:
                raise UserError(
                    f"the run had {resume[name]} {name.replace('_', ' ')} but this one has {here}: "
                    "resume with the data, batch size and epochs the run started with"
                )
        try:
            self.task.model.load_state_dict(state.get("raw_model", state["model"]))
            if self.ema is not None:
                if state.get("ema") is None:
                    raise RuntimeError("the checkpoint holds no EMA weights")
                self.ema.module.load_state_dict(state["ema"])
            for name, module in self.trainable.items():
                if name != "model":
                    module.load_state_dict(state["helpers"][name])
            decay_indices = [
                index for index, group in enumerate(self.optimizer.param_groups)
                if any(group is chosen for chosen in self._decay_groups)
            ]
            self.optimizer.load_state_dict(state["optimizer"])
            # loading makes new group dicts: CWD must write into those, chosen by position
            self._decay_groups = [self.optimizer.param_groups[i] for i in decay_indices]
        except (RuntimeError, KeyError, ValueError) as error:
            detail = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            raise UserError(f"the checkpoint does not fit this run ({detail})") from None
        if state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])

        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.epoch_step = int(resume["epoch_step"])
        self.best_top1 = float(state["best_top1"])
        self.history = [dict(record) for record in resume["history"]]
        self.skipped_steps = int(resume.get("skipped_steps", 0))
        self.last_knobs = dict(state["cycle"]["knobs"])
        pending = resume.get("pending_sums")
        self._sums = pending.to(self.device) if pending is not None else None
        self._sums_steps = int(resume["pending_steps"])
        self._part_names = list(resume["part_names"])
        self._epoch_loss_sum = float(resume["epoch_loss_sum"])
        self._epoch_points = int(resume["epoch_points"])
        self._resume_rng = list(resume["rng"])
        if len(self._resume_rng) != self.dist.world_size:
            _logger.warning(
                f"the run had {len(self._resume_rng)} processes and this one "
                f"{self.dist.world_size}: random augmentations will not repeat exactly"
            )
        self.scheduler.step_update(num_updates=self.global_step)
        self.resumed_from = self.global_step
        self._last_saved_step = self.global_step
