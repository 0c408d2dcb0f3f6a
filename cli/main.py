"""The ``gctkd`` command: a Click group with one subcommand per task."""

import logging
import sys

import click

import gctkd
from gctkd.errors import RunStopped, UserError
from gctkd_cli.commands import distill, finetune, pretrain


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record, not at creation.

    The command may run several times in one process (tests, notebooks) with stderr
    swapped in between; a handler holding the first stream would write to a closed one.
    """

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging() -> None:
    logger = logging.getLogger("gctkd")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(gctkd.__version__, prog_name="gctkd")
def cli() -> None:
    """General cyclical training and distillation for timm models.

    Every knob follows one cyclical factor xi: training starts easy, is hard in the middle
    and ends easy. Knob options take VALUE or EASY:HARD.
    """
    _configure_logging()


cli.add_command(pretrain)
cli.add_command(finetune)
cli.add_command(distill)


# click >= 8.2 raises this for a group called without a command; older versions exit 0
_NO_ARGS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2.

    A run that stops on purpose says why in one line too: exit code 3 for a non-finite
    loss, gradient or weight, 143 after SIGTERM (a checkpoint to ``--resume`` from is saved).
    """
    try:
        cli.main(prog_name="gctkd", standalone_mode=False)
    except UserError as error:
        click.echo(f"gctkd: error: {error}", err=True)
        sys.exit(2)
    except RunStopped as stopped:
        click.echo(f"gctkd: stopped: {stopped}", err=True)
        sys.exit(stopped.exit_code)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except _NO_ARGS_HELP as shown:
        # bare `gctkd`: the help is the answer, on stdout, like `gctkd --help`
        click.echo(shown.format_message())
        sys.exit(0)
    except click.ClickException as error:
        click.echo(f"gctkd: error: {error.format_message()}", err=True)
        sys.exit(error.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        # click turns Ctrl-C into Abort
        click.echo(
            "gctkd: interrupted (Ctrl-C); a run continues from its last saved checkpoint with "
            "--resume RUN", err=True,
        )
        sys.exit(130)
