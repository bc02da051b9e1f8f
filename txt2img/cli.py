"""The ``txt2img`` command: each part of the product contributes its own commands.

Importing this module must stay cheap; the commands import torch and friends only when run.
"""

from __future__ import annotations

import os
import sys

import click

from catalog import cli as catalog_cli
from serving import cli as serving_cli
from serving import sagemaker_cli
from training import eval_cli
from training.cli import train_command
from txt2img.errors import fail


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="txt2img")
def app() -> None:
    """Find, serve, fine-tune and deploy Stable Diffusion models."""


app.add_command(catalog_cli.app)
app.add_command(catalog_cli.export)
app.add_command(serving_cli.generate)
app.add_command(train_command)
app.add_command(eval_cli.evaluate)
app.add_command(eval_cli.tune)
app.add_command(sagemaker_cli.deploy)
app.add_command(sagemaker_cli.endpoints)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; usage errors become one line and exit code 2, not click's usage screen."""
    # transformers warns about optional image backends on every model load; users can opt back in.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        app.main(args=argv, prog_name="txt2img", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as error:
        click.echo(error.ctx.get_help() if error.ctx else str(error))
    except click.UsageError as error:
        command = error.ctx.command_path if error.ctx else "txt2img"
        fail(f"{error.format_message()} (see `{command} --help`)")
    except click.Abort:
        sys.stderr.write("txt2img: aborted\n")
        raise SystemExit(130)


if __name__ == "__main__":
    main()
