"""The training examples, encoded once, and the deterministic sequence of batches drawn from them.

The VAE is always frozen, so every image is encoded to its latent distribution once, at its
full (shorter side = resolution) size. Each batch then crops in latent space (randomly, or
centred with ``center_crop``) and samples from the distribution, which keeps DreamBooth's
augmentation without running the VAE per step. The order of images in epoch ``e`` depends
only on ``seed`` and ``e``, so a resumed run sees the very batches it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.dataset import DreamBoothDataset
from training.images import read_rgb, resize_shorter_side, to_pixel_tensor
from training.losses import vae_scale


@dataclass
class EncodedImage:
    """A training image's latent distribution (already scaled to unit variance)."""

    mean: Any
    std: Any


@dataclass
class MicroBatch:
    """Latents to denoise and their prompts: the instance examples first, then class examples."""

    latents: Any
    prompts: list[str]
    num_instance: int


def encode_images(vae: Any, paths: list[Path], resolution: int, multiple: int) -> list[EncodedImage]:
    import torch

    scale = vae_scale(vae)
    encoded = []
    with torch.no_grad():
        for path in paths:
            pixels = to_pixel_tensor(resize_shorter_side(read_rgb(path), resolution, multiple))
            distribution = vae.encode(pixels[None].to(vae.device, vae.dtype)).latent_dist
            encoded.append(EncodedImage(distribution.mean[0] * scale, distribution.std[0] * scale))
    return encoded


class BatchPlan:
    """Which examples form micro-batch ``i``, and their sampled, cropped latents."""

    def __init__(
        self,
        dataset: DreamBoothDataset,
        instance: list[list[EncodedImage]],
        classes: list[list[EncodedImage]] | None,
        *,
        batch_size: int,
        latent_size: int,
        seed: int,
    ):
        self.dataset = dataset
        self.instance = instance
        self.classes = classes
        self.batch_size = batch_size
        self.latent_size = latent_size
        self.seed = seed
        self.items = [(concept, image) for concept, images in enumerate(instance) for image in range(len(images))]
        self.batches_per_epoch = -(-len(self.items) // batch_size)

    def steps_per_epoch(self, accumulation: int) -> int:
        return -(-self.batches_per_epoch // accumulation)

    def _epoch_order(self, epoch: int) -> list[tuple[int, int]]:
        import torch

        permutation = torch.randperm(len(self.items), generator=torch.Generator().manual_seed(self.seed + epoch))
        return [self.items[index] for index in permutation.tolist()]

    def _crop_and_sample(self, image: EncodedImage, generator: Any):
        import torch

        size = self.latent_size
        height, width = image.mean.shape[-2:]
        if self.dataset.center_crop:
            top, left = (height - size) // 2, (width - size) // 2
        else:
            top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
        mean = image.mean[:, top : top + size, left : left + size]
        std = image.std[:, top : top + size, left : left + size]
        noise = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
        return mean + std * noise

    def micro_batch(self, index: int, generator: Any) -> MicroBatch:
        import torch

        epoch, position = divmod(index, self.batches_per_epoch)
        chosen = self._epoch_order(epoch)[position * self.batch_size : (position + 1) * self.batch_size]
        concepts = self.dataset.concepts
        latents = [self._crop_and_sample(self.instance[c][i], generator) for c, i in chosen]
        prompts = [concepts[c].instance_prompt for c, _ in chosen]
        if self.classes is not None:
            for offset, (c, _) in enumerate(chosen):
                pool = self.classes[c]
                # Walk through each concept's class images in turn across the run.
                latents.append(self._crop_and_sample(pool[(index * self.batch_size + offset) % len(pool)], generator))
                prompts.append(concepts[c].class_prompt or "")
        return MicroBatch(torch.stack(latents), prompts, len(chosen))
