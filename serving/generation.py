"""One pipeline call for a batch of images: its own scheduler, one CPU generator per image, and a stop check.

The loaded pipeline is shared; this module never mutates it. Each call runs on a fresh pipeline
object that reuses the loaded modules but owns a new scheduler (schedulers keep per-run state and
are not thread-safe) and its own interrupt flag.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

from catalog.families import family_of_pipeline
from serving.mixed_loras import AdapterMix, mixed_loras
from serving.prompts import PromptEmbeddingCache, prompt_inputs
from serving.schema import SCHEDULER_CLASSES, LimitExceeded, PromptSyntax

# What a sampler needs from the pipeline call beyond the defaults: TCD's stochastic "gamma" is the
# pipeline's eta, whose default 0.0 would override TCDScheduler's own 0.3 (the value its authors use).
SAMPLER_CALL_ARGUMENTS = {"tcd": {"eta": 0.3}}


@dataclass
class BatchItem:
    """One image of a batch: its prompt, negative prompt, seed, and how its prompts are read."""

    prompt: str
    negative_prompt: str | None
    seed: int
    prompt_syntax: PromptSyntax = "plain"


def fresh_scheduler(pipeline, name: str | None):
    """A new scheduler built from the pipeline's config; ``name`` picks another sampler class."""
    import diffusers

    if name is None:
        return type(pipeline.scheduler).from_config(pipeline.scheduler.config)
    overrides = {}
    if name == "pndm":
        # PNDM's Runge-Kutta warm-up needs 4 steps, and fails on fewer; Stable Diffusion's own
        # scheduler configs skip it (PLMS), which runs at any step count.
        overrides["skip_prk_steps"] = True
    return getattr(diffusers, SCHEDULER_CLASSES[name]).from_config(pipeline.scheduler.config, **overrides)


def scheduler_most_steps(scheduler) -> int:
    """The most steps ``scheduler`` runs: schedulers index a table of num_train_timesteps entries, and the
    few-step ones (LCM, TCD) pick their steps from the original_inference_steps their LoRA was distilled on."""
    config = scheduler.config
    return min(config.num_train_timesteps - 1, config.get("original_inference_steps") or config.num_train_timesteps)


def request_pipeline(pipeline, scheduler_name: str | None):
    """A pipeline sharing ``pipeline``'s modules with its own scheduler and interrupt flag."""
    components = {**pipeline.components, "scheduler": fresh_scheduler(pipeline, scheduler_name)}
    # Only a class that takes a safety checker takes requires_safety_checker (FluxPipeline and SDXL's do not):
    # without the repo's own checker, it would warn on every request (TXT2IMG_SAFETY_CHECKER decides instead).
    family = family_of_pipeline(type(pipeline).__name__)
    if family is not None and family.safety_checker:
        components["requires_safety_checker"] = False
    view = type(pipeline)(**components)
    view.set_progress_bar_config(disable=True)
    return view


def negatives_apply(pipeline, guidance_scale: float, true_cfg_scale: float | None) -> bool:
    """Whether a call with these scales uses negative prompts: Flux takes them only through true CFG, the
    other families through classifier-free guidance."""
    family = family_of_pipeline(type(pipeline).__name__)
    if family is not None and family.true_cfg:
        return (true_cfg_scale or 1) > 1
    return guidance_scale > 1


def generate_images(
    pipeline,
    items: list[BatchItem],
    *,
    width: int,
    height: int,
    num_inference_steps: int,
    guidance_scale: float,
    scheduler: str | None = None,
    true_cfg_scale: float | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_step: Callable[[int], None] = lambda step: None,
    prompt_cache: PromptEmbeddingCache | None = None,
    adapter_mix: AdapterMix | None = None,
) -> list:
    """Generate one PIL image per item, in one pipeline call (one per prompt length, when a1111 prompts
    past the text encoder's window make embeddings of several lengths; see serving/prompts.py).

    ``should_stop`` is asked after every denoising step; once it says yes, the remaining steps
    are skipped. ``on_step`` receives the number of steps done, for progress bars. ``true_cfg_scale``
    is Flux's true CFG (serving/schema.py ``check_family`` keeps it from other families).
    ``prompt_cache`` keeps encoded prompts between calls. ``adapter_mix``: each item's LoRA scales, for a
    batch of several LoRA sets (serving/mixed_loras.py); None runs the adapters the pipeline has switched on.
    """
    import torch

    view = request_pipeline(pipeline, scheduler)
    most_steps = scheduler_most_steps(view.scheduler)
    if num_inference_steps > most_steps:
        raise LimitExceeded("num_inference_steps", most_steps, num_inference_steps)

    def after_step(step_pipeline, step, timestep, callback_kwargs):
        on_step(step + 1)
        if should_stop():
            step_pipeline._interrupt = True
        return callback_kwargs

    texts = [(item.prompt, item.negative_prompt, item.prompt_syntax) for item in items]
    negatives = negatives_apply(pipeline, guidance_scale, true_cfg_scale)
    images = [None] * len(items)
    for indices, text_inputs in prompt_inputs(pipeline, texts, negatives, prompt_cache):
        # CPU generators give the same image on any device; one per image keeps each seed its own.
        generators = [torch.Generator("cpu").manual_seed(items[index].seed) for index in indices]
        mixing = nullcontext() if adapter_mix is None else mixed_loras(view.unet, adapter_mix.rows(indices))
        with torch.inference_mode(), mixing:
            output = view(
                **text_inputs,
                width=width,
                height=height,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
                callback_on_step_end=after_step,
                **SAMPLER_CALL_ARGUMENTS.get(scheduler, {}),
                **({} if true_cfg_scale is None else {"true_cfg_scale": true_cfg_scale}),
            )
        for index, image in zip(indices, output.images):
            images[index] = image
    return images


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says the device ran out of memory: torch's OutOfMemoryError (CUDA, MPS),
    Python's MemoryError, or the RuntimeError torch's CPU allocator raises."""
    import torch

    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
