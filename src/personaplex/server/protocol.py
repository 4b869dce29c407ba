"""The conversation websocket's wire format: binary messages, first byte = kind.

Compatible with the reference PersonaPlex web UI and Kyutai's servers:

| byte | kind      | direction        | payload |
|------|-----------|------------------|---------|
| 0x00 | handshake | server -> client | none: the persona is ready, start sending audio |
| 0x01 | audio     | both ways        | whole Ogg pages of one Opus stream, 24 kHz mono |
| 0x02 | text      | server -> client | UTF-8 piece of the model's inner monologue |
| 0x03 | control   | client -> server | one action byte (Kyutai's values, below) |
| 0x04 | metadata  | both ways        | a UTF-8 JSON object |
| 0x05 | error     | server -> client | UTF-8 message for a person to read |
| 0x06 | ping      | both ways        | none; the server answers a ping with a ping |

Control actions: 0x00 start, 0x01 end of turn, 0x02 pause, 0x03 restart. This server acts
on "end of turn" (turn-based: the utterance is over, do not wait for the silence) and
"pause" (stop the reply being spoken); the others are answered with an error.

Metadata from the client changes settings of the running session (see sessions.py);
metadata from the server are events, each with a "type" (see conversation.py).
Anything malformed is answered with an error message and the socket stays open.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from personaplex.errors import PersonaPlexError


class MessageKind(IntEnum):
    HANDSHAKE = 0x00
    AUDIO = 0x01
    TEXT = 0x02
    CONTROL = 0x03
    METADATA = 0x04
    ERROR = 0x05
    PING = 0x06


class ControlAction(IntEnum):
    START = 0x00
    END_TURN = 0x01
    PAUSE = 0x02
    RESTART = 0x03


class ProtocolError(PersonaPlexError, ValueError):
    """A client message that breaks the wire format; answered with an error message."""


@dataclass(frozen=True)
class Message:
    kind: MessageKind
    payload: bytes


def decode_message(data: bytes) -> Message:
    """Split a binary websocket message into its kind and payload."""
    if not data:
        raise ProtocolError("empty message: every message starts with a kind byte (0x00-0x06)")
    try:
        kind = MessageKind(data[0])
    except ValueError:
        raise ProtocolError(
            f"unknown message kind 0x{data[0]:02x}: kinds are 0x00-0x06 "
            "(handshake, audio, text, control, metadata, error, ping)"
        ) from None
    return Message(kind, bytes(data[1:]))


def parse_control(payload: bytes) -> ControlAction:
    """The action of a control message (exactly one byte)."""
    if len(payload) != 1:
        raise ProtocolError(f"a control message holds one action byte, got {len(payload)} bytes")
    try:
        return ControlAction(payload[0])
    except ValueError:
        raise ProtocolError(
            f"unknown control action 0x{payload[0]:02x}: "
            "0x00 start, 0x01 end of turn, 0x02 pause, 0x03 restart"
        ) from None


def parse_metadata(payload: bytes) -> dict[str, Any]:
    """The JSON object of a metadata message."""
    try:
        value = json.loads(payload.decode("utf-8"), parse_float=_finite_float, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"metadata must be a UTF-8 JSON object ({err})") from None
    except RecursionError:
        raise ProtocolError("metadata is nested too deeply: send a flat JSON object of settings") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"metadata must be a JSON object, got {type(value).__name__}")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError(f"metadata holds the number {text}, too large for a float: send finite numbers")
    return value


def _no_constant(name: str) -> float:
    raise ProtocolError(f"metadata holds {name}, which is not JSON: send finite numbers")


def handshake() -> bytes:
    # The reference PersonaPlex server sends the bare kind byte; clients ignore any payload.
    return bytes([MessageKind.HANDSHAKE])


def audio(ogg_pages: bytes) -> bytes:
    return bytes([MessageKind.AUDIO]) + ogg_pages


def text(piece: str) -> bytes:
    return bytes([MessageKind.TEXT]) + piece.encode("utf-8")


def control(action: ControlAction) -> bytes:
    return bytes([MessageKind.CONTROL, action])


def metadata(event: dict[str, Any]) -> bytes:
    return bytes([MessageKind.METADATA]) + json.dumps(event, separators=(",", ":")).encode("utf-8")


def error(message: str) -> bytes:
    return bytes([MessageKind.ERROR]) + message.encode("utf-8")


def ping() -> bytes:
    return bytes([MessageKind.PING])
