"""Leases stored before ``issuer``, ``task_run`` and ``expire_hooks`` existed.

Each shared store reads them with the new fields None (so they need no hook:
any broker expires them), claims, revokes and purges them, and finds them by
the old filters. The SQLite file and the PostgreSQL schema are built as the
previous version left them, then opened by this one (which migrates them).
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from conftest import server_or_skip
from jitbroker import Broker, KeyRing, Lease
from jitbroker.stores import sqlite as sqlite_module
from jitbroker.stores.base import LeaseFilter, LeaseStore
from jitbroker.testing import FakeClock
from test_store_conformance import POSTGRES_DSN, REDIS_URL, T0, make

# The codec's columns before this version (fixed names: safe to splice into SQL).
OLD_COLUMNS = (
    *("id", "subject", "audience", "scopes", "issued_at", "expires_at", "max_expires_at"),
    *("key_id", "task", "owner", "purpose", "parent", "renewable", "revoked_at"),
    *("revoke_reason", "holder"),
)
NAMES = ", ".join(OLD_COLUMNS)


def old_row(lease_id: str, ttl: float = 60) -> tuple[Any, ...]:
    lease = make(lease_id, ttl=ttl, task="job", owner="alice")
    return tuple(
        " ".join(lease.scopes) if c == "scopes" else getattr(lease, c) for c in OLD_COLUMNS
    )


def check_old_leases(store: LeaseStore) -> None:
    """Two leases written by the old version: 'a' (ttl 60) and 'b' (ttl 10)."""
    got = store.get("a")
    assert got == make("a", task="job", owner="alice")
    assert (got.issuer, got.task_run, got.expire_hooks) == (None, None, None)
    assert {lease.id for lease in store.find(LeaseFilter(task="job"))} == {"a", "b"}
    assert store.find(LeaseFilter(issuer="urn:new")) == []
    assert [lease.id for lease in store.claim_expired(T0 + 10)] == ["b"]  # needs no hook
    assert [lease.id for lease in store.revoke("a", at=T0 + 11, reason="done")] == ["a"]
    assert store.purge(T0 + 1000) == 2
    assert store.find(LeaseFilter()) == []


def test_an_sqlite_file_of_the_previous_version(tmp_path: Path) -> None:
    path = tmp_path / "leases.db"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
    previous = 2
    with sqlite3.connect(path) as db:
        for steps in sqlite_module._MIGRATIONS[:previous]:
            for statement in steps:
                db.execute(statement)
        db.execute(f"PRAGMA application_id = {sqlite_module.APPLICATION_ID}")
        db.execute(f"PRAGMA user_version = {previous}")
        insert = f"INSERT INTO leases ({NAMES}, dead) VALUES ({', '.join('?' * 17)})"  # noqa: S608
        for row in (old_row("a"), old_row("b", ttl=10)):
            db.execute(insert, (*row, 0))
    store = sqlite_module.SQLiteStore(path)
    try:
        check_old_leases(store)
    finally:
        store.close()


def test_a_postgres_schema_of_the_previous_version() -> None:
    server_or_skip("PostgreSQL", "127.0.0.1", 5432)
    import psycopg

    from jitbroker.stores import postgres as postgres_module

    schema, previous = f"jbtest_{uuid4().hex}", 3
    statements = postgres_module._Statements(schema)
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
        for statement in postgres_module._BOOTSTRAP:
            admin.execute(statements.compose(statement))
        for migration in postgres_module._MIGRATIONS[:previous]:
            for statement in migration:
                admin.execute(statements.compose(statement))
        admin.execute(statements.compose(postgres_module._SET_VERSION), (previous,))
        marks = ", ".join(["%s"] * len(OLD_COLUMNS))
        insert = f"INSERT INTO {schema}.leases ({NAMES}) VALUES ({marks})"  # noqa: S608
        for row in (old_row("a"), old_row("b", ttl=10)):
            admin.execute(insert.encode(), row)
    store = postgres_module.PostgresStore(POSTGRES_DSN, schema=schema)
    try:
        check_old_leases(store)
    finally:
        store.clear()
        store.close()


def test_redis_records_of_the_previous_version() -> None:
    server_or_skip("Redis", "127.0.0.1", 6379)
    import redis

    from jitbroker.stores.redis import RedisStore

    prefix = f"jbtest-{uuid4().hex}"
    base = f"{{{prefix}}}:"
    client = redis.Redis.from_url(REDIS_URL)
    store = RedisStore(REDIS_URL, prefix=prefix)
    try:
        # What the previous version wrote for a live lease: no new field, in exp,
        # in the five old indexes; and a dead one's purge entry with five values.
        for lease_id, ttl in (("a", 60.0), ("b", 10.0)):
            for c, v in zip(OLD_COLUMNS, old_row(lease_id, ttl), strict=True):
                if v is not None:
                    text = "1" if v is True else repr(v) if isinstance(v, float) else str(v)
                    client.hset(base + "lease:" + lease_id, c, text)
            client.zadd(base + "exp", {lease_id: T0 + ttl})
            client.sadd(base + "all", lease_id)
            client.sadd(base + "idx:task:job", lease_id)
            client.sadd(base + "idx:owner:alice", lease_id)
            client.sadd(base + "idx:subject:svc:a", lease_id)
            client.sadd(base + "idx:key_id:k1", lease_id)
        client.set(base + "epoch", "1")
        old_dead = json.dumps(["gone", "job", "", "alice", "svc:a", "k1"])
        client.zadd(base + "dead", {old_dead: T0})
        client.sadd(base + "idx:task:job", "gone")
        check_old_leases(store)  # purge handles the old five-value entry too
        assert not client.sismember(base + "idx:task:job", "gone")
    finally:
        store.clear()
        store.close()
        client.close()


@pytest.mark.parametrize("fields", [{}, {"issuer": "urn:x", "task_run": "r", "expire_hooks": "h"}])
def test_the_memory_store_and_a_broker_read_both(fields: dict[str, Any]) -> None:
    lease = Lease("a" * 32, "svc:a", "api", ("read",), T0, T0 + 10, T0 + 10, **fields)
    broker = Broker(keys=KeyRing.generate("HS256"), clock=FakeClock(T0 + 20))
    broker.store.add(lease)
    assert broker.lease(lease.id) == lease
    swept = broker.sweep()
    assert [x.id for x in swept] == ([] if fields else [lease.id])
