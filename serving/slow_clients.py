"""Connections that never finish a request's head are closed after HEADER_TIMEOUT_S (slowloris).

A BentoML 1.4 worker serves HTTP with uvicorn, using uvicorn's ``"auto"`` HTTP protocol: h11 here,
httptools when installed. Neither bounds the time a request's line and headers may take: uvicorn's
only timer, ``timeout_keep_alive`` (5 s; BentoML's ``--timeout-keep-alive``), starts after an answer
and stops at the next byte received. So a client that opens connections and sends a few header bytes
now and then holds each open for ever, until the worker runs out of file descriptors. BentoML passes
no ``http`` setting to uvicorn and exposes none, so the service names its own protocol for ``"auto"``:
h11's, with a timer from the moment the connection opens (or its last answer went out) to the end of
the next request's head.
"""

from __future__ import annotations

import asyncio

import h11
import uvicorn.config
from uvicorn.protocols.http.h11_impl import H11Protocol

# Nginx allows 60 s by default, Apache's mod_reqtimeout 20 s; a client on loopback or a LAN needs
# milliseconds, and a slow mobile link a few seconds.
HEADER_TIMEOUT_S = 10


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol that closes a connection waiting more than HEADER_TIMEOUT_S for a request head."""

    header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is complete: the request is the app's now
            self._stop_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._start_header_timer()  # the next request's head has as long as the first one's had

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _start_header_timer(self) -> None:
        self._stop_header_timer()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._close_without_a_head)

    def _stop_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _close_without_a_head(self) -> None:
        self.header_timer = None
        if self.conn.their_state is h11.IDLE:
            self.timeout_keep_alive_handler()  # closes the connection the way uvicorn's own timer does


def close_connections_without_a_head() -> None:
    """Make every uvicorn server this process starts afterwards (a BentoML worker's) use HeaderTimeoutProtocol.

    BentoML builds its worker's ``uvicorn.Config`` after importing the service, and uvicorn looks the
    protocol's name up when that server starts, so this runs at the service module's import.
    """
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:{HeaderTimeoutProtocol.__name__}"
