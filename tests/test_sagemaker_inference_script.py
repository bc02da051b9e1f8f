"""code/inference.py, the Hugging Face container's entry point, on tiny-sd in this process.

The wire format it speaks is tested against the local server in test_invocations_parity.py;
here: what is the entry point's own, the container's handler signatures, batching and errors.
"""

from __future__ import annotations

import base64
import inspect
import io
import json

import numpy as np
import pytest
from PIL import Image

from jumpstart import inference_script as script
from serving.invocations import InvocationError, NotAcceptable

# No test here may leave the machine.
pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def pipeline():
    import torch

    from catalog.tiny_sd import build_tiny_sd_pipeline

    # One thread: the tiny model gains nothing from more, and the test machine is shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipeline = build_tiny_sd_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    yield pipeline
    torch.set_num_threads(threads)


class _Context:
    """The model server context the container passes: request headers in, response status out."""

    def __init__(self, headers: dict):
        self.headers = headers
        self.status = None
        self.request_processor = [self]

    def get_request_properties(self) -> dict:
        return self.headers

    def set_response_status(self, code=200, phrase="", idx=0):
        self.status = (code, phrase)


def _images(answer: str) -> list[np.ndarray]:
    return [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(item))), dtype=np.int16)
        for item in json.loads(answer)["generated_images"]
    ]


def test_handlers_have_the_signatures_the_hugging_face_container_passes_context_to():
    # The container passes its context when a handler has as many parameters as its own default.
    assert list(inspect.signature(script.model_fn).parameters) == ["model_dir", "context"]
    assert list(inspect.signature(script.transform_fn).parameters) == [
        "model",
        "input_data",
        "content_type",
        "accept",
        "context",
    ]


def test_batch_size_groups_images_into_pipeline_calls_without_changing_them(pipeline):
    calls = []

    def counting(**arguments):
        calls.append(len(arguments["prompt"]))
        return pipeline(**arguments)

    body = {"prompt": ["a dog", "a cat"], "num_images_per_prompt": 2, "width": 32, "height": 32}
    body |= {"num_inference_steps": 2, "seed": 3}
    one_by_one = script.transform_fn(counting, json.dumps(body), "application/json", "application/json;jpeg")
    in_threes = script.transform_fn(
        counting, json.dumps(body | {"batch_size": 3}), "application/json", "application/json;jpeg"
    )
    assert calls == [1, 1, 1, 1, 3, 1]
    for alone, batched in zip(_images(one_by_one), _images(in_threes)):
        assert np.abs(alone - batched).mean() < 0.5


def test_without_context_an_error_is_raised_for_the_container_to_answer(pipeline):
    with pytest.raises(InvocationError, match="unknown parameter"):
        script.transform_fn(pipeline, '{"prompt": "x", "steps": 2}', "application/json", "application/json;jpeg")
    with pytest.raises(NotAcceptable):
        script.transform_fn(pipeline, '{"prompt": "x"}', "application/json", "image/png")


def test_with_context_an_error_is_the_json_body_with_its_status(pipeline):
    context = _Context({"Accept": "image/png"})
    answer = script.transform_fn(pipeline, '{"prompt": "x"}', "application/json", "image/png", context)
    assert context.status == (406, "Not Acceptable")
    assert "unsupported accept type 'image/png'" in json.loads(answer)["error"]


def test_the_accept_the_client_sent_wins_over_the_containers_stand_in(pipeline):
    body = json.dumps({"prompt": "x", "width": 16, "height": 16, "num_inference_steps": 1})
    # The container passes application/json when the client sent no Accept or */*.
    for headers in ({}, {"accept": "*/*"}):
        answer = script.transform_fn(pipeline, body, "application/json", "application/json", _Context(headers))
        assert isinstance(json.loads(answer)["generated_images"][0], str)  # JPEG, JumpStart's default
    answer = script.transform_fn(
        pipeline, body, "application/json", "application/json", _Context({"Accept": "application/json"})
    )
    assert np.array(json.loads(answer)["generated_images"][0]).shape == (16, 16, 3)


@pytest.fixture()
def packed_model_dir(tmp_path):
    """tiny-sd as ``txt2img deploy --safety-checker`` packs it, with a checker that flags every image."""
    from tiny_safety_checker import save_tiny_safety_checker

    from catalog.pipelines import export_model
    from catalog.store import load_catalog
    from jumpstart.package import add_safety_checker

    model_dir = export_model("tiny-sd", tmp_path / "model", load_catalog())
    add_safety_checker(model_dir, str(save_tiny_safety_checker(tmp_path / "checker", flag_everything=True)))
    return model_dir


SMALL = json.dumps({"prompt": ["a dog", "a cat"], "width": 32, "height": 32, "num_inference_steps": 1})


def test_with_the_safety_checker_on_flagged_images_are_black_and_listed(packed_model_dir, monkeypatch):
    monkeypatch.setenv("TXT2IMG_SAFETY_CHECKER", "on")
    model = script.model_fn(str(packed_model_dir))
    answer = json.loads(script.transform_fn(model, SMALL, "application/json", "application/json"))
    assert answer["nsfw_content_detected"] == [True, True]
    assert not np.array(answer["generated_images"]).any()


def test_with_the_safety_checker_off_the_packed_one_does_not_run(packed_model_dir, monkeypatch):
    monkeypatch.delenv("TXT2IMG_SAFETY_CHECKER", raising=False)
    model = script.model_fn(str(packed_model_dir))
    assert model.safety_checker is None
    answer = json.loads(script.transform_fn(model, SMALL, "application/json", "application/json"))
    assert "nsfw_content_detected" not in answer
    assert np.array(answer["generated_images"]).any()


def test_the_safety_checker_on_without_one_packed_stops_the_container(tmp_path, monkeypatch):
    from catalog.pipelines import export_model
    from catalog.store import load_catalog

    monkeypatch.setenv("TXT2IMG_SAFETY_CHECKER", "on")
    model_dir = export_model("tiny-sd", tmp_path / "model", load_catalog())
    with pytest.raises(RuntimeError, match="txt2img deploy --safety-checker"):
        script.model_fn(str(model_dir))


def test_the_pipeline_is_found_where_each_kind_of_archive_puts_it(tmp_path):
    from training.dreambooth import MODEL_DIR
    from training.servable import FUSED_DIR

    # At the root of a packed archive; model/ (full) or fused/ (LoRA) in a job of txt2img's trainer.
    assert {"", MODEL_DIR, FUSED_DIR} == set(script.PIPELINE_FOLDERS)
    with pytest.raises(RuntimeError, match="no diffusers pipeline"):
        script.pipeline_folder(tmp_path)
    (tmp_path / FUSED_DIR).mkdir()
    (tmp_path / FUSED_DIR / "model_index.json").write_text("{}")
    (tmp_path / MODEL_DIR).mkdir()  # a LoRA's adapter alone: no pipeline
    assert script.pipeline_folder(tmp_path) == str(tmp_path / FUSED_DIR)
    (tmp_path / "model_index.json").write_text("{}")
    assert script.pipeline_folder(str(tmp_path)) == str(tmp_path)
