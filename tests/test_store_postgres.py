"""``PostgresStore`` beyond the conformance suite: its schema and migrations, the
locks that keep concurrent callers honest (driven step by step from a second
connection), the revocation channel, error translation, its connection pool,
several processes reaping one store, and a private PostgreSQL server stopped
and restarted under a live store.

The shared server is the one CI starts at 127.0.0.1:5432; every test works in a
random schema (``jbtest_<hex>``) and drops it at the end. Waits are short polls.
"""

from __future__ import annotations

import json
import os
import pwd
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from glob import glob
from pathlib import Path
from typing import Any, LiteralString
from uuid import uuid4

import attrs
import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from conftest import server_or_skip
from jitbroker import Broker, Verifier
from jitbroker.errors import InvalidRequest, QuotaExceeded, StoreError, StoreUnavailable
from jitbroker.lease import Lease
from jitbroker.stores import postgres as postgres_module
from jitbroker.stores import postgres_outbox
from jitbroker.stores.base import NO_OUTBOX, Job, LeaseFilter, Outbox, Quota, event_jobs, job_id
from jitbroker.stores.codec import COLUMNS, to_mapping, to_row
from jitbroker.stores.postgres import SCHEMA_VERSION, PostgresStore
from jitbroker.stores.postgres_outbox import read_job
from jitbroker.testing import TEST_ISSUER

DSN = "postgresql://postgres@127.0.0.1:5432/test"
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
POLL = 0.01
POLL_LIMIT = 5.0
ROOT = Path(__file__).resolve().parent.parent


def make(lease_id: str, *, at: float = T0, ttl: float = 60.0, **fields: Any) -> Lease:
    values: dict[str, Any] = {"subject": "svc:a", "audience": "api", "scopes": ("read",)}
    values.update(fields)
    return Lease(id=lease_id, issued_at=at, expires_at=at + ttl, max_expires_at=at + 3600, **values)


def ids(leases: list[Lease]) -> set[str]:
    return {lease.id for lease in leases}


def poll(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + POLL_LIMIT
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)
    return True


def poll_long(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + 20
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)
    return True


def new_schema() -> str:
    return f"jbtest_{uuid4().hex}"


@pytest.fixture
def admin() -> Iterator[psycopg.Connection[Any]]:
    """A plain autocommit connection to the shared server, to look and to poke."""
    server_or_skip("PostgreSQL", "127.0.0.1", 5432)
    with psycopg.connect(DSN, autocommit=True) as conn:
        yield conn


@pytest.fixture
def new_store(admin: psycopg.Connection[Any]) -> Iterator[Callable[..., PostgresStore]]:
    """Builds stores in fresh random schemas; drops every schema at the end.

    Each store gets its own ``application_name`` (its schema name), so a test
    can find that store's sessions in ``pg_stat_activity``.
    """
    made: list[PostgresStore] = []

    def build(dsn_or_pool: Any = None, **options: Any) -> PostgresStore:
        schema = options.setdefault("schema", new_schema())
        store = PostgresStore(dsn_or_pool or f"{DSN}?application_name={schema}", **options)
        made.append(store)
        return store

    yield build
    for store in made:
        store.close()
    for schema in {store.schema for store in made}:
        admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def store(new_store: Callable[..., PostgresStore]) -> PostgresStore:
    return new_store()


def table(store: PostgresStore) -> sql.Composed:
    return sql.SQL("{}.leases").format(sql.Identifier(store.schema))


def lock_row(store: PostgresStore, lease_id: str, mode: LiteralString) -> sql.Composed:
    """A statement that locks the lease's row (in the caller's transaction)."""
    query = sql.SQL("SELECT 1 FROM {} WHERE id = {} {}")
    return query.format(table(store), sql.Literal(lease_id), sql.SQL(mode))


def sessions(admin: psycopg.Connection[Any], store: PostgresStore, *, waiting: bool) -> int:
    """How many of the store's sessions exist (or wait for a lock, if ``waiting``)."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
    if waiting:
        query += " AND wait_event_type = 'Lock'"
    row = admin.execute(query, (store.schema,)).fetchone()
    assert row is not None
    return int(row[0])


class Background:
    """Runs ``fn`` in a thread at once; ``result`` joins it and returns or raises."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._outcome: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(fn,))
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._outcome["result"] = fn()
        except Exception as exc:
            self._outcome["error"] = exc

    def result(self) -> Any:
        self._thread.join(timeout=10)
        assert not self._thread.is_alive()
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["result"]


# -- construction -----------------------------------------------------------
@pytest.mark.parametrize(
    "schema",
    ["", "Upper", "1abc", "a-b", "with space", 'x"; DROP TABLE y; --', "pg_catalog", "a" * 56],
)
def test_the_schema_name_must_be_a_plain_identifier(schema: str) -> None:
    with pytest.raises(InvalidRequest):
        PostgresStore(DSN, schema=schema)  # refused before any I/O


@pytest.mark.parametrize(("size", "timeout"), [(0, 1.0), (1, 0.0), (1, float("nan"))])
def test_pool_settings_must_make_sense(size: int, timeout: float) -> None:
    with pytest.raises(InvalidRequest):
        PostgresStore(DSN, pool_size=size, pool_timeout=timeout)


def test_a_bad_dsn_is_refused_without_echoing_it() -> None:
    with pytest.raises(InvalidRequest) as info:
        PostgresStore("host=db password=hunter2 nonsense")
    assert "hunter2" not in str(info.value)
    assert info.value.__cause__ is None


@pytest.mark.parametrize(
    ("dsn", "problem"),
    [
        ("postgresql://postgres:hunter2@127.0.0.1:abc/test", "port"),
        ("postgresql://postgres:hunter2@127.0.0.1:99999/test", "port"),
        ("host=a,b port=5432,0 password=hunter2", "port"),
        ("postgresql://postgres:hunter2@127.0.0.1/test?connect_timeout=soon", "connect_timeout"),
    ],
)
def test_a_bad_port_or_timeout_is_refused_before_connecting(dsn: str, problem: str) -> None:
    # Not a StoreUnavailable after a failed connection: nothing to retry.
    with pytest.raises(InvalidRequest, match=problem) as info:
        PostgresStore(dsn)
    assert "hunter2" not in str(info.value)


def test_repr_never_shows_the_dsn(new_store: Callable[..., PostgresStore]) -> None:
    store = new_store("postgresql://postgres:hunter2@127.0.0.1:5432/test", schema="jbtest_repr")
    assert repr(store) == "<PostgresStore schema='jbtest_repr'>"
    assert store.blocking is True


def test_lazy_export() -> None:
    import jitbroker.stores

    assert jitbroker.stores.PostgresStore is PostgresStore
    assert "PostgresStore" not in jitbroker.stores.__all__  # `import *` never needs psycopg


def test_jitbroker_imports_without_psycopg() -> None:
    code = """if True:
        import sys

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name == "psycopg" or name.startswith("psycopg."):
                    raise ImportError("psycopg is not installed")

        sys.meta_path.insert(0, Blocker())
        import jitbroker, jitbroker.stores
        assert not [name for name in sys.modules if name.startswith("psycopg")]
        try:
            jitbroker.stores.PostgresStore
        except ImportError:
            print("ok")
    """
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert result.stdout.strip() == "ok", result.stderr


# -- schema and migrations ----------------------------------------------------
def test_the_table_holds_every_lease_field(
    admin: psycopg.Connection[Any], store: PostgresStore
) -> None:
    # A field added to Lease needs a migration adding its column: this says so.
    rows = admin.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = 'leases'",
        (store.schema,),
    ).fetchall()
    usage = {"last_used_at", "use_count", "used_by"}  # version 9: lease usage (not in Lease)
    assert {row[0] for row in rows} == {*COLUMNS, "claimed", "revoke_seq", *usage}


def test_the_indexes(admin: psycopg.Connection[Any], store: PostgresStore) -> None:
    rows = admin.execute(
        "SELECT indexname FROM pg_indexes WHERE schemaname = %s AND tablename = 'leases'",
        (store.schema,),
    ).fetchall()
    assert {row[0] for row in rows} == {
        "leases_pkey",
        *(f"leases_{name}" for name in ("task", "parent", "owner", "subject", "key_id")),
        "leases_dead",
        "leases_live_subject",  # version 3: quota counts
        "leases_issuer",  # version 4: revoke_where(issuer=...)
        "leases_task_run",  # version 4: a task's exit
        "leases_claim",  # version 4: claims by expire_hooks (was leases_due)
        "leases_revoke_seq",  # version 5: the revocation log
        "leases_provider",  # version 7: revoke_where(provider=...)
    }
    rows = admin.execute(
        "SELECT indexname FROM pg_indexes WHERE schemaname = %s AND tablename = 'jobs'",
        (store.schema,),
    ).fetchall()
    assert {row[0] for row in rows} == {"jobs_pkey", "jobs_claim", "jobs_parked"}  # version 7


def test_the_version_is_recorded(admin: psycopg.Connection[Any], store: PostgresStore) -> None:
    query = sql.SQL("SELECT version FROM {}.jitbroker_meta").format(sql.Identifier(store.schema))
    assert admin.execute(query).fetchall() == [(SCHEMA_VERSION,)]


def epoch_of(admin: psycopg.Connection[Any], schema: str) -> float:
    query = sql.SQL("SELECT epoch FROM {}.jitbroker_meta").format(sql.Identifier(schema))
    row = admin.execute(query).fetchone()
    assert row is not None
    return float(row[0])


def test_a_new_schema_starts_an_epoch_and_a_truncate_a_new_one(
    admin: psycopg.Connection[Any], new_store: Callable[..., PostgresStore]
) -> None:
    before = time.time()
    store = new_store()
    epoch = epoch_of(admin, store.schema)
    assert before - 1 <= epoch <= time.time() + 1  # the server's time, not a lease's
    store.add(make("a"))
    new_store(schema=store.schema)  # reopening keeps it
    assert epoch_of(admin, store.schema) == epoch
    admin.execute(sql.SQL("TRUNCATE {}").format(table(store)))
    assert epoch_of(admin, store.schema) > epoch


def test_a_version_1_schema_is_migrated_and_starts_an_epoch(
    admin: psycopg.Connection[Any], new_store: Callable[..., PostgresStore]
) -> None:
    store = new_store()
    store.add(make("a"))
    schema = sql.Identifier(store.schema)
    for statement in (  # back to what version 1 created
        "DROP FUNCTION {}.jitbroker_revoke",  # version 7 (and 6)
        "DROP FUNCTION {}.jitbroker_event_jobs",
        "DROP TABLE {}.jobs",
        "ALTER TABLE {}.leases DROP COLUMN provider",  # and its index
        "DROP FUNCTION {}.jitbroker_read_committed",
        "DROP TABLE {}.caches",
        "ALTER TABLE {}.leases DROP COLUMN revoke_seq",  # and its index
        "ALTER TABLE {}.jitbroker_meta DROP COLUMN revoke_seq",
        "ALTER TABLE {}.leases DROP COLUMN issuer",  # version 4, and their indexes
        "ALTER TABLE {}.leases DROP COLUMN task_run",
        "DROP INDEX {}.leases_claim",
        "ALTER TABLE {}.leases DROP COLUMN expire_hooks",
        "CREATE INDEX leases_due ON {}.leases (expires_at)"
        " WHERE revoked_at IS NULL AND NOT claimed",
        "DROP INDEX {}.leases_live_subject",
        "DROP TRIGGER leases_truncated ON {}.leases",
        "DROP FUNCTION {}.jitbroker_new_epoch()",
        "ALTER TABLE {}.jitbroker_meta DROP COLUMN epoch",
        "UPDATE {}.jitbroker_meta SET version = 1",
    ):
        admin.execute(sql.SQL(statement).format(schema))
    before = time.time()
    again = new_store(schema=store.schema)
    assert again.get("a") == make("a")
    assert epoch_of(admin, store.schema) >= before - 1
    query = sql.SQL("SELECT version FROM {}.jitbroker_meta").format(schema)
    assert admin.execute(query).fetchall() == [(SCHEMA_VERSION,)]


def test_reopening_keeps_the_data(new_store: Callable[..., PostgresStore]) -> None:
    first = new_store()
    assert first.add(make("a")) is True
    again = new_store(schema=first.schema)
    assert again.get("a") == make("a")


def test_concurrent_openers_of_a_new_schema_all_succeed(
    new_store: Callable[..., PostgresStore],
) -> None:
    schema, count = new_schema(), 6
    barrier = threading.Barrier(count)
    errors: list[Exception] = []

    def open_store() -> None:
        barrier.wait()
        try:
            store = new_store(schema=schema)
        except Exception as exc:
            errors.append(exc)
            return
        store.add(make(f"by-{threading.get_ident()}"))

    threads = [threading.Thread(target=open_store) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert len(new_store(schema=schema).find(LeaseFilter())) == count


def test_a_newer_schema_is_refused(
    admin: psycopg.Connection[Any], new_store: Callable[..., PostgresStore]
) -> None:
    store = new_store()
    admin.execute(
        sql.SQL("UPDATE {}.jitbroker_meta SET version = %s").format(sql.Identifier(store.schema)),
        (SCHEMA_VERSION + 1,),
    )
    with pytest.raises(StoreError, match="newer") as info:
        new_store(schema=store.schema)
    assert not isinstance(info.value, StoreUnavailable)


def test_clear_drops_the_schema(admin: psycopg.Connection[Any], store: PostgresStore) -> None:
    store.add(make("a"))
    store.clear()
    row = admin.execute(
        "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (store.schema,)
    ).fetchone()
    assert row == (0,)
    with pytest.raises(StoreError) as info:  # the table is gone: an error, not an outage
        store.get("a")
    assert not isinstance(info.value, StoreUnavailable)
    assert isinstance(info.value.__cause__, psycopg.Error)


# -- values -------------------------------------------------------------------
def test_floats_round_trip_exactly(store: PostgresStore) -> None:
    issued, expires, at = T0 + 0.1 + 1e-7, T0 + 1 / 3, T0 + 0.2 + 3e-7
    lease = make("a", at=issued, ttl=expires - issued)
    assert store.add(lease) is True
    extended = store.extend("a", expires_at=T0 + 2 / 3, at=at)
    assert extended is not None
    assert extended.expires_at == T0 + 2 / 3
    (revoked,) = store.revoke("a", at=at, reason="x")
    assert (
        store.get("a")
        == revoked
        == attrs.evolve(lease, expires_at=T0 + 2 / 3, revoked_at=at, revoke_reason="x")
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_times_are_refused_before_any_io(store: PostgresStore, bad: float) -> None:
    calls: list[Callable[[], object]] = [
        lambda: store.add(make("a", ttl=bad)),
        lambda: store.add(make("b", at=bad)),
        lambda: store.revoke("a", at=bad, reason="x"),
        lambda: store.revoke_where(LeaseFilter(task="t"), at=bad, reason="x"),
        lambda: store.extend("a", expires_at=bad, at=T0),
        lambda: store.extend("a", expires_at=T0, at=bad),
        lambda: store.claim_expired(bad),
        lambda: store.purge(bad),
    ]
    for call in calls:
        with pytest.raises(InvalidRequest):
            call()
    assert store.find(LeaseFilter()) == []


def test_an_id_stored_again_replaces_the_old_row_whole(store: PostgresStore) -> None:
    store.add(make("a", task="old", ttl=1))
    assert ids(store.claim_expired(T0 + 1)) == {"a"}
    renewed = make("a", task="new", ttl=10)
    assert store.add(renewed) is True
    assert store.get("a") == renewed
    assert store.find(LeaseFilter(task="old")) == []
    assert store.claim_expired(T0 + 10) == [renewed]  # no longer marked claimed


def test_a_corrupt_row_is_a_store_error(
    admin: psycopg.Connection[Any], store: PostgresStore
) -> None:
    store.add(make("a"))
    admin.execute(sql.SQL("UPDATE {} SET subject = '' WHERE id = 'a'").format(table(store)))
    with pytest.raises(StoreError):
        store.get("a")


def test_limit_zero_claims_nothing(store: PostgresStore) -> None:
    store.add(make("a", ttl=1))
    assert store.claim_expired(T0 + 10, limit=0) == []
    assert ids(store.claim_expired(T0 + 10, limit=1)) == {"a"}


# -- atomicity under contention, one step at a time -------------------------
def test_revoke_takes_a_child_committed_while_it_waited(
    admin: psycopg.Connection[Any], store: PostgresStore
) -> None:
    # Another broker's add is halfway: it holds the parent FOR SHARE and has
    # inserted the child, not yet committed. The revoke must wait for it and
    # then take the child too, although its first snapshot could not see it.
    parent = make("parent", task="t")
    child = make("child", at=T0 + 1, ttl=30, parent="parent", task="t")
    store.add(parent)
    columns = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
    values = sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS))
    with admin.transaction():
        admin.execute(lock_row(store, "parent", "FOR SHARE"))
        admin.execute(
            sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(table(store), columns, values),
            to_row(child),
        )
        revoke = Background(lambda: store.revoke("parent", at=T0 + 5, reason="x"))
        assert poll(lambda: sessions(admin, store, waiting=True) == 1)
    assert ids(revoke.result()) == {"parent", "child"}
    got = store.get("child")
    assert got is not None
    assert got.revoked_at == T0 + 5


def test_add_refuses_a_child_of_a_parent_revoked_while_it_waited(
    admin: psycopg.Connection[Any], store: PostgresStore
) -> None:
    store.add(make("parent"))
    child = make("child", at=T0 + 1, ttl=30, parent="parent")
    with admin.transaction():
        admin.execute(
            sql.SQL("UPDATE {} SET revoked_at = %s WHERE id = 'parent'").format(table(store)),
            (T0 + 1,),
        )
        add = Background(lambda: store.add(child))
        assert poll(lambda: sessions(admin, store, waiting=True) == 1)
    assert add.result() is False
    assert store.get("child") is None


def test_claim_skips_rows_locked_by_another_reaper(
    admin: psycopg.Connection[Any], store: PostgresStore
) -> None:
    store.add(make("a", ttl=1))
    store.add(make("b", ttl=2))
    with admin.transaction():
        admin.execute(lock_row(store, "a", "FOR UPDATE"))
        assert ids(store.claim_expired(T0 + 10)) == {"b"}  # does not wait for "a"
    assert ids(store.claim_expired(T0 + 10)) == {"a"}


def test_separate_stores_claim_disjoint_leases(new_store: Callable[..., PostgresStore]) -> None:
    first = new_store()
    second = new_store(schema=first.schema)
    for i in range(10):
        first.add(make(f"l{i}", ttl=1 + i))
    batches = [store.claim_expired(T0 + 100, limit=3) for store in (first, second) * 3]
    claimed = [lease.id for batch in batches for lease in batch]
    assert sorted(claimed) == sorted(f"l{i}" for i in range(10))


CLAIMER = """if True:
    import json, os, sys, time
    from jitbroker.stores.postgres import PostgresStore

    dsn, schema, ready, go, now = sys.argv[1:6]
    store = PostgresStore(dsn, schema=schema)
    open(ready, "w").close()
    while not os.path.exists(go):
        time.sleep(0.005)
    claimed = []
    while batch := store.claim_expired(float(now), limit=5):
        claimed += [lease.id for lease in batch]
    store.close()
    print(json.dumps(claimed))
"""


def test_claim_expired_is_exactly_once_across_processes(
    store: PostgresStore, tmp_path: Path
) -> None:
    count, workers = 400, 4
    for i in range(count):
        store.add(make(f"l{i:03}", ttl=1 + i % 11))
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-c", CLAIMER, DSN, store.schema]
    procs = [
        subprocess.Popen(
            [*command, str(tmp_path / f"ready{n}"), str(go), str(T0 + 100)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for n in range(workers)
    ]
    try:
        assert poll(lambda: all((tmp_path / f"ready{n}").exists() for n in range(workers)))
        go.touch()
        outputs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    claimed = [lease_id for out, _ in outputs for lease_id in json.loads(out)]
    assert len(claimed) == count
    assert set(claimed) == {f"l{i:03}" for i in range(count)}


# -- the revocation channel ---------------------------------------------------
@pytest.fixture
def listener(store: PostgresStore) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(store.channel)))
        yield conn


def heard(conn: psycopg.Connection[Any], want: int) -> list[str]:
    """The payloads announced until ``want`` of them arrived (or a 5 s timeout)."""
    got: list[str] = []
    for notify in conn.notifies(timeout=POLL_LIMIT):
        got.append(notify.payload)
        if len(got) >= want:
            break
    return got


def numbered(admin: psycopg.Connection[Any], store: PostgresStore) -> dict[str, int]:
    query = sql.SQL("SELECT id, revoke_seq FROM {} WHERE revoke_seq IS NOT NULL")
    return dict(admin.execute(query.format(table(store))).fetchall())


def test_revocations_are_numbered_and_announced(
    admin: psycopg.Connection[Any], store: PostgresStore, listener: psycopg.Connection[Any]
) -> None:
    assert store.channel == f"{store.schema}_revoked"
    store.add(make("root"))
    store.add(make("child", at=T0 + 1, parent="root"))
    store.add(make("other"))
    assert store.revoke("nope", at=T0 + 2, reason="x") == []  # nothing revoked, nothing said
    store.revoke("root", at=T0 + 2, reason="x")
    store.revoke("other", at=T0 + 2, reason="x")
    # The payload is only the number (a wake-up call); the ids are in the table.
    assert heard(listener, 2) == ["1", "2"]
    assert numbered(admin, store) == {"root": 1, "child": 1, "other": 2}


def test_a_big_revocation_is_one_number_and_one_notification(
    admin: psycopg.Connection[Any], store: PostgresStore, listener: psycopg.Connection[Any]
) -> None:
    leases = [make(uuid4().hex, task="big") for _ in range(600)]  # ~21 kB of ids
    for lease in leases:
        store.add(lease)
    assert len(store.revoke_where(LeaseFilter(task="big"), at=T0 + 1, reason="x")) == 600
    assert heard(listener, 1) == ["1"]
    assert numbered(admin, store) == {lease.id: 1 for lease in leases}


# -- the outbox (schema version 7) ----------------------------------------------
HOOKS = Outbox(hooks=("app.a", "app.b"), providers=frozenset({"db"}), claim="c1", until=T0 + 30)


def jobs_table(store: PostgresStore) -> sql.Composed:
    return sql.SQL("{}.jobs").format(sql.Identifier(store.schema))


def test_a_version_6_schema_is_migrated_keeping_leases_and_adding_jobs(
    admin: psycopg.Connection[Any], new_store: Callable[..., PostgresStore]
) -> None:
    # Built as version 6 left it, with a revocation numbered by its own
    # jitbroker_revoke: the leases stay, the numbering goes on, jobs start.
    schema = new_schema()
    statements = postgres_module._Statements(schema)
    for statement in postgres_module._BOOTSTRAP:
        admin.execute(statements.compose(statement))
    for migration in postgres_module._MIGRATIONS[:6]:
        for statement in migration:
            admin.execute(statements.compose(statement))
    admin.execute(statements.compose(postgres_module._SET_VERSION), (6,))
    old = [c for c in COLUMNS if c != "provider"]
    insert = sql.SQL("INSERT INTO {}.leases ({}) VALUES ({})").format(
        sql.Identifier(schema),
        sql.SQL(", ").join(map(sql.Identifier, old)),
        sql.SQL(", ").join(sql.Placeholder() * len(old)),
    )
    leases = [make("a", task="t"), make("b", at=T0 + 1, parent="a", task="t"), make("gone")]
    for lease in leases:
        row = zip(COLUMNS, to_row(lease), strict=True)
        admin.execute(insert, [value for column, value in row if column != "provider"])
    v6_revoke = sql.SQL("SELECT count(*) FROM {}.jitbroker_revoke(ARRAY['gone'], %s, 'x', %s, 0)")
    assert admin.execute(
        v6_revoke.format(sql.Identifier(schema)), (T0 + 2, f"{schema}_revoked")
    ).fetchone() == (1,)
    store = new_store(schema=schema)
    query = sql.SQL("SELECT version FROM {}.jitbroker_meta").format(sql.Identifier(schema))
    assert admin.execute(query).fetchall() == [(SCHEMA_VERSION,)] == [(9,)]
    assert store.get("a") == leases[0]
    assert store.get("a").provider is None  # type: ignore[union-attr]
    assert store.get("gone").revoked_at == T0 + 2  # type: ignore[union-attr]
    assert store.jobs() == []
    revoked = store.revoke("a", at=T0 + 3, reason="x", outbox=HOOKS)
    assert ids(revoked) == {"a", "b"}
    want = [job for lease in revoked for job in event_jobs("on_revoke", lease, HOOKS, T0 + 3)]
    assert sorted(store.jobs(), key=lambda j: j.id) == sorted(want, key=lambda j: j.id)
    assert numbered(admin, store) == {"gone": 1, "a": 2, "b": 2}
    functions = admin.execute(
        "SELECT count(*) FROM pg_proc WHERE proname = 'jitbroker_revoke'"
        " AND pronamespace = %s::regnamespace",
        (schema,),
    ).fetchone()
    assert functions == (1,)  # version 6's signature went: no ambiguous call


EVENT_CASES = [
    ("on_issue", {}, NO_OUTBOX),
    ("on_issue", {"provider": "db"}, NO_OUTBOX),
    ("on_issue", {"provider": "db"}, attrs.evolve(HOOKS, limit=3)),
    ("on_issue", {"provider": "db"}, attrs.evolve(HOOKS, providers=frozenset({"other"}))),
    ("on_revoke", {"provider": "db"}, Outbox(hooks=("app.a",))),  # unclaimed hooks
    ("on_revoke", {"expire_hooks": "x"}, HOOKS),  # expire_hooks are not revoke hooks
    ("on_expire", {"expire_hooks": " x  y ", "provider": "db"}, Outbox(claim="c", until=T0 + 9)),
    ("on_expire", {"expire_hooks": ""}, HOOKS),  # the outbox's hooks are not expire hooks
    ("on_expire", {"provider": "db"}, HOOKS),
    ("on_expire", {}, NO_OUTBOX),
]


@pytest.mark.parametrize(("event", "fields", "outbox"), EVENT_CASES)
def test_jitbroker_event_jobs_is_event_jobs(
    admin: psycopg.Connection[Any],
    store: PostgresStore,
    event: str,
    fields: dict[str, Any],
    outbox: Outbox,
) -> None:
    # The SQL twin of stores.base.event_jobs (revoke and claim_expired write its
    # rows server-side) gives the same jobs, field for field.
    store.add(make("a", **fields))
    lease = store.get("a")
    assert lease is not None
    query = sql.SQL(
        "SELECT * FROM {schema}.jitbroker_event_jobs(%s, ARRAY(SELECT l FROM {schema}.leases AS l),"
        " %s, %s::text[], %s::text[], %s::text, %s::float8, %s::int)"
    ).format(schema=sql.Identifier(store.schema))
    args = (event, T0 + 5, list(outbox.hooks), sorted(outbox.providers), outbox.claim)
    rows = admin.execute(query, (*args, outbox.until, outbox.limit)).fetchall()
    got = [read_job((*row[:6], 0, "", False, row[6])) for row in rows]
    want = event_jobs(event, lease, outbox, T0 + 5)
    assert sorted(got, key=lambda j: j.id) == sorted(want, key=lambda j: j.id)


def test_events_write_their_jobs_as_event_jobs_says(store: PostgresStore) -> None:
    # Through the store: add (event_jobs in Python), revoke and claim_expired
    # (the SQL twin), with and without an outbox; the snapshot keeps odd floats.
    issued = T0 + 0.1 + 1e-7
    first = make("a", at=issued, ttl=1 / 3, provider="db", expire_hooks="x")
    second = make("b", provider="db")
    third = make("c", at=T0 + 1, parent="b", expire_hooks="x y")
    assert store.add(first, outbox=HOOKS) is True
    assert store.add(second) is True
    assert store.add(third, [Quota(subject="svc:a", owner=None, limit=9)], outbox=HOOKS) is True
    want = [
        *event_jobs("on_issue", first, HOOKS, issued),
        *event_jobs("on_issue", second, NO_OUTBOX, T0),
        *event_jobs("on_issue", third, HOOKS, T0 + 1),
    ]
    revoked = store.revoke("b", at=T0 + 2, reason="x")
    assert ids(revoked) == {"b", "c"}
    assert attrs.evolve(second, revoked_at=T0 + 2, revoke_reason="x") in revoked
    for lease in revoked:  # c has no provider and NO_OUTBOX no hooks: b's revoke only
        want += event_jobs("on_revoke", lease, NO_OUTBOX, T0 + 2)
    outbox = Outbox(providers=frozenset({"db"}), claim="r", until=T0 + 50, limit=7)
    (claimed,) = store.claim_expired(T0 + 10, expire_hooks=("x",), outbox=outbox)
    assert claimed == first
    want += event_jobs("on_expire", first, outbox, T0 + 10)
    assert sorted(store.jobs(), key=lambda j: j.id) == sorted(want, key=lambda j: j.id)
    job = store.get_job(job_id("a", "on_expire", "x"))
    assert job is not None
    assert job.lease == first
    assert job.lease.issued_at == issued


def test_an_add_stored_again_keeps_its_jobs(store: PostgresStore) -> None:
    lease = make("a", provider="db")
    assert store.add(lease, outbox=HOOKS) is True
    before = store.jobs()
    assert store.add(attrs.evolve(lease, task="again"), outbox=attrs.evolve(HOOKS, claim="c2"))
    assert store.jobs() == before  # insert if absent: a job id present is kept as it is


@pytest.mark.parametrize("count", [1, 2, 40])
def test_an_add_with_any_number_of_jobs_is_one_statement(store: PostgresStore, count: int) -> None:
    # One add statement per job count, kept for the small counts; a hook named
    # twice is one job (insert if absent, within the statement too).
    hooks = tuple(f"app.h{i}" for i in range(count))
    outbox = Outbox(hooks=(*hooks, hooks[0]), claim="c", until=T0 + 9)
    assert store.add(make("a"), outbox=outbox) is True
    assert store.add(make("b"), outbox=outbox) is True
    assert len(store.jobs()) == 2 * count
    assert {j.name for j in store.jobs()} == set(hooks)


def test_a_revoke_takes_a_late_child_with_its_jobs(
    admin: psycopg.Connection[Any], store: PostgresStore
) -> None:
    # As test_revoke_takes_a_child_committed_while_it_waited: the child the
    # second pass finds gets its jobs in the same transaction.
    store.add(make("parent", provider="db"))
    child = make("child", at=T0 + 1, ttl=30, parent="parent", provider="db")
    columns = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
    values = sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS))
    with admin.transaction():
        admin.execute(lock_row(store, "parent", "FOR SHARE"))
        admin.execute(
            sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(table(store), columns, values),
            to_row(child),
        )
        revoke = Background(lambda: store.revoke("parent", at=T0 + 5, reason="x", outbox=HOOKS))
        assert poll(lambda: sessions(admin, store, waiting=True) == 1)
    assert ids(revoke.result()) == {"parent", "child"}
    revoke_jobs = {j.id for j in store.jobs() if j.event != "create"}
    assert revoke_jobs == {
        job_id(lease, event, name)
        for lease in ("parent", "child")
        for event, name in (("on_revoke", "app.a"), ("on_revoke", "app.b"), ("revoke", "db"))
    }


def test_a_revoke_with_jobs_is_still_numbered_and_announced(
    admin: psycopg.Connection[Any], store: PostgresStore, listener: psycopg.Connection[Any]
) -> None:
    store.add(make("a"))
    store.add(make("b", provider="db"))
    store.revoke("a", at=T0 + 1, reason="x", outbox=HOOKS)
    store.revoke_where(LeaseFilter(provider="db"), at=T0 + 1, reason="x")
    assert heard(listener, 2) == ["1", "2"]
    assert numbered(admin, store) == {"a": 1, "b": 2}
    assert {j.id for j in store.jobs()} == {
        "a/on_revoke/app.a",
        "a/on_revoke/app.b",
        "b/create/db",
        "b/revoke/db",
    }


def queue_jobs(
    admin: psycopg.Connection[Any], store: PostgresStore, count: int, name: str = "h"
) -> set[str]:
    """``count`` unclaimed jobs of kind ``on_revoke:<name>``, due at T0 (written directly)."""
    query = sql.SQL(
        "INSERT INTO {} (id, event, name, lease, due, attempt_limit)"
        " SELECT 'l' || i || '/on_revoke/' || %(name)s, 'on_revoke', %(name)s, %(lease)s::jsonb,"
        " %(due)s, 5 FROM generate_series(1, %(count)s) AS i"
    ).format(jobs_table(store))
    lease = json.dumps(to_mapping(make("l")))
    admin.execute(query, {"name": name, "lease": lease, "due": T0, "count": count})
    return {f"l{i}/on_revoke/{name}" for i in range(1, count + 1)}


def test_claim_jobs_skips_jobs_locked_by_another_claimer(
    admin: psycopg.Connection[Any], store: PostgresStore
) -> None:
    queue_jobs(admin, store, 2)
    lock = sql.SQL("SELECT 1 FROM {} WHERE id = 'l1/on_revoke/h' FOR UPDATE")
    with admin.transaction():
        admin.execute(lock.format(jobs_table(store)))
        got = store.claim_jobs(T0, ["on_revoke:h"], claim="x", until=T0 + 9)
        assert [j.id for j in got] == ["l2/on_revoke/h"]  # did not wait for l1
    got = store.claim_jobs(T0, ["on_revoke:h"], claim="y", until=T0 + 9)
    assert [j.id for j in got] == ["l1/on_revoke/h"]


def test_claim_jobs_from_several_connections_never_hands_a_job_twice(
    admin: psycopg.Connection[Any], new_store: Callable[..., PostgresStore]
) -> None:
    first = new_store(pool_size=2)
    second = new_store(schema=first.schema, pool_size=2)
    every = queue_jobs(admin, first, 300)
    taken: list[list[str]] = [[] for _ in range(4)]
    barrier = threading.Barrier(4)

    def claimer(n: int, store: PostgresStore) -> None:
        barrier.wait()
        while got := store.claim_jobs(T0, ["on_revoke:h"], claim=f"c{n}", until=T0 + 60, limit=4):
            taken[n] += [job.id for job in got]
            assert all(job.claim == f"c{n}" for job in got)

    threads = [threading.Thread(target=claimer, args=(n, (first, second)[n % 2])) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    claimed = [job for batch in taken for job in batch]
    assert len(claimed) == len(set(claimed)) == len(every)
    assert set(claimed) == every
    assert sum(1 for batch in taken if batch) >= 2  # both stores took part
    rows = admin.execute(
        sql.SQL("SELECT claim, count(*) FROM {} GROUP BY claim").format(jobs_table(first))
    ).fetchall()
    assert dict(rows) == {f"c{n}": len(batch) for n, batch in enumerate(taken) if batch}


def plan(admin: psycopg.Connection[Any], query: bytes | sql.Composed, params: Any) -> str:
    """The plan PostgreSQL chooses (EXPLAIN: not run)."""
    text = query if isinstance(query, bytes) else query.as_bytes(admin)
    rows = admin.execute(b"EXPLAIN " + text, params).fetchall()
    return "\n".join(str(row[0]) for row in rows)


def test_claim_jobs_reads_jobs_claim_in_order(
    admin: psycopg.Connection[Any], store: PostgresStore
) -> None:
    # A backlog of due jobs: one range of jobs_claim per kind, in (due, id)
    # order, read only as far as the limit (no sort of every due job).
    queue_jobs(admin, store, 5000)
    queue_jobs(admin, store, 5000, name="other")
    admin.execute(sql.SQL("ANALYZE {}").format(jobs_table(store)))
    params = {"kinds": ["on_revoke:h"], "now": T0, "until": T0 + 9, "claim": "x", "limit": 100}
    shown = plan(admin, store._jobs_sql.claim, params)
    assert "Index Scan using jobs_claim on jobs job" in shown
    assert "Sort Key: job.due" not in shown, shown


def test_the_outbox_statements_are_never_jit_compiled(
    admin: psycopg.Connection[Any], store: PostgresStore
) -> None:
    # Tables without statistics make the planner guess ~1,000s of rows per
    # table; a plan that then passes jit_above_cost compiles on every call.
    limit = admin.execute("SELECT current_setting('jit_above_cost')::float8").fetchone()
    assert limit is not None
    lease = make("a", provider="db")
    outbox = postgres_outbox.outbox_params(HOOKS)
    jobs = event_jobs("on_issue", lease, HOOKS, T0)
    revoke_insert = sql.SQL(
        "INSERT INTO {schema}.jobs (id, event, name, lease, due, attempt_limit, claim)"
        " SELECT * FROM {schema}.jitbroker_event_jobs('on_revoke',"
        " ARRAY(SELECT l FROM {schema}.leases AS l), %(at)s, %(job_hooks)s::text[],"
        " %(job_providers)s::text[], %(job_claim)s::text, %(job_until)s::float8,"
        " %(job_limit)s::int) ON CONFLICT (id) DO NOTHING"  # as in jitbroker_revoke
    ).format(schema=sql.Identifier(store.schema))
    statements: list[tuple[bytes | sql.Composed, Any]] = [
        (store._jobs_sql.add(len(jobs)), (*to_row(lease), *postgres_outbox.add_params(jobs))),
        (revoke_insert, {"at": T0, **outbox}),
        (store._sql.claim_expired, {"now": T0, "limit": 1000, "hooks": [""], **outbox}),
        (
            store._jobs_sql.claim,
            {"kinds": ["a", "b"], "now": T0, "until": T0, "claim": "x", "limit": 100},
        ),
        (store._jobs_sql.parked, {"limit": 1000}),
    ]
    for query, params in statements:
        shown = plan(admin, query, params)
        assert "JIT" not in shown, shown
        top = float(shown.split("cost=")[1].split("..")[1].split(" ")[0])
        assert top < float(limit[0]) / 10, shown


class CountingSource:
    """One autocommit connection lent to a store, counting its round trips as
    benchmarks/run.py does: libpq's trace has one ReadyForQuery per exchange.
    Never prepared (a prepare would add a Parse on a statement's 6th run)."""

    def __init__(self) -> None:
        self.conn = psycopg.connect(DSN, autocommit=True, prepare_threshold=None)
        self.trace = b""

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        yield self.conn

    def round_trips(self, fn: Callable[[], object]) -> int:
        with tempfile.TemporaryFile() as log:
            fd = os.dup(log.fileno())
            self.conn.pgconn.trace(fd)
            self.conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
            try:
                fn()
            finally:
                self.conn.pgconn.untrace()
                os.close(fd)
            log.seek(0)
            self.trace = log.read()
        lines = self.trace.splitlines()
        return sum(line.startswith(b"B\t") and b"\tReadyForQuery" in line for line in lines)


@pytest.fixture
def counting(new_store: Callable[..., PostgresStore]) -> Iterator[CountingSource]:
    if sys.platform != "linux":
        pytest.skip("psycopg supports libpq's trace on Linux only")
    source = CountingSource()
    try:
        yield source
    finally:
        source.conn.close()


def test_round_trips_with_and_without_jobs(
    new_store: Callable[..., PostgresStore], counting: CountingSource
) -> None:
    store = new_store(counting)
    trips = counting.round_trips
    # add: a root lease is one statement, jobs or not; the jobs ride in it.
    assert trips(lambda: store.add(make("a"))) == 1
    assert b"jobs" not in counting.trace  # and without jobs the statement is as before
    assert trips(lambda: store.add(make("b", provider="db"))) == 1
    assert trips(lambda: store.add(make("c"), outbox=HOOKS)) == 1
    # a child (a transaction: lock the parent, insert) costs the same either way
    plain = trips(lambda: store.add(make("d", at=T0 + 1, parent="a")))
    assert trips(lambda: store.add(make("e", at=T0 + 1, parent="a"), outbox=HOOKS)) == plain
    # revoke: BEGIN with the call, then COMMIT, whatever it records
    assert trips(lambda: store.revoke("d", at=T0 + 2, reason="x")) == 2
    assert trips(lambda: store.revoke("a", at=T0 + 2, reason="x", outbox=HOOKS)) == 2
    assert trips(lambda: store.revoke("b", at=T0 + 2, reason="x")) == 2  # its provider's revoke
    where = LeaseFilter(subject="svc:a")
    assert trips(lambda: store.revoke_where(where, at=T0 + 2, reason="x", outbox=HOOKS)) == 2
    # claim_expired: one statement, with the jobs of what it claims
    store.add(make("f", expire_hooks="h", provider="db"))
    store.add(make("g"))
    assert trips(lambda: store.claim_expired(T0 + 100, expire_hooks=("h",), outbox=HOOKS)) == 1
    assert trips(lambda: store.claim_expired(T0 + 100)) == 1
    assert store.get_job("f/on_expire/h") is not None
    # the job calls: one statement each
    kinds = ["on_revoke:app.a", "revoke:db"]
    got: list[Job] = []
    assert (
        trips(lambda: got.extend(store.claim_jobs(T0 + 100, kinds, claim="z", until=T0 + 200))) == 1
    )
    assert got
    assert trips(lambda: store.fail_job(got[0].id, "z", due=T0, error="E", park=True)) == 1
    assert trips(lambda: store.finish_jobs([j.id for j in got[1:]], "z")) == 1
    assert trips(lambda: store.retry_jobs(None, T0)) == 1
    assert trips(lambda: store.claim_jobs(T0, [], claim="z", until=T0)) == 0


def test_a_corrupt_job_is_a_store_error(
    admin: psycopg.Connection[Any], store: PostgresStore
) -> None:
    store.add(make("a", provider="db"))
    for bad in ('"text"', '{"id": ""}'):
        update = sql.SQL("UPDATE {} SET lease = %s::jsonb").format(jobs_table(store))
        admin.execute(update, (bad,))
        with pytest.raises(StoreError):
            store.get_job("a/create/db")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_outbox_times_are_refused_before_any_io(
    store: PostgresStore, bad: float
) -> None:
    calls: list[Callable[[], object]] = [
        lambda: store.add(make("a"), outbox=attrs.evolve(HOOKS, until=bad)),
        lambda: store.revoke("a", at=T0, reason="x", outbox=attrs.evolve(HOOKS, until=bad)),
        lambda: store.claim_expired(T0, outbox=attrs.evolve(HOOKS, until=bad)),
        lambda: store.claim_jobs(bad, ["k"], claim="x", until=T0),
        lambda: store.claim_jobs(T0, ["k"], claim="x", until=bad),
        lambda: store.fail_job("j", "x", due=bad, error="", park=False),
        lambda: store.retry_jobs(None, bad),
    ]
    for call in calls:
        with pytest.raises(InvalidRequest):
            call()
    assert store.find(LeaseFilter()) == []


def test_purge_and_truncate_leave_the_jobs(
    admin: psycopg.Connection[Any], store: PostgresStore
) -> None:
    store.add(make("a", provider="db"))
    store.revoke("a", at=T0 + 1, reason="x")
    assert store.purge(T0 + 1000) == 1
    admin.execute(sql.SQL("TRUNCATE {}").format(table(store)))
    assert {j.id for j in store.jobs()} == {"a/create/db", "a/revoke/db"}


# -- the pool and borrowed pools ------------------------------------------------
def test_close_releases_the_connections_and_a_later_call_reconnects(
    admin: psycopg.Connection[Any], store: PostgresStore
) -> None:
    store.add(make("a"))
    assert sessions(admin, store, waiting=False) >= 1
    store.close()
    assert poll(lambda: sessions(admin, store, waiting=False) == 0)
    store.close()
    assert store.get("a") == make("a")


def test_an_exhausted_pool_is_unavailable(
    admin: psycopg.Connection[Any], new_store: Callable[..., PostgresStore]
) -> None:
    store = new_store(pool_size=1, pool_timeout=0.2)
    store.add(make("a"))
    with admin.transaction():
        admin.execute(lock_row(store, "a", "FOR UPDATE"))
        revoke = Background(lambda: store.revoke("a", at=T0 + 1, reason="x"))
        assert poll(lambda: sessions(admin, store, waiting=True) == 1)
        with pytest.raises(StoreUnavailable, match="pool_size"):
            store.get("a")  # the only connection waits for the lock
    assert ids(revoke.result()) == {"a"}
    assert store.get("a") is not None


def test_a_dead_connection_is_replaced(
    admin: psycopg.Connection[Any], store: PostgresStore
) -> None:
    store.add(make("a"))
    admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
        (store.schema,),
    )
    assert poll(lambda: sessions(admin, store, waiting=False) == 0)
    assert store.get("a") == make("a")  # the idle connection was noticed dead, not used


class BorrowedPool:
    """A stand-in for ``psycopg_pool.ConnectionPool``: one non-autocommit
    connection with a dict row factory, lent under a lock."""

    def __init__(self) -> None:
        self.conn = psycopg.connect(DSN, row_factory=dict_row)
        self.lock = threading.Lock()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self.lock:
            try:
                yield self.conn
            finally:
                if self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    self.conn.rollback()


def test_works_with_a_borrowed_pool(
    admin: psycopg.Connection[Any], new_store: Callable[..., PostgresStore]
) -> None:
    pool = BorrowedPool()
    try:
        store = new_store(pool)
        parent = make("p", task="t")
        assert store.add(parent) is True
        assert store.add(make("c", at=T0 + 1, parent="p", task="t")) is True
        assert store.get("p") == parent
        assert ids(store.find(LeaseFilter(task="t"))) == {"p", "c"}
        assert ids(store.revoke("p", at=T0 + 2, reason="x")) == {"p", "c"}
        # Committed, not left in an open transaction: another session sees it.
        row = admin.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE revoked_at IS NOT NULL").format(table(store))
        ).fetchone()
        assert row == (2,)
        store.close()
        assert not pool.conn.closed  # the pool is the caller's
    finally:
        pool.conn.close()


class SessionPool:
    """A stand-in for ``psycopg_pool.ConnectionPool(configure=...)``: ``size``
    connections whose sessions default to the isolation ``level`` (as a server,
    role or pool setting may), lent one per caller."""

    def __init__(self, level: LiteralString, *, size: int, autocommit: bool, name: str) -> None:
        self.idle: queue.SimpleQueue[psycopg.Connection[Any]] = queue.SimpleQueue()
        self.conns: list[psycopg.Connection[Any]] = []
        for _ in range(size):
            conn = psycopg.connect(DSN, autocommit=True, application_name=name)
            conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL " + level)
            conn.autocommit = autocommit
            self.conns.append(conn)
            self.idle.put(conn)

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        conn = self.idle.get(timeout=10)
        try:
            yield conn
        finally:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.rollback()
            self.idle.put(conn)

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


@contextmanager
def session_pool(
    level: LiteralString, *, size: int = 16, autocommit: bool = True, name: str = "jbtest"
) -> Iterator[SessionPool]:
    pool = SessionPool(level, size=size, autocommit=autocommit, name=name)
    try:
        yield pool
        # Each connection comes back as it was lent: the session default in
        # force, the connection's own isolation_level not changed behind its back.
        for conn in pool.conns:
            assert conn.isolation_level is None
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            with conn.transaction():
                shown = conn.execute("SHOW transaction_isolation").fetchone()
            assert shown == (level.lower(),)
    finally:
        pool.close()


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "pool-transactions"])
@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
def test_a_quota_holds_whatever_the_session_isolation(
    admin: psycopg.Connection[Any],
    new_store: Callable[..., PostgresStore],
    level: LiteralString,
    autocommit: bool,
) -> None:
    # Under REPEATABLE READ the quota's count would see the snapshot its advisory
    # lock took, missing adds committed while it waited (16 of 16 issued);
    # under SERIALIZABLE adds would fail as outages, not as a full quota.
    threads, limit = 16, 3
    quota = Quota(subject="svc:a", owner=None, limit=limit)
    outcomes: list[object] = [None] * threads
    barrier = threading.Barrier(threads)
    with session_pool(level, size=threads, autocommit=autocommit) as pool:
        store = new_store(pool)

        def add(i: int) -> None:
            barrier.wait()
            try:
                outcomes[i] = store.add(make(f"l{i}"), [quota])
            except Exception as exc:
                outcomes[i] = exc

        workers = [threading.Thread(target=add, args=(i,)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=30)
        assert [o for o in outcomes if not isinstance(o, (bool, QuotaExceeded))] == []
        assert outcomes.count(True) == limit
        assert sum(isinstance(o, QuotaExceeded) for o in outcomes) == threads - limit
    row = admin.execute(sql.SQL("SELECT count(*) FROM {}").format(table(store))).fetchone()
    assert row == (limit,)


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "pool-transactions"])
@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
def test_claims_and_revokes_whatever_the_session_isolation(
    new_store: Callable[..., PostgresStore], level: LiteralString, autocommit: bool
) -> None:
    # On an autocommit connection a claim is one statement at the session's
    # level: it refuses (JB001) before reading a row, and runs again in a READ
    # COMMITTED transaction. A revoke begins READ COMMITTED itself.
    with session_pool(level, size=1, autocommit=autocommit) as pool:
        store = new_store(pool)
        store.add(make("a", ttl=10))
        store.add(make("b", ttl=100))
        store.add(make("c", at=T0 + 1, ttl=30, parent="b"))
        assert ids(store.claim_expired(T0 + 20)) == {"a"}
        assert store.claim_expired(T0 + 20) == []
        assert ids(store.revoke("b", at=T0 + 21, reason="x")) == {"b", "c"}
        assert ids(store.revoke_where(LeaseFilter(), at=T0 + 21, reason="x")) == set()
        assert store.purge(T0 + 20) == 1


def test_revoke_takes_a_late_child_whatever_the_session_isolation(
    admin: psycopg.Connection[Any], new_store: Callable[..., PostgresStore]
) -> None:
    # As test_revoke_takes_a_child_committed_while_it_waited, on connections
    # defaulting to REPEATABLE READ: the second pass must see what the first
    # pass's snapshot could not.
    schema = new_schema()
    with session_pool("REPEATABLE READ", size=2, name=schema) as pool:
        store = new_store(pool, schema=schema)
        store.add(make("parent", task="t"))
        child = make("child", at=T0 + 1, ttl=30, parent="parent", task="t")
        columns = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
        values = sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS))
        with admin.transaction():
            admin.execute(lock_row(store, "parent", "FOR SHARE"))
            admin.execute(
                sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(table(store), columns, values),
                to_row(child),
            )
            revoke = Background(lambda: store.revoke("parent", at=T0 + 5, reason="x"))
            assert poll(lambda: sessions(admin, store, waiting=True) == 1)
        assert ids(revoke.result()) == {"parent", "child"}


# -- a private server, stopped and started under a live store -----------------
class PrivateServer:
    """A throwaway PostgreSQL cluster in a temporary directory, on a Unix socket."""

    def __init__(self, bindir: Path, base: Path) -> None:
        self.bindir, self.base, self.data = bindir, base, base / "data"
        self.port = free_port()
        self.dsn = f"host={base} port={self.port} user=postgres dbname=postgres"
        # initdb refuses to run as root: run the server as the postgres user.
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(base, account.pw_uid, account.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]

    def run(self, tool: str, *args: str) -> None:
        command = [*self.prefix, str(self.bindir / tool), *args]
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr

    def init(self) -> None:
        self.run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        settings = f"listen_addresses = ''\nunix_socket_directories = '{self.base}'\n"
        settings += f"port = {self.port}\nfsync = off\n"
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(settings)

    def start(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.base / "log"), "-w", "start")

    def stop(self, mode: str = "immediate") -> None:
        self.run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postgres_bindir() -> Path | None:
    found = shutil.which("initdb")
    candidates = [Path(found).parent] if found else []
    candidates += [Path(p) for p in sorted(glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    return None


@pytest.fixture(scope="module")
def private_server() -> Iterator[PrivateServer]:
    bindir = postgres_bindir()
    problem = None
    if bindir is None:
        problem = "the PostgreSQL server binaries (initdb, pg_ctl) are not installed"
    elif os.geteuid() == 0 and shutil.which("runuser") is None:
        problem = "running as root without runuser to drop to the postgres user"
    if problem is not None or bindir is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{problem}; under CI=true the private server tests must run")
        pytest.skip(str(problem))
    base = Path(tempfile.mkdtemp(prefix="jbpg-"))  # short: a socket path is at most ~100 bytes
    server = PrivateServer(bindir, base)
    try:
        server.init()
        server.start()
        yield server
    finally:
        if server.running():
            server.stop("fast")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def private_store(private_server: PrivateServer) -> Iterator[PostgresStore]:
    store = PostgresStore(private_server.dsn, schema=new_schema())
    yield store
    if not private_server.running():
        private_server.start()
    store.clear()
    store.close()


def test_a_stopped_server_is_unavailable_then_the_same_store_recovers(
    private_server: PrivateServer, private_store: PostgresStore
) -> None:
    store = private_store
    assert store.add(make("before")) is True
    private_server.stop()
    with pytest.raises(StoreUnavailable) as info:
        store.add(make("during"))
    assert isinstance(info.value.__cause__, psycopg.Error)
    with pytest.raises(StoreUnavailable):
        store.get("before")
    calls: list[Callable[[], object]] = [
        lambda: store.revoke("before", at=T0 + 1, reason="x"),
        lambda: store.claim_expired(T0 + 100),
        lambda: store.find(LeaseFilter()),
    ]
    for call in calls:
        with pytest.raises(StoreUnavailable):
            call()
    private_server.start()
    assert store.get("during") is None  # the failed add wrote nothing
    assert store.get("before") == make("before")  # and nothing else happened either
    assert store.add(make("after")) is True
    assert ids(store.find(LeaseFilter())) == {"before", "after"}


def test_idle_connections_survive_a_restart(
    private_server: PrivateServer, private_store: PostgresStore
) -> None:
    store = private_store
    store.add(make("a"))  # leaves a pooled connection to a server about to go away
    private_server.stop()
    private_server.start()
    assert store.get("a") == make("a")  # not a StoreUnavailable from the stale connection


def test_a_transaction_cut_short_writes_nothing(
    private_server: PrivateServer, private_store: PostgresStore
) -> None:
    # The add waits on its parent's lock when the server goes down mid-transaction.
    store = private_store
    store.add(make("parent"))
    child = make("child", at=T0 + 1, parent="parent")
    holder = psycopg.connect(private_server.dsn, autocommit=True)
    try:
        holder.execute("BEGIN")
        holder.execute(lock_row(store, "parent", "FOR UPDATE"))
        add = Background(lambda: store.add(child))
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        assert poll(lambda: holder.execute(waiting).fetchone() == (1,))
        private_server.stop()
        with pytest.raises(StoreUnavailable):
            add.result()
    finally:
        holder.close()
    private_server.start()
    assert store.get("child") is None
    assert store.add(child) is True


def test_a_dead_feed_fails_closed_then_resyncs(
    private_server: PrivateServer, private_store: PostgresStore
) -> None:
    store = private_store
    with psycopg.connect(private_server.dsn, autocommit=True) as conn:  # a store of an hour ago
        meta = sql.SQL("{}.jitbroker_meta").format(sql.Identifier(store.schema))
        conn.execute(sql.SQL("UPDATE {} SET epoch = epoch - 3600").format(meta))
    broker = Broker(issuer=TEST_ISSUER, store=store)
    cred = broker.issue("svc:a", "api", ttl=60)
    cache = store.revocations(max_staleness=0.5, heartbeat=0.1)
    try:
        assert poll(cache.fresh)
        verifier = Verifier(
            broker.jwks(), issuer=TEST_ISSUER, audience="api", store=store, revocations=cache
        )
        private_server.stop()
        assert poll(lambda: not cache.fresh())
        with pytest.raises(StoreUnavailable):
            verifier.verify(cred.token)  # stale cache: asks the store, which is down
        private_server.start()
        # The feed backs off up to 5 s between attempts while the server is down.
        assert poll_long(cache.fresh), "the feed did not resync after a restart"
        assert verifier.verify(cred.token).lease_id == cred.lease_id
        broker.revoke(cred)
        assert poll(lambda: cache.revoked(cred.lease_id))
    finally:
        cache.close()


def test_opening_with_the_server_down_is_unavailable(private_server: PrivateServer) -> None:
    private_server.stop()
    try:
        with pytest.raises(StoreUnavailable):
            PostgresStore(private_server.dsn, schema=new_schema())
    finally:
        private_server.start()
