"""ASGI middleware that guards every route of the app at once: bearer-token auth, the Host and Origin a
request may come with, the content types a body may have, a request body limit, and the security headers
of what a browser shows.

They wrap the whole BentoML app (service.py adds them first, so they sit outside everything else the
service adds), which is how routes added later (mounted apps, new APIs) are covered without a line of
their own. Each reads its settings once, when BentoML builds the app in its worker. docs/security.md
tells who may reach what under which settings.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from urllib.parse import urlsplit

from serving.invocations import CONTENT_TYPES, JSON_CONTENT, unsupported_content_type
from serving.settings import ServingSettings

# The one route whose body may exceed TXT2IMG_MAX_BODY_BYTES: a training job's photos, up to
# TXT2IMG_TRAIN_MAX_BODY_BYTES.
TRAIN_ROUTE = "/jobs/train"

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


def header(scope, name: bytes) -> str | None:
    """The value of the request's header ``name`` (lower case), if it has one."""
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


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
    """Answers 413 to a request whose body is longer than TXT2IMG_MAX_BODY_BYTES (TXT2IMG_TRAIN_MAX_BODY_BYTES
    for a POST to TRAIN_ROUTE, and for it alone).

    A declared Content-Length over the limit is refused before a byte of the body is read. Any other
    body (chunked, or longer than it claimed) is counted as the app reads it, and reading stops at
    the limit, so no oversized body is ever held in memory.
    """

    def __init__(self, app) -> None:
        self.app = app
        settings = ServingSettings()
        self.limit = settings.max_body_bytes
        self.train_limit = settings.train_max_body_bytes

    def _limit(self, scope) -> tuple[str, int]:
        """The setting that bounds this request's body, and its value."""
        if scope["method"] == "POST" and scope["path"] == TRAIN_ROUTE:
            return "TXT2IMG_TRAIN_MAX_BODY_BYTES", self.train_limit
        return "TXT2IMG_MAX_BODY_BYTES", self.limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        setting, limit = self._limit(scope)
        refusal = {"error": f"the request body is larger than {setting} ({limit} bytes)"}
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await send_json(send, 413, refusal, {"Connection": "close"})
                return

        received = 0
        too_large = False
        response_started = False

        async def counting_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message):
            nonlocal response_started
            if too_large:  # the app caught BodyTooLarge and answers on its own: the 413 goes out instead
                if not response_started:
                    response_started = True
                    await send_json(send, 413, refusal, {"Connection": "close"})
                return
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:  # BodyTooLarge, or whatever the app turned it into
            if not too_large:
                raise
            if not response_started:
                await send_json(send, 413, refusal, {"Connection": "close"})


def host_name(authority: str) -> str:
    """The host of a ``Host`` header or an origin's authority, lower case, without its port:
    ``"LocalHost:3000"`` -> ``"localhost"``, ``"[::1]:3000"`` -> ``"::1"``."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1:].partition("]")[0]
    return authority.partition(":")[0]


def is_loopback(name: str) -> bool:
    """``localhost``, any 127.x.x.x, or ::1: names that reach only this machine."""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _origin_parts(scheme: str, authority: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in; port None when it is not a number."""
    try:
        parts = urlsplit(f"{scheme}://{authority}")
        port = parts.port
    except ValueError:
        return scheme, authority, None
    return scheme, parts.hostname or "", port or {"http": 80, "https": 443}.get(scheme)


async def refuse(scope, send, body: dict) -> None:
    """403 with ``body``; a WebSocket is closed before it opens, so the server answers its handshake with 403."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})  # policy violation
        return
    await send_json(send, 403, body)


class HostOriginGuard:
    """Without TXT2IMG_API_TOKEN, answers 403 to a request whose ``Host`` is neither loopback nor in
    TXT2IMG_ALLOWED_HOSTS, and to one whose ``Origin`` is neither this server's own nor an allowed host;
    the health checks (OPEN_PATHS) stay open to anyone.

    A web page elsewhere can make a browser send requests here: the Origin check refuses them. With
    DNS rebinding, a page elsewhere makes its own name point at 127.0.0.1, so that the browser deems
    the server's answers the page's own: the Host check refuses them, since the Host is then that
    name. With a token neither can happen (a browser never adds a bearer token of its own accord), so
    a server with a token answers any Host and Origin.
    """

    def __init__(self, app) -> None:
        self.app = app
        settings = ServingSettings()
        self.off = settings.api_token is not None
        self.allowed_hosts = frozenset(settings.allowed_hosts)

    def allows(self, name: str) -> bool:
        return "*" in self.allowed_hosts or name in self.allowed_hosts

    def origin_allowed(self, scope, origin: str, host: str) -> bool:
        """Whether ``origin`` is this server's own (the scheme it is reached by, and ``host``) or an allowed host's."""
        scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
        origin_scheme, _, authority = origin.strip().lower().partition("://")
        parts = _origin_parts(origin_scheme, authority)
        return parts == _origin_parts(scheme, host.strip().lower()) or self.allows(parts[1])

    async def __call__(self, scope, receive, send) -> None:
        if self.off or scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        host = header(scope, b"host") or ""
        if not (is_loopback(host_name(host)) or self.allows(host_name(host))):
            reason = (
                f"Host '{host}' is not allowed: without TXT2IMG_API_TOKEN this server answers loopback names "
                "(localhost, 127.0.0.1, [::1]) and the hosts in TXT2IMG_ALLOWED_HOSTS only"
            )
            await refuse(scope, send, {"error": reason})
            return
        origin = header(scope, b"origin")
        if origin is not None and not self.origin_allowed(scope, origin, host):
            reason = (
                f"requests from origin '{origin}' are refused: without TXT2IMG_API_TOKEN this server answers "
                "pages of its own origin and of the hosts in TXT2IMG_ALLOWED_HOSTS only"
            )
            await refuse(scope, send, {"error": reason})
            return
        await self.app(scope, receive, send)


# The bodies that are not JSON, by route: a new route taking another type (a multipart upload) adds its
# entry here. Any other POST, PUT or PATCH body must be application/json.
BODY_MEDIA_TYPES: dict[str, tuple[str, ...]] = {
    "/invocations": CONTENT_TYPES,  # JumpStart's own types
    TRAIN_ROUTE: ("multipart/form-data",),  # the photos of a fine-tune
}
JSON_BODY = (JSON_CONTENT,)
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def has_body(scope) -> bool:
    length = header(scope, b"content-length")
    return header(scope, b"transfer-encoding") is not None or (length is not None and length.strip() != "0")


class ContentTypeGuard:
    """Answers 415 to a POST, PUT or PATCH body whose Content-Type its route does not take
    (BODY_MEDIA_TYPES, else JSON), a body without a Content-Type included, before a byte of it is read.

    A browser sends text/plain, form-encoded and multipart bodies to any origin without asking first
    (CORS "simple" requests); application/json it sends elsewhere only after a preflight that this
    server never grants. So a page on another origin cannot make a route read a body of its making.
    A request without a body (a route that takes none) is left alone.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS or not has_body(scope):
            await self.app(scope, receive, send)
            return
        accepted = BODY_MEDIA_TYPES.get(scope["path"], JSON_BODY)
        content_type = header(scope, b"content-type")
        if content_type is None:
            problem = f"a request body needs a Content-Type header; use one of: {', '.join(accepted)}"
        else:
            problem = unsupported_content_type(content_type, accepted)
        if problem is not None:
            await send_json(send, 415, {"error": problem})
            return
        await self.app(scope, receive, send)


# What may run or be shown on the playground's pages and the images served: this server's own scripts,
# styles and requests; images also as data: and blob: URLs (the page shows generated images as base64).
# No page anywhere may frame them (clickjacking).
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
# BentoML's Swagger UI: its scripts are its own files, but its styles are partly inline; the policy
# also blocks the Google Tag Manager script its page would load from the internet.
DOCS_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def content_security_policy(path: str) -> str | None:
    """The Content-Security-Policy of what a browser shows at ``path``; None for the APIs."""
    if path == "/ui" or path.startswith(("/ui/", "/v1/images/files/")):
        return PAGE_POLICY
    if path in ("/docs", "/") or path.startswith("/static_content/"):
        return DOCS_POLICY
    return None


class SecurityHeaders:
    """Adds Content-Security-Policy, ``X-Content-Type-Options: nosniff`` and ``X-Frame-Options: DENY`` to
    the answers of the playground (``/ui`` and below: its page, API and run files), Swagger UI
    (``/docs``) and the images served by ``/v1/images/files/``."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        policy = content_security_policy(scope["path"]) if scope["type"] == "http" else None
        if policy is None:
            await self.app(scope, receive, send)
            return
        added = [
            (b"content-security-policy", policy.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
        ]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {name for name, _ in added}
                kept = [(name, value) for name, value in message.get("headers", []) if name.lower() not in names]
                message = {**message, "headers": kept + added}
            await send(message)

        await self.app(scope, receive, send_with_headers)
