"""The service's configuration, read from ``TXT2IMG_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ServingSettings(BaseSettings):
    """Every knob of ``bentoml serve`` and ``txt2img generate``; env ``TXT2IMG_<NAME>`` sets ``<name>``."""

    model_config = SettingsConfigDict(env_prefix="TXT2IMG_", extra="ignore")

    model: str = Field("tiny-sd", description="Catalog id warmed at start and used when a request names none.")
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = Field(
        "auto", description="auto = fp16 on CUDA and mps, fp32 on the CPU."
    )
    attention: Literal["auto", "xformers", "sdpa"] = Field(
        "auto", description="CUDA attention kernel; auto = xformers when installed, else PyTorch SDPA."
    )
    compile: bool = Field(False, description="torch.compile the UNet (CUDA); compiled during warm-up.")
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads for torch; set it when other processes share the cores."
    )
    workers: int | None = Field(
        None,
        ge=1,
        description="Server worker processes, each with its own device, queue and models; "
        "default: one per visible GPU, 1 without a GPU.",
    )
    local_files_only: bool = Field(False, description="Never download: Hub models must be in the HF cache.")
    allow_downloads: bool = Field(
        True,
        description="Let a request for a Hub model missing from the HF cache download it; TXT2IMG_MODEL is "
        "fetched at start either way (unless local_files_only).",
    )

    api_token: SecretStr | None = Field(
        None, description="Bearer token every route but the health checks requires; unset: no auth."
    )
    allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Without api_token, the Host names (comma-separated, no port; * for any) a request may name "
        "besides loopback ones, and whose Origin a request may come from; the rest get 403 (docs/security.md).",
    )
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="Largest request body; beyond it the answer is 413.")
    train_max_body_bytes: int = Field(
        200 * 1024 * 1024,
        ge=1024,
        description="Largest body of POST /jobs/train (its photos), the one route past max_body_bytes.",
    )
    train_max_images: int = Field(50, ge=3, description="Most photos a training job (POST /jobs/train) may upload.")
    train_max_image_pixels: int = Field(
        40_000_000,
        ge=64 * 64,
        description="Most pixels an uploaded photo may decode to; beyond: 400 (decompression bombs).",
    )
    max_trainings: int = Field(1, ge=1, description="Training jobs that run at once on the server; the others queue.")
    train_gpu_bytes: int = Field(
        12 * 1024**3,
        ge=0,
        description="Free GPU memory a training job needs beside the loaded models; with less it is refused (503).",
    )

    safety_checker: bool = Field(
        False, description="Check generated images; flagged ones are replaced by black images and reported."
    )
    safety_checker_repo: str = Field(
        "CompVis/stable-diffusion-v1-4",
        description="HF repo or local folder whose safety_checker and feature_extractor subfolders are the checker.",
    )

    max_loaded_models: int = Field(3, ge=1, description="Pipelines kept in memory (shared LoRA bases count once).")
    memory_budget_gb: float | None = Field(
        None, gt=0, description="Weights kept in memory at most; default: 80% of the GPU, unbounded on the CPU."
    )

    max_batch_size: int = Field(8, ge=1, description="Images per pipeline call; 1 turns batching off.")
    batch_wait_ms: float = Field(0.0, ge=0, description="How long a batch waits for compatible requests.")
    max_queue: int = Field(64, ge=1, description="Requests waiting at most; beyond that the server answers 429.")
    request_timeout_s: float = Field(300.0, gt=0, description="Queue wait plus generation, per request.")

    max_pixels: int = Field(1024 * 1024, ge=64, description="Largest width x height a request may ask for.")
    max_steps: int = Field(150, ge=1, description="Most denoising steps a request may ask for.")
    max_images: int = Field(8, ge=1, description="Most images one request may ask for.")
    max_work: int = Field(
        1024 * 1024 * 50 * 4,
        ge=1,
        description="Most work one request may ask for, as width x height x steps x images; the default "
        "(four 1024x1024 images at 50 steps) suits one GPU, so lower it on a CPU.",
    )
    max_loras: int = Field(4, ge=0, description="Most LoRAs one request may apply (its loras, or <lora:...> tags).")
    max_prompt_length: int = Field(2000, ge=1, description="Longest prompt or negative prompt, in characters.")
    prompt_cache_mb: float = Field(
        64.0,
        ge=0,
        description="Encoded prompts kept on the device, per worker, so that a prompt seen recently skips the "
        "text encoders (serving/prompts.py); 0 turns the cache off.",
    )

    jobs_max_age: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        description="Seconds a finished job (POST /jobs) and its images are kept; a sweeper deletes older ones.",
    )
    jobs_max_bytes: int = Field(
        1024**3,
        ge=0,
        description="Bytes the images of finished jobs may take; beyond it the sweeper deletes the oldest jobs.",
    )
    jobs_sweep_interval_s: float = Field(60.0, gt=0, description="How often the sweeper applies the two limits above.")
    webhook_secret: SecretStr | None = Field(
        None,
        description="Key of the HMAC-SHA256 signature (header X-Txt2img-Signature) of every webhook; "
        "unset: jobs cannot ask for webhooks.",
    )
    webhook_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Hosts (comma-separated; * for any) a job's webhook may target; others are refused with 400.",
    )
    webhook_retries: int = Field(5, ge=0, description="Tries after a webhook delivery fails, the backoff doubling.")
    webhook_backoff_s: float = Field(1.0, gt=0, description="Wait before the first retry of a failed webhook.")
    webhook_timeout_s: float = Field(10.0, gt=0, description="How long a webhook receiver may take to answer.")

    @field_validator("allowed_hosts", "webhook_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """``"a.example, B.example"`` -> ``("a.example", "b.example")``: host names compare case-insensitively."""
        if isinstance(value, str):
            return tuple(name.strip().lower() for name in value.split(",") if name.strip())
        return value
