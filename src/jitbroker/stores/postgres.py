"""``PostgresStore``: leases in PostgreSQL, shared by every process and host that uses it.

Every method is one transaction, so each invariant ``LeaseStore`` promises
holds across any number of brokers:

- ``add`` locks the parent row (``FOR SHARE``) while it checks it and inserts
  the child, so a concurrent revoke or claim of the parent waits for the insert
  and then takes the child with it, or the add sees the parent dead and refuses;
- ``revoke`` and ``revoke_where`` update the active subtree with one recursive
  CTE, then look again for children that concurrent adds committed while the
  update waited for their parent's lock (see ``_revoke_tree``);
- ``claim_expired`` locks due rows ``FOR UPDATE SKIP LOCKED``, so reapers of
  several brokers take disjoint batches and each lease is claimed once.

All of this assumes READ COMMITTED (each statement sees what committed before
it began), so every transaction the store begins is READ COMMITTED, whatever
the server's, role's or pool's default isolation level.

Layout, in the store's own schema (``jitbroker`` by default)::

    <schema>.jitbroker_meta   one row: the schema version (migrations, below) and
                              the epoch: the server time (seconds) the schema's
                              data began, set when it is created and again by a
                              TRUNCATE of the leases (for revocation caches)
    <schema>.leases           one row per lease: the codec's COLUMNS, plus
                              ``claimed`` (an expired lease handed to a reaper)

Revocations are announced with ``pg_notify('<schema>_revoked', '["id", ...]')``
(a JSON list of the ids one revoke took, split so each payload stays under
PostgreSQL's 8000-byte limit) inside the revoking transaction, so listeners
hear of it when it commits, and only then.

There is no asyncio PostgreSQL store (yet). ``AsyncBroker`` takes this one
through ``as_async`` (``stores.base``): the store is ``blocking``, so each call
runs in the event loop's default executor (``asyncio.to_thread``) and the loop
never waits on PostgreSQL. Concurrent calls are therefore bounded by that
executor's threads (``min(32, cpu count + 4)`` unless the application sets its
own) and by ``pool_size``; a call that finds every connection busy waits up to
``pool_timeout`` in its thread, not in the loop. The revocation feed has a
thread of its own either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import select
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, LiteralString, Protocol, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow, tuple_row

from ..clock import Clock, system_clock
from ..errors import InvalidRequest, StoreError, StoreUnavailable
from ..lease import Lease
from ..revocations import RESYNC_MARGIN, RevocationCache, parse_ids, start_feed
from .base import LeaseFilter, Quota
from .codec import COLUMNS, from_row, to_row

__all__ = ["SCHEMA_VERSION", "PostgresStore"]

T = TypeVar("T")
Cursor = psycopg.Cursor[TupleRow]
Query = bytes | sql.Composed

# -- the schema ----------------------------------------------------------------
# Migrations in order: entry i brings the schema from version i to i + 1. They
# only ever get appended; a released one never changes. ``{schema}`` is the
# quoted schema name.
_BOOTSTRAP: tuple[LiteralString, ...] = (
    "CREATE SCHEMA IF NOT EXISTS {schema}",
    """CREATE TABLE IF NOT EXISTS {schema}.jitbroker_meta (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        version integer NOT NULL
    )""",
)
_MIGRATIONS: tuple[tuple[LiteralString, ...], ...] = (
    (
        # No foreign key on parent: purge deletes a dead parent before its
        # children may be (they can expire later), and add checks it anyway.
        """CREATE TABLE {schema}.leases (
            id text PRIMARY KEY,
            subject text NOT NULL,
            audience text NOT NULL,
            scopes text NOT NULL,
            issued_at double precision NOT NULL,
            expires_at double precision NOT NULL,
            max_expires_at double precision NOT NULL,
            key_id text,
            task text,
            owner text,
            purpose text,
            parent text,
            renewable boolean NOT NULL,
            revoked_at double precision,
            revoke_reason text,
            holder text,
            claimed boolean NOT NULL DEFAULT false
        )""",
        "CREATE INDEX leases_task ON {schema}.leases (task)",
        "CREATE INDEX leases_parent ON {schema}.leases (parent)",
        "CREATE INDEX leases_owner ON {schema}.leases (owner)",
        "CREATE INDEX leases_subject ON {schema}.leases (subject)",
        "CREATE INDEX leases_key_id ON {schema}.leases (key_id)",
        # What the reaper scans: leases still awaiting their claim, by expiry...
        """CREATE INDEX leases_due ON {schema}.leases (expires_at)
            WHERE revoked_at IS NULL AND NOT claimed""",
        # ...and what purge deletes: dead leases, by expiry.
        """CREATE INDEX leases_dead ON {schema}.leases (expires_at)
            WHERE revoked_at IS NOT NULL OR claimed""",
    ),
    (
        # The epoch (see jitbroker.revocations): a revocation cache vouches only
        # for tokens issued after it. A schema migrated from version 1 starts
        # one now, so tokens issued before the upgrade are checked in the table.
        """ALTER TABLE {schema}.jitbroker_meta ADD COLUMN epoch double precision NOT NULL
            DEFAULT extract(epoch FROM clock_timestamp())""",
        """CREATE FUNCTION {schema}.jitbroker_new_epoch() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                UPDATE {schema}.jitbroker_meta SET epoch = extract(epoch FROM clock_timestamp());
                RETURN NULL;
            END $$""",
        """CREATE TRIGGER leases_truncated AFTER TRUNCATE ON {schema}.leases
            FOR EACH STATEMENT EXECUTE FUNCTION {schema}.jitbroker_new_epoch()""",
    ),
    (
        # Quota counts: the live leases of a subject (and owner), without reading
        # the dead ones a long retention keeps.
        """CREATE INDEX leases_live_subject ON {schema}.leases (subject, owner, expires_at)
            WHERE revoked_at IS NULL AND NOT claimed""",
    ),
)
#: The schema version this code reads and writes.
SCHEMA_VERSION = len(_MIGRATIONS)

_META_VERSION = "SELECT version FROM {schema}.jitbroker_meta"
_SET_VERSION = """
    INSERT INTO {schema}.jitbroker_meta (version) VALUES (%s)
    ON CONFLICT (singleton) DO UPDATE SET version = EXCLUDED.version
"""
# Serializes openers of one schema (and clear): concurrent CREATE IF NOT EXISTS
# statements can still fail on a unique index, so only one runs at a time.
_SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(%s)"
_META_EXISTS = "SELECT to_regclass(%s) IS NOT NULL"
_DROP_SCHEMA = "DROP SCHEMA IF EXISTS {schema} CASCADE"

# -- the statements ------------------------------------------------------------
# {columns} is the codec's COLUMNS, {lease_columns} the same qualified by the
# alias ``lease``. A lease is active at %(at)s when it is not revoked, not
# claimed and not expired: "revoked_at IS NULL AND NOT claimed AND %(at)s < expires_at".

_GET = "SELECT {columns} FROM {schema}.leases WHERE id = %(id)s"
_FIND = "SELECT {columns} FROM {schema}.leases WHERE {where} ORDER BY issued_at, id"

_LOCK_PARENT = """
    SELECT 1 FROM {schema}.leases
    WHERE id = %(id)s AND revoked_at IS NULL AND NOT claimed AND %(at)s < expires_at
    FOR SHARE
"""
# Quotas: adds for one subject take this transaction-scoped lock first, so a
# count and the insert that follows it are never interleaved with another's.
_QUOTA_LOCK = "SELECT pg_advisory_xact_lock(%(key)s)"
_COUNT_ACTIVE = """
    SELECT count(*) FROM {schema}.leases
    WHERE subject = %(subject)s AND revoked_at IS NULL AND NOT claimed AND %(at)s < expires_at
"""
_COUNT_ACTIVE_OWNER = _COUNT_ACTIVE + " AND owner = %(owner)s"
# A lease stored again under the same id (a caller's bug: ids are random)
# replaces the old row whole, as in the other stores.
_INSERT = """
    INSERT INTO {schema}.leases ({columns}) VALUES ({values})
    ON CONFLICT (id) DO UPDATE SET ({columns}, claimed) = ROW({excluded}, false)
"""

# The active subtree under {roots}. UNION (not UNION ALL) drops a lease reached
# twice (a root that is also a descendant). The UPDATE checks "active" again:
# a row another transaction revoked or claimed meanwhile is re-read after its
# lock is released and skipped, so each lease transitions exactly once.
_REVOKE_TREE = """
    WITH RECURSIVE tree (id) AS (
        SELECT id FROM {schema}.leases
        WHERE ({roots})
          AND revoked_at IS NULL AND NOT claimed AND %(at)s < expires_at
      UNION
        SELECT lease.id FROM {schema}.leases AS lease JOIN tree ON lease.parent = tree.id
        WHERE lease.revoked_at IS NULL AND NOT lease.claimed AND %(at)s < lease.expires_at
    )
    UPDATE {schema}.leases AS lease SET revoked_at = %(at)s, revoke_reason = %(reason)s
    FROM tree
    WHERE lease.id = tree.id
      AND lease.revoked_at IS NULL AND NOT lease.claimed AND %(at)s < lease.expires_at
    RETURNING {lease_columns}
"""
_ROOT_ID: LiteralString = "id = %(id)s"
_ROOT_CHILDREN: LiteralString = "parent = ANY(%(ids)s)"
_NOTIFY = "SELECT pg_notify(%(channel)s, payload) FROM unnest(%(payloads)s::text[]) AS payload"

_EXTEND = """
    UPDATE {schema}.leases SET expires_at = %(expires_at)s
    WHERE id = %(id)s AND revoked_at IS NULL AND NOT claimed AND %(at)s < expires_at
    RETURNING {columns}
"""

# SKIP LOCKED: a reaper passes over rows another reaper is claiming right now
# instead of waiting for them; a row claimed since this statement's snapshot is
# re-read under its lock and dropped (no longer NOT claimed). Served by leases_due.
_CLAIM_EXPIRED = """
    WITH due AS (
        SELECT id FROM {schema}.leases
        WHERE revoked_at IS NULL AND NOT claimed AND expires_at <= %(now)s
        ORDER BY expires_at
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    )
    UPDATE {schema}.leases AS lease SET claimed = true
    FROM due WHERE lease.id = due.id
    RETURNING {lease_columns}
"""

# Served by leases_dead: the predicate is the index's own.
_REVOKED_SINCE = """
SELECT id FROM {schema}.leases
WHERE (revoked_at IS NOT NULL OR claimed) AND expires_at >= %s
"""
_LISTEN = "LISTEN {channel}"
_UNLISTEN = "UNLISTEN {channel}"
# A feed's heartbeat: still listening (a pooler may have switched server
# sessions under it), and the epoch (NULL: no meta row, vouch for nothing).
_HEARTBEAT = """
SELECT %s IN (SELECT pg_listening_channels()), (SELECT epoch FROM {schema}.jitbroker_meta)
"""
# A resync: the epoch and the recent revocations in one snapshot.
_RESYNC = """
SELECT (SELECT epoch FROM {schema}.jitbroker_meta), ARRAY(
    SELECT id FROM {schema}.leases
    WHERE (revoked_at IS NOT NULL OR claimed) AND expires_at >= %s
)
"""
_PURGE = """
    DELETE FROM {schema}.leases
    WHERE (revoked_at IS NOT NULL OR claimed) AND expires_at < %(before)s
"""

_FILTER_FIELDS = ("task", "parent", "owner", "subject", "key_id")
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,54}")  # + "_revoked" fits in 63 bytes
#: PostgreSQL refuses a NOTIFY payload of 8000 bytes or more.
NOTIFY_LIMIT = 7900
#: Transactions that lost a deadlock or serialization race were rolled back
#: whole, so they are safe to run again; this many attempts in all.
_ATTEMPTS = 3


class ConnectionSource(Protocol):
    """Anything that lends out connections like ``psycopg_pool.ConnectionPool``."""

    def connection(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        """A connection for the duration of the ``with`` block."""
        ...


class PostgresStore:
    """Leases in PostgreSQL (sync, psycopg 3), shared by every broker that uses the
    same database and ``schema``. Install with ``pip install 'jitbroker[postgres]'``.

    ``dsn_or_pool`` is a connection string (the store then keeps its own pool
    of up to ``pool_size`` connections, waits at most ``pool_timeout`` seconds
    for a free one, and replaces broken ones on the next call), or an object
    with a ``connection()`` context manager such as a
    ``psycopg_pool.ConnectionPool`` (left open by ``close``).

    The schema is created, or migrated forward, when the store opens; a schema
    written by a newer jitbroker is refused with ``StoreError``. The schema
    belongs to the store: ``clear`` drops it with everything in it.

    Revocations are announced on the channel ``channel`` (``<schema>_revoked``),
    as a JSON list of lease ids. Failing to reach PostgreSQL raises
    ``StoreUnavailable``, any other database error ``StoreError``, each with
    the original as ``__cause__``.
    """

    blocking = True

    def __init__(
        self,
        dsn_or_pool: str | ConnectionSource,
        schema: str = "jitbroker",
        *,
        pool_size: int = 10,
        pool_timeout: float = 5.0,
        create: bool = True,
    ) -> None:
        if not isinstance(schema, str) or not _SCHEMA_NAME.fullmatch(schema):
            raise InvalidRequest(
                "schema must be 1-55 lowercase letters, digits or underscores, not starting"
                f" with a digit, got {schema!r}"
            )
        if schema.startswith("pg_"):
            raise InvalidRequest(f"schema names starting with 'pg_' are reserved, got {schema!r}")
        self.schema = schema
        #: The NOTIFY channel revocations are announced on.
        self.channel = f"{schema}_revoked"
        self._source: ConnectionSource
        if isinstance(dsn_or_pool, str):
            self._source = _Pool(dsn_or_pool, size=pool_size, timeout=pool_timeout)
        else:
            self._source = dsn_or_pool
        self._sql = _Statements(schema)
        self._create = create  # False: refuse a database without the schema (the CLI)
        try:
            self._call("open the lease schema", self._migrate)
        except BaseException:
            self.close()  # the caller never gets the store, so it cannot close it
            raise

    def __repr__(self) -> str:
        return f"<PostgresStore schema={self.schema!r}>"  # never the DSN: it may hold a password

    # -- the protocol ------------------------------------------------------
    def add(self, lease: Lease, quotas: Sequence[Quota] = ()) -> bool:
        """Store ``lease``; False (nothing written) if its parent is not active;
        ``QuotaExceeded`` (nothing written) if a quota is full."""
        for name in ("issued_at", "expires_at", "max_expires_at", "revoked_at"):
            value = getattr(lease, name)
            if value is not None:
                _check_time(name, value)
        row = to_row(lease)

        def work(cur: Cursor) -> bool:
            if quotas:
                self._check_quotas(cur, lease, quotas)
            if lease.parent is not None:
                cur.execute(self._sql.lock_parent, {"id": lease.parent, "at": lease.issued_at})
                if cur.fetchone() is None:
                    return False
            cur.execute(self._sql.insert, row)
            return True

        # A root lease without quotas is one INSERT: atomic on its own, so on an
        # autocommit connection it needs no BEGIN/COMMIT (one round trip, not three).
        alone = lease.parent is None and not quotas
        return self._call("store a lease", work, atomic=not alone)

    def _check_quotas(self, cur: Cursor, lease: Lease, quotas: Sequence[Quota]) -> None:
        # Every quota of a lease is on its subject: one lock serializes them all.
        cur.execute(_QUOTA_LOCK, {"key": self._sql.quota_key(lease.subject)})
        for quota in quotas:
            params = {"subject": quota.subject, "owner": quota.owner, "at": lease.issued_at}
            query = self._sql.count_active if quota.owner is None else self._sql.count_owner
            row = cur.execute(query, params).fetchone()
            if row is not None and row[0] >= quota.limit:
                raise quota.exceeded()

    def get(self, lease_id: str) -> Lease | None:
        """The lease with this id, or None."""

        def work(cur: Cursor) -> Lease | None:
            row = cur.execute(self._sql.get, {"id": lease_id}).fetchone()
            return None if row is None else from_row(row)

        return self._call("read a lease", work, atomic=False)

    def revoke(self, lease_id: str, *, at: float, reason: str) -> list[Lease]:
        """Revoke the lease and its active descendants; those that transitioned."""
        _check_time("at", at)
        query, params = self._sql.revoke_id, {"id": lease_id}
        return self._call(
            "revoke a lease", lambda cur: self._revoke_tree(cur, query, params, at, reason)
        )

    def revoke_where(self, where: LeaseFilter, *, at: float, reason: str) -> list[Lease]:
        """Revoke every active lease matching ``where`` and their descendants."""
        _check_time("at", at)
        roots, params = _filter(where)
        query = self._sql.compose(_REVOKE_TREE, roots=roots)
        return self._call(
            "revoke leases", lambda cur: self._revoke_tree(cur, query, params, at, reason)
        )

    def extend(self, lease_id: str, *, expires_at: float, at: float) -> Lease | None:
        """Set a new expiry if the lease is active and unclaimed at ``at``."""
        _check_time("expires_at", expires_at)
        _check_time("at", at)
        params = {"id": lease_id, "expires_at": expires_at, "at": at}

        def work(cur: Cursor) -> Lease | None:
            row = cur.execute(self._sql.extend, params).fetchone()
            return None if row is None else from_row(row)

        return self._call("extend a lease", work)

    def find(self, where: LeaseFilter) -> list[Lease]:
        """Every stored lease matching ``where`` (live or dead, not yet purged)."""
        condition, params = _filter(where)
        query = self._sql.compose(_FIND, where=condition)

        def work(cur: Cursor) -> list[Lease]:
            return [from_row(row) for row in cur.execute(query, params)]

        return self._call("find leases", work, atomic=False)

    def claim_expired(self, now: float, limit: int = 1000) -> list[Lease]:
        """Leases expired by ``now`` and not yet claimed, each handed out exactly once."""
        _check_time("now", now)
        if limit <= 0:
            return []
        params = {"now": now, "limit": int(limit)}

        def work(cur: Cursor) -> list[Lease]:
            return [from_row(row) for row in cur.execute(self._sql.claim_expired, params)]

        return self._call("claim expired leases", work)

    def purge(self, before: float) -> int:
        """Delete dead leases (revoked or claimed) with ``expires_at < before``; how many."""
        _check_time("before", before)

        def work(cur: Cursor) -> int:
            return cur.execute(self._sql.purge, {"before": before}).rowcount

        return self._call("purge dead leases", work)

    def close(self) -> None:
        """Close the pooled connections if this store made the pool from a DSN.

        Idempotent. A later call on the store opens a new connection.
        """
        if isinstance(self._source, _Pool):
            self._source.close()

    # -- beyond the protocol -----------------------------------------------
    def revoked_since(self, since: float) -> list[str]:
        """Ids of dead leases (revoked, or claimed expired) whose ``expires_at`` is
        at or after ``since``: what a revocation cache must know after a resync."""
        _check_time("since", since)

        def work(cur: Cursor) -> list[str]:
            return [str(row[0]) for row in cur.execute(self._sql.revoked_since, (since,))]

        return self._call("read recent revocations", work, atomic=False)

    def revocations(
        self,
        *,
        window: float = 86_400.0,
        max_staleness: float = 5.0,
        heartbeat: float = 1.0,
        clock: Clock = system_clock,
    ) -> RevocationCache:
        """A ``RevocationCache`` fed by LISTEN on this store's channel, for
        ``Verifier(..., store=store, revocations=...)`` (see ``jitbroker.revocations``).
        It holds one connection of the pool while it runs. ``window`` must be at
        least the longest token lifetime plus leeway; ``clock`` is the brokers'
        clock (a resync loads the leases that died and expired at most a minute
        before its "now"); ``close()`` the cache to stop its thread."""
        cache = RevocationCache(window=window, max_staleness=max_staleness)

        def session(cache: RevocationCache, stop: threading.Event) -> None:
            with (
                _translated("listen for revocations"),
                self._source.connection() as conn,
                self._listening(conn) as cur,
            ):
                # On the listening connection itself: a pool of one still works.
                row = cur.execute(self._sql.resync, (clock() - RESYNC_MARGIN,)).fetchone()
                epoch, ids = row if row is not None else (None, [])
                cache.resync([str(i) for i in ids], epoch=epoch)
                while not stop.is_set():
                    for notice in conn.notifies(timeout=heartbeat):
                        cache.add(parse_ids(notice.payload))
                    cache.check_epoch(self._heartbeat(cur))  # a round trip proves the link
                    cache.alive()

        return start_feed(cache, session, heartbeat=heartbeat)

    def clear(self) -> None:
        """Drop this store's schema with every lease in it (tests, teardown).

        Everything in the schema goes (``DROP SCHEMA ... CASCADE``); later calls
        fail with ``StoreError`` until a new store opens (and recreates) it.
        """

        def work(cur: Cursor) -> None:
            cur.execute(_SCHEMA_LOCK, (self._sql.lock_key,))
            cur.execute(self._sql.drop_schema)

        self._call("drop the lease schema", work)

    # -- internals -----------------------------------------------------------
    def _call(self, action: str, work: Callable[[Cursor], T], *, atomic: bool = True) -> T:
        """Run ``work`` on a pooled connection, in one transaction if ``atomic``
        (reads are single statements and need none on an autocommit connection).

        The transaction runs at READ COMMITTED whatever the server's, role's or
        pool's default (see ``_read_committed``): the quota count after its
        advisory lock, revoke's second pass and claim's SKIP LOCKED all rely on
        each statement seeing what committed before it began."""
        with _translated(action):
            for attempt in range(1, _ATTEMPTS + 1):
                try:
                    with (
                        self._source.connection() as conn,
                        _read_committed(conn),
                        conn.cursor(row_factory=tuple_row) as cur,
                    ):
                        if not atomic and conn.autocommit:
                            return work(cur)
                        with conn.transaction():
                            return work(cur)
                except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure):
                    if attempt == _ATTEMPTS:
                        raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _migrate(self, cur: Cursor) -> None:
        cur.execute(_SCHEMA_LOCK, (self._sql.lock_key,))
        version = 0
        row = cur.execute(_META_EXISTS, (f"{self.schema}.jitbroker_meta",)).fetchone()
        if row is not None and row[0]:
            found = cur.execute(self._sql.compose(_META_VERSION)).fetchone()
            version = 0 if found is None else int(found[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the lease schema {self.schema!r} is at version {version}, newer than this"
                f" jitbroker supports ({SCHEMA_VERSION}): upgrade jitbroker"
            )
        if version == SCHEMA_VERSION:
            return
        if version == 0 and not self._create:
            raise InvalidRequest(
                f"no jitbroker lease schema {self.schema!r} in that database (check the"
                " URL's schema= and database; nothing was created)"
            )
        if version == 0:
            for statement in _BOOTSTRAP:
                cur.execute(self._sql.compose(statement))
        for migration in _MIGRATIONS[version:]:
            for statement in migration:
                cur.execute(self._sql.compose(statement))
        cur.execute(self._sql.compose(_SET_VERSION), (SCHEMA_VERSION,))

    @contextmanager
    def _listening(self, conn: psycopg.Connection[Any]) -> Iterator[Cursor]:
        """LISTEN on ``conn`` and confirm it took; on exit UNLISTEN and give the
        connection back in the mode it came in.

        PostgreSQL delivers notifications only between transactions, and a
        LISTEN takes effect only when its transaction commits. On a connection
        that is not in autocommit mode (``psycopg_pool``'s default) the LISTEN
        and every heartbeat would sit in one open transaction: nothing would
        arrive while the heartbeat kept the cache fresh. So the feed listens in
        autocommit mode, whatever the pool's setting.
        """
        autocommit = conn.autocommit
        if not autocommit:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.rollback()  # lent mid-transaction: nothing of ours is in it
            conn.autocommit = True
        try:
            with conn.cursor(row_factory=tuple_row) as cur:
                cur.execute(self._sql.listen)
                self._heartbeat(cur)
                yield cur
        finally:
            # A broken connection fails both, and its pool discards it anyway.
            with contextlib.suppress(psycopg.Error):
                conn.execute(self._sql.unlisten)
            with contextlib.suppress(psycopg.Error):
                conn.autocommit = autocommit

    def _heartbeat(self, cur: Cursor) -> float | None:
        """The store's epoch, after checking this connection is listening on the
        channel: the cache must not look live without a working feed (a pooler
        that switched server sessions under us, a LISTEN that never committed)."""
        row = cur.execute(self._sql.heartbeat, (self.channel,)).fetchone()
        if row is None or not row[0]:
            raise StoreError(f"not listening on {self.channel!r}: the connection lost its LISTEN")
        return None if row[1] is None else float(row[1])

    def _revoke_tree(
        self, cur: Cursor, query: Query, params: dict[str, Any], at: float, reason: str
    ) -> list[Lease]:
        # The recursive CTE sees the tree as of its statement's snapshot. A
        # concurrent add that holds a parent FOR SHARE makes the UPDATE wait for
        # that parent, and its child commits after the snapshot: the CTE misses
        # it. Once this transaction holds the locks of every lease it revoked,
        # no such add is still running, so a new statement (a new snapshot)
        # starting from the children of what was just revoked finds them all.
        # Normally that is one extra statement, which finds nothing.
        revoked: list[Lease] = []
        step = params
        while True:
            cur.execute(query, {**step, "at": at, "reason": reason})
            batch = [from_row(row) for row in cur]
            if not batch:
                break
            revoked += batch
            query, step = self._sql.revoke_children, {"ids": [lease.id for lease in batch]}
        if revoked:
            payloads = _payloads(lease.id for lease in revoked)
            cur.execute(_NOTIFY, {"channel": self.channel, "payloads": payloads})
        return revoked


class _Statements:
    """The store's SQL with its schema and column lists filled in, rendered once."""

    def __init__(self, schema: str) -> None:
        self._names = {
            "schema": sql.Identifier(schema),
            "channel": sql.Identifier(f"{schema}_revoked"),
            "columns": sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
            "lease_columns": sql.SQL(", ").join(sql.Identifier("lease", c) for c in COLUMNS),
        }
        self.get = self.render(_GET)
        self.lock_parent = self.render(_LOCK_PARENT)
        self.count_active = self.render(_COUNT_ACTIVE)
        self.count_owner = self.render(_COUNT_ACTIVE_OWNER)
        self.insert = self.render(
            _INSERT,
            values=sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS)),
            excluded=sql.SQL(", ").join(sql.Identifier("excluded", c) for c in COLUMNS),
        )
        self.revoke_id = self.render(_REVOKE_TREE, roots=sql.SQL(_ROOT_ID))
        self.revoke_children = self.render(_REVOKE_TREE, roots=sql.SQL(_ROOT_CHILDREN))
        self.extend = self.render(_EXTEND)
        self.claim_expired = self.render(_CLAIM_EXPIRED)
        self.purge = self.render(_PURGE)
        self.revoked_since = self.render(_REVOKED_SINCE)
        self.listen = self.render(_LISTEN)
        self.unlisten = self.render(_UNLISTEN)
        self.heartbeat = self.render(_HEARTBEAT)
        self.resync = self.render(_RESYNC)
        self.drop_schema = self.render(_DROP_SCHEMA)
        digest = hashlib.blake2b(f"jitbroker:{schema}".encode(), digest_size=8).digest()
        self.lock_key = int.from_bytes(digest, "big", signed=True)  # a bigint advisory key
        self._schema = schema

    def quota_key(self, subject: str) -> int:
        """The advisory lock key of ``subject``'s quotas in this schema."""
        digest = hashlib.blake2b(
            f"jitbroker:{self._schema}:quota:{subject}".encode(), digest_size=8
        ).digest()
        return int.from_bytes(digest, "big", signed=True)

    def compose(self, template: LiteralString, **parts: sql.Composable) -> sql.Composed:
        return sql.SQL(template).format(**self._names, **parts)

    def render(self, template: LiteralString, **parts: sql.Composable) -> bytes:
        # As bytes: psycopg then sends it as is, with no composing on each call
        # (and prepares it once it has run a few times on a connection).
        return self.compose(template, **parts).as_bytes(None)


class _Pool:
    """A small thread-safe pool of autocommit connections made from a DSN.

    An idle connection whose socket has become readable was closed by the
    server (restart, idle timeout, failover) or is otherwise out of step, so it
    is dropped at checkout instead of failing the caller's first query: after
    an outage the same store works again without being rebuilt.
    """

    def __init__(self, dsn: str, *, size: int, timeout: float) -> None:
        if size < 1:
            raise InvalidRequest(f"pool_size must be at least 1, got {size!r}")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise InvalidRequest(f"pool_timeout must be positive seconds, got {timeout!r}")
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError:
            # Not the parser's message: it may quote the DSN, password included.
            raise InvalidRequest("not a valid PostgreSQL connection string") from None
        _check_params(params)
        # Fail fast rather than hang when the server is unreachable; a DSN may override.
        params.setdefault("connect_timeout", 5)
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
                conn = psycopg.connect(self._conninfo, autocommit=True)
                conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED  # see _read_committed
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


@contextmanager
def _read_committed(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """Transactions begun on ``conn`` within the block are READ COMMITTED; on exit
    the connection gets back the isolation level it came with (a caller's pool
    must get its connections back as they were).

    psycopg puts the level in the BEGIN it sends (``BEGIN ISOLATION LEVEL READ
    COMMITTED``): no extra round trip. Under REPEATABLE READ or SERIALIZABLE the
    snapshot would be taken by a transaction's first statement (the quota's
    advisory lock), so the count after it would miss an add committed while it
    waited: the quota would overshoot, or fail with serialization errors. A
    connection lent mid-transaction (which no pool should do) is left alone: the
    level of a transaction already open cannot change.
    """
    previous = conn.isolation_level
    if (
        previous == psycopg.IsolationLevel.READ_COMMITTED
        or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
    ):
        yield
        return
    conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
    try:
        yield
    finally:
        # A broken connection refuses (not idle); its pool discards it anyway.
        with contextlib.suppress(psycopg.Error):
            conn.isolation_level = previous


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
    except psycopg.OperationalError as exc:  # connection lost or refused, shutdown, deadlock
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


def _check_time(name: str, value: float) -> None:
    # PostgreSQL would store NaN and infinities, which the codec then refuses
    # to read back: refuse them before any I/O instead.
    if not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number of seconds, got {value!r}")


def _filter(where: LeaseFilter) -> tuple[sql.Composable, dict[str, Any]]:
    """The filter as a SQL condition (``true`` when empty) and its parameters."""
    fields = [name for name in _FILTER_FIELDS if getattr(where, name) is not None]
    if not fields:
        return sql.SQL("true"), {}
    condition = sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(sql.Identifier(name), sql.Placeholder(name)) for name in fields
    )
    return condition, {name: getattr(where, name) for name in fields}


def _payloads(ids: Iterable[str]) -> list[str]:
    """JSON lists of ``ids``, each small enough for one NOTIFY."""
    payloads: list[str] = []
    chunk: list[str] = []
    size = 2  # the brackets
    for lease_id in ids:
        item = len(json.dumps(lease_id).encode()) + 1  # with its comma (ASCII-only JSON)
        if chunk and size + item > NOTIFY_LIMIT:
            payloads.append(json.dumps(chunk, separators=(",", ":")))
            chunk, size = [], 2
        chunk.append(lease_id)
        size += item
    if chunk:
        payloads.append(json.dumps(chunk, separators=(",", ":")))
    return payloads
