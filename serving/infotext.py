"""The two records an image carries about how it was made, written from a recipe's fields (the one
definition of a recipe is serving/recipes.py's Recipe): AUTOMATIC1111's ``parameters`` infotext, and the
recipe itself as JSON. The SageMaker archive carries this module beside serving/images.py
(jumpstart/package.py), so that the endpoint's images carry the same records as the server's; it
imports nothing but the standard library.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from serving.images import PARAMETERS_KEY, RECIPE_KEY

# A1111's sampler names, each with our scheduler and A1111's aliases for it.
SAMPLERS: dict[str, tuple[str, list[str]]] = {
    "Euler a": ("euler-a", ["k_euler_a", "k_euler_ancestral"]),
    "Euler": ("euler", ["k_euler"]),
    "LMS": ("lms", ["k_lms"]),
    "DPM++ 2M": ("dpm++", ["k_dpmpp_2m"]),
    "DDIM": ("ddim", []),
    "PLMS": ("pndm", ["PNDM"]),  # SD's PLMS is diffusers' PNDM without its Runge-Kutta warm-up steps
    "UniPC": ("unipc", []),
    "LCM": ("lcm", ["k_lcm"]),  # built into A1111 since 1.7
    # A1111 has no TCD of its own; its TCD extension, Forge's and ComfyUI's samplers spell it so.
    "TCD": ("tcd", []),
}
# On a flow-matching family (Flux), A1111's (Forge's) samplers and the schedulers they run.
FLOW_MATCHING_SAMPLERS = {"Euler": "flow-euler"}
# Our scheduler names as A1111 spells them, for the infotext's "Sampler:".
A1111_SAMPLERS = {scheduler: name for name, (scheduler, _) in SAMPLERS.items()} | {
    scheduler: name for name, scheduler in FLOW_MATCHING_SAMPLERS.items()
}


def parameters_text(recipe: Mapping[str, Any]) -> str:
    """A1111's infotext: the prompt, ``Negative prompt: ...``, then ``Steps: ..., Sampler: ..., ...``.

    The LoRAs end the prompt as AUTOMATIC1111's ``<lora:NAME:SCALE>`` tags, where A1111 keeps them, so that
    the infotext read back (``/sdapi/v1/png-info``, or pasted into A1111) applies them again."""
    tags = [f"<lora:{lora['model']}:{lora['scale']:g}>" for lora in recipe.get("loras", [])]
    lines = [" ".join([recipe["prompt"], *tags])]
    if recipe.get("negative_prompt"):
        lines.append(f"Negative prompt: {recipe['negative_prompt']}")
    fields = [f"Steps: {recipe['num_inference_steps']}"]
    if recipe.get("scheduler"):
        fields.append(f"Sampler: {A1111_SAMPLERS[recipe['scheduler']]}")
    fields += [
        f"CFG scale: {recipe['guidance_scale']:g}",
        f"Seed: {recipe['seed']}",
        f"Size: {recipe['width']}x{recipe['height']}",
        f"Model hash: {recipe['model_sha'][:10]}",
        f"Model: {recipe['model']}",
        f"Version: txt2img {recipe['txt2img_version']}",
    ]
    lines.append(", ".join(fields))
    return "\n".join(lines)


def recipe_records(recipe: Mapping[str, Any]) -> dict[str, str]:
    """What serving/images.py embeds in an image: the infotext and the recipe's JSON."""
    return {
        PARAMETERS_KEY: parameters_text(recipe),
        RECIPE_KEY: json.dumps(recipe, ensure_ascii=False, separators=(",", ":")),
    }
