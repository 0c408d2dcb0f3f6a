"""Checkpoints: atomic saves that survive a crash, the K newest kept, loads that run no code."""

import errno
import os
import pickle

import pytest
import torch
import yaml

from gctkd.engine.checkpoint import (
    capture_rng_states,
    load_checkpoint,
    prune_step_checkpoints,
    save_checkpoint,
    save_last,
    step_checkpoint_path,
)
from gctkd.errors import UserError

RUN = [
    "pretrain", "--model", "resnet20", "--image-size", "16", "--batch-size", "5",
    "--epochs", "1", "--workers", "0", "--warmup-epochs", "0",
]  # fmt: skip




def _partial_save(obj, stream, *args, **kwargs):
    """torch.save that dies halfway: some bytes are out, then the disk is full."""
    stream.write(b"PK\x03\x04 half a checkpoint")
    raise OSError(errno.ENOSPC, "No space left on device")


def _interrupted_save(obj, stream, *args, **kwargs):
    stream.write(b"PK\x03\x04 half a checkpoint")
    raise KeyboardInterrupt


@pytest.mark.parametrize("broken, raised", [(_partial_save, UserError),
                                            (_interrupted_save, KeyboardInterrupt)])
def test_a_save_failing_halfway_keeps_the_old_checkpoint(tmp_path, monkeypatch, broken, raised):
    path = tmp_path / "last.pt"
    save_checkpoint({"global_step": 1, "weights": torch.ones(3)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(raised) as failure:
        save_checkpoint({"global_step": 2, "weights": torch.zeros(3)}, path)
    if raised is UserError:
        message = str(failure.value)
        assert "No space left on device" in message and "previous one is kept" in message
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["global_step"] == 1
    # no partial file anywhere: not at the final path, no temporary left
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_keep_last_keeps_the_newest_and_last_is_the_newest(tmp_path):
    for step in range(1, 6):
        save_last({"global_step": step, "weights": torch.full((2,), float(step))}, tmp_path, 2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-00000004.pt", "step-00000005.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["global_step"] == 5
    assert os.path.samefile(tmp_path / "last.pt", step_checkpoint_path(tmp_path, 5))
    assert prune_step_checkpoints(tmp_path, 1) == [step_checkpoint_path(tmp_path, 4)]
    # without --keep-last only last.pt is written
    save_last({"global_step": 6}, tmp_path / "checkpoints", 0)
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


def test_rng_states_are_plain_data(tmp_path):
    save_checkpoint({"rng": capture_rng_states()}, tmp_path / "rng.pt")
    assert set(load_checkpoint(tmp_path / "rng.pt")["rng"]) == {"python", "numpy", "torch", "cuda"}


def _plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def test_run_keeps_k_step_checkpoints_and_a_failed_save_stops_cleanly(gctkd_main,
    make_image_folder, tmp_path, monkeypatch
):
    data = make_image_folder(per_class=6)  # 15 training images: 3 steps of 5
    out = tmp_path / "run"
    code, _ = gctkd_main(*RUN, "--data", str(data), "--out", str(out),
                         "--checkpoint-every", "1", "--keep-last", "2")
    assert code == 0
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-00000002.pt", "step-00000003.pt"]
    state = load_checkpoint(out / "last.pt")
    assert state["global_step"] == 3 and state["resume"]["epoch_step"] == 0
    # the settings inside a checkpoint are plain data, as in config.yaml
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert _plain(state["config"]) and state["config"] == {
        key: value for key, value in recorded.items() if key != "command"
    }

    # a save that fails halfway in a run: one clear line, the previous last.pt loadable
    real_save, calls = torch.save, []

    def save_twice_then_fail(obj, stream, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            return _partial_save(obj, stream)
        return real_save(obj, stream, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_twice_then_fail)
    failed = tmp_path / "failed"
    code, err = gctkd_main(*RUN, "--data", str(data), "--out", str(failed),
                           "--checkpoint-every", "1")
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("gctkd: error: cannot write checkpoint")
    assert "Traceback" not in err
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(failed / "last.pt")["global_step"] == 2
    assert not [p for p in failed.iterdir() if p.name.endswith(".tmp")]


class _RunsACommand:
    """Unpickling this runs a shell command: what a malicious checkpoint would hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize("option", ["--resume", "--from", "--teacher"])
def test_a_crafted_pickle_is_refused_and_its_command_never_runs(gctkd_main,
    tmp_path, option, writer
):
    marker = tmp_path / "command-ran"
    payload = {"format": "gctkd-checkpoint", "version": 1, "model": _RunsACommand(marker)}
    folder = tmp_path / "evil"
    folder.mkdir()
    path = folder / "last.pt"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as stream:
            pickle.dump(payload, stream)
    # the payload is live: plain pickle would run it
    assert not marker.exists()
    command = {"--resume": "pretrain", "--from": "finetune", "--teacher": "distill"}[option]
    if option == "--resume":
        (folder / "config.yaml").write_text("command: pretrain\nepochs: 2\n")
        args = [command, "--resume", str(folder)]
    else:
        args = [command, option, str(path), "--out", str(tmp_path / "run")]
    code, err = gctkd_main(*args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"gctkd: error: {option} '{path}' was refused: it is not made of "
                               "tensors and plain data only")
    assert "never runs code" in lines[0] and "weights_only" not in lines[0]
    assert not marker.exists()
    assert not (tmp_path / "run").exists()
