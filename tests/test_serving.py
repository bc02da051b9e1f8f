"""The service end to end: a real ``bentoml serve`` subprocess on tiny-sd, talked to over HTTP."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import bentoml
import httpx
import numpy as np
import pytest
from bentoml_server import SESSION_MAX_QUEUE as MAX_QUEUE
from bentoml_server import SESSION_REQUEST_TIMEOUT_S as REQUEST_TIMEOUT_S
from PIL import Image
from serving_finetunes import FULL_ID, LORA_ID

from serving.http_errors import ErrorBody
from serving.invocations import JPEG_QUALITY
from serving.schema import GeneratedImages

FAST = {"num_inference_steps": 2, "width": 64, "height": 64}
# Minutes of work on any CPU (900 steps at 16 times tiny-sd's pixels): it lasts until the test ends it.
LONG = {"num_inference_steps": 900, "width": 256, "height": 256}


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server, timeout=60) as http:
        yield http


def txt2img(client, **fields):
    return client.post("/txt2img", json={"prompt": "a red cube", **FAST, **fields})


def decode(content: bytes) -> Image.Image:
    return Image.open(io.BytesIO(content))


def metric(client, name: str) -> float:
    """The value of a metric line without labels, or summed over its labelled lines."""
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            if key == name or key.startswith(name + "{"):
                total += float(value)
    return total


# Images, formats and seeds


def test_one_image_comes_back_as_png_of_the_asked_size(client):
    response = txt2img(client, width=64, height=48)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    image = decode(response.content)
    assert (image.format, image.size, image.mode) == ("PNG", (64, 48), "RGB")


def test_jpeg_format(client):
    response = txt2img(client, format="jpeg")
    assert response.headers["content-type"] == "image/jpeg"
    assert decode(response.content).format == "JPEG"


def test_several_images_come_back_as_base64_json_with_consecutive_seeds(client):
    response = client.post("/images", json={"prompt": "a red cube", **FAST, "num_images": 3, "seed": 40})
    assert response.status_code == 200
    body = response.json()
    assert body["format"] == "png"
    assert [item["seed"] for item in body["images"]] == [40, 41, 42]
    images = [decode(base64.b64decode(item["image"])) for item in body["images"]]
    assert all(image.format == "PNG" and image.size == (64, 64) for image in images)
    assert len({image.tobytes() for image in images}) == 3


def test_several_images_on_the_one_image_route_get_400_naming_the_images_route(client):
    response = txt2img(client, num_images=2)
    assert response.status_code == 400
    assert "POST /images" in response.text
    assert txt2img(client, num_images=1).headers["content-type"] == "image/png"  # as before /images existed


def test_same_seed_gives_identical_bytes_and_other_seeds_differ(client):
    first = txt2img(client, seed=123)
    again = txt2img(client, seed=123)
    other = txt2img(client, seed=124)
    assert first.headers["x-seed"] == "123"
    assert first.content == again.content
    assert decode(first.content).tobytes() != decode(other.content).tobytes()


@pytest.mark.parametrize(
    "field", [{"scheduler": "euler-a"}, {"negative_prompt": "blue"}, {"guidance_scale": 2.0}], ids=str
)
def test_each_generation_field_changes_the_image(client, field):
    default = txt2img(client, seed=5)
    changed = txt2img(client, seed=5, **field)
    assert changed.status_code == 200
    difference = np.asarray(decode(changed.content), dtype=float) - np.asarray(decode(default.content), dtype=float)
    assert np.abs(difference).mean() > 1


# BentoML's own clients: keyword arguments in, the declared type out


@pytest.fixture(scope="module")
def bentoml_client(server):
    with bentoml.SyncHTTPClient(server, timeout=60) as client:
        yield client


def test_bentoml_client_gets_one_pil_image_of_the_asked_size_and_format(bentoml_client):
    image = bentoml_client.txt2img(prompt="a cat", seed=7, num_inference_steps=2, width=64, height=48)
    assert isinstance(image, Image.Image)
    assert (image.format, image.size) == ("PNG", (64, 48))
    jpeg = bentoml_client.txt2img(prompt="a cat", seed=7, format="jpeg", **FAST)
    assert (jpeg.format, jpeg.size) == ("JPEG", (64, 64))


def test_bentoml_client_gets_several_images_as_the_declared_model(bentoml_client):
    answer = GeneratedImages.model_validate(bentoml_client.images(prompt="a cat", num_images=2, seed=3, **FAST))
    assert [item.seed for item in answer.images] == [3, 4]
    assert all(decode(base64.b64decode(item.image)).size == (64, 64) for item in answer.images)


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        (
            {"num_inference_steps": 1001},
            bentoml.exceptions.InvalidArgument,
            "num_inference_steps is 1001, above the limit",
        ),
        ({"width": 60}, bentoml.exceptions.InvalidArgument, "multiple of 8"),
        ({"model": "tiny-sdd"}, bentoml.exceptions.NotFound, "Did you mean: tiny-sd"),
    ],
)
def test_bentoml_client_raises_with_our_message(bentoml_client, fields, error, message):
    with pytest.raises(error, match=message):
        bentoml_client.txt2img(prompt="a cat", **{**FAST, **fields})


def test_async_bentoml_client_gets_the_same_types(server):
    async def calls():
        async with bentoml.AsyncHTTPClient(server, timeout=60) as client:
            image = await client.txt2img(prompt="a cat", seed=7, **FAST)
            several = await client.images(prompt="a cat", num_images=2, seed=7, **FAST)
            with pytest.raises(bentoml.exceptions.InvalidArgument, match="num_images is 9, above the limit of 8"):
                await client.images(prompt="a cat", num_images=9)
        return image, several

    image, several = asyncio.run(calls())
    assert isinstance(image, Image.Image) and image.size == (64, 64)
    assert [item.seed for item in GeneratedImages.model_validate(several).images] == [7, 8]


# SageMaker JumpStart protocol


def invoke(client, body, content_type="application/json", accept="application/json;jpeg"):
    return client.post("/invocations", content=body, headers={"content-type": content_type, "accept": accept})


def jumpstart_payload(**fields) -> bytes:
    import json

    return json.dumps(
        {
            "prompt": "astronaut on a horse",
            "width": 64,
            "height": 64,
            "num_inference_steps": 2,
            "guidance_scale": 7.5,
            "seed": 1,
            **fields,
        }
    ).encode()


@pytest.mark.parametrize("accept", ["application/json", "application/json;verbose"])
def test_jumpstart_json_accept_returns_rgb_arrays(client, accept):
    response = invoke(client, jumpstart_payload(num_images_per_prompt=2), accept=accept)
    assert response.status_code == 200
    body = response.json()
    assert body["prompt"] == "astronaut on a horse"
    # Decoded the way JumpStart's notebook decodes it: np.array(generated_image).
    arrays = [np.array(image) for image in body["generated_images"]]
    assert [array.shape for array in arrays] == [(64, 64, 3), (64, 64, 3)]
    assert all(array.min() >= 0 and array.max() <= 255 for array in arrays)


def test_jumpstart_jpeg_accept_returns_base64_jpeg_matching_the_rgb_arrays(client):
    jpeg = invoke(client, jumpstart_payload(), accept="application/json;jpeg").json()
    arrays = invoke(client, jumpstart_payload(), accept="application/json").json()
    image = Image.open(io.BytesIO(base64.b64decode(jpeg["generated_images"][0])))
    assert (image.format, image.size) == ("JPEG", (64, 64))
    # Same seed, same image: the JPEG is exactly the RGB array's JPEG at the wire format's quality.
    reencoded = io.BytesIO()
    array = np.array(arrays["generated_images"][0], dtype=np.uint8)
    Image.fromarray(array).save(reencoded, format="JPEG", quality=JPEG_QUALITY)
    assert np.array_equal(np.asarray(image), np.asarray(decode(reencoded.getvalue())))


def test_jumpstart_prompt_list_with_negative_prompts(client):
    payload = jumpstart_payload(prompt=["a cat", "a dog"], negative_prompt=["blurry", "dark"], num_images_per_prompt=2)
    body = invoke(client, payload).json()
    assert body["prompt"] == ["a cat", "a dog"]
    assert len(body["generated_images"]) == 4


def test_jumpstart_x_text_prompt(client):
    response = invoke(client, b"a lighthouse", content_type="application/x-text")
    assert response.status_code == 200
    body = response.json()
    assert body["prompt"] == "a lighthouse"
    image = Image.open(io.BytesIO(base64.b64decode(body["generated_image"])))
    assert image.size == (64, 64)  # tiny-sd's native size


# Bad input: always 4xx with a JSON body naming the problem

BAD_TXT2IMG = [
    ({"width": 60}, 400, "width"),
    ({"height": 0}, 400, "height"),
    ({"num_inference_steps": 0}, 400, "num_inference_steps"),
    ({"num_inference_steps": 1001}, 400, "num_inference_steps"),
    ({"num_images": 2}, 400, "num_images"),
    ({"width": 2048, "height": 1024}, 400, "width*height"),
    ({"prompt": "x" * 2001}, 400, "prompt"),
    ({"negative_prompt": "x" * 2001}, 400, "negative_prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"scheduler": "magic"}, 400, "scheduler"),
    ({"format": "gif"}, 400, "format"),
    ({"steps": 3}, 400, "steps"),
    ({"model": "tiny-sdd"}, 404, "tiny-sd"),
    ({"model": "runwayml/stable-diffusion-v1-5"}, 404, "runwayml/stable-diffusion-v1-5"),
    ({"model": "/etc/passwd"}, 404, "/etc/passwd"),
    ({"model": "../catalog/tiny-sd"}, 404, "../catalog/tiny-sd"),
]


@pytest.mark.parametrize(("fields", "status", "named"), BAD_TXT2IMG)
def test_bad_txt2img_requests_get_4xx_naming_the_problem(client, fields, status, named):
    response = txt2img(client, **fields)
    assert response.status_code == status
    assert named in response.text
    assert isinstance(response.json(), dict)


def test_more_steps_than_the_scheduler_has_get_400(client):
    body = txt2img(client, num_inference_steps=1000).json()  # tiny-sd trains on 1000 timesteps
    assert (body["field"], body["limit"]) == ("num_inference_steps", 999)


def test_limit_errors_name_the_limit(client):
    body = txt2img(client, num_inference_steps=1001).json()
    assert (body["field"], body["limit"], body["value"]) == ("num_inference_steps", 1000, 1001)
    body = client.post("/images", json={"prompt": "a red cube", "num_images": 9}).json()
    assert (body["field"], body["limit"], body["value"]) == ("num_images", 8, 9)


def test_unknown_model_gets_suggestions(client):
    body = txt2img(client, model="tiny-sdd").json()
    assert "tiny-sd" in body["suggestions"]


@pytest.mark.parametrize(
    ("content", "content_type"),
    [(b'{"prompt": "a cat",', "application/json"), (b"\xff\xfe", "application/json")],
)
def test_malformed_txt2img_bodies_get_400(client, content, content_type):
    response = client.post("/txt2img", content=content, headers={"content-type": content_type})
    assert response.status_code == 400
    assert "error" in response.json()


BAD_INVOCATIONS = [
    (jumpstart_payload(width=60), "application/json", "application/json", 400, "width"),
    (jumpstart_payload(colour="red"), "application/json", "application/json", 400, "colour"),
    (jumpstart_payload(num_inference_steps=1001), "application/json", "application/json", 400, "limit"),
    (b'{"prompt": ', "application/json", "application/json", 400, "JSON"),
    (b'["a cat"]', "application/json", "application/json", 400, "body"),
    (b"\xff\xfe", "application/json", "application/json", 400, "UTF-16"),
    (b"{}", "application/json", "application/json", 400, "prompt"),
    (jumpstart_payload(prompt=[]), "application/json", "application/json", 400, "prompt"),
    (
        jumpstart_payload(prompt=["a cat"], negative_prompt=["x", "y"]),
        "application/json",
        "application/json",
        400,
        "negative_prompt",
    ),
    (b"a cat", "image/png", "application/json", 415, "content type"),
    (jumpstart_payload(), "application/json", "image/png", 406, "accept"),
    (jumpstart_payload(), "application/json", "application/json;png", 406, "accept"),
]


@pytest.mark.parametrize(("body", "content_type", "accept", "status", "named"), BAD_INVOCATIONS)
def test_bad_invocations_get_4xx_naming_the_problem(client, body, content_type, accept, status, named):
    response = invoke(client, body, content_type=content_type, accept=accept)
    assert response.status_code == status
    assert named in response.json()["error"]


# Models: listing, LRU eviction, LoRA on its base


def test_models_lists_catalog_ids_and_the_warm_default(client):
    body = client.get("/models").json()
    ids = [model["id"] for model in body["models"]]
    assert body["default"] == "tiny-sd"
    assert {"tiny-sd", FULL_ID, LORA_ID, "model-txt2img-stabilityai-stable-diffusion-v2-1-base"} <= set(ids)
    txt2img(client)  # make sure tiny-sd is the resident model, whatever ran before
    assert client.get("/models").json()["loaded"] == ["tiny-sd"]


def test_lru_evicts_the_least_recently_used_model(client):
    assert txt2img(client).status_code == 200
    assert txt2img(client, model=FULL_ID).status_code == 200
    assert client.get("/models").json()["loaded"] == [FULL_ID]  # TXT2IMG_MAX_LOADED_MODELS=1
    assert txt2img(client).status_code == 200
    assert client.get("/models").json()["loaded"] == ["tiny-sd"]


def test_lora_finetune_is_served_on_its_shared_base(client):
    base = txt2img(client, seed=9)
    lora = txt2img(client, seed=9, model=LORA_ID)
    base_again = txt2img(client, seed=9)
    assert lora.status_code == 200
    assert decode(lora.content).size == (64, 64)
    assert lora.content != base.content
    assert base_again.content == base.content
    # One model slot holds both: the adapter rides on the base instead of loading a second copy.
    assert client.get("/models").json()["loaded"] == ["tiny-sd", LORA_ID]


def test_hub_model_missing_from_the_cache_gets_503_and_the_server_carries_on(client):
    model = "model-txt2img-stabilityai-stable-diffusion-v2-1-base"
    response = txt2img(client, model=model, width=64, height=64)
    assert response.status_code == 503
    assert model in response.json()["error"] and "local Hugging Face cache" in response.json()["error"]
    assert txt2img(client).status_code == 200


# Load: concurrency, batching, the bounded queue, timeouts and disconnects


def test_sixteen_concurrent_requests_all_succeed(client):
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda seed: txt2img(client, seed=seed), range(16)))
    assert [response.status_code for response in responses] == [200] * 16
    assert all(decode(response.content).size == (64, 64) for response in responses)


def test_compatible_requests_are_batched_and_keep_their_seeds(client):
    seeds = list(range(100, 108))
    with ThreadPoolExecutor(8) as pool:
        batched = list(pool.map(lambda seed: txt2img(client, seed=seed), seeds))
    assert max(int(response.headers["x-batch-images"]) for response in batched) > 1
    # Each image in a batch is the image its seed gives alone (up to float rounding across batch sizes).
    for seed, response in zip(seeds[:2], batched[:2]):
        alone = txt2img(client, seed=seed)
        difference = np.abs(np.asarray(decode(response.content), dtype=int) - np.asarray(decode(alone.content)))
        assert difference.max() <= 2


def test_timed_out_request_gets_504_and_stops_the_pipeline(client):
    interrupted = metric(client, "txt2img_interrupted_total")
    started = time.monotonic()
    response = txt2img(client, **LONG)
    assert response.status_code == 504
    assert "timed out" in response.json()["error"]
    assert time.monotonic() - started < REQUEST_TIMEOUT_S + 5
    assert txt2img(client).status_code == 200  # the device is free again
    assert metric(client, "txt2img_interrupted_total") == interrupted + 1


def wait_for_metric(client, name: str, value: float, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while metric(client, name) != value:
        assert time.monotonic() < deadline, f"{name} never became {value}"
        time.sleep(0.2)


def test_full_queue_answers_429_and_a_disconnected_client_stops_its_generation(server, client):
    import json

    interrupted = metric(client, "txt2img_interrupted_total")
    # A long request sent by hand, so the test decides when its client hangs up.
    body = json.dumps({"prompt": "slow", **LONG}).encode()
    host, port = server.removeprefix("http://").split(":")
    hanging = socket.create_connection((host, int(port)))
    hanging.sendall(
        b"POST /txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    wait_for_metric(client, "txt2img_running_images", 1)  # the long request holds the device
    with ThreadPoolExecutor(MAX_QUEUE + 2) as pool:
        pending = [pool.submit(txt2img, client, seed=seed) for seed in range(MAX_QUEUE + 2)]
        wait_for_metric(client, "txt2img_queue_depth", MAX_QUEUE)
        hanging.close()
        responses = [future.result() for future in pending]
    statuses = [response.status_code for response in responses]
    assert sorted(statuses) == [200] * MAX_QUEUE + [429] * 2
    refused = next(response for response in responses if response.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert "queue is full" in refused.json()["error"]
    assert metric(client, "txt2img_interrupted_total") == interrupted + 1


# Health, metrics, OpenAPI


def test_metrics_count_each_request_and_pipeline_call_with_their_values(client):
    names = (
        "txt2img_generation_seconds_count",
        "txt2img_generation_seconds_sum",
        "txt2img_batch_images_count",
        "txt2img_batch_images_sum",
    )
    before = {name: metric(client, name) for name in names}
    started = time.monotonic()
    assert txt2img(client).status_code == 200
    elapsed = time.monotonic() - started
    after = {name: metric(client, name) for name in names}

    assert after["txt2img_generation_seconds_count"] == before["txt2img_generation_seconds_count"] + 1
    assert 0 < after["txt2img_generation_seconds_sum"] - before["txt2img_generation_seconds_sum"] <= elapsed
    assert after["txt2img_batch_images_count"] == before["txt2img_batch_images_count"] + 1  # one pipeline call
    assert after["txt2img_batch_images_sum"] == before["txt2img_batch_images_sum"] + 1  # of one image
    assert metric(client, "txt2img_queue_depth") == 0 and metric(client, "txt2img_running_images") == 0
    assert 'txt2img_generation_seconds_count{model="tiny-sd"}' in client.get("/metrics").text


def test_openapi_documents_both_apis(client):
    bentoml_spec = client.get("/docs.json").json()
    assert "/txt2img" in bentoml_spec["paths"]
    assert "num_inference_steps" in str(bentoml_spec)
    sagemaker_spec = client.get("/sagemaker/openapi.json").json()
    assert {"/ping", "/invocations", "/models"} <= set(sagemaker_spec["paths"])


def test_docs_json_is_valid_openapi_3_0_and_says_what_each_route_takes_and_returns(client):
    from openapi_spec_validator import validate

    spec = client.get("/docs.json").json()
    validate(spec)  # raises on anything OpenAPI 3.0 does not allow
    assert spec["openapi"].startswith("3.0")
    one, several = spec["paths"]["/txt2img"]["post"], spec["paths"]["/images"]["post"]
    assert list(one["responses"]["200"]["content"]) == ["image/*"]
    assert "num_images" not in one["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert "num_images" in several["requestBody"]["content"]["application/json"]["schema"]["properties"]
    answer = several["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(answer["properties"]) == {"format", "images"}
    for status in ("400", "404", "429", "503", "504"):
        assert one["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    for refused in (txt2img(client, width=60), txt2img(client, num_inference_steps=1001), txt2img(client, model="x")):
        ErrorBody.model_validate(refused.json(), strict=True)
    width = one["requestBody"]["content"]["application/json"]["schema"]["properties"]["width"]
    assert (width["minimum"], width["exclusiveMinimum"], width["nullable"]) == (0, True, True)
    invocations = spec["paths"]["/invocations"]["post"]["requestBody"]["content"]
    assert set(invocations) == {"application/json", "application/x-text"}
    assert "num_images_per_prompt" in invocations["application/json"]["schema"]["properties"]


def test_a_refused_request_is_one_info_line_in_the_server_log(client, server_home):
    log = server_home / "server.log"
    start = log.stat().st_size
    assert txt2img(client, width=60).status_code == 400
    deadline = time.monotonic() + 30
    while True:  # the worker writes its log lines after answering
        written = log.read_bytes()[start:].decode()
        refused = [line for line in written.splitlines() if "Refused /txt2img [POST]" in line]
        if refused or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(refused) == 1 and "[INFO]" in refused[0] and "width: Input should be a multiple of 8" in refused[0]
    assert "Traceback" not in written and "[ERROR]" not in written


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/no-such-route", 404), ("DELETE", "/txt2img", 405), ("GET", "/v1/images/files/a%2Fb", 404)],
)
def test_the_frameworks_own_errors_are_json_too(client, method, path, status):
    response = client.request(method, path)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]


def test_a_body_bentoml_refuses_gets_our_readable_error(client):
    """BentoML validates /txt2img's body before our code runs; its answer is reworded as ours are."""
    response = client.post("/txt2img", json={"prompt": "x", "width": 65})
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "invalid request: width: Input should be a multiple of 8"
    assert body["detail"] == [{"field": "width", "message": "Input should be a multiple of 8"}]
    assert "pydantic.dev" not in response.text
