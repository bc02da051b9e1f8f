"""One front door for every protocol (issue #20): each contract held on every route that generates.

Every generating route (``/txt2img``, ``/images``, ``/invocations``, OpenAI's, AUTOMATIC1111's and the
playground's) is driven through the session's real ``bentoml serve`` with the same hostile inputs: a
lone UTF-16 surrogate, loosely typed fields, seeds past 2**63 and work past TXT2IMG_MAX_WORK. Each
route must refuse them at the door with a 4xx JSON answer, never a 500, and never fail another
request. The queue's own rule, that a failed batch runs each request alone, is held in-process.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from serving.generation_queue import GenerationQueue, Job
from serving.manager import PipelineManager
from serving.schema import GenerationRequest
from serving.settings import ServingSettings

POISON = "\udfff"  # a lone surrogate: valid in JSON text ("\udfff"), not a Unicode scalar value
STEPS = 2


@dataclass(frozen=True)
class Route:
    """How to ask one route for ``images`` 64x64 images, in its own field names, and read back the seeds."""

    path: str
    body: Callable[..., dict]
    seeds: Callable[[httpx.Response], list[int]]
    steps_field: str = "num_inference_steps"
    counts_images: bool = True  # False: the route makes one image per request


def _playground_seeds(response: httpx.Response) -> list[int]:
    last = json.loads(response.text.strip().splitlines()[-1])
    return [image["seed"] for image in last["images"]]


ROUTES = {
    "txt2img": Route(
        "/txt2img",
        lambda prompt, images=1, **extra: {"prompt": prompt, "width": 64, "height": 64, **extra},
        lambda response: [int(response.headers["x-seed"])],
        counts_images=False,
    ),
    "images": Route(
        "/images",
        lambda prompt, images=1, **extra: {"prompt": prompt, "width": 64, "height": 64, "num_images": images, **extra},
        lambda response: [image["seed"] for image in response.json()["images"]],
    ),
    "invocations": Route(
        "/invocations",
        lambda prompt, images=1, **extra: {
            "prompt": prompt,
            "width": 64,
            "height": 64,
            "num_images_per_prompt": images,
            **extra,
        },
        lambda response: [],  # JumpStart's answer carries no seeds: SEED_REPORTING_ROUTES leaves it out
    ),
    "openai": Route(
        "/v1/images/generations",
        lambda prompt, images=1, width=64, height=64, **extra: {
            "prompt": prompt,
            "size": f"{width}x{height}",
            "n": images,
            **extra,
        },
        lambda response: [item["seed"] for item in response.json()["data"]],
    ),
    "a1111": Route(
        "/sdapi/v1/txt2img",
        lambda prompt, images=1, **extra: {"prompt": prompt, "width": 64, "height": 64, "batch_size": images, **extra},
        lambda response: json.loads(response.json()["info"])["all_seeds"],
        steps_field="steps",
    ),
    "playground": Route(
        "/ui/api/generate",
        lambda prompt, images=1, **extra: {"prompt": prompt, "width": 64, "height": 64, "num_images": images, **extra},
        _playground_seeds,
    ),
}


def request_body(route: Route, prompt: str = "a red cube", images: int = 1, **extra) -> dict:
    return route.body(prompt, images, **{route.steps_field: STEPS, **extra})


def post(client: httpx.Client, route: Route, body: dict) -> httpx.Response:
    """POST ``body`` as JSON text in ASCII: a lone surrogate travels as the escape ``\\udfff``."""
    content = json.dumps(body, ensure_ascii=True).encode("ascii")
    return client.post(route.path, content=content, headers={"content-type": "application/json"})


def assert_refused(response: httpx.Response, *words: str) -> str:
    """A 4xx JSON answer whose text names every one of ``words``; returns that text."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    answer = response.json()
    text = json.dumps(answer)
    for word in words:
        assert word in text, text
    return text


@pytest.fixture(scope="module")
def door(server):
    with httpx.Client(base_url=server, timeout=120) as client:
        yield client


@pytest.mark.parametrize("route", ROUTES.values(), ids=ROUTES.keys())
@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_lone_surrogate_is_refused_at_the_door(door, route, field):
    body = request_body(route, **{field: POISON}) if field != "prompt" else request_body(route, prompt=POISON)
    response = post(door, route, body)
    # BentoML reads /txt2img's and /images' bodies with pydantic's parser, which names the place in the text.
    assert_refused(response, "surrogate", *(["column"] if route.path in ("/txt2img", "/images") else [field]))
    if route.path == "/v1/images/generations":  # the OpenAI SDK shows param as the field at fault
        assert response.json()["error"]["param"] == field


@pytest.mark.parametrize("route", ROUTES.values(), ids=ROUTES.keys())
def test_a_poisoned_request_beside_an_innocent_one_fails_alone(door, route):
    poisoned = request_body(route, negative_prompt=POISON, seed=1)
    innocent = request_body(route, seed=2)
    with ThreadPoolExecutor(2) as pool:
        refused, served = pool.map(lambda body: post(door, route, body), [poisoned, innocent])
    assert_refused(refused, "surrogate")
    assert served.status_code == 200, served.text[:300]


ECHOED = {  # a surrogate where an error message would echo it: the answer must still be a JSON 4xx
    "openai unknown key": ("/v1/images/generations", {"prompt": "a", POISON: 1}),
    "openai model": ("/v1/images/generations", {"prompt": "a", "model": POISON}),
    "a1111 sampler": ("/sdapi/v1/txt2img", {"prompt": "a", "sampler_name": POISON}),
    "a1111 unknown key": ("/sdapi/v1/txt2img", {"prompt": "a", POISON: True}),
    "a1111 options": ("/sdapi/v1/options", {"sd_model_checkpoint": POISON}),
    "invocations unknown key": ("/invocations", {"prompt": "a", POISON: 1}),
    "images model": ("/images", {"prompt": "a", "model": POISON}),
    "playground model": ("/ui/api/generate", {"prompt": "a", "model": POISON}),
}


@pytest.mark.parametrize("path, body", ECHOED.values(), ids=ECHOED.keys())
def test_a_surrogate_an_error_would_echo_is_a_4xx(door, path, body):
    assert_refused(post(door, Route(path, dict, list), body), "surrogate")


LOOSE = {"seed": True, "steps": "5"}  # a boolean seed, a number as text: refused everywhere, never coerced


@pytest.mark.parametrize("route", ROUTES.values(), ids=ROUTES.keys())
@pytest.mark.parametrize("loose", LOOSE)
def test_types_are_strict_on_every_route(door, route, loose):
    field = route.steps_field if loose == "steps" else "seed"
    response = post(door, route, request_body(route, **{field: LOOSE[loose]}))
    assert_refused(response, field)


def test_openai_size_must_be_exactly_width_x_height(door):
    response = post(door, ROUTES["openai"], {"prompt": "a", "size": "64x64\n"})
    assert_refused(response, "size")


@pytest.mark.parametrize("route", ROUTES.values(), ids=ROUTES.keys())
def test_a_utf16_body_is_refused_on_every_route(door, route):
    content = json.dumps(request_body(route)).encode("utf-16")
    response = door.post(route.path, content=content, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500 and response.json(), response.text[:300]


SEEDED_ROUTES = {name: route for name, route in ROUTES.items() if route.counts_images}


@pytest.mark.parametrize("route", SEEDED_ROUTES.values(), ids=SEEDED_ROUTES.keys())
def test_seeds_that_would_pass_2_63_are_refused_up_front(door, route):
    response = post(door, route, request_body(route, images=2, seed=2**63 - 1))
    assert_refused(response, "seed")


SEED_REPORTING_ROUTES = {name: route for name, route in ROUTES.items() if route.path != "/invocations"}


@pytest.mark.parametrize("route", SEED_REPORTING_ROUTES.values(), ids=SEED_REPORTING_ROUTES.keys())
def test_a_seed_is_given_back_and_gives_the_same_image(door, route):
    first = post(door, route, request_body(route, images=1))
    assert first.status_code == 200, first.text[:300]
    [seed] = route.seeds(first)
    assert 0 <= seed < 2**32  # drawn as AUTOMATIC1111 draws them: exact in JavaScript too
    again = post(door, route, request_body(route, images=1, seed=seed))
    assert route.seeds(again) == [seed]


@pytest.mark.parametrize("route", ROUTES.values(), ids=ROUTES.keys())
def test_work_past_the_limit_is_refused_at_once_naming_it(door, route):
    # 1024 x 1024 x 1000 steps: within TXT2IMG_MAX_PIXELS and the session's TXT2IMG_MAX_STEPS, past TXT2IMG_MAX_WORK.
    extra = {"width": 1024, "height": 1024} if route.path != "/v1/images/generations" else {}
    body = {**request_body(route, **extra), route.steps_field: 1000}
    if route.path == "/v1/images/generations":
        body["size"] = "1024x1024"
    assert_refused(post(door, route, body), "work", "TXT2IMG_MAX_WORK")


def test_an_invocation_s_work_counts_every_prompt(door):
    # Each prompt alone is exactly at the default limit (1024 x 1024 x 200 steps = 4 x 1024^2 x 50); two are past it.
    body = {"prompt": ["a", "b"], "width": 1024, "height": 1024, "num_inference_steps": 200}
    text = assert_refused(post(door, ROUTES["invocations"], body), "work")
    assert str(2 * 1024 * 1024 * 200) in text


def test_a_failed_batch_runs_each_request_alone_so_only_the_guilty_one_fails(one_torch_thread, caplog):
    settings = ServingSettings(device="cpu", torch_threads=1)
    manager = PipelineManager(settings)
    queue = GenerationQueue(manager, settings)
    entry = manager.entry("tiny-sd")
    innocent = Job.create(entry, GenerationRequest(prompt="a red cube", num_inference_steps=STEPS, seed=3), 64, 64, 300)
    # Past the door's checks, as a request of the Python API could be: the tokenizer fails on it mid-batch.
    poison = GenerationRequest.model_construct(prompt="a red cube", negative_prompt=POISON, num_inference_steps=STEPS)
    poisoned = Job.create(entry, poison, 64, 64, 300)
    for job in (innocent, poisoned):  # both queued before the thread starts: one batch
        queue.submit(job)
    with caplog.at_level(logging.WARNING, logger="serving.generation_queue"):
        queue.start(warm_model="tiny-sd")
        result = innocent.future.result(timeout=300)
        assert poisoned.future.exception(timeout=300) is not None
    assert "a batch of 2 requests failed" in caplog.text
    assert len(result.images) == 1 and result.batch_images == 1  # it ran again, alone
