"""The resolved settings of one run, from defaults, a YAML file and the command line.

:class:`RunConfig` is the single list of settings: the CLI builds its options from its
fields, YAML keys are its field names and the run folder's ``config.yaml`` is its plain
dump. Precedence: built-in defaults < YAML file < command line.
"""

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gctkd.cycle import PROGRESS_UNITS
from gctkd.errors import UserError, nearest_names
from gctkd.knobs import KNOBS, KnobRange, parse_knob

_logger = logging.getLogger(__name__)

COMMANDS = ("pretrain", "finetune", "distill")
CLIP_MODES = ("norm", "value", "agc")
AMP_MODES = ("auto", "bf16", "fp16", "off")
DEVICES = ("auto", "cpu", "cuda")
BAD_IMAGE_POLICIES = ("fail", "skip")
# what a resumed run may change: none of them moves the schedule, the data order or the
# weights (a moved --data folder is checked against the checkpoint's classes and steps)
RESUME_CHANGEABLE = (
    "resume", "data", "device", "workers", "log_interval", "checkpoint_every", "keep_last",
    "skip_nonfinite",
)  # fmt: skip
FEATURE_LOSSES = ("mse", "at")  # the keys of gctkd.losses.FEATURE_LOSSES
# settings naming files or folders: "~" is expanded, an empty value refused
PATH_SETTINGS = ("data", "out", "resume", "from_checkpoint", "teacher", "teacher_weights")


def _setting(default: Any, help: str, commands: tuple[str, ...] = COMMANDS, **extra: Any) -> Any:
    """A dataclass field carrying its ``--help`` text, commands and CLI details."""
    metadata = {"help": help, "commands": commands, **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _knob(default: Any, commands: tuple[str, ...] | None = None) -> Any:
    """A knob field: help and commands come from the knob registry."""
    return field(default=default, metadata={"knob": True, "commands": commands})


@dataclass
class RunConfig:
    """Every setting of a run. Field names are the YAML keys; options are ``--field-name``."""

    # what to train on and where to write
    data: str | None = _setting(
        None, "ImageFolder tree DIR/<class>/*.jpg (or DIR/train, DIR/val); default: digits."
    )
    out: str | None = _setting(None, "Run folder for checkpoints, config and TensorBoard events.")
    per_class: int | None = _setting(None, "Keep the first N training images of each class.")
    val_fraction: float = _setting(0.1, "Fraction of each class carved out for validation.")
    val_per_class: int | None = _setting(None, "Carve exactly N validation images per class.")
    bad_images: str = _setting("fail", "Corrupt image files: fail, or skip with a warning.",
                               choices=BAD_IMAGE_POLICIES)
    overwrite: bool = _setting(False, "Replace an existing run folder.", flag=True)
    resume: str | None = _setting(
        None, "Continue the run in folder RUN from RUN/last.pt, with the settings of "
        "RUN/config.yaml (options that would change its schedule are refused)."
    )

    # model and optimisation
    model: str | None = _setting(None, "timm model name (gctkd registers CIFAR ResNets/WRNs).")
    from_checkpoint: str | None = _setting(
        None, "Run folder or checkpoint to fine-tune.", ("finetune",), option="--from"
    )
    teacher: str | None = _setting(None, "Teacher run folder or checkpoint.", ("distill",))
    teacher_model: str | None = _setting(
        None, "timm name of a teacher given by --teacher-weights instead of --teacher.",
        ("distill",),
    )
    teacher_weights: str | None = _setting(
        None, "Local .safetensors or .pt/.pth state dict of --teacher-model (never code).",
        ("distill",),
    )
    teacher_mean: str | None = _setting(
        None, "R,G,B mean the --teacher-model was trained with; default: its timm config.",
        ("distill",),
    )
    teacher_std: str | None = _setting(
        None, "R,G,B std the --teacher-model was trained with; default: its timm config.",
        ("distill",),
    )
    teacher_size: int | None = _setting(
        None, "Input size in pixels of the --teacher-model; default: its timm config.",
        ("distill",),
    )
    feature_layers: str | None = _setting(
        None, "Match features at TEACHER:STUDENT layer pairs (tap indices or module names, "
        "e.g. 1:1,2:2 or layer2:stages.1; 2,3 = same index on both); default: logits only.",
        ("distill",),
    )
    feature_loss: str = _setting(
        "mse", "Feature loss: mse (FitNets hints through connectors) or at (attention "
        "transfer).", ("distill",), choices=FEATURE_LOSSES,
    )
    cache_teacher_logits: bool = _setting(
        False, "Compute the teacher's logits once per training image and reuse them; trains "
        "without augmentation and without --feature-layers.", ("distill",), flag=True,
    )
    pretrained: bool = _setting(
        False, "Start from timm's pretrained weights (downloads them).", ("pretrain", "distill"),
        flag=True,
    )
    epochs: int = _setting(10, "Epochs to train.")
    batch_size: int = _setting(64, "Images per optimizer step.")
    opt: str = _setting("sgd", "timm optimizer name (sgd, adamw, lamb, ...).")
    lr: float = _setting(0.05, "Peak learning rate after warm-up.")
    sched: str = _setting("cosine", "timm LR schedule after warm-up.")
    warmup_epochs: int = _setting(1, "Linear LR warm-up epochs.")
    min_lr: float = _setting(1e-5, "Final learning rate of the schedule.")
    label_smoothing: float = _setting(0.0, "Label smoothing of the label loss.")
    image_size: int = _setting(32, "Input size in pixels (images are resized to it).")
    hflip: float | None = _setting(None, "Horizontal flip probability; default per data set.")
    auto_augment: str | None = _setting(
        None, "timm auto-augment policy for training, e.g. rand-m9-mstd0.5-inc1."
    )
    re_prob: float = _setting(0.0, "Random-erasing probability for training (timm).")

    # the cycle and its knobs
    cyclical_factor: float | None = _setting(
        None, "f_c >= 1 of the cycle (pretrain default 1, distill 2; finetune continues)."
    )
    cycle_window: str | None = _setting(
        None, "START:END part of the cycle this run covers, in [0, 1]."
    )
    progress_unit: str = _setting("step", "Advance the cycle per optimizer step or per epoch.",
                                  choices=PROGRESS_UNITS[:2])
    weight_decay: Any = _knob("5e-4")
    momentum: Any = _knob("0.9")
    temperature: Any = _knob("1")
    clip: Any = _knob(None)
    clip_mode: str = _setting("norm", "Gradient clipping mode for --clip.", choices=CLIP_MODES)
    focal: str | None = _setting(
        None, "Cyclical focal loss G_HC:G_FL (confident-term gamma at the easy end, focal "
        "gamma at the hard end), e.g. 3:2."
    )
    kd_temperature: Any = _knob("4")
    kd_weight: Any = _knob("0.9")
    label_weight: Any = _knob("0.1")
    feature_weight: Any = _knob(None)

    # engine
    device: str = _setting("auto", "Where to train: auto picks CUDA when present.", choices=DEVICES)
    amp: str = _setting("auto", "Mixed precision on CUDA (auto = bf16 where supported).",
                        choices=AMP_MODES)
    ema_decay: float | None = _setting(None, "Keep an EMA of the weights with this decay.")
    workers: int = _setting(2, "Data-loader worker processes.")
    log_interval: int = _setting(10, "Optimizer steps between logged points.")
    checkpoint_every: int = _setting(
        0, "Also write last.pt every N optimizer steps (0: at the end of each epoch only)."
    )
    keep_last: int = _setting(
        0, "Keep the K newest step-numbered checkpoints in RUN/checkpoints/ (0: last.pt only)."
    )
    skip_nonfinite: bool = _setting(
        False, "Skip steps whose loss or gradient is not finite (counted) instead of stopping; "
        "costs one device sync per step.", flag=True,
    )
    seed: int = _setting(0, "Seed for weights, data split and order.")

    def knob_ranges(self) -> dict[str, KnobRange]:
        """The knobs that are set, parsed, by name."""
        return {
            name: getattr(self, name)
            for name in KNOBS
            if isinstance(getattr(self, name, None), KnobRange)
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain data (knobs as strings), for config.yaml and checkpoints."""
        plain = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            plain[f.name] = str(value) if isinstance(value, KnobRange) else value
        return plain


def fields_for(command: str) -> list[dataclasses.Field]:
    """The RunConfig fields a command takes."""
    chosen = []
    for f in dataclasses.fields(RunConfig):
        commands = f.metadata.get("commands") or (
            KNOBS[f.name].commands if f.metadata.get("knob") else COMMANDS
        )
        if command in commands:
            chosen.append(f)
    return chosen


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader without base-60 integers.

    YAML 1.1 reads ``4:10`` as the integer 250 (sexagesimal); in a recipe it means the knob
    pair EASY:HARD, so such values must stay strings.
    """


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    # PyYAML keeps the last of two equal keys; in a recipe that hides a mistake
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}'", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                              _construct_unique_mapping)

_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _NUMBER_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
        r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe into a dict of settings (plain data only, as yaml.safe_load)."""
    if not str(path).strip():
        raise UserError("--config is empty: pass a YAML file, or leave --config out")
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist: pass --config with a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(
            f"config file '{path}' is not a text file: pass --config with a YAML recipe "
            "(checkpoints go to --from, --teacher or --resume)"
        ) from None
    try:
        loaded = yaml.load(text, Loader=_RecipeLoader) or {}
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UserError(f"config file '{path}' is not valid YAML{where}: {problem}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"config file '{path}' must hold a mapping of settings, got a list/value")
    return {str(key).replace("-", "_"): value for key, value in loaded.items()}


def _yaml_keys(command: str, settings: dict[str, Any], source: str) -> dict[str, Any]:
    """A recipe's settings under their field names.

    Keys may also be the option names (``from`` for ``from_checkpoint``). A file with a
    ``command`` key is a run's own ``config.yaml``: it lists every setting of every command,
    so the ones this command does not take are left out instead of refused.
    """
    aliases = {
        _option_name(f)[2:].replace("-", "_"): f.name
        for f in dataclasses.fields(RunConfig)
        if f.metadata.get("option")
    }
    renamed, given_as = {}, {}
    for key, value in settings.items():
        name = aliases.get(key, key)
        if name in renamed:
            raise UserError(
                f"{source}: '{given_as[name]}' and '{key}' are the same setting: keep one"
            )
        renamed[name], given_as[name] = value, key
    recorded_command = renamed.pop("command", None)
    if recorded_command is not None:
        if recorded_command not in COMMANDS:
            raise UserError(f"{source}: 'command: {recorded_command}' is not a gctkd command "
                            f"({', '.join(COMMANDS)}): fix or remove the key")
        known = {f.name for f in fields_for(command)}
        defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
        left_out = sorted(key for key, value in renamed.items()
                          if key not in known and value not in (None, defaults.get(key)))
        if left_out:
            _logger.info(f"{source} is a '{recorded_command}' run's record: ignoring "
                         f"{', '.join(left_out)} (not settings of 'gctkd {command}')")
        # how that run was started, not what it trained: repeating a run's record must never
        # replace (--overwrite) or continue (--resume) the run it came from
        renamed = {key: value for key, value in renamed.items()
                   if key in known and key not in ("overwrite", "resume")}
    return renamed


def _check_keys(command: str, settings: dict[str, Any], source: str) -> None:
    known = {f.name for f in fields_for(command)}
    every = {f.name for f in dataclasses.fields(RunConfig)}
    for key in settings:
        if key in known:
            continue
        if key in every:
            raise UserError(f"{source}: '{key}' is not a setting of 'gctkd {command}'")
        raise UserError(f"{source}: unknown setting '{key}'{nearest_names(key, known)}")


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Turn YAML or CLI values into the field's kind, with a clear error."""
    if value is None or f.metadata.get("knob"):
        if value is None and "None" not in str(f.type) and not f.metadata.get("knob"):
            raise UserError(f"setting '{f.name}' needs a value, got null: give one or drop it")
        return parse_knob(f.name, value) if value is not None else None
    declared = str(f.type)
    if "bool" in declared:
        target = bool
    elif "int" in declared:
        target = int
    elif "float" in declared:
        target = float
    else:
        target = str
    try:
        if target is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if target is bool and not isinstance(value, bool):
            raise ValueError
        if target is not bool and isinstance(value, bool):
            raise ValueError  # YAML's true/false are not 1/0
        if target is str and not isinstance(value, (str, int, float)):
            raise ValueError  # a list or mapping where text belongs
        coerced = target(value)
    except (TypeError, ValueError):
        raise UserError(f"setting '{f.name}' must be {target.__name__}, got {value!r}") from None
    choices = f.metadata.get("choices")
    if choices and coerced not in choices:
        raise UserError(f"setting '{f.name}' must be one of {', '.join(choices)}, got {value!r}")
    return coerced


def _validate(config: RunConfig) -> None:
    positive = ("epochs", "batch_size", "image_size", "log_interval")
    for name in positive:
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise UserError(f"--lr must be a number > 0, got {config.lr}")
    if not (math.isfinite(config.min_lr) and config.min_lr >= 0):
        raise UserError(f"--min-lr must be a number >= 0, got {config.min_lr}")
    if config.warmup_epochs < 0:
        raise UserError(f"--warmup-epochs must be >= 0 (0 turns warm-up off), got "
                        f"{config.warmup_epochs}")
    if config.workers < 0:
        raise UserError(f"--workers must be >= 0, got {config.workers}")
    for name in ("checkpoint_every", "keep_last"):
        if getattr(config, name) < 0:
            raise UserError(
                f"--{name.replace('_', '-')} must be >= 0 (0 turns it off), got "
                f"{getattr(config, name)}"
            )
    if not 0.0 < config.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in (0, 1), got {config.val_fraction}")
    if config.per_class is not None and config.per_class < 1:
        raise UserError(f"--per-class must be >= 1, got {config.per_class}")
    if config.cyclical_factor is not None and not (
        math.isfinite(config.cyclical_factor) and config.cyclical_factor >= 1
    ):
        raise UserError(
            f"--cyclical-factor must be >= 1, got {config.cyclical_factor}: use 1 for "
            "easy-to-hard, 2 for easy-hard-easy"
        )
    if config.ema_decay is not None and not 0.0 < config.ema_decay < 1.0:
        raise UserError(f"--ema-decay must be in (0, 1), got {config.ema_decay}")
    if config.hflip is not None and not 0.0 <= config.hflip <= 1.0:
        raise UserError(f"--hflip must be in [0, 1], got {config.hflip}")
    if not 0.0 <= config.re_prob <= 1.0:
        raise UserError(f"--re-prob must be in [0, 1], got {config.re_prob}")
    if not 0.0 <= config.label_smoothing < 1.0:
        raise UserError(f"--label-smoothing must be in [0, 1), got {config.label_smoothing}")
    focal_gammas(config)
    cycle_window_bounds(config)


def focal_gammas(config: RunConfig) -> tuple[float, float] | None:
    """``(gamma_hc, gamma_fl)`` from ``--focal G_HC:G_FL``, or None when CFL is off."""
    if config.focal is None:
        return None
    parts = str(config.focal).split(":")
    try:
        gammas = tuple(float(p) for p in parts)
    except ValueError:
        gammas = ()
    if len(gammas) != 2 or not all(math.isfinite(g) and g >= 0 for g in gammas):
        raise UserError(
            f"--focal takes G_HC:G_FL with two gammas >= 0 (e.g. 3:2), got {config.focal!r}"
        )
    return gammas


def cycle_window_bounds(config: RunConfig) -> tuple[float, float] | None:
    """``(start, end)`` from ``--cycle-window START:END``, or None."""
    if config.cycle_window is None:
        return None
    parts = str(config.cycle_window).split(":")
    try:
        start, end = (float(p) for p in parts)
    except ValueError:
        raise UserError(
            f"--cycle-window takes START:END in [0, 1], got {config.cycle_window!r}"
        ) from None
    if not 0.0 <= start <= end <= 1.0:
        raise UserError(f"--cycle-window needs 0 <= START <= END <= 1, got {config.cycle_window}")
    return start, end


def _option_of(name: str) -> str:
    return _option_name(next(f for f in dataclasses.fields(RunConfig) if f.name == name))


def _expand_path(name: str, value: str) -> str:
    if not value.strip():
        raise UserError(f"{_option_of(name)} is empty: pass a path, or leave it out")
    return str(Path(value).expanduser())


def _option_name(f: dataclasses.Field) -> str:
    return f.metadata.get("option") or "--" + f.name.replace("_", "-")


def _recorded_settings(command: str, run: str) -> dict[str, Any]:
    """The settings in ``RUN/config.yaml`` that ``command`` takes."""
    folder = Path(run)
    if not folder.is_dir():
        raise UserError(
            f"--resume '{run}' is not a folder: pass the --out folder of the run to continue"
        )
    path = folder / "config.yaml"
    if not path.is_file():
        raise UserError(
            f"--resume '{run}' is not a gctkd run folder (no config.yaml): pass the --out folder "
            "of the run to continue"
        )
    recorded = load_yaml(path)
    if recorded.get("command") != command:
        raise UserError(
            f"--resume '{run}' is a '{recorded.get('command')}' run: continue it with "
            f"gctkd {recorded.get('command')} --resume {run}"
        )
    known = {f.name for f in fields_for(command)}
    return {key: value for key, value in recorded.items() if key in known}


def _resume_settings(command: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The recorded settings of the run to resume, with the allowed changes on top.

    Every other setting given (on the command line or in a recipe) must equal the recorded
    one: the knob schedule, the LR schedule and the data order are functions of them.
    """
    run = str(settings["resume"])
    if settings.get("overwrite"):
        raise UserError(
            "--resume and --overwrite exclude each other: --resume continues the run in its "
            "folder, --overwrite replaces a run; pass one of them"
        )
    out = settings.get("out")
    if out is not None and Path(out).resolve() != Path(run).resolve():
        raise UserError(
            f"--out '{out}' differs from --resume '{run}': a resumed run writes into its own "
            "folder; drop --out"
        )
    recorded = _recorded_settings(command, run)
    fields = {f.name: f for f in fields_for(command)}
    for name, value in settings.items():
        if name in RESUME_CHANGEABLE or name in ("out", "overwrite"):
            continue
        f = fields[name]
        before = recorded.get(name, f.default)
        if _coerce(f, value) != _coerce(f, before):
            shown = "off" if before is None else before
            raise UserError(
                f"{_option_name(f)} {value} differs from the run's {shown} ({run}/config.yaml): "
                f"a resumed run keeps the settings its schedule was built with; drop "
                f"{_option_name(f)}, or start a new run"
            )
    return {**recorded, **settings, "out": run, "overwrite": False}


def resolve_config(
    command: str,
    yaml_settings: dict[str, Any] | None = None,
    cli_settings: dict[str, Any] | None = None,
    source: str = "config file",
) -> RunConfig:
    """Merge defaults < YAML < command line into a checked RunConfig.

    With ``resume``, the run's own ``config.yaml`` takes the place of the defaults and the
    settings given may change only :data:`RESUME_CHANGEABLE` ones.
    """
    yaml_settings = _yaml_keys(command, dict(yaml_settings or {}), source)
    cli_settings = dict(cli_settings or {})
    _check_keys(command, yaml_settings, source)
    _check_keys(command, cli_settings, "command line")
    merged = {**yaml_settings, **cli_settings}
    for name in PATH_SETTINGS:
        if isinstance(merged.get(name), str):  # other kinds are refused by _coerce
            merged[name] = _expand_path(name, merged[name])
    for name, value in merged.items():
        if isinstance(value, str) and not value.strip():
            raise UserError(f"{_option_of(name)} is empty: pass a value, or leave it out")
    if merged.get("resume"):
        merged = _resume_settings(command, merged)
    values = {}
    for f in fields_for(command):
        if f.name in merged:
            values[f.name] = _coerce(f, merged[f.name])
        elif f.metadata.get("knob"):
            values[f.name] = _coerce(f, f.default)
    # knobs of other commands stay unset, so knob_ranges() lists only what this run uses
    for name in KNOBS:
        values.setdefault(name, None)
    config = RunConfig(**values)
    _validate(config)
    # which settings the user chose, so a fine-tuning run can inherit the rest (see inherit)
    config.explicit = frozenset(merged)
    return config


# what fine-tuning carries over from the run it continues unless the user sets it again
INHERITED_SETTINGS = ("weight_decay", "momentum", "temperature", "clip", "clip_mode", "focal")


def inherit(config: RunConfig, recorded: dict[str, Any]) -> RunConfig:
    """The knobs a checkpoint's run used, for every one the user did not set here.

    ``gctkd finetune --from`` continues a cycle: the knobs keep the ranges they had, so
    the second half of the cycle drives the same settings as the first.
    """
    explicit = getattr(config, "explicit", frozenset())
    by_name = {f.name: f for f in dataclasses.fields(RunConfig)}
    changes = {
        name: _coerce(by_name[name], recorded[name])
        for name in INHERITED_SETTINGS
        if name not in explicit and recorded.get(name) is not None
    }
    if not changes:
        return config
    inherited = dataclasses.replace(config, **changes)
    _validate(inherited)
    inherited.explicit = explicit
    return inherited
