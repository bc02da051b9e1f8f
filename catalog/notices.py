"""Library notices that a txt2img user cannot act on, dropped where txt2img triggers them.

transformers 5 says, once for each image processor that diffusers' pipeline modules import (CLIP's,
SigLIP's), that without torchvision it falls back to the PIL one. txt2img does not depend on
torchvision, so the PIL backend is the plan, and the two lines would open every server log and
every run. Only those lines are dropped: transformers' other messages pass as before.
"""

from __future__ import annotations

import logging
import re

# The logger transformers says it on (transformers.utils.import_utils, lazy attribute access).
TRANSFORMERS_IMPORT_LOGGER = "transformers.utils.import_utils"
TORCHVISION_FALLBACK = re.compile(
    r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`"
)


class _TorchvisionFallbackFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not TORCHVISION_FALLBACK.match(record.getMessage())


_FILTER = _TorchvisionFallbackFilter()


def drop_torchvision_fallback_notices() -> None:
    """Call before importing a diffusers pipeline class; adding the filter again changes nothing."""
    logging.getLogger(TRANSFORMERS_IMPORT_LOGGER).addFilter(_FILTER)
