"""Feature distillation: taps, connectors, timm teachers, logit caching, the CLI contract."""

import json
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.utils import ModelEmaV3

import gctkd.losses
from gctkd.config import FEATURE_LOSSES, resolve_config
from gctkd.cycle import CycleWindow
from gctkd.engine.trainer import Trainer
from gctkd.errors import UserError
from gctkd.knobs import KnobSchedule
from gctkd.models import FrozenTeacher, create_model
from gctkd.models.connectors import Connector
from gctkd.models.taps import FeatureTaps, parse_feature_layers, unwrap_model
from gctkd.tasks.distill import DEFAULT_FEATURE_WEIGHT, DistillTask
from gctkd.tasks.logit_cache import IndexedTargets, TeacherLogitCache

NUM_CLASSES = 3
SIZE = 16
IDENTITY_STATS = ((0.0,) * 3, (1.0,) * 3)
COMMON = ["--image-size", "32", "--batch-size", "32", "--epochs", "1", "--workers", "0",
          "--log-interval", "1", "--warmup-epochs", "0", "--val-fraction", "0.2"]


def _teacher(name: str = "resnet20") -> FrozenTeacher:
    torch.manual_seed(0)
    return FrozenTeacher(create_model(name, NUM_CLASSES), *IDENTITY_STATS, *IDENTITY_STATS)


def _task(student: str = "resnet8x4", layers: str = "1,2,3", loss: str = "mse") -> DistillTask:
    torch.manual_seed(1)
    meta = {"model_name": student, "num_classes": NUM_CLASSES, "image_size": SIZE}
    return DistillTask(
        create_model(student, NUM_CLASSES), _teacher(), meta,
        feature_layers=parse_feature_layers(layers), feature_loss=loss, teacher_name="resnet20",
    )


def _trainer(task: DistillTask, tmp_path: Path) -> Trainer:
    config = resolve_config(
        "distill", {}, {"warmup_epochs": 0, "epochs": 1, "feature_weight": "1"}
    )
    schedule = KnobSchedule(CycleWindow(2.0), config.knob_ranges())
    batch = [(torch.randn(4, 3, SIZE, SIZE), torch.arange(4) % NUM_CLASSES)]
    return Trainer(task, schedule, config, batch, batch, tmp_path, torch.device("cpu"))



def _scalars(run_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize(
    "text, pairs",
    [
        ("1:1,2:2,3:3", [(1, 1), (2, 2), (3, 3)]),
        ("2,3", [(2, 2), (3, 3)]),
        ("layer2:stages.1", [("layer2", "stages.1")]),
        (" -1 : stages.2 ", [(-1, "stages.2")]),
    ],
)
def test_parse_feature_layers(text, pairs):
    assert parse_feature_layers(text) == pairs


@pytest.mark.parametrize("text", ["1:2:3", "1,,2", ":2"])
def test_parse_feature_layers_rejects_bad_syntax(text):
    with pytest.raises(UserError, match="--feature-layers takes TEACHER:STUDENT"):
        parse_feature_layers(text)


def test_feature_loss_choices_match_the_registry():
    assert tuple(gctkd.losses.FEATURE_LOSSES) == FEATURE_LOSSES == tuple(DEFAULT_FEATURE_WEIGHT)


def test_hooks_and_forward_intermediates_give_the_same_maps_and_logits():
    model = create_model("resnet20", NUM_CLASSES).eval()
    images = torch.randn(2, 3, SIZE, SIZE)
    by_index = FeatureTaps(model, [1, "stages.2"], "student")
    assert by_index.names == ["stages.0", "stages.2"] and by_index.use_intermediates
    by_hook = FeatureTaps(model, [1, "stages.2"], "student")
    by_hook.use_intermediates = False
    block = FeatureTaps(model, ["stages.2.2"], "student")  # not a feature_info tap: a hook
    with torch.no_grad():
        (logits_a, maps_a), (logits_b, maps_b) = by_index(images), by_hook(images)
        _, (last_block,) = block(images)
        reference = model(images)
    assert torch.allclose(logits_a, reference) and torch.allclose(logits_b, reference)
    assert all(torch.equal(a, b) for a, b in zip(maps_a, maps_b))
    assert torch.equal(last_block, maps_a[1])


def test_names_resolve_through_wrappers():
    model = create_model("resnet20", NUM_CLASSES)
    ema = ModelEmaV3(model)
    compiled = torch.compile(model)  # nothing is compiled until it is called
    assert unwrap_model(ema) is ema.module and unwrap_model(compiled) is model
    taps = FeatureTaps(compiled, ["_orig_mod.stages.1", "module.stages.0.1"], "student")
    assert taps.layers == [("index", 2), ("hook", "stages.0.1")]


@pytest.mark.parametrize(
    "layer, message",
    [
        (7, "student layer 7 is out of range for resnet20: its taps are 0 stem.1, 1 stages.0"),
        ("stages.9", "student layer 'stages.9' is not a module of resnet20 \\(did you mean"),
        ("", "not a module"),
    ],
)
def test_unknown_layers_are_errors_naming_the_valid_ones(layer, message):
    with pytest.raises(UserError, match=message):
        FeatureTaps(create_model("resnet20", NUM_CLASSES), [layer], "student", "resnet20")


def test_a_layer_that_is_not_a_feature_map_is_an_error():
    with pytest.raises(UserError, match="layer 'fc' of resnet8x4 gives an output of shape"):
        _task(layers="3:fc")


def test_a_student_layer_in_two_pairs_is_an_error():
    with pytest.raises(UserError, match="appear in more than one pair"):
        _task(layers="1:3,2:3")


@pytest.mark.parametrize(
    "student_shape, teacher_shape, output, params",
    [
        ((16, 8, 8), (16, 8, 8), (16, 8, 8), 0),  # identity
        ((32, 8, 8), (16, 4, 4), (16, 4, 4), 32 * 16 + 2 * 16),  # pool, then project
        ((16, 4, 4), (16, 8, 8), (16, 8, 8), 0),  # bilinear up, no projection
    ],
)
def test_connector_shapes(student_shape, teacher_shape, output, params):
    connector = Connector(student_shape, teacher_shape)
    assert connector(torch.randn(2, *student_shape)).shape == (2, *output)
    assert sum(p.numel() for p in connector.parameters()) == params
    assert connector.is_identity == (student_shape == teacher_shape)


def test_attention_transfer_connectors_only_align_space():
    task = _task(student="test_efficientnet", layers="1:1,2:2", loss="at")
    assert sum(p.numel() for p in task.connectors.parameters()) == 0
    assert [c.resize for c in task.connectors.values()] == [True, True]


def test_connectors_are_trained_checkpointed_and_never_exported(tmp_path):
    task = _task()
    trainer = _trainer(task, tmp_path)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    connector_params = list(task.connectors.parameters())
    assert connector_params and all(id(p) in optimised for p in connector_params)

    before = [p.detach().clone() for p in connector_params]
    images, targets = torch.randn(4, 3, SIZE, SIZE), torch.arange(4) % NUM_CLASSES
    parts = trainer._train_step(images, targets, trainer.schedule.values(0.5))
    assert all(not torch.equal(a, b) for a, b in zip(before, connector_params))
    assert {"feature/stages.0", "feature/stages.1", "feature/stages.2"} <= set(parts)

    state = trainer.state_dict()
    assert set(state["helpers"]) == {"connectors"}
    assert "stages_0.projection.0.weight" in state["helpers"]["connectors"]
    assert not any("projection" in key for key in state["model"])


def test_teacher_features_are_detached():
    task = _task()
    seen = []
    teacher_taps = task.teacher_taps

    def record(images):
        logits, features = teacher_taps(images)
        seen.append(features)
        return logits, features

    task.teacher_taps = record
    knobs = {"kd_temperature": 4.0, "kd_weight": 0.9, "label_weight": 0.1, "feature_weight": 1.0}
    parts = task.training_loss(torch.randn(2, 3, SIZE, SIZE), torch.tensor([0, 1]), knobs)
    parts["loss"].backward()
    assert seen and all(f.grad_fn is None and not f.requires_grad for f in seen[0])
    assert all(p.grad is None for p in task.teacher.parameters())
    assert all(p.grad is not None for p in task.model.stages.parameters())


def test_logit_cache_is_keyed_by_sample_index():
    teacher = _teacher()
    images = torch.randn(10, 3, SIZE, SIZE)
    dataset = IndexedTargets([(image, index % NUM_CLASSES) for index, image in enumerate(images)])
    assert torch.equal(dataset[7][1], torch.tensor([1, 7]))
    cache = TeacherLogitCache(dataset, batch_size=4, workers=0)
    order = torch.tensor([9, 2, 2, 0, 5])
    cached = cache.lookup(order, teacher, torch.device("cpu"))
    assert torch.allclose(cached, teacher(images[order]), atol=1e-5)


@pytest.fixture
def timm_teacher(tmp_path):
    """A test_resnet trained on nothing, as a local safetensors file of 10 classes."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path / "test_resnet.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    return path


def test_cross_family_feature_distillation_end_to_end(cifar_dir, timm_teacher, tmp_path, gctkd_main):
    """A ResNet teacher from a weights file, an EfficientNet student, features at two depths."""
    out = tmp_path / "student"
    result = gctkd_main(
        "distill", "--teacher-model", "test_resnet", "--teacher-weights", str(timm_teacher),
        "--teacher-size", "64", "--teacher-mean", "0.5,0.5,0.5", "--teacher-std", "0.25,0.25,0.25",
        "--data", str(cifar_dir), "--out", str(out), "--model", "test_efficientnet",
        "--feature-layers", "layer1:1,2:3", "--kd-weight", "0.5:0.9", "--label-weight", "0.5:0.1",
        "--kd-temperature", "1:4", *COMMON, "--per-class", "12", "--val-per-class", "3",
    )
    assert result.returncode == 0, result.stderr
    log = (out / "train.log").read_text()
    # teacher at 64 px: its layer1 map is 16x16, the student's blocks.1 map at 32 px is 8x8
    assert "student blocks.1 [24, 8, 8] -> teacher layer1 [32, 16, 16] (bilinear to 16x16, " \
           "1x1 conv 24->32 + BN)" in log
    logged = _scalars(out)
    for tag in ("loss/kd", "loss/label", "loss/feature/blocks.1", "loss/feature/blocks.3",
                "knob/kd_weight", "knob/label_weight", "knob/feature_weight",
                "knob/kd_temperature", "val/agreement"):
        assert tag in logged, tag
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["feature_weight"] == str(DEFAULT_FEATURE_WEIGHT["mse"])
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["teacher"] == {"weights": str(timm_teacher), "model_name": "test_resnet"}
    assert set(state["helpers"]["connectors"]) and "conv_head.weight" in state["model"]
    assert not any(key.startswith("blocks_") for key in state["model"])


@pytest.mark.parametrize(
    "options, message",
    [
        (["--feature-layers", "1:layer9"], "student layer 'layer9' is not a module of resnet20"),
        (["--feature-layers", "9:1"], "teacher layer 9 is out of range for test_resnet"),
        (["--feature-weight", "1"], "--feature-weight needs --feature-layers"),
        (["--cache-teacher-logits", "--hflip", "0.5"], "--cache-teacher-logits needs the same"),
        (["--cache-teacher-logits", "--feature-layers", "1"], "cannot go with --feature-layers"),
        (["--teacher", "x"], "cannot go with --teacher"),
        (["--teacher-mean", "1,2"], "--teacher-mean takes R,G,B"),
    ],
)
def test_bad_distillation_options_exit_2_before_a_run_folder(
    cifar_dir, timm_teacher, tmp_path, gctkd_main, options, message
):
    out = tmp_path / "never"
    result = gctkd_main(
        "distill", "--teacher-model", "test_resnet", "--teacher-weights", str(timm_teacher),
        "--data", str(cifar_dir), "--out", str(out), *options, *COMMON,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert not out.exists()


def test_timm_teacher_class_count_mismatch_is_an_error(make_image_folder, timm_teacher, tmp_path,
                                                       gctkd_main):
    data = make_image_folder(per_class=10)
    result = gctkd_main(
        "distill", "--teacher-model", "test_resnet", "--teacher-weights", str(timm_teacher),
        "--data", str(data), "--out", str(tmp_path / "never"), *COMMON, "--batch-size", "8",
    )
    assert result.returncode == 2
    assert "is a 10-class test_resnet but the data has 3 classes" in result.stderr


def test_teacher_weights_of_another_model_are_refused(make_image_folder, tmp_path, gctkd_main):
    path = tmp_path / "resnet56.safetensors"
    safetensors.torch.save_file(timm.create_model("resnet56", num_classes=3).state_dict(),
                                str(path))
    result = gctkd_main(
        "distill", "--teacher-model", "resnet20", "--teacher-weights", str(path),
        "--data", str(make_image_folder(per_class=10)), "--out", str(tmp_path / "never"), *COMMON,
        "--batch-size", "8",
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert (f"--teacher-weights '{path}' does not fit --teacher-model resnet20 (" in
            result.stderr and "pass the timm model the weights were trained with" in result.stderr)


class _NotATensor:
    pass


def test_weights_files_with_code_are_refused(make_image_folder, tmp_path, gctkd_main):
    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": _NotATensor()}, path)
    result = gctkd_main(
        "distill", "--teacher-model", "test_resnet", "--teacher-weights", str(path),
        "--data", str(make_image_folder(per_class=10)), "--out", str(tmp_path / "never"), *COMMON,
    )
    assert result.returncode == 2 and "was refused" in result.stderr


def test_cached_teacher_logits_run(make_image_folder, tmp_path, gctkd_main):
    torch.manual_seed(0)
    path = tmp_path / "teacher.pt"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), path)
    out = tmp_path / "student"
    result = gctkd_main(
        "distill", "--teacher-model", "test_resnet", "--teacher-weights", str(path),
        "--teacher-size", "32", "--data", str(make_image_folder(per_class=10)), "--out", str(out),
        "--model", "resnet8x4", "--cache-teacher-logits", "--hflip", "0", *COMMON,
        "--batch-size", "8", "--epochs", "2",
    )
    assert result.returncode == 0, result.stderr
    assert "cached the teacher's logits of 24 training images" in (out / "train.log").read_text()
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and "val/agreement" in history[-1]


def test_distill_cost_benchmark_quick(tmp_path, monkeypatch):
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    import distill_cost

    result = distill_cost.main(["--quick", "--out", str(tmp_path)])
    assert 0 < result["ratio_median"] < 100
    assert len(result["connectors"]) == 3
    sys.modules.pop("distill_cost", None)
