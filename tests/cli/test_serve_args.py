"""`personaplex serve`: bad options are one line before anything starts, and an offline
machine gets the bundled Whisper model by itself."""

from __future__ import annotations

import logging

import pytest

from personaplex.cli import serve
from personaplex.cli.main import main
from personaplex.errors import ModelUnavailableError


@pytest.fixture
def no_server(monkeypatch):
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("the server started"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-sessions", "0"], "--max-sessions: must be a whole number of at least 1, got '0'"),
        (["--port", "99999"], "--port: must be a TCP port from 1 to 65535, got '99999'"),
        (["--port", "0"], "TCP port from 1 to 65535"),
    ],
)
def test_impossible_numbers_are_usage_errors(no_server, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    assert "open http" not in err  # nothing printed as if the server were starting


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line_before_serving(no_server, capsys):
    assert main(["serve", "--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU" in err[0] and err[0].startswith("personaplex: error: ")


class RecordingTranscriber:
    """Stands in for faster-whisper: a name can be had only from the cache, which is empty."""

    loads: list = []

    def __init__(self, model, *, local_files_only=False):
        RecordingTranscriber.loads.append((str(model), local_files_only))
        if str(model) == "base.en":
            raise ModelUnavailableError("base.en is not in the cache")
        self.model_name = str(model)


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "unreachable"])
def test_offline_whisper_falls_back_to_the_bundled_model(monkeypatch, caplog, offline):
    import personaplex.audio.asr as asr
    from personaplex import hub

    RecordingTranscriber.loads = []
    monkeypatch.setattr(asr, "Transcriber", RecordingTranscriber)
    monkeypatch.setattr(serve, "_bundled_asr_path", lambda: "/bundled/tiny.en")
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(hub.hub_constants, "HF_HUB_OFFLINE", False)

        def unreachable(*args, **kwargs):
            raise OSError(101, "Network is unreachable")

        monkeypatch.setattr(hub.socket, "create_connection", unreachable)
    with caplog.at_level(logging.WARNING):
        transcriber = serve._transcriber_loader("base.en")()
    assert transcriber.model_name == "/bundled/tiny.en"
    assert RecordingTranscriber.loads == [("base.en", True), ("/bundled/tiny.en", False)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "using the bundled tiny.en model instead" in warnings[0]
