"""What a single-file checkpoint is, read from its safetensors header alone.

A ``.safetensors`` file starts with 8 bytes (little-endian: the header's length) and a JSON header
naming every tensor with its dtype and shape. That is all detection reads: no tensor is loaded and
nothing is unpickled, so a file from Civitai is judged before any of it runs or fills memory.
Pickled checkpoints (``.ckpt``, ``.pt``, ``.bin``) are refused: loading one can run arbitrary code.

Layouts (AUTOMATIC1111's, as Civitai and ``models/Stable-diffusion`` hold them):

* Stable Diffusion 1.x: the UNet under ``model.diffusion_model.``, CLIP under ``cond_stage_model.transformer.``;
* Stable Diffusion 2.x: the same UNet, OpenCLIP under ``cond_stage_model.model.``. The weights of SD 2's
  768 px v-prediction models and its 512 px epsilon (``-base``) models have the same names and shapes,
  so the header cannot tell them apart: it is ``sd2`` (as diffusers also guesses) unless the user says
  ``sd2-base``;
* SDXL: two text encoders under ``conditioner.embedders.``;
* Flux: ``double_blocks.`` (bare, or under ``model.diffusion_model.``).

LoRA files are recognised (``is_lora``) so that they are imported as adapters (catalog/lora_files.py).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from txt2img.errors import InputError

PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
# A torch.save file is a zip archive (or, before torch 1.6, a bare pickle stream).
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
HEADER_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_PREFIX = "conditioner.embedders."
FLUX_MARKER = "double_blocks."
LORA_MARKERS = ("lora_unet_", "lora_te", ".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora.down.")
LORA_MARKERS += (".lora.up.", ".lora_linear_layer.")  # diffusers' own names, as save_lora_weights writes them
# Text width (the UNet's cross-attention input) of each family whose text encoder is CLIP ViT-L's
# layout: SD 1.x's 768, and tiny-sd's 32.
CLIP_LAYOUT_FAMILIES = {768: "sd1", 32: "tiny"}
OPEN_CLIP_WIDTH = 1024
SHA256_CHUNK_BYTES = 8 * 2**20


class ImportRefused(InputError):
    """A model `txt2img catalog add` cannot register; the message says why and what would do."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


def refuse_pickle(path: Path) -> None:
    """Refuse a pickled checkpoint, by its name or by its first bytes, before anything reads it further."""
    with path.open("rb") as stream:
        start = stream.read(4)
    if path.suffix.lower() in PICKLE_SUFFIXES or start.startswith(PICKLE_MAGIC):
        raise ImportRefused(
            f"{path} is a pickled checkpoint ({path.suffix or 'pickle data'}): loading one can run arbitrary code, "
            "so txt2img reads only .safetensors; convert it where you trust it, or find the .safetensors release"
        )


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor's name, dtype and shape, from the safetensors header alone."""
    refuse_pickle(path)
    size = path.stat().st_size
    with path.open("rb") as stream:
        prefix = stream.read(HEADER_LENGTH_BYTES)
        (length,) = struct.unpack("<Q", prefix) if len(prefix) == HEADER_LENGTH_BYTES else (0,)
        if not 0 < length <= min(MAX_HEADER_BYTES, size - HEADER_LENGTH_BYTES):
            raise ImportRefused(f"{path} is not a safetensors file: its first 8 bytes give no header length")
        raw = stream.read(length)
    try:
        header = json.loads(raw)
        tensors = {
            name: TensorInfo(str(info["dtype"]), tuple(int(n) for n in info["shape"]))
            for name, info in header.items()
            if name != "__metadata__"
        }
    except (ValueError, TypeError, KeyError, AttributeError):
        raise ImportRefused(f"{path} is not a safetensors file: its header is not a tensor table") from None
    if not tensors:
        raise ImportRefused(f"{path} holds no tensors")
    return tensors


def detect_family(tensors: dict[str, TensorInfo], path: Path) -> str:
    """The catalog family of a full checkpoint with these tensors; refuses a LoRA or an unknown layout."""
    names = list(tensors)
    if is_lora(tensors):
        raise ImportRefused(f"{path} is a LoRA adapter, not a full checkpoint: pass --base ID, the model it adapts")
    if any(name.startswith(FLUX_MARKER) or name.startswith(UNET_PREFIX + FLUX_MARKER) for name in names):
        return "flux"
    if any(name.startswith(SDXL_PREFIX) for name in names):
        return "sdxl"
    has_unet = any(name.startswith(UNET_PREFIX) for name in names)
    if has_unet and any(name.startswith(OPEN_CLIP_PREFIX) for name in names):
        return _family_of_width(tensors, path, {OPEN_CLIP_WIDTH: "sd2"}, "Stable Diffusion 2 (OpenCLIP)")
    if has_unet and any(name.startswith(CLIP_PREFIX) for name in names):
        return _family_of_width(tensors, path, CLIP_LAYOUT_FAMILIES, "Stable Diffusion 1 (CLIP)")
    raise ImportRefused(
        f"{path} matches no known family: {len(names)} tensors, under {describe_prefixes(names)}; "
        f"expected Stable Diffusion ({UNET_PREFIX}* with {CLIP_PREFIX}* or {OPEN_CLIP_PREFIX}*), "
        f"SDXL ({SDXL_PREFIX}*) or Flux ({FLUX_MARKER}*)"
    )


def is_lora(tensors: dict[str, TensorInfo]) -> bool:
    return any(marker in name for name in tensors for marker in LORA_MARKERS)


def _family_of_width(tensors: dict[str, TensorInfo], path: Path, families: dict[int, str], layout: str) -> str:
    """The family whose text width the UNet's cross-attention takes (the second dim of ``attn2.to_k``)."""
    widths = {
        info.shape[-1]
        for name, info in tensors.items()
        if name.startswith(UNET_PREFIX) and name.endswith("attn2.to_k.weight") and info.shape
    }
    if len(widths) == 1 and (width := next(iter(widths))) in families:
        return families[width]
    found = ", ".join(map(str, sorted(widths))) or "none"
    expected = ", ".join(f"{width} ({family})" for width, family in families.items())
    raise ImportRefused(
        f"{path} has the {layout} layout, but its UNet's cross-attention width is {found}; "
        f"the families of that layout have {expected}"
    )


def describe_prefixes(names: list[str], shown: int = 5) -> str:
    """The most common two-level prefixes of ``names`` with their counts, e.g. ``encoder.layers. (40)``."""
    counts = Counter(".".join(name.split(".")[:2]) + ("." if name.count(".") >= 2 else "") for name in names)
    listed = ", ".join(f"{prefix} ({count})" for prefix, count in counts.most_common(shown))
    return listed + (f" and {len(counts) - shown} more" if len(counts) > shown else "")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(SHA256_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
