"""Two processes on the CPU (gloo) under torchrun: one process's result, no hang, one log."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gctkd.engine.checkpoint import load_checkpoint
from gctkd.engine.distributed import SINGLE

sys.path.insert(0, str(Path(__file__).parent))
import ddp_runs  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without torch.distributed"
)


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    from conftest import write_image_folder

    root = tmp_path_factory.mktemp("ddp")
    data = write_image_folder(root / "data", per_class=6)
    library, cli = root / "library", root / "cli"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(Path(ddp_runs.__file__)), str(library), str(cli), str(data),
    ]  # fmt: skip
    # a hang fails the test instead of the suite
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return library, cli, done.stdout + done.stderr


def test_two_processes_match_one_with_the_same_global_batch(two_processes, tmp_path):
    library, _, _ = two_processes
    single = tmp_path / "single"
    ddp_runs.library_run(single, SINGLE, torch.device("cpu"))
    two, one = load_checkpoint(library / "last.pt"), load_checkpoint(single / "last.pt")
    assert two["global_step"] == one["global_step"] == 12
    assert two["resume"]["world_size"] == 2 and len(two["resume"]["rng"]) == 2
    for key in ("raw_model", "ema"):
        for name, value in one[key].items():
            # BatchNorm statistics over both processes' halves of the batch
            torch.testing.assert_close(two[key][name], value, rtol=1e-4, atol=1e-5, msg=name)

    logged_two, logged_one = _scalars(library), _scalars(single)
    for tag, values in logged_one.items():
        steps_two, values_two = zip(*logged_two[tag])
        steps_one, values_one = zip(*values)
        assert steps_two == steps_one, tag
        if tag.startswith(("knob/", "cycle/", "train/lr")):
            assert values_two == values_one, tag  # a pure function of progress
        else:
            assert values_two == pytest.approx(values_one, rel=1e-4, abs=1e-5), tag
    # validation is split over the ranks and summed: the whole set's metrics
    def records(run_dir):
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    for two_record, one_record in zip(records(library), records(single), strict=True):
        assert two_record["val/top1"] == pytest.approx(one_record["val/top1"])
        assert two_record["val/loss"] == pytest.approx(one_record["val/loss"], rel=1e-4)


def test_the_cli_under_torchrun_writes_one_set_of_logs(two_processes):
    _, cli, output = two_processes
    events = list((cli / "tensorboard").iterdir())
    assert len(events) == 1, events
    assert len((cli / "metrics.jsonl").read_text().splitlines()) == 1
    log = (cli / "train.log").read_text()
    assert log.count("epoch 1/1: train loss") == 1 and log.count("model resnet20") == 1
    # 12 training images, 4 per process and step: one step, the same on both ranks
    state = load_checkpoint(cli / "last.pt")
    assert state["resume"]["world_size"] == 2 and state["global_step"] == 1
    # only rank 0 reports: one line per epoch on the console as well
    assert output.count("epoch 1/1: train loss") == 1
    assert output.count("2 processes (gloo)") == 1


def test_the_ddp_wrapper_holds_the_trained_modules_but_never_the_teacher():
    from torch import nn

    from gctkd.engine.distributed import _TrainingForward
    from gctkd.models import FrozenTeacher
    from gctkd.tasks.distill import DistillTask

    teacher = FrozenTeacher(nn.Linear(4, 3), (0, 0, 0), (1, 1, 1), (0, 0, 0), (1, 1, 1))
    task = DistillTask(nn.Linear(4, 3), teacher, {"model_name": "tiny", "num_classes": 3})
    trainable = nn.ModuleDict(task.trainable_modules())
    wrapped = _TrainingForward(task, trainable)
    held = {id(p) for p in wrapped.parameters()}
    assert held == {id(p) for p in task.model.parameters()}
    assert not held & {id(p) for p in teacher.parameters()}
