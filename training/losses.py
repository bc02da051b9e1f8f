"""The denoising objective DreamBooth minimises, and a fixed-noise measure of it for comparing models.

Training and measurement share the same pieces (prompt encoding, image latents, the noise
target), so "the loss went down" means the same thing in the loop, the tests and evaluation.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from training.images import center_square, to_pixel_tensor


def encode_prompts(tokenizer: Any, text_encoder: Any, prompts: list[str]):
    """CLIP hidden states for ``prompts``, padded to the tokenizer's full length as at inference."""
    tokens = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return text_encoder(tokens.input_ids.to(text_encoder.device))[0]


def vae_scale(vae: Any) -> float:
    """The factor that brings VAE latents to unit variance (SD 1/2: 0.18215)."""
    return float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)


def training_noise_scheduler(pipeline: Any):
    """A DDPM scheduler with the base's noise schedule: it defines the forward (noising) process."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipeline.scheduler.config)


def per_sample_denoising_error(unet: Any, noise_scheduler: Any, latents, noise, timesteps, text_embeddings):
    """Mean squared error between the UNet's prediction and its target, one value per sample."""
    import torch.nn.functional as F

    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, text_embeddings).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    error = F.mse_loss(prediction.float(), target.float(), reduction="none")
    return error.mean(dim=tuple(range(1, error.ndim)))


def denoising_loss(
    pipeline: Any,
    images: list[Image.Image],
    prompt: str,
    *,
    resolution: int,
    seed: int = 0,
    num_timesteps: int = 8,
) -> float:
    """The denoising MSE of ``pipeline`` on ``images`` captioned ``prompt``, at fixed noise and timesteps.

    Images are centre-cropped to ``resolution``; timesteps are evenly spread over the schedule
    and the noise comes from ``seed``, so two models are compared on exactly the same problem.
    Lower means the model reconstructs these images better from this prompt.
    """
    import torch

    if not images:
        raise ValueError("denoising_loss needs at least one image")
    unet, vae = pipeline.unet, pipeline.vae
    device = unet.device
    noise_scheduler = training_noise_scheduler(pipeline)
    pixels = torch.stack([to_pixel_tensor(center_square(image.convert("RGB"), resolution)) for image in images])
    total_steps = noise_scheduler.config.num_train_timesteps
    schedule = torch.linspace(0, total_steps - 1, num_timesteps).round().long()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mean * vae_scale(vae)
        text = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, [prompt])
        text = text.to(unet.dtype).expand(len(images), -1, -1)
        errors = []
        for timestep in schedule:
            noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
            timesteps = timestep.repeat(len(images)).to(device)
            errors.append(
                per_sample_denoising_error(
                    unet, noise_scheduler, latents.to(unet.dtype), noise.to(unet.dtype), timesteps, text
                )
            )
    return float(torch.cat(errors).mean())
