"""Browser-safe defaults (issue #20, defect 2), on one real ``bentoml serve`` without a token, as is the default:
a page on another origin cannot get an image generated (through Debian's browser, and counted on the
server), a Host that is not loopback or allowed is refused (DNS rebinding), bodies must have their
route's content type, and what a browser shows carries its security headers. Also the playground's
seeds, which must come back exactly (defect 7).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from bentoml_server import offline_server
from PIL import Image
from playwright.sync_api import expect

ALLOWED_HOST = "txt2img.lan"
TIMEOUT_MS = 120_000
FAST = {"prompt": "a red cube", "num_inference_steps": 1, "width": 64, "height": 64}
# A body each generating route would take, so that only the guard can stop it.
ROUTE_BODIES = {
    "/txt2img": FAST,
    "/images": FAST,
    "/invocations": FAST,
    "/v1/images/generations": {"prompt": "a red cube", "size": "64x64", "num_inference_steps": 1},
    "/sdapi/v1/txt2img": {"prompt": "a red cube", "steps": 1, "width": 64, "height": 64},
    "/ui/api/generate": FAST,
}
JSON_ROUTES = [path for path in ROUTE_BODIES if path != "/invocations"] + ["/sdapi/v1/options"]
NOT_JSON = {"text/plain": "text/plain", "form": "application/x-www-form-urlencoded", "missing": None}
WEBSOCKET_URL = "ws://127.0.0.1:3000/ws"  # a loopback Host: the test client's own name is "testserver"
SECURITY_HEADERS = {"x-content-type-options": "nosniff", "x-frame-options": "DENY"}


@pytest.fixture(scope="module")
def browser_safety_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("browser-safety-home")
    run = home / "models" / "some-run"
    run.mkdir(parents=True)
    Image.new("RGB", (8, 8), "orange").save(run / "contact_sheet.png")
    return home


@pytest.fixture(scope="module")
def browser_safety_server(browser_safety_home) -> str:
    with offline_server(browser_safety_home, allowed_hosts=f"{ALLOWED_HOST}, other.lan") as url:
        yield url


@pytest.fixture()
def client(browser_safety_server):
    with httpx.Client(base_url=browser_safety_server, timeout=120) as http:
        yield http


def images_generated(client) -> float:
    """Every image the server has generated: the sum of its images-per-pipeline-call histogram."""
    return float(re.search(r"^txt2img_batch_images_sum (\S+)$", client.get("/metrics").text, re.MULTILINE)[1])


@dataclass
class WatchedPage:
    """A browser page with what it asked of other servers and which of its policies it broke."""

    page: object
    foreign: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)


@contextlib.contextmanager
def watched_page(browser, server: str) -> Iterator[WatchedPage]:
    context = browser.new_context()
    watched = WatchedPage(context.new_page())
    watched.page.set_default_timeout(TIMEOUT_MS)
    watched.page.on("request", lambda request: request.url.startswith(server) or watched.foreign.append(request.url))
    watched.page.on(
        "console", lambda message: "Security Policy" in message.text and watched.violations.append(message.text)
    )
    try:
        yield watched
    finally:
        context.close()


# ---- a page on another origin ----

ATTACKER_PAGE = """<!DOCTYPE html>
<html><body>
<iframe name="sink"></iframe>
<!-- A form posts to any origin; text/plain makes its body the JSON below: {"prompt": ..., "x": "="} -->
<form method="post" action="TARGET/txt2img" enctype="text/plain" target="sink">
  <input name='{"prompt": "forged", "num_inference_steps": 1, "width": 64, "height": 64, "x": "' value='"}'>
</form>
<script>
const bodies = BODIES;
const attempts = [];
for (const [path, payload] of Object.entries(bodies)) {
  const body = JSON.stringify(payload);
  const tries = {
    "text/plain": { mode: "no-cors", headers: { "content-type": "text/plain" }, body },
    "form": { mode: "no-cors", headers: { "content-type": "application/x-www-form-urlencoded" }, body },
    "no content type": { mode: "no-cors", body: new Blob([body]) },
    "json": { mode: "cors", headers: { "content-type": "application/json" }, body },
  };
  for (const [name, options] of Object.entries(tries)) {
    attempts.push(fetch("TARGET" + path, { method: "POST", ...options })
      .then((response) => `${path} ${name}: answered (${response.type} ${response.status})`,
            (error) => `${path} ${name}: failed (${error.message})`));
  }
}
Promise.all(attempts).then((results) => {
  window.results = results;
  document.querySelector("iframe").addEventListener("load", () => { document.title = "done"; });
  document.querySelector("form").submit();
});
</script>
</body></html>
"""


@pytest.fixture(scope="module")
def other_origin(browser_safety_server) -> str:
    """A web site on another loopback port, whose one page tries to make the server generate."""
    page = ATTACKER_PAGE.replace("TARGET", browser_safety_server).replace("BODIES", json.dumps(ROUTE_BODIES))

    class AttackerSite(BaseHTTPRequestHandler):
        def do_GET(self):
            content = page.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        def log_message(self, *args):
            pass

    site = ThreadingHTTPServer(("127.0.0.1", 0), AttackerSite)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()


def test_a_page_on_another_origin_cannot_get_an_image_generated(browser, client, other_origin, browser_safety_server):
    before = images_generated(client)
    with watched_page(browser, other_origin) as watched:
        watched.page.goto(other_origin)
        watched.page.wait_for_function("document.title === 'done'")
        results = watched.page.evaluate("window.results")

    assert len(results) == 4 * len(ROUTE_BODIES)
    assert images_generated(client) == before, results  # counted before any answer goes out
    # The same request from the server's own origin does generate, so the counter above would have moved.
    response = client.post("/images", json=FAST, headers={"Origin": browser_safety_server})
    assert response.status_code == 200, response.text
    assert images_generated(client) == before + 1


def test_an_origin_other_than_the_servers_own_gets_403(client, browser_safety_server):
    port = int(browser_safety_server.rsplit(":", 1)[1])
    for origin in (f"http://127.0.0.1:{port + 1}", f"http://localhost:{port}", "https://evil.example", "null"):
        response = client.get("/models", headers={"Origin": origin})
        assert response.status_code == 403, origin
        assert origin in response.json()["error"] and "TXT2IMG_ALLOWED_HOSTS" in response.json()["error"]
    for origin in (browser_safety_server, f"http://{ALLOWED_HOST}", f"https://{ALLOWED_HOST}:8443"):
        assert client.get("/models", headers={"Origin": origin}).status_code == 200, origin


# ---- Host (DNS rebinding) ----


@pytest.mark.parametrize(("method", "path"), [("GET", "/models"), ("POST", "/txt2img"), ("GET", "/ui")])
def test_a_host_that_is_not_loopback_or_allowed_gets_403_json(client, method, path):
    response = client.request(method, path, json=FAST if method == "POST" else None, headers={"Host": "evil.example"})
    assert response.status_code == 403
    error = response.json()["error"]
    assert "evil.example" in error and "TXT2IMG_ALLOWED_HOSTS" in error


def test_loopback_and_allowed_hosts_pass(client, browser_safety_server):
    port = browser_safety_server.rsplit(":", 1)[1]
    hosts = [f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", "127.1.2.3", ALLOWED_HOST]
    for host in [*hosts, f"{ALLOWED_HOST.upper()}:{port}", "other.lan"]:
        assert client.get("/models", headers={"Host": host}).status_code == 200, host


@pytest.mark.parametrize("path", ["/ping", "/readyz", "/livez", "/healthz"])
def test_health_checks_answer_any_host(client, path):
    assert client.get(path, headers={"Host": "10.0.0.5:3000"}).status_code == 200


def test_a_websocket_from_a_wrong_host_or_origin_is_refused(monkeypatch):
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from serving.guard import HostOriginGuard

    async def echo(websocket):
        await websocket.accept()
        await websocket.send_text("open")
        await websocket.close()

    monkeypatch.delenv("TXT2IMG_API_TOKEN", raising=False)
    app = HostOriginGuard(Starlette(routes=[WebSocketRoute("/ws", echo)]))
    with TestClient(app) as test_client:
        for headers in ({"Host": "evil.example"}, {"Origin": "http://127.0.0.1:4000"}):
            with (
                pytest.raises(WebSocketDisconnect) as refused,
                test_client.websocket_connect(WEBSOCKET_URL, headers=headers),
            ):
                pass
            assert refused.value.code == 1008
        with test_client.websocket_connect(WEBSOCKET_URL, headers={"Origin": "http://127.0.0.1:3000"}) as websocket:
            assert websocket.receive_text() == "open"


# ---- content types ----


@pytest.mark.parametrize("content_type", NOT_JSON.values(), ids=NOT_JSON.keys())
@pytest.mark.parametrize("path", JSON_ROUTES)
def test_a_json_route_answers_415_to_any_other_body(client, path, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post(path, content=json.dumps(ROUTE_BODIES.get(path, {})).encode(), headers=headers)
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert "application/json" in error and (content_type is None or content_type in error)


@pytest.mark.parametrize("path", ["/images", "/sdapi/v1/txt2img"])
def test_a_json_body_in_another_charset_answers_415(client, path):
    body = json.dumps(ROUTE_BODIES[path]).encode("utf-16")
    response = client.post(path, content=body, headers={"Content-Type": "application/json; charset=utf-16"})
    assert response.status_code == 415
    assert "UTF-8" in response.json()["error"]


def test_invocations_need_a_content_type_and_keep_jumpstarts_own(client):
    body = json.dumps(FAST).encode()
    missing = client.post("/invocations", content=body)
    assert missing.status_code == 415
    assert "application/json, application/x-text" in missing.json()["error"]
    plain = client.post("/invocations", content=b"a red cube", headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415
    text = client.post("/invocations", content=b"a red cube", headers={"Content-Type": "application/x-text"})
    assert text.status_code == 200, text.text
    assert client.post("/invocations", json=FAST).status_code == 200


def test_a_post_without_a_body_is_left_to_its_route(client):
    response = client.post("/sdapi/v1/options")
    assert response.status_code not in (403, 415)


# ---- headers ----


def assert_security_headers(response: httpx.Response) -> None:
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value


def test_the_playground_carries_the_security_headers(client):
    for path in ("/ui", "/ui/static/playground.js", "/ui/api/catalog", "/ui/files/models/some-run/contact_sheet.png"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert_security_headers(response)
    assert_security_headers(client.get("/ui/files/models/some-run/missing.png"))  # a 404 too


def test_a_served_image_carries_the_security_headers(client):
    body = {**ROUTE_BODIES["/v1/images/generations"], "response_format": "url"}
    answer = client.post("/v1/images/generations", json=body)
    assert answer.status_code == 200, answer.text
    image = client.get(answer.json()["data"][0]["url"])
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert_security_headers(image)


def test_the_apis_carry_no_page_policy(client):
    assert "content-security-policy" not in client.get("/models").headers


# ---- in the browser, under the policy ----


@pytest.fixture()
def page(browser, browser_safety_server):
    """A browser page that must not break the policy nor ask for anything outside the server."""
    with watched_page(browser, browser_safety_server) as watched:
        yield watched.page
    assert not watched.foreign, f"the page asked for something outside the server: {watched.foreign}"
    assert not watched.violations, f"the page broke its Content-Security-Policy: {watched.violations}"


def generated_image(page, index: int) -> bytes:
    """The bytes of the ``index``-th image of the gallery, oldest first."""
    images = page.locator("#gen-gallery .result img")
    source = images.nth(images.count() - 1 - index).get_attribute("src")
    return base64.b64decode(source.split(",", 1)[1])


def test_reuse_this_seed_gives_the_same_image_bytes(page, browser_safety_server):
    page.goto(f"{browser_safety_server}/ui")
    page.get_by_role("button", name="Generate", exact=True).first.click()
    view = page.locator("#view-generate")
    view.get_by_label("Prompt", exact=True).fill("a lighthouse")
    view.get_by_label("Steps").fill("2")
    seed_field = view.get_by_label("Seed", exact=True)
    assert seed_field.input_value() == ""  # a random seed
    view.get_by_role("button", name="Generate").click()
    results = page.locator("#gen-gallery .result")  # the newest first
    page.locator("#gen-gallery .result, #gen-error:not([hidden])").first.wait_for()
    expect(page.locator("#gen-error")).to_be_hidden()
    seed = results.first.get_attribute("data-seed")

    results.first.get_by_role("button", name="Reuse this seed").click()
    assert seed_field.input_value() == seed
    view.get_by_role("button", name="Generate").click()
    results.nth(1).wait_for()
    assert results.first.get_attribute("data-seed") == seed
    assert generated_image(page, 1) == generated_image(page, 0)
    assert int(seed) < 2**32  # drawn as AUTOMATIC1111 draws them


@pytest.mark.parametrize("typed", ["9007199254740992", "12345678901234567890", "1.5", "-3", "1e3"])
def test_a_seed_the_page_cannot_send_exactly_is_refused_with_the_rule(page, browser_safety_server, typed):
    page.goto(f"{browser_safety_server}/ui")
    page.get_by_role("button", name="Generate", exact=True).first.click()
    view = page.locator("#view-generate")
    view.get_by_label("Prompt", exact=True).fill("a lighthouse")
    seed_field = view.get_by_label("Seed", exact=True)
    seed_field.fill(typed)
    sent = []
    page.on("request", lambda request: sent.append(request.url) if "/ui/api/generate" in request.url else None)
    view.get_by_role("button", name="Generate").click()
    assert "9007199254740991" in seed_field.evaluate("input => input.validationMessage")
    page.wait_for_timeout(500)
    assert not sent
    seed_field.fill("9007199254740991")  # the largest is fine
    assert seed_field.evaluate("input => input.validity.valid")


def test_images_whose_seeds_would_run_past_the_exact_range_are_refused(page, browser_safety_server):
    page.goto(f"{browser_safety_server}/ui")
    page.get_by_role("button", name="Generate", exact=True).first.click()
    view = page.locator("#view-generate")
    view.get_by_label("Prompt", exact=True).fill("a lighthouse")
    view.get_by_label("Seed", exact=True).fill("9007199254740990")
    view.get_by_label("Images").fill("3")
    view.get_by_role("button", name="Generate").click()
    expect(page.locator("#gen-error")).to_contain_text("3 images from seed 9007199254740990 run past")
    assert page.locator("#gen-gallery .result").count() == 0


def test_swagger_ui_works_under_its_policy_which_keeps_it_from_calling_home(browser, client, browser_safety_server):
    docs = client.get("/docs")
    assert "script-src" not in docs.headers["content-security-policy"]  # default-src 'self': its own files only
    assert docs.headers["x-frame-options"] == "DENY"
    with watched_page(browser, browser_safety_server) as watched:
        watched.page.goto(f"{browser_safety_server}/docs")
        watched.page.locator(".swagger-ui .opblock").first.wait_for()  # it read /docs.json and drew the operations
    # BentoML's page would load Google Tag Manager (an inline loader) and its description's badges from the
    # internet: the policy blocks those, and nothing else.
    assert any("inline script" in violation for violation in watched.violations), watched.violations
    assert all("inline script" in violation or "img-src" in violation for violation in watched.violations)
