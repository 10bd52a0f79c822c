"""Lease usage (issue 13): verify records in memory, the sweep flushes in batches.

No store call on the verify path (a counting store wrapper; on Redis and
PostgreSQL, round trips counted on the wire as benchmarks/run.py does), one
``record_usage`` per flush at most every ``usage_interval``, merged by the store,
and the report's usage findings. Schema upgrades: SQLite 6 -> 7, PostgreSQL 8 -> 9.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any
from uuid import uuid4

import pytest

from conftest import server_or_skip
from jitbroker import AsyncBroker, Broker, KeyRing, MemoryStore
from jitbroker.errors import InvalidRequest, StoreUnavailable
from jitbroker.report import build_report
from jitbroker.stores import sqlite as sqlite_module
from jitbroker.testing import FakeClock
from jitbroker.usage import MAX_PENDING, Usage, UsageLog, UsageRecord
from test_store_conformance import POSTGRES_DSN, T0, make

ROOT = Path(__file__).resolve().parent.parent
KEYS = KeyRing.generate("EdDSA")


class CountingStore:
    """A store that counts every call made on it by name (and passes it on)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[str] = []
        self.blocking = inner.blocking
        self.fail_usage = False

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)
        if not callable(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            if name == "record_usage" and self.fail_usage:
                raise StoreUnavailable("store down (test)")
            return method(*args, **kwargs)

        return call


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


def broker_on(store: Any, clock: FakeClock, **options: Any) -> Broker:
    return Broker(issuer="urn:test", keys=KEYS, store=store, clock=clock, **options)


# -- the log ---------------------------------------------------------------------
def test_the_log_coalesces_per_lease_and_is_bounded() -> None:
    log = UsageLog(60.0)
    assert not log.due(0.0)  # nothing to flush; the first interval starts
    for at, audience in ((1.0, "api"), (3.0, "api"), (2.0, "other")):
        log.record("a", audience, at)
    log.record("b", "api", 5.0)
    assert not log.due(59.0)
    assert log.due(60.0)
    batch = log.drain(10.0)
    assert sorted(batch, key=lambda r: r.lease_id) == [
        UsageRecord("a", 2.0, 3, ("api", "other")),
        UsageRecord("b", 5.0, 1, ("api",)),
    ]
    assert len(log) == 0
    log.record("a", "api", 11.0)
    assert not log.due(69.0)  # the interval since the last drain
    assert log.due(70.0)
    log.restore(batch)  # a failed write: merged with what came since
    assert {r.lease_id: r.uses for r in log.drain(70.0)} == {"a": 4, "b": 1}


def test_the_log_drops_new_leases_past_its_bound() -> None:
    log = UsageLog(60.0)
    for i in range(MAX_PENDING):
        log.record(str(i), "api", 1.0)
    log.record("one-too-many", "api", 1.0)
    log.record("0", "api", 2.0)  # a lease already pending still counts
    assert (len(log), log.dropped) == (MAX_PENDING, 1)


# -- the broker --------------------------------------------------------------------
def test_verify_records_without_a_store_write_and_the_sweep_flushes(clock: FakeClock) -> None:
    store = CountingStore(MemoryStore())
    broker = broker_on(store, clock, usage_interval=60)
    broker.sweep()  # the first sweep: nothing used yet, nothing written
    assert "record_usage" not in store.calls
    cred = broker.issue(subject="svc:a", audience="api", scopes=["read"], ttl=600)
    store.calls.clear()
    for _ in range(5):
        broker.verify(cred.token, audience="api", scopes=["read"])
        clock.advance(1)
    assert store.calls == ["get"] * 5  # the lease lookup only: usage stays in memory
    broker.sweep()  # within the interval: not flushed
    assert "record_usage" not in store.calls
    assert store.inner.lease_usage([cred.lease_id]) == {}
    clock.advance(60)
    broker.sweep()
    assert store.calls.count("record_usage") == 1
    assert store.inner.lease_usage([cred.lease_id]) == {cred.lease_id: Usage(T0 + 4, 5, ("api",))}
    broker.sweep()  # nothing new: nothing written
    assert store.calls.count("record_usage") == 1


def test_opaque_tokens_and_many_leases_flush_in_one_batch(clock: FakeClock) -> None:
    store = CountingStore(MemoryStore())
    broker = broker_on(store, clock, token_format="opaque")
    creds = [broker.issue(subject="svc:a", audience="api", ttl=600) for _ in range(3)]
    for cred in creds:
        broker.verify(cred.token, audience="api")
    assert broker.flush_usage() == 3
    assert store.calls.count("record_usage") == 1
    assert set(store.inner.lease_usage([c.lease_id for c in creds])) == {c.lease_id for c in creds}


def test_a_failed_verify_records_nothing(clock: FakeClock) -> None:
    broker = broker_on(MemoryStore(), clock)
    cred = broker.issue(subject="svc:a", audience="api", scopes=["read"], ttl=60)
    with pytest.raises(Exception, match="audience"):
        broker.verify(cred.token, audience="other")
    broker.revoke(cred)
    with pytest.raises(Exception, match="revoked"):
        broker.verify(cred.token, audience="api")
    assert broker.flush_usage() == 0


def test_tracking_off_or_a_store_without_it_records_nothing(clock: FakeClock) -> None:
    off = broker_on(MemoryStore(), clock, track_usage=False)
    cred = off.issue(subject="svc:a", audience="api", ttl=60)
    off.verify(cred.token, audience="api")
    assert off.flush_usage() == 0
    assert off.report().usage is None

    class Plain(MemoryStore):  # a store without the optional methods
        record_usage = None  # type: ignore[assignment]

    plain = broker_on(Plain(), clock)
    plain.verify(plain.issue(subject="svc:a", audience="api", ttl=60).token, audience="api")
    assert plain.flush_usage() == 0
    with pytest.raises(InvalidRequest, match="track_usage"):
        broker_on(MemoryStore(), clock, track_usage="yes")
    with pytest.raises(InvalidRequest, match="usage_interval"):
        broker_on(MemoryStore(), clock, usage_interval=-1)


def test_a_failed_flush_keeps_the_uses_for_the_next(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = CountingStore(MemoryStore())
    broker = broker_on(store, clock)
    cred = broker.issue(subject="svc:a", audience="api", ttl=600)
    broker.verify(cred.token, audience="api")
    store.fail_usage = True
    clock.advance(61)
    broker.sweep()  # the sweep goes on: usage is telemetry
    assert "could not record lease usage" in caplog.text
    broker.verify(cred.token, audience="api")
    store.fail_usage = False
    clock.advance(61)
    broker.sweep()
    assert store.inner.lease_usage([cred.lease_id])[cred.lease_id].use_count == 2


def test_stop_flushes(clock: FakeClock) -> None:
    store = MemoryStore()
    broker = broker_on(store, clock, usage_interval=3600)
    cred = broker.issue(subject="svc:a", audience="api", ttl=600)
    with broker:
        broker.verify(cred.token, audience="api")
    assert store.lease_usage([cred.lease_id])[cred.lease_id].use_count == 1


def test_the_async_broker_records_and_flushes(clock: FakeClock) -> None:
    store = MemoryStore()

    async def main() -> None:
        broker = AsyncBroker(issuer="urn:test", keys=KEYS, store=store, clock=clock)
        cred = await broker.issue(subject="svc:a", audience="api", ttl=600)
        await broker.verify(cred.token, audience="api")
        await broker.verify(cred.token, audience="api")
        clock.advance(61)
        await broker.sweep()
        assert store.lease_usage([cred.lease_id])[cred.lease_id].use_count == 2
        await broker.verify(cred.token, audience="api")
        await broker.close()  # flushes what the interval held back
        assert store.lease_usage([cred.lease_id])[cred.lease_id].use_count == 3

    asyncio.run(main())


# -- round trips on the verify path (Redis, PostgreSQL) ----------------------------
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_usage_tracking_adds_no_round_trip_to_verify(kind: str, clock: FakeClock) -> None:
    if kind == "redis":
        server_or_skip("Redis", "127.0.0.1", 6379)
    else:
        server_or_skip("PostgreSQL", "127.0.0.1", 5432)
    run = bench()
    shared = run.redis_store() if kind == "redis" else run.postgres_store()
    try:
        counting = shared.counting
        if counting is None:
            pytest.skip("round trips are counted on Linux only")
        trips = {}
        for track in (False, True):
            broker = broker_on(counting.store, clock, track_usage=track)
            broker.sweep()
            cred = broker.issue(subject="svc:a", audience="api", ttl=600)
            for _ in range(8):  # warm up: scripts loaded, statements prepared
                broker.verify(cred.token, audience="api")
            trips[track] = counting.round_trips(
                lambda b=broker, t=cred.token: [b.verify(t, audience="api") for _ in range(10)]
            )
        assert trips[True] == trips[False] == 10  # the lease lookup, once per verify
        assert counting.round_trips(broker.flush_usage) == 1  # one batch write
        assert counting.store.lease_usage([cred.lease_id])[cred.lease_id].use_count == 18
    finally:
        shared.close()


# -- the report ----------------------------------------------------------------------
def test_the_report_flags_never_used_unused_and_foreign_audiences(clock: FakeClock) -> None:
    store = MemoryStore()
    broker = broker_on(store, clock, max_ttl=3600 * 24 * 60)
    never = broker.issue(subject="svc:idle", audience="api", ttl=3600 * 24 * 40)
    old = broker.issue(subject="svc:old", audience="api", ttl=3600)
    busy = broker.issue(subject="svc:busy", audience="api", ttl=3600)
    broker.verify(old.token, audience="api")
    clock.advance(600)
    fresh_never = broker.issue(subject="svc:new", audience="api", ttl=3600)
    broker.verify(busy.token, audience="api")
    # Should be impossible: another audience verified it (a store tampered with,
    # or a bug); the report must say so loudly.
    store.record_usage([UsageRecord(busy.lease_id, clock(), 1, ("db:other",))])
    report = broker.report(unused_days=0.005)  # 432 s: old was last used 600 s ago
    assert report.usage is not None
    assert report.usage[busy.lease_id] == Usage(clock(), 2, ("db:other", "api"))
    assert [x.id for x in report.never_used or ()] == [never.lease_id]  # not fresh_never
    assert fresh_never.lease_id not in report.usage
    assert [x.id for x in report.unused or ()] == [old.lease_id]
    assert [x.id for x in report.foreign_audience or ()] == [busy.lease_id]
    found = {f.kind: f for f in report.findings()}
    assert (found["never_used"].nhi, found["unused"].nhi) == ("NHI1", "NHI1")
    assert found["foreign_audience"].nhi == "NHI9"
    assert found["foreign_audience"].leases == (busy.lease_id,)
    assert found["unused"].title == "active leases unused for 0.005 days"
    text = str(report)
    assert "USED BY AUDIENCES IT WAS NOT ISSUED FOR: 1" in text
    assert "db:other" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["usage"]["leases"][busy.lease_id]["use_count"] == 2
    assert data["usage"]["foreign_audience"][0]["used_by"] == ["db:other", "api"]
    assert [x["id"] for x in data["usage"]["never_used"]] == [never.lease_id]
    assert cred_token_absent(text + json.dumps(data), never.token, old.token, busy.token)


def cred_token_absent(text: str, *tokens: str) -> bool:
    return not any(token in text for token in tokens)


def test_a_wildcard_audience_covers_what_it_grants(clock: FakeClock) -> None:
    lease = make("w", audience="api:*")
    usage = {"w": Usage(T0, 1, ("api:orders",))}
    report = build_report([lease], now=T0 + 1, usage=usage)
    assert report.foreign_audience == ()
    with pytest.raises(InvalidRequest, match="unused_days"):
        build_report([], now=T0, unused_days=0)


def test_the_html_report_lists_the_usage_findings(clock: FakeClock) -> None:
    from jitbroker.report_html import render_html

    broker = broker_on(MemoryStore(), clock)
    broker.issue(subject="svc:idle", audience="api", ttl=3600)
    clock.advance(600)
    page = render_html(broker.report())
    assert "never used" in page
    assert "audiences they were not issued for" in page


def test_the_cli_reports_usage_with_unused_days(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jitbroker.cli import main

    path = tmp_path / "leases.db"
    store = sqlite_module.SQLiteStore(path)
    broker = broker_on(store, FakeClock(time.time()))  # the CLI reads the wall clock
    cred = broker.issue(subject="svc:a", audience="api", ttl=600)
    broker.verify(cred.token, audience="api")
    broker.close()
    assert main(["report", "--store", str(path), "--json", "--unused-days", "7"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["usage"]["unused_days"] == 7
    assert data["usage"]["leases"][cred.lease_id]["use_count"] == 1


# -- schema upgrades -----------------------------------------------------------------
def test_an_sqlite_file_of_the_previous_version_gains_the_usage_columns(tmp_path: Path) -> None:
    path = tmp_path / "leases.db"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
    previous = sqlite_module.SCHEMA_VERSION - 1
    assert "use_count" in " ".join(sqlite_module._MIGRATIONS[previous])  # the last step
    with sqlite3.connect(path) as db:
        for steps in sqlite_module._MIGRATIONS[:previous]:
            for statement in steps:
                db.execute(statement)
        db.execute(f"PRAGMA application_id = {sqlite_module.APPLICATION_ID}")
        db.execute(f"PRAGMA user_version = {previous}")
    store = sqlite_module.SQLiteStore(path)  # migrates
    try:
        check_usage_after_upgrade(store)
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == previous + 1


def test_a_postgres_schema_of_version_8_gains_the_usage_columns() -> None:
    server_or_skip("PostgreSQL", "127.0.0.1", 5432)
    import psycopg

    from jitbroker.stores import postgres as postgres_module

    schema, previous = f"jbtest_{uuid4().hex}", 8
    assert previous + 1 == postgres_module.SCHEMA_VERSION
    statements = postgres_module._Statements(schema)
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
        for statement in postgres_module._BOOTSTRAP:
            admin.execute(statements.compose(statement))
        for migration in postgres_module._MIGRATIONS[:previous]:
            for statement in migration:
                admin.execute(statements.compose(statement))
        admin.execute(statements.compose(postgres_module._SET_VERSION), (previous,))
        columns = "SELECT column_name FROM information_schema.columns WHERE table_schema = %s"
        before = {row[0] for row in admin.execute(columns, (schema,))}
        assert "use_count" not in before
    store = postgres_module.PostgresStore(POSTGRES_DSN, schema=schema)
    try:
        check_usage_after_upgrade(store)
    finally:
        store.clear()
        store.close()


def check_usage_after_upgrade(store: Any) -> None:
    store.add(make("a"))
    assert store.lease_usage(["a"]) == {}
    store.record_usage([UsageRecord("a", T0 + 1, 2, ("api",))])
    assert store.lease_usage(["a"]) == {"a": Usage(T0 + 1, 2, ("api",))}
    assert store.get("a") == make("a")  # the lease itself is unchanged
