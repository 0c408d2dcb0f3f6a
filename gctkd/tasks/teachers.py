"""Distillation teachers: a gctkd run or checkpoint, or a timm model with a weights file.

Each returns a record for the student's checkpoint and a ``build(bundle)`` that makes the
:class:`~gctkd.models.FrozenTeacher` once the data (and so the class count) is known.
"""

import math
from typing import Any

from gctkd.config import RunConfig
from gctkd.data.datasets import DataBundle
from gctkd.engine.checkpoint import BEST_NAME, load_checkpoint, resolve_checkpoint
from gctkd.errors import UserError
from gctkd.models import (
    FrozenTeacher,
    classifier_outputs,
    create_model,
    load_weights,
    load_weights_file,
    model_from_checkpoint,
)


def channel_stats(text: str | None, option: str, positive: bool) -> tuple[float, ...] | None:
    """``"0.5,0.5,0.5"`` (or a YAML list written as text) as three floats."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in str(text).strip("[]() ").split(",") if v.strip())
    except ValueError:
        values = ()
    finite = all(math.isfinite(v) for v in values)
    if len(values) != 3 or not finite or (positive and min(values) <= 0):
        constraint = "three finite numbers > 0" if positive else "three finite numbers"
        raise UserError(f"{option} takes R,G,B as {constraint} (e.g. 0.5,0.5,0.5), got {text!r}")
    return values


def check_teacher_options(config: RunConfig) -> None:
    timm_options = {
        "--teacher-weights": config.teacher_weights,
        "--teacher-mean": config.teacher_mean,
        "--teacher-std": config.teacher_std,
        "--teacher-size": config.teacher_size,
    }
    if config.teacher is None and config.teacher_model is None:
        raise UserError(
            "distill needs a teacher: --teacher RUN_OR_CKPT (a gctkd run or checkpoint), or "
            "--teacher-model NAME --teacher-weights FILE (a timm model and a local state dict)"
        )
    if config.teacher is not None:
        given = [name for name, value in timm_options.items() if value is not None]
        if config.teacher_model is not None or given:
            extra = ", ".join((["--teacher-model"] if config.teacher_model else []) + given)
            raise UserError(
                f"{extra} describe a timm teacher and cannot go with --teacher, whose run "
                "records its model, input size and normalisation: drop one of the two"
            )
    elif config.teacher_weights is None:
        raise UserError(
            f"--teacher-model {config.teacher_model} needs --teacher-weights FILE (a local "
            ".safetensors or .pt state dict); nothing is downloaded"
        )
    if config.teacher_size is not None and config.teacher_size < 1:
        raise UserError(f"--teacher-size must be >= 1, got {config.teacher_size}")


def checkpoint_teacher(config: RunConfig) -> tuple[dict[str, Any], Any]:
    """``(record, build(bundle) -> FrozenTeacher)`` for ``--teacher RUN_OR_CKPT``."""
    path = resolve_checkpoint(config.teacher, prefer=BEST_NAME, option="--teacher")
    state = load_checkpoint(path, option="--teacher")
    source = f"--teacher '{path}'"

    def build(bundle: DataBundle) -> FrozenTeacher:
        if int(state["num_classes"]) != bundle.num_classes:
            raise UserError(
                f"{source} predicts {state['num_classes']} classes but the data has "
                f"{bundle.num_classes}: distil on the data the teacher was trained or "
                "fine-tuned on"
            )
        return FrozenTeacher(
            model_from_checkpoint(state, source),
            student_mean=bundle.mean,
            student_std=bundle.std,
            teacher_mean=state.get("mean", bundle.mean),
            teacher_std=state.get("std", bundle.std),
            teacher_size=state.get("image_size"),
        )

    return {"path": str(path), "model_name": state["model_name"]}, build


def timm_teacher(config: RunConfig) -> tuple[dict[str, Any], Any]:
    """``(record, build(bundle) -> FrozenTeacher)`` for ``--teacher-model --teacher-weights``."""
    name = config.teacher_model
    weights = load_weights_file(config.teacher_weights, option="--teacher-weights")
    mean = channel_stats(config.teacher_mean, "--teacher-mean", positive=False)
    std = channel_stats(config.teacher_std, "--teacher-std", positive=True)
    source = f"--teacher-weights '{config.teacher_weights}'"

    def build(bundle: DataBundle) -> FrozenTeacher:
        model = create_model(name, bundle.num_classes)
        classes = classifier_outputs(model, weights)
        if classes is not None and classes != bundle.num_classes:
            raise UserError(
                f"{source} is a {classes}-class {name} but the data has {bundle.num_classes} "
                "classes: distil on the data the teacher was trained or fine-tuned on"
            )
        load_weights(model, weights, source, what=f"--teacher-model {name}",
                     fix="pass the timm model the weights were trained with")
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        size = config.teacher_size or (cfg.get("input_size") or (None,))[-1]
        return FrozenTeacher(
            model,
            student_mean=bundle.mean,
            student_std=bundle.std,
            teacher_mean=mean or tuple(cfg.get("mean", bundle.mean)),
            teacher_std=std or tuple(cfg.get("std", bundle.std)),
            teacher_size=size,
        )

    return {"weights": str(config.teacher_weights), "model_name": name}, build
