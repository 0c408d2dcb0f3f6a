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
"""

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from gctkd.config import RunConfig
from gctkd.cycle import run_progress
from gctkd.engine.checkpoint import BEST_NAME, LAST_NAME, save_checkpoint
from gctkd.engine.metrics import EvalAccumulator
from gctkd.engine.precision import Precision
from gctkd.engine.task import Task
from gctkd.engine.tensorboard import RunLogger
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
    ) -> None:
        self.task = task
        self.schedule = schedule
        self.config = config
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.run_dir = run_dir
        self.device = device
        self.precision = Precision(device, config.amp)
        task.to(device, self.precision.memory_format)

        self.trainable = nn.ModuleDict(task.trainable_modules())
        self.optimizer = self._build_optimizer()
        self.steps_per_epoch = len(train_loader)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer,
            sched=config.sched,
            num_epochs=config.epochs,
            warmup_epochs=config.warmup_epochs,
            min_lr=config.min_lr,
            step_on_epochs=False,
            updates_per_epoch=self.steps_per_epoch,
        )
        self.ema = ModelEmaV3(task.model, decay=config.ema_decay) if config.ema_decay else None
        self._clip = schedule.knobs.get("clip")
        self._clip_parameters = [p for p in self.trainable.parameters() if p.requires_grad]
        self._cyclical_optimizer_knobs = [
            name
            for name in _OPTIMIZER_KNOBS
            if name in schedule.knobs and schedule.knobs[name].is_cyclical
        ]

        self.epoch = 0
        self.global_step = 0
        self.best_top1 = -math.inf
        self.last_knobs = schedule.values(0.0)
        self.history: list[dict[str, Any]] = []

    def _build_optimizer(self) -> torch.optim.Optimizer:
        knobs = self.schedule.knobs
        decay = knobs.get("weight_decay")
        # build with the largest decay so timm splits decaying from non-decaying groups
        largest_decay = max(decay.easy, decay.hard) if decay is not None else 0.0
        momentum = knobs["momentum"].at(1.0) if "momentum" in knobs else 0.9
        optimizer = create_optimizer_v2(
            self.trainable,
            opt=self.config.opt,
            lr=self.config.lr,
            weight_decay=largest_decay,
            momentum=momentum,
        )
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

    def fit(self) -> dict[str, Any]:
        """Train to the end; returns the summary written to ``summary.json``."""
        started = time.perf_counter()
        self._log_setup()
        with RunLogger(self.run_dir) as run_logger:
            self.run_logger = run_logger
            while self.epoch < self.config.epochs:
                epoch_started = time.perf_counter()
                train_loss = self._train_epoch()
                metrics = self.evaluate()
                self.epoch += 1
                self._end_epoch(metrics, train_loss, time.perf_counter() - epoch_started)
        summary = {
            "epochs": self.epoch,
            "steps": self.global_step,
            "best_top1": self.best_top1,
            "final": self.history[-1] if self.history else {},
            "wall_seconds": time.perf_counter() - started,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _log_setup(self) -> None:
        _logger.info(
            f"{self.config.epochs} epochs x {self.steps_per_epoch} steps = {self.total_steps} "
            f"steps, batch {self.config.batch_size}, {self.config.opt} lr {self.config.lr:g}, "
            f"{self.precision.describe()}"
        )
        _logger.info(f"knobs: {self.schedule.describe()} (per {self.config.progress_unit})")
        _logger.info(f"writing to {self.run_dir} (tensorboard --logdir {self.run_dir})")

    def _train_epoch(self) -> float:
        self.trainable.train()
        sums: torch.Tensor | None = None
        logged_steps = 0
        part_names: list[str] = []
        epoch_loss = 0.0
        epoch_points = 0
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
            leave=False,
            dynamic_ncols=True,
        )
        for images, targets in self.train_loader:
            knobs = self.schedule.values(self.progress())
            parts = self._train_step(images, targets, knobs)
            stacked = torch.stack([value.detach().float() for value in parts.values()])
            sums = stacked if sums is None else sums + stacked
            part_names = list(parts)
            logged_steps += 1
            self.last_knobs = knobs
            self.global_step += 1

            last_of_run = self.global_step == self.total_steps
            if self.global_step % self.config.log_interval == 0 or self.global_step == 1 or (
                last_of_run
            ):
                means = dict(zip(part_names, (sums / logged_steps).tolist()))
                self._log_step(means, knobs)
                epoch_loss += means["loss"]
                epoch_points += 1
                bar.set_postfix(loss=f"{means['loss']:.4f}", xi=f"{knobs['xi']:.3f}")
                sums, logged_steps = None, 0
            bar.update()
        bar.close()
        if sums is not None:
            epoch_loss += (sums[0] / logged_steps).item()
            epoch_points += 1
        return epoch_loss / max(epoch_points, 1)

    def _train_step(
        self, images: torch.Tensor, targets: torch.Tensor, knobs: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        images = self.precision.images_to_device(images)
        targets = targets.to(self.device, non_blocking=True)
        # constants were written once at start; only cyclical knobs change per step
        if self._cyclical_optimizer_knobs:
            self._apply_optimizer_knobs(
                self.optimizer.param_groups, knobs, self._cyclical_optimizer_knobs
            )

        with self.precision.autocast():
            parts = self.task.training_loss(images, targets, knobs)
        loss = parts["loss"]

        scaler = self.precision.scaler
        scaler.scale(loss).backward()
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
        metrics = accumulator.compute()
        count = max(accumulator.count.item(), 1)
        metrics.update({name: 100.0 * value.item() / count for name, value in extras.items()})
        return {f"{prefix}/{name}": value for name, value in metrics.items()}

    def _end_epoch(self, metrics: dict[str, float], train_loss: float, seconds: float) -> None:
        self.run_logger.scalars({**metrics, "train/epoch_loss": train_loss}, self.global_step)
        self.run_logger.flush()
        score_key = "val_ema/top1" if self.ema is not None else "val/top1"
        record = {"epoch": self.epoch, "step": self.global_step, "train_loss": train_loss,
                  "xi": self.last_knobs["xi"], "seconds": seconds, **metrics}
        self.history.append(record)
        with open(self.run_dir / "metrics.jsonl", "a") as stream:
            stream.write(json.dumps(record) + "\n")

        improved = metrics[score_key] > self.best_top1
        if improved:
            self.best_top1 = metrics[score_key]
        self._save(LAST_NAME, metrics)
        if improved:
            self._save(BEST_NAME, metrics)
        _logger.info(
            f"epoch {self.epoch}/{self.config.epochs}: train loss {train_loss:.4f}, "
            f"val top1 {metrics['val/top1']:.2f} top5 {metrics['val/top5']:.2f} "
            f"loss {metrics['val/loss']:.4f} ece {metrics['val/ece']:.4f}, "
            f"xi {self.last_knobs['xi']:.3f}, {seconds:.1f}s" + (" *" if improved else "")
        )

    def state_dict(self, with_optimizer: bool = True) -> dict[str, Any]:
        """Plain-data checkpoint of the run at the current epoch boundary."""
        window = self.schedule.window
        progress_done = run_progress(
            *(
                (self.epoch - 1, self.config.epochs)
                if self.config.progress_unit == "epoch"
                else (self.global_step - 1, self.total_steps)
            )
        )
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
        return state

    def _save(self, name: str, metrics: dict[str, float]) -> None:
        state = self.state_dict(with_optimizer=name == LAST_NAME)
        if self.ema is not None:
            # the exported weights of a run with EMA are the EMA weights; raw ones stay apart
            state["raw_model"] = state["model"]
            state["model"] = state["ema"]
        save_checkpoint(state, self.run_dir / name)
