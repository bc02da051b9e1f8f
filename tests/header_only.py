"""Safetensors files that hold a header and none of its tensors' bytes, for tests of header-only readers."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def write_header_only(path: Path, shapes: dict[str, list[int]]) -> Path:
    """A safetensors header announcing these (huge) fp16 tensors, and none of their bytes: a reader
    that loaded any tensor would fail, so detecting a family from it proves only the header is read."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path
