"""The OpenAI and A1111 adapters without a server: what they accept, refuse and build."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from pydantic import ValidationError

from catalog.schema import CatalogEntry
from catalog.store import Catalog
from jumpstart import inference_script
from serving.a1111 import A1111RequestError, a1111_lora, generation_request, parse_txt2img, progress
from serving.generation_queue import CallProgress
from serving.image_files import ImageFiles
from serving.invocation_requests import generation_requests
from serving.invocations import REQUEST_SCHEMA, InvocationError, parse_request
from serving.json_body import BodyError
from serving.openai_images import OpenAIRequestError, openai_error_response, parse_image_request
from serving.openai_images import generation_request as openai_generation_request
from serving.schema import GenerationRequest, LimitExceeded, LoraWeight
from serving.settings import ServingSettings

# The body A1111 1.10's /docs shows for POST /sdapi/v1/txt2img, as its own UI and many clients send it.
A1111_DEFAULTS = {
    "prompt": "a red cube",
    "negative_prompt": "",
    "styles": [],
    "seed": -1,
    "subseed": -1,
    "subseed_strength": 0,
    "seed_resize_from_h": -1,
    "seed_resize_from_w": -1,
    "sampler_name": "Euler a",
    "scheduler": "automatic",
    "batch_size": 1,
    "n_iter": 1,
    "steps": 50,
    "cfg_scale": 7,
    "width": 512,
    "height": 512,
    "restore_faces": None,
    "tiling": None,
    "do_not_save_samples": False,
    "do_not_save_grid": False,
    "eta": None,
    "denoising_strength": 0,
    "s_min_uncond": None,
    "s_churn": None,
    "s_tmax": None,
    "s_tmin": None,
    "s_noise": None,
    "override_settings": {},
    "override_settings_restore_afterwards": True,
    "refiner_checkpoint": None,
    "refiner_switch_at": None,
    "disable_extra_networks": False,
    "firstpass_image": None,
    "comments": {},
    "enable_hr": False,
    "firstphase_width": 0,
    "firstphase_height": 0,
    "hr_scale": 2,
    "hr_upscaler": None,
    "hr_second_pass_steps": 0,
    "hr_resize_x": 0,
    "hr_resize_y": 0,
    "hr_checkpoint_name": None,
    "hr_sampler_name": None,
    "hr_scheduler": None,
    "hr_prompt": "",
    "hr_negative_prompt": "",
    "force_task_id": None,
    "sampler_index": "Euler",
    "script_name": None,
    "script_args": [],
    "send_images": True,
    "save_images": False,
    "alwayson_scripts": {},
    "infotext": None,
}


def test_a1111_default_body_is_accepted_and_maps_onto_one_request():
    request, payload = parse_txt2img(json.dumps({**A1111_DEFAULTS, "batch_size": 2, "n_iter": 3}).encode())
    generation = generation_request(request)
    assert (generation.width, generation.height, generation.num_inference_steps) == (512, 512, 50)
    assert (generation.guidance_scale, generation.scheduler, generation.num_images) == (7, "euler-a", 6)
    assert 0 <= generation.seed < 2**32 and generation.model is None


def test_a1111_sampler_falls_back_to_sampler_index_and_takes_aliases():
    without_name = {**A1111_DEFAULTS, "sampler_name": None, "sampler_index": "k_dpmpp_2m"}
    assert generation_request(parse_txt2img(json.dumps(without_name).encode())[0]).scheduler == "dpm++"
    model = {**A1111_DEFAULTS, "override_settings": {"sd_model_checkpoint": "tiny-lora [0123abcd]"}}
    assert generation_request(parse_txt2img(json.dumps(model).encode())[0]).model == "tiny-lora"


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"enable_hr": True}, "enable_hr"),
        ({"tiling": True}, "tiling"),
        ({"subseed_strength": 0.5}, "subseed_strength"),
        ({"s_churn": 0.3}, "s_churn"),
        ({"styles": ["cinematic"]}, "styles"),
        ({"save_images": True}, "save_images"),
        ({"alwayson_scripts": {"ADetailer": {"args": [True, {}]}}}, "alwayson_scripts.ADetailer"),
    ],
)
def test_a1111_refuses_fields_that_ask_for_something(fields, field):
    with pytest.raises(A1111RequestError) as raised:
        parse_txt2img(json.dumps({**A1111_DEFAULTS, **fields}).encode())
    assert raised.value.field == field


def test_a1111_switched_off_scripts_pass():
    scripts = {"ADetailer": {"args": [False]}, "ControlNet": {"args": []}}
    parse_txt2img(json.dumps({**A1111_DEFAULTS, "alwayson_scripts": scripts}).encode())


def test_a1111_progress_is_zero_when_idle_and_a_fraction_while_running():
    idle = progress(None, 0)
    assert (idle["progress"], idle["eta_relative"], idle["state"]["job_count"]) == (0.0, 0.0, 0)
    running = progress(CallProgress(time.monotonic() - 2.0, 5, 20, 1), waiting=3)
    assert running["progress"] == 0.25 and running["state"]["job_count"] == 4
    assert 5.5 < running["eta_relative"] < 6.5  # 2 s for a quarter: some 6 s to go


def a1111_loras(prompt: str, catalog: Catalog | None = None, **fields) -> tuple[str, list[tuple[str, float]]]:
    request, _ = parse_txt2img(json.dumps({**A1111_DEFAULTS, "prompt": prompt, **fields}).encode())
    generation = generation_request(request, catalog=catalog)
    return generation.prompt, [(lora.model, lora.scale) for lora in generation.loras]


def test_a1111_lora_tags_leave_the_prompt_and_become_loras_in_order():
    prompt, loras = a1111_loras("a red <lora:tiny-lora:0.5>cube, <lyco:style> <lora:other:-1.25>")
    assert prompt == "a red cube,  " and loras == [("tiny-lora", 0.5), ("style", 1.0), ("other", -1.25)]
    assert a1111_loras("a red cube") == ("a red cube", [])
    # A1111 reads the tags of the prompt only, and none with disable_extra_networks.
    request, _ = parse_txt2img(json.dumps({**A1111_DEFAULTS, "negative_prompt": "<lora:x:1> blue"}).encode())
    assert generation_request(request).negative_prompt == "<lora:x:1> blue"
    assert a1111_loras("a <lora:x:1>", disable_extra_networks=True) == ("a <lora:x:1>", [])


def test_a1111_lora_tags_take_a1111s_named_strengths_when_they_agree():
    assert a1111_loras("a <lora:x:te=0.5>")[1] == [("x", 0.5)]
    assert a1111_loras("a <lora:x:0.5:0.5>")[1] == [("x", 0.5)]
    assert a1111_loras("a <lora:x:te=0.5:unet=0.5>")[1] == [("x", 0.5)]


@pytest.mark.parametrize(
    "tag, problem",
    [
        ("<lora:x:1:0.5>", "UNet strength"),
        ("<lora:x:unet=2>", "UNet strength"),
        ("<lora:x:1:1:8>", "dyn"),
        ("<lora:x:strong>", "'strong' is not a number"),
        ("<lora::1>", "names no LoRA"),
        ("<hypernet:x:1>", "type 'hypernet'"),
    ],
)
def test_a1111_lora_tags_that_ask_for_what_is_not_here_are_refused_naming_the_tag(tag, problem):
    with pytest.raises(A1111RequestError) as raised:
        a1111_loras(f"a red cube {tag}")
    assert raised.value.field == "prompt" and tag in str(raised.value) and problem in str(raised.value)


def test_a1111_lora_tag_names_a_catalog_id_or_the_files_a1111_alias(tmp_path):
    from safetensors.numpy import save_file

    weights = tmp_path / "cubes.safetensors"
    save_file({"lora": np.zeros(1)}, str(weights), metadata={"ss_output_name": "cubes_v2", "ss_tag": '{"a": 1}'})
    base = CatalogEntry(id="tiny-sd", source="builtin", family="tiny", resolution=64)
    lora = CatalogEntry(
        id="cubes", source="imported", family="tiny", resolution=64, base="tiny-sd", method="lora",
        artifact=str(weights), sha256="0" * 64, imported_from=str(weights),
    )  # fmt: skip
    catalog = Catalog([(base, tmp_path), (lora, tmp_path)])
    assert a1111_lora(lora) == {
        "name": "cubes",
        "alias": "cubes_v2",
        "path": str(weights),
        "metadata": {"ss_output_name": "cubes_v2", "ss_tag": {"a": 1}},
    }
    assert a1111_loras("<lora:cubes_v2:0.5> a", catalog)[1] == [("cubes", 0.5)]
    assert a1111_loras("<lora:cubes:0.5> a", catalog)[1] == [("cubes", 0.5)]
    # Neither an id nor an alias: passed on, for the engine to refuse naming it.
    assert a1111_loras("<lora:cube:0.5> a", catalog)[1] == [("cube", 0.5)]


LORAS = [{"model": "tiny-lora", "scale": 0.5}, {"model": "other"}]
BAD_LORAS = [
    [{"model": "tiny-lora", "scale": "0.5"}],
    [{"model": "tiny-lora", "scale": True}],
    [{"model": "tiny-lora", "weight": 1}],
    [{"model": "tiny-lora", "scale": 5}],
    [{"model": 3}],
    [{"model": ""}],
    ["tiny-lora"],
    "tiny-lora",
    {"model": "tiny-lora"},
    None,
]


def openai_loras(loras) -> list[LoraWeight]:
    return openai_generation_request(parse_image_request(json.dumps({"prompt": "a", "loras": loras}).encode())).loras


def invocation_loras(loras) -> list[LoraWeight]:
    body = json.dumps({"prompt": ["a", "b"], "loras": loras}).encode()
    requests = generation_requests(parse_request(body, "application/json"), ServingSettings(model="tiny-sd"))
    assert requests[0].loras == requests[1].loras
    return requests[0].loras


def images_loras(loras) -> list[LoraWeight]:
    return GenerationRequest.model_validate_json(json.dumps({"prompt": "a", "loras": loras})).loras


@pytest.mark.parametrize("route_loras", [images_loras, openai_loras, invocation_loras], ids=lambda f: f.__name__)
def test_every_route_takes_loras_as_sent_and_refuses_the_same_bad_ones(route_loras):
    expected = [LoraWeight(model="tiny-lora", scale=0.5), LoraWeight(model="other", scale=1.0)]
    assert route_loras(LORAS) == expected
    assert route_loras([]) == []
    for loras in BAD_LORAS:
        with pytest.raises(ValidationError) as raised:
            route_loras(loras)
        assert "loras" in str(raised.value), loras


def test_the_jumpstart_contract_states_the_lora_fields_and_the_container_refuses_them():
    assert set(REQUEST_SCHEMA["properties"]["loras"]["items"]["properties"]) == set(LoraWeight.model_fields)
    body = json.dumps({"prompt": "a", "loras": LORAS})
    with pytest.raises(InvocationError, match="loras: this endpoint serves its one model"):
        inference_script.transform_fn(None, body, "application/json", "application/json")


def test_openai_body_maps_onto_one_request():
    request = parse_image_request(b'{"prompt": "a", "n": 3, "size": "512x384", "quality": "auto", "seed": 4}')
    generation = openai_generation_request(request)
    assert (generation.num_images, generation.width, generation.height, generation.seed) == (3, 512, 384, 4)
    assert openai_generation_request(parse_image_request(b'{"prompt": "a", "size": "auto"}')).width is None


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{", None),
        (b'{"prompt": "a", "quality": "hd"}', "quality"),
        (b'{"prompt": "a", "stream": true}', "stream"),
        (b'{"prompt": "a", "image": "x"}', "image"),
        (b'{"prompt": "a", "output_format": "jpeg", "output_compression": 101}', "output_compression"),
    ],
)
def test_openai_refusals_name_the_param(body, param):
    with pytest.raises((OpenAIRequestError, ValidationError, BodyError)) as raised:
        parse_image_request(body)
    answer = json.loads(openai_error_response(raised.value).body)
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"


def test_openai_limit_errors_use_openai_names():
    answer = openai_error_response(LimitExceeded("width*height", 4096, 8192))
    assert answer.status_code == 400
    assert json.loads(answer.body)["error"] == {
        "message": "size is 8192, above the limit of 4096",
        "type": "invalid_request_error",
        "param": "size",
        "code": "limit_exceeded",
    }


def test_image_files_drop_images_past_their_time_or_beyond_the_byte_bound(monkeypatch, tmp_path):
    files = ImageFiles(tmp_path, ttl_s=60, max_bytes=10, sweep_interval_s=None)
    first = files.add(b"12345", "png")
    second = files.add(b"67890", "png")
    assert files.get(first).data == b"12345" and files.get(second).media_type == "image/png"
    third = files.add(b"abc", "jpeg")  # 13 bytes in all: the oldest goes at the next sweep
    files.sweep()
    assert files.get(first) is None and files.get(third).media_type == "image/jpeg"
    later = time.time_ns() + 61 * 10**9
    monkeypatch.setattr(time, "time_ns", lambda: later)
    assert files.get(second) is None and files.get(third) is None


def test_image_files_are_shared_by_every_store_on_the_folder_and_serve_only_their_own_names(tmp_path):
    made_by_one_worker = ImageFiles(tmp_path).add(b"12345", "webp")
    other_worker = ImageFiles(tmp_path)
    assert other_worker.get(made_by_one_worker).data == b"12345"
    (tmp_path.parent / "secret.png").write_bytes(b"not an image of ours")
    for name in ("../secret.png", f".{made_by_one_worker}.partial", "x" * 32 + ".gif"):
        assert other_worker.get(name) is None
