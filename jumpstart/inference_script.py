"""``code/inference.py`` of the model archives txt2img builds: the Hugging Face inference container's entry point.

SageMaker's Hugging Face PyTorch inference container calls ``model_fn(model_dir, context)`` once
and ``transform_fn(model, body, content_type, accept, context)`` per request. The wire format,
JumpStart's text-to-image contract, is serving/invocations.py, which the packer copies next to
this file as ``code/serving/invocations.py``: the import below finds it there in the container
and in this checkout alike. The family table (catalog/families.py, copied as ``code/catalog/``)
gives the defaults of the fields a request leaves out, and refuses what the model's family cannot
use, as the local server does. Every JPEG carries its recipe as the local server's do: the records of
serving/infotext.py (copied as ``code/serving/infotext.py``) from the model identity packed beside this
file. Only this file's generation loop is the container's own.

With env TXT2IMG_SAFETY_CHECKER=on (``txt2img deploy --safety-checker`` sets it, and packs a
checker into the archive) the pipeline's own safety checker runs: flagged images come back black
and the answer's ``nsfw_content_detected`` says which. Otherwise the pipeline runs without one.

This file must only import what that container has: no other txt2img module.
"""

from __future__ import annotations

import inspect
import json
import os
from http import HTTPStatus

from catalog.families import Family, family_of_pipeline
from serving.infotext import recipe_records
from serving.invocations import (
    Invocation,
    InvocationError,
    negotiate_accept,
    parse_request,
    render_error,
    render_response,
)

SAFETY_CHECKER_ENV = "TXT2IMG_SAFETY_CHECKER"
# The model's identity in every image's recipe (jumpstart/package.py model_identity), beside this file.
MODEL_IDENTITY_FILE = "txt2img_model.json"
# Where the diffusers folder lies in the extracted archive: at its root in the archives ``txt2img deploy``
# packs; in the model.tar.gz of txt2img's trainer on SageMaker, in model/ for a full fine-tune, and in
# fused/ for a LoRA (fused into its base there; model/ holds only the adapter). The first that has one wins.
PIPELINE_FOLDERS = ("", "model", "fused")


def safety_checker_on() -> bool:
    return os.environ.get(SAFETY_CHECKER_ENV, "off").strip().lower() in ("1", "on", "true", "yes")


def pipeline_folder(model_dir) -> str:
    """The diffusers folder in the extracted archive (see PIPELINE_FOLDERS)."""
    for folder in PIPELINE_FOLDERS:
        candidate = os.path.join(model_dir, folder) if folder else str(model_dir)
        if os.path.isfile(os.path.join(candidate, "model_index.json")):
            return candidate
    raise RuntimeError(
        f"no diffusers pipeline (model_index.json) in {model_dir} or its folders "
        f"{', '.join(folder for folder in PIPELINE_FOLDERS if folder)}"
    )


def model_fn(model_dir, context=None):
    """Load the diffusers folder of the extracted model archive, with its safety checker if it is on."""
    import torch
    from diffusers import DiffusionPipeline

    cuda = torch.cuda.is_available()
    checking = safety_checker_on()
    pipeline = DiffusionPipeline.from_pretrained(
        pipeline_folder(model_dir),
        torch_dtype=torch.float16 if cuda else torch.float32,
        use_safetensors=True,
        **({} if checking else {"safety_checker": None}),
    )
    if checking and getattr(pipeline, "safety_checker", None) is None:
        raise RuntimeError(
            f"{SAFETY_CHECKER_ENV} is on, but the model archive holds no safety checker; "
            "deploy the model with `txt2img deploy --safety-checker`"
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to("cuda" if cuda else "cpu")


def family_settings(family: Family | None, invocation: Invocation) -> dict:
    """The steps and guidance of the invocation, its family's defaults where it names none (a pipeline of a
    class no family runs keeps its own, as JumpStart's script does). A negative prompt that the family takes
    only through true CFG (Flux), which JumpStart's format cannot ask for, is refused."""
    settings = {"num_inference_steps": invocation.num_inference_steps, "guidance_scale": invocation.guidance_scale}
    if family is None:
        return {name: value for name, value in settings.items() if value is not None}
    if family.true_cfg and any(image.negative_prompt for image in invocation.wanted_images()):
        raise InvocationError(
            f"a {family.pipeline_class} takes a negative prompt only through true CFG (true_cfg_scale), which "
            "this format cannot ask for; send the request without 'negative_prompt'"
        )
    defaults = {"num_inference_steps": family.default_steps, "guidance_scale": family.default_guidance}
    return {name: defaults[name] if value is None else value for name, value in settings.items()}


def generate(pipeline, invocation: Invocation) -> tuple[list, list[bool] | None]:
    """Every wanted image of the invocation, ``batch_size`` images per pipeline call, each from its own seed,
    and the safety checker's verdict on each (None without a checker)."""
    import torch

    if invocation.prompt_syntax not in ("plain", None):
        raise InvocationError(
            f"prompt_syntax {invocation.prompt_syntax!r}: this endpoint reads prompts as written ('plain'); "
            "AUTOMATIC1111's syntax ('a1111') is read by txt2img's own server (bentoml serve)"
        )
    if invocation.loras != []:
        raise InvocationError(
            "loras: this endpoint serves its one model; per-request LoRAs are applied by txt2img's own server "
            "(bentoml serve), or deploy the LoRA fine-tune itself"
        )
    settings = family_settings(family_of_pipeline(type(pipeline).__name__), invocation)
    wanted = invocation.wanted_images()
    images = []
    flags = None
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
                generator=generators,
                **settings,
            )
        images.extend(output.images)
        if getattr(output, "nsfw_content_detected", None) is not None:  # only SD 1 and 2 have a checker
            flags = (flags or []) + [bool(flag) for flag in output.nsfw_content_detected]
    return images, flags


def packed_model_identity() -> dict | None:
    """The model's catalog id, entry SHA-256 and txt2img version, packed beside this file; None in an
    archive packed without them (a training job's, whose model has no catalog entry yet)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), MODEL_IDENTITY_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        return json.load(file)


MODEL_IDENTITY = packed_model_identity()


def image_recipes(pipeline, invocation: Invocation, images: list) -> list[dict[str, str]] | None:
    """The records each image carries (serving/infotext.py): its recipe, with the fields of txt2img's Recipe
    (serving/recipes.py) in their order, as the local server writes it; None without the model's identity."""
    if MODEL_IDENTITY is None:
        return None
    settings = family_settings(family_of_pipeline(type(pipeline).__name__), invocation)
    call_defaults = inspect.signature(pipeline.__call__).parameters  # a pipeline no family runs keeps its own
    steps, guidance = (
        settings.get(name, call_defaults[name].default) for name in ("num_inference_steps", "guidance_scale")
    )
    return [
        recipe_records(
            {
                "model": MODEL_IDENTITY["model"],
                "model_sha": MODEL_IDENTITY["model_sha"],
                "loras": [],  # a LoRA fine-tune is packed fused into its base: its own id names it
                "prompt": wanted.prompt,
                "negative_prompt": wanted.negative_prompt or None,
                "prompt_syntax": "plain",
                "seed": wanted.seed,
                "width": image.width,
                "height": image.height,
                "num_inference_steps": steps,
                "guidance_scale": float(guidance),
                "scheduler": None,  # the model's own
                "txt2img_version": MODEL_IDENTITY["txt2img_version"],
            }
        )
        for wanted, image in zip(invocation.wanted_images(), images)
    ]


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
        images, nsfw_content_detected = generate(model, invocation)
        recipes = image_recipes(model, invocation, images)
        return render_response(invocation, images, accept_type, nsfw_content_detected, recipes)
    except InvocationError as error:
        if context is None:
            raise
        context.set_response_status(error.status, HTTPStatus(error.status).phrase)
        return render_error(error)
