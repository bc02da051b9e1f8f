"""How the CLI reports a user's mistake: one readable line on stderr and exit code 2."""

from __future__ import annotations

import sys
from typing import NoReturn

USAGE_ERROR_EXIT_CODE = 2


def fail(message: str) -> NoReturn:
    """Stop the command because of bad input, without a traceback."""
    sys.stderr.write(f"txt2img: error: {message}\n")
    raise SystemExit(USAGE_ERROR_EXIT_CODE)
