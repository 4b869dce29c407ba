"""HTTP connections against slowloris: a deadline for each request head and a cap on open
connections.

uvicorn closes idle keep-alive connections, but a client that sends a request head byte by
byte (or never finishes it) holds its socket forever, and nothing bounds how many sockets
are open. The ASGI app cannot help: it sees a request only once its head is complete. So
the guard sits in uvicorn's HTTP protocol (h11), the extension point uvicorn offers for
this (`http=` takes a protocol class).
"""

from __future__ import annotations

import asyncio
import logging
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

# A browser sends a request head in one packet; ten seconds is generous on any network.
HEADER_TIMEOUT_S = 10.0
# Open connections (HTTP and websockets) beyond which new ones are closed at once.
MAX_CONNECTIONS = 256
CAP_WARNING_INTERVAL_S = 10.0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head does not arrive in
    `header_timeout_s` and refusing connections beyond `max_connections`."""

    header_timeout_s: float = HEADER_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS
    _last_cap_warning = float("-inf")

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            now = time.monotonic()
            if now - GuardedH11Protocol._last_cap_warning > CAP_WARNING_INTERVAL_S:  # not one per attempt
                GuardedH11Protocol._last_cap_warning = now
                logger.warning("%d connections open, the most allowed: closing new ones", self.max_connections)
            transport.close()
            return
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        scope_before = self.scope
        super().handle_events()
        if self.scope is not scope_before:  # a request head arrived whole
            self._cancel_head_deadline()

    def on_response_complete(self) -> None:
        # Armed first: a pipelined request handled inside the call cancels it again.
        self._arm_head_deadline()
        super().on_response_complete()

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_too_slow)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            logger.info("closing a connection whose request head took over %g s", self.header_timeout_s)
            self.transport.close()


def guarded_http_protocol(
    header_timeout_s: float = HEADER_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS
) -> type[GuardedH11Protocol]:
    """The protocol class to pass to uvicorn as `http=`, with these limits."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout_s": header_timeout_s, "max_connections": max_connections},
    )
