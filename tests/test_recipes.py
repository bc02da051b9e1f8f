"""Images that carry their recipe: every route's PNG (and JPEG, WebP) embeds the settings that made it, A1111's
PNG Info reads them back through ``/sdapi/v1/png-info`` (the webuiapi client), and ``txt2img generate
--from`` makes the same bytes again.

One ``bentoml serve`` on tiny-sd serves every test here; ``txt2img generate`` runs as a subprocess.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import webuiapi
from bentoml_server import offline_server
from PIL import Image, PngImagePlugin
from playwright.sync_api import expect

from catalog.store import load_catalog
from serving.images import PARAMETERS_KEY, RECIPE_KEY, image_metadata
from serving.recipes import Recipe, model_sha, package_version, parameters_text

REPO_ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "prompt": "a red cube",
    "negative_prompt": "blur",
    "num_inference_steps": 2,
    "guidance_scale": 6.5,
    "seed": 41,
    "scheduler": "euler",
}


@pytest.fixture(scope="module")
def recipe_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("recipe-home")


@pytest.fixture(scope="module")
def recipe_server(recipe_home):
    with offline_server(recipe_home) as url:
        yield url


@pytest.fixture(scope="module")
def http(recipe_server):
    with httpx.Client(base_url=recipe_server, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def webui(recipe_server):
    port = int(recipe_server.rsplit(":", 1)[1])
    return webuiapi.WebUIApi(host="127.0.0.1", port=port)


@pytest.fixture(scope="module")
def tiny_sd_sha(recipe_home) -> str:
    return model_sha(load_catalog(recipe_home / "catalog").get("tiny-sd"))


def txt2img_png(http) -> bytes:
    answer = http.post("/txt2img", json=SETTINGS)
    assert answer.status_code == 200, answer.text
    return answer.content


def images_png(http) -> bytes:
    answer = http.post("/images", json=SETTINGS)
    assert answer.status_code == 200, answer.text
    return base64.b64decode(answer.json()["images"][0]["image"])


def openai_images(http, response_format: str, output_format: str = "png") -> bytes:
    client = openai.OpenAI(base_url=str(http.base_url).rstrip("/") + "/v1", api_key="x", max_retries=0, timeout=120)
    extra = {name: value for name, value in SETTINGS.items() if name != "prompt"}
    answer = client.images.generate(
        model="tiny-sd",
        prompt=SETTINGS["prompt"],
        response_format=response_format,
        output_format=output_format,
        extra_body=extra,
    )
    if response_format == "url":
        return httpx.get(answer.data[0].url, timeout=60).content
    return base64.b64decode(answer.data[0].b64_json)


def openai_b64_png(http) -> bytes:
    return openai_images(http, "b64_json")


def openai_url_png(http) -> bytes:
    return openai_images(http, "url")


def a1111_png(http) -> bytes:
    body = {
        "prompt": SETTINGS["prompt"],
        "negative_prompt": SETTINGS["negative_prompt"],
        "steps": SETTINGS["num_inference_steps"],
        "cfg_scale": SETTINGS["guidance_scale"],
        "seed": SETTINGS["seed"],
        "sampler_name": "Euler",
        "width": 64,
        "height": 64,
    }
    answer = http.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    return base64.b64decode(answer.json()["images"][0])


def playground_png(http) -> bytes:
    answer = http.post("/ui/api/generate", json=SETTINGS)
    assert answer.status_code == 200, answer.text
    last = json.loads(answer.text.strip().splitlines()[-1])
    return base64.b64decode(last["images"][0]["image"])


PNG_ROUTES = [txt2img_png, images_png, openai_b64_png, openai_url_png, a1111_png, playground_png]


def expected_recipe(sha: str, prompt_syntax: str = "plain") -> Recipe:
    return Recipe(
        model="tiny-sd",
        model_sha=sha,
        loras=[],
        prompt_syntax=prompt_syntax,
        width=64,
        height=64,
        txt2img_version=package_version(),
        **SETTINGS,
    )


@pytest.mark.parametrize("route", PNG_ROUTES, ids=lambda route: route.__name__)
def test_every_routes_png_carries_its_complete_recipe(http, tiny_sd_sha, route):
    png = route(http)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    made = Recipe.model_validate_json(image.info[RECIPE_KEY])
    # AUTOMATIC1111's clients write its prompt syntax, so its route always reads it (and records it).
    assert made == expected_recipe(tiny_sd_sha, "a1111" if route is a1111_png else "plain")
    assert image.info[PARAMETERS_KEY] == parameters_text(made)


@pytest.mark.parametrize(
    "route",
    [
        lambda http: base64.b64decode(http.post("/images", json={**SETTINGS, "format": "jpeg"}).json()["images"][0]["image"]),  # noqa: E501
        lambda http: openai_images(http, "b64_json", "webp"),
        lambda http: openai_images(http, "b64_json", "jpeg"),
    ],
    ids=["images-jpeg", "openai-webp", "openai-jpeg"],
)  # fmt: skip
def test_jpeg_and_webp_carry_the_recipe_in_exif(http, tiny_sd_sha, route):
    metadata = image_metadata(route(http))
    made = Recipe.model_validate_json(metadata[RECIPE_KEY])
    assert made == expected_recipe(tiny_sd_sha)
    assert metadata[PARAMETERS_KEY] == parameters_text(made)


def test_invocations_jpeg_carries_the_recipe_in_exif(http, tiny_sd_sha):
    body = {**SETTINGS, "negative_prompt": SETTINGS["negative_prompt"]}
    body.pop("scheduler")  # JumpStart's request has no scheduler: the model's own
    answer = http.post("/invocations", json=body, headers={"Accept": "application/json;jpeg"})
    assert answer.status_code == 200, answer.text
    metadata = image_metadata(base64.b64decode(answer.json()["generated_images"][0]))
    made = Recipe.model_validate_json(metadata[RECIPE_KEY])
    assert made == expected_recipe(tiny_sd_sha).model_copy(update={"scheduler": None})
    assert "Sampler:" not in metadata[PARAMETERS_KEY]  # the model's own: no A1111 name to give


def test_png_info_reads_the_parameters_chunk_back_through_webuiapi(webui, tiny_sd_sha):
    generated = webui.txt2img(
        prompt="a blue ball", negative_prompt="fog", steps=2, cfg_scale=5, seed=7, width=64, height=64
    )
    info = webui.png_info(generated.image)
    answer = info.json
    assert answer["info"] == generated.info["infotexts"][0]
    assert answer["info"].startswith("a blue ball\nNegative prompt: fog\nSteps: 2, Sampler: Euler a, CFG scale: 5,")
    made = Recipe.model_validate_json(answer["items"][RECIPE_KEY])
    assert (made.seed, made.prompt, made.model_sha) == (7, "a blue ball", tiny_sd_sha)
    parameters = answer["parameters"]
    assert (parameters["Prompt"], parameters["Negative prompt"], parameters["Seed"]) == ("a blue ball", "fog", "7")
    assert (parameters["Size-1"], parameters["Size-2"], parameters["Steps"]) == ("64", "64", "2")


def test_png_info_of_an_image_without_parameters_is_empty(http):
    buffer = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "paint")
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    answer = http.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buffer.getvalue()).decode()})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "info": "",
        "items": {"Software": "paint"},
        "parameters": {"Prompt": "", "Negative prompt": ""},
    }


@pytest.mark.parametrize(
    "body",
    [{}, {"image": 3}, {"image": "not base64!"}, {"image": base64.b64encode(b"not an image").decode()}],
)
def test_png_info_refuses_what_is_no_image_naming_the_field(http, body):
    answer = http.post("/sdapi/v1/png-info", json=body)
    assert answer.status_code == 422
    assert answer.json()["detail"].startswith("image: ")


@pytest.fixture()
def generate(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "TXT2IMG_HOME": str(tmp_path / "home"),
        "TXT2IMG_TORCH_THREADS": "1",
    }

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "txt2img", "generate", *args]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    return run


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_generate_from_an_image_makes_the_same_bytes(generate, tmp_path, suffix):
    first, again_path = f"first{suffix}", f"again{suffix}"
    made = generate("tiny-sd", "a red cube", "-o", first, "--steps", "2", "--seed", "5", "--negative", "blur")
    assert made.returncode == 0, made.stderr
    again = generate("--from", first, "-o", again_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / again_path).read_bytes() == (tmp_path / first).read_bytes()
    assert "note:" not in again.stderr
    assert "(seed 5)" in again.stdout


def test_generate_from_a_served_image_makes_the_same_bytes(generate, http, tmp_path):
    (tmp_path / "served.png").write_bytes(txt2img_png(http))
    again = generate("--from", "served.png", "-o", "again.png")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "served.png").read_bytes()


def test_generate_from_with_an_option_changes_that_setting_only(generate, tmp_path):
    assert generate("tiny-sd", "a red cube", "-o", "first.png", "--steps", "1", "--seed", "5").returncode == 0
    other = generate("--from", "first.png", "-o", "other.png", "--seed", "6")
    assert other.returncode == 0, other.stderr
    made = Recipe.model_validate_json(Image.open(tmp_path / "other.png").info[RECIPE_KEY])
    assert (made.seed, made.num_inference_steps, made.prompt) == (6, 1, "a red cube")


def test_generate_from_an_image_of_a_changed_model_says_so(generate, tmp_path):
    assert generate("tiny-sd", "a red cube", "-o", "first.png", "--steps", "1").returncode == 0
    made = Recipe.model_validate_json(Image.open(tmp_path / "first.png").info[RECIPE_KEY])
    changed = made.model_copy(update={"model_sha": "0" * 64})
    path = png_with(tmp_path, {RECIPE_KEY: changed.model_dump_json()})
    again = generate("--from", str(path), "-o", "again.png")
    assert again.returncode == 0, again.stderr
    assert "model 'tiny-sd' is not the one that made the image (its catalog entry changed)" in again.stderr


def png_with(tmp_path: Path, chunks: dict[str, str]) -> Path:
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    path = tmp_path / "given.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize(
    "chunks, message",
    [
        ({}, "carries no txt2img recipe"),
        ({"txt2img": "{not json"}, "has a malformed txt2img recipe"),
        ({"txt2img": '{"model": "tiny-sd"}'}, "has a malformed txt2img recipe: model_sha: Field required"),
    ],
    ids=["no-chunk", "not-json", "incomplete"],
)
def test_generate_from_an_image_without_a_recipe_is_one_line_and_exit_2(generate, tmp_path, chunks, message):
    result = generate("--from", str(png_with(tmp_path, chunks)), "-o", "out.png")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["tiny-sd", "a cat", "--from", "given.png"], "either --from IMAGE or MODEL_ID PROMPT"),
        (["tiny-sd"], "give MODEL_ID and PROMPT, or --from IMAGE"),
        (["--from", "missing.png"], "does not exist"),
    ],
)
def test_generate_from_or_model_and_prompt_is_one_line_and_exit_2(generate, tmp_path, args, message):
    png_with(tmp_path, {})
    result = generate(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


@pytest.fixture()
def page(browser, recipe_server):
    """The playground's Generate view in a fresh page; a script error fails the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(120_000)
    script_errors = []
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    page.goto(f"{recipe_server}/ui")
    page.locator("nav").get_by_role("button", name="Generate").click()
    yield page
    context.close()
    assert not script_errors


def drop_file(page, selector: str, data: bytes, name: str) -> None:
    """Drop a file on ``selector`` as a person dragging it from their desktop would."""
    transfer = page.evaluate_handle(
        """([encoded, name]) => {
            const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/png" }));
            return transfer;
        }""",
        [base64.b64encode(data).decode(), name],
    )
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def test_the_playground_shows_a_dropped_images_recipe_and_uses_its_settings(page, http):
    drop_file(page, "#recipe-drop", images_png(http), "cube.png")
    view = page.locator("#recipe-view")
    expect(view).to_be_visible()
    for shown in ("tiny-sd", "a red cube", "blur", "41", "64×64", "6.5", "euler"):
        expect(view).to_contain_text(shown)
    page.get_by_role("button", name="Use these settings").click()
    form = {"#gen-model": "tiny-sd", "#gen-prompt": "a red cube", "#gen-negative": "blur", "#gen-seed": "41"}
    form |= {"#gen-steps": "2", "#gen-guidance": "6.5", "#gen-scheduler": "euler", "#gen-width": "64"}
    for selector, value in form.items():
        expect(page.locator(selector)).to_have_value(value)
    expect(page.locator("#recipe-error")).to_be_hidden()


def test_the_playground_says_an_image_carries_no_recipe(page, tmp_path):
    page.set_input_files("#recipe-file", str(png_with(tmp_path, {"parameters": "a cat\nSteps: 3, Seed: 1, Size: 8x8"})))
    expect(page.locator("#recipe-error")).to_contain_text("given.png carries no txt2img recipe")
    expect(page.locator("#recipe-error")).to_contain_text("Its AUTOMATIC1111 parameters: a cat")
    expect(page.locator("#recipe-view")).to_be_hidden()


def test_generate_reads_a1111_prompts_on_request_and_its_recipe_keeps_the_syntax(generate, tmp_path):
    prompt = ["tiny-sd", "a (red:1.6) cube", "--steps", "2", "--seed", "5"]
    assert generate(*prompt, "-o", "plain.png").returncode == 0
    weighted = generate(*prompt, "-o", "weighted.png", "--prompt-syntax", "a1111")
    assert weighted.returncode == 0, weighted.stderr
    assert Image.open(tmp_path / "weighted.png").tobytes() != Image.open(tmp_path / "plain.png").tobytes()
    assert Recipe.model_validate_json(Image.open(tmp_path / "weighted.png").info[RECIPE_KEY]).prompt_syntax == "a1111"
    again = generate("--from", "weighted.png", "-o", "again.png")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "weighted.png").read_bytes()
    refused = generate(*prompt, "--prompt-syntax", "markdown")
    assert refused.returncode == 2 and "markdown" in refused.stderr and "Traceback" not in refused.stderr
