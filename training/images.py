"""Reading training photos and turning them into the pixel tensors a VAE encodes."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def list_images(directory: Path) -> list[Path]:
    """The .png/.jpg/.jpeg files directly inside ``directory``, sorted by name."""
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def read_rgb(path: Path) -> Image.Image:
    """Decode an image fully (so a truncated file fails here, not mid-training) as RGB."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def resize_shorter_side(image: Image.Image, size: int, multiple: int) -> Image.Image:
    """Scale so the shorter side is ``size`` and both sides are multiples of ``multiple``.

    Keeping the long side (rather than cropping here) lets the trainer crop in latent space,
    so one cached latent serves every random crop.
    """
    width, height = image.size
    scale = size / min(width, height)
    new_width = max(size, round(width * scale / multiple) * multiple)
    new_height = max(size, round(height * scale / multiple) * multiple)
    if (new_width, new_height) == image.size:
        return image
    return image.resize((new_width, new_height), Image.Resampling.LANCZOS)


def center_square(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and cut the centred square."""
    image = resize_shorter_side(image, size, multiple=1)
    left = (image.width - size) // 2
    top = (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_pixel_tensor(image: Image.Image):
    """A (3, H, W) float tensor in [-1, 1], the range Stable Diffusion's VAE expects."""
    import numpy as np
    import torch

    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
