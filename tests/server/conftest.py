"""The `start_server` fixture (defined in harness.py, which the CLI tests share)."""

from tests.server.harness import start_server  # noqa: F401
