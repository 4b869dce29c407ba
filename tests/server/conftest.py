"""Fixtures: a live server around a fake engine (or a fake loader) on a free port."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from types import SimpleNamespace
from typing import Any

import pytest

from personaplex.server.app import ServerSettings, create_app
from personaplex.server.model_host import ModelHost
from tests.server.fakes import FakeEngine
from tests.server.harness import ServerThread


def instant_loader(engine: Any) -> Callable[[Callable[[Any], None]], Any]:
    """A loader that reports the three stages quickly, then hands out `engine`."""

    def load(progress: Callable[[Any], None]) -> Any:
        for stage in ("download", "load", "warmup"):
            progress(SimpleNamespace(stage=stage, fraction=1.0, message=f"{stage} done"))
            time.sleep(0.01)
        return engine

    return load


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerThread]]:
    """start_server(engine=None, loader=None, transcriber=None, **ServerSettings fields)."""
    with ExitStack() as stack:

        def start(
            engine: Any = None,
            *,
            loader: Callable[..., Any] | None = None,
            transcriber: Any = None,
            wait: bool = True,
            **settings: Any,
        ) -> ServerThread:
            engine = engine if engine is not None else FakeEngine()
            host = ModelHost(
                loader or instant_loader(engine),
                (lambda: transcriber) if transcriber is not None else None,
                "test-asr" if transcriber is not None else None,
            )
            server = stack.enter_context(ServerThread(create_app(host, ServerSettings(**settings))))
            if wait:
                assert host.wait_ready(timeout=60), host.status()
                if transcriber is not None:
                    deadline = time.monotonic() + 10
                    while host.transcriber is None and time.monotonic() < deadline:
                        time.sleep(0.01)
            server.host = host  # type: ignore[attr-defined]
            return server

        yield start
