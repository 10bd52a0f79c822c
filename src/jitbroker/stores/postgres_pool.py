"""Connections for ``PostgresStore``: where they come from, how long a call may
wait on one, and how psycopg's errors become the store's.

A store call waits on PostgreSQL in three places, and each wait is bounded:

- for a free connection of the store's own pool: ``pool_timeout`` seconds;
- for a new connection: libpq's ``connect_timeout``, whole seconds for each
  host the DSN names (the store defaults it to its ``timeout`` rounded up;
  psycopg, like libpq, waits at least 2 s);
- for the answers to its statements: the store's ``timeout``, for all the
  statements of the call together (``deadline``).

The last needs a clock on the client. A server-side ``statement_timeout`` does
nothing against a server that stopped answering (frozen, partitioned, out of
memory): nobody is left to enforce it. psycopg 3 does all its waiting on a
connection's socket in ``Connection.wait``, which drives a generator of libpq
steps and resumes it at least every 0.1 s while the socket stays silent (so
that Ctrl-C works). ``deadline`` wraps that generator: each resumption compares
``time.monotonic()`` with the deadline. No timer thread, no extra round trip,
no system call; a few hundred nanoseconds a statement.

Past the deadline the connection is closed, since half an answer may be in
flight and its state is unknown, and the pending call raises
``DeadlineExceeded``, a ``psycopg.OperationalError`` (``_translated`` makes it
``StoreUnavailable``). A closed connection is never lent again, by this pool
or by ``psycopg_pool``. What the call did is then unknown, as with any lost
connection: the server rolls back an open transaction when it notices the
client is gone, but a single autocommit statement (``add`` of a root lease, a
claim of expired leases, a purge) may still commit: a claim whose answer was
lost leaves its leases claimed with nobody running their hooks, as a lost
COMMIT answer would. (A revoke sends COMMIT only once it has the answer.) A
backend blocked on a lock only notices once it gets the lock, unless the server
sets ``client_connection_check_interval`` (PostgreSQL 14+).
"""

from __future__ import annotations

import contextlib
import math
import re
import select
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from time import monotonic
from types import TracebackType
from typing import Any, NamedTuple, Protocol, TypeVar

import psycopg
from psycopg.abc import PQGen
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import Row

from ..errors import InvalidRequest, StoreError, StoreUnavailable

__all__ = [
    "DEFAULT_TIMEOUT",
    "ConnectionSource",
    "DeadlineConnection",
    "DeadlineExceeded",
    "deadline",
]

RV = TypeVar("RV")

#: Seconds a store call waits for PostgreSQL's answers unless told otherwise
#: (as long as ``RedisStore``'s socket timeout).
DEFAULT_TIMEOUT = 5.0


class ConnectionSource(Protocol):
    """Anything that lends out connections like ``psycopg_pool.ConnectionPool``."""

    def connection(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        """A connection for the duration of the ``with`` block."""
        ...


# -- deadlines ------------------------------------------------------------------
class DeadlineExceeded(psycopg.OperationalError):
    """PostgreSQL did not answer before a ``deadline`` passed; the connection is
    closed (``conn.closed`` is true) and every later call on it fails."""


class _Deadline(NamedTuple):
    until: float  # time.monotonic()
    seconds: float  # as given, for the message


class DeadlineConnection(psycopg.Connection[Row]):
    """A ``psycopg.Connection`` on which ``deadline`` needs no patching; outside a
    ``deadline`` block it is exactly a ``psycopg.Connection``.

    ``PostgresStore``'s own pool makes these. A pool of yours can make them too
    (``psycopg_pool.ConnectionPool(..., connection_class=DeadlineConnection)``);
    the store's ``timeout`` applies to any other ``psycopg.Connection`` as well,
    through a ``wait`` set on the instance for the length of each call.
    """

    _deadline: _Deadline | None = None  # set by deadline(), per instance

    def wait(self, gen: PQGen[RV], *args: Any, **kwargs: Any) -> RV:
        """``Connection.wait``, bounded by the current ``deadline`` if any."""
        if self._deadline is None:
            return super().wait(gen, *args, **kwargs)
        return _wait_until(self, super().wait, self._deadline, gen, *args, **kwargs)


def deadline(conn: psycopg.Connection[Any], seconds: float) -> AbstractContextManager[None]:
    """Bound everything done on ``conn`` within the ``with`` block by one deadline,
    ``seconds`` from now (not from entering the block).

    The contract:

    - every statement, fetch, COMMIT or ROLLBACK, ``notifies()`` and mode change
      (``autocommit``...) made on ``conn`` in the block counts against the same
      deadline: it is a deadline for the block, not a timeout per statement;
    - past it, the call waiting on the server (or the next one made) raises
      ``DeadlineExceeded`` (a ``psycopg.OperationalError``) within about 0.1 s,
      and ``conn`` is closed: a pool discards it, never lends it again;
    - a wait that asks for less time (``notifies(timeout=...)``) keeps its own
      behaviour; only the deadline closes the connection;
    - blocks nest: an inner deadline can shorten, never lengthen, an outer one;
    - on exit ``conn`` is as it was: no deadline, nothing left on the instance;
    - waits that do not go through ``Connection.wait`` are not bounded: making
      the connection (``connect_timeout``), ``Connection.cancel()``, and a
      ``select`` on ``conn.fileno()`` of the caller's own.

    ``conn`` is used from one thread at a time, as psycopg requires anyway. A
    ``DeadlineConnection`` carries the deadline in an attribute; any other
    connection gets a bounded ``wait`` on the instance until the block ends.
    """
    _check_seconds("deadline", seconds)
    return _Bounded(conn, _Deadline(monotonic() + seconds, seconds))


class _Bounded:
    """The ``deadline`` block (a class, not a generator: it runs on every store call)."""

    __slots__ = ("_conn", "_deadline", "_outer")

    def __init__(self, conn: psycopg.Connection[Any], limit: _Deadline) -> None:
        self._conn, self._deadline = conn, limit
        self._outer: Any = None

    def __enter__(self) -> None:
        conn, limit = self._conn, self._deadline
        if isinstance(conn, DeadlineConnection):
            self._outer = outer = conn._deadline
            conn._deadline = limit if outer is None or limit.until < outer.until else outer
        else:
            # An instance attribute wins over the class's method, and psycopg
            # reaches every wait through ``self.wait``. Nested blocks wrap the
            # outer block's wait, so each deadline is checked.
            self._outer = vars(conn).get("wait")
            vars(conn)["wait"] = partial(_wait_until, conn, conn.wait, limit)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        if isinstance(conn, DeadlineConnection):
            conn._deadline = self._outer
        elif self._outer is None:
            vars(conn).pop("wait", None)
        else:
            vars(conn)["wait"] = self._outer


class _Expired(Exception):
    """Raised inside a bounded generator; never leaves ``_wait_until``."""


def _wait_until(
    conn: psycopg.Connection[Any],
    wait: Callable[..., RV],
    limit: _Deadline,
    gen: PQGen[RV],
    *args: Any,
    **kwargs: Any,
) -> RV:
    try:
        if monotonic() < limit.until:
            return wait(_bounded(gen, limit.until), *args, **kwargs)
    except _Expired:
        pass
    # finish(), not close(): psycopg_pool's close_returns would hand it back.
    conn.pgconn.finish()
    raise DeadlineExceeded(
        f"no answer from PostgreSQL within {limit.seconds:g}s (the deadline),"
        " so the connection was closed"
    )


def _bounded(gen: PQGen[RV], until: float) -> PQGen[RV]:
    """``gen``, stopped by ``_Expired`` once it is resumed at or after ``until``.

    The clock is read after each step, so an answer that came in time is
    taken, never thrown away for being read late.
    """
    try:
        state = next(gen)
        while True:
            ready = yield state
            state = gen.send(ready)
            if monotonic() >= until:
                raise _Expired
    except StopIteration as stop:
        result: RV = stop.value
        return result


# -- the store's own pool ---------------------------------------------------------
class _Pool:
    """A small thread-safe pool of autocommit ``DeadlineConnection``s made from a DSN.

    An idle connection whose socket has become readable was closed by the
    server (restart, idle timeout, failover) or is otherwise out of step, so it
    is dropped at checkout instead of failing the caller's first query: after
    an outage the same store works again without being rebuilt.
    """

    def __init__(self, dsn: str, *, size: int, timeout: float, connect_timeout: int) -> None:
        if size < 1:
            raise InvalidRequest(f"pool_size must be at least 1, got {size!r}")
        _check_seconds("pool_timeout", timeout)
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError:
            # Not the parser's message: it may quote the DSN, password included.
            raise InvalidRequest("not a valid PostgreSQL connection string") from None
        _check_params(params)
        # Fail fast rather than hang when the server is unreachable; a DSN may override.
        params.setdefault("connect_timeout", connect_timeout)
        params.setdefault("application_name", "jitbroker")
        self._conninfo = make_conninfo("", **params)
        self._size, self._timeout = size, timeout
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._generation = 0  # bumped by close: connections lent out before it are not kept

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        if not self._slots.acquire(timeout=self._timeout):
            raise StoreUnavailable(
                f"no PostgreSQL connection free within {self._timeout}s"
                f" (all {self._size} in use): raise pool_size or pool_timeout"
            )
        try:
            generation = self._generation
            conn = self._checkout()
            try:
                yield conn
            finally:
                self._checkin(conn, generation)
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
            self._generation += 1
        for conn in idle:
            _discard(conn)

    def _checkout(self) -> psycopg.Connection[Any]:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = DeadlineConnection.connect(self._conninfo, autocommit=True)
                # See postgres._read_committed: no round trip, it goes in each BEGIN.
                conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
                return conn
            if _usable(conn):
                return conn
            _discard(conn)

    def _checkin(self, conn: psycopg.Connection[Any], generation: int) -> None:
        idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        with self._lock:
            if idle and not conn.closed and generation == self._generation:
                self._idle.append(conn)
                return
        _discard(conn)


def _usable(conn: psycopg.Connection[Any]) -> bool:
    """False if ``conn`` is closed or the server sent something while it sat idle
    (normally a termination notice, or EOF)."""
    if conn.closed:
        return False
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return False
    return not readable


def _discard(conn: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(Exception):  # closing a dead connection may complain
        conn.close()


# -- helpers (no I/O: shared with an asyncio twin when one arrives) ----------
@contextmanager
def _translated(action: str) -> Iterator[None]:
    """psycopg errors become ours at the boundary, the original chained as cause."""
    try:
        yield
    except psycopg.OperationalError as exc:  # connection lost or refused, deadline, shutdown
        raise StoreUnavailable(f"could not reach PostgreSQL to {action}: {exc}") from exc
    except psycopg.Error as exc:
        raise StoreError(f"PostgreSQL failed to {action}: {exc}") from exc


def _check_params(params: dict[str, Any]) -> None:
    """Refuse what libpq would only reject when connecting (as an outage)."""
    for port in str(params.get("port", "")).split(","):  # one per host, "" = default
        if port and not (re.fullmatch(r"[0-9]{1,5}", port) and 1 <= int(port) <= 65535):
            raise InvalidRequest(f"the port must be a number from 1 to 65535, got {port!r}")
    timeout = str(params.get("connect_timeout", "0"))
    if not re.fullmatch(r"-?[0-9]+", timeout):
        raise InvalidRequest(f"connect_timeout must be whole seconds, got {timeout!r}")


def _check_seconds(name: str, value: object) -> float:
    """``value`` as positive, finite seconds, or ``InvalidRequest``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (value > 0 and math.isfinite(value))
    ):
        raise InvalidRequest(f"{name} must be a positive, finite number of seconds, got {value!r}")
    return float(value)


def _connect_timeout(seconds: float) -> int:
    """libpq's ``connect_timeout`` for a store whose calls wait ``seconds``: whole
    seconds, rounded up, and 2 at least (psycopg and libpq wait that long anyway)."""
    return max(2, math.ceil(seconds))
