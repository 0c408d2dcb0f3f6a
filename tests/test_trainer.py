"""The trainer core: knobs written in place each step, clipping after unscaling, no syncs."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gctkd.engine.trainer as trainer_module
from gctkd.config import focal_gammas, resolve_config
from gctkd.cycle import CycleWindow, run_progress
from gctkd.engine.tensorboard import RunLogger
from gctkd.engine.trainer import Trainer
from gctkd.knobs import KnobSchedule
from gctkd.models import FrozenTeacher
from gctkd.tasks.classification import ClassificationTask
from gctkd.tasks.distill import DistillTask

NUM_CLASSES = 3


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, NUM_CLASSES),
    )


def _loader(count: int = 24, batch_size: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(count, 3, 8, 8, generator=generator)
    targets = torch.arange(count) % NUM_CLASSES
    return DataLoader(TensorDataset(images, targets), batch_size=batch_size)


def _meta() -> dict:
    return {"model_name": "tiny", "num_classes": NUM_CLASSES}


def _trainer(tmp_path, settings: dict, task=None) -> Trainer:
    config = resolve_config("pretrain", {"warmup_epochs": 0, "log_interval": 1, **settings})
    task = task or ClassificationTask(_tiny_model(), _meta(), focal_gammas(config))
    window = CycleWindow(config.cyclical_factor or 1.0)
    schedule = KnobSchedule(window, config.knob_ranges(), task.xi_driven)
    return Trainer(task, schedule, config, _loader(), _loader(), tmp_path, torch.device("cpu"))


def _record_optimizer(trainer: Trainer) -> list[list[dict]]:
    seen = []
    original = trainer.optimizer.step

    def step(*args, **kwargs):
        seen.append([dict(weight_decay=g["weight_decay"], momentum=g["momentum"],
                          size=len(g["params"])) for g in trainer.optimizer.param_groups])
        return original(*args, **kwargs)

    trainer.optimizer.step = step
    return seen


def test_weight_decay_and_momentum_written_into_groups_by_role(tmp_path):
    trainer = _trainer(tmp_path, {"epochs": 2, "weight_decay": "1e-4:1e-3",
                                  "momentum": "0.8:0.95", "cyclical_factor": 2})
    seen = _record_optimizer(trainer)
    trainer.fit()
    total = trainer.total_steps
    assert len(seen) == total == 12
    for step, groups in enumerate(seen):
        expected = trainer.schedule.values(run_progress(step, total))
        # timm's factory: group 0 holds biases and norm weights (no decay), group 1 the rest
        no_decay, decay = groups
        assert (no_decay["size"], decay["size"]) == (4, 2)
        assert no_decay["weight_decay"] == 0.0
        assert decay["weight_decay"] == pytest.approx(expected["weight_decay"], rel=1e-12)
        assert [g["momentum"] for g in groups] == pytest.approx([expected["momentum"]] * 2)
    assert seen[0][1]["weight_decay"] == pytest.approx(1e-4)
    assert seen[-1][1]["weight_decay"] == pytest.approx(1e-4)
    assert max(g[1]["weight_decay"] for g in seen) == pytest.approx(
        1e-4 * (1 / 11) + 1e-3 * (10 / 11)
    )


@pytest.mark.parametrize("mode", ["norm", "value", "agc"])
def test_clip_threshold_follows_the_cycle(tmp_path, monkeypatch, mode):
    calls = []
    real = trainer_module.dispatch_clip_grad

    def recording(parameters, value, mode):
        real(parameters, value, mode=mode)
        grads = [p.grad for p in parameters if p.grad is not None]
        calls.append((value, mode, torch.stack([g.norm() for g in grads]).norm().item(),
                      max(g.abs().max().item() for g in grads)))

    monkeypatch.setattr(trainer_module, "dispatch_clip_grad", recording)
    trainer = _trainer(tmp_path, {"epochs": 1, "clip": "0.01:0.05", "clip_mode": mode})
    trainer.fit()
    assert len(calls) == trainer.total_steps
    for step, (value, used_mode, norm, largest) in enumerate(calls):
        assert used_mode == mode
        assert value == pytest.approx(0.01 + 0.04 * run_progress(step, trainer.total_steps))
        if mode == "norm":
            assert norm <= value * (1 + 1e-4)
        if mode == "value":
            assert largest <= value + 1e-7


def test_no_device_sync_between_logged_steps(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, {"epochs": 1, "log_interval": 1000, "clip": "1:2",
                                  "weight_decay": "1e-4:1e-3"})
    # batches made up front: the DataLoader reads its own CPU seed, which is no device sync
    trainer.train_loader = list(trainer.train_loader)
    reads = []
    for name in ("item", "tolist", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    with RunLogger(tmp_path) as trainer.run_logger:
        trainer._train_epoch()
    # six steps, read twice: the first step and the run's last step are always logged
    assert trainer.global_step == 6
    assert reads == ["tolist", "tolist"]


def test_logged_knobs_and_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _trainer(tmp_path, {"epochs": 2, "weight_decay": "1e-4:1e-3",
                                  "temperature": "0.5:2", "cyclical_factor": 2, "focal": "3:2"})
    trainer.fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"cycle/xi", "train/lr", "train/loss", "knob/weight_decay", "knob/temperature",
            "knob/focal", "val/top1", "val/top5", "val/loss", "val/ece"} <= tags
    decay = [e.value for e in events.Scalars("knob/weight_decay")]
    expected = [trainer.schedule.values(run_progress(s, 12))["weight_decay"] for s in range(12)]
    assert decay == pytest.approx(expected, rel=1e-6)
    assert [e.step for e in events.Scalars("val/top1")] == [6, 12]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "last.pt").is_file()


def test_temperature_only_in_training_loss():
    task = ClassificationTask(_tiny_model(), _meta())
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    targets = torch.tensor([0, 2])
    loss = task.label_loss(logits, targets, {"xi": 0.3, "temperature": 2.0})
    assert loss.item() == pytest.approx(F.cross_entropy(logits / 2.0, targets).item())
    images = torch.randn(2, 3, 8, 8)
    assert torch.equal(task.eval_logits(images), task.model(images))


@pytest.mark.parametrize("xi", [0.0, 0.4, 1.0])
def test_focal_with_zero_gammas_is_cross_entropy(xi):
    task = ClassificationTask(_tiny_model(), _meta(), focal_gammas=(0.0, 0.0), label_smoothing=0.1)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    targets = torch.tensor([1, 2])
    loss = task.label_loss(logits, targets, {"xi": xi})
    assert loss.item() == pytest.approx(
        F.cross_entropy(logits, targets, label_smoothing=0.1).item(), abs=1e-6
    )


def _wide_student() -> nn.Module:
    # widths 4 (teacher) -> 6 (student) need connectors; Sequential children are read by hooks
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, NUM_CLASSES),
    )


@pytest.mark.parametrize(
    "features, settings, parts",
    [
        (None, {"kd_temperature": "1:4"}, {"loss", "label", "kd"}),
        ([(1, 1), (2, 2)], {"feature_weight": "1"},
         {"loss", "label", "kd", "feature/1", "feature/2"}),
    ],
)
def test_frozen_teacher_is_untouched_by_distillation(tmp_path, features, settings, parts):
    teacher_model = _tiny_model()
    teacher_model.train()
    for images, _ in _loader():  # give BatchNorm non-trivial statistics
        teacher_model(images)
    teacher = FrozenTeacher(teacher_model, (0, 0, 0), (1, 1, 1), (0, 0, 0), (1, 1, 1))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    if features is None:
        student = _tiny_model()
        task = DistillTask(student, teacher, _meta())
    else:
        student = _wide_student()
        task = DistillTask(student, teacher, {**_meta(), "image_size": 8},
                           feature_layers=features)
    config = resolve_config("distill", {"warmup_epochs": 0, "epochs": 1, **settings})
    schedule = KnobSchedule(CycleWindow(2.0), config.knob_ranges())
    trainer = Trainer(task, schedule, config, _loader(12), _loader(12), tmp_path,
                      torch.device("cpu"))
    teacher.train()
    trainer.trainable.train()
    student_before = [p.clone() for p in student.parameters()]
    for images, targets in list(_loader(12))[:3]:
        assert set(trainer._train_step(images, targets, schedule.values(0.5))) == parts
    teacher.train(True)
    assert teacher.training is False and teacher.model.training is False
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student.parameters()))


def test_ema_is_evaluated_and_kept_apart(tmp_path):
    trainer = _trainer(tmp_path, {"epochs": 1, "ema_decay": 0.5})
    summary = trainer.fit()
    assert {"val_ema/top1", "val_ema/ece", "val/top1"} <= set(summary["final"])
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    ema_weights = dict(trainer.ema.module.state_dict())
    raw_weights = dict(trainer.task.model.state_dict())
    assert all(torch.equal(state["model"][k], ema_weights[k]) for k in ema_weights)
    assert all(torch.equal(state["raw_model"][k], raw_weights[k]) for k in raw_weights)
    assert not all(torch.equal(ema_weights[k], raw_weights[k]) for k in raw_weights)
