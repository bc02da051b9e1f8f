"""Per-request LoRAs through a real ``bentoml serve`` (issue 23, items 1 to 3): each refusal on every
route, the same image alone and in a crowd, and the LoRAs in each image's recipe.

One server for the module (conftest's ``lora_server``: batches wait a second to fill, two LoRAs per
request at most), serving tiny-sd with two LoRAs trained by ``txt2img train``.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serving_finetunes import FULL_LORA_ID, STYLE_LORA_ID, SUBJECT_LORA_ID

from serving.http_errors import ErrorBody
from serving.images import RECIPE_KEY
from serving.recipes import Recipe

STEPS = 2
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def http(lora_server):
    with httpx.Client(base_url=lora_server, timeout=300) as client:
        yield client


def body(*loras: tuple[str, float], **fields) -> dict:
    return {
        "prompt": "a photo of sks toy",
        "num_inference_steps": STEPS,
        "seed": 5,
        "loras": [{"model": lora_id, "scale": scale} for lora_id, scale in loras],
        **fields,
    }


def image_png(http: httpx.Client, request: dict) -> bytes:
    answer = http.post("/images", json=request)
    assert answer.status_code == 200, answer.text
    return base64.b64decode(answer.json()["images"][0]["image"])


def pixels(png: bytes) -> bytes:
    return Image.open(io.BytesIO(png)).tobytes()


# Each refusal: the loras sent, the status, and what the JSON answer must hold.
REFUSALS = {
    "too-many": ([("a", 1.0), ("b", 1.0), ("c", 1.0)], 400, {"field": "loras", "limit": 2, "value": 3}),
    "unknown": ([("tiny-subject-lor", 1.0)], 404, {"model": "tiny-subject-lor"}),
    "not-a-lora": ([("tiny-full", 1.0)], 400, {"field": "loras", "loras": [{"model": "tiny-full"}]}),
    "wrong-base": (
        [(SUBJECT_LORA_ID, 1.0), (FULL_LORA_ID, 0.5)],
        400,
        {"loras": [{"model": FULL_LORA_ID, "base": "tiny-full"}]},
    ),
    "twice": ([(STYLE_LORA_ID, 1.0), (STYLE_LORA_ID, 0.5)], 400, {"loras": [{"model": STYLE_LORA_ID}]}),
}
ROUTES = ["/images", "/txt2img", "/invocations"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("refusal", REFUSALS, ids=str)
def test_each_refused_lora_set_is_a_4xx_naming_it(http, route, refusal):
    loras, status, expected = REFUSALS[refusal]
    answer = http.post(route, json=body(*loras))
    assert answer.status_code == status, answer.text
    error = answer.json()
    assert error.items() >= expected.items(), error
    ErrorBody.model_validate(error, strict=True)  # the answer the OpenAPI document declares
    if refusal == "wrong-base":
        assert f"'{FULL_LORA_ID}' needs base 'tiny-full'" in error["error"]
    if refusal == "unknown":
        assert SUBJECT_LORA_ID in error["suggestions"]


def test_a_refused_job_is_refused_at_submission(http):
    answer = http.post("/jobs", json=body(("tiny-subject-lor", 1.0)))
    assert answer.status_code == 404, answer.text
    assert answer.json()["model"] == "tiny-subject-lor"


def test_a_lora_at_scale_one_is_its_fine_tune_and_the_recipe_records_it(http):
    composed = pixels(image_png(http, body((SUBJECT_LORA_ID, 1.0))))
    assert composed == pixels(image_png(http, body(model=SUBJECT_LORA_ID)))  # the recipes differ, not the image
    assert composed != pixels(image_png(http, body()))
    scaled = image_png(http, body((SUBJECT_LORA_ID, 0.5), (STYLE_LORA_ID, -0.25)))
    made = Recipe.model_validate_json(Image.open(io.BytesIO(scaled)).info[RECIPE_KEY])
    assert [(lora.model, lora.scale) for lora in made.loras] == [(STYLE_LORA_ID, -0.25), (SUBJECT_LORA_ID, 0.5)]
    info = http.post("/sdapi/v1/png-info", json={"image": base64.b64encode(scaled).decode()}).json()
    assert (
        info["parameters"]["Prompt"] == f"a photo of sks toy <lora:{STYLE_LORA_ID}:-0.25> <lora:{SUBJECT_LORA_ID}:0.5>"
    )
    assert image_png(http, made.generation_request().model_dump(exclude_none=True)) == scaled


def test_requests_with_different_loras_sent_together_each_get_their_own_image(http):
    sets = [(), ((SUBJECT_LORA_ID, 0.8),), ((SUBJECT_LORA_ID, 0.8), (STYLE_LORA_ID, -0.6))]
    alone = [array(image_png(http, body(*loras))) for loras in sets]
    for index, image in enumerate(alone):  # each set draws its own image
        assert all(np.abs(image - other).max() > 10 for other in alone[index + 1 :])
    crowd = [sets[index % len(sets)] for index in range(4 * len(sets))]
    calls_before = pipeline_calls(http)
    with ThreadPoolExecutor(len(crowd)) as pool:
        together = list(pool.map(lambda loras: array(image_png(http, body(*loras))), crowd))
    # They met in mixed batches: 12 images in batches of 8 take 2 calls, where batching by set took at least 3.
    assert pipeline_calls(http) - calls_before < len(sets)
    # Each is the image its set gives alone, up to float rounding across batch sizes.
    differences = [int(np.abs(image - alone[index % len(sets)]).max()) for index, image in enumerate(together)]
    assert max(differences) <= 2, differences


def array(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=int)


def pipeline_calls(http: httpx.Client) -> float:
    """Pipeline calls the server has made, from its batch size histogram."""
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("txt2img_batch_images_count"):
            return float(line.split()[-1])
    return 0.0


def test_generate_from_a_served_image_applies_its_loras_again(http, composable_lora_home, tmp_path):
    served = image_png(http, body((SUBJECT_LORA_ID, 0.5), (STYLE_LORA_ID, -0.25)))
    (tmp_path / "served.png").write_bytes(served)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "TXT2IMG_HOME": str(composable_lora_home),
        "TXT2IMG_TORCH_THREADS": "1",
    }
    command = [sys.executable, "-m", "txt2img", "generate", "--from", "served.png", "-o", "again.png"]
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.png").read_bytes() == served
