"""The web playground at /ui, driven in a real browser (Debian's chromium through Playwright), and the
playground's routes over plain HTTP: the runs route's path safety above all.

One ``bentoml serve`` on tiny-sd serves every test here; its home holds the tiny fine-tunes of
tests/serving_finetunes.py, a contact sheet in tiny-full's run folder, and links that lead out of it.
Screenshots of each view go to tests/output/playground/ (git-ignored).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from bentoml_server import offline_server
from chromium_browser import playground_page
from openapi_spec_validator import validate
from PIL import Image
from playwright.sync_api import expect
from serving_finetunes import FULL_ID, LORA_ID, OTHER_FULL_ID, register_finetunes

from catalog.index import load_index
from catalog.store import load_catalog, write_entry
from serving.playground import NotARunFile, run_file

REPO_ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO_ROOT / "tests" / "output" / "playground"
CONTACT_SHEET_SIZE = (96, 64)
HYPERPARAMETERS = {"max_steps": 400, "learning_rate": 5e-06, "with_prior_preservation": True}
METRICS = {"clip_i": 0.81, "clip_t": 0.29, "dino": 0.62}
SECRET = b"not for the playground"
TIMEOUT_MS = 120_000
PROGRESS_STEPS = 20  # enough for the page to show steps between the first and the last


@pytest.fixture(scope="module")
def playground_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("playground-home")
    register_finetunes(home)
    # tiny-full as `txt2img train` and `txt2img evaluate` would leave it: provenance, figures, a report.
    entry = load_catalog(home / "catalog").get(FULL_ID)
    provenance = {"hyperparameters": HYPERPARAMETERS, "metrics": METRICS, "example_prompt": "a photo of sks dog"}
    write_entry(entry.model_copy(update=provenance), user_dir=home / "catalog", overwrite=True)
    run = home / "models" / FULL_ID
    Image.new("RGB", CONTACT_SHEET_SIZE, "orange").save(run / "contact_sheet.png")
    Image.new("RGB", (80, 48), "white").save(run / "loss_curve.png")
    (run / "validation").mkdir()
    Image.new("RGB", (32, 32), "teal").save(run / "validation" / "00-a-photo-of-sks-dog.png")
    evaluation = home / "evaluations" / FULL_ID / "20260101T000000000000Z"
    evaluation.mkdir(parents=True)
    report = {"model_id": FULL_ID, "created": "2026-01-01T00:00:00Z", "metrics": METRICS}
    (evaluation / "metrics.json").write_text(json.dumps(report))
    Image.new("RGB", (64, 32), "purple").save(evaluation / "grid.png")
    # tiny-full-copy as `txt2img tune` would register it: the best of two trials, with the study's plots.
    copy = load_catalog(home / "catalog").get(OTHER_FULL_ID)
    trials = [
        {"number": number, "state": "COMPLETE", "params": {"learning_rate": rate}, "value": value, "metrics": {}}
        for number, rate, value in [(0, 1e-6, 0.7), (1, 5e-6, 0.8)]
    ]
    tuning = {"study": "study-a", "objective": "clip_i", "direction": "maximize", "best_trial": 1, "trials": trials}
    write_entry(copy.model_copy(update={"tuning": tuning}), user_dir=home / "catalog", overwrite=True)
    study = home / "studies" / "study-a"
    (study / "report").mkdir(parents=True)
    Image.new("RGB", (40, 30), "navy").save(study / "report" / "objective.png")
    for number in (0, 1):
        (study / "trials" / f"{number:04d}" / "evaluation").mkdir(parents=True)
        Image.new("RGB", (24, 24), "gray").save(study / "trials" / f"{number:04d}" / "evaluation" / "grid.png")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.png").write_bytes(SECRET)
    (run / "escape.png").symlink_to(outside / "secret.png")  # a file link leading out of home
    (home / "models" / "linked").symlink_to(outside)  # a folder link leading out of home
    return home


@pytest.fixture(scope="module")
def playground_server(playground_home) -> str:
    with offline_server(playground_home) as url:
        yield url


@pytest.fixture()
def page(browser, playground_server):
    """A fresh browser page on the playground, which must not ask for anything but this server."""
    with playground_page(browser, playground_server, TIMEOUT_MS) as page:
        yield page


def screenshot(page, name: str, full_page: bool = True) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=full_page)


def image_size(page, selector: str) -> tuple[int, int]:
    return tuple(page.eval_on_selector(selector, "image => [image.naturalWidth, image.naturalHeight]"))


# ---- in the browser ----


def test_search_pick_and_generate_shows_an_image_of_the_asked_size_with_its_seed(page, playground_server):
    assert page.url == f"{playground_server}/ui"
    page.get_by_label("Search models").fill(FULL_ID)
    page.get_by_text(f"matching “{FULL_ID}”").wait_for()
    cards = page.locator("#catalog-list .card h3")
    assert cards.all_inner_texts() == [FULL_ID, OTHER_FULL_ID]  # the exact id above the one containing it
    first_card = page.locator("#catalog-list .card").first
    for provenance in ["tiny-sd", "learning_rate", "clip_i", "full"]:  # base, hyperparameters, metrics, method
        assert provenance in first_card.inner_text()
    screenshot(page, "catalog")

    first_card.get_by_role("button", name=f"Use {FULL_ID}").click()
    view = page.locator("#view-generate")
    assert view.get_by_label("Model", exact=True).input_value() == FULL_ID
    view.get_by_role("button", name="Random").click()
    assert view.get_by_label("Seed", exact=True).input_value() != ""
    view.get_by_label("Prompt", exact=True).fill("a photo of sks dog")
    view.get_by_label("Width").fill("64")
    view.get_by_label("Height").fill("48")
    view.get_by_label("Steps").fill("3")
    view.get_by_label("Seed", exact=True).fill("7")
    view.get_by_role("button", name="Generate").click()

    result = page.locator("#gen-gallery .result").first
    result.locator("img").wait_for()
    page.wait_for_function("document.querySelector('#gen-gallery img').complete")
    assert image_size(page, "#gen-gallery img") == (64, 48)
    assert result.get_attribute("data-seed") == "7"
    assert "64×48" in result.inner_text() and FULL_ID in result.inner_text()
    assert result.get_by_role("link", name="Download").get_attribute("download") == f"txt2img-{FULL_ID}-7.png"
    history = page.evaluate("JSON.parse(localStorage.getItem('txt2img.history'))")
    assert history[0]["settings"]["seed"] == 7 and history[0]["settings"]["model"] == FULL_ID

    view.get_by_label("Seed", exact=True).fill("")
    result.get_by_role("button", name="Reuse this seed").click()
    assert view.get_by_label("Seed", exact=True).input_value() == "7"
    screenshot(page, "generate")


def test_compare_a_fine_tune_with_its_base_side_by_side(page):
    page.get_by_label("Search models").fill(LORA_ID)
    page.get_by_role("button", name=f"Compare {LORA_ID} with its base tiny-sd").click()
    view = page.locator("#view-compare")
    view.get_by_label("Steps").fill("3")
    view.get_by_role("button", name="Compare", exact=True).click()

    panels = page.locator("#cmp-results .result img")
    panels.nth(1).wait_for()
    page.wait_for_function("[...document.querySelectorAll('#cmp-results img')].every(image => image.complete)")
    sources = [panels.nth(index).get_attribute("src") for index in range(2)]
    seeds = page.eval_on_selector_all("#cmp-results .result", "cards => cards.map(card => card.dataset.seed)")
    assert seeds == ["7", "7"]
    assert sources[0] != sources[1], "the LoRA draws the same seed differently from its base"
    assert LORA_ID in page.locator("#cmp-results").inner_text()
    screenshot(page, "compare")


def test_generate_with_a_picked_lora_sends_it_at_its_strength(page):
    page.locator("nav").get_by_role("button", name="Generate").click()
    view = page.locator("#view-generate")
    view.get_by_label("Model", exact=True).select_option(FULL_ID)
    assert view.get_by_text("No LoRA in the catalog fits this model.").is_visible()  # a full fine-tune has none
    view.get_by_label("Model", exact=True).select_option("tiny-sd")
    choices = view.get_by_label("LoRA to add (LoRAs)")
    assert choices.locator("option").all_inner_texts() == [LORA_ID]  # the LoRAs of tiny-sd only
    choices.select_option(LORA_ID)
    view.get_by_role("button", name="Add LoRA").click()
    view.get_by_label(f"Strength of {LORA_ID}").fill("0.55")
    assert view.locator(f'.lora-list li[data-lora="{LORA_ID}"] output').inner_text() == "0.55"
    view.get_by_label("Prompt", exact=True).fill("a red cube")
    view.get_by_label("Steps").fill("2")
    with page.expect_request("**/ui/api/generate") as sent:
        view.get_by_role("button", name="Generate").click()
    assert json.loads(sent.value.post_data)["loras"] == [{"model": LORA_ID, "scale": 0.55}]
    result = page.locator("#gen-gallery .result").first
    result.locator("img").wait_for()
    assert f"{LORA_ID} × 0.55" in result.inner_text()
    screenshot(page, "generate-lora")

    view.get_by_role("button", name=f"Remove {LORA_ID}").click()
    with page.expect_request("**/ui/api/generate") as sent:
        view.get_by_role("button", name="Generate").click()
    assert json.loads(sent.value.post_data)["loras"] == []
    page.locator("#gen-gallery .result").nth(1).wait_for()
    history = page.evaluate("JSON.parse(localStorage.getItem('txt2img.history'))")
    assert history[1]["settings"]["loras"] == [{"model": LORA_ID, "scale": 0.55}]
    page.locator("#gen-history li").nth(1).get_by_role("button", name="Use these settings").click()
    assert view.get_by_label(f"Strength of {LORA_ID}").input_value() == "0.55"


def test_compare_sets_loras_per_column(page):
    page.locator("nav").get_by_role("button", name="Compare").click()
    view = page.locator("#view-compare")
    view.get_by_label("Prompt", exact=True).fill("a red cube")
    view.get_by_label("Steps").fill("2")
    for column in (1, 2):
        view.get_by_label(f"Model {column}", exact=True).select_option("tiny-sd")
    view.get_by_label("LoRA to add (LoRAs of model 2)").select_option(LORA_ID)
    view.locator(".cmp-column").nth(1).get_by_role("button", name="Add LoRA").click()
    sent = []
    page.on("request", lambda request: sent.append(request) if request.url.endswith("/ui/api/generate") else None)
    view.get_by_role("button", name="Compare", exact=True).click()
    page.locator("#cmp-results .result img").nth(1).wait_for()
    bodies = sorted((json.loads(request.post_data) for request in sent), key=lambda body: len(body["loras"]))
    assert [(body["model"], body["loras"]) for body in bodies] == [
        ("tiny-sd", []),
        ("tiny-sd", [{"model": LORA_ID, "scale": 1}]),
    ]
    cards = page.locator("#cmp-results .result")
    assert f"{LORA_ID} × 1" in cards.nth(1).inner_text() and LORA_ID not in cards.nth(0).inner_text()
    screenshot(page, "compare-loras")


def test_runs_show_the_fine_tunes_contact_sheet(page):
    page.locator("nav").get_by_role("button", name="Runs").click()
    page.get_by_role("button", name=f"Open {FULL_ID}", exact=True).click()
    contact_sheet = page.get_by_role("img", name="Contact sheet")
    contact_sheet.wait_for()
    page.wait_for_function("document.querySelector('img[alt=\"Contact sheet\"]').complete")
    assert image_size(page, 'img[alt="Contact sheet"]') == CONTACT_SHEET_SIZE
    # wait_for and expect retry until the page shows it (or the timeout fails the test): the run's
    # parts are fetched one by one, and a busy machine may draw them late.
    page.get_by_role("img", name="Validation: 00-a-photo-of-sks-dog.png").wait_for()
    page.get_by_role("img", name="Evaluation grid").wait_for()
    expect(page.locator(f'.run[data-model="{FULL_ID}"] table')).to_contain_text("0.81", timeout=TIMEOUT_MS)

    page.get_by_role("button", name=f"Open {OTHER_FULL_ID}", exact=True).click()
    tuned = page.locator(f'.run[data-model="{OTHER_FULL_ID}"]')
    tuned.get_by_role("img", name="Objective by trial").wait_for()
    tuned.get_by_role("img", name="Trial 1").wait_for()
    expect(tuned.locator("table")).to_contain_text("learning_rate 0.000005", timeout=TIMEOUT_MS)
    screenshot(page, "runs")


def test_a_size_above_the_limit_shows_the_servers_message(page):
    page.locator("nav").get_by_role("button", name="Generate").click()
    view = page.locator("#view-generate")
    view.get_by_label("Prompt", exact=True).fill("too big")
    view.get_by_label("Width").fill("2048")
    view.get_by_label("Height").fill("2048")
    view.get_by_role("button", name="Generate").click()
    error = page.locator("#gen-error")
    error.wait_for()
    assert "width*height is 4194304, above the limit of 1048576" in error.inner_text()
    screenshot(page, "error")


def test_a_full_queue_says_so_and_retries_then_progress_follows_the_steps(page):
    refusals = []

    def refuse_once(route):
        if refusals:
            route.continue_()
            return
        refusals.append(route.request.url)
        body = json.dumps({"error": "the generation queue is full; retry in about 1 s"})
        route.fulfill(status=429, headers={"Retry-After": "1"}, content_type="application/json", body=body)

    page.route("**/ui/api/generate", refuse_once)
    # Every text the progress label shows, however briefly.
    page.evaluate("""() => {
        window.progressTexts = [];
        const label = document.querySelector('#gen-progress-label');
        new MutationObserver(() => window.progressTexts.push(label.textContent))
            .observe(label, {childList: true, characterData: true, subtree: true});
    }""")
    page.locator("nav").get_by_role("button", name="Generate").click()
    view = page.locator("#view-generate")
    view.get_by_label("Prompt", exact=True).fill("queued")
    view.get_by_label("Steps").fill(str(PROGRESS_STEPS))
    view.get_by_role("button", name="Generate").click()
    page.get_by_text("The queue is full").wait_for()
    page.locator("#gen-gallery img").wait_for()  # the retry went through
    assert len(refusals) == 1
    assert page.locator("#gen-error").is_hidden()
    texts = page.evaluate("window.progressTexts")
    assert any(text.startswith("The queue is full") and "Retrying in 1 s" in text for text in texts)
    assert any(re.fullmatch(rf"Denoising: step \d+ of {PROGRESS_STEPS}", text) for text in texts), texts


def test_phone_width_and_keyboard(browser, playground_server):
    context = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{playground_server}/ui")
    page.locator("#catalog-list .card").first.wait_for()
    assert page.evaluate("document.documentElement.scrollWidth") <= 375, "no sideways scrolling on a phone"
    screenshot(page, "phone", full_page=False)

    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Catalog"
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")  # the Generate tab, by keyboard
    page.locator("#view-generate").wait_for()
    context.close()


# ---- over plain HTTP ----


def test_root_leads_to_the_playground_and_swagger_stays_at_docs(playground_server):
    root = httpx.get(f"{playground_server}/", follow_redirects=False)
    assert root.is_redirect and root.headers["location"] == "/ui"
    docs = httpx.get(f"{playground_server}/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    assert httpx.get(f"{playground_server}/static_content/swagger-ui-bundle.js").status_code == 200
    document = httpx.get(f"{playground_server}/docs.json").json()
    validate(document)  # still valid OpenAPI 3.0 with the playground's app mounted
    assert "/txt2img" in document["paths"] and not any(path.startswith("/ui") for path in document["paths"])


def test_catalog_route_ranks_as_the_cli_does(playground_server, playground_home):
    listing = httpx.get(f"{playground_server}/ui/api/catalog", params={"q": "tiny sks"}).json()
    expected = [entry["id"] for entry in load_index(playground_home / "catalog").search("tiny sks")]
    assert [model["id"] for model in listing["models"]] == expected
    everything = httpx.get(f"{playground_server}/ui/api/catalog").json()["models"]
    sources = [model["source"] for model in everything]
    assert sources[: sources.count("finetune")] == ["finetune"] * sources.count("finetune")  # fine-tunes first
    assert any(model["id"] == "tiny-sd" and model["loaded"] for model in everything)


def test_generate_streams_each_step_then_the_images(playground_server):
    body = {"model": "tiny-sd", "prompt": "a red cube", "num_inference_steps": 4, "seed": 3, "num_images": 2}
    with httpx.stream("POST", f"{playground_server}/ui/api/generate", json=body, timeout=120) as response:
        assert response.status_code == 200
        lines = [json.loads(line) for line in response.iter_lines() if line]
    steps = [line["step"] for line in lines[:-1]]
    assert steps == sorted(steps) and steps[-1] <= 4 and all(line["steps"] == 4 for line in lines[:-1])
    answer = lines[-1]
    assert [image["seed"] for image in answer["images"]] == [3, 4]
    assert (answer["model"], answer["width"], answer["height"]) == ("tiny-sd", 64, 64)
    assert Image.open(io.BytesIO(base64.b64decode(answer["images"][0]["image"]))).size == (64, 64)


def test_generate_refuses_bad_requests_before_streaming(playground_server):
    too_big = httpx.post(f"{playground_server}/ui/api/generate", json={"prompt": "x", "width": 2048, "height": 2048})
    assert too_big.status_code == 400 and too_big.json()["field"] == "width*height"
    unknown = httpx.post(f"{playground_server}/ui/api/generate", json={"prompt": "x", "model": "tiny-sdd"})
    assert unknown.status_code == 404 and "tiny-sd" in unknown.json()["suggestions"]


def raw_get(playground_server: str, target: str) -> tuple[int, bytes]:
    """GET ``target`` exactly as written: httpx and browsers would remove ``..`` and re-encode first."""
    address = urlsplit(playground_server)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        connection.request("GET", target)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_runs_route_serves_run_files(playground_server):
    status, body = raw_get(playground_server, f"/ui/files/models/{FULL_ID}/contact_sheet.png")
    assert status == 200 and Image.open(io.BytesIO(body)).size == CONTACT_SHEET_SIZE
    runs = httpx.get(f"{playground_server}/ui/api/runs").json()["runs"]
    full = next(run for run in runs if run["model"]["id"] == FULL_ID)
    assert full["contact_sheet"] == f"models/{FULL_ID}/contact_sheet.png"
    assert {run["model"]["id"] for run in runs} == {FULL_ID, LORA_ID, OTHER_FULL_ID}


@pytest.mark.parametrize(
    "target",
    [
        "/ui/files/../../../../etc/passwd",
        f"/ui/files/models/{FULL_ID}/../../../../../etc/passwd",
        "/ui/files/models/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/ui/files/%2Fetc%2Fpasswd",
        "/ui/files//etc/passwd",
        "/ui/files/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/ui/files/models%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/ui/files/models/%252e%252e/%252e%252e/etc/passwd",
        f"/ui/files/models/{FULL_ID}/escape.png",  # a link to a file outside home
        "/ui/files/models/linked/secret.png",  # a link to a folder outside home
        f"/ui/files/catalog/{FULL_ID}.yaml",  # inside home, but no run file
        "/ui/files/server.log",
        f"/ui/files/models/{FULL_ID}/model_index.json/..",
    ],
)
def test_runs_route_reads_nothing_outside_the_homes_run_folders(playground_server, target):
    status, body = raw_get(playground_server, target)
    assert 400 <= status < 500, (target, status)
    assert SECRET not in body and b"root:" not in body


def test_run_file_resolves_links_before_it_decides(tmp_path):
    home, outside = tmp_path / "home", tmp_path / "outside"
    (home / "models" / "run").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(SECRET)
    (home / "models" / "run" / "sheet.png").write_bytes(b"png")
    (home / "models" / "run" / "link.png").symlink_to(outside / "secret.png")
    (home / "models" / "run" / "inside.png").symlink_to(home / "models" / "run" / "sheet.png")
    assert run_file(home, "models/run/sheet.png") == (home / "models" / "run" / "sheet.png").resolve()
    assert run_file(home, "models/run/inside.png") == (home / "models" / "run" / "sheet.png").resolve()
    for bad in ["models/run/link.png", "models/run/../run/sheet.png", f"{home}/models/run/sheet.png", "models\\run"]:
        with pytest.raises(NotARunFile):
            run_file(home, bad)
