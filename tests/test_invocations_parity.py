"""One JumpStart wire format, two servers that answer alike.

The same requests go to the local ``POST /invocations`` route of a real ``bentoml serve``
(test_serving's server) and to the ``code/inference.py`` of a ``model.tar.gz`` that txt2img packed
for tiny-sd, imported from the extracted archive and driven the way the Hugging Face inference
container drives it (``container_invoke``). Both must give the same status, error message, JSON
keys, image count, size and format, and, for the same seed, the same images.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from aws_fixtures import copy_spec
from packed_inference import import_packed_inference
from PIL import Image

from catalog.store import load_catalog
from jumpstart.package import WIRE_MODULES
from serving import invocations as wire
from serving.images import PARAMETERS_KEY, image_metadata
from serving.recipes import model_sha, parameters_text, read_recipe

REPO_ROOT = Path(__file__).resolve().parents[1]
JSON = "application/json"
JPEG = "application/json;jpeg"
TEXT = "application/x-text"


@dataclass
class Answer:
    status: int
    content_type: str | None
    body: bytes

    def json(self):
        return json.loads(self.body)


# The SageMaker side: the packed inference.py under the Hugging Face container's handler


class _RequestProcessor:
    """The per-request object of the container's model server (MMS): request headers in, status out."""

    def __init__(self, headers: dict):
        self.headers = headers
        self.status = 200

    def get_request_properties(self) -> dict:
        return self.headers


class _Context:
    """The part of the model server's context that handlers use."""

    def __init__(self, headers: dict):
        self.request_processor = [_RequestProcessor(headers)]

    def set_response_status(self, code=200, phrase="", idx=0):
        self.request_processor[idx].status = code


def container_invoke(inference, model, body: bytes, content_type: str | None, accept: str | None) -> Answer:
    """What sagemaker-huggingface-inference-toolkit 2.x's ``HuggingFaceHandlerService.handle`` does.

    It replaces a missing or ``*/*`` Accept by ``application/json``, decodes ``application/json``
    bodies as UTF-8, passes its context to a ``transform_fn`` that takes one, labels the answer
    with the Accept it passed, and turns any exception into 400 with the exception's message.
    """
    headers = {name: value for name, value in (("Content-Type", content_type), ("Accept", accept)) if value}
    context = _Context(headers)
    toolkit_accept = accept if accept and accept != "*/*" else JSON
    try:
        data = body.decode("utf-8") if content_type in (JSON, "text/csv") else body
        answer = inference.transform_fn(model, data, content_type, toolkit_accept, context)
    except Exception as error:
        return Answer(400, None, str(error).encode())
    return Answer(context.request_processor[0].status, toolkit_accept, answer.encode())


@dataclass
class PackedModel:
    code_dir: Path
    inference: object
    pipeline: object

    def invoke(self, body: bytes, content_type: str | None = JSON, accept: str | None = JPEG) -> Answer:
        return container_invoke(self.inference, self.pipeline, body, content_type, accept)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    import torch

    from jumpstart.package import build_model_archive

    workdir = tmp_path_factory.mktemp("archive")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TXT2IMG_HOME", str(workdir / "home"))
        archive = build_model_archive("tiny-sd", workdir)
    model_dir = workdir / "extracted"
    with tarfile.open(archive) as tar:
        tar.extractall(model_dir, filter="data")
    inference = import_packed_inference(model_dir / "code")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from more, and the test machine is shared
    yield PackedModel(model_dir / "code", inference, inference.model_fn(str(model_dir)))
    torch.set_num_threads(threads)


# The local side: the real HTTP route


@pytest.fixture(scope="module")
def local(server):
    import httpx

    with httpx.Client(base_url=server, timeout=120) as client:

        def invoke(body: bytes, content_type: str | None = JSON, accept: str | None = JPEG) -> Answer:
            request = client.build_request("POST", "/invocations", content=body)
            # httpx sends Accept: */* unless told otherwise; None here means no header at all.
            del request.headers["accept"]
            if accept is not None:
                request.headers["accept"] = accept
            if content_type is not None:
                request.headers["content-type"] = content_type
            response = client.send(request)
            return Answer(response.status_code, response.headers.get("content-type"), response.content)

        yield invoke


def payload(**fields) -> bytes:
    return json.dumps(
        {"prompt": "astronaut on a horse", "width": 64, "height": 48, "num_inference_steps": 2, "seed": 1, **fields}
    ).encode()


def decoded_images(answer: Answer) -> list[np.ndarray]:
    """The images of an answer as arrays, checking each is the JPEG or RGB array it should be."""
    body = answer.json()
    items = [body["generated_image"]] if "generated_image" in body else body["generated_images"]
    arrays = []
    for item in items:
        if isinstance(item, str):
            image = Image.open(io.BytesIO(base64.b64decode(item)))
            assert image.format == "JPEG"
            arrays.append(np.asarray(image.convert("RGB"), dtype=np.int16))
        else:
            arrays.append(np.array(item, dtype=np.int16))
    return arrays


def assert_same_images(first: list[np.ndarray], second: list[np.ndarray]) -> None:
    # Equal up to the last bit of float math, which differs with how images share a pipeline call:
    # most come out identical, a few differ by 1 in a pixel value here and there.
    assert [image.shape for image in first] == [image.shape for image in second]
    for one, other in zip(first, second):
        assert np.abs(one - other).mean() < 0.1


def assert_different_images(first: np.ndarray, second: np.ndarray) -> None:
    assert np.abs(first - second).mean() > 2


GOOD = {
    "jpeg": (payload(), JSON, JPEG),
    "rgb-arrays": (payload(num_images_per_prompt=2), JSON, "application/json"),
    "verbose": (payload(), JSON, "application/json;verbose"),
    "no-accept": (payload(), JSON, None),
    "any-accept": (payload(), JSON, "*/*"),
    "application-wildcard": (payload(), JSON, "application/*"),
    "accept-list": (payload(), JSON, "image/png, application/json;q=0.5"),
    "accept-spelling": (payload(), JSON, "Application/JSON; jpeg"),
    "prompt-list": (
        payload(prompt=["a cat", "a dog"], negative_prompt=["blurry", "dark"], num_images_per_prompt=2, batch_size=3),
        JSON,
        JPEG,
    ),
    "guidance-off": (payload(guidance_scale=1, negative_prompt="blurry", eta=0.5), JSON, JPEG),
    "charset": (payload(), "application/json; charset=utf-8", JPEG),
}


@pytest.mark.parametrize(("body", "content_type", "accept"), GOOD.values(), ids=GOOD.keys())
def test_both_servers_give_the_same_answer(local, packed, body, content_type, accept):
    here, there = local(body, content_type, accept), packed.invoke(body, content_type, accept)

    assert (here.status, there.status) == (200, 200), (here.body[:300], there.body[:300])
    expected_type = wire.negotiate_accept(accept)
    assert here.content_type == expected_type
    if accept in wire.ACCEPT_TYPES:  # else the container labels the answer with the Accept it passed on
        assert there.content_type == here.content_type
    assert here.json().keys() == there.json().keys() == {"generated_images", "prompt"}
    assert here.json()["prompt"] == there.json()["prompt"] == json.loads(body)["prompt"]
    images = decoded_images(here)
    assert len(images) == wire.parse_request(body, content_type).image_count
    assert all(isinstance(item, str) == (expected_type == JPEG) for item in here.json()["generated_images"])
    assert all(isinstance(item, str) == (expected_type == JPEG) for item in there.json()["generated_images"])
    assert_same_images(images, decoded_images(there))
    assert images[0].shape == (48, 64, 3)


def test_default_accept_is_the_specs_jpeg_on_both_servers(local, packed, jumpstart_specs):
    spec = copy_spec("huggingface-txt2img-conflictx-complex-lineart", jumpstart_specs)["predictor_specs"]
    assert wire.DEFAULT_ACCEPT == spec["default_accept_type"]
    assert set(wire.ACCEPT_TYPES) == set(spec["supported_accept_types"])
    assert set(wire.CONTENT_TYPES) == set(spec["supported_content_types"])
    for accept in (None, "*/*", "application/*"):
        for answer in (local(payload(), JSON, accept), packed.invoke(payload(), JSON, accept)):
            assert isinstance(answer.json()["generated_images"][0], str)


def test_x_text_prompt_gets_one_generated_image_of_the_native_size_on_both(local, packed):
    here, there = local(b"a lighthouse", TEXT, JPEG), packed.invoke(b"a lighthouse", TEXT, JPEG)
    for answer in (here, there):
        assert answer.status == 200
        assert answer.json().keys() == {"generated_image", "prompt"}
        assert answer.json()["prompt"] == "a lighthouse"
        [image] = decoded_images(answer)
        assert image.shape == (64, 64, 3)  # tiny-sd's native size; no seed, so the pixels differ


BAD = {
    "bad-json": (b'{"prompt": ', JSON, JPEG),
    "empty-body": (b"", JSON, JPEG),
    "array-body": (b'["a cat"]', JSON, JPEG),
    "unknown-parameter": (payload(colour="red"), JSON, JPEG),
    "bad-width": (payload(width=60), JSON, JPEG),
    "zero-height": (payload(height=0), JSON, JPEG),
    "number-prompt": (payload(prompt=5), JSON, JPEG),
    "number-in-prompt-list": (payload(prompt=["a cat", 2]), JSON, JPEG),
    "empty-prompt": (payload(prompt=""), JSON, JPEG),
    "no-prompt": (b"{}", JSON, JPEG),
    "negative-list-mismatch": (payload(prompt=["a cat"], negative_prompt=["x", "y"]), JSON, JPEG),
    "string-seed": (payload(seed="1"), JSON, JPEG),
    "negative-seed": (payload(seed=-1), JSON, JPEG),
    "huge-seed": (payload(seed=2**63 - 1, num_images_per_prompt=2), JSON, JPEG),
    "zero-steps": (payload(num_inference_steps=0), JSON, JPEG),
    "boolean-images": (payload(num_images_per_prompt=True), JSON, JPEG),
    "text-guidance": (payload(guidance_scale="high"), JSON, JPEG),
    "empty-x-text": (b"", TEXT, JPEG),
    "png-content-type": (b"a cat", "image/png", JPEG),
    "text-plain": (b"a cat", "text/plain", JPEG),
    "png-accept": (payload(), JSON, "image/png"),
    "json-png-accept": (payload(), JSON, "application/json;png"),
}


@pytest.mark.parametrize(("body", "content_type", "accept"), BAD.values(), ids=BAD.keys())
def test_both_servers_refuse_alike(local, packed, body, content_type, accept):
    here, there = local(body, content_type, accept), packed.invoke(body, content_type, accept)

    assert here.status == there.status
    assert here.status in (400, 406, 415)
    assert here.json() == there.json()
    assert here.json().keys() == {"error"}


@pytest.fixture(scope="module")
def seeded(local, packed):
    """The same seed and negative-prompt variations, answered by both servers: name -> (local, packed) images."""
    requests = {
        "base": payload(seed=1),
        "other-seed": payload(seed=2),
        "negative": payload(seed=1, negative_prompt="blurry"),
        "low-guidance": payload(seed=1, guidance_scale=2.0),
        "two-copies": payload(prompt=["a cat", "a cat"], seed=1),
        "dog-alone": payload(prompt="a dog", seed=2),
        "cat-then-dog": payload(prompt=["a cat", "a dog"], seed=1),
    }
    return {name: (decoded_images(local(body)), decoded_images(packed.invoke(body))) for name, body in requests.items()}


@pytest.mark.parametrize("side", [0, 1], ids=["local", "packed"])
def test_seed_negative_prompt_and_guidance_change_the_image(seeded, side):
    base = seeded["base"][side][0]
    for changed in ("other-seed", "negative", "low-guidance"):
        assert_different_images(base, seeded[changed][side][0])


@pytest.mark.parametrize("side", [0, 1], ids=["local", "packed"])
def test_each_prompt_of_a_list_gets_its_own_seed(seeded, side):
    first, second = seeded["two-copies"][side]
    assert_different_images(first, second)
    # Image k uses seed + k: the list's second image is the dog drawn alone from seed 2.
    assert_same_images([seeded["cat-then-dog"][side][1]], seeded["dog-alone"][side])


def test_seeded_images_are_the_same_on_both_servers(seeded):
    for here, there in seeded.values():
        assert_same_images(here, there)


def test_the_archive_holds_the_wire_modules_as_they_are_and_they_import_no_other_txt2img_code(packed):
    packed_files = {Path(module.__file__).name: module.__file__ for module in WIRE_MODULES}
    assert {"invocations.py", "json_body.py", "images.py"} <= set(packed_files)
    for name, source in packed_files.items():
        packed_module = packed.code_dir / "serving" / name
        assert packed_module.read_bytes() == Path(source).read_bytes()
        imported = set()
        for node in ast.walk(ast.parse(packed_module.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module)
        ours = {module for module in imported if module.split(".")[0] == "serving"}
        # Only each other, among txt2img's modules: both lie in the archive's code/serving/.
        assert ours <= {f"serving.{Path(other).stem}" for other in packed_files}
        # What the Hugging Face inference container surely has: the standard library, numpy and PIL.
        outside = {module.split(".")[0] for module in imported - ours}
        assert outside - set(sys.stdlib_module_names) <= {"numpy", "PIL"}


def test_the_packed_endpoints_jpegs_carry_the_recipe_the_local_routes_jpegs_carry(local, packed):
    body = payload(negative_prompt="blurry", num_images_per_prompt=2, seed=5, guidance_scale=6.5)
    answers = {"local": local(body), "packed": packed.invoke(body)}
    jpegs = {
        side: [base64.b64decode(item) for item in answer.json()["generated_images"]] for side, answer in answers.items()
    }
    records = {side: [image_metadata(data) for data in images] for side, images in jpegs.items()}
    assert records["packed"] == records["local"]
    recipes = [read_recipe(data, "a packed endpoint's image") for data in jpegs["packed"]]
    assert [recipe.seed for recipe in recipes] == [5, 6]
    assert recipes[0].model == "tiny-sd" and recipes[0].model_sha == model_sha(load_catalog().get("tiny-sd"))
    assert (recipes[0].negative_prompt, recipes[0].guidance_scale, recipes[0].width) == ("blurry", 6.5, 64)
    assert records["packed"][0][PARAMETERS_KEY] == parameters_text(recipes[0])


# Issue #10: defects of the wire format, one test each


def test_limits_count_every_image_of_an_invocation(local):
    # 64 prompts x 8 images: each prompt alone keeps TXT2IMG_MAX_IMAGES (8), the request does not.
    answer = local(payload(prompt=["a cat"] * 64, num_images_per_prompt=8))
    assert answer.status == 400
    assert (answer.json()["field"], answer.json()["limit"], answer.json()["value"]) == ("images", 8, 512)


def test_a_prompt_list_longer_than_the_queue_is_refused_at_once_not_with_429():
    from serving.invocation_requests import check_invocation_limits
    from serving.schema import LimitExceeded
    from serving.settings import ServingSettings

    invocation = wire.parse_request(payload(prompt=["a cat"] * 5), JSON)
    with pytest.raises(LimitExceeded, match="prompts is 5, above the limit of 4"):
        check_invocation_limits(invocation, ServingSettings(max_images=100, max_queue=4))


HOSTILE_JSON = {
    "deeply-nested": (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
    "5000-digit-integer": (b'{"prompt": "a cat", "seed": ' + b"9" * 5000 + b"}", "digits"),
}


@pytest.mark.parametrize(("body", "named"), HOSTILE_JSON.values(), ids=HOSTILE_JSON.keys())
def test_json_the_parser_gives_up_on_is_a_400_naming_the_problem(local, packed, body, named):
    here, there = local(body), packed.invoke(body)
    assert (here.status, there.status) == (400, 400), here.body[:300]
    assert here.json() == there.json()
    assert named in here.json()["error"]


NOT_UTF8 = {
    "utf-16-json": (payload().decode().encode("utf-16"), JSON, 400, "UTF-16"),
    "utf-16-json-without-bom": (payload().decode().encode("utf-16-le"), JSON, 400, "UTF-16"),
    "latin-1-x-text": ("a café".encode("latin-1"), TEXT, 400, "UTF-8"),
    "declared-utf-16": (payload().decode().encode("utf-16"), "application/json; charset=utf-16", 415, "UTF-8"),
}


@pytest.mark.parametrize(("body", "content_type", "status", "named"), NOT_UTF8.values(), ids=NOT_UTF8.keys())
def test_bodies_that_are_not_utf8_are_refused_naming_the_problem(local, packed, body, content_type, status, named):
    here, there = local(body, content_type), packed.invoke(body, content_type)
    assert here.status == there.status == status, here.body[:300]
    assert named in here.json()["error"]
    if there.content_type is None:  # the container's toolkit decodes application/json as UTF-8 itself
        assert "'utf-8' codec can't decode" in there.body.decode()
    else:
        assert here.json() == there.json()


NOT_FINITE = {
    "nan-guidance": (
        b'{"prompt": "a cat", "num_inference_steps": 1, "guidance_scale": NaN}',
        "NaN is not JSON: numbers must be finite",
    ),
    "infinite-guidance": (
        b'{"prompt": "a cat", "num_inference_steps": 1, "guidance_scale": 1e999}',
        "the number 1e999 is beyond the range of a float",
    ),
}


@pytest.mark.parametrize("body, message", NOT_FINITE.values(), ids=NOT_FINITE.keys())
def test_numbers_that_are_not_finite_are_refused_alike(local, packed, body, message):
    here, there = local(body), packed.invoke(body)
    assert (here.status, there.status) == (400, 400), there.body[:300]
    assert here.json() == there.json() == {"error": message}
