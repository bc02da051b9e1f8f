"""A JumpStart invocation (serving/invocations.py) as the GenerationRequests the local queue runs."""

from __future__ import annotations

from serving.invocations import Invocation
from serving.schema import GenerationRequest, LimitExceeded
from serving.settings import ServingSettings


def check_invocation_limits(invocation: Invocation, settings: ServingSettings) -> None:
    """Limits that apply to the whole invocation, not to each prompt's request on its own.

    TXT2IMG_MAX_IMAGES counts every image (prompts x num_images_per_prompt). A prompt list longer
    than the queue could never be queued at once, so it is refused now rather than with a 429.
    """
    if invocation.image_count > settings.max_images:
        raise LimitExceeded("images", settings.max_images, invocation.image_count)
    if len(invocation.prompts) > settings.max_queue:
        raise LimitExceeded("prompts", settings.max_queue, len(invocation.prompts))


def generation_requests(invocation: Invocation, settings: ServingSettings) -> list[GenerationRequest]:
    """One request per prompt for its ``num_images_per_prompt`` images, seeded as the wire format says."""
    check_invocation_limits(invocation, settings)
    per_prompt = invocation.num_images_per_prompt
    requests = []
    # A request's image i uses its seed + i, so each prompt's first wanted image sets its seed.
    for first in invocation.wanted_images()[::per_prompt]:
        fields = {
            "model": settings.model,
            "prompt": first.prompt,
            "negative_prompt": first.negative_prompt,
            "width": invocation.width,
            "height": invocation.height,
            "num_inference_steps": invocation.num_inference_steps,
            # guidance_scale <= 1 disables guidance in JumpStart; ours too, clamped to our lower bound.
            "guidance_scale": None if invocation.guidance_scale is None else max(invocation.guidance_scale, 0.0),
            "num_images": per_prompt,
            "seed": first.seed,
            "prompt_syntax": invocation.prompt_syntax,
        }
        given = {name: value for name, value in fields.items() if value is not None}
        requests.append(GenerationRequest(**given, loras=invocation.loras))  # null too: refused as on /images
    return requests
