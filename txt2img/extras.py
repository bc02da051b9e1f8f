"""Optional parts of txt2img (pip extras): a command that needs a missing one says which to install."""

from __future__ import annotations

import importlib.util

from txt2img.errors import InputError

# The extras of pyproject.toml and the modules each one brings.
EXTRA_MODULES = {"aws": ("boto3", "sagemaker"), "tune": ("optuna",)}


def require_extra(extra: str) -> None:
    """Raise one readable line when the modules of ``extra`` are not installed."""
    missing = [module for module in EXTRA_MODULES[extra] if importlib.util.find_spec(module) is None]
    if missing:
        raise InputError(f"this command needs {', '.join(missing)}: pip install 'txt2img[{extra}]'")
