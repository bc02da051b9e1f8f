"""DreamBooth hyperparameters: JumpStart's names and defaults, plus txt2img's extensions.

One pydantic model, read by ``txt2img train``, the tuner and the SageMaker launcher. It accepts
the string forms SageMaker passes to training containers ("True", "None", "400").
"""

from __future__ import annotations

import json
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from txt2img.errors import InputError, first_error

LrScheduler = Literal[
    "constant",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant_with_warmup",
]

# The hyperparameters SageMaker JumpStart's txt2img training script knows, in its order.
JUMPSTART_NAMES = (
    "epochs",
    "max_steps",
    "batch_size",
    "with_prior_preservation",
    "num_class_images",
    "learning_rate",
    "prior_loss_weight",
    "center_crop",
    "lr_scheduler",
    "adam_weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "gradient_accumulation_steps",
    "max_grad_norm",
    "seed",
    "compute_fid",
)


class Hyperparameters(BaseModel):
    """Everything that shapes a DreamBooth fine-tune."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # JumpStart's hyperparameters, with JumpStart's defaults.
    with_prior_preservation: bool = False
    num_class_images: int = Field(100, ge=1)
    epochs: int = Field(20, ge=1)
    max_steps: int | None = Field(None, ge=1, description="Total optimisation steps; overrides epochs.")
    batch_size: int = Field(1, ge=1)
    learning_rate: float = Field(2e-6, gt=0)
    prior_loss_weight: float = Field(1.0, ge=0)
    center_crop: bool = False
    lr_scheduler: LrScheduler = "constant"
    adam_weight_decay: float = Field(1e-2, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    compute_fid: bool = False

    # txt2img's extensions.
    method: Literal["full", "lora"] = "full"
    lora_rank: int = Field(4, ge=1, le=256)
    resolution: int | None = Field(None, ge=8, description="Training size; defaults to the base's native size.")
    train_text_encoder: bool = False
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: fp16 or bf16 on CUDA, fp32 elsewhere."
    )
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = Field(False, description="bitsandbytes' 8-bit AdamW; CUDA only.")
    checkpointing_steps: int = Field(500, ge=1)
    lr_warmup_steps: int = Field(0, ge=0, description="Warm-up steps for the lr schedulers that use them.")
    validation_prompts: list[str] | None = None
    sharding: Literal["none", "fsdp"] = Field(
        "none",
        description="none: every process holds the whole model (DDP); fsdp: a full fine-tune's UNet, its "
        "gradients and optimizer state are split across the processes (FSDP2), for bases too big for one GPU.",
    )

    @model_validator(mode="before")
    @classmethod
    def _sagemaker_strings(cls, data: Any) -> Any:
        # SageMaker hands every hyperparameter over as a string; "None" means unset where unset is a
        # value. Elsewhere "none" may be a value itself (sharding=none), and must survive the
        # re-validation of every field that an assignment such as ``hp.method = "lora"`` runs.
        if isinstance(data, dict):
            unset = ("None", "none", "")
            return {key: (None if key in _OPTIONAL and value in unset else value) for key, value in data.items()}
        return data

    @field_validator("validation_prompts", mode="before")
    @classmethod
    def _prompts_from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            stripped = value.strip()
            if stripped.startswith("["):
                return json.loads(stripped)
            return [prompt.strip() for prompt in stripped.split("|") if prompt.strip()]
        return value

    @field_validator("resolution")
    @classmethod
    def _resolution_multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError("must be a multiple of 8")
        return value

    @classmethod
    def from_pairs(cls, pairs: list[str], base: Hyperparameters | None = None) -> Hyperparameters:
        """Parse ``key=value`` strings (the CLI's ``--hp``) on top of ``base`` or the defaults."""
        values = base.model_dump(exclude_unset=True) if base else {}
        for pair in pairs:
            key, separator, value = pair.partition("=")
            if not separator or not key.strip():
                raise ValueError(f"expected key=value, got '{pair}'")
            key = key.strip()
            if key not in cls.model_fields:
                from difflib import get_close_matches

                close = get_close_matches(key, list(cls.model_fields), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(f"unknown hyperparameter '{key}'{hint}")
            values[key] = value.strip()
        return cls.model_validate(values)

    def sagemaker_strings(self) -> dict[str, str]:
        """JumpStart's hyperparameters as the strings a SageMaker training job receives."""
        data = self.model_dump()
        return {name: str(data[name]) for name in JUMPSTART_NAMES}


# The hyperparameters that may be unset (None).
_OPTIONAL = frozenset(
    name for name, field in Hyperparameters.model_fields.items() if type(None) in get_args(field.annotation)
)


def numeric_kind(name: str) -> type[int] | type[float]:
    """``int`` or ``float``, the type of hyperparameter ``name`` (optional or not), for the tuners'
    search ranges; a ValueError names an unknown or non-numeric one, which cannot be searched."""
    import typing

    field = Hyperparameters.model_fields.get(name)
    if field is None:
        from difflib import get_close_matches

        close = get_close_matches(name, list(Hyperparameters.model_fields), n=1)
        raise ValueError(f"unknown hyperparameter '{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    kinds = {kind for kind in typing.get_args(field.annotation) or (field.annotation,) if kind is not type(None)}
    if kinds == {int}:
        return int
    if kinds == {float}:
        return float
    raise ValueError(f"'{name}' is not numeric; only int and float hyperparameters can be searched")


def parse_hyperparameters(pairs: tuple[str, ...]) -> Hyperparameters:
    """The ``--hp KEY=VALUE`` pairs as hyperparameters; a bad pair is one line naming its key."""
    from pydantic import ValidationError

    try:
        return Hyperparameters.from_pairs(list(pairs))
    except ValidationError as error:
        raise InputError(f"--hp {first_error(error)}") from None
    except ValueError as error:
        raise InputError(f"--hp: {error}") from None
