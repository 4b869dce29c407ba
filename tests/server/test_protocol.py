"""The wire format: framing of each kind, and malformed client messages answered with an
error message while the socket stays usable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from personaplex.server import protocol
from personaplex.server.protocol import ControlAction, MessageKind, ProtocolError
from tests.server.fakes import FRAME
from tests.server.harness import ChatClient, get_text, silence


def test_each_kind_has_its_reference_byte():
    assert protocol.handshake() == b"\x00"
    assert protocol.audio(b"OggS...") == b"\x01OggS..."
    assert protocol.text(" héllo") == b"\x02" + " héllo".encode()
    assert protocol.control(ControlAction.END_TURN) == b"\x03\x01"
    assert protocol.metadata({"type": "state", "state": "live"}) == b'\x04{"type":"state","state":"live"}'
    assert protocol.error("busy") == b"\x05busy"
    assert protocol.ping() == b"\x06"


def test_decoding_splits_kind_and_payload():
    message = protocol.decode_message(b"\x04{}")
    assert message.kind == MessageKind.METADATA and message.payload == b"{}"
    assert protocol.decode_message(b"\x06").payload == b""


@pytest.mark.parametrize(
    "data, complaint",
    [
        (b"", "empty message"),
        (b"\x07", "unknown message kind 0x07"),
        (b"\xff\x00", "unknown message kind 0xff"),
    ],
)
def test_bad_framing_is_a_protocol_error(data, complaint):
    with pytest.raises(ProtocolError, match=complaint):
        protocol.decode_message(data)


def test_control_and_metadata_payloads_are_checked():
    assert protocol.parse_control(b"\x02") == ControlAction.PAUSE
    with pytest.raises(ProtocolError, match="one action byte"):
        protocol.parse_control(b"")
    with pytest.raises(ProtocolError, match="unknown control action"):
        protocol.parse_control(b"\x09")
    assert protocol.parse_metadata(b'{"max_steps": 80}') == {"max_steps": 80}
    with pytest.raises(ProtocolError, match="JSON object"):
        protocol.parse_metadata(b"{not json")
    with pytest.raises(ProtocolError, match="JSON object"):
        protocol.parse_metadata(b"[1, 2]")
    with pytest.raises(ProtocolError, match="UTF-8"):
        protocol.parse_metadata(b"\xff\xfe")


MALFORMED = [
    (b"", "empty message"),
    (b"\x09hello", "unknown message kind"),
    (b"\x01this is not ogg", "not Ogg"),
    (b"\x01OggS\x00\x00", "ends inside"),
    (b"\x04{broken json", "JSON"),
    (b"\x04[]", "JSON object"),
    (b"\x03", "one action byte"),
    (b"\x03\x07", "unknown control action"),
    (b"\x02text from a client", "does not accept text"),
    ("a text frame", "binary"),
]


@pytest.mark.parametrize("mode", ["duplex", "turn"])
def test_malformed_messages_get_an_error_and_the_socket_stays_sane(start_server, mode):
    server = start_server()
    client = ChatClient(server.ws_url, mode=mode)
    client.wait_for(lambda got: got.handshakes == 1)
    for message, _complaint in MALFORMED:
        client.send(message)
    client.send(protocol.ping())
    client.wait_for(lambda got: len(got.errors) == len(MALFORMED) and got.pings == 1)
    for (_message, complaint), error in zip(MALFORMED, client.received.errors, strict=True):
        assert complaint in error
    # Still a working conversation: audio in gives frames out (duplex) or is accepted (turn).
    client.send_pcm(silence(0.48))
    if mode == "duplex":
        client.wait_for(lambda got: len(got.events_of("frame")) >= 6)
        assert client.received.samples >= 6 * FRAME
    else:
        client.send(protocol.metadata({"max_steps": 60}))
        client.wait_for(lambda got: got.events_of("session")[-1]["max_steps"] == 60)
    client.send(protocol.metadata({"mode": "duplex"}))
    client.wait_for(lambda got: len(got.errors) == len(MALFORMED) + 1)
    assert (
        "cannot change mode" in client.received.errors[-1]
        or "fixed when it starts" in client.received.errors[-1]
    )
    assert not client.closed
    client.close()
    metrics = get_text(server.http_url + "/metrics")
    assert f"personaplex_protocol_errors_total {len(MALFORMED) + 1}" in metrics


def test_events_are_json_objects_with_a_type(start_server):
    server = start_server()
    client = ChatClient(server.ws_url, mode="duplex", voice="NATF2")
    client.wait_for(lambda got: got.handshakes == 1 and got.events_of("session"))
    session = client.received.events_of("session")[0]
    assert (
        session["voice"] == "NATF2" and session["sample_rate"] == 24_000 and session["frame_samples"] == FRAME
    )
    client.send_pcm(np.zeros(FRAME * 3, dtype=np.float32))
    client.wait_for(lambda got: len(got.events_of("frame")) == 3)
    frame = client.received.events_of("frame")[0]
    assert set(frame) == {"type", "index", "compute_ms", "rtf", "buffered_ms"}
    assert json.dumps(frame)
    client.close()
