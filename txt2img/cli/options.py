"""What ``txt2img train`` and ``txt2img tune`` share about their options: reading ``--hp`` pairs
into hyperparameters, and refusing local-only options next to ``--remote``.

Both commands go through these functions, so the same mistake gets the same one-line message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from click.core import ParameterSource

from training.hyperparameters import Hyperparameters
from txt2img.errors import InputError

if TYPE_CHECKING:
    from pydantic import ValidationError


def first_error(error: ValidationError) -> str:
    """A pydantic error as one line, ``field: message``, without pydantic's dump and its URLs."""
    detail = error.errors()[0]
    field = ".".join(str(part) for part in detail["loc"])
    # A validator's own ValueError reads better without pydantic's "Value error, " in front.
    message = str(detail["ctx"]["error"]) if detail["type"] == "value_error" else detail["msg"]
    return f"{field}: {message}" if field else message


def parse_hyperparameters(pairs: tuple[str, ...]) -> Hyperparameters:
    """The ``--hp KEY=VALUE`` pairs as hyperparameters; a bad pair is one line naming its key."""
    from pydantic import ValidationError

    try:
        return Hyperparameters.from_pairs(list(pairs))
    except ValidationError as error:
        raise InputError(f"--hp {first_error(error)}") from None
    except ValueError as error:
        raise InputError(f"--hp: {error}") from None


def refuse_local_options(context: click.Context, names: tuple[str, ...], reason: str) -> None:
    """Refuse the first of parameters ``names`` the user gave (whatever its value), saying ``reason``."""
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)
    for parameter in context.command.params:
        if parameter.name in names and context.get_parameter_source(parameter.name) in given:
            raise InputError(f"{parameter.opts[0]} is for local runs; {reason}")
