"""The playground's Fine-tune view, driven in Debian's chromium as a person would: photos dropped on the
page, a LoRA fine-tune of tiny-sd started, its live loss curve, then "Compare with base", and the new
model served by the same running server (the two-worker ``training_server`` of tests/conftest.py).

A screenshot of the view goes to tests/output/playground/finetune.png (git-ignored; docs/playground.png
is a copy of it).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
from chromium_browser import playground_page
from PIL import Image, ImageDraw
from playwright.sync_api import expect

REPO_ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO_ROOT / "tests" / "output" / "playground"
TIMEOUT_MS = 120_000
TRAINING_TIMEOUT_MS = 600_000
NAME = "page-run"
PROMPT = "a photo of sks toy"
STEPS = 30

# Every (status, points) the page's curve shows, however briefly: the curve is live, not drawn at the end.
WATCH_THE_CURVE = """() => {
    window.curveSeen = [];
    const curve = document.querySelector('#ft-curve');
    new MutationObserver(() => window.curveSeen.push(
        [document.querySelector('#ft-job').dataset.status, Number(curve.dataset.points)]
    )).observe(curve, {attributes: true, attributeFilter: ['data-points']});
}"""

# Files made in the page from base64 bytes, as a drop from the desktop hands them over.
DROPPED_FILES = """(photos) => {
    const transfer = new DataTransfer();
    for (const [name, data] of photos) {
        const bytes = Uint8Array.from(atob(data), (character) => character.charCodeAt(0));
        transfer.items.add(new File([bytes], name, {type: 'image/png'}));
    }
    return transfer;
}"""


def photo(index: int) -> bytes:
    """A red toy on grey, a little further right in each photo."""
    image = Image.new("RGB", (64, 64), (120, 130, 140))
    ImageDraw.Draw(image).ellipse((8 + 4 * index, 16, 40 + 4 * index, 48), fill=(220, 40, 40))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def drop_photos(page, count: int) -> None:
    photos = [[f"toy-{index}.png", base64.b64encode(photo(index)).decode()] for index in range(count)]
    page.dispatch_event("#ft-drop", "drop", {"dataTransfer": page.evaluate_handle(DROPPED_FILES, photos)})


def data_url_pixels(source: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).convert("RGB")


def start_training(page) -> None:
    page.locator("nav").get_by_role("button", name="Fine-tune").click()
    view = page.locator("#view-finetune")
    drop_photos(page, 5)
    expect(view.locator("#ft-thumbnails img")).to_have_count(5)
    view.get_by_role("button", name="Remove toy-4.png").click()  # one too many: removed again
    expect(view.locator("#ft-thumbnails img")).to_have_count(4)
    view.get_by_label("Name of the new model").fill(NAME)
    expect(view.get_by_label("Base model").locator("option", has_text="tiny-sd")).to_have_count(1)
    view.get_by_label("Base model").select_option("tiny-sd")
    view.get_by_label("Method").select_option(label="LoRA")
    view.get_by_label("Steps").fill(str(STEPS))
    view.get_by_label("Learning rate").fill("2e-3")  # enough for 30 steps to change what tiny-sd draws
    view.get_by_label("Instance prompt").fill(PROMPT)
    page.evaluate(WATCH_THE_CURVE)
    view.get_by_role("button", name="Start").click()


def test_fine_tune_from_the_page_then_compare_with_base_and_serve_it(browser, training_server):
    url, home = training_server
    with playground_page(browser, url, TIMEOUT_MS) as page:
        start_training(page)
        view = page.locator("#view-finetune")
        expect(view.locator("#ft-job")).to_have_attribute("data-status", "succeeded", timeout=TRAINING_TIMEOUT_MS)
        assert view.locator("#ft-error").is_hidden()
        seen = page.evaluate("window.curveSeen")
        assert any(status == "running" and points > 0 for status, points in seen), seen
        assert view.locator("#ft-curve").get_attribute("data-points") == str(STEPS)  # every logged step
        assert len(view.locator("#ft-curve polyline.loss").get_attribute("points").split()) == STEPS
        expect(view.get_by_role("img", name="Validation grid")).to_be_visible()
        expect(view.locator("#ft-status")).to_contain_text(f"{NAME} is in the catalog")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "finetune.png"), full_page=True)

        view.get_by_role("button", name="Compare with base").click()
        compare = page.locator("#view-compare")
        expect(compare).to_be_visible()
        images = compare.locator("#cmp-results .result img")
        expect(images).to_have_count(2, timeout=TIMEOUT_MS)
        assert compare.get_by_label("Model 1", exact=True).input_value() == NAME
        assert compare.get_by_label("Model 2", exact=True).input_value() == "tiny-sd"
        seeds = page.eval_on_selector_all("#cmp-results .result", "cards => cards.map(card => card.dataset.seed)")
        assert seeds[0] == seeds[1]
        trained, base = (data_url_pixels(images.nth(index).get_attribute("src")) for index in range(2))
        assert trained.size == base.size == (64, 64)
        assert trained.tobytes() != base.tobytes(), "the fine-tune draws the same seed differently from its base"

        page.locator("nav").get_by_role("button", name="Runs").click()
        page.get_by_role("button", name=f"Open {NAME}", exact=True).click()
        run = page.locator(f'.run[data-model="{NAME}"]')
        expect(run.get_by_role("img", name="Loss per step")).to_have_attribute("data-points", str(STEPS))

        page.locator("nav").get_by_role("button", name="Fine-tune").click()
        view.get_by_role("button", name="Start").click()  # the same name again: the server's error, inline
        expect(view.locator("#ft-error")).to_contain_text(f"model '{NAME}' already exists in the catalog")

    listing = httpx.get(f"{url}/ui/api/catalog", timeout=60).json()
    entry = next(model for model in listing["models"] if model["id"] == NAME)
    assert (entry["base"], entry["method"]) == ("tiny-sd", "lora")
    body = {"model": NAME, "prompt": PROMPT, "num_inference_steps": 2, "seed": 7}
    answer = httpx.post(f"{url}/txt2img", json=body, timeout=120)  # the server that trained it, never restarted
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png", answer.text
    assert Image.open(io.BytesIO(answer.content)).size == (64, 64)
    assert (home / "models" / NAME / "loss_curve.json").is_file()
