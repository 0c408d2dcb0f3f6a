"""Settings: defaults < YAML < command line, and clear errors for bad keys and values."""

import pytest

from gctkd.config import load_yaml, resolve_config
from gctkd.errors import UserError
from gctkd.knobs import KnobRange


def test_command_line_wins_over_yaml_over_defaults():
    config = resolve_config(
        "pretrain",
        {"epochs": 7, "weight_decay": "1e-4:1e-3", "lr": 0.2},
        {"epochs": 3},
    )
    assert config.epochs == 3
    assert config.lr == 0.2
    assert config.weight_decay == KnobRange(1e-4, 1e-3)
    assert config.batch_size == 64
    assert config.temperature == KnobRange(1.0, 1.0)


def test_knobs_of_other_commands_stay_unset():
    assert "kd_temperature" not in resolve_config("pretrain").knob_ranges()
    assert resolve_config("distill").knob_ranges()["kd_temperature"] == KnobRange(4.0, 4.0)
    assert "clip" not in resolve_config("distill").knob_ranges()


def test_yaml_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("epochs: 4\nweight-decay: [1.0e-4, 1.0e-3]\nclip: '4:10'\nclip_mode: value\n")
    config = resolve_config("pretrain", load_yaml(path))
    assert (config.epochs, config.clip_mode) == (4, "value")
    assert config.clip == KnobRange(4.0, 10.0)
    assert config.weight_decay == KnobRange(1e-4, 1e-3)
    assert config.to_dict()["clip"] == "4:10"


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"wieght_decay": 1e-4}, "unknown setting 'wieght_decay' (did you mean 'weight_decay'"),
        ({"kd_temperature": 2}, "'kd_temperature' is not a setting of 'gctkd pretrain'"),
        ({"epochs": 0}, "--epochs must be >= 1, got 0"),
        ({"epochs": "many"}, "setting 'epochs' must be int"),
        ({"cyclical_factor": 0.5}, "--cyclical-factor must be >= 1, got 0.5"),
        ({"clip_mode": "max"}, "must be one of norm, value, agc"),
        ({"focal": "3"}, "--focal takes G_HC:G_FL"),
        ({"focal": "3:-1"}, "--focal takes G_HC:G_FL"),
        ({"cycle_window": "0.8:0.2"}, "--cycle-window needs 0 <= START <= END <= 1"),
        ({"weight_decay": "-1"}, "--weight-decay must be >= 0"),
        ({"lr": 0}, "--lr must be a number > 0"),
        ({"lr": float("nan")}, "--lr must be a number > 0, got nan"),
        ({"min_lr": float("inf")}, "--min-lr must be a number >= 0, got inf"),
        ({"warmup_epochs": -1}, "--warmup-epochs must be >= 0"),
        ({"hflip": 1.5}, "--hflip must be in [0, 1]"),
        ({"out": ""}, "--out is empty: pass a path"),
        ({"data": "  "}, "--data is empty"),
        ({"model": ""}, "--model is empty: pass a value, or leave it out"),
        ({"epochs": None}, "setting 'epochs' needs a value, got null"),
        ({"seed": None}, "setting 'seed' needs a value, got null"),
        ({"epochs": True}, "setting 'epochs' must be int, got True"),
        ({"lr": False}, "setting 'lr' must be float, got False"),
        ({"out": ["a"]}, "setting 'out' must be str, got ['a']"),
        ({"cyclical_factor": float("nan")}, "--cyclical-factor must be >= 1, got nan"),
        ({"cyclical_factor": float("inf")}, "--cyclical-factor must be >= 1, got inf"),
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(UserError) as caught:
        resolve_config("pretrain", settings)
    assert message in str(caught.value)


def test_yaml_pairs_are_not_base_60_numbers(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "clip: 4:10.5\ntemperature: 1:4\nfocal: 3:2\nepochs: 12\nlr: 1.5e-1\n"
        "momentum: 0:0.9\nweight_decay: 5e-4\nmin_lr: 1.0e-6\n"
    )
    config = resolve_config("pretrain", load_yaml(path))
    assert config.clip == KnobRange(4.0, 10.5)
    assert config.temperature == KnobRange(1.0, 4.0)
    assert config.momentum == KnobRange(0.0, 0.9)
    assert config.weight_decay == KnobRange(5e-4, 5e-4) and config.min_lr == 1e-6
    assert (config.focal, config.epochs, config.lr) == ("3:2", 12, 0.15)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [1,\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_yaml(broken)
    misplaced = tmp_path / "misplaced.yaml"
    misplaced.write_text("epochs: 2\nlr: 0.1\n  batch_size: 8\n")
    with pytest.raises(UserError) as caught:
        load_yaml(misplaced)
    assert "is not valid YAML (line 3, column 13): mapping values are not allowed here" in str(
        caught.value
    )
    twice = tmp_path / "twice.yaml"
    twice.write_text("seed: 1\nepochs: 2\nseed: 2\n")
    with pytest.raises(UserError, match=r"\(line 3, column 1\): duplicate key 'seed'"):
        load_yaml(twice)
    binary = tmp_path / "best.pt"
    binary.write_bytes(b"PK\x03\x04\x80\xff\xfe")
    with pytest.raises(UserError, match="is not a text file: pass --config with a YAML recipe"):
        load_yaml(binary)
    with pytest.raises(UserError, match="--config is empty"):
        load_yaml("")
    bogus = tmp_path / "bogus.yaml"
    bogus.write_text("command: bogus\nepochs: 2\n")
    with pytest.raises(UserError, match="'command: bogus' is not a gctkd command"):
        resolve_config("pretrain", load_yaml(bogus))
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_yaml(listing)


@pytest.mark.parametrize(
    "name", ["cifar4k-pretrain", "cifar4k-finetune", "cifar4k-distill", "imagenet-paper"]
)
def test_shipped_recipes_resolve(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    command = name.split("-")[1] if name.startswith("cifar4k") else "pretrain"
    config = resolve_config(command, load_yaml(path))
    assert config.weight_decay.is_cyclical


def test_paths_expand_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = resolve_config("pretrain", {"out": "~/runs/a"}, {"data": "~/data"})
    assert (config.out, config.data) == (str(tmp_path / "runs/a"), str(tmp_path / "data"))
    (tmp_path / "recipe.yaml").write_text("epochs: 3\n")
    assert load_yaml("~/recipe.yaml") == {"epochs": 3}


def test_yaml_takes_option_names_as_keys(tmp_path):
    path = tmp_path / "finetune.yaml"
    path.write_text("from: runs/teacher\nepochs: 3\n")
    config = resolve_config("finetune", load_yaml(path))
    assert (config.from_checkpoint, config.epochs) == ("runs/teacher", 3)
    with pytest.raises(UserError, match="'from' and 'from_checkpoint' are the same setting"):
        resolve_config("finetune", {"from": "a", "from_checkpoint": "b"})


def test_a_runs_config_yaml_is_a_recipe(tmp_path):
    """A run folder's config.yaml (every field of every command, plus 'command') reloads."""
    import yaml

    original = resolve_config("distill", {"teacher": "runs/t", "epochs": 3, "clip": "1:2",
                                          "out": "runs/s", "overwrite": True})
    record = {"command": "distill", **original.to_dict()}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(record, sort_keys=False))
    again = resolve_config("distill", load_yaml(path))
    # the same settings, but never --overwrite of the recorded run's folder
    assert again.to_dict() == {**original.to_dict(), "overwrite": False}
    # the same record drives another command; the distillation-only settings are left out
    pretrain = resolve_config("pretrain", load_yaml(path), {"out": "runs/new"})
    assert (pretrain.epochs, pretrain.clip, pretrain.teacher) == (3, original.clip, None)
