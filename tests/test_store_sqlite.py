"""``SQLiteStore`` beyond the conformance suite: the file (WAL, schema version,
migrations), files that are not ours, error translation, crash safety and
several OS processes sharing one file.

Child processes run ``python -c`` with the store's path as argument; they print
one line after each committed operation, so the parent knows exactly what was
committed when it kills them. Waits are on pipes (each child says when it is
ready), never sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest

from jitbroker import AsyncBroker, Broker, KeyRing
from jitbroker.audit import AuditEvent
from jitbroker.errors import InvalidRequest, StoreError, StoreUnavailable, TokenRevoked
from jitbroker.lease import Lease
from jitbroker.stores import sqlite as sqlite_module
from jitbroker.stores.base import NO_OUTBOX, LeaseFilter, Outbox, event_jobs, job_id
from jitbroker.stores.codec import COLUMNS
from jitbroker.stores.sqlite import APPLICATION_ID, SCHEMA_VERSION, SQLiteStore
from jitbroker.testing import FakeClock

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
CHILD_TIMEOUT = 60  # seconds; a safety net, the children finish in well under one

needs_sigkill = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX only")


def make(lease_id: str, *, at: float = T0, ttl: float = 60.0, **fields: Any) -> Lease:
    values: dict[str, Any] = {"subject": "svc:a", "audience": "api", "scopes": ("read",)}
    values.update(fields)
    return Lease(id=lease_id, issued_at=at, expires_at=at + ttl, max_expires_at=at + 3600, **values)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "leases.db"


@pytest.fixture
def store(path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(path)
    yield store
    store.close()


def raw(path: Path) -> closing[sqlite3.Connection]:
    """A plain connection to the file, as another program would open it."""
    return closing(sqlite3.connect(path, isolation_level=None))


def pragma(path: Path, name: str) -> Any:
    with raw(path) as db:
        return db.execute(f"PRAGMA {name}").fetchone()[0]


@contextmanager
def traced(store: SQLiteStore) -> Iterator[list[str]]:
    """The statements the store's connection runs in the block, parameters bound."""
    statements: list[str] = []
    db = store._db
    assert db is not None
    db.set_trace_callback(statements.append)
    try:
        yield statements
    finally:
        db.set_trace_callback(None)


def plan(db: sqlite3.Connection, sql: str) -> str:
    return " / ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql))


HOOK = Outbox(hooks=("app.h",))  # an unclaimed on_issue / on_revoke job "app.h", due at once


# -- the file ---------------------------------------------------------------------
def test_a_new_file_is_a_versioned_wal_database(path: Path, store: SQLiteStore) -> None:
    assert pragma(path, "journal_mode") == "wal"
    assert pragma(path, "user_version") == SCHEMA_VERSION
    assert pragma(path, "application_id") == APPLICATION_ID
    assert pragma(path, "page_size") == sqlite_module.PAGE_SIZE
    assert store.blocking is True
    assert repr(store) == f"<SQLiteStore path={str(path)!r}>"


def test_every_state_survives_reopening(path: Path) -> None:
    store = SQLiteStore(path)
    for lease in (make("live", ttl=600), make("revoked"), make("claimed", ttl=10)):
        store.add(lease)
    store.add(make("child", parent="live", task="t"))
    store.revoke("revoked", at=T0 + 1, reason="done")
    store.extend("live", expires_at=T0 + 900, at=T0 + 2)
    assert [lease.id for lease in store.claim_expired(T0 + 10)] == ["claimed"]
    before = {lease.id: lease for lease in store.find(LeaseFilter())}
    store.close()

    store = SQLiteStore(path)
    assert {lease.id: lease for lease in store.find(LeaseFilter())} == before
    assert store.claim_expired(T0 + 60) == [before["child"]]  # "claimed" stays claimed
    assert store.extend("claimed", expires_at=T0 + 99, at=T0 + 5) is None
    store.close()


def test_a_zero_length_file_becomes_a_store(path: Path) -> None:
    path.touch()
    store = SQLiteStore(path)
    assert store.add(make("a")) is True
    store.close()


def test_queries_use_the_indexes(path: Path, store: SQLiteStore) -> None:
    queries: list[tuple[str, Any]] = [
        (sqlite_module._FIND.format(condition=f"{f} = :{f}"), {f: "x"})
        for f in ("task", "parent", "owner", "subject", "key_id")
    ]
    queries += [
        (sqlite_module._DUE, (T0, 10)),
        (sqlite_module._PURGE, (T0,)),
        (sqlite_module._TREE.format(roots="owner = :owner"), {"owner": "x", "at": T0}),
    ]
    with raw(path) as db:
        for sql, params in queries:
            plan = " / ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, params))
            assert "SCAN leases" not in plan, plan
            if "RECURSIVE" in sql:  # the walk down the tree follows the parent index
                assert "USING INDEX leases_parent" in plan, plan


def test_claim_jobs_reads_one_range_of_jobs_due_per_kind(path: Path, store: SQLiteStore) -> None:
    # A backlog nobody here runs (another kind), parked jobs of the kind asked
    # for, and jobs not due yet: none of them is read.
    for i in range(30):
        store.add(make(f"other{i}"), outbox=Outbox(hooks=("app.other",)))
    for i in range(3):
        store.add(make(f"mine{i}", at=T0 + i), outbox=HOOK)
    [parked] = store.claim_jobs(T0, ["on_issue:app.h"], claim="c", until=T0 + 9, limit=1)
    assert store.fail_job(parked.id, "c", due=T0, error="E", park=True)
    with traced(store) as statements:
        got = store.claim_jobs(T0 + 1, ["on_issue:app.h"], claim="c", until=T0 + 9)
    assert [job.id for job in got] == [job_id("mine1", "on_issue", "app.h")]
    inline, select = [sql for sql in statements if sql.startswith("SELECT")]
    with raw(path) as db:
        found = plan(db, select)
        held = plan(db, inline)
    assert found.startswith("SEARCH jobs USING INDEX jobs_due (kind=? AND due<?)"), found
    assert "SCAN" not in found, found
    # Held jobs past their deadline, still inline in their lease's row: one range.
    want = "SEARCH leases USING INDEX leases_issue (issue_due>? AND issue_due<?)"
    assert held.startswith(want), held


# -- the hot path: an event without jobs runs what it ran before the outbox -------------
def test_an_event_without_jobs_runs_no_outbox_statement(store: SQLiteStore) -> None:
    store.add(make("parent", ttl=600))
    with traced(store) as statements:
        assert store.add(make("root"), outbox=NO_OUTBOX) is True
    assert len(statements) == 1  # the insert, its own transaction: no BEGIN, no jobs
    with traced(store) as statements:
        assert store.add(make("child", parent="parent")) is True
    assert len(statements) == 1
    with traced(store) as statements:
        assert len(store.revoke("root", at=T0 + 1, reason="r")) == 1
        assert len(store.revoke_where(LeaseFilter(owner="x"), at=T0 + 1, reason="r")) == 0
        assert [x.id for x in store.claim_expired(T0 + 60)] == ["child"]
    assert statements
    assert not [sql for sql in statements if "jobs" in sql], statements
    assert store.jobs() == []


def test_outbox_calls_about_no_job_take_no_lock(store: SQLiteStore) -> None:
    with traced(store) as statements:
        assert store.claim_jobs(T0, [], claim="c", until=T0 + 9) == []
        assert store.finish_jobs([], "c") == 0
        assert store.retry_jobs([], T0) == 0
        assert store.forget_jobs([]) == []
    assert statements == []


def test_an_events_jobs_are_written_in_its_transaction(store: SQLiteStore) -> None:
    def between_begin_and_commit(statements: list[str]) -> list[str]:
        begin, commit = statements.index("BEGIN IMMEDIATE"), statements.index("COMMIT")
        assert [sql for sql in statements if "INTO jobs" in sql]
        assert all(begin < i < commit for i, sql in enumerate(statements) if "INTO jobs" in sql), (
            statements
        )
        return statements

    with traced(store) as statements:
        store.add(make("a", expire_hooks="app.x"), outbox=HOOK)
    between_begin_and_commit(statements)
    with traced(store) as statements:
        store.revoke("a", at=T0 + 1, reason="r", outbox=HOOK)
    between_begin_and_commit(statements)
    store.add(make("b", expire_hooks="app.x"))
    with traced(store) as statements:
        store.claim_expired(T0 + 60, expire_hooks=["app.x"])
    between_begin_and_commit(statements)
    assert {job.id for job in store.jobs()} == {
        "a/on_issue/app.h",
        "a/on_revoke/app.h",
        "b/on_expire/app.x",
    }


# -- schema versions and migrations --------------------------------------------------
def test_migrations_run_forward_in_order(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SQLiteStore(path)  # a file at the current version
    store.add(make("kept"))
    store.close()
    step = ("ALTER TABLE leases ADD COLUMN note TEXT", "UPDATE leases SET note = 'migrated'")
    monkeypatch.setattr(sqlite_module, "_MIGRATIONS", (*sqlite_module._MIGRATIONS, step))
    monkeypatch.setattr(sqlite_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)

    store = SQLiteStore(path)
    assert store.get("kept") == make("kept")
    store.close()
    assert pragma(path, "user_version") == SCHEMA_VERSION + 1
    with raw(path) as db:
        assert db.execute("SELECT note FROM leases").fetchall() == [("migrated",)]


def test_a_failed_migration_changes_nothing(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SQLiteStore(path)
    store.add(make("kept"))
    store.close()
    step = ("ALTER TABLE leases ADD COLUMN note TEXT", "this is not SQL")
    monkeypatch.setattr(sqlite_module, "_MIGRATIONS", (*sqlite_module._MIGRATIONS, step))
    monkeypatch.setattr(sqlite_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)

    with pytest.raises(StoreError, match=str(path)):
        SQLiteStore(path)
    assert pragma(path, "user_version") == SCHEMA_VERSION
    with raw(path) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(leases)")}
    assert "note" not in columns

    monkeypatch.undo()
    store = SQLiteStore(path)
    assert store.get("kept") == make("kept")
    store.close()


def schema_3_file(path: Path, leases: list[Lease]) -> None:
    """A file as jitbroker with schema 3 left it (no provider, no outbox), holding
    ``leases`` (their provider None)."""
    columns = [name for name in COLUMNS if name != "provider"]
    insert = (
        f"INSERT INTO leases ({', '.join(columns)}, dead)"  # noqa: S608 (fixed names)
        f" VALUES ({', '.join('?' * (len(columns) + 1))})"
    )
    with raw(path) as db:
        for steps in sqlite_module._MIGRATIONS[:3]:
            for sql in steps:
                db.execute(sql)
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute("PRAGMA user_version = 3")
        for lease in leases:
            values = [
                " ".join(lease.scopes) if c == "scopes" else getattr(lease, c) for c in columns
            ]
            db.execute(insert, (*values, lease.revoked_at is not None))


def test_a_file_of_schema_3_gets_the_outbox_and_keeps_its_leases(path: Path) -> None:
    leases = [
        make("live", ttl=600, task="t", owner="alice", issuer="urn:x", task_run="r"),
        make("hooked", ttl=10, expire_hooks="app.x"),
        attrs.evolve(make("revoked", task="t"), revoked_at=T0 + 1, revoke_reason="done"),
    ]
    schema_3_file(path, leases)
    store = SQLiteStore(path)
    assert pragma(path, "user_version") == SCHEMA_VERSION
    assert {lease.id: lease for lease in store.find(LeaseFilter())} == {x.id: x for x in leases}
    assert store.find(LeaseFilter(provider="db")) == []
    with raw(path) as db:
        assert "provider" in {row[1] for row in db.execute("PRAGMA table_info(leases)")}
        indexes = {
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'jobs'")
        }
    assert {"jobs_due", "jobs_order"} <= indexes
    assert store.jobs() == []

    # The old leases take part in the outbox like new ones.
    store.add(make("new", parent="live", provider="db"), outbox=HOOK)
    revoked = store.revoke("live", at=T0 + 2, reason="r", outbox=HOOK)
    assert {lease.id for lease in revoked} == {"live", "new"}
    [expired] = store.claim_expired(T0 + 10, expire_hooks=["app.x"])
    want = [
        *event_jobs("on_issue", make("new", parent="live", provider="db"), HOOK, T0),
        *(job for lease in revoked for job in event_jobs("on_revoke", lease, HOOK, T0 + 2)),
        *event_jobs("on_expire", expired, NO_OUTBOX, T0 + 10),
    ]
    assert sorted(store.jobs(), key=lambda job: job.id) == sorted(want, key=lambda job: job.id)
    store.close()
    assert pragma(path, "integrity_check") == "ok"


def test_a_file_from_a_newer_version_is_refused(path: Path) -> None:
    SQLiteStore(path).close()
    with raw(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer") as info:
        SQLiteStore(path)
    assert str(path) in str(info.value)
    assert pragma(path, "user_version") == SCHEMA_VERSION + 1


# -- files that are not ours ---------------------------------------------------------
def test_another_applications_database_is_refused_untouched(path: Path) -> None:
    with raw(path) as db:
        db.execute("CREATE TABLE users (name TEXT)")
        db.execute("INSERT INTO users VALUES ('alice')")
    with pytest.raises(StoreError, match="another application") as info:
        SQLiteStore(path)
    assert str(path) in str(info.value)
    with raw(path) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master")]
        assert tables == ["users"]
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # not switched


def test_a_file_that_is_not_sqlite_is_refused_untouched(path: Path) -> None:
    content = b"this is a config file, not a database\n" * 200
    path.write_bytes(content)
    with pytest.raises(StoreError, match="not a database") as info:
        SQLiteStore(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    assert path.read_bytes() == content


def corrupt_header(path: Path) -> None:
    with path.open("r+b") as file:
        file.write(b"\xff" * 16)  # the magic string "SQLite format 3\0"


def corrupt_schema(path: Path) -> None:
    with path.open("r+b") as file:
        file.seek(100)  # page 1, past the file header: where sqlite_master lives
        file.write(b"\xff" * 400)


def corrupt_leases_table(path: Path) -> None:
    with raw(path) as db:
        (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'leases'").fetchone()
    with path.open("r+b") as file:
        file.seek((root - 1) * sqlite_module.PAGE_SIZE)
        file.write(b"\xff" * sqlite_module.PAGE_SIZE)


def open_and_read(path: Path) -> None:
    # Damage to the header or schema shows on opening, to a table on reading it.
    store = SQLiteStore(path)
    try:
        store.find(LeaseFilter(task="t"))
    finally:
        store.close()


@pytest.mark.parametrize("damage", [corrupt_header, corrupt_schema, corrupt_leases_table])
def test_a_corrupted_store_raises_store_error(path: Path, damage: Callable[[Path], None]) -> None:
    store = SQLiteStore(path)
    for i in range(20):
        store.add(make(f"l{i}", task="t"))
    store.close()  # the last connection checkpoints: everything is in the main file
    damage(path)
    with pytest.raises(StoreError) as info:
        open_and_read(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)


def test_a_lease_table_without_our_columns_is_refused(path: Path) -> None:
    SQLiteStore(path).close()
    with raw(path) as db:
        db.execute("ALTER TABLE leases DROP COLUMN holder")
    with pytest.raises(StoreError, match="holder"):
        SQLiteStore(path)


# -- errors never escape as sqlite3 errors ---------------------------------------------
def test_a_held_write_lock_makes_add_unavailable_then_it_recovers(path: Path) -> None:
    store = SQLiteStore(path, timeout=0.2)
    store.add(make("parent"))
    with raw(path) as other:
        other.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        for lease in (make("a"), make("b", parent="parent")):
            with pytest.raises(StoreUnavailable, match="busy") as info:
                store.add(lease)
            assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        assert time.monotonic() - started >= 0.2  # it did wait for the lock
        with pytest.raises(StoreUnavailable):
            store.revoke("parent", at=T0, reason="r")
        with pytest.raises(StoreUnavailable):
            store.claim_expired(T0 + 100)
        # WAL: readers do not wait for the writer, and see that nothing was stored.
        assert store.get("a") is None
        assert store.get("parent") == make("parent")
        other.execute("ROLLBACK")
    assert store.add(make("a")) is True
    assert [lease.id for lease in store.revoke("parent", at=T0, reason="r")] == ["parent"]
    store.close()


def test_an_up_to_date_file_opens_while_another_process_writes(path: Path) -> None:
    """Opening only reads the schema (issue 15): a writer holding the lock, as
    under write load, must not make the constructor fail."""
    SQLiteStore(path).close()
    with raw(path) as other:
        other.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        store = SQLiteStore(path, timeout=0.2)
        assert time.monotonic() - started < 0.2  # it did not wait for the lock
        assert store.get("a") is None
        with pytest.raises(StoreUnavailable, match="busy"):  # writes still wait
            store.add(make("a"))
        other.execute("ROLLBACK")
    assert store.add(make("a")) is True
    store.close()


def test_a_file_that_needs_migrating_waits_for_the_write_lock(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only creating or migrating takes the lock; blocked, it fails cleanly."""
    SQLiteStore(path).close()
    step = ("ALTER TABLE leases ADD COLUMN note TEXT",)
    monkeypatch.setattr(sqlite_module, "_MIGRATIONS", (*sqlite_module._MIGRATIONS, step))
    monkeypatch.setattr(sqlite_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with raw(path) as other:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable, match="busy"):
            SQLiteStore(path, timeout=0.1)
        other.execute("ROLLBACK")
    SQLiteStore(path).close()
    assert pragma(path, "user_version") == SCHEMA_VERSION + 1


def test_opening_an_up_to_date_file_writes_nothing(path: Path) -> None:
    SQLiteStore(path).close()
    with raw(path) as db:
        before = db.execute("PRAGMA data_version").fetchone()[0]
        SQLiteStore(path).close()
        # data_version changes when another connection commits to the file.
        assert db.execute("PRAGMA data_version").fetchone()[0] == before


CALLS: dict[str, Callable[[SQLiteStore], object]] = {
    "add": lambda s: s.add(make("new")),
    "add-child": lambda s: s.add(make("new", parent="a")),
    "get": lambda s: s.get("a"),
    "revoke": lambda s: s.revoke("a", at=T0, reason="r"),
    "revoke_where": lambda s: s.revoke_where(LeaseFilter(task="t"), at=T0, reason="r"),
    "extend": lambda s: s.extend("a", expires_at=T0 + 99, at=T0),
    "find": lambda s: s.find(LeaseFilter()),
    "claim_expired": lambda s: s.claim_expired(T0 + 100),
    "purge": lambda s: s.purge(T0 + 100),
}
OUTBOX_CALLS: dict[str, Callable[[SQLiteStore], object]] = {
    "add-with-jobs": lambda s: s.add(make("new"), outbox=HOOK),
    "claim_jobs": lambda s: s.claim_jobs(T0, ["on_issue:app.h"], claim="c", until=T0 + 9),
    "finish_jobs": lambda s: s.finish_jobs(["a/on_issue/app.h"], "c"),
    "fail_job": lambda s: s.fail_job("a/on_issue/app.h", "c", due=T0, error="E", park=False),
    "get_job": lambda s: s.get_job("a/on_issue/app.h"),
    "jobs": lambda s: s.jobs(),
    "retry_jobs": lambda s: s.retry_jobs(None, T0),
    "forget_jobs": lambda s: s.forget_jobs(["a/on_issue/app.h"]),
}


@pytest.mark.parametrize(
    "call", [*CALLS.values(), *OUTBOX_CALLS.values()], ids=[*CALLS, *OUTBOX_CALLS]
)
def test_a_closed_store_raises_store_error(store: SQLiteStore, call: Callable[..., object]) -> None:
    store.add(make("a", task="t"))
    store.close()
    with pytest.raises(StoreError, match="closed"):
        call(store)


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_sqlite_errors_become_store_errors(
    path: Path, store: SQLiteStore, call: Callable[..., object]
) -> None:
    store.add(make("a", task="t"))
    with raw(path) as db:
        db.execute("DROP TABLE leases")  # pulled from under the open store
    with pytest.raises(StoreError, match="no such table") as info:
        call(store)
    assert isinstance(info.value.__cause__, sqlite3.Error)
    assert not isinstance(info.value, StoreUnavailable)


@pytest.mark.parametrize("call", OUTBOX_CALLS.values(), ids=OUTBOX_CALLS.keys())
def test_sqlite_errors_of_the_outbox_become_store_errors(
    path: Path, store: SQLiteStore, call: Callable[..., object]
) -> None:
    store.add(make("a", task="t"), outbox=HOOK)
    with raw(path) as db:
        db.execute("DROP TABLE jobs")
    with pytest.raises(StoreError, match="no such table") as info:
        call(store)
    assert isinstance(info.value.__cause__, sqlite3.Error)
    assert not isinstance(info.value, StoreUnavailable)


def test_a_job_whose_lease_does_not_decode_is_a_store_error(path: Path, store: SQLiteStore) -> None:
    store.add(make("a"), outbox=HOOK)
    with raw(path) as db:
        db.execute("UPDATE jobs SET lease = '{\"id\": 1'")
    with pytest.raises(StoreError, match=r"corrupt outbox job 'a/on_issue/app\.h'"):
        store.get_job("a/on_issue/app.h")


EVENTS_WITH_JOBS: dict[str, Callable[[SQLiteStore], object]] = {
    "add": lambda s: s.add(make("new", ttl=600), outbox=HOOK),
    "add-child": lambda s: s.add(make("new", ttl=600, parent="root"), outbox=HOOK),
    "revoke": lambda s: s.revoke("root", at=T0 + 1, reason="r", outbox=HOOK),
    "revoke_where": lambda s: s.revoke_where(
        LeaseFilter(task="t"), at=T0 + 1, reason="r", outbox=HOOK
    ),
    "claim_expired": lambda s: s.claim_expired(T0 + 60, expire_hooks=["app.x"]),
}


@pytest.mark.parametrize("event", EVENTS_WITH_JOBS.values(), ids=EVENTS_WITH_JOBS.keys())
def test_an_event_whose_jobs_cannot_be_written_does_not_happen(
    path: Path, store: SQLiteStore, event: Callable[[SQLiteStore], object]
) -> None:
    store.add(make("root", task="t", expire_hooks="app.x"))
    before = store.find(LeaseFilter())
    with raw(path) as db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON jobs BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    with pytest.raises(StoreError, match="refused"):
        event(store)
    assert store.find(LeaseFilter()) == before
    assert store.jobs() == []
    with raw(path) as db:
        db.execute("DROP TRIGGER refuse")
    event(store)  # the connection is fine
    assert store.jobs() != []


def test_a_failing_revoke_rolls_back_whole(path: Path, store: SQLiteStore) -> None:
    store.add(make("root"))
    store.add(make("child", parent="root"))
    store.add(make("grandchild", parent="child"))
    with raw(path) as db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE ON leases WHEN NEW.id = 'grandchild'"
            " BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    with pytest.raises(StoreError, match="refused"):
        store.revoke("root", at=T0 + 1, reason="r")
    assert all(lease.revoked_at is None for lease in store.find(LeaseFilter()))
    with raw(path) as db:
        db.execute("DROP TRIGGER refuse")
    assert len(store.revoke("root", at=T0 + 1, reason="r")) == 3  # the connection is fine


@pytest.mark.parametrize(
    "build",
    [
        lambda p: SQLiteStore(":memory:"),
        lambda p: SQLiteStore(""),
        lambda p: SQLiteStore(p, timeout=-1),
        lambda p: SQLiteStore(p, timeout=float("nan")),
    ],
    ids=["memory", "empty", "negative-timeout", "nan-timeout"],
)
def test_bad_arguments(path: Path, build: Callable[[Path], SQLiteStore]) -> None:
    with pytest.raises(InvalidRequest):
        build(path)


def test_times_must_be_finite(store: SQLiteStore) -> None:
    with pytest.raises(InvalidRequest, match="expires_at"):
        store.add(attrs.evolve(make("a"), expires_at=float("inf")))
    store.add(make("a"))
    with pytest.raises(InvalidRequest, match="expires_at"):
        store.extend("a", expires_at=float("nan"), at=T0)
    assert store.get("a") == make("a")


def test_a_name_given_twice_counts_once(store: SQLiteStore) -> None:
    store.add(make("a"), outbox=HOOK)
    kinds = ["on_issue:app.h", "on_issue:app.h"]
    [job] = store.claim_jobs(T0, kinds, claim="c", until=T0 + 9)
    assert store.finish_jobs([job.id, job.id], "c") == 1
    store.add(make("b"), outbox=HOOK)
    [gone] = store.forget_jobs(["b/on_issue/app.h", "b/on_issue/app.h"])
    assert gone.id == "b/on_issue/app.h"


def test_a_negative_limit_is_no_job_not_every_job(store: SQLiteStore) -> None:
    # SQLite reads LIMIT -1 as "no limit".
    store.add(make("a"), outbox=HOOK)
    assert store.jobs(limit=-1) == []
    assert store.claim_jobs(T0, ["on_issue:app.h"], claim="c", until=T0 + 9, limit=-1) == []
    assert [job.claim for job in store.jobs()] == [None]


# -- fork ---------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only")
def test_a_forked_child_opens_its_own_connection(store: SQLiteStore) -> None:
    store.add(make("a"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 1
        try:
            if store.get("a") == make("a") and store.add(make("from-child")):
                status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.get("from-child") == make("from-child")
    assert store.add(make("after")) is True  # the parent's connection still works


# -- several processes ----------------------------------------------------------------
PRELUDE = """
import json, sys
from jitbroker.lease import Lease
from jitbroker.stores.base import LeaseFilter
from jitbroker.stores.sqlite import SQLiteStore
T0 = 1_767_225_600.0
def make(lease_id, *, at=T0, ttl=60.0, **fields):
    return Lease(lease_id, "svc:a", "api", ("read",), at, at + ttl, at + 3600, **fields)
def say(*words):
    print(*words, flush=True)
store = SQLiteStore(sys.argv[1], timeout=30)
"""


Spawn = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Starts ``python -c PRELUDE + code path [args]``; reaps every child at the end."""
    children: list[subprocess.Popen[str]] = []

    def start(
        code: str, path: Path, *, prelude: str = PRELUDE, args: list[str] | None = None
    ) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, "-c", prelude + code, str(path), *(args or [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        children.append(child)
        return child

    yield start
    for child in children:
        if child.poll() is None:  # a failed test left it running
            child.kill()
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                pipe.close()
        child.wait(timeout=CHILD_TIMEOUT)


def read_line(child: subprocess.Popen[str]) -> str:
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line.endswith("\n"), f"child exited early ({child.poll()})"
    return line.rstrip("\n")


def tell(child: subprocess.Popen[str], line: str) -> None:
    assert child.stdin is not None
    child.stdin.write(line + "\n")
    child.stdin.flush()


def kill(child: subprocess.Popen[str]) -> list[str]:
    """SIGKILL the child; the complete lines it printed before dying."""
    child.send_signal(signal.SIGKILL)
    # Read through the same buffer read_line used: communicate() would read the
    # pipe's fd directly and lose lines readline had already buffered.
    assert child.stdout is not None
    out = child.stdout.read()
    assert child.wait(timeout=CHILD_TIMEOUT) == -signal.SIGKILL
    return out.split("\n")[:-1]  # a cut-off last line is no commit


@needs_sigkill
def test_a_crash_mid_work_loses_no_committed_lease_or_revocation(path: Path, spawn: Spawn) -> None:
    child = spawn(
        """
i = 0
while True:
    store.add(make(f"l{i}", task="crash"))
    say("added", f"l{i}")
    store.add(make(f"c{i}", parent=f"l{i}", task="crash"))
    say("added", f"c{i}")
    if i % 2:
        store.revoke(f"l{i}", at=T0 + 1, reason="crash-test")
        say("revoked", f"l{i}", f"c{i}")
    i += 1
""",
        path,
    )
    lines = [read_line(child) for _ in range(300)]  # then kill it wherever it is
    lines += kill(child)
    added = {line.split()[1] for line in lines if line.startswith("added")}
    revoked = {id_ for line in lines if line.startswith("revoked") for id_ in line.split()[1:]}
    assert len(added) >= 300 * 2 // 3

    store = SQLiteStore(path)
    stored = {lease.id: lease for lease in store.find(LeaseFilter(task="crash"))}
    assert added <= set(stored)  # at most one more: committed but not yet reported
    assert len(stored) <= len(added) + 1
    for lease_id in revoked:
        assert (stored[lease_id].revoked_at, stored[lease_id].revoke_reason) == (
            T0 + 1,
            "crash-test",
        )
    store.close()
    assert pragma(path, "integrity_check") == "ok"


# Brokers in child processes: each has its own clock and writes its audit events
# to its own JSON-lines file (argv[2]), which the test reads back.
BROKER_PRELUDE = """
import json, sys
from jitbroker import Broker, KeyRing, core
from jitbroker.stores.sqlite import SQLiteStore
from jitbroker.testing import FakeClock
T0 = 1_767_225_600.0
def say(*words):
    print(*words, flush=True)
audit = open(sys.argv[2], "a", encoding="utf-8")
def sink(event):  # one line per event, flushed: a SIGKILL loses none that fired
    print(json.dumps(event.to_dict()), file=audit, flush=True)
clock = FakeClock(T0)
broker = Broker(
    keys=KeyRing.generate("EdDSA"), store=SQLiteStore(sys.argv[1], timeout=30),
    clock=clock, audit=[sink],
)
"""


def expired_events(audit: Path) -> list[str]:
    """Ids of the leases a broker reported expired, in its audit file's order."""
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    return [event["lease"]["id"] for event in events if event["action"] == "expired"]


@needs_sigkill
def test_leases_that_expired_while_nothing_ran_expire_once(path: Path, spawn: Spawn) -> None:
    audits = [path.parent / f"audit-{name}.jsonl" for name in ("first", "second", "third")]
    first = spawn(
        """
ids = [broker.issue("svc:a", "api", ["read"], 10 + i % 40).lease_id for i in range(400)]
say(json.dumps(ids))
clock.set(T0 + 20)
say(json.dumps(sorted(lease.id for lease in broker.sweep())))
sys.stdin.readline()  # stay up until killed: no clean close, the WAL is left behind
""",
        path,
        prelude=BROKER_PRELUDE,
        args=[str(audits[0])],
    )
    issued: list[str] = json.loads(read_line(first))
    swept_before = json.loads(read_line(first))
    kill(first)
    assert swept_before == sorted(issued[i] for i in range(400) if i % 40 <= 10)  # ttl <= 20
    assert sorted(expired_events(audits[0])) == swept_before

    # Two brokers in two processes come back much later and sweep the same file
    # at the same moment, in batches of 3 so that their claims interleave.
    later = [
        spawn(
            """
core.SWEEP_BATCH = 3
clock.set(T0 + 1000)
say("ready")
sys.stdin.readline()
say(json.dumps([lease.id for lease in broker.sweep()]))
broker.close()
""",
            path,
            prelude=BROKER_PRELUDE,
            args=[str(audit)],
        )
        for audit in audits[1:]
    ]
    for child in later:
        assert read_line(child) == "ready"
    for child in later:
        tell(child, "go")
    swept = [json.loads(read_line(child)) for child in later]
    for child in later:
        assert child.wait(timeout=CHILD_TIMEOUT) == 0
    for audit, ids in zip(audits[1:], swept, strict=True):
        assert expired_events(audit) == ids  # one event per lease its sweep returned
    # Each lease's expiry event fired exactly once, across all three brokers.
    assert sorted(lease_id for audit in audits for lease_id in expired_events(audit)) == sorted(
        issued
    )

    events: list[AuditEvent] = []
    reopened = Broker(
        keys=KeyRing.generate("EdDSA"),
        store=SQLiteStore(path),
        clock=lambda: T0 + 10_000,
        audit=[events.append],
    )
    assert reopened.sweep() == []
    assert [event for event in events if event.action == "expired"] == []
    reopened.close()


def test_four_processes_claim_each_expired_lease_exactly_once(path: Path, spawn: Spawn) -> None:
    count = 600
    store = SQLiteStore(path)
    for i in range(count):
        store.add(make(f"l{i:03}", ttl=1 + i % 50))
    store.close()
    children = [
        spawn(
            """
say("ready")
sys.stdin.readline()
claimed = []
while batch := store.claim_expired(T0 + 100, limit=7):
    claimed += [lease.id for lease in batch]
say(json.dumps(claimed))
""",
            path,
        )
        for _ in range(4)
    ]
    for child in children:
        assert read_line(child) == "ready"
    for child in children:  # a start line for all, so they race from the same moment
        tell(child, "go")
    claimed = [id_ for child in children for id_ in json.loads(read_line(child))]
    for child in children:
        assert child.wait(timeout=CHILD_TIMEOUT) == 0
    assert len(claimed) == count
    assert set(claimed) == {f"l{i:03}" for i in range(count)}


def test_processes_claiming_jobs_at_once_never_get_the_same_job(path: Path, spawn: Spawn) -> None:
    store = SQLiteStore(path)
    for i in range(300):  # 300 on_issue jobs, and 150 on_revoke ones
        store.add(make(f"l{i:03}"), outbox=HOOK)
        if i % 2:
            store.revoke(f"l{i:03}", at=T0 + 1, reason="r", outbox=HOOK)
    every = {job.id for job in store.jobs()}
    assert len(every) == 450
    kinds = ["on_issue:app.h", "on_revoke:app.h"]
    children = [
        spawn(
            f"""
say("ready")
sys.stdin.readline()
claimed = []
while batch := store.claim_jobs(T0 + 5, {kinds!r}, claim=sys.argv[2], until=T0 + 999, limit=4):
    claimed += [job.id for job in batch]
say(json.dumps(claimed))
""",
            path,
            args=[f"claimer-{n}"],
        )
        for n in range(3)
    ]
    for child in children:
        assert read_line(child) == "ready"
    for child in children:  # a start line for all, so they race from the same moment
        tell(child, "go")
    claimed = {f"claimer-{n}": json.loads(read_line(child)) for n, child in enumerate(children)}
    for child in children:
        assert child.wait(timeout=CHILD_TIMEOUT) == 0
    handed = [job_id for ids in claimed.values() for job_id in ids]
    assert len(handed) == len(set(handed)) == len(every)
    assert set(handed) == every
    holders = {job.id: job.claim for job in store.jobs()}
    assert holders == {i: who for who, ids in claimed.items() for i in ids}
    store.close()


@needs_sigkill
def test_a_crash_never_leaves_an_event_without_its_jobs(path: Path, spawn: Spawn) -> None:
    child = spawn(
        """
from jitbroker.stores.base import Outbox
hook = Outbox(hooks=("app.h",))
i = 0
while True:
    store.add(make(f"l{i}", task="crash", ttl=5 + i % 3, expire_hooks="app.x"), outbox=hook)
    say("added", f"l{i}")
    if i % 3 == 1:
        store.revoke(f"l{i}", at=T0 + 1, reason="crash-test", outbox=hook)
        say("revoked", f"l{i}")
    if i % 3 == 2:
        store.claim_expired(T0 + 6, limit=2, expire_hooks=["app.x"])
        say("swept")
    i += 1
""",
        path,
    )
    lines = [read_line(child) for _ in range(300)]
    lines += kill(child)
    added = {line.split()[1] for line in lines if line.startswith("added")}

    store = SQLiteStore(path)
    leases = {lease.id: lease for lease in store.find(LeaseFilter(task="crash"))}
    assert added <= set(leases)
    with raw(path) as db:
        expired = {
            row[0] for row in db.execute("SELECT id FROM leases WHERE dead AND revoked_at IS NULL")
        }
    assert expired
    jobs = {job.id for job in store.jobs(limit=10_000)}
    # Every event that committed has its jobs, and no job outlived a rolled-back event.
    want = {job_id(i, "on_issue", "app.h") for i in leases}
    want |= {job_id(i, "on_revoke", "app.h") for i, x in leases.items() if x.revoked_at}
    want |= {job_id(i, "on_expire", "app.x") for i in expired}
    assert jobs == want
    store.close()
    assert pragma(path, "integrity_check") == "ok"


def test_a_revocation_is_visible_to_another_process_at_once(path: Path, spawn: Spawn) -> None:
    store = SQLiteStore(path)
    store.add(make("root", ttl=600))
    store.add(make("child", ttl=600, parent="root"))
    reader = spawn(
        """
while sys.stdin.readline():  # one check per line, on one long-lived connection
    say(json.dumps([store.get(i).revoked_at for i in ("root", "child")]))
""",
        path,
    )
    tell(reader, "check")
    assert json.loads(read_line(reader)) == [None, None]
    store.revoke("root", at=T0 + 5, reason="compromised")
    tell(reader, "check")  # right after revoke returned: no wait, no retry
    assert json.loads(read_line(reader)) == [T0 + 5, T0 + 5]
    assert reader.stdin is not None
    reader.stdin.close()
    assert reader.wait(timeout=CHILD_TIMEOUT) == 0
    store.close()


# No store yet: each child opens the new file only after the start line.
FRESH_OPEN = """
import os, sys
from jitbroker.lease import Lease
from jitbroker.stores.sqlite import SQLiteStore
print("ready", flush=True)
sys.stdin.readline()
store = SQLiteStore(sys.argv[1], timeout=30)
store.add(Lease(str(os.getpid()), "svc:a", "api", (), 0.0, 60.0, 60.0))
print(os.getpid(), flush=True)
"""


def test_several_processes_can_create_the_file_at_once(path: Path, spawn: Spawn) -> None:
    children = [spawn("", path, prelude=FRESH_OPEN) for _ in range(4)]
    for child in children:
        assert read_line(child) == "ready"
    for child in children:
        tell(child, "go")
    pids = {read_line(child) for child in children}
    for child in children:
        assert child.wait(timeout=CHILD_TIMEOUT) == 0
    store = SQLiteStore(path)
    assert {lease.id for lease in store.find(LeaseFilter())} == pids
    store.close()
    assert pragma(path, "user_version") == SCHEMA_VERSION


# -- through the brokers ---------------------------------------------------------------
def test_two_brokers_share_revocations_through_the_file(path: Path) -> None:
    keys = KeyRing.generate("EdDSA")
    issuer = Broker(keys=keys, store=SQLiteStore(path))
    verifier = Broker(keys=keys, store=SQLiteStore(path))
    cred = issuer.issue("svc:a", "api", ["read"], 60, task="job")
    assert verifier.verify(cred.token, audience="api").lease_id == cred.lease_id
    issuer.revoke(cred, reason="done")
    with pytest.raises(TokenRevoked):
        verifier.verify(cred.token, audience="api")
    issuer.close()
    verifier.close()


def test_async_broker_runs_the_store_in_threads(path: Path) -> None:
    async def main() -> None:
        async with AsyncBroker(keys=KeyRing.generate("EdDSA"), store=SQLiteStore(path)) as broker:
            creds = await asyncio.gather(*(broker.issue("svc:a", "api", ttl=60) for _ in range(20)))
            assert await broker.revoke(creds[0]) is True
            claims = await broker.verify(creds[1].token, audience="api")
            assert claims.lease_id == creds[1].lease_id

    asyncio.run(main())
    store = SQLiteStore(path)
    assert len(store.find(LeaseFilter())) == 20
    store.close()


def test_task_leases_are_stored_for_ttl_plus_retention(path: Path) -> None:
    """docs/stores.md, Sizing: every task revokes its lease at once, yet each
    record stays until exp + max(leeway, retention), so a steady stream of R
    tasks a second keeps about R x (T + max(leeway, retention)) records."""
    doc = (Path(__file__).parent.parent / "docs" / "stores.md").read_text()
    assert "R x (T + max(leeway, retention)) records" in doc
    rate, ttl, leeway, retention = 5, 60, 5, 30
    clock = FakeClock(T0)
    broker = Broker(
        keys=KeyRing.generate(),
        store=SQLiteStore(path),
        clock=clock,
        leeway=leeway,
        retention=retention,
    )
    for _ in range(2 * (ttl + retention)):  # past the first purges: steady state
        for _ in range(rate):
            with broker.task("t", subject="svc:a", audience="api", ttl=ttl):
                pass
        clock.advance(1)
        broker.sweep()
    stored = len(broker.store.find(LeaseFilter()))
    assert abs(stored - rate * (ttl + max(leeway, retention))) <= 2 * rate
    # None is active, so the old formula, N + R x (leeway + retention), said 175.
    assert not list(broker.leases())
    broker.close()
