"""The code/inference.py packaged for local models: JumpStart's text-to-image contract on tiny-sd."""

from __future__ import annotations

import base64
import io
import json

import pytest
from aws_fixtures import no_network  # noqa: F401 - autouse
from PIL import Image

from jumpstart import inference_script as script


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    import torch

    from catalog.pipelines import export_model
    from catalog.store import load_catalog

    # One thread: the tiny model gains nothing from more, and the test machine is shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model_dir = export_model("tiny-sd", tmp_path_factory.mktemp("model") / "tiny", load_catalog())
    yield script.model_fn(str(model_dir))
    torch.set_num_threads(threads)


def _call(pipeline, body, content_type="application/json", accept="application/json;jpeg"):
    payload = json.dumps(body) if isinstance(body, dict) else body
    return json.loads(script.transform_fn(pipeline, payload.encode(), content_type, accept))


def test_json_request_returns_base64_jpegs_per_prompt_copy(pipeline):
    body = {
        "prompt": ["a dog", "a cat"],
        "num_images_per_prompt": 2,
        "width": 64,
        "height": 48,
        "num_inference_steps": 2,
        "guidance_scale": 7.5,
        "negative_prompt": ["blurry", "dark"],
        "seed": 3,
        "batch_size": 3,
    }
    answer = _call(pipeline, body)
    assert answer["prompt"] == ["a dog", "a cat"]
    images = [Image.open(io.BytesIO(base64.b64decode(item))) for item in answer["generated_images"]]
    assert [(image.format, image.size) for image in images] == [("JPEG", (64, 48))] * 4


def test_seed_makes_generation_repeatable(pipeline):
    body = {"prompt": "a dog", "num_inference_steps": 2, "width": 32, "height": 32, "seed": 7}
    assert _call(pipeline, body) == _call(pipeline, body)
    other = _call(pipeline, dict(body, seed=8))
    assert other["generated_images"] != _call(pipeline, body)["generated_images"]


class _OneStep:
    """The real pipeline, run for one step: a text request otherwise gets the model's 50."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def __call__(self, **arguments):
        return self.pipeline(**arguments, num_inference_steps=1)


def test_text_request_is_the_raw_prompt_answered_as_one_generated_image(pipeline):
    assert script.parse_request(b"a lighthouse", "application/x-text") == (
        {"prompt": "a lighthouse"},
        "generated_image",
    )
    answer = _call(_OneStep(pipeline), "a lighthouse", content_type="application/x-text")
    assert answer["prompt"] == "a lighthouse"
    image = Image.open(io.BytesIO(base64.b64decode(answer["generated_image"])))
    assert image.size == (64, 64)  # tiny-sd's native size


def test_plain_json_accept_returns_rgb_arrays(pipeline):
    answer = _call(
        pipeline,
        {"prompt": "a dog", "num_inference_steps": 1, "width": 16, "height": 8},
        accept="application/json;verbose",
    )
    array = answer["generated_images"][0]
    assert (len(array), len(array[0]), len(array[0][0])) == (8, 16, 3)


@pytest.mark.parametrize(
    ("body", "content_type", "accept", "message"),
    [
        (
            {"prompt": "x", "steps": 2},
            "application/json",
            "application/json;jpeg",
            r"unknown parameter\(s\) \['steps'\]",
        ),
        (
            {"prompt": "x", "width": 65},
            "application/json",
            "application/json;jpeg",
            "'width' must be an integer divisible by 8",
        ),
        ({"width": 64}, "application/json", "application/json;jpeg", "'prompt' is required"),
        (
            {"prompt": ["a"], "negative_prompt": "b"},
            "application/json",
            "application/json;jpeg",
            "must be a list exactly",
        ),
        ({"prompt": "x", "seed": "1"}, "application/json", "application/json;jpeg", "'seed' must be an integer"),
        ({"prompt": "x"}, "image/png", "application/json;jpeg", "unsupported content type image/png"),
        ({"prompt": "x"}, "application/json", "image/png", "unsupported accept type image/png"),
    ],
)
def test_bad_requests_name_the_problem(body, content_type, accept, message):
    with pytest.raises(script.RequestError, match=message):
        script.transform_fn(None, json.dumps(body), content_type, accept)


def test_handlers_have_the_signatures_the_hugging_face_container_passes_context_to():
    # The container passes its context when a handler has as many parameters as its own default.
    import inspect

    assert list(inspect.signature(script.model_fn).parameters) == ["model_dir", "context"]
    assert list(inspect.signature(script.transform_fn).parameters) == [
        "model",
        "input_data",
        "content_type",
        "accept",
        "context",
    ]
