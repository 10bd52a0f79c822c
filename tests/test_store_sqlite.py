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
from contextlib import closing
from pathlib import Path
from typing import Any

import attrs
import pytest

from jitbroker import AsyncBroker, Broker, KeyRing
from jitbroker.audit import AuditEvent
from jitbroker.errors import InvalidRequest, StoreError, StoreUnavailable, TokenRevoked
from jitbroker.lease import Lease
from jitbroker.stores import sqlite as sqlite_module
from jitbroker.stores.base import LeaseFilter
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


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
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
