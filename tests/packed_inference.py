"""Import the ``code/inference.py`` of a packed SageMaker model archive as the inference container does."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PACKED_PACKAGES = ("serving", "catalog")  # the archive's code/ holds its own copies of these


def import_packed_inference(code_dir: Path):
    """Import code/inference.py as the container does, with code/ first on sys.path.

    This checkout's ``serving`` and ``catalog`` packages are hidden meanwhile, so the script's
    ``from serving.invocations import ...`` and ``from catalog.families import ...`` bind the copies in the archive.
    """
    hidden = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] in PACKED_PACKAGES}
    sys.path.insert(0, str(code_dir))
    try:
        spec = importlib.util.spec_from_file_location("packed_inference", code_dir / "inference.py")
        inference = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(inference)
        packed_wire = sys.modules["serving.invocations"]
        packed_families = sys.modules["catalog.families"]
    finally:
        sys.path.remove(str(code_dir))
        for name in [name for name in sys.modules if name.split(".")[0] in PACKED_PACKAGES]:
            del sys.modules[name]
        sys.modules.update(hidden)
    assert Path(packed_wire.__file__) == code_dir / "serving" / "invocations.py"
    assert Path(packed_families.__file__) == code_dir / "catalog" / "families.py"
    return inference
