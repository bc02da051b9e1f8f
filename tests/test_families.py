"""Families as data (catalog/families.py) and a tiny stand-in for each (catalog/tiny_families.py): every
family generates with its own defaults through every route of one ``bentoml serve``, ``txt2img generate``,
export and the Bento; what a family cannot use is refused naming what it can (issue #22)."""

from __future__ import annotations

import base64
import io
import json
import typing
from dataclasses import replace

import numpy as np
import pytest
from catalog_entries import finetune_entry
from family_stand_ins import BENTO_STAND_IN, register_stand_ins
from PIL import Image

from catalog.families import DDPM_SCHEDULERS, FAMILIES, FAMILY_NAMES
from catalog.pipelines import export_model
from catalog.schema import Family
from catalog.store import load_catalog
from catalog.tiny_families import STAND_IN_IDS, TINY_PIPELINES, TINY_RESOLUTION
from jumpstart.inference_script import family_settings
from serving.generation import BatchItem, generate_images
from serving.invocations import InvocationError, parse_request
from serving.schema import FamilyRefusal, GenerationRequest, with_model_defaults

FLUX_ROW = "huggingface-txt2img-black-forest-labs-flux-1-schnell"
PROMPT = "a red photo of a cat"
SEED = 11
FAST = {"prompt": PROMPT, "seed": SEED, "num_inference_steps": 2}


def pixels(encoded: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"), dtype=np.int16)


def generate_in_process(pipeline, **settings) -> np.ndarray:
    [image] = generate_images(
        pipeline,
        [BatchItem(PROMPT, settings.pop("negative_prompt", None), SEED)],
        width=TINY_RESOLUTION,
        height=TINY_RESOLUTION,
        **{"num_inference_steps": 2, "guidance_scale": 3.0, **settings},
    )
    return np.asarray(image, dtype=np.int16)


# The table, the schema and the catalog agree; every family has a stand-in that generates


def test_the_schema_names_exactly_the_families_of_the_table():
    assert typing.get_args(Family) == FAMILY_NAMES


def test_every_family_of_the_catalog_and_of_the_table_has_a_tiny_stand_in():
    in_catalog = {entry.family for entry in load_catalog()}
    assert in_catalog <= set(FAMILY_NAMES)
    assert set(TINY_PIPELINES) == set(FAMILY_NAMES)  # a family added without a stand-in fails here


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_family_stand_in_of_its_pipeline_class_generates_with_each_of_its_schedulers(
    name, stand_in_pipelines, one_torch_thread
):
    family = FAMILIES[name]
    pipeline = stand_in_pipelines[name]
    assert type(pipeline).__name__ == family.pipeline_class
    for scheduler in (None, *family.schedulers):
        image = generate_in_process(pipeline, guidance_scale=family.default_guidance, scheduler=scheduler)
        assert image.shape == (TINY_RESOLUTION, TINY_RESOLUTION, 3)
        assert image.std() > 0  # noise, not a blank


def test_flux_takes_a_negative_prompt_through_true_cfg(stand_in_pipelines, one_torch_thread):
    flux = stand_in_pipelines["flux"]
    plain = generate_in_process(flux)
    negative = generate_in_process(flux, negative_prompt="blurry", true_cfg_scale=4.0)
    assert np.abs(plain - negative).max() > 0


# Defaults: the family's, and the Flux row gets FLUX.1 [schnell]'s


def test_the_flux_row_resolves_to_schnell_defaults():
    request = with_model_defaults(GenerationRequest(prompt=PROMPT), load_catalog().get(FLUX_ROW))
    assert (request.model, request.width, request.height) == (FLUX_ROW, 1024, 1024)
    assert (request.num_inference_steps, request.guidance_scale, request.scheduler) == (4, 0.0, None)


def test_what_a_request_names_beats_its_family_defaults():
    asked = GenerationRequest(prompt=PROMPT, num_inference_steps=7, guidance_scale=2.0, width=32)
    request = with_model_defaults(asked, load_catalog().get(FLUX_ROW))
    assert (request.num_inference_steps, request.guidance_scale, request.width, request.height) == (7, 2.0, 32, 1024)


@pytest.mark.parametrize(
    "model, fields, field, allowed",
    [
        (FLUX_ROW, {"scheduler": "euler"}, "scheduler", ["flow-euler"]),
        (FLUX_ROW, {"negative_prompt": "blurry"}, "negative_prompt", ["true_cfg_scale > 1"]),
        (FLUX_ROW, {"negative_prompt": "blurry", "true_cfg_scale": 1.0}, "negative_prompt", ["true_cfg_scale > 1"]),
        ("tiny-sd", {"scheduler": "flow-euler"}, "scheduler", list(DDPM_SCHEDULERS)),
        ("tiny-sd", {"true_cfg_scale": 2.0}, "true_cfg_scale", [None]),
    ],
)
def test_a_field_the_family_cannot_use_is_refused_naming_what_it_can(model, fields, field, allowed):
    with pytest.raises(FamilyRefusal) as refused:
        with_model_defaults(GenerationRequest(prompt=PROMPT, **fields), load_catalog().get(model))
    assert refused.value.as_json()["field"] == field and refused.value.as_json()["allowed"] == allowed
    assert model in str(refused.value)


def test_the_packed_script_fills_and_refuses_from_the_family_table():
    bare = parse_request(json.dumps({"prompt": PROMPT}).encode(), "application/json")
    assert family_settings(FAMILIES["flux"], bare) == {"num_inference_steps": 4, "guidance_scale": 0.0}
    assert family_settings(FAMILIES["sd1"], bare) == {"num_inference_steps": 50, "guidance_scale": 7.5}
    assert family_settings(None, bare) == {}  # a class no family runs keeps its own defaults, as JumpStart's
    named = parse_request(json.dumps({"prompt": PROMPT, "num_inference_steps": 3}).encode(), "application/json")
    assert family_settings(FAMILIES["flux"], named)["num_inference_steps"] == 3
    negative = parse_request(json.dumps({"prompt": PROMPT, "negative_prompt": "x"}).encode(), "application/json")
    with pytest.raises(InvocationError, match="true CFG"):
        family_settings(FAMILIES["flux"], negative)


# Export: every family's stand-in round-trips through a diffusers folder


@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_an_export_of_each_family_generates_the_same_image(name, txt2img_home, tmp_path, one_torch_thread):
    from diffusers import DiffusionPipeline

    register_stand_ins(txt2img_home)
    catalog = load_catalog()
    folder = export_model(STAND_IN_IDS[name], tmp_path / "export", catalog)
    exported = DiffusionPipeline.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    built = TINY_PIPELINES[name]()
    assert type(exported).__name__ == FAMILIES[name].pipeline_class
    assert np.array_equal(generate_in_process(exported), generate_in_process(built))


# Every route of one server, for every family


def route_images(http, route: str, model: str, fields: dict) -> list[np.ndarray]:
    """The images a route answers for a request of ``model`` with our field names, in its own format."""
    if route == "/txt2img":
        response = http.post(route, json={"model": model, **fields})
        assert response.status_code == 200, response.text
        return [pixels(response.content)]
    if route in ("/images", "/ui/api/generate"):
        response = http.post(route, json={"model": model, **fields})
        assert response.status_code == 200, response.text
        answer = json.loads(response.text.strip().splitlines()[-1])
        assert "error" not in answer, answer
        return [pixels(base64.b64decode(image["image"])) for image in answer["images"]]
    if route == "/v1/images/generations":
        response = http.post(route, json={"model": model, "size": f"{TINY_RESOLUTION}x{TINY_RESOLUTION}", **fields})
        assert response.status_code == 200, response.text
        return [pixels(base64.b64decode(item["b64_json"])) for item in response.json()["data"]]
    raise AssertionError(route)


ROUTES = ("/txt2img", "/images", "/v1/images/generations", "/ui/api/generate")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_route_generates_the_same_image_for_every_family(name, families_http):
    model = STAND_IN_IDS[name]
    images = {route: route_images(families_http, route, model, FAST) for route in ROUTES}
    first = images[ROUTES[0]][0]
    assert first.shape == (TINY_RESOLUTION, TINY_RESOLUTION, 3)
    for route, answered in images.items():
        assert np.array_equal(answered[0], first), f"{route} differs from {ROUTES[0]}"


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_a1111_generates_every_family_with_its_defaults(name, families_http):
    family = FAMILIES[name]
    body = {
        "prompt": PROMPT,
        "seed": SEED,
        "width": TINY_RESOLUTION,
        "height": TINY_RESOLUTION,
        "sampler_name": "Euler",
        "override_settings": {"sd_model_checkpoint": STAND_IN_IDS[name]},
    }
    response = families_http.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert (info["steps"], info["cfg_scale"]) == (family.default_steps, family.default_guidance)
    assert f"Steps: {family.default_steps}," in info["infotexts"][0]
    assert pixels(base64.b64decode(response.json()["images"][0])).shape == (TINY_RESOLUTION, TINY_RESOLUTION, 3)


def test_invocations_serve_the_default_flux_model_with_its_defaults(families_http):
    response = families_http.post("/invocations", json={"prompt": PROMPT, "seed": SEED})
    assert response.status_code == 200, response.text
    [image] = response.json()["generated_images"]
    assert pixels(base64.b64decode(image)).shape == (TINY_RESOLUTION, TINY_RESOLUTION, 3)
    refused = families_http.post("/invocations", json={"prompt": PROMPT, "negative_prompt": "blurry"})
    assert refused.status_code == 400 and "true_cfg_scale" in refused.json()["error"]


def test_models_shows_each_model_family_and_defaults_and_the_bento_stand_in(families_http):
    listing = families_http.get("/models").json()
    rows = {row["id"]: row for row in listing["models"]}
    assert rows[FLUX_ROW]["family"] == "flux"
    assert rows[FLUX_ROW]["defaults"] == {
        "width": 1024,
        "height": 1024,
        "num_inference_steps": 4,
        "guidance_scale": 0.0,
        "scheduler": None,
    }
    for name, model_id in STAND_IN_IDS.items():
        assert rows[model_id]["family"] == name
        assert rows[model_id]["defaults"]["num_inference_steps"] == FAMILIES[name].default_steps
    assert "bento_model" in rows[BENTO_STAND_IN]  # the Flux stand-in serves from its export in the store
    assert listing["families"]["flux"]["schedulers"] == ["flow-euler"]
    assert listing["families"]["flux"]["negative_prompt"] == "true_cfg_scale"


@pytest.mark.parametrize(
    "model, fields, field, allowed",
    [
        ("flux", {"scheduler": "euler-a"}, "scheduler", ["flow-euler"]),
        ("flux", {"negative_prompt": "blurry"}, "negative_prompt", ["true_cfg_scale > 1"]),
        ("sdxl", {"scheduler": "flow-euler"}, "scheduler", list(DDPM_SCHEDULERS)),
        ("sd1", {"true_cfg_scale": 2.0}, "true_cfg_scale", [None]),
    ],
)
def test_every_route_refuses_what_a_family_cannot_use(model, fields, field, allowed, families_http):
    body = {"model": STAND_IN_IDS[model], **FAST, **fields}
    for route in ("/images", "/txt2img", "/ui/api/generate"):
        refused = families_http.post(route, json=body)
        assert refused.status_code == 400, (route, refused.text)
        assert (refused.json()["field"], refused.json()["allowed"]) == (field, allowed), route
    openai = families_http.post("/v1/images/generations", json=body)
    assert openai.status_code == 400 and field in openai.json()["error"]["message"]


def test_flux_true_cfg_applies_a_negative_prompt_on_every_route(families_http):
    flux = STAND_IN_IDS["flux"]
    plain = route_images(families_http, "/images", flux, FAST)[0]
    negative = {**FAST, "negative_prompt": "blurry", "true_cfg_scale": 4.0}
    images = [route_images(families_http, route, flux, negative)[0] for route in ROUTES]
    assert np.abs(images[0] - plain).max() > 0
    assert all(np.array_equal(image, images[0]) for image in images)


def test_a1111_runs_flux_with_euler_only(families_http):
    body = {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler a"}
    body["override_settings"] = {"sd_model_checkpoint": STAND_IN_IDS["flux"]}
    refused = families_http.post("/sdapi/v1/txt2img", json=body)
    assert refused.status_code == 422 and "Euler" in refused.json()["detail"]


# txt2img generate: the same image as the server's, and the same refusals


def test_generate_cli_makes_the_servers_flux_image(run_cli, cli_env, txt2img_home, tmp_path, families_http):
    register_stand_ins(txt2img_home)
    cli_env["TXT2IMG_TORCH_THREADS"] = "1"  # as the server: another thread count sums in another order
    output = tmp_path / "out.png"
    flux = STAND_IN_IDS["flux"]
    run_cli("generate", flux, PROMPT, "-o", str(output), "--seed", str(SEED), "--steps", "2", check_rc=0)
    served = route_images(families_http, "/images", flux, FAST)[0]
    assert np.array_equal(pixels(output.read_bytes()), served)


def test_generate_cli_refuses_a_scheduler_flux_cannot_use_in_one_line(run_cli, txt2img_home, tmp_path):
    register_stand_ins(txt2img_home)
    output = tmp_path / "out.png"
    result = run_cli("generate", STAND_IN_IDS["flux"], PROMPT, "-o", str(output), "--scheduler", "euler", check_rc=2)
    assert "flow-euler" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not output.exists()
    negative = run_cli("generate", STAND_IN_IDS["flux"], PROMPT, "-o", str(output), "--negative", "blurry", check_rc=2)
    assert "--negative applies" in negative.stderr and "--true-cfg above 1" in negative.stderr


# The playground: the chosen model's family fills its empty fields and schedulers


def test_the_playground_shows_the_chosen_models_family_defaults_and_generates_it(browser, families_server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    script_errors = []
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    try:
        page.goto(f"{families_server}/ui")
        page.locator("button.tab[data-view='generate']").click()
        view = page.locator("#view-generate")
        view.get_by_label("Model", exact=True).select_option(STAND_IN_IDS["sdxl"])
        assert view.get_by_label("Steps").get_attribute("placeholder").startswith("50")
        view.get_by_label("Model", exact=True).select_option(STAND_IN_IDS["flux"])
        assert view.get_by_label("Steps").get_attribute("placeholder").startswith("4")
        assert view.get_by_label("Guidance").get_attribute("placeholder").startswith("0")
        options = view.locator("#gen-scheduler option").all_inner_texts()
        assert options == ["model's own", "flow-euler"]
        view.get_by_label("Prompt", exact=True).fill(PROMPT)
        view.get_by_label("Seed", exact=True).fill(str(SEED))
        view.get_by_role("button", name="Generate").click()
        result = page.locator("#gen-gallery .result").first
        result.locator("img").wait_for()
        assert STAND_IN_IDS["flux"] in result.inner_text() and result.get_attribute("data-seed") == str(SEED)
    finally:
        context.close()
    assert not script_errors


def test_a_lora_of_a_family_that_takes_no_adapters_is_refused(monkeypatch):
    assert finetune_entry(method="lora").family == "tiny"  # tiny takes adapters
    monkeypatch.setitem(FAMILIES, "tiny", replace(FAMILIES["tiny"], lora=False))
    with pytest.raises(ValueError, match="LoRA adapters do not load onto a tiny pipeline"):
        finetune_entry(method="lora")
