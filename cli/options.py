"""Click options generated from RunConfig, so --help, YAML keys and the config never drift."""

import dataclasses
from typing import Any, Callable

import click
from click.core import ParameterSource

from gctkd.config import fields_for, load_yaml, resolve_config, RunConfig
from gctkd.knobs import KNOBS


def _option_for(f: dataclasses.Field) -> Callable:
    name = f.metadata.get("option") or "--" + f.name.replace("_", "-")
    if f.metadata.get("knob"):
        default = f.default
        shown = f" [default: {default}]" if default is not None else " [default: off]"
        return click.option(
            name, f.name, type=str, default=None, metavar="V|EASY:HARD",
            help=KNOBS[f.name].help + shown,
        )
    default = f.default if f.default is not dataclasses.MISSING else None
    shown = f" [default: {default}]" if default is not None and default is not False else ""
    if f.metadata.get("flag"):
        return click.option(name, f.name, is_flag=True, default=False, help=f.metadata["help"])
    declared = str(f.type)
    if f.metadata.get("choices"):
        kind: Any = click.Choice(f.metadata["choices"])
    elif "int" in declared:
        kind = int
    elif "float" in declared:
        kind = float
    else:
        kind = str
    return click.option(name, f.name, type=kind, default=None, help=f.metadata["help"] + shown)


def config_options(command: str) -> Callable:
    """Decorate a click command with ``--config`` and one option per setting."""

    def decorate(function: Callable) -> Callable:
        for f in reversed(fields_for(command)):
            function = _option_for(f)(function)
        return click.option(
            "--config", "config_path", type=click.Path(dir_okay=False), default=None,
            help="YAML recipe; its keys are the option names with underscores. "
            "Options given on the command line win.",
        )(function)

    return decorate


def config_from_click(command: str, context: click.Context, values: dict[str, Any]) -> RunConfig:
    """Settings given on the command line over the YAML file over the defaults."""
    config_path = values.pop("config_path", None)
    yaml_settings = load_yaml(config_path) if config_path is not None else {}
    cli_settings = {
        name: value
        for name, value in values.items()
        if context.get_parameter_source(name) == ParameterSource.COMMANDLINE
    }
    return resolve_config(command, yaml_settings, cli_settings, source=f"config '{config_path}'")
