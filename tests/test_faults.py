"""Numerical faults: a NaN stops the run, names the step and its knobs, saves nothing after it."""

import json
import math

import pytest
import torch

from gctkd.engine.checkpoint import load_checkpoint
from gctkd.tasks.classification import ClassificationTask

RUN = [
    "pretrain", "--model", "resnet20", "--image-size", "16", "--batch-size", "5",
    "--epochs", "2", "--workers", "0", "--warmup-epochs", "0", "--weight-decay", "1e-4:1e-3",
    "--checkpoint-every", "2",
]  # fmt: skip




def _poison(monkeypatch, step, kind):
    """Make the loss (or only the gradients) of update ``step`` (1-based) NaN."""
    real = ClassificationTask.training_loss
    calls = []

    def training_loss(self, images, targets, knobs):
        parts = real(self, images, targets, knobs)
        calls.append(1)
        if len(calls) == step:
            if kind == "loss":
                parts["loss"] = parts["loss"] * float("nan")
            else:
                # a finite loss whose backward pass produces NaN gradients
                weights = next(self.model.parameters())
                probe = weights.sum()
                probe.register_hook(lambda grad: grad * float("nan"))
                parts["loss"] = parts["loss"] + 0.0 * probe
        return parts

    monkeypatch.setattr(ClassificationTask, "training_loss", training_loss)


@pytest.mark.parametrize(
    "kind, step, log_interval, saved",
    [
        # last.pt is written at steps 2 (every 2), 3 (epoch end) and 4 (every 2)
        # the check before the save at step 4 finds it: last.pt stays at step 3
        ("loss", 4, "10", 3),
        # the log point of step 4 finds it, before that step's save
        ("gradient", 4, "4", 3),
        # the end of epoch 1 finds it, before evaluation and the epoch's save
        ("loss", 3, "10", 2),
    ],
)
def test_a_nan_stops_the_run_and_keeps_the_last_good_checkpoint(gctkd_main,
    make_image_folder, tmp_path, monkeypatch, kind, step, log_interval, saved
):
    data = make_image_folder(per_class=6)  # 15 training images: 3 steps per epoch
    out = tmp_path / "run"
    _poison(monkeypatch, step, kind)
    code, err = gctkd_main(*RUN, "--data", str(data), "--out", str(out),
                           "--log-interval", log_interval)
    assert code == 3, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"gctkd: stopped: non-finite {kind} at step {step} ")
    assert "weight_decay" in line and "xi" in line and f"(step {saved}) is kept" in line
    assert "--skip-nonfinite" in line and "Traceback" not in err
    state = load_checkpoint(out / "last.pt")
    assert state["global_step"] == saved
    assert all(torch.isfinite(value).all() for value in state["model"].values())
    assert not (out / "summary.json").exists()


def test_a_nan_before_any_checkpoint_says_to_run_again(gctkd_main, make_image_folder,
                                                        tmp_path, monkeypatch):
    data = make_image_folder(per_class=6)
    out = tmp_path / "run"
    _poison(monkeypatch, 1, "loss")
    code, err = gctkd_main(*RUN, "--data", str(data), "--out", str(out))
    assert code == 3, err
    line = err.strip().splitlines()[-1]
    assert "no checkpoint was written yet" in line and "--resume" not in line
    assert line.endswith("or run again with --overwrite --skip-nonfinite to skip such steps")


def test_skip_nonfinite_skips_and_counts(gctkd_main, make_image_folder, tmp_path, monkeypatch):
    data = make_image_folder(per_class=6)
    out = tmp_path / "run"
    _poison(monkeypatch, 3, "loss")
    code, err = gctkd_main(*RUN, "--data", str(data), "--out", str(out),
                           "--log-interval", "1", "--skip-nonfinite")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["steps"] == 6
    state = load_checkpoint(out / "last.pt")
    assert all(torch.isfinite(value).all() for value in state["model"].values())
    assert math.isfinite(summary["final"]["train_loss"])
