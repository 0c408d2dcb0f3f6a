"""The subcommands: parse options into a RunConfig and call the library, nothing more."""

from typing import Any

import click

from gctkd.tasks import runner
from gctkd_cli.options import config_from_click, config_options


def _make_command(name: str, summary: str) -> click.Command:
    @click.command(name, help=summary)
    @config_options(name)
    @click.pass_context
    def command(context: click.Context, **values: Any) -> None:
        config = config_from_click(name, context, values)
        runner.COMMANDS[name](config)

    return command


pretrain = _make_command(
    "pretrain",
    "Train a teacher from scratch, easy to hard (f_c = 1): the first half of the cycle.",
)
finetune = _make_command(
    "finetune",
    "Continue a run (--from) on target data, back to easy: the second half of the cycle. "
    "The classifier is replaced when the class count differs.",
)
distill = _make_command(
    "distill",
    "Train a student from a frozen teacher (--teacher, or --teacher-model with "
    "--teacher-weights) with cyclical KD temperature (f_c = 2 by default: the temperature "
    "peaks mid-run) and, with --feature-layers, feature matching at several depths.",
)
