"""``PostgresStore(timeout=...)``: every call waits a bounded time for PostgreSQL.

The deadline itself (``postgres_pool.deadline``) on slow statements of the
shared server, then the store: calls blocked on a lock, and a private server
frozen with SIGSTOP (which answers nothing: a server-side ``statement_timeout``
could not help), each failing with ``StoreUnavailable`` within the timeout,
and the same store working again once the server thaws.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from conftest import server_or_skip
from jitbroker import Broker
from jitbroker.errors import InvalidRequest, StoreUnavailable
from jitbroker.stores.postgres import PostgresStore
from jitbroker.stores.postgres_pool import (
    DeadlineConnection,
    DeadlineExceeded,
    _connect_timeout,
    _Pool,
    deadline,
)
from jitbroker.stores.url import open_store
from jitbroker.testing import TEST_ISSUER
from test_store_postgres import DSN, T0, PrivateServer, lock_row, make, new_schema, sessions
from test_store_postgres import private_server as private_postgres_server  # noqa: F401

#: Scheduling noise on a loaded two-core machine; a deadline fires within
#: about 0.1 s (psycopg's wake-up interval) of its time.
MARGIN = 0.8


@contextmanager
def took_at_most(seconds: float) -> Iterator[None]:
    start = time.monotonic()
    yield
    elapsed = time.monotonic() - start
    assert elapsed < seconds, f"took {elapsed:.2f}s, more than {seconds}s"


def raised_within(seconds: float, call: Callable[[], object]) -> BaseException | None:
    """What ``call`` raised, asserting it ended within ``seconds``. It runs in a
    thread, so a call that hangs fails the test instead of hanging it (and ends
    once what blocks it, a lock or a freeze, is released)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert outcome, f"still waiting for PostgreSQL after {time.monotonic() - start:.1f}s"
    return outcome[0]


@pytest.fixture
def admin() -> Iterator[psycopg.Connection[Any]]:
    """A plain autocommit connection to the shared server."""
    server_or_skip("PostgreSQL", "127.0.0.1", 5432)
    with psycopg.connect(DSN, autocommit=True) as conn:
        yield conn


@pytest.fixture
def new_store(admin: psycopg.Connection[Any]) -> Iterator[Callable[..., PostgresStore]]:
    """Builds stores in fresh schemas (each its ``application_name``); drops them after."""
    made: list[PostgresStore] = []

    def build(source: Any = None, **options: Any) -> PostgresStore:
        schema = options.setdefault("schema", new_schema())
        made.append(PostgresStore(source or f"{DSN}?application_name={schema}", **options))
        return made[-1]

    yield build
    for store in made:
        store.close()
        admin.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(store.schema))
        )


# -- the option ----------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1, 0.0, math.nan, math.inf, "5", True, None])
def test_the_timeout_must_be_positive_finite_seconds(bad: Any) -> None:
    # Port 1: were it to connect first, this would be a StoreUnavailable.
    with pytest.raises(InvalidRequest, match="timeout"):
        PostgresStore("postgresql://postgres@127.0.0.1:1/test", timeout=bad)


def test_the_timeout_defaults_to_5s_and_bounds_connecting_too(
    new_store: Callable[..., PostgresStore],
) -> None:
    assert new_store().timeout == 5.0
    assert new_store(timeout=2.5).timeout == 2.5
    # connect_timeout: whole seconds, at least psycopg's (and libpq's) floor of 2.
    assert [_connect_timeout(s) for s in (0.25, 1, 2, 2.5, 5, 30)] == [2, 2, 2, 3, 5, 30]
    pool = _Pool(DSN, size=1, timeout=1.0, connect_timeout=3)
    assert "connect_timeout=3" in pool._conninfo
    pool = _Pool(f"{DSN}?connect_timeout=9", size=1, timeout=1.0, connect_timeout=3)
    assert "connect_timeout=9" in pool._conninfo  # the DSN's own wins


def test_the_store_url_takes_a_timeout(admin: psycopg.Connection[Any]) -> None:
    schema = new_schema()
    store = open_store(f"{DSN}?schema={schema}&timeout=2.5")
    try:
        assert isinstance(store, PostgresStore)
        assert store.timeout == 2.5
        default = open_store(f"{DSN}?schema={schema}&application_name=jbtest")
        assert isinstance(default, PostgresStore)
        assert default.timeout == 5.0
        default.close()
    finally:
        store.close()
        admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.mark.parametrize("value", ["0", "-2", "soon", "nan", "inf", ""])
def test_a_bad_timeout_in_the_url_is_refused_without_echoing_it(value: str) -> None:
    url = f"postgresql://postgres:hunter2@127.0.0.1:1/test?timeout={value}"
    with pytest.raises(InvalidRequest, match="timeout") as info:
        open_store(url)
    assert "hunter2" not in str(info.value)


# -- the deadline on one connection ------------------------------------------------
@pytest.fixture(params=["psycopg.Connection", "DeadlineConnection"])
def conn(request: pytest.FixtureRequest, admin: psycopg.Connection[Any]) -> Iterator[Any]:
    """A connection to the shared server: a plain one (as a caller's pool lends
    them: ``deadline`` patches the instance) or a ``DeadlineConnection``."""
    cls = psycopg.Connection if request.param == "psycopg.Connection" else DeadlineConnection
    connection = cls.connect(DSN, autocommit=True)
    try:
        yield connection
    finally:
        connection.close()


def untouched(conn: psycopg.Connection[Any]) -> bool:
    """Nothing of a deadline left on ``conn``."""
    if isinstance(conn, DeadlineConnection):
        return conn._deadline is None
    return "wait" not in vars(conn)


def test_a_statement_past_the_deadline_fails_and_closes_the_connection(conn: Any) -> None:
    with (
        took_at_most(0.3 + MARGIN),
        pytest.raises(DeadlineExceeded, match=r"0\.3s"),
        deadline(conn, 0.3),
    ):
        conn.execute("SELECT pg_sleep(3)")
    assert isinstance(DeadlineExceeded(), psycopg.OperationalError)
    assert conn.closed  # its state is unknown: never lent again
    assert untouched(conn)


def test_answers_in_time_are_kept_and_the_deadline_ends_with_the_block(conn: Any) -> None:
    with deadline(conn, 5):
        assert conn.execute("SELECT 1 FROM pg_sleep(0.3)").fetchone() == (1,)
        with conn.transaction():
            conn.execute("SELECT 2")
    assert untouched(conn)
    assert conn.execute("SELECT 3 FROM pg_sleep(0.5)").fetchone() == (3,)  # no deadline now
    with deadline(conn, 0.3):
        pass
    assert conn.execute("SELECT 4 FROM pg_sleep(0.5)").fetchone() == (4,)


def test_the_statements_of_a_block_share_its_deadline(conn: Any) -> None:
    with deadline(conn, 0.7):
        conn.execute("SELECT pg_sleep(0.4)")
        with took_at_most(0.3 + MARGIN), pytest.raises(DeadlineExceeded):
            conn.execute("SELECT pg_sleep(0.4)")
    assert conn.closed


@pytest.mark.parametrize(("outer", "inner"), [(5.0, 0.3), (0.3, 5.0)])
def test_nested_deadlines_only_shorten(conn: Any, outer: float, inner: float) -> None:
    with (
        took_at_most(0.3 + MARGIN),
        pytest.raises(DeadlineExceeded),
        deadline(conn, outer),
        deadline(conn, inner),
    ):
        conn.execute("SELECT pg_sleep(3)")
    assert untouched(conn)


def test_a_shorter_wait_of_its_own_keeps_its_behaviour(conn: Any) -> None:
    """What the revocation feed does: ``notifies(timeout=...)`` under a deadline."""
    conn.execute("LISTEN jbtest_deadline")
    with deadline(conn, 5):
        assert list(conn.notifies(timeout=0.2)) == []  # its own timeout: no error
        conn.execute("NOTIFY jbtest_deadline, 'x'")
        assert [n.payload for n in conn.notifies(timeout=2, stop_after=1)] == ["x"]
    assert not conn.closed
    with pytest.raises(DeadlineExceeded), deadline(conn, 0.3):
        list(conn.notifies(timeout=3))  # the deadline comes first: it wins
    assert conn.closed


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf])
def test_a_deadline_must_be_positive_finite_seconds(conn: Any, bad: float) -> None:
    with pytest.raises(InvalidRequest):
        deadline(conn, bad)


# -- the store, on a live server ------------------------------------------------------
class OneConnection:
    """A caller's pool of plain ``psycopg.Connection``s (``deadline`` patches
    them): one at a time, replaced when closed."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn = psycopg.connect(dsn, autocommit=True, connect_timeout=2)
        self.lent: list[psycopg.Connection[Any]] = []

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        if self.conn.closed:
            self.conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
        self.lent.append(self.conn)
        yield self.conn

    def close(self) -> None:
        self.conn.close()


@pytest.mark.parametrize("source", ["own pool", "caller's pool"])
def test_a_call_blocked_on_a_lock_gives_up_at_the_timeout(
    admin: psycopg.Connection[Any], new_store: Callable[..., PostgresStore], source: str
) -> None:
    schema = new_schema()
    pool = OneConnection(f"{DSN}?application_name={schema}")
    try:
        store = new_store(pool if source == "caller's pool" else None, schema=schema, timeout=0.5)
        store.add(make("a"))
        with admin.transaction():
            admin.execute(lock_row(store, "a", "FOR UPDATE"))
            # In a thread: without a deadline it would wait for this transaction.
            error = raised_within(0.5 + MARGIN, lambda: store.revoke("a", at=T0 + 1, reason="x"))
            assert isinstance(error, StoreUnavailable), error
            assert isinstance(error.__cause__, DeadlineExceeded)
            assert "0.5s" in str(error)
        # The lock is gone: the same store works, on a new connection, and the
        # revoke cut short never committed.
        lease = store.get("a")
        assert lease is not None
        assert lease.revoked_at is None
        assert [lease.id for lease in store.revoke("a", at=T0 + 2, reason="x")] == ["a"]
        if source == "caller's pool":
            assert pool.lent[0].closed
            assert not pool.conn.closed
            assert all(untouched(conn) for conn in pool.lent)
        assert sessions(admin, store, waiting=True) == 0
    finally:
        pool.close()


# -- a frozen server -------------------------------------------------------------------
def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError):
            # "pid (comm) state ppid ...": comm may hold spaces, so split after ")".
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


@contextmanager
def frozen(server: PrivateServer) -> Iterator[None]:
    """SIGSTOP the postmaster (first: it forks no more), then every backend;
    SIGCONT them all on exit. Connections stay open and get no answer."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    stopped = [postmaster]
    os.kill(postmaster, signal.SIGSTOP)
    try:
        for pid in children(postmaster):
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        yield
    finally:
        for pid in stopped:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@pytest.mark.slow
def test_a_frozen_server_fails_each_call_within_the_timeout_then_recovers(
    request: pytest.FixtureRequest,
) -> None:
    # Its own server (module scope), never the shared one: a frozen server
    # would hang every other test. Skipped without the binaries, except in CI.
    private_server: PrivateServer = request.getfixturevalue("private_postgres_server")
    if not Path("/proc/self/stat").exists():
        pytest.skip("finds the server's processes through /proc (Linux)")
    store = PostgresStore(private_server.dsn, schema=new_schema(), timeout=1.0)
    borrowed = OneConnection(private_server.dsn)
    lent = PostgresStore(borrowed, schema=store.schema, timeout=1.0)
    try:
        broker = Broker(issuer=TEST_ISSUER, store=store)
        cred = broker.issue("svc:a", "api", ttl=300)
        assert store.add(make("a")) is True
        assert lent.get("a") == make("a")
        with frozen(private_server):
            # An idle pooled connection: the statement deadline (1 s). Then no
            # idle connection is left: connecting gives up after 2 s.
            calls: list[Callable[[], object]] = [
                lambda: store.get("a"),
                lambda: store.add(make("b")),
                lambda: store.revoke("a", at=T0 + 1, reason="x"),
                lambda: broker.verify(cred.token, audience="api"),  # the issue's 31 s
                lambda: lent.get("a"),  # a caller's connection, bounded the same way
            ]
            for call in calls:
                error = raised_within(3.0, call)
                assert isinstance(error, StoreUnavailable), error
                assert isinstance(error.__cause__, psycopg.OperationalError)
        # Thawed: the same stores work again; the broken connections were dropped.
        assert store.get("a") == make("a")
        assert store.add(make("b")) is True
        assert [lease.id for lease in store.revoke("a", at=T0 + 1, reason="x")] == ["a"]
        assert broker.verify(cred.token, audience="api").lease_id == cred.lease_id
        assert lent.get("b") == make("b")
        assert all(untouched(conn) for conn in borrowed.lent)
    finally:
        store.clear()
        store.close()
        borrowed.close()
