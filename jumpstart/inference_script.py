"""``code/inference.py`` of the model archives txt2img builds: the Hugging Face inference container's entry point.

SageMaker's Hugging Face PyTorch inference container calls ``model_fn(model_dir, context)`` once
and ``transform_fn(model, body, content_type, accept, context)`` per request. The wire format,
JumpStart's text-to-image contract, is serving/invocations.py, which the packer copies next to
this file as ``code/serving/invocations.py``: the import below finds it there in the container
and in this checkout alike. Only this file's generation loop is the container's own.

This file must only import what that container has: no other txt2img module.
"""

from __future__ import annotations

from http import HTTPStatus

from serving.invocations import (
    Invocation,
    InvocationError,
    negotiate_accept,
    parse_request,
    render_error,
    render_response,
)


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


def generate(pipeline, invocation: Invocation) -> list:
    """Every wanted image of the invocation, ``batch_size`` images per pipeline call, each from its own seed."""
    import torch

    wanted = invocation.wanted_images()
    images = []
    for start in range(0, len(wanted), invocation.batch_size):
        chunk = wanted[start : start + invocation.batch_size]
        negatives = [image.negative_prompt or "" for image in chunk]
        # CPU generators, one per image: the same seed gives the same image here and on the local server.
        generators = [torch.Generator("cpu").manual_seed(image.seed) for image in chunk]
        with torch.inference_mode():
            output = pipeline(
                prompt=[image.prompt for image in chunk],
                negative_prompt=negatives if any(negatives) else None,
                width=invocation.width,
                height=invocation.height,
                num_inference_steps=invocation.num_inference_steps,
                guidance_scale=invocation.guidance_scale,
                generator=generators,
            )
        images.extend(output.images)
    return images


def sent_accept(accept, context):
    """The Accept header as the client sent it.

    The container hands ``transform_fn`` ``application/json`` when the client sent no Accept or
    ``*/*``, which would answer RGB arrays where JumpStart's default is JPEG; its context still
    holds the header itself.
    """
    if context is None:
        return accept
    headers = context.request_processor[0].get_request_properties()
    return next((value for name, value in headers.items() if name.lower() == "accept"), None)


def transform_fn(model, input_data, content_type, accept, context=None):
    """One request: the JSON answer, or the JSON error with its HTTP status.

    Without a context (a direct call) an error is raised instead, and the container would answer
    it with 400 and the message.
    """
    try:
        accept_type = negotiate_accept(sent_accept(accept, context))
        invocation = parse_request(input_data, content_type)
        return render_response(invocation, generate(model, invocation), accept_type)
    except InvocationError as error:
        if context is None:
            raise
        context.set_response_status(error.status, HTTPStatus(error.status).phrase)
        return render_error(error)
