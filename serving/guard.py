"""ASGI middleware that guards every route of the app at once: bearer-token auth and a request body limit.

They wrap the whole BentoML app (service.py adds them first, so they sit outside everything else the
service adds), which is how routes added later (mounted apps, new APIs) are covered without a line of
their own. Both read their setting once, when BentoML builds the app in its worker.
"""

from __future__ import annotations

import hmac
import json

from serving.settings import ServingSettings

# Health checks answer without a token: load balancers and SageMaker's /ping carry none.
OPEN_PATHS = frozenset({"/ping", "/readyz", "/livez", "/healthz"})
# The images behind OpenAI "url" answers: each name is 24 random bytes, handed only to the client that
# generated it, and OpenAI's clients and tools fetch such links without any header, as from OpenAI.
OPEN_PREFIXES = ("/v1/images/files/",)


async def send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    """A complete JSON response, written straight to the ASGI ``send``."""
    content = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
    raw_headers += [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": content})


def bearer_token(scope) -> bytes | None:
    """The token of the request's ``Authorization: Bearer <token>`` header, if it has one."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
    return None


class BearerTokenAuth:
    """Answers 401 to any request without ``Authorization: Bearer $TXT2IMG_API_TOKEN``, but on OPEN_PATHS
    and OPEN_PREFIXES,
    and closes such a WebSocket before it opens (the server then answers its handshake with 403).

    Without TXT2IMG_API_TOKEN it lets everything through, as a local server does.
    """

    def __init__(self, app) -> None:
        self.app = app
        token = ServingSettings().api_token
        self.token = token.get_secret_value().encode() if token is not None else None

    async def __call__(self, scope, receive, send) -> None:
        if (
            self.token is None
            or scope["type"] not in ("http", "websocket")
            or scope["path"] in OPEN_PATHS
            or scope["path"].startswith(OPEN_PREFIXES)
        ):
            await self.app(scope, receive, send)
            return
        sent = bearer_token(scope)
        # compare_digest takes as long for every wrong token of a given length, so timing reveals nothing.
        if sent is None or not hmac.compare_digest(sent, self.token):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})  # policy violation
                return
            reason = "missing bearer token" if sent is None else "wrong bearer token"
            body = {"error": f"{reason}: send the header 'Authorization: Bearer <TXT2IMG_API_TOKEN>'"}
            await send_json(send, 401, body, {"WWW-Authenticate": 'Bearer realm="txt2img"'})
            return
        await self.app(scope, receive, send)


class BodyTooLarge(Exception):
    """The request body grew past the limit while it was being read."""


class RequestBodyLimit:
    """Answers 413 to a request whose body is longer than TXT2IMG_MAX_BODY_BYTES.

    A declared Content-Length over the limit is refused before a byte of the body is read. Any other
    body (chunked, or longer than it claimed) is counted as the app reads it, and reading stops at
    the limit, so no oversized body is ever held in memory.
    """

    def __init__(self, app) -> None:
        self.app = app
        self.limit = ServingSettings().max_body_bytes

    def _refusal(self) -> dict:
        return {"error": f"the request body is larger than TXT2IMG_MAX_BODY_BYTES ({self.limit} bytes)"}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await send_json(send, 413, self._refusal(), {"Connection": "close"})
                return

        received = 0
        too_large = False
        response_started = False

        async def counting_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    too_large = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message):
            nonlocal response_started
            if too_large:  # the app caught BodyTooLarge and answers on its own: the 413 goes out instead
                if not response_started:
                    response_started = True
                    await send_json(send, 413, self._refusal(), {"Connection": "close"})
                return
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:  # BodyTooLarge, or whatever the app turned it into
            if not too_large:
                raise
            if not response_started:
                await send_json(send, 413, self._refusal(), {"Connection": "close"})
