"""Kill and resume: the resumed run ends bit-identical to an uninterrupted one.

A crash (what SIGKILL does: the process is gone, whatever it did after its last checkpoint
is lost) is simulated by an exception out of the step; SIGTERM is a real signal sent to
this process. Both resume from ``last.pt`` and must reproduce the uninterrupted run's
weights, EMA, optimizer state, checkpoints, metrics and logged values step for step.
"""

import json
import os
import signal
import sys

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gctkd.engine.trainer as trainer_module
from gctkd.engine.checkpoint import load_checkpoint
from gctkd_cli.main import main

# 3 classes x 10 images, 2 per class for validation: 24 training images, 3 steps per
# epoch; log points at steps 1, 3, 6 and last.pt every 2 steps, so the checkpoint at step 4
# (mid-way through epoch 2) carries loss sums that are not yet logged
RUN = [
    "pretrain", "--model", "resnet20", "--image-size", "16", "--batch-size", "8",
    "--epochs", "2", "--workers", "0", "--val-per-class", "2", "--log-interval", "3",
    "--checkpoint-every", "2", "--warmup-epochs", "1", "--weight-decay", "1e-4:1e-3",
    "--temperature", "0.5:2", "--clip", "1:4", "--focal", "3:2", "--momentum", "0.8:0.95",
    "--ema-decay", "0.9", "--hflip", "0.5",
]  # fmt: skip


class _Killed(BaseException):
    """What the test raises instead of SIGKILL: nothing in gctkd catches it."""


def _run(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["gctkd", *args])
    try:
        main()
    except SystemExit as stopped:
        return stopped.code or 0
    return 0


def _stop_during_step(monkeypatch, step, how):
    """Make update number ``step`` (1-based) crash, or send SIGTERM while it runs."""
    real = trainer_module.Trainer._train_step

    def train_step(self, *args, **kwargs):
        if self.global_step + 1 == step:
            if how == "crash":
                raise _Killed()
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.Trainer, "_train_step", train_step)


def _scalars(run_dir):
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def _assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _assert_same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


def _epoch_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from conftest import write_image_folder

    return write_image_folder(tmp_path_factory.mktemp("resume") / "data", per_class=10)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert _run(monkeypatch, *RUN, "--data", str(data_dir), "--out", str(out)) == 0
    return out


@pytest.mark.parametrize("how, stop_step, saved_step", [("crash", 6, 4), ("sigterm", 5, 5)])
def test_stopped_and_resumed_run_is_bit_identical(
    data_dir, reference, tmp_path, monkeypatch, capsys, how, stop_step, saved_step
):
    out = tmp_path / "run"
    args = [*RUN, "--data", str(data_dir), "--out", str(out)]
    with monkeypatch.context() as patched:
        _stop_during_step(patched, stop_step, how)
        if how == "crash":
            patched.setattr(sys, "argv", ["gctkd", *args])
            with pytest.raises(_Killed):
                main()
        else:
            assert _run(patched, *args) == 143
            message = capsys.readouterr().err.strip().splitlines()[-1]
            assert message.startswith(f"gctkd: stopped: SIGTERM: stopped at step {saved_step} ")
            assert f"--resume {out}" in message
    # SIGTERM is back to what it was once the run is over
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    state = load_checkpoint(out / "last.pt")
    assert state["global_step"] == saved_step
    assert state["resume"]["epoch_step"] == saved_step - 3  # mid-way through epoch 2

    # settings come from the run's config.yaml; the safe ones may change
    assert _run(monkeypatch, "pretrain", "--resume", str(out), "--log-interval", "3") == 0

    for name in ("last.pt", "best.pt"):
        resumed, uninterrupted = load_checkpoint(out / name), load_checkpoint(reference / name)
        for key in ("model", "raw_model", "ema", "optimizer", "scaler", "epoch", "global_step",
                    "best_top1", "cycle"):
            _assert_same_tensors(resumed.get(key), uninterrupted.get(key), f"{name}:{key}")
    final = load_checkpoint(out / "last.pt")
    assert not torch.equal(final["raw_model"]["fc.weight"], final["ema"]["fc.weight"])

    logged, expected = _scalars(out), _scalars(reference)
    assert set(logged) == set(expected)
    for tag in expected:
        # every step once, with the same value: the interrupted process's extra events
        # after its checkpoint are purged
        assert logged[tag] == expected[tag], tag
    assert [step for step, _ in expected["knob/weight_decay"]] == [1, 3, 6]
    assert _epoch_records(out) == _epoch_records(reference)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == saved_step and summary["steps"] == 6


def test_resume_refuses_changed_settings_and_accepts_safe_ones(data_dir, reference, tmp_path,
                                                               monkeypatch, capsys):
    config = yaml.safe_load((reference / "config.yaml").read_text())
    assert config["checkpoint_every"] == 2 and config["resume"] is None
    before = (reference / "last.pt").read_bytes()
    for extra, message in (
        (["--epochs", "5"], "--epochs 5 differs from the run's 2"),
        (["--weight-decay", "1e-4:2e-3"], "--weight-decay 1e-4:2e-3 differs from the run's"),
        (["--overwrite"], "--resume and --overwrite exclude each other"),
        (["--out", str(tmp_path / "elsewhere")], "differs from --resume"),
    ):
        assert _run(monkeypatch, "pretrain", "--resume", str(reference), *extra) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
    # the same value written another way is no change: the check passes, and a finished
    # run has nothing left to resume
    assert _run(monkeypatch, "pretrain", "--resume", str(reference), "--weight-decay",
                "0.0001:0.001", "--workers", "1") == 2
    assert "has finished its 2 epochs" in capsys.readouterr().err
    assert _run(monkeypatch, "distill", "--resume", str(reference)) == 2
    assert "is a 'pretrain' run" in capsys.readouterr().err
    assert (reference / "last.pt").read_bytes() == before
