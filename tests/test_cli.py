"""The gctkd command: help, version, and user errors as one line with exit code 2."""

import pytest
from click.testing import CliRunner

import gctkd
from gctkd_cli.main import cli


@pytest.mark.parametrize("command", ["pretrain", "finetune", "distill"])
def test_help_lists_the_contract_options(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    for option in ("--data", "--out", "--model", "--epochs", "--config", "--weight-decay",
                   "--temperature", "--clip", "--clip-mode", "--focal", "--cyclical-factor",
                   "--lr", "--batch-size", "--seed", "--per-class"):
        assert option in result.output, option
    assert ("--kd-temperature" in result.output) == (command == "distill")
    assert ("--from" in result.output) == (command == "finetune")
    assert ("--teacher" in result.output) == (command == "distill")


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and gctkd.__version__ in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["pretrain", "--data", "/no/such/folder"], "does not exist"),
        (["pretrain", "--model", "resnet_nope"], "unknown model 'resnet_nope'"),
        (["pretrain", "--weight-decay", "-1:1e-3"], "--weight-decay must be >= 0"),
        (["pretrain", "--temperature", "0"], "--temperature must be > 0"),
        (["pretrain", "--cyclical-factor", "0.5"], "--cyclical-factor must be >= 1"),
        (["pretrain", "--batch-size", "100000"], "--batch-size 100000 is larger than"),
        (["finetune", "--from", "/no/such/run"], "--from '/no/such/run' does not exist"),
        (["distill", "--teacher", "/no/such/run"], "--teacher '/no/such/run' does not exist"),
        (["pretrain", "--clip-mode", "max"], "Invalid value for '--clip-mode'"),
        (["pretrain", "--epochs", "x"], "Invalid value for '--epochs'"),
        (["pretrain", "--config", "missing.yaml"], "missing.yaml' does not exist"),
        (["pretrain", "--lr", "nan"], "--lr must be a number > 0, got nan"),
        (["pretrain", "--warmup-epochs", "-1"], "--warmup-epochs must be >= 0"),
        (["pretrain", "--config", ""], "--config is empty"),
        (["pretrain", "--model", ""], "--model is empty"),
        (["pretrain", "--opt", "sgdd"], "unknown optimizer 'sgdd' (did you mean 'sgd'"),
        (["pretrain", "--sched", "cosinus"], "--sched cosinus: timm says 'Unknown scheduler"),
        (["pretrain", "--pretrained", "--model", "resnet20"],
         "'resnet20' is one of gctkd's CIFAR networks, which have no pretrained weights"),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, gctkd_main, args, message):
    result = gctkd_main(*args, "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gctkd: error: ") and message in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_existing_run_folder_is_kept(tmp_path, gctkd_main):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = gctkd_main("pretrain", "--out", str(out), "--epochs", "1")
    assert result.returncode == 2
    assert "exists and is not empty" in result.stderr and "--overwrite" in result.stderr
    assert (out / "notes.txt").read_text() == "mine"
    result = gctkd_main("pretrain", "--out", str(out), "--epochs", "1", "--overwrite")
    assert result.returncode == 2 and "not a gctkd run's" in result.stderr
    assert (out / "notes.txt").read_text() == "mine"


def test_unknown_yaml_key_names_the_nearest(tmp_path, gctkd_main):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: 1\nwieght_decay: 1e-4\n")
    result = gctkd_main("pretrain", "--config", str(recipe), "--out", str(tmp_path / "r"))
    assert result.returncode == 2
    assert "unknown setting 'wieght_decay' (did you mean 'weight_decay'" in result.stderr


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_keeps_the_old_run_until_the_new_one_succeeds(tmp_path, gctkd_main, monkeypatch):
    out = tmp_path / "run"
    tiny = ["--epochs", "1", "--image-size", "8", "--batch-size", "128", "--workers", "0"]
    assert gctkd_main("pretrain", "--out", str(out), "--model", "resnet20", *tiny).returncode == 0
    before = _tree(out)
    assert "last.pt" in before
    broken = tmp_path / "broken"
    for name in ("a", "b"):
        (broken / name).mkdir(parents=True)
        for index in range(80):
            (broken / name / f"{index:02d}.jpg").write_bytes(b"not a jpeg")
    result = gctkd_main("pretrain", "--out", str(out), "--data", str(broken), "--overwrite",
                        "--model", "resnet20", *tiny)
    assert result.returncode == 2 and "cannot decode image" in result.stderr
    assert _tree(out) == before
    assert not any(p.name.startswith(".run.replaced") for p in tmp_path.iterdir())


def test_overwrite_refuses_a_folder_that_only_looks_like_a_run(tmp_path, gctkd_main):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "config.yaml").write_text("mine: 1\n")
    (project / "src" / "train.py").write_text("print('mine')\n")
    before = _tree(project)
    result = gctkd_main("pretrain", "--out", str(project), "--overwrite", "--epochs", "1")
    assert result.returncode == 2 and "not a gctkd run's" in result.stderr
    assert _tree(project) == before


def test_bare_command_prints_help_and_succeeds(monkeypatch, capsys):
    from gctkd_cli.main import main

    monkeypatch.setattr("sys.argv", ["gctkd"])
    with pytest.raises(SystemExit) as stopped:
        main()
    captured = capsys.readouterr()
    assert stopped.value.code == 0 and captured.err == ""
    assert captured.out.startswith("Usage: gctkd [OPTIONS] COMMAND [ARGS]...")
    assert all(name in captured.out for name in ("pretrain", "finetune", "distill"))


@pytest.mark.parametrize("option, extra, kind, expected", [
    ("--from", [], "checkpoint", "the best.pt or last.pt of a gctkd run"),
    ("--teacher", [], "checkpoint", "the best.pt or last.pt of a gctkd run"),
    ("--teacher-weights", ["--teacher-model", "resnet20"], "weights file",
     "a .safetensors file or a .pt file of a state_dict()"),
])
def test_a_text_file_is_not_a_checkpoint(tmp_path, gctkd_main, option, extra, kind, expected):
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    command = "finetune" if option == "--from" else "distill"
    result = gctkd_main(command, option, str(text), *extra, "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"gctkd: error: {option} '{text}' is not a readable {kind} (neither a torch archive "
        f"nor a pickle): pass {expected}"
    )


@pytest.mark.parametrize("option", ["--from", "--teacher", "--data"])
def test_a_run_never_replaces_the_folder_it_reads(tmp_path, gctkd_main, make_image_folder,
                                                  option):
    run = tmp_path / "run"
    tiny = ["--epochs", "1", "--image-size", "8", "--batch-size", "8", "--workers", "0"]
    data = make_image_folder(per_class=8)
    assert gctkd_main("pretrain", "--out", str(run), "--model", "resnet20", "--data", str(data),
                      *tiny).returncode == 0
    if option == "--data":  # the data inside the run folder it would replace
        inner = run / "tensorboard" / "data"
        data.rename(inner)
        data = inner
    before = _tree(run)
    command = {"--from": "finetune", "--teacher": "distill", "--data": "pretrain"}[option]
    source = {"--from": run, "--teacher": run / "best.pt", "--data": data}[option]
    args = [command, "--data", str(data), "--out", str(run), "--overwrite", *tiny]
    if option != "--data":
        args += [option, str(source)]
    result = gctkd_main(*args)
    assert result.returncode == 2, result.stderr
    assert f"--out '{run}' holds {option} '{source}', which this run reads" in result.stderr
    assert _tree(run) == before


def test_ctrl_c_is_one_line_exit_130(tmp_path, gctkd_main, monkeypatch):
    from gctkd.tasks import runner

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setitem(runner.COMMANDS, "pretrain", interrupted)
    result = gctkd_main("pretrain", "--out", str(tmp_path / "run"))
    assert result.returncode == 130
    assert result.stderr.strip().splitlines() == [
        "gctkd: interrupted (Ctrl-C); a run continues from its last saved checkpoint with "
        "--resume RUN"
    ]


@pytest.mark.parametrize("option, hint", [
    ("--from", "plain weights can serve as a teacher: gctkd distill --teacher-model NAME"),
    ("--teacher", "pass --teacher-model NAME --teacher-weights FILE instead"),
])
def test_plain_weights_are_not_a_checkpoint_and_the_error_says_what_to_do(
    tmp_path, gctkd_main, option, hint
):
    import torch

    weights = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, weights)
    command = "finetune" if option == "--from" else "distill"
    result = gctkd_main(command, option, str(weights), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert f"{option} '{weights}' is not a gctkd checkpoint" in result.stderr
    assert hint in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_run_repeats_from_its_config_yaml_and_never_replaces_it(tmp_path, gctkd_main):
    first = tmp_path / "first"
    tiny = ["--epochs", "1", "--image-size", "8", "--batch-size", "128", "--workers", "0",
            "--model", "resnet20", "--weight-decay", "1e-4:1e-3"]
    assert gctkd_main("pretrain", "--out", str(first), *tiny, "--overwrite").returncode == 0
    before = _tree(first)
    record = str(first / "config.yaml")
    # without --out the record names its own folder: refused, even though it says overwrite
    result = gctkd_main("pretrain", "--config", record)
    assert result.returncode == 2 and "exists and is not empty" in result.stderr
    assert _tree(first) == before
    again = tmp_path / "again"
    assert gctkd_main("pretrain", "--config", record, "--out", str(again)).returncode == 0
    import yaml

    settings = yaml.safe_load((again / "config.yaml").read_text())
    recorded = yaml.safe_load((first / "config.yaml").read_text())
    assert {**recorded, "out": str(again), "overwrite": False} == settings
    # same seed and settings on the CPU: the same weights
    from gctkd.engine.checkpoint import load_checkpoint

    weights = [load_checkpoint(run / "last.pt")["model"] for run in (first, again)]
    assert weights[0].keys() == weights[1].keys()
    assert all(weights[0][name].equal(weights[1][name]) for name in weights[0])
