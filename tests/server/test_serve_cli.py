"""`personaplex serve` wiring: options, the token rule beyond localhost, what it prints."""

from __future__ import annotations

import argparse

import pytest

from personaplex.cli import serve
from personaplex.server.security import AccessPolicy, is_loopback_host


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


@pytest.fixture
def started(monkeypatch) -> dict:
    """What `serve.run` hands to uvicorn, instead of serving."""
    seen: dict = {}

    def fake_uvicorn_run(app, **options):
        seen.update(options, app=app)

    monkeypatch.setattr("uvicorn.run", fake_uvicorn_run)
    monkeypatch.delenv("PERSONAPLEX_TOKEN", raising=False)
    return seen


def test_defaults_match_the_reference_server():
    args = parse()
    assert (args.host, args.port, args.weights, args.model, args.max_sessions) == (
        "127.0.0.1",
        8998,
        "bf16",
        None,
        4,
    )
    assert args.func is serve.run
    assert parse("--weights", "int4", "--model", "some/repo").weights == "int4"
    with pytest.raises(SystemExit):
        parse("--weights", "fp4")


def test_on_localhost_no_token_is_needed(started, capsys):
    assert serve.run(parse("--asr-model", "none", "--port", "9001")) == 0
    assert (started["host"], started["port"]) == ("127.0.0.1", 9001)
    assert "open http://127.0.0.1:9001/\n" in capsys.readouterr().err


def test_beyond_localhost_a_token_is_made_up_and_printed(started, capsys):
    serve.run(parse("--host", "0.0.0.0", "--asr-model", "none"))
    printed = capsys.readouterr().err
    assert "?token=" in printed and "made up" in printed and "--ssl-certfile" in printed
    token = printed.split("?token=")[1].split()[0]
    assert len(token) >= 24


def test_a_given_token_and_origins_are_used(started, capsys):
    serve.run(
        parse(
            "--host",
            "10.0.0.5",
            "--token",
            "abc",
            "--allowed-origin",
            "https://a.example",
            "--asr-model",
            "none",
        )
    )
    assert "?token=abc" in capsys.readouterr().err
    assert started["ws"] == "websockets-sansio"


def test_loopback_hosts_and_origin_rules():
    assert all(is_loopback_host(host) for host in ("127.0.0.1", "localhost", "::1", "127.1.2.3"))
    assert not any(is_loopback_host(host) for host in ("0.0.0.0", "10.0.0.5", "example.com"))
    policy = AccessPolicy.create(None, ["https://a.example/"])
    assert policy.origin_accepted({})  # not a browser
    assert policy.origin_accepted({"origin": "https://a.example"})
    assert policy.origin_accepted({"origin": "http://myhost:8998", "host": "myhost:8998"})  # same origin
    assert not policy.origin_accepted({"origin": "https://b.example", "host": "myhost:8998"})
    assert AccessPolicy.create(None, ["*"]).origin_accepted({"origin": "https://b.example"})
    token_policy = AccessPolicy.create("t")
    assert token_policy.token_accepted({"token": "t"}, {})
    assert token_policy.token_accepted({}, {"authorization": "Bearer t"})
    assert not token_policy.token_accepted({}, {"authorization": "Basic t"})
    assert not token_policy.token_accepted({"token": "u"}, {})
