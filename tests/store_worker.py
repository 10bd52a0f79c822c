"""A lease store in another OS process, driven by tests/test_store_processes.py.

    python tests/store_worker.py KIND WHERE NAMESPACE

opens the store KIND (``sqlite``, ``redis``, ``redis-async`` or ``postgres``)
at WHERE (a file path, a Redis URL or a PostgreSQL DSN) under NAMESPACE (the
Redis prefix or the PostgreSQL schema; unused for SQLite), prints ``ready``,
then runs one JSON command per stdin line, ``[name, *args]``, and answers it
with JSON lines on stdout, until stdin closes. Nothing here decides whether a
store is right: the test compares what every process saw.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from jitbroker.lease import Lease
from jitbroker.stores.base import LeaseStore

Say = Callable[[object], None]


def open_store(kind: str, where: str, namespace: str) -> LeaseStore:
    """The same store the parent built, rebuilt from its address alone."""
    if kind == "sqlite":
        from jitbroker.stores.sqlite import SQLiteStore

        return SQLiteStore(where, timeout=30)
    if kind == "redis":
        from jitbroker.stores.redis import RedisStore

        return RedisStore(where, prefix=namespace)
    if kind == "redis-async":
        from async_adapter import SyncOverAsync
        from jitbroker.stores.redis_async import AsyncRedisStore

        async def build() -> AsyncRedisStore:
            return AsyncRedisStore(where, prefix=namespace)

        return SyncOverAsync(build)
    if kind == "postgres":
        from jitbroker.stores.postgres import PostgresStore

        return PostgresStore(where, schema=namespace)
    raise SystemExit(f"unknown store kind {kind!r}")


def child_of(parent: str, lease_id: str, at: float) -> Lease:
    return Lease(
        id=lease_id,
        subject="svc:a",
        audience="api",
        scopes=("read",),
        issued_at=at,
        expires_at=at + 600,
        max_expires_at=at + 3600,
        parent=parent,
    )


def claim_all(store: LeaseStore, say: Say, now: float, limit: int) -> None:
    """Claim in small batches until nothing is due; every id this process got."""
    claimed: list[str] = []
    while batch := store.claim_expired(now, limit=limit):
        claimed += [lease.id for lease in batch]
    say(claimed)


def revoke_each(store: LeaseStore, say: Say, lease_ids: list[str], at: float) -> None:
    """Revoke each lease in turn; the ids each revoke transitioned."""
    say([[lease.id for lease in store.revoke(i, at=at, reason="race")] for i in lease_ids])


def states(store: LeaseStore, say: Say, lease_ids: list[str]) -> None:
    """For each id: [stored?, revoked_at]."""
    found = [store.get(i) for i in lease_ids]
    say([[lease is not None, None if lease is None else lease.revoked_at] for lease in found])


def add_children(
    store: LeaseStore, say: Say, parent: str, prefix: str, at: float, signal_after: int
) -> None:
    """Add children of ``parent`` as fast as possible; say "adding" after
    ``signal_after`` of them (the cue to start revoking the parent), and stop a
    few refusals after the first one. Then every id with add's answer."""
    answers: dict[str, bool] = {}
    refusals = 0
    for i in range(50_000):
        lease_id = f"{prefix}{i}"
        answers[lease_id] = store.add(child_of(parent, lease_id, at))
        if i + 1 == signal_after:
            say("adding")
        refusals += not answers[lease_id]
        if refusals == 10:
            break
    say(answers)


COMMANDS: dict[str, Callable[..., None]] = {
    "claim_all": claim_all,
    "revoke_each": revoke_each,
    "states": states,
    "add_children": add_children,
}


def main(kind: str, where: str, namespace: str) -> None:
    store = open_store(kind, where, namespace)

    def say(message: object) -> None:
        print(json.dumps(message), flush=True)

    say("ready")
    for line in sys.stdin:
        name, *args = json.loads(line)
        COMMANDS[name](store, say, *args)
    store.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
