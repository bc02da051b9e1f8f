"""Fixtures of the jobs tests (registered in conftest.py): where a job store lives, on either database,
and a webhook receiver on loopback."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


@pytest.fixture(params=["sqlite", "postgresql"])
def job_store_location(request, tmp_path) -> Path | str:
    """Where a job store lives (serving.jobs.JobStore's argument): a folder for SQLite, or the URL of an
    empty database on a real PostgreSQL server."""
    if request.param == "sqlite":
        return tmp_path
    return request.getfixturevalue("postgresql_url")


class WebhookReceiver:
    """A webhook receiver on loopback: ``/ok`` answers 200, ``/down`` 500, and ``/flaky`` 500 to the first
    delivery of each event and 200 to the next. Every delivery's raw body and signature header is kept."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[bytes, str | None]] = []
        self._seen: set[tuple[str, str]] = set()
        self._arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(receiver.answer(self.path, body, self.headers.get("X-Txt2img-Signature")))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def answer(self, path: str, body: bytes, signature: str | None) -> int:
        with self._arrived:
            self.deliveries.append((body, signature))
            self._arrived.notify_all()
            if path == "/down":
                return 500
            if path == "/flaky":
                event = json.loads(body)
                key = (event["id"], event["event"])
                first = key not in self._seen
                self._seen.add(key)
                return 500 if first else 200
            return 200

    def wait_for(self, count: int, timeout_s: float = 60) -> None:
        with self._arrived:
            arrived = self._arrived.wait_for(lambda: len(self.deliveries) >= count, timeout_s)
        assert arrived, f"{len(self.deliveries)} webhook deliveries, not {count}"


@pytest.fixture
def webhook_receiver():
    receiver = WebhookReceiver()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()
