"""How the server ends a websocket: close codes (RFC 6455) that tell a client whether
reconnecting can help, with the reason in the close frame, where every client can read it.

| code | meaning | should the client reconnect? |
|------|---------|------------------------------|
| 1000 | normal end: the client or the server ended the conversation | only if it wants a new one |
| 1008 | refused: access token, origin, settings, a persona that does not fit | no: change the request first |
| 1011 | the engine failed during the conversation | after a pause; report it if it repeats |
| 1013 | try again later: the server is busy or the model is still loading | yes, after a pause |
"""

from __future__ import annotations

from enum import IntEnum

# RFC 6455: a close frame's payload is at most 125 bytes, 2 of which hold the code.
MAX_REASON_BYTES = 123


class CloseCode(IntEnum):
    NORMAL = 1000
    POLICY = 1008
    SERVER_ERROR = 1011
    TRY_LATER = 1013


def close_reason(message: str) -> str:
    """`message` cut to what a close frame holds, on a character boundary."""
    encoded = message.encode("utf-8")
    if len(encoded) <= MAX_REASON_BYTES:
        return message
    return encoded[: MAX_REASON_BYTES - 3].decode("utf-8", errors="ignore") + "..."
