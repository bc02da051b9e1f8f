"""The ``txt2img`` command: one module per command group, gathered here.

Importing this package must stay cheap: the commands import torch and friends only when run.
Every expected failure derives from ``Txt2ImgError`` and is turned into one line here, once.
"""

from __future__ import annotations

import os
import sys

import click

from txt2img.cli import bento_model, catalog, demo, deploy, evaluate, generate, train
from txt2img.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, Txt2ImgError


def report(message: str, exit_code: int) -> None:
    """Print one line on stderr and exit; the only way a txt2img command reports a failure."""
    prefix = "txt2img: error: " if exit_code == EXIT_BAD_INPUT else "txt2img: "
    sys.stderr.write(f"{prefix}{message}\n")
    raise SystemExit(exit_code)


class Txt2ImgGroup(click.Group):
    """The root group: a ``Txt2ImgError`` raised by any command becomes one line and its exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Txt2ImgError as error:
            report(str(error), error.exit_code)


@click.group(cls=Txt2ImgGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="txt2img")
def app() -> None:
    """Find, serve, fine-tune and deploy Stable Diffusion models.

    Exit codes: 0 done, 1 failed, 2 bad input, 130 interrupted.
    """


app.add_command(catalog.app)
app.add_command(catalog.export)
app.add_command(generate.generate)
app.add_command(train.train_command)
app.add_command(evaluate.evaluate)
app.add_command(evaluate.tune)
app.add_command(deploy.deploy)
app.add_command(deploy.endpoints)
app.add_command(bento_model.app)
app.add_command(demo.app)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; click's usage errors become one line and exit code 2, not its usage screen."""
    # transformers logs notices and progress a command's user cannot act on; users can opt back in.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        app.main(args=argv, prog_name="txt2img", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as error:
        click.echo(error.ctx.get_help() if error.ctx else str(error))
    except click.UsageError as error:
        command = error.ctx.command_path if error.ctx else "txt2img"
        report(f"{error.format_message()} (see `{command} --help`)", EXIT_BAD_INPUT)
    except click.Abort:
        report("aborted", EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
