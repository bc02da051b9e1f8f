"""Webhooks: a job's events POSTed, signed, to the URL its client gave, on a thread of their own.

Each event is a JSON object ``{"id", "event", "timestamp", ...}``; header ``X-Txt2img-Signature:
sha256=<hex>`` is the HMAC-SHA256 of the raw body under TXT2IMG_WEBHOOK_SECRET, so a receiver can tell
our events from forgeries (and, by the timestamp, from replays). A delivery that fails (no answer
within the timeout, or a status that is not 2xx) is tried again after a backoff that doubles, at most
TXT2IMG_WEBHOOK_RETRIES times. Generation never waits for a webhook.

A webhook is a request the server makes on a client's behalf, so its target must be a host that
TXT2IMG_WEBHOOK_HOSTS names; ``check_webhook_url`` refuses the rest at submission.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

from serving.settings import ServingSettings
from txt2img.errors import InputError

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Txt2img-Signature"


class WebhookRefused(InputError):
    """A webhook URL this server may not call."""

    http_status = 400

    def as_json(self) -> dict:
        return {"error": str(self), "field": "webhook"}


def signature(secret: str, body: bytes) -> str:
    """The X-Txt2img-Signature header's value for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def check_webhook_url(url: str, settings: ServingSettings) -> None:
    """Raise WebhookRefused unless ``url`` is an http(s) URL on a host TXT2IMG_WEBHOOK_HOSTS allows."""
    if settings.webhook_secret is None:
        raise WebhookRefused("webhooks are off on this server: TXT2IMG_WEBHOOK_SECRET is not set")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused(f"webhook must be an http or https URL with a host, not {url!r}")
    allowed = settings.webhook_hosts
    if "*" not in allowed and parts.hostname.lower() not in allowed:
        named = ", ".join(allowed) or "none"
        raise WebhookRefused(
            f"webhook host {parts.hostname!r} is not one TXT2IMG_WEBHOOK_HOSTS allows (allowed: {named})"
        )


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is a failed delivery: following it could reach a host TXT2IMG_WEBHOOK_HOSTS does not allow."""

    def redirect_request(self, *args, **kwargs):
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


@dataclass(order=True)
class _Delivery:
    due: float
    order: int
    url: str
    body: bytes
    attempt: int = 0


class WebhookSender:
    """Delivers events on one daemon thread; ``send`` only queues."""

    def __init__(self, settings: ServingSettings) -> None:
        self.settings = settings
        self._pending: list[_Delivery] = []
        self._order = itertools.count()
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="txt2img-webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def send(self, url: str, job_id: str, event: str, details: dict) -> None:
        """Queue event ``event`` of job ``job_id`` for ``url``."""
        payload = {"id": job_id, "event": event, "timestamp": time.time(), **details}
        body = json.dumps(payload, separators=(",", ":")).encode()
        self._queue(_Delivery(time.monotonic(), next(self._order), url, body))

    def _queue(self, delivery: _Delivery) -> None:
        with self._condition:
            heapq.heappush(self._pending, delivery)
            self._condition.notify()

    def _next_due(self) -> _Delivery:
        with self._condition:
            while True:
                if self._pending:
                    wait = self._pending[0].due - time.monotonic()
                    if wait <= 0:
                        return heapq.heappop(self._pending)
                    self._condition.wait(wait)
                else:
                    self._condition.wait()

    def _run(self) -> None:
        while True:
            delivery = self._next_due()
            if not self._post(delivery) and delivery.attempt < self.settings.webhook_retries:
                backoff = self.settings.webhook_backoff_s * 2**delivery.attempt
                delivery.attempt += 1
                delivery.due = time.monotonic() + backoff
                self._queue(delivery)

    def _post(self, delivery: _Delivery) -> bool:
        """One try; True when the receiver answered 2xx."""
        secret = self.settings.webhook_secret.get_secret_value()
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature(secret, delivery.body)}
        post = urllib.request.Request(delivery.url, data=delivery.body, headers=headers, method="POST")
        try:
            with _OPENER.open(post, timeout=self.settings.webhook_timeout_s) as answer:
                return 200 <= answer.status < 300
        except (urllib.error.URLError, OSError, ValueError) as error:  # HTTPError (non-2xx) is a URLError
            logger.info("webhook to %s failed (try %d): %s", delivery.url, delivery.attempt + 1, error)
            return False
