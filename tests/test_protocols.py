"""OpenAI's Images API and AUTOMATIC1111's API, spoken to by their real clients (openai, webuiapi)
against a real ``bentoml serve`` on tiny-sd."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import webuiapi
from bentoml_server import running_server
from PIL import Image
from serving_finetunes import FULL_ID, LORA_ID, register_finetunes

FAST = {"num_inference_steps": 2}
STEPS_TO_WATCH = 20  # long enough to watch: seconds on a shared CPU


@pytest.fixture(scope="module")
def protocols_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("protocols-home")
    register_finetunes(home)
    with running_server(home, torch_threads="1", max_steps="1000") as url:
        yield url


@pytest.fixture(scope="module")
def http(protocols_server):
    with httpx.Client(base_url=protocols_server, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def openai_client(protocols_server):
    return openai.OpenAI(base_url=f"{protocols_server}/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def webui(protocols_server):
    port = int(protocols_server.rsplit(":", 1)[1])
    return webuiapi.WebUIApi(host="127.0.0.1", port=port, steps=2)


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def openai_image(openai_client, **fields) -> bytes:
    extra = {name: fields.pop(name) for name in list(fields) if name in ("seed", "negative_prompt", "guidance_scale")}
    extra |= {name: fields.pop(name) for name in list(fields) if name in ("scheduler", "num_inference_steps", "loras")}
    response = openai_client.images.generate(
        model=fields.pop("model", "tiny-sd"), prompt="a red cube", size="64x64", response_format="b64_json", **fields,
        extra_body={**FAST, **extra},
    )  # fmt: skip
    return base64.b64decode(response.data[0].b64_json)


def a1111_pixels(webui, **fields) -> bytes:
    result = webui.txt2img(prompt="a red cube", width=64, height=64, steps=2, **fields)
    return result.image.tobytes()


# OpenAI


def test_openai_client_gets_n_images_of_the_asked_size(openai_client):
    response = openai_client.images.generate(
        model="tiny-sd", prompt="a red cube", n=2, size="64x64", response_format="b64_json", extra_body=FAST
    )
    images = [decode(base64.b64decode(item.b64_json)) for item in response.data]
    assert [(image.format, image.size) for image in images] == [("PNG", (64, 64))] * 2
    assert images[0].tobytes() != images[1].tobytes()
    assert response.created > 0 and response.size == "64x64"


def test_openai_bad_size_raises_bad_request_with_our_message(openai_client):
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.images.generate(model="tiny-sd", prompt="a red cube", size="65x64")
    assert raised.value.param == "size"
    assert "Invalid value for 'size': '65x64'" in raised.value.message
    assert "multiples of 8" in raised.value.message


def test_openai_url_response_format_serves_the_image_for_a_while(openai_client, http):
    response = openai_client.images.generate(
        model="tiny-sd", prompt="a red cube", size="64x64", response_format="url", output_format="jpeg",
        extra_body={**FAST, "seed": 3},
    )  # fmt: skip
    fetched = httpx.get(response.data[0].url, timeout=30)
    assert fetched.headers["content-type"] == "image/jpeg"
    assert decode(fetched.content).size == (64, 64)
    missing = http.get("/v1/images/files/nothing.png")
    assert missing.status_code == 404 and "expired" in missing.json()["error"]["message"]


def test_openai_extra_body_fields_change_the_image(openai_client):
    base = openai_image(openai_client, seed=5)
    assert openai_image(openai_client, seed=5) == base
    assert openai_image(openai_client, seed=6) != base
    assert openai_image(openai_client, seed=5, negative_prompt="blue") != base
    assert openai_image(openai_client, seed=5, guidance_scale=2.0) != base
    assert openai_image(openai_client, seed=5, scheduler="euler-a") != base


def test_openai_neutral_options_are_accepted_and_meaningful_ones_refused(openai_client):
    neutral = openai_image(openai_client, seed=5, quality="standard", background="auto", user="me")
    assert neutral == openai_image(openai_client, seed=5)
    assert decode(openai_image(openai_client, output_format="webp")).format == "WEBP"
    for fields, param in [
        ({"quality": "hd"}, "quality"),
        ({"style": "vivid"}, "style"),
        ({"background": "transparent"}, "background"),
        ({"output_format": "gif"}, "output_format"),
        ({"extra_body": {"nonsense": 1}}, "nonsense"),
    ]:
        with pytest.raises(openai.BadRequestError) as raised:
            openai_client.images.generate(prompt="a red cube", **fields)
        assert raised.value.param == param, raised.value.message
        assert raised.value.type == "invalid_request_error"


def openai_pixels(openai_client, **fields) -> bytes:
    """The pixels alone: the PNG's recipe names the model and LoRAs that made it."""
    return decode(openai_image(openai_client, **fields)).tobytes()


def test_openai_loras_extra_body_applies_them_with_the_strict_types_of_every_route(openai_client):
    base = openai_pixels(openai_client, seed=5)
    assert openai_pixels(openai_client, seed=5, loras=[{"model": LORA_ID, "scale": 0}]) == base
    with_lora = openai_pixels(openai_client, seed=5, loras=[{"model": LORA_ID, "scale": 1}])
    assert with_lora == openai_pixels(openai_client, seed=5, model=LORA_ID) != base
    with pytest.raises(openai.NotFoundError) as raised:
        openai_image(openai_client, loras=[{"model": "tiny-lorra"}])
    assert "tiny-lorra" in raised.value.message
    with pytest.raises(openai.BadRequestError) as raised:
        openai_image(openai_client, loras=[{"model": LORA_ID, "scale": "0.5"}])
    assert raised.value.param == "loras.0.scale"


def test_openai_unknown_model_is_404_naming_close_ids(openai_client):
    with pytest.raises(openai.NotFoundError) as raised:
        openai_client.images.generate(model="tiny-sdd", prompt="a red cube")
    assert raised.value.code == "model_not_found" and "tiny-sd" in raised.value.message


def test_openai_models_lists_the_catalog(openai_client):
    ids = [model.id for model in openai_client.models.list()]
    assert {"tiny-sd", FULL_ID, LORA_ID} <= set(ids)
    assert openai_client.models.retrieve("tiny-sd").owned_by == "builtin"


# AUTOMATIC1111


def test_webuiapi_txt2img_same_seed_same_image(webui):
    result = webui.txt2img(prompt="a red cube", width=64, height=64, steps=2, seed=7)
    assert result.image.size == (64, 64)
    assert result.info["all_seeds"] == [7] and result.info["seed"] == 7
    assert result.parameters["seed"] == 7 and result.parameters["sampler_name"] == "Euler a"
    assert "Seed: 7" in result.info["infotexts"][0]
    assert a1111_pixels(webui, seed=7) == result.image.tobytes()
    assert a1111_pixels(webui, seed=8) != result.image.tobytes()


def test_a1111_fields_change_the_image(webui):
    base = a1111_pixels(webui, seed=5)
    assert a1111_pixels(webui, seed=5, negative_prompt="blue") != base
    assert a1111_pixels(webui, seed=5, cfg_scale=2.0) != base
    assert a1111_pixels(webui, seed=5, sampler_name="DDIM") != base
    assert a1111_pixels(webui, seed=5, override_settings={"sd_model_checkpoint": LORA_ID}) != base


def test_a1111_batches_and_random_seeds_report_every_seed(webui):
    result = webui.txt2img(prompt="a red cube", width=64, height=64, steps=2, seed=-1, batch_size=2, n_iter=2)
    seeds = result.info["all_seeds"]
    assert len(result.images) == 4 and seeds == list(range(seeds[0], seeds[0] + 4))
    alone = webui.txt2img(prompt="a red cube", width=64, height=64, steps=2, seed=seeds[1]).image
    # The same seed alone, not in a batch of four: the same image up to float rounding in the batched call.
    difference = np.abs(np.asarray(alone, dtype=float) - np.asarray(result.images[1], dtype=float))
    assert difference.mean() < 0.5


def test_webuiapi_reads_models_samplers_and_options(webui):
    assert {"tiny-sd", FULL_ID, LORA_ID} <= set(webui.util_get_model_names())
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "LMS", "UniPC"} <= set(webui.util_get_sampler_names())
    assert webui.util_get_current_model() == "tiny-sd"
    model = next(model for model in webui.get_sd_models() if model["title"] == FULL_ID)
    assert set(model) == {"title", "model_name", "hash", "sha256", "filename", "config"}


def test_webuiapi_lora_tags_leave_the_prompt_text_and_stay_in_what_is_reported(webui):
    tagged = webui.txt2img(prompt="a red cube <lora:tiny-lora:0>", width=64, height=64, steps=2, seed=5)
    # Scale 0 is the base model, and the tag is no text for the encoder: the untagged prompt's image.
    assert tagged.image.tobytes() == a1111_pixels(webui, seed=5)
    assert tagged.info["prompt"] == tagged.parameters["prompt"] == "a red cube <lora:tiny-lora:0>"
    assert tagged.info["all_prompts"] == ["a red cube <lora:tiny-lora:0>"]
    # A1111 reads tags from the prompt only: in the negative prompt one is text, and changes the image.
    negative = webui.txt2img(prompt="a red cube", negative_prompt="<lora:tiny-lora:0>", width=64, height=64, seed=5)
    assert negative.image.tobytes() != tagged.image.tobytes()


def test_webuiapi_lora_tag_applies_the_lora_and_the_infotext_keeps_it(webui):
    tagged = webui.txt2img(prompt="a red cube <lora:tiny-lora:1>", width=64, height=64, steps=2, seed=5)
    by_id = a1111_pixels(webui, seed=5, override_settings={"sd_model_checkpoint": LORA_ID})
    assert tagged.image.tobytes() == by_id != a1111_pixels(webui, seed=5)
    assert "<lora:tiny-lora:1>" in tagged.info["infotexts"][0].split("\n")[0]


def test_a1111_unknown_lora_tag_is_404_naming_it_in_a1111s_shape(webui):
    with pytest.raises(RuntimeError) as raised:
        webui.txt2img(prompt="a red cube <lora:tiny-lorra:0.5>", width=64, height=64, steps=2)
    status, text = raised.value.args
    answer = json.loads(text)
    assert status == 404 and set(answer) == {"error", "detail", "body", "errors"}
    assert "tiny-lorra" in answer["detail"] and LORA_ID in answer["detail"]  # the close id


def test_webuiapi_lists_the_catalogs_loras_as_a1111_lists_its_files(webui, http):
    loras = webui.get_loras()
    assert [lora["name"] for lora in loras] == [LORA_ID]
    assert set(loras[0]) == {"name", "alias", "path", "metadata"} and loras[0]["alias"] == LORA_ID
    assert loras[0]["path"].endswith(".safetensors")
    assert http.post("/sdapi/v1/refresh-loras").status_code == 200


def test_a1111_lora_tag_it_cannot_apply_is_422_naming_the_tag(webui):
    with pytest.raises(RuntimeError) as raised:
        webui.txt2img(prompt="a red cube <lora:tiny-lora:1:0.5>", width=64, height=64, steps=2)
    status, text = raised.value.args
    assert status == 422 and "<lora:tiny-lora:1:0.5>" in json.loads(text)["detail"]


def test_a1111_options_can_be_repeated_but_not_changed(webui):
    assert webui.set_options({"sd_model_checkpoint": "tiny-sd", "samples_format": "png"}) is None
    refused = webui.set_options({"sd_model_checkpoint": FULL_ID})
    assert "override_settings.sd_model_checkpoint" in refused["detail"]
    assert webui.util_get_current_model() == "tiny-sd"


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"enable_hr": True}, "enable_hr"),
        ({"restore_faces": True}, "restore_faces"),
        ({"script_name": "x/y/z plot"}, "script_name"),
        ({"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True, "module": "canny"}]}}}, "ControlNet"),
        ({"sampler_name": "DPM++ 2M Karras"}, "known: Euler a, Euler"),
        ({"override_settings": {"CLIP_stop_at_last_layers": 2}}, "CLIP_stop_at_last_layers"),
    ],
)
def test_a1111_fields_that_ask_for_what_is_not_here_get_422_naming_them(webui, fields, named):
    with pytest.raises(RuntimeError) as raised:
        webui.txt2img(prompt="a red cube", width=64, height=64, steps=2, **fields)
    status, text = raised.value.args
    assert status == 422 and named in json.loads(text)["detail"]


def test_a1111_unknown_fields_pass_only_when_empty(http):
    body = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 2}
    assert http.post("/sdapi/v1/txt2img", json={**body, "future_option": None}).status_code == 200
    refused = http.post("/sdapi/v1/txt2img", json={**body, "future_option": 3})
    assert refused.status_code == 422 and "future_option" in refused.json()["detail"]


def test_a1111_progress_follows_the_running_job(http, webui):
    assert webui.get_progress()["progress"] == 0
    seen = []
    body = {"prompt": "a red cube", "steps": STEPS_TO_WATCH, "width": 64, "height": 64}
    job = threading.Thread(target=http.post, args=("/sdapi/v1/txt2img",), kwargs={"json": body})
    job.start()
    while job.is_alive():
        progress = webui.get_progress()
        if progress["state"]["sampling_steps"] == STEPS_TO_WATCH:
            seen.append(progress)
        time.sleep(0.02)
    assert seen, "no progress report while the job ran"
    assert all(0 <= report["progress"] <= 1 for report in seen)
    assert max(report["progress"] for report in seen) > 0 and seen[-1]["eta_relative"] >= 0
    assert webui.get_progress()["progress"] == 0


# All four formats


def test_the_same_over_limit_request_is_refused_by_every_route_in_its_own_shape(http):
    prompt = {"prompt": "a red cube"}
    ours = http.post("/images", json={**prompt, "num_images": 9})
    assert ours.status_code == 400 and (ours.json()["field"], ours.json()["limit"]) == ("num_images", 8)
    jumpstart = http.post("/invocations", json={**prompt, "num_images_per_prompt": 9})
    assert jumpstart.status_code == 400 and jumpstart.json()["error"] == "images is 9, above the limit of 8"
    openai_answer = http.post("/v1/images/generations", json={**prompt, "n": 9})
    assert openai_answer.status_code == 400
    assert openai_answer.json()["error"]["param"] == "n"
    assert openai_answer.json()["error"]["message"] == "n is 9, above the limit of 8"
    a1111_answer = http.post("/sdapi/v1/txt2img", json={**prompt, "batch_size": 3, "n_iter": 3})
    assert a1111_answer.status_code == 422
    assert a1111_answer.json()["detail"] == "batch_size*n_iter is 9, above the limit of 8"
    pixels = http.post("/sdapi/v1/txt2img", json={**prompt, "width": 2048, "height": 1024})
    assert pixels.status_code == 422 and "width*height is 2097152, above the limit of 1048576" in pixels.text
    size = http.post("/v1/images/generations", json={**prompt, "size": "2048x1024"})
    assert size.status_code == 400 and size.json()["error"]["message"].startswith("size is 2097152")


def test_the_same_unknown_lora_is_refused_by_every_route_in_its_own_shape(http):
    unknown = {"prompt": "a red cube", "loras": [{"model": "tiny-lorra", "scale": 0.5}]}
    ours = http.post("/images", json=unknown)
    assert ours.status_code == 404 and ours.json()["field"] == "loras" and "tiny-lorra" in ours.json()["error"]
    jumpstart = http.post("/invocations", json=unknown)
    assert jumpstart.status_code == 404 and "tiny-lorra" in jumpstart.json()["error"]
    openai_answer = http.post("/v1/images/generations", json=unknown)
    assert openai_answer.status_code == 404 and "tiny-lorra" in openai_answer.json()["error"]["message"]
    a1111_answer = http.post("/sdapi/v1/txt2img", json={"prompt": "a red cube <lora:tiny-lorra:0.5>"})
    assert a1111_answer.status_code == 404 and "tiny-lorra" in a1111_answer.json()["detail"]


def generations_counted(http) -> float:
    lines = http.get("/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("txt2img_generation_seconds_count"))


def test_the_new_routes_count_in_the_same_metrics(http, openai_client, webui):
    before = generations_counted(http)
    openai_image(openai_client, seed=1)
    a1111_pixels(webui, seed=1)
    assert generations_counted(http) == before + 2


def test_docs_json_stays_valid_openapi_3_0_with_the_new_routes(http):
    from openapi_spec_validator import validate

    spec = http.get("/docs.json").json()
    validate(spec)
    assert {"/v1/images/generations", "/v1/models", "/sdapi/v1/txt2img", "/sdapi/v1/sd-models"} <= set(spec["paths"])
