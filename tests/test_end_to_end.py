"""pretrain -> finetune -> distill from the CLI on real CIFAR-10 JPEGs from ../shared."""

import os
import sys

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gctkd_cli.main import main

COMMON = ["--image-size", "16", "--batch-size", "32", "--epochs", "2", "--workers", "0",
          "--log-interval", "1", "--val-fraction", "0.2", "--warmup-epochs", "0"]
KNOBS = ["--weight-decay", "1e-4:1e-3", "--temperature", "0.5:2", "--clip", "4:10",
         "--clip-mode", "value", "--focal", "3:2"]


def _run(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["gctkd", *args])
    try:
        main()
    except SystemExit as stopped:
        assert stopped.code in (0, None), f"gctkd {' '.join(args)} exited {stopped.code}"


def _scalars(run_dir):
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _assert_run_folder(run_dir):
    for name in ("config.yaml", "best.pt", "last.pt", "metrics.jsonl", "summary.json",
                 "train.log"):
        assert (run_dir / name).is_file(), name
    for name in ("best.pt", "last.pt"):
        state = torch.load(run_dir / name, weights_only=True)
        assert state["format"] == "gctkd-checkpoint"
    return yaml.safe_load((run_dir / "config.yaml").read_text())


@pytest.fixture
def five_classes(cifar_dir, tmp_path):
    target = tmp_path / "five"
    target.mkdir()
    for name in sorted(p.name for p in cifar_dir.iterdir() if p.is_dir())[:5]:
        os.symlink(cifar_dir / name, target / name)
    return target


def test_pretrain_finetune_distill(cifar_dir, five_classes, tmp_path, monkeypatch):
    teacher, tuned, student = tmp_path / "teacher", tmp_path / "tuned", tmp_path / "student"

    _run(monkeypatch, "pretrain", "--data", str(cifar_dir), "--out", str(teacher),
         "--model", "resnet20", *COMMON, *KNOBS)
    config = _assert_run_folder(teacher)
    assert config["command"] == "pretrain" and config["weight_decay"] == "0.0001:0.001"
    logged = _scalars(teacher)
    for tag in ("cycle/xi", "train/lr", "train/loss", "knob/weight_decay", "knob/temperature",
                "knob/clip", "knob/focal", "val/top1", "val/top5", "val/loss", "val/ece"):
        assert tag in logged, tag
    steps = len(logged["cycle/xi"])
    assert steps == 2 * (240 // 32)
    # f_c = 1: easy to hard
    assert logged["cycle/xi"][0] == 1.0 and logged["cycle/xi"][-1] == 0.0
    assert logged["knob/weight_decay"][0] == pytest.approx(1e-4)
    assert logged["knob/weight_decay"][-1] == pytest.approx(1e-3)
    assert logged["knob/clip"][-1] == pytest.approx(10.0)
    last = torch.load(teacher / "last.pt", weights_only=True)
    assert last["cycle"]["xi"] == 0.0 and last["num_classes"] == 10

    # fine-tuning continues the recorded cycle back to easy, with a new 5-class head
    _run(monkeypatch, "finetune", "--from", str(teacher), "--data", str(five_classes),
         "--out", str(tuned), *COMMON, "--clip", "5:10")
    tuned_config = _assert_run_folder(tuned)
    # the knobs the teacher used carry over unless set again (--clip here)
    assert (tuned_config["weight_decay"], tuned_config["temperature"]) == ("0.0001:0.001", "0.5:2")
    assert (tuned_config["focal"], tuned_config["clip"]) == ("3:2", "5:10")
    logged = _scalars(tuned)
    assert logged["knob/clip"][-1] == pytest.approx(5.0)
    assert logged["cycle/xi"][0] == pytest.approx(0.0) and logged["cycle/xi"][-1] == 1.0
    assert logged["knob/weight_decay"][0] == pytest.approx(1e-3)
    assert logged["knob/weight_decay"][-1] == pytest.approx(1e-4)
    tuned_state = torch.load(tuned / "best.pt", weights_only=True)
    assert tuned_state["num_classes"] == 5 and tuned_state["model"]["fc.weight"].shape[0] == 5

    # distillation runs its own cycle, f_c = 2: easy -> hard -> easy
    _run(monkeypatch, "distill", "--teacher", str(teacher), "--data", str(cifar_dir),
         "--out", str(student), "--model", "resnet20", "--kd-temperature", "1:4", *COMMON, *KNOBS)
    _assert_run_folder(student)
    logged = _scalars(student)
    for tag in ("knob/kd_temperature", "knob/kd_weight", "knob/label_weight", "loss/kd",
                "loss/label", "val/agreement"):
        assert tag in logged, tag
    decay = logged["knob/weight_decay"]
    assert decay[0] == pytest.approx(1e-4) and decay[-1] == pytest.approx(1e-4)
    assert max(decay) == pytest.approx(1e-3, rel=0.1)
    middle = decay.index(max(decay))
    assert 0 < middle < len(decay) - 1
    assert logged["knob/kd_temperature"][middle] == pytest.approx(4.0, rel=0.1)
