"""A JumpStart invocation (serving/invocations.py) as the GenerationRequests the local queue runs."""

from __future__ import annotations

from serving.invocations import Invocation
from serving.schema import GenerationRequest


def generation_requests(invocation: Invocation, model: str) -> list[GenerationRequest]:
    """One request per prompt for its ``num_images_per_prompt`` images, seeded as the wire format says."""
    per_prompt = invocation.num_images_per_prompt
    requests = []
    # A request's image i uses its seed + i, so each prompt's first wanted image sets its seed.
    for first in invocation.wanted_images()[::per_prompt]:
        fields = {
            "model": model,
            "prompt": first.prompt,
            "negative_prompt": first.negative_prompt,
            "width": invocation.width,
            "height": invocation.height,
            "num_inference_steps": invocation.num_inference_steps,
            # guidance_scale <= 1 disables guidance in JumpStart; ours too, clamped to our lower bound.
            "guidance_scale": max(invocation.guidance_scale, 0.0),
            "num_images": per_prompt,
            "seed": first.seed,
        }
        requests.append(GenerationRequest(**{name: value for name, value in fields.items() if value is not None}))
    return requests
