"""A private PostgreSQL cluster that enforces passwords, for provider tests.

The shared server at 127.0.0.1:5432 trusts every login, so neither a password
nor ``VALID UNTIL`` means anything there. ``pg_cluster`` (session-scoped)
starts a cluster of its own with scram-sha-256 for every connection, on a free
port of 127.0.0.1, run as the ``postgres`` OS user when the tests run as root
(initdb refuses root). A test may ``stop()`` and ``start()`` it (same data
directory, same port) to play an outage. Without the server binaries it skips,
except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from glob import glob
from pathlib import Path

import pytest

__all__ = ["Cluster", "pg_cluster"]


class Cluster:
    """A throwaway cluster in a temporary directory; ``dsn`` logs in as the
    superuser ``postgres`` with ``password``."""

    def __init__(self, bindir: Path, base: Path, owner: pwd.struct_passwd | None) -> None:
        self.bindir, self.base, self.data = bindir, base, base / "data"
        self.port = _free_port()
        self.password = secrets.token_urlsafe(18)
        self.dsn = f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/postgres"
        self._prefix = ["runuser", "-u", owner.pw_name, "--"] if owner else []
        if owner is not None:
            os.chown(base, owner.pw_uid, owner.pw_gid)
        self._owner = owner

    def init(self) -> None:
        """Create the data directory, with scram-sha-256 required everywhere."""
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if self._owner is not None:
            os.chown(pwfile, self._owner.pw_uid, self._owner.pw_gid)
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "-U",
                "postgres",
                "--no-sync",
                "--no-instructions",
            )
        finally:
            pwfile.unlink()

    def start(self) -> None:
        """Start the server (on the same port every time); returns once it accepts."""
        options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.base / "log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "start")

    def stop(self) -> None:
        """Stop the server at once (``-m immediate``): every session is cut."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def running(self) -> bool:
        """Whether the server is up (its pid file exists)."""
        return (self.data / "postmaster.pid").exists()

    def _run(self, tool: str, *args: str) -> None:
        command = [*self._prefix, str(self.bindir / tool), *args]
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
        assert done.returncode == 0, f"{tool} failed: {done.stdout}{done.stderr}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bindir() -> Path | None:
    """The newest PostgreSQL server binaries installed, if any."""
    found = shutil.which("initdb")
    candidates = [Path(found).parent] if found else []
    versions = sorted(glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
    candidates += [Path(p) for p in versions]
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    return None


def _version(path: str) -> int:
    number = Path(path).parent.name
    return int(number) if number.isdigit() else 0


def _owner() -> tuple[pwd.struct_passwd | None, str | None]:
    """The OS user to run the server as (None: this one), or why there is none."""
    if os.geteuid() != 0:
        return None, None
    if shutil.which("runuser") is None:
        return None, "running as root without runuser to drop to the postgres user"
    try:
        return pwd.getpwnam("postgres"), None
    except KeyError:
        return None, "running as root and there is no postgres OS user to run the server"


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """A private, password-enforcing PostgreSQL cluster for the whole session."""
    bindir = _bindir()
    owner, problem = _owner()
    if bindir is None:
        problem = "the PostgreSQL server binaries (initdb, pg_ctl) are not installed"
    if problem is not None or bindir is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{problem}; under CI=true the private cluster tests must run")
        pytest.skip(str(problem))
    base = Path(tempfile.mkdtemp(prefix="jbpgr-", dir="/tmp"))  # short: a socket path
    cluster = Cluster(bindir, base, owner)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        if cluster.running():
            cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
