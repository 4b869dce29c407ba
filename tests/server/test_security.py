"""Attacks on the server: origin and Host checks (DNS rebinding), odd tokens, what errors
reveal, which endpoints a token guards, and half-sent requests (slowloris)."""

from __future__ import annotations

import http.client
import logging
import socket
import time

import pytest
from websockets.exceptions import InvalidStatus

from personaplex.cli import serve
from personaplex.server.connections import guarded_http_protocol
from personaplex.server.security import AccessPolicy, is_loopback_host
from tests.server.fakes import FakeEngine
from tests.server.harness import ChatClient, get_json, silence
from tests.server.test_serve_cli import parse, started  # noqa: F401  (fixture)

# ---------------------------------------------------------------- origins and hosts


@pytest.mark.parametrize(
    "origin",
    [
        "http://127.0.0.1.evil.example",
        "http://127.1.2.3.nip.example:8998",
        "http://localhost.evil.example",
        "http://[::1",  # not even a URL
    ],
)
def test_origins_that_only_look_like_loopback_are_refused(origin):
    assert not AccessPolicy().origin_accepted({"origin": origin, "host": "127.0.0.1:8998"})


@pytest.mark.parametrize(
    "origin", ["http://127.0.0.1:3000", "http://127.9.8.7", "http://localhost", "http://[::1]:8080"]
)
def test_loopback_origins_on_any_port_are_accepted(origin):
    assert AccessPolicy().origin_accepted({"origin": origin, "host": "127.0.0.1:8998"})


def test_loopback_is_recognised_exactly():
    assert all(is_loopback_host(host) for host in ("127.0.0.1", "127.255.0.9", "LOCALHOST", "::1", "[::1]"))
    assert not any(
        is_loopback_host(host) for host in ("127.0.0.1.evil.example", "127.1", "localhost.example", "::2")
    )


@pytest.mark.parametrize(
    "host, accepted",
    [
        ("127.0.0.1:8998", True),
        ("localhost:8998", True),
        ("[::1]:8998", True),
        ("192.168.1.20:8998", True),  # an address: a rebinding page always uses a name
        ("assistant.example:443", True),  # configured
        ("rebind.evil.example:8998", False),
        ("localhost.evil.example", False),
    ],
)
def test_host_names_are_checked_against_the_names_the_server_has(host, accepted):
    policy = AccessPolicy.create(None, allowed_hosts=["assistant.example"])
    assert policy.host_accepted({"host": host}) is accepted


def raw_http(port: int, request: str) -> str:
    """Send `request` as is; the status line of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request.encode("latin-1"))
        return connection.recv(4096).decode("latin-1").split("\r\n")[0]


def websocket_handshake(host: str, origin: str) -> str:
    return (
        f"GET /api/chat HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )


def test_dns_rebinding_is_refused_over_http_and_websocket(start_server):
    server = start_server()
    evil = f"rebind.evil.example:{server.port}"
    assert raw_http(server.port, f"GET /api/status HTTP/1.1\r\nHost: {evil}\r\n\r\n").split()[1] == "400"
    assert raw_http(server.port, websocket_handshake(evil, f"http://{evil}")).split()[1] == "403"
    # The same requests by the server's own address work.
    own = f"127.0.0.1:{server.port}"
    assert raw_http(server.port, f"GET /api/status HTTP/1.1\r\nHost: {own}\r\n\r\n").split()[1] == "200"
    assert raw_http(server.port, websocket_handshake(own, f"http://{own}")).split()[1] == "101"


def test_a_configured_host_name_is_accepted(start_server):
    server = start_server(policy=AccessPolicy.create(None, allowed_hosts=["assistant.example"]))
    host = f"assistant.example:{server.port}"
    assert raw_http(server.port, f"GET /api/health HTTP/1.1\r\nHost: {host}\r\n\r\n").split()[1] == "200"
    assert raw_http(server.port, websocket_handshake(host, f"http://{host}")).split()[1] == "101"


def test_pages_on_look_alike_origins_cannot_open_a_conversation(start_server):
    server = start_server()
    with pytest.raises(InvalidStatus, match="403"):
        ChatClient(server.ws_url, origin="http://127.0.0.1.evil.example")


def test_serve_accepts_its_own_name_and_allowed_hosts(started):  # noqa: F811
    serve.run(parse("--host", "box.lan", "--allowed-host", "proxy.example", "--asr-model", "none"))
    policy = started["app"].user_middleware  # the app's middleware carries the policy
    host_guard = next(m for m in policy if m.cls.__name__ == "HostGuard")
    accepts = host_guard.kwargs["policy"].host_accepted
    assert accepts({"host": "box.lan:8998"}) and accepts({"host": "proxy.example"})
    assert not accepts({"host": "rebind.evil.example:8998"})


# ---------------------------------------------------------------- tokens


def test_a_non_ascii_token_is_unauthorised_not_a_server_error(start_server):
    server = start_server(policy=AccessPolicy.create("s3cret"))
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("GET", "/api/status?token=%C3%A9")
    assert connection.getresponse().status == 401
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest("GET", "/api/status")
    connection.putheader("Authorization", "Bearer \u00e9t\u00e9")  # sent as latin-1 bytes
    connection.endheaders()
    assert connection.getresponse().status == 401
    refused = ChatClient(server.ws_url, token="\u00e9")
    refused.wait_for(lambda got: got.errors)
    assert refused.received.errors[0].startswith("unauthorised")
    refused.drain(0.5)
    assert refused.closed and refused.connection.close_code == 1008


def test_with_a_token_only_the_documented_endpoints_are_public(start_server):
    server = start_server(policy=AccessPolicy.create("s3cret"))
    for public in ("/", "/static/app.js", "/api/health", "/docs", "/openapi.json"):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        connection.request("GET", public)
        assert connection.getresponse().status == 200, public
    for guarded in ("/api/status", "/api/voices", "/api/prompts", "/metrics"):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        connection.request("GET", guarded)
        assert connection.getresponse().status == 401, guarded


# ---------------------------------------------------------------- what errors reveal


def test_voice_errors_name_the_voice_not_the_servers_files(start_server, engine, tmp_path, monkeypatch, caplog):
    """A broken voice file on the server: the client hears which voice, the log gets the path."""
    voices = tmp_path / "secret-voices"
    voices.mkdir()
    (voices / "NATF1.pt").write_bytes(b"not a voice file")
    monkeypatch.setattr(engine, "voices_dir", voices)
    server = start_server(engine)
    client = ChatClient(server.ws_url, mode="duplex", voice="NATF1", text_prompt="Talk about books.")
    with caplog.at_level(logging.WARNING):
        client.wait_for(lambda got: got.errors, timeout=60)
    message = client.received.errors[0]
    assert "NATF1" in message and "secret-voices" not in message and str(tmp_path) not in message
    assert str(voices / "NATF1.pt") in caplog.text
    client.close()


def test_internal_errors_do_not_echo_their_details(start_server):
    class LeakyEngine(FakeEngine):
        async def respond_realtime(self, mic_frames, **settings):
            async for _frame in mic_frames:
                raise OSError("[Errno 2] No such file: '/srv/personaplex/cache/state.bin'")
            yield  # an async generator

    server = start_server(LeakyEngine())
    client = ChatClient(server.ws_url, mode="duplex")
    client.wait_for(lambda got: got.handshakes == 1)
    client.send_pcm(silence(0.16))
    client.wait_for(lambda got: got.errors)
    assert client.received.errors[0].startswith("internal error") and "/srv" not in client.received.errors[0]
    client.close()


# ---------------------------------------------------------------- slowloris


def closed_by_server(connection: socket.socket) -> bool:
    """Whether the server closes `connection` (with a FIN, or a reset: it had unread bytes)
    before the socket's timeout; what it sent before (the rest of an answer) is skipped."""
    try:
        while connection.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_half_sent_requests_are_closed_and_connections_capped(start_server):
    server = start_server(http=guarded_http_protocol(header_timeout_s=0.5, max_connections=8))
    slow = []
    for _ in range(12):  # more than the cap
        connection = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        connection.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        slow.append(connection)
    sent_at = time.monotonic()
    closed = 0
    for connection in slow:  # each is closed by the server (recv gives b"") well before 10 s
        connection.settimeout(max(0.1, 10 - (time.monotonic() - sent_at)))
        closed += closed_by_server(connection)
        connection.close()
    assert closed == len(slow)
    # Whole requests are served as before, on new connections and on a kept-alive one.
    keep_alive = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    for _ in range(2):
        keep_alive.request("GET", "/api/health")
        assert keep_alive.getresponse().read()
    assert get_json(server.http_url + "/api/health")["status"] == "ok"


def test_a_trickled_second_request_on_a_kept_alive_connection_is_closed(start_server):
    server = start_server(http=guarded_http_protocol(header_timeout_s=0.5, max_connections=8))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert connection.recv(4096).startswith(b"HTTP/1.1 200")
        connection.sendall(b"GET /api/health HTTP/1.1\r\n")  # and never the rest
        connection.settimeout(4)  # uvicorn's keep-alive timeout is 5 s: this closes sooner
        assert closed_by_server(connection)


def test_beyond_localhost_the_machines_own_names_are_accepted(started):  # noqa: F811
    serve.run(parse("--host", "0.0.0.0", "--asr-model", "none"))
    host_guard = next(m for m in started["app"].user_middleware if m.cls.__name__ == "HostGuard")
    accepts = host_guard.kwargs["policy"].host_accepted
    assert accepts({"host": f"{socket.gethostname()}:8998"}) and accepts({"host": socket.getfqdn()})
    assert not accepts({"host": "rebind.evil.example"})
