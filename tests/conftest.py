"""Shared test helpers: pytester for plugin tests, and the server check."""

from __future__ import annotations

import os
import socket

import pytest

pytest_plugins = ["pytester"]


def server_or_skip(name: str, host: str, port: int) -> None:
    """Skip the calling test when ``name`` does not answer at host:port, except
    under ``CI=true``, where a missing server is a failure (CI starts them)."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError as exc:
        message = f"{name} does not answer at {host}:{port} ({exc})"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; under CI=true every server must be running")
        pytest.skip(message)
