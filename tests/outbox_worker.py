"""A broker with a provider and hooks, to be killed by tests/test_outbox_crash.py.

    python tests/outbox_worker.py KIND WHERE NAMESPACE DIR [BACKEND]

runs a broker on the store KIND at WHERE (see store_worker.py) whose provider
keeps one file per principal in DIR/principals (BACKEND ``files``, the
default) or is a ``RedisUsers`` on the Redis at 127.0.0.1:6379 with the users'
prefix ``<NAMESPACE-derived>_`` (BACKEND ``redis-users``), and whose on_issue,
on_revoke and on_expire hooks append ``event lease-id idempotency-key`` lines to DIR/hooks.log. It
prints ``ready`` and then issues, revokes, sweeps and reconciles in a loop
until it is killed: the test kills it with SIGKILL at a random moment.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
from pathlib import Path
from typing import Any

from jitbroker import Broker, KeyRing, Lease
from jitbroker.lease import Secret
from jitbroker.tokens import is_lease_id
from store_worker import open_store

TTL = 1.5
HOOK_TIMEOUT = 1.0
PROVIDER = "files"


class FileBackend:
    """A provider whose principals are files: create writes one, revoke removes it."""

    name = PROVIDER

    def __init__(self, where: Path) -> None:
        self.where = where
        where.mkdir(parents=True, exist_ok=True)

    def check(self, lease: Lease) -> None:
        """Every scope is grantable here."""

    def create(self, lease: Lease) -> Secret:
        (self.where / lease.id).write_text(str(lease.expires_at))
        return Secret({"user": lease.id, "password": os.urandom(8).hex()})

    def revoke(self, lease: Lease) -> None:
        (self.where / lease.id).unlink(missing_ok=True)

    def renew(self, lease: Lease) -> None:
        (self.where / lease.id).write_text(str(lease.expires_at))

    def managed(self) -> list[str]:
        return [p.name for p in self.where.iterdir() if is_lease_id(p.name)]


def recorder(log: Path, event: str):  # type: ignore[no-untyped-def]
    def record(lease: Lease, idempotency_key: str) -> None:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:  # one write of a short line with O_APPEND: never torn, never interleaved
            os.write(fd, f"{event} {lease.id} {idempotency_key}\n".encode())
        finally:
            os.close(fd)

    return record


REDIS_ADMIN = "redis://127.0.0.1:6379/0"


def backend_for(backend: str, base: Path, namespace: str) -> Any:
    """The provider the crash test counts principals of (``managed()``)."""
    if backend == "files":
        return FileBackend(base / "principals")
    from jitbroker.providers import RedisUsers

    prefix = "jbcrash" + hashlib.sha256(f"{base}{namespace}".encode()).hexdigest()[:8] + "_"
    return RedisUsers(PROVIDER, admin_url=REDIS_ADMIN, rules={"rw": "~crash:* +get"}, prefix=prefix)


def broker_for(kind: str, where: str, namespace: str, base: Path, backend: str = "files") -> Broker:
    log = base / "hooks.log"
    return Broker(
        issuer="urn:test:crash",
        keys=KeyRing.generate(),
        store=open_store(kind, where, namespace),
        providers=[backend_for(backend, base, namespace)],
        on_issue={"record": recorder(log, "on_issue")},
        on_revoke={"record": recorder(log, "on_revoke")},
        on_expire={"record": recorder(log, "on_expire")},
        hook_timeout=HOOK_TIMEOUT,
        hook_retries=50,
        hook_backoff=0.05,
        retention=3600,
        reconcile_interval=0.2,
        reap_interval=3600,  # this loop sweeps itself, at random points
        revoke_on_sigterm=False,
    )


def main(kind: str, where: str, namespace: str, base: str, backend: str = "files") -> None:
    broker = broker_for(kind, where, namespace, Path(base), backend)
    print("ready", flush=True)
    rng = random.Random()
    while True:
        # Half with the provider, half without: the hook jobs of those are the
        # ones SQLite and Redis keep inline in the lease's row.
        audience = PROVIDER if rng.random() < 0.5 else "plain"
        cred = broker.issue("svc:crash", audience, ["rw"], ttl=TTL, owner="w")
        if rng.random() < 0.5:
            broker.revoke(cred)
        if rng.random() < 0.5:
            broker.sweep()
        if rng.random() < 0.2:
            broker.reconcile()


if __name__ == "__main__":
    main(*sys.argv[1:6])
