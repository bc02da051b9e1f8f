"""Locking the service down (issue #10), end to end on one real ``bentoml serve``: bearer-token auth on
every route but the health checks, a request body limit, requests that may not download, and the
safety checker (a tiny one that flags every image; tests/test_safety_checker.py has one that flags none)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from bentoml_server import running_server
from PIL import Image
from tiny_safety_checker import save_tiny_safety_checker

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY_BYTES = 4096
FAST = {"prompt": "a red cube", "num_inference_steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def server_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("guard-home")


HUB_MODEL = "model-txt2img-stabilityai-stable-diffusion-v1-4"  # a catalog model on the Hub, never cached here


@pytest.fixture(scope="module")
def stand_in_hub() -> tuple[str, list[str]]:
    """A stand-in Hugging Face Hub on loopback that has nothing: its URL, and every path asked of it."""
    asked: list[str] = []

    class NothingHere(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            self.send_error(404)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    hub = ThreadingHTTPServer(("127.0.0.1", 0), NothingHere)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{hub.server_address[1]}", asked
    hub.shutdown()


@pytest.fixture(scope="module")
def guarded_server(server_home, stand_in_hub):
    settings = {
        "api_token": TOKEN,
        "max_body_bytes": str(MAX_BODY_BYTES),
        "allow_downloads": "off",
        "safety_checker": "on",
        "safety_checker_repo": str(save_tiny_safety_checker(server_home / "safety", flag_everything=True)),
        "torch_threads": "1",
    }
    hub_url, _ = stand_in_hub
    with running_server(
        server_home, env={"HF_HOME": str(server_home / "hf"), "HF_ENDPOINT": hub_url}, **settings
    ) as url:
        yield url


@pytest.fixture()
def client(guarded_server):
    with httpx.Client(base_url=guarded_server, timeout=60) as http:
        yield http


# Auth

GUARDED = [
    ("GET", "/docs.json", None),
    ("GET", "/metrics", None),
    ("GET", "/models", None),
    ("GET", "/sagemaker/openapi.json", None),
    ("POST", "/txt2img", FAST),
    ("POST", "/images", FAST),
    ("POST", "/invocations", FAST),
    ("GET", "/v1/models", None),
    ("GET", "/sdapi/v1/sd-models", None),
    ("GET", "/ui/api/catalog", None),
    ("GET", "/no-such-route", None),
]


@pytest.mark.parametrize(("method", "path", "body"), GUARDED)
def test_a_request_without_a_token_gets_401_json_with_a_bearer_challenge(client, method, path, body):
    response = client.request(method, path, json=body)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "missing bearer token" in response.json()["error"]


@pytest.mark.parametrize("authorization", [f"Bearer {TOKEN}x", "Bearer s3cret", f"Basic {TOKEN}", TOKEN, "Bearer"])
def test_a_wrong_token_gets_401(client, authorization):
    response = client.post("/txt2img", json=FAST, headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response.json()["error"]


@pytest.mark.parametrize(("method", "path", "body"), GUARDED[:-1])
def test_the_right_token_gets_through(client, method, path, body):
    response = client.request(method, path, json=body, headers={**AUTH, "Accept": "application/json;jpeg"})
    assert response.status_code == 200, response.text


def test_the_scheme_is_case_insensitive(client):
    assert client.get("/models", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200


def test_endpoints_invoke_url_sends_the_token_from_the_environment(guarded_server, monkeypatch):
    from jumpstart.endpoints import invoke_url
    from jumpstart.errors import SageMakerError

    body = {"prompt": "a red cube", "num_inference_steps": 2}
    monkeypatch.delenv("TXT2IMG_API_TOKEN", raising=False)
    with pytest.raises(SageMakerError, match="HTTP 401"):
        invoke_url(guarded_server, body)
    monkeypatch.setenv("TXT2IMG_API_TOKEN", TOKEN)
    assert "generated_images" in json.loads(invoke_url(guarded_server, body))


def test_an_openai_url_answer_is_fetched_without_the_token(client):
    answer = client.post(
        "/v1/images/generations",
        json={"prompt": "a red cube", "size": "64x64", "response_format": "url", "num_inference_steps": 2},
        headers=AUTH,
    )
    assert answer.status_code == 200, answer.text
    image = httpx.get(answer.json()["data"][0]["url"], timeout=30)  # as OpenAI's tools fetch it: no header
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


def test_with_a_token_any_host_and_origin_are_answered(client):
    """A browser never sends the token of its own accord, so the Host and Origin rules are off (docs/security.md)."""
    headers = {**AUTH, "Host": "evil.example", "Origin": "https://evil.example"}
    assert client.get("/models", headers=headers).status_code == 200
    assert client.get("/models", headers={"Host": "evil.example"}).status_code == 401


@pytest.mark.parametrize("path", ["/ping", "/readyz", "/livez", "/healthz"])
def test_health_checks_stay_open(client, path):
    assert client.get(path).status_code == 200


# Body limit


def test_a_body_over_the_limit_gets_413_json_from_its_content_length(client):
    body = {**FAST, "prompt": "x" * MAX_BODY_BYTES}
    for path in ("/txt2img", "/images", "/invocations"):
        response = client.post(path, json=body, headers=AUTH)
        assert response.status_code == 413, path
        assert "TXT2IMG_MAX_BODY_BYTES" in response.json()["error"]


def test_a_body_under_the_limit_still_works(client):
    body = {**FAST, "prompt": "x" * 1500}
    response = client.post("/invocations", json=body, headers=AUTH)
    assert response.status_code == 200, response.text


def chunks(total: int, size: int = 1024):
    sent = 0
    while sent < total:
        yield b"x" * min(size, total - sent)
        sent += size


@pytest.mark.parametrize("path", ["/txt2img", "/invocations"])
def test_a_chunked_body_is_counted_and_cut_off(client, path):
    response = client.post(
        path, content=chunks(MAX_BODY_BYTES * 4), headers={**AUTH, "Content-Type": "application/json"}
    )
    assert "content-length" not in response.request.headers  # sent chunked
    assert response.status_code == 413
    assert "TXT2IMG_MAX_BODY_BYTES" in response.json()["error"]


def test_a_200_mb_body_is_refused_before_it_is_sent(guarded_server):
    """The answer comes after the headers: the 200 MB are never sent, let alone read."""
    host, port = guarded_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(
            b"POST /txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {200 * 2**20}\r\n\r\n".encode()
        )
        answer = b""
        while chunk := connection.recv(4096):  # the server closes the connection after its answer
            answer += chunk
    answer = answer.decode()
    assert answer.startswith("HTTP/1.1 413")
    assert "TXT2IMG_MAX_BODY_BYTES" in answer


def test_a_200_mb_chunked_body_is_cut_off_at_the_limit(guarded_server):
    """Chunks go out until the server answers, which it does right after the limit, long before 200 MB."""
    host, port = guarded_server.removeprefix("http://").split(":")
    chunk = b"%x\r\n%s\r\n" % (2**16, b"x" * 2**16)
    answer = bytearray()
    sent = 0
    with socket.create_connection((host, int(port)), timeout=10) as connection:

        def read_answer():
            with contextlib.suppress(OSError):
                while data := connection.recv(4096):
                    answer.extend(data)

        reader = threading.Thread(target=read_answer, daemon=True)
        reader.start()
        connection.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        with contextlib.suppress(OSError):  # the server closes the connection once it has answered
            while sent < 200 * 2**20 and not answer:
                connection.sendall(chunk)
                sent += 2**16
        reader.join(timeout=10)
    assert bytes(answer).startswith(b"HTTP/1.1 413"), bytes(answer[:200])
    assert sent < 20 * 2**20  # the limit plus what the sockets' buffers took on


def test_an_unauthenticated_large_body_gets_401_first(client):
    response = client.post("/txt2img", content=b"x" * MAX_BODY_BYTES * 2)
    assert response.status_code == 401


# Downloads


@pytest.mark.parametrize("path", ["/txt2img", "/images"])
def test_a_request_cannot_download_a_model_when_downloads_are_off(client, stand_in_hub, path):
    response = client.post(path, json={**FAST, "model": HUB_MODEL}, headers=AUTH)
    assert response.status_code == 403, response.text
    assert "TXT2IMG_ALLOW_DOWNLOADS" in response.json()["error"]
    assert response.json()["model"] == HUB_MODEL
    assert stand_in_hub[1] == []  # nothing was even asked of the Hub
    assert client.post("/txt2img", json=FAST, headers=AUTH).status_code == 200  # the cached model still serves


# Safety checker


def is_black(content: bytes) -> bool:
    return int(np.asarray(Image.open(io.BytesIO(content))).max()) <= 2  # JPEG may ring a little


def test_a_flagged_image_comes_back_black_and_the_header_says_so(client):
    response = client.post("/txt2img", json=FAST, headers=AUTH)
    assert response.status_code == 200
    assert response.headers["x-nsfw-content-detected"] == "true"
    assert is_black(response.content)


def test_images_say_which_were_flagged(client):
    response = client.post("/images", json={**FAST, "num_images": 2}, headers=AUTH)
    assert response.status_code == 200
    images = response.json()["images"]
    assert [image["nsfw_content_detected"] for image in images] == [True, True]
    assert all(is_black(base64.b64decode(image["image"])) for image in images)


def test_invocations_add_a_field_jumpstart_clients_ignore(client):
    body = {"prompt": ["a red cube", "a blue ball"], "num_inference_steps": 2, "width": 64, "height": 64}
    response = client.post("/invocations", json=body, headers=AUTH)
    assert response.status_code == 200
    answer = response.json()
    assert answer["nsfw_content_detected"] == [True, True]
    assert len(answer["generated_images"]) == 2
    assert all(is_black(base64.b64decode(image)) for image in answer["generated_images"])


# The middleware alone, in this process: what no route of the service exercises yet


def test_a_websocket_without_the_token_is_refused_and_with_it_opens(monkeypatch):
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from serving.guard import BearerTokenAuth

    async def echo(websocket):
        await websocket.accept()
        await websocket.send_text("open")
        await websocket.close()

    monkeypatch.setenv("TXT2IMG_API_TOKEN", TOKEN)
    app = BearerTokenAuth(Starlette(routes=[WebSocketRoute("/ws", echo)]))
    with TestClient(app) as test_client:
        with pytest.raises(WebSocketDisconnect) as refused, test_client.websocket_connect("/ws"):
            pass
        assert refused.value.code == 1008
        with test_client.websocket_connect("/ws", headers=AUTH) as websocket:
            assert websocket.receive_text() == "open"


def test_docs_json_declares_the_bearer_auth_and_stays_valid_openapi_3_0(client):
    from openapi_spec_validator import validate

    document = client.get("/docs.json", headers=AUTH).json()
    validate(document)
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, method in (("/txt2img", "post"), ("/invocations", "post"), ("/metrics", "get"), ("/models", "get")):
        operation = document["paths"][path][method]
        assert operation["security"] == [{"bearer": []}]
        assert "401" in operation["responses"]
    for path in ("/ping", "/readyz", "/livez", "/healthz"):
        assert "security" not in document["paths"][path]["get"]
