"""Every user error: one clear line, exit code 2, no traceback, nothing on disk changed.

Each case builds its inputs in ``tmp_path`` (a data folder, checkpoints, a recipe, an old
run); the whole tree is hashed before and after the command, so a case that writes, moves
or deletes anything fails, as does one that leaves a run folder behind.
"""

import hashlib
import os
import sys
from pathlib import Path

import pytest

from gctkd.engine.checkpoint import save_checkpoint
from gctkd.models import create_model
from gctkd_cli.main import main

FAST = ["--model", "resnet20", "--image-size", "16", "--epochs", "1", "--batch-size", "5",
        "--workers", "0", "--warmup-epochs", "0"]  # fmt: skip


def _checkpoint(
    path: Path, model_name: str, num_classes: int, weights_of: str | None = None
) -> Path:
    """A gctkd checkpoint recording ``model_name`` (its weights may be another network's)."""
    model = create_model(weights_of or model_name, num_classes)
    save_checkpoint(
        {"command": "pretrain", "model_name": model_name, "num_classes": num_classes,
         "class_names": [str(c) for c in range(num_classes)], "image_size": 16,
         "mean": [0.5] * 3, "std": [0.25] * 3, "model": model.state_dict()},
        path,
    )  # fmt: skip
    return path


def _setup(tmp: Path, case: str) -> list[str]:
    """The command line of a case, after writing what it needs under ``tmp``."""
    from conftest import write_image_folder

    data = write_image_folder(tmp / "data", per_class=6)  # 15 training images, 3 validation
    out = ["--batch-size", "5", "--out", str(tmp / "run")]
    if case == "missing data folder":
        return ["pretrain", "--data", str(tmp / "nowhere"), *out]
    if case == "empty data folder":
        (tmp / "empty").mkdir()
        return ["pretrain", "--data", str(tmp / "empty"), *out]
    if case == "class folder without images":
        (data / "owl").mkdir()
        (data / "owl" / "notes.txt").write_text("no images here")
        return ["pretrain", "--data", str(data), *out]
    if case == "corrupt image (--bad-images fail)":
        (data / "cat" / "img_00.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
        return ["pretrain", "--data", str(data), *FAST, *out]
    if case == "non-image file named .jpg":
        (data / "dog" / "readme.jpg").write_text("this is text")
        return ["pretrain", "--data", str(data), *FAST, "--bad-images", "fail", *out]
    if case == "unknown model name":
        return ["pretrain", "--data", str(data), "--model", "resnet_nope", *out]
    if case == "--from not a checkpoint":
        (tmp / "notes.pt").write_text("not a checkpoint")
        return ["finetune", "--from", str(tmp / "notes.pt"), "--data", str(data), *out]
    if case == "--teacher not a checkpoint":
        (tmp / "teacher.pt").write_bytes(bytes(256))
        return ["distill", "--teacher", str(tmp / "teacher.pt"), "--data", str(data), *out]
    if case == "--teacher with another class count":
        teacher = _checkpoint(tmp / "teacher.pt", "resnet20", 5)
        return ["distill", "--teacher", str(teacher), "--data", str(data), *FAST, *out]
    if case == "--from with another architecture":
        source = _checkpoint(tmp / "source.pt", "resnet20", 3)
        return ["finetune", "--from", str(source), "--model", "resnet56", "--data", str(data),
                *out]
    if case == "--from whose weights do not fit":
        source = _checkpoint(tmp / "source.pt", "resnet20", 3, weights_of="resnet8x4")
        return ["finetune", "--from", str(source), "--data", str(data), *out]
    if case == "negative weight decay":
        return ["pretrain", "--weight-decay", "-1e-4:1e-3", *out]
    if case == "temperature <= 0":
        return ["pretrain", "--temperature", "0:2", *out]
    if case == "KD temperature <= 0":
        return ["distill", "--teacher", str(tmp / "t.pt"), "--kd-temperature", "1:-4", *out]
    if case == "batch size larger than the data":
        return ["pretrain", "--data", str(data), *out, "--batch-size", "1000"]
    if case == "f_c < 1":
        return ["pretrain", "--cyclical-factor", "0.5", *out]
    if case == "negative --checkpoint-every":
        return ["pretrain", "--checkpoint-every", "-1", *out]
    if case == "non-empty --out without --resume or --overwrite":
        (tmp / "run").mkdir()
        (tmp / "run" / "notes.txt").write_text("mine")
        return ["pretrain", "--data", str(data), *out]
    if case == "--overwrite of a folder that is no gctkd run":
        (tmp / "run").mkdir()
        (tmp / "run" / "notes.txt").write_text("mine")
        return ["pretrain", "--data", str(data), "--overwrite", *out]
    if case == "unwritable --out (under a file)":
        (tmp / "somefile").write_text("a file, not a folder")
        return ["pretrain", "--data", str(data), *out, "--out", str(tmp / "somefile" / "sub")]
    if case == "unknown YAML key":
        (tmp / "recipe.yaml").write_text("epochs: 1\nwieght_decay: 1e-4\n")
        return ["pretrain", "--config", str(tmp / "recipe.yaml"), *out]
    if case == "--resume of a missing run":
        return ["pretrain", "--resume", str(tmp / "no-run")]
    if case == "--resume of a run without last.pt":
        (tmp / "young").mkdir()
        (tmp / "young" / "config.yaml").write_text("command: pretrain\nepochs: 2\n")
        return ["pretrain", "--resume", str(tmp / "young")]
    raise AssertionError(case)


CASES = [
    ("missing data folder", "data folder '{tmp}/nowhere' does not exist"),
    ("empty data folder", "data folder '{tmp}/empty' is empty"),
    ("class folder without images", "class folder '{tmp}/data/owl' has no images"),
    ("corrupt image (--bad-images fail)", "cannot decode image '{tmp}/data/cat/img_00.jpg'"),
    ("non-image file named .jpg", "cannot decode image '{tmp}/data/dog/readme.jpg'"),
    ("unknown model name", "unknown model 'resnet_nope'"),
    ("--from not a checkpoint", "--from '{tmp}/notes.pt' is not a readable checkpoint"),
    ("--teacher not a checkpoint", "--teacher '{tmp}/teacher.pt' is not a readable checkpoint"),
    ("--teacher with another class count", "predicts 5 classes but the data has 3"),
    ("--from with another architecture", "holds a 'resnet20', not a 'resnet56'"),
    ("--from whose weights do not fit", "does not fit the model"),
    ("negative weight decay", "--weight-decay must be >= 0, got -0.0001"),
    ("temperature <= 0", "--temperature must be > 0, got 0"),
    ("KD temperature <= 0", "--kd-temperature must be > 0, got -4"),
    ("batch size larger than the data", "--batch-size 1000 is larger than the 15 training images"),
    ("f_c < 1", "--cyclical-factor must be >= 1, got 0.5"),
    ("negative --checkpoint-every", "--checkpoint-every must be >= 0"),
    ("non-empty --out without --resume or --overwrite", "exists and is not empty"),
    ("--overwrite of a folder that is no gctkd run", "holds files that are not a gctkd run's"),
    ("unwritable --out (under a file)", "cannot be written (Not a directory)"),
    ("unknown YAML key", "unknown setting 'wieght_decay' (did you mean 'weight_decay'"),
    ("--resume of a missing run", "--resume '{tmp}/no-run' is not a folder"),
    ("--resume of a run without last.pt", "holds no last.pt"),
]

# these start training before the bad file is met, so progress lines may come first
STARTS_TRAINING = {"corrupt image (--bad-images fail)", "non-image file named .jpg"}


def _tree(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with a hash of its bytes."""
    entries = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        entries[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return entries


@pytest.mark.parametrize("case, message", CASES, ids=[case for case, _ in CASES])
def test_bad_input_gives_one_line_exit_2_and_changes_nothing(
    tmp_path, monkeypatch, capsys, case, message
):
    monkeypatch.chdir(tmp_path)
    args = _setup(tmp_path, case)
    before = _tree(tmp_path)
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["gctkd", *args])
    with pytest.raises(SystemExit) as stopped:
        main()
    err = capsys.readouterr().err
    assert stopped.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "gctkd: error: " in line]
    assert len(errors) == 1 and lines[-1].endswith(errors[0].split("gctkd: error: ")[-1]), err
    if case not in STARTS_TRAINING:
        assert len(lines) == 1, err
    assert errors[0].split("gctkd: error: ")[-1].find(message.format(tmp=tmp_path)) >= 0, err
    assert _tree(tmp_path) == before


def test_corrupt_image_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    from conftest import write_image_folder

    data = write_image_folder(tmp_path / "data", per_class=6)
    bad = data / "cat" / "img_00.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    monkeypatch.setattr(sys, "argv", ["gctkd", "pretrain", "--data", str(data), *FAST,
                                      "--bad-images", "skip", "--out", str(tmp_path / "run")])
    main()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"skipping image '{bad}'" in warning for warning in warnings), warnings
    assert (tmp_path / "run" / "last.pt").is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_folder(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        monkeypatch.setattr(sys, "argv", ["gctkd", "pretrain", "--out", str(locked / "run")])
        with pytest.raises(SystemExit) as stopped:
            main()
        assert stopped.value.code == 2
        assert "cannot be written" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)

