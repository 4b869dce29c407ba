"""Who may use the server: an optional access token, the page origins and host names it accepts.

On localhost no token is needed. A server reachable from other machines should have a
token (`personaplex serve` makes one up when listening beyond localhost without one):
clients present it as `?token=...` (browsers cannot set websocket headers), as an
`Authorization: Bearer ...` header, or as the `personaplex_token` cookie. The page and its
static files need no token; opening any page with a correct `?token=` sets that cookie
(HttpOnly, SameSite=Strict), so a client that builds its own websocket URL, such as
NVIDIA's web client served with `serve --static`, is let in too.

With a token set, these stay public, on purpose: the page `/` and `/static/*` (the page
reads the token from its own URL and passes it on; the files are the open-source client),
`/api/health` (load balancers and container probes ask it without credentials; it says only
"ok" and whether the model is ready) and `/docs` + `/openapi.json` (the description of this
open-source API, the same for every server; the docs page cannot pass a token to its own
schema request). Everything that shows or uses this server's state needs the token:
`/api/status`, `/api/voices`, `/api/prompts`, `/metrics` and the conversation socket.

Browsers let any web page open a websocket to any server, sending the page's origin:
the conversation socket accepts only clients without an Origin header (not browsers),
pages served by this server itself, pages on loopback hosts (127.0.0.0/8, ::1,
localhost; any port) and the allowed origins.

DNS rebinding: a page on a name the attacker controls can make that name resolve to this
server, and its requests are then "same origin". Every HTTP request and websocket must
therefore name, in its Host header, a name this server is really reachable by: an IP
address (a rebinding page always uses a name), a loopback name, the address it listens on,
or a name given with `--allowed-host` (e.g. the name of a reverse proxy).
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_NAMES = frozenset({"localhost"})
TOKEN_COOKIE = "personaplex_token"


def is_loopback_host(host: str) -> bool:
    """Whether `host` (a bare name or address, `[::1]` too; no port) is this machine's loopback."""
    name = host.strip().lower().removeprefix("[").removesuffix("]")
    if name in LOOPBACK_NAMES:
        return True
    address = _ip_address(name)
    return address is not None and address.is_loopback


def host_name(host_header: str) -> str:
    """The name part of a Host header (`name:port`, `[v6]:port`), lower case, brackets kept off."""
    value = host_header.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") > 1:  # a bare IPv6 address, as `--host ::1` gives it
        return value
    name, _, _port = value.partition(":")
    return name


def _ip_address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


@dataclass(frozen=True)
class AccessPolicy:
    token: str | None = None
    allowed_origins: frozenset[str] = frozenset()
    # Host names (no port) requests may address besides IP addresses and loopback names;
    # "*" accepts any (behind a proxy that checks them itself).
    allowed_hosts: frozenset[str] = frozenset()

    @classmethod
    def create(
        cls, token: str | None, allowed_origins: Iterable[str] = (), allowed_hosts: Iterable[str] = ()
    ) -> AccessPolicy:
        return cls(
            token or None,
            frozenset(origin.rstrip("/") for origin in allowed_origins),
            frozenset(host_name(host) for host in allowed_hosts),
        )

    def token_accepted(
        self, query: Mapping[str, str], headers: Mapping[str, str], cookies: Mapping[str, str] | None = None
    ) -> bool:
        """Whether the request carries the token (always true when there is none)."""
        if self.token is None:
            return True
        presented = (
            query.get("token")
            or _bearer_token(headers.get("authorization", ""))
            or (cookies or {}).get(TOKEN_COOKIE)
        )
        # Bytes: compare_digest refuses str with non-ASCII characters, which a client may send.
        return presented is not None and secrets.compare_digest(
            presented.encode("utf-8", "surrogateescape"), self.token.encode("utf-8")
        )

    def host_accepted(self, headers: Mapping[str, str]) -> bool:
        """Whether the Host header names this server (see the module doc: DNS rebinding)."""
        host = headers.get("host")
        if host is None or "*" in self.allowed_hosts:
            return True  # HTTP/1.0 clients may omit it; browsers always send it
        name = host_name(host)
        return _ip_address(name) is not None or is_loopback_host(name) or name in self.allowed_hosts

    def origin_accepted(self, headers: Mapping[str, str]) -> bool:
        """Whether a websocket from a page with this Origin may connect."""
        origin = headers.get("origin")
        if origin is None or "*" in self.allowed_origins:
            return True
        origin = origin.rstrip("/")
        if origin in self.allowed_origins:
            return True
        try:
            parts = urlsplit(origin)
            page_host = parts.hostname or ""
        except ValueError:  # e.g. an unclosed IPv6 bracket
            return False
        same_origin = parts.netloc == headers.get("host", "")
        return same_origin or is_loopback_host(page_host)


def _bearer_token(authorization: str) -> str | None:
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def new_token() -> str:
    return secrets.token_urlsafe(24)


class HostGuard:
    """ASGI middleware: requests and websockets whose Host header does not name this server
    are refused (HTTP 400; a websocket handshake gets 403) before the app sees them."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.policy.host_accepted(Headers(scope=scope)):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        response = PlainTextResponse(_HOST_MESSAGE, status_code=400)
        await response(scope, receive, send)


_HOST_MESSAGE = (
    "this server is not reachable by the name in the Host header; use its address or a "
    "loopback name, or start it with --allowed-host NAME"
)
