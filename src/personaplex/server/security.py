"""Who may use the server: an optional access token and a list of allowed page origins.

On localhost neither is needed. A server reachable from other machines should have a
token (`personaplex serve` makes one up when listening beyond localhost without one):
clients present it as `?token=...` (browsers cannot set websocket headers), as an
`Authorization: Bearer ...` header, or as the `personaplex_token` cookie. The page and its
static files need no token; opening any page with a correct `?token=` sets that cookie
(HttpOnly, SameSite=Strict), so a client that builds its own websocket URL, such as
NVIDIA's web client served with `serve --static`, is let in too.

Browsers let any web page open a websocket to any server, sending the page's origin:
the conversation socket accepts only clients without an Origin header (not browsers),
pages served by this server itself, pages on localhost, and the allowed origins.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
TOKEN_COOKIE = "personaplex_token"


def is_loopback_host(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


@dataclass(frozen=True)
class AccessPolicy:
    token: str | None = None
    allowed_origins: frozenset[str] = frozenset()

    @classmethod
    def create(cls, token: str | None, allowed_origins: Iterable[str] = ()) -> AccessPolicy:
        return cls(token or None, frozenset(origin.rstrip("/") for origin in allowed_origins))

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
        return presented is not None and secrets.compare_digest(presented.encode(), self.token.encode())

    def origin_accepted(self, headers: Mapping[str, str]) -> bool:
        """Whether a websocket from a page with this Origin may connect."""
        origin = headers.get("origin")
        if origin is None or "*" in self.allowed_origins:
            return True
        origin = origin.rstrip("/")
        if origin in self.allowed_origins:
            return True
        parts = urlsplit(origin)
        same_origin = parts.netloc == headers.get("host", "")
        return same_origin or is_loopback_host(parts.hostname or "")


def _bearer_token(authorization: str) -> str | None:
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def new_token() -> str:
    return secrets.token_urlsafe(24)
