"""The three commands as library calls: pretrain, finetune and distill.

Each builds the data, the model and its task from a :class:`~gctkd.config.RunConfig`,
places the run on its part of the cycle and hands everything to the one
:class:`~gctkd.engine.trainer.Trainer`. Pretraining is the first half of a cycle (f_c = 1:
easy to hard); fine-tuning continues from where the checkpoint says the cycle stands back
to easy; distillation runs its own cycle (f_c = 2 by default, so the KD temperature peaks
mid-run).
"""

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import timm.utils
import torch
import yaml

import gctkd
from gctkd.config import (
    RESUME_CHANGEABLE,
    RunConfig,
    cycle_window_bounds,
    focal_gammas,
    inherit,
)
from gctkd.cycle import CycleWindow, continuation_window
from gctkd.data.datasets import DataBundle, build_datasets
from gctkd.data.loader import build_loader
from gctkd.data.transforms import TransformedDataset, build_transform
from gctkd.engine import distributed
from gctkd.engine.checkpoint import (
    BEST_NAME,
    LAST_NAME,
    load_checkpoint,
    resolve_checkpoint,
)
from gctkd.engine.distributed import SINGLE, DistributedContext
from gctkd.engine.precision import select_device
from gctkd.engine.trainer import Trainer
from gctkd.errors import UserError
from gctkd.knobs import KnobSchedule, parse_knob
from gctkd.models import count_parameters, create_model, model_from_checkpoint
from gctkd.models.taps import parse_feature_layers
from gctkd.tasks import teachers
from gctkd.tasks.classification import ClassificationTask
from gctkd.tasks.distill import DEFAULT_FEATURE_WEIGHT, DistillTask
from gctkd.tasks.logit_cache import IndexedTargets, TeacherLogitCache
from gctkd.tasks.run_folder import (
    attach_file_log,
    close_file_log,
    default_run_dir,
    prepare_run_dir,
    remove_stale_temporaries,
    settle_replaced,
)

_logger = logging.getLogger(__name__)

DEFAULT_CYCLICAL_FACTOR = {"pretrain": 1.0, "finetune": 1.0, "distill": 2.0}
DEFAULT_MODEL = {"pretrain": "resnet56", "distill": "resnet20"}


def _eval_transform(config: RunConfig, bundle: DataBundle) -> Any:
    return build_transform(
        config.image_size, training=False, hflip=0.0, mean=bundle.mean, std=bundle.std
    )


def build_data(
    config: RunConfig,
    device: torch.device | None = None,
    context: DistributedContext = SINGLE,
) -> tuple[DataBundle, Any, Any]:
    """Datasets with their transforms and the two loaders (pinned memory for CUDA).

    With several processes each loader yields this rank's part: ``batch_size / world_size``
    images of every training batch and a share of the validation set.
    """
    pin_memory = device is not None and device.type == "cuda"
    if config.batch_size % context.world_size:
        raise UserError(
            f"--batch-size {config.batch_size} does not divide among {context.world_size} "
            f"processes: pass a multiple of {context.world_size}"
        )
    rank_batch = config.batch_size // context.world_size
    ranks = {"rank": context.rank, "world_size": context.world_size}
    bundle = build_datasets(
        config.data,
        per_class=config.per_class,
        val_fraction=config.val_fraction,
        val_per_class=config.val_per_class,
        seed=config.seed,
        bad_images=config.bad_images,
    )
    if config.batch_size > len(bundle.train):
        raise UserError(
            f"--batch-size {config.batch_size} is larger than the {len(bundle.train)} training "
            "images: pass a smaller --batch-size"
        )
    hflip = config.hflip if config.hflip is not None else (0.5 if bundle.default_hflip else 0.0)
    common = {"mean": bundle.mean, "std": bundle.std}
    train_transform = build_transform(
        config.image_size, training=True, hflip=hflip, auto_augment=config.auto_augment,
        re_prob=config.re_prob, **common,
    )
    eval_transform = _eval_transform(config, bundle)
    train_set = TransformedDataset(bundle.train, train_transform)
    if config.cache_teacher_logits:
        # cached teacher logits need the same image of a sample every epoch: no augmentation,
        # and targets that carry the sample index (gctkd.tasks.logit_cache)
        train_set = TransformedDataset(IndexedTargets(bundle.train), eval_transform)
    train_loader = build_loader(
        train_set,
        batch_size=rank_batch,
        training=True,
        workers=config.workers,
        seed=config.seed,
        pin_memory=pin_memory,
        **ranks,
    )
    val_share = len(range(context.rank, len(bundle.val), context.world_size))
    if val_share == 0:
        raise UserError(
            f"{len(bundle.val)} validation images cannot be shared by {context.world_size} "
            "processes: use more validation images or fewer processes"
        )
    val_loader = build_loader(
        TransformedDataset(bundle.val, eval_transform),
        batch_size=min(rank_batch, val_share),
        training=False,
        workers=config.workers,
        seed=config.seed,
        pin_memory=pin_memory,
        **ranks,
    )
    return bundle, train_loader, val_loader


def _meta(config: RunConfig, command: str, model_name: str, bundle: DataBundle) -> dict[str, Any]:
    return {
        "command": command,
        "gctkd_version": gctkd.__version__,
        "model_name": model_name,
        "num_classes": bundle.num_classes,
        "class_names": list(bundle.class_names),
        "image_size": config.image_size,
        "mean": list(bundle.mean),
        "std": list(bundle.std),
    }


def _window(config: RunConfig, command: str, recorded: dict[str, Any] | None = None) -> CycleWindow:
    bounds = cycle_window_bounds(config)
    if command == "finetune" and recorded is not None:
        if config.cyclical_factor is None and bounds is None:
            return continuation_window(float(recorded.get("xi", 0.0)))
        if config.cyclical_factor is None:
            factor = float(recorded.get("cyclical_factor", 1.0))
            return CycleWindow(factor, *bounds)
    factor = config.cyclical_factor or DEFAULT_CYCLICAL_FACTOR[command]
    return CycleWindow(factor, *(bounds or (0.0, 1.0)))


def _load_resume_state(command: str, config: RunConfig) -> dict[str, Any]:
    """``RUN/last.pt`` of the run to resume, checked against ``RUN/config.yaml``."""
    run_dir = Path(config.resume)
    path = run_dir / LAST_NAME
    if not path.is_file():
        raise UserError(
            f"--resume '{run_dir}' holds no {LAST_NAME}: the run stopped before its first "
            "checkpoint; start it again (--overwrite replaces the folder)"
        )
    state = load_checkpoint(path, option="--resume")
    if state.get("command") != command:
        raise UserError(
            f"--resume '{path}' was written by 'gctkd {state.get('command')}', not "
            f"'gctkd {command}'"
        )
    if int(state.get("epoch", 0)) >= config.epochs:
        raise UserError(
            f"--resume '{run_dir}' has finished its {config.epochs} epochs: nothing to resume; "
            f"train on from it with gctkd finetune --from {run_dir}"
        )
    recorded = state.get("config") or {}
    current = config.to_dict()
    ignored = set(RESUME_CHANGEABLE) | {"out", "overwrite"}
    edited = sorted(k for k in recorded if k in current and k not in ignored
                    and recorded[k] != current[k])  # fmt: skip
    if edited:
        name = edited[0]
        raise UserError(
            f"{run_dir / 'config.yaml'} says {name}={current[name]!r} but {LAST_NAME} was trained "
            f"with {recorded[name]!r} (and {len(edited) - 1} more differ): the file was edited "
            "since; restore it to resume the run"
        )
    return state


def _check_resume_fits(state: dict[str, Any], meta: dict[str, Any], run_dir: Path) -> None:
    for key, what in (("model_name", "model"), ("class_names", "classes")):
        if state.get(key) != meta.get(key):
            raise UserError(
                f"--resume '{run_dir}': the run's {what} ({state.get(key)!r}) and this one's "
                f"({meta.get(key)!r}) differ: resume with the data and model the run started with"
            )


def _train(
    command: str,
    config: RunConfig,
    build_task: Any,
    recorded_cycle: dict[str, Any] | None = None,
) -> dict[str, Any]:
    context, device = distributed.setup(select_device(config.device))
    try:
        return _train_here(context, device, command, config, build_task, recorded_cycle)
    finally:
        distributed.teardown(context)


def _train_here(
    context: DistributedContext,
    device: torch.device,
    command: str,
    config: RunConfig,
    build_task: Any,
    recorded_cycle: dict[str, Any] | None,
) -> dict[str, Any]:
    resume_state = _load_resume_state(command, config) if config.resume else None
    bundle, train_loader, val_loader = build_data(config, device, context)
    timm.utils.random_seed(config.seed)
    # the task checks model names and checkpoints: a bad one must not leave a run folder
    task = build_task(bundle)
    if context.enabled:
        # the same initial weights everywhere (DDP broadcasts them anyway), then each rank
        # its own random stream for the augmentations made in this process
        timm.utils.random_seed(config.seed, context.rank)
    if resume_state is not None:
        run_dir = Path(config.resume)
        _check_resume_fits(resume_state, task.meta, run_dir)
        window = CycleWindow.from_state_dict(resume_state["cycle"])
    else:
        # rank 0 names the folder (the default name holds the time)
        named = distributed.broadcast_object(str(default_run_dir(config.out, command)), context)
        run_dir = Path(named)
        window = _window(config, command, recorded_cycle)
    schedule = KnobSchedule(window, config.knob_ranges(), extra_xi_tags=task.xi_driven)
    trainer = Trainer(
        task, schedule, config, train_loader, val_loader, run_dir, device, context
    )
    if resume_state is not None:
        trainer.load_state_dict(resume_state)
        del resume_state

    # the checks are done: from here on the run folder is written (by rank 0)
    fresh = config.resume is None
    existed = run_dir.is_dir()
    message = None
    replaced = None
    if context.is_main:
        try:
            if fresh:
                sources = {"--data": config.data, "--from": config.from_checkpoint,
                           "--teacher": config.teacher, "--teacher-weights": config.teacher_weights}
                _, replaced = prepare_run_dir(str(run_dir), command, config.overwrite, sources)
            else:
                remove_stale_temporaries(run_dir)
        except UserError as error:
            message = str(error)
    message = distributed.broadcast_object(message, context)
    if message is not None:
        raise UserError(message)
    handler = attach_file_log(run_dir) if context.is_main else None
    succeeded = False
    try:
        if fresh and context.is_main:
            resolved = {"command": command, **config.to_dict(), "out": str(run_dir)}
            (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        _logger.info(f"gctkd {command} {gctkd.__version__}: {bundle.description}")
        _logger.info(
            f"model {task.meta['model_name']} ({count_parameters(task.model) / 1e6:.2f}M "
            f"parameters), {bundle.num_classes} classes, {config.image_size}px"
        )
        for line in task.describe():
            _logger.info(line)
        summary = trainer.fit()
        _logger.info(
            f"done in {summary['wall_seconds']:.1f}s: best val top1 {summary['best_top1']:.2f}; "
            f"checkpoints {run_dir / BEST_NAME}, {run_dir / LAST_NAME}"
        )
        succeeded = True
        return summary
    except UserError:
        # a new run that failed before its first checkpoint (an undecodable image, say)
        # leaves no folder behind, so the same command runs again once the cause is fixed
        if fresh and context.is_main and replaced is None and not (run_dir / LAST_NAME).exists():
            close_file_log(handler)
            handler = None
            shutil.rmtree(run_dir, ignore_errors=True)
            if existed:
                run_dir.mkdir(exist_ok=True)
        raise
    finally:
        close_file_log(handler)
        if context.is_main:
            settle_replaced(run_dir, replaced, succeeded)


def pretrain(config: RunConfig) -> dict[str, Any]:
    """Train a model from scratch (or timm weights) on the easy-to-hard half of the cycle."""
    model_name = config.model or DEFAULT_MODEL["pretrain"]

    def build_task(bundle: DataBundle) -> ClassificationTask:
        model = create_model(model_name, bundle.num_classes, pretrained=config.pretrained)
        meta = _meta(config, "pretrain", model_name, bundle)
        return ClassificationTask(model, meta, focal_gammas(config), config.label_smoothing)

    return _train("pretrain", config, build_task)


def finetune(config: RunConfig) -> dict[str, Any]:
    """Continue a run on new data; the cycle goes on from where the checkpoint left it.

    ``--from RUN`` reads the run's ``last.pt``: the end of pretraining is where the cycle
    stands, whereas ``best.pt`` may come from any epoch.
    """
    if config.from_checkpoint is None:
        raise UserError("finetune needs --from RUN_OR_CKPT: the run or checkpoint to continue")
    path = resolve_checkpoint(config.from_checkpoint, prefer=LAST_NAME, option="--from")
    state = load_checkpoint(path, option="--from")
    source = f"--from '{path}'"
    if config.resume is None:
        config = inherit(config, state.get("config") or {})

    def build_task(bundle: DataBundle) -> ClassificationTask:
        model = model_from_checkpoint(state, source, config.model)
        if int(state["num_classes"]) != bundle.num_classes:
            _logger.info(
                f"new classifier: {state['num_classes']} -> {bundle.num_classes} classes"
            )
            model.reset_classifier(bundle.num_classes)
        meta = _meta(config, "finetune", state["model_name"], bundle)
        meta["from"] = str(path)
        return ClassificationTask(model, meta, focal_gammas(config), config.label_smoothing)

    return _train("finetune", config, build_task, recorded_cycle=state.get("cycle"))


def _feature_settings(config: RunConfig) -> tuple[RunConfig, list[tuple[Any, Any]]]:
    """The layer pairs, and the config with the default feature weight filled in."""
    if config.feature_layers is None:
        if config.feature_weight is not None:
            raise UserError(
                "--feature-weight needs --feature-layers: say which teacher and student layers "
                "to match (e.g. --feature-layers 1,2,3)"
            )
        return config, []
    pairs = parse_feature_layers(config.feature_layers)
    if config.feature_weight is None:
        default = DEFAULT_FEATURE_WEIGHT[config.feature_loss]
        config = dataclasses.replace(config, feature_weight=parse_knob("feature_weight", default))
    return config, pairs


def _check_logit_cache(config: RunConfig, pairs: list[tuple[Any, Any]]) -> None:
    if not config.cache_teacher_logits:
        return
    augmenting = [
        option
        for option, on in (
            ("--hflip", bool(config.hflip)),
            ("--auto-augment", bool(config.auto_augment)),
            ("--re-prob", config.re_prob > 0),
        )
        if on
    ]
    if augmenting:
        raise UserError(
            f"--cache-teacher-logits needs the same image of a sample every epoch, but "
            f"{', '.join(augmenting)} augment the training images: drop them or the cache"
        )
    if pairs:
        raise UserError(
            "--cache-teacher-logits cannot go with --feature-layers: feature matching runs the "
            "teacher on every batch anyway; drop one of the two"
        )


def distill(config: RunConfig) -> dict[str, Any]:
    """Train a student from a frozen teacher with cyclical KD temperature and weights.

    The teacher is a gctkd run or checkpoint (``--teacher``) or a timm model with a local
    weights file (``--teacher-model``, ``--teacher-weights``); ``--feature-layers`` adds
    feature matching, ``--cache-teacher-logits`` reuses the teacher's logits of each image.
    """
    teachers.check_teacher_options(config)
    config, pairs = _feature_settings(config)
    _check_logit_cache(config, pairs)
    record, build_teacher = (
        teachers.checkpoint_teacher(config) if config.teacher is not None else teachers.timm_teacher(config)
    )
    student_name = config.model or DEFAULT_MODEL["distill"]

    def build_task(bundle: DataBundle) -> DistillTask:
        teacher = build_teacher(bundle)
        student = create_model(student_name, bundle.num_classes, pretrained=config.pretrained)
        meta = _meta(config, "distill", student_name, bundle)
        meta["teacher"] = dict(record)
        cache = None
        if config.cache_teacher_logits:
            _logger.info("--cache-teacher-logits: training images are not augmented")
            cache = TeacherLogitCache(
                TransformedDataset(IndexedTargets(bundle.train), _eval_transform(config, bundle)),
                batch_size=config.batch_size,
                workers=config.workers,
            )
        return DistillTask(
            student, teacher, meta, focal_gammas(config), config.label_smoothing,
            feature_layers=pairs, feature_loss=config.feature_loss,
            teacher_name=record["model_name"], logit_cache=cache,
        )

    return _train("distill", config, build_task)


COMMANDS = {"pretrain": pretrain, "finetune": finetune, "distill": distill}
