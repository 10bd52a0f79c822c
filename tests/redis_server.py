"""A private ``redis-server`` for provider tests: on a free port, with an ACL file
(so a test can ``ACL SAVE`` and find the users again after a restart), that a
test may freeze (SIGSTOP), kill and restart. Waits are short polls."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

POLL = 0.01
POLL_LIMIT = 5.0


def poll(condition: Callable[[], bool], limit: float = POLL_LIMIT) -> bool:
    """Whether ``condition`` held within ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def command(client: redis.Redis, *args: str) -> Any:
    """``client.execute_command`` (unannotated in redis-py), for mypy."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def fast_client(port: int, **options: object) -> redis.Redis:
    """A client that fails fast: short timeouts and no retries."""
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
        retry=Retry(NoBackoff(), 0),
        **options,  # type: ignore[arg-type]
    )


class RedisServer:
    """A ``redis-server`` of our own; ``admin`` is a fast client as the default user."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary, self.directory, self.port = binary, directory, free_port()
        self.aclfile = directory / "users.acl"
        self.aclfile.touch()
        self.process: subprocess.Popen[bytes] | None = None
        self.admin = fast_client(self.port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                *("--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "no", "--dir", str(self.directory)),
                *("--aclfile", str(self.aclfile)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert poll(self._answers), "the private redis-server did not start"

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None
        self.admin.close()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP the server for the block: connections open, nothing answered."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.process.pid, signal.SIGCONT)

    def users(self) -> set[str]:
        names = command(self.admin, "ACL USERS")
        return {name.decode() if isinstance(name, bytes) else name for name in names}

    def _answers(self) -> bool:
        try:
            return bool(self.admin.ping())
        except redis.RedisError:
            return False


def start_or_skip(directory: Path) -> RedisServer:
    """A started private server; skips when ``redis-server`` is not installed,
    except under ``CI=true``, where that is a failure."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; under CI=true it must be")
        pytest.skip(message)
    server = RedisServer(binary, directory)
    server.start()
    return server
