"""The inference script packaged as ``code/inference.py`` for models deployed from local weights.

It runs inside SageMaker's Hugging Face PyTorch inference container, which calls
``model_fn(model_dir, context)`` once and ``transform_fn(model, body, content_type, accept, context)``
per request, and it speaks SageMaker JumpStart's text-to-image
contract so one client works for JumpStart endpoints, these endpoints and the local server:

* ``application/x-text``: the body is the prompt; the answer has one ``generated_image``.
* ``application/json``: ``{"prompt", "width", "height", "num_inference_steps", "guidance_scale",
  "negative_prompt", "num_images_per_prompt", "seed", "batch_size", "eta"}``.
* Accept ``application/json;jpeg``: images as base64 JPEG strings; ``application/json``: nested
  RGB arrays; a ``;verbose`` suffix is accepted and changes nothing.

This file must only import what that container has: no txt2img modules.
"""

from __future__ import annotations

import base64
import io
import json

PARAMETER_NAMES = (
    "prompt",
    "width",
    "height",
    "num_inference_steps",
    "guidance_scale",
    "negative_prompt",
    "num_images_per_prompt",
    "seed",
    "batch_size",
    "eta",
)
JPEG_QUALITY = 90


class RequestError(ValueError):
    """The request breaks the JumpStart contract; the message names the problem."""


def model_fn(model_dir, context=None):
    """Load the diffusers folder the model archive was extracted to."""
    import torch
    from diffusers import DiffusionPipeline

    cuda = torch.cuda.is_available()
    pipeline = DiffusionPipeline.from_pretrained(
        model_dir, torch_dtype=torch.float16 if cuda else torch.float32, use_safetensors=True
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to("cuda" if cuda else "cpu")


def _positive_int(payload: dict, name: str) -> None:
    value = payload.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise RequestError(f"'{name}' must be an integer >= 1")


def parse_request(body, content_type: str) -> tuple[dict, str]:
    """The validated generation parameters, and the response key the contract uses for them."""
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8")
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "application/x-text":
        return {"prompt": body}, "generated_image"
    if media_type != "application/json":
        raise RequestError(f"unsupported content type {content_type}; use application/json or application/x-text")
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as error:
        raise RequestError(f"the body is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise RequestError("the JSON body must be an object")
    unknown = sorted(set(payload) - set(PARAMETER_NAMES))
    if unknown:
        raise RequestError(f"unknown parameter(s) {unknown}; allowed: {list(PARAMETER_NAMES)}")
    prompt = payload.get("prompt")
    if not (
        isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))
    ):
        raise RequestError("'prompt' is required: a string or a list of strings")
    for name in ("width", "height"):
        value = payload.get(name)
        if value is not None and (not isinstance(value, int) or value < 8 or value % 8):
            raise RequestError(f"'{name}' must be an integer divisible by 8")
    for name in ("num_inference_steps", "num_images_per_prompt", "batch_size"):
        _positive_int(payload, name)
    for name in ("guidance_scale", "eta"):
        value = payload.get(name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise RequestError(f"'{name}' must be a number")
    negative = payload.get("negative_prompt")
    if negative is not None and isinstance(prompt, list) != isinstance(negative, list):
        raise RequestError("'negative_prompt' must be a list exactly when 'prompt' is a list")
    if "seed" in payload and (not isinstance(payload["seed"], int) or isinstance(payload["seed"], bool)):
        raise RequestError("'seed' must be an integer")
    return payload, "generated_images"


def generate(pipeline, parameters: dict) -> list:
    """Run the pipeline: every prompt ``num_images_per_prompt`` times, ``batch_size`` prompts per call."""
    import torch

    parameters = dict(parameters)
    prompts = parameters.pop("prompt")
    prompts = [prompts] if isinstance(prompts, str) else prompts
    negatives = parameters.pop("negative_prompt", None)
    negatives = [negatives] * len(prompts) if isinstance(negatives, str) else negatives
    copies = parameters.pop("num_images_per_prompt", 1)
    batch_size = parameters.pop("batch_size", 1)
    seed = parameters.pop("seed", None)
    generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    if parameters.get("guidance_scale") is not None and parameters["guidance_scale"] <= 1:
        negatives = None  # without guidance there is nothing to steer away from
    queue = [
        (prompt, negatives[index] if negatives else None) for index, prompt in enumerate(prompts) for _ in range(copies)
    ]
    images = []
    for start in range(0, len(queue), batch_size):
        chunk = queue[start : start + batch_size]
        call = dict(parameters, prompt=[prompt for prompt, _ in chunk], generator=generator)
        if negatives:
            call["negative_prompt"] = [negative for _, negative in chunk]
        images.extend(pipeline(**call).images)
    return images


def accepted_format(accept: str | None) -> str:
    """``jpeg`` or ``array``: how the Accept type wants the images; checked before any work is done."""
    media_type = (accept or "application/json;jpeg").replace(";verbose", "").replace(" ", "").lower()
    if media_type in ("application/json;jpeg", "*/*"):
        return "jpeg"
    if media_type == "application/json":
        return "array"
    raise RequestError(f"unsupported accept type {accept}; use application/json;jpeg or application/json")


def encode_images(images: list, image_format: str) -> list:
    """Base64 JPEG strings, or nested RGB arrays."""
    if image_format == "array":
        import numpy as np

        return [np.asarray(image.convert("RGB")).tolist() for image in images]
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def transform_fn(model, input_data, content_type, accept, context=None):
    """One request: JumpStart JSON in, the JSON body out.

    The container sends it with the request's Accept as content type, and turns an exception into
    HTTP 400 with the exception's message.
    """
    image_format = accepted_format(accept)
    parameters, key = parse_request(input_data, content_type or "application/json")
    images = encode_images(generate(model, parameters), image_format)
    return json.dumps({key: images[0] if key == "generated_image" else images, "prompt": parameters["prompt"]})
