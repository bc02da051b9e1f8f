"""The pipeline families, as data: the one table every route, the CLI, export and the packed SageMaker
script read a model's defaults and refusals from.

A catalog entry names its family (``CatalogEntry.family``); the family says which diffusers pipeline
class runs it, its native size, the steps and guidance a request gets when it names none, which of
a request's fields and schedulers it can use, how much prompt its text encoders read, and whether
the safety checker and LoRA adapters apply to it.

This module imports nothing but the standard library: the catalog CLI answers without torch, and
``txt2img deploy`` copies this file as it is into the model archive (jumpstart/package.py), where
no other txt2img module exists.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Every scheduler a request may name, with its diffusers class. Stable Diffusion's families denoise
# with DDPM-trained samplers; Flux is a flow-matching model, which only flow-matching samplers fit.
DDPM_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    # Few-step samplers for acceleration LoRAs (LCM-LoRA, TCD-LoRA): 4-8 steps at guidance 1-2. Each picks
    # at most original_inference_steps (50) of the schedule its LoRA was distilled on, so no more steps.
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
}
FLOW_MATCHING_SCHEDULERS = {"flow-euler": "FlowMatchEulerDiscreteScheduler"}
SCHEDULER_CLASSES = {**DDPM_SCHEDULERS, **FLOW_MATCHING_SCHEDULERS}

# How a family takes a negative prompt: through classifier-free guidance (guidance_scale above 1), or,
# for guidance-distilled Flux, only through "true CFG" (true_cfg_scale above 1, a second pass per step).
NEGATIVE_BY_GUIDANCE = "guidance_scale"
NEGATIVE_BY_TRUE_CFG = "true_cfg_scale"


@dataclass(frozen=True)
class Family:
    """What a pipeline family is and what a request for one of its models may ask."""

    name: str
    pipeline_class: str = "StableDiffusionPipeline"
    native_size: int = 512
    default_steps: int = 50  # diffusers' and JumpStart's default for Stable Diffusion pipelines
    default_guidance: float = 7.5
    negative_prompt: str = NEGATIVE_BY_GUIDANCE  # the field that switches the negative prompt on
    schedulers: tuple[str, ...] = tuple(DDPM_SCHEDULERS)
    max_prompt_tokens: int = 77  # CLIP's context; the pipeline truncates a longer prompt
    safety_checker: bool = True  # the pipeline class takes a safety checker (requires_safety_checker)
    lora: bool = True  # diffusers loads LoRA adapters onto this pipeline class
    locally_trainable: bool = True  # txt2img's own DreamBooth trainer fine-tunes it
    single_file_config: str | None = None  # the Hub repo whose configs a single-file checkpoint loads with

    @property
    def flow_matching(self) -> bool:
        """Whether the family denoises by flow matching (Flux), which only flow-matching samplers fit."""
        return all(name in FLOW_MATCHING_SCHEDULERS for name in self.schedulers)

    @property
    def true_cfg(self) -> bool:
        """Whether a negative prompt needs true CFG (true_cfg_scale above 1) rather than guidance_scale."""
        return self.negative_prompt == NEGATIVE_BY_TRUE_CFG

    def as_json(self) -> dict:
        """The family as ``GET /models`` and the playground show it."""
        data = asdict(self)
        data["schedulers"] = list(self.schedulers)
        return data


FAMILY_TABLE = (
    # The built-in demo model tiny-sd: SD's pipeline at 64 px; v-prediction, as SD 2.
    Family("tiny", native_size=64, default_steps=25),
    Family("sd1", single_file_config="stable-diffusion-v1-5/stable-diffusion-v1-5"),
    Family("sd2-base", single_file_config="stabilityai/stable-diffusion-2-1-base"),
    Family("sd2", native_size=768, single_file_config="stabilityai/stable-diffusion-2-1"),
    Family(
        "sdxl",
        pipeline_class="StableDiffusionXLPipeline",
        native_size=1024,
        default_guidance=5.0,  # diffusers' default for SDXL
        safety_checker=False,  # StableDiffusionXLPipeline has none; TXT2IMG_SAFETY_CHECKER still applies
        locally_trainable=False,
        single_file_config="stabilityai/stable-diffusion-xl-base-1.0",
    ),
    Family(
        "flux",
        pipeline_class="FluxPipeline",
        native_size=1024,
        default_steps=4,  # FLUX.1 [schnell], the catalog's Flux model: timestep-distilled, no guidance
        default_guidance=0.0,
        negative_prompt=NEGATIVE_BY_TRUE_CFG,
        schedulers=tuple(FLOW_MATCHING_SCHEDULERS),
        max_prompt_tokens=512,  # T5's max_sequence_length in FluxPipeline; CLIP reads the first 77
        safety_checker=False,
        locally_trainable=False,
        single_file_config="black-forest-labs/FLUX.1-schnell",
    ),
)
FAMILIES = {family.name: family for family in FAMILY_TABLE}
FAMILY_NAMES = tuple(FAMILIES)


def family(name: str) -> Family:
    """The family called ``name``; a KeyError names the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown family '{name}'; known: {', '.join(FAMILY_NAMES)}") from None


def family_of_pipeline(pipeline_class: str) -> Family | None:
    """The first family run by ``pipeline_class`` (the ``_class_name`` of a model_index.json), or None for a
    class no family runs: the families that share a class share what a pipeline of it gets without a catalog
    entry (the packed SageMaker script knows only the pipeline it loaded)."""
    for candidate in FAMILY_TABLE:
        if candidate.name != "tiny" and candidate.pipeline_class == pipeline_class:
            return candidate
    return None


def model_defaults(family_name: str, resolution: int) -> dict:
    """What a request for a model of this family and native resolution gets for the fields it leaves out."""
    defaults = family(family_name)
    return {
        "width": resolution,
        "height": resolution,
        "num_inference_steps": defaults.default_steps,
        "guidance_scale": defaults.default_guidance,
        "scheduler": None,  # the model's own
    }
