"""What ``txt2img train`` and ``txt2img tune`` share about their options: reading ``--hp`` pairs
into hyperparameters, and refusing local-only options next to ``--remote``.

Both commands go through these functions, so the same mistake gets the same one-line message.
"""

from __future__ import annotations

import click
from click.core import ParameterSource

from txt2img.errors import InputError


def refuse_local_options(context: click.Context, names: tuple[str, ...], reason: str) -> None:
    """Refuse the first of parameters ``names`` the user gave (whatever its value), saying ``reason``."""
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)
    for parameter in context.command.params:
        if parameter.name in names and context.get_parameter_source(parameter.name) in given:
            raise InputError(f"{parameter.opts[0]} is for local runs; {reason}")
