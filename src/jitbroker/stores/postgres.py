"""``PostgresStore``: leases in PostgreSQL, shared by every process and host that uses it.

Every method is one transaction, so each invariant ``LeaseStore`` promises
holds across any number of brokers:

- ``add`` locks the parent row (``FOR SHARE``) while it checks it and inserts
  the child, so a concurrent revoke or claim of the parent waits for the insert
  and then takes the child with it, or the add sees the parent dead and refuses;
- ``revoke`` and ``revoke_where`` call ``jitbroker_revoke``, a function in the
  schema: it updates the active subtree with one recursive CTE, then looks
  again for children that concurrent adds committed while the update waited
  for their parent's lock (see ``_revoke_tree``), then numbers and announces
  the revocation; BEGIN goes in the same message, COMMIT after the answer;
- ``claim_expired`` locks due rows ``FOR UPDATE SKIP LOCKED``, so reapers of
  several brokers take disjoint batches and each lease is claimed once; it is
  one statement, atomic on its own (no BEGIN or COMMIT on an autocommit
  connection), and tells the ``purge`` after it whether it has anything to do;
- each of these writes the event's outbox jobs in its own statement or
  function, so in the same transaction and round trips (``postgres_outbox``).

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
                              and ``revoke_seq`` (the revocation that took it)
    <schema>.caches           one row per live revocation cache: the last
                              revocation it applied, when it said so, and for
                              how long after that it may vouch (strict revoke)
    <schema>.jobs             the outbox: one row per job (``postgres_outbox``)

Each revoke that takes something numbers its leases with the next
``jitbroker_meta.revoke_seq`` and sends ``pg_notify('<schema>_revoked', n)``
inside the revoking transaction (heard when it commits). The payload is a
wake-up call only: anyone may NOTIFY, so revocation caches read the ids from
the table (``postgres_feed.Feed``), and a strict ``revoke`` returns once every live cache
has acknowledged ``n`` in ``caches`` (see ``jitbroker.revocations``).

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
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from time import monotonic
from typing import Any, LiteralString, NamedTuple, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.rows import TupleRow, tuple_row

from .._drive import Step, run
from ..clock import Clock, system_clock
from ..errors import InvalidRequest, StoreError
from ..lease import Lease
from ..revocations import (
    ACK_MARGIN,
    RevocationCache,
    acknowledged,
    sleep,
    start_feed,
)
from ..usage import MAX_USED_BY, Usage, UsageRecord
from .base import NO_OUTBOX, LeaseFilter, Outbox, Quota, event_jobs
from .codec import COLUMNS, from_row, to_row
from .postgres_outbox import (
    CLAIM_JOBS_CTE,
    MIGRATION,
    REVOKE_ARGS,
    JobStatements,
    PostgresOutbox,
    add_params,
    is_no_outbox,
    outbox_params,
)
from .postgres_pool import (
    DEFAULT_TIMEOUT,
    ConnectionSource,
    _Bounded,
    _check_seconds,
    _connect_timeout,
    _Deadline,
    _Pool,
    _translated,
    deadline,
)

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
    # version 4: issuer, task_run and expire_hooks; claims by expire_hooks
    (
        # Who issued a lease, the task run it belongs to, and the on_expire hooks
        # it needs (NULL in rows written before: none). A claim takes only the
        # hooks its broker runs, one range of leases_claim per value ('' for
        # none), ordered by expiry; it replaces leases_due.
        "ALTER TABLE {schema}.leases ADD COLUMN issuer text",
        "ALTER TABLE {schema}.leases ADD COLUMN task_run text",
        "ALTER TABLE {schema}.leases ADD COLUMN expire_hooks text",
        "CREATE INDEX leases_issuer ON {schema}.leases (issuer)",
        "CREATE INDEX leases_task_run ON {schema}.leases (task_run) WHERE task_run IS NOT NULL",
        """CREATE INDEX leases_claim ON {schema}.leases (coalesce(expire_hooks, ''), expires_at)
            WHERE revoked_at IS NULL AND NOT claimed""",
        "DROP INDEX {schema}.leases_due",
    ),
    (
        # The revocation log and the caches that follow it (see the feed): each
        # revoke that takes something numbers its leases with the next
        # jitbroker_meta.revoke_seq; a cache reads the leases numbered past the
        # last it applied, and acknowledges in `caches`.
        "ALTER TABLE {schema}.jitbroker_meta ADD COLUMN revoke_seq bigint NOT NULL DEFAULT 0",
        "ALTER TABLE {schema}.leases ADD COLUMN revoke_seq bigint",
        """CREATE INDEX leases_revoke_seq ON {schema}.leases (revoke_seq)
            WHERE revoke_seq IS NOT NULL""",
        """CREATE TABLE {schema}.caches (
            id text PRIMARY KEY,
            acked bigint NOT NULL,
            seen_at double precision NOT NULL,
            staleness double precision NOT NULL
        )""",
    ),
    # version 6: revoke and claim as one statement each (one round trip)
    (
        # One-statement calls on an autocommit connection run at the session's
        # default isolation level, and both need READ COMMITTED (each statement
        # sees what committed before it began): this raises JB001 otherwise,
        # and the store runs the call again in a READ COMMITTED transaction.
        """CREATE OR REPLACE FUNCTION {schema}.jitbroker_read_committed() RETURNS boolean
            LANGUAGE plpgsql STABLE AS $$
            BEGIN
                IF current_setting('transaction_isolation') <> 'read committed' THEN
                    RAISE EXCEPTION 'jitbroker: this call needs READ COMMITTED'
                        USING ERRCODE = 'JB001';
                END IF;
                RETURN true;
            END $$""",
        # A revoke, whole: the active subtrees under p_roots, then passes from
        # the children of what the last pass took until one takes nothing (see
        # PostgresStore._revoke_tree), then the announcement: the next
        # revoke_seq on what it took, the NOTIFY (a wake-up call, heard at
        # commit), and the live caches still to acknowledge it. The meta row's
        # lock is held until commit, so revocations commit in the order of
        # their numbers and a reader that sees one sees all before it. VOLATILE
        # (the default): at READ COMMITTED each statement in it takes a new
        # snapshot, which the passes rely on. One row per lease taken; none if none.
        """CREATE OR REPLACE FUNCTION {schema}.jitbroker_revoke(
                p_roots text[], p_at double precision, p_reason text, p_channel text,
                p_margin double precision
            ) RETURNS TABLE (
                seq bigint, pending bigint, longest double precision, lease {schema}.leases
            ) LANGUAGE plpgsql AS $$
            DECLARE
                v_roots text[] := p_roots;
                v_parents text[] := ARRAY[]::text[];
                v_batch {schema}.leases[];
                v_taken {schema}.leases[] := ARRAY[]::{schema}.leases[];
                v_seq bigint;
            BEGIN
                PERFORM {schema}.jitbroker_read_committed();
                LOOP
                    -- UNION (not UNION ALL) drops a lease reached twice; the
                    -- UPDATE checks "active" again, so each lease transitions once.
                    WITH RECURSIVE tree (id) AS (
                        SELECT l.id FROM {schema}.leases AS l
                        WHERE (l.id = ANY(v_roots) OR l.parent = ANY(v_parents))
                          AND l.revoked_at IS NULL AND NOT l.claimed AND p_at < l.expires_at
                      UNION
                        SELECT c.id FROM {schema}.leases AS c JOIN tree ON c.parent = tree.id
                        WHERE c.revoked_at IS NULL AND NOT c.claimed AND p_at < c.expires_at
                    ), done AS (
                        UPDATE {schema}.leases AS l
                        SET revoked_at = p_at, revoke_reason = p_reason
                        FROM tree
                        WHERE l.id = tree.id
                          AND l.revoked_at IS NULL AND NOT l.claimed AND p_at < l.expires_at
                        RETURNING l AS taken
                    )
                    SELECT array_agg(done.taken) INTO v_batch FROM done;
                    EXIT WHEN v_batch IS NULL;
                    v_taken := v_taken || v_batch;
                    v_roots := ARRAY[]::text[];
                    v_parents := ARRAY(SELECT b.id FROM unnest(v_batch) AS b);
                END LOOP;
                IF cardinality(v_taken) = 0 THEN
                    RETURN;
                END IF;
                UPDATE {schema}.jitbroker_meta AS meta SET revoke_seq = meta.revoke_seq + 1
                RETURNING meta.revoke_seq INTO v_seq;
                UPDATE {schema}.leases AS l SET revoke_seq = v_seq
                WHERE l.id = ANY(ARRAY(SELECT t.id FROM unnest(v_taken) AS t));
                PERFORM pg_notify(p_channel, v_seq::text);
                -- _WAITING_FOR, for this revocation
                SELECT count(*), coalesce(max(k.seen_at + k.staleness + p_margin - now.t), 0)
                INTO pending, longest
                FROM {schema}.caches AS k,
                    (SELECT extract(epoch FROM clock_timestamp()) AS t) AS now
                WHERE k.acked < v_seq AND k.seen_at + k.staleness + p_margin > now.t;
                RETURN QUERY SELECT v_seq, pending, longest, v_taken[i]
                    FROM generate_subscripts(v_taken, 1) AS i;
            END $$""",
    ),
    # version 7: the outbox (the jobs table, jobs written by jitbroker_revoke)
    # and leases.provider: see postgres_outbox
    MIGRATION,
    # version 8: retired signing keys, read by every broker sharing the schema
    # (invariant 11)
    (
        """CREATE TABLE IF NOT EXISTS {schema}.retired_keys (
            kid text PRIMARY KEY,
            retired_at double precision NOT NULL
        )""",
    ),
    # version 9: lease usage (jitbroker.usage), in the lease's row so a purge
    # takes it too; written by the sweep in batches, never by verify
    (
        """ALTER TABLE {schema}.leases
            ADD COLUMN IF NOT EXISTS last_used_at double precision,
            ADD COLUMN IF NOT EXISTS use_count bigint NOT NULL DEFAULT 0,
            ADD COLUMN IF NOT EXISTS used_by text[] NOT NULL DEFAULT '{{}}'""",
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
_RETIRE_KEY = """
    INSERT INTO {schema}.retired_keys (kid, retired_at) VALUES (%(kid)s, %(at)s)
    ON CONFLICT (kid) DO NOTHING
"""
_RETIRED_KEYS = "SELECT kid, retired_at FROM {schema}.retired_keys"
# A retirement just recorded (its row inserted by _RETIRE_KEY in the same
# transaction), announced as a revocation is (see jitbroker_revoke): the next
# revoke_seq, the NOTIFY, and the live caches still to acknowledge it. The meta
# row stays locked until commit, so numbers commit in order and a feed that
# reads the number reads the row. One row: seq, pending, longest.
_ANNOUNCE_RETIRED = """
    WITH meta AS (
        UPDATE {schema}.jitbroker_meta SET revoke_seq = revoke_seq + 1 RETURNING revoke_seq
    )
    SELECT meta.revoke_seq, w.pending, w.longest, pg_notify(%(channel)s, meta.revoke_seq::text)
    FROM meta, LATERAL (
        SELECT count(*) AS pending,
            coalesce(max(k.seen_at + k.staleness + {margin} - now.t), 0) AS longest
        FROM {schema}.caches AS k, (SELECT extract(epoch FROM clock_timestamp()) AS t) AS now
        WHERE k.acked < meta.revoke_seq AND k.seen_at + k.staleness + {margin} > now.t
    ) AS w
"""
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
    ON CONFLICT (id) DO UPDATE SET ({columns}, claimed, revoke_seq) = ROW({excluded}, false, NULL)
"""

# A revoke (see jitbroker_revoke, schema version 7): one statement, so on an
# autocommit connection one round trip. {roots} is the text[] of root ids,
# {jobs} empty or the outbox's arguments (postgres_outbox.REVOKE_ARGS); the
# leases taken come back in the codec's COLUMNS order after seq, pending, longest.
_REVOKE = """
    SELECT r.seq, r.pending, r.longest, {revoked_columns}
    FROM {schema}.jitbroker_revoke(
        {roots}, %(at)s, %(reason)s, %(channel)s, {margin}{jobs}
    ) AS r
"""
_ROOT_ID: LiteralString = "ARRAY[%(id)s]::text[]"
_ROOT_WHERE: LiteralString = """ARRAY(
    SELECT id FROM {schema}.leases
    WHERE ({where}) AND revoked_at IS NULL AND NOT claimed AND %(at)s < expires_at
)"""

# The live caches that have not applied revocation {seq}, and the seconds
# until the last of them can no longer vouch (see jitbroker.revocations). A
# cache may vouch until seen_at + staleness; the margin covers clock rates.
# (jitbroker_revoke runs the same query for the revocation it announces.)
_WAITING_FOR = """
    SELECT count(*) AS pending, coalesce(max(seen_at + staleness + {margin} - now.t), 0) AS longest
    FROM {schema}.caches, (SELECT extract(epoch FROM clock_timestamp()) AS t) AS now
    WHERE acked < {seq} AND seen_at + staleness + {margin} > now.t
"""

_EXTEND = """
    UPDATE {schema}.leases SET expires_at = %(expires_at)s
    WHERE id = %(id)s AND revoked_at IS NULL AND NOT claimed AND %(at)s < expires_at
    RETURNING {columns}
"""

# SKIP LOCKED: a reaper passes over rows another reaper is claiming right now
# instead of waiting for them; a row claimed since this statement's snapshot is
# re-read under its lock and dropped (no longer NOT claimed). Only the hooks the
# claimer runs (%(hooks)s: its expire_hooks values, and '' for none), one range
# of leases_claim each: leases awaiting other hooks are never read. A row locked
# by a range but left out by the outer LIMIT stays unclaimed. One statement,
# atomic on its own: on an autocommit connection one round trip, checked to run
# at READ COMMITTED (jitbroker_read_committed, before any row is read). It also
# reads the oldest expiry among the leases dead before it (``floor``, NULL if
# none; leases_dead's first entry), on a row of its own when nothing was
# claimed, so a purge right after it knows whether it has anything to delete.
# And it records the on_expire jobs of what it claimed ({recorded}, see
# postgres_outbox.CLAIM_JOBS_CTE).
_CLAIM_EXPIRED = """
    WITH due AS (
        SELECT pick.id FROM (
            SELECT hooks FROM unnest(%(hooks)s::text[]) AS hooks
            WHERE {schema}.jitbroker_read_committed()
        ) AS need
        CROSS JOIN LATERAL (
            SELECT id, expires_at FROM {schema}.leases
            WHERE coalesce(expire_hooks, '') = need.hooks
              AND revoked_at IS NULL AND NOT claimed AND expires_at <= %(now)s
            ORDER BY expires_at
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        ) AS pick
        ORDER BY pick.expires_at
        LIMIT %(limit)s
    ), taken AS (
        UPDATE {schema}.leases AS lease SET claimed = true
        FROM due WHERE lease.id = due.id
        RETURNING lease AS snapshot, {lease_columns}
    ), {recorded}
    SELECT dead.floor, {taken_columns} FROM (
        SELECT min(expires_at) AS floor FROM {schema}.leases
        WHERE revoked_at IS NOT NULL OR claimed
    ) AS dead LEFT JOIN taken ON true
"""
_AWAITING = """
    SELECT expire_hooks, count(*) FROM {schema}.leases
    WHERE expire_hooks IS NOT NULL
      AND revoked_at IS NULL AND NOT claimed AND expires_at <= %(now)s
    GROUP BY expire_hooks
"""
# Active leases, for health(): the predicate is leases_claim's (and
# leases_live_subject's), so the count reads one of those partial indexes, which
# hold only leases awaiting their claim, never the dead ones a retention keeps.
_COUNT_LIVE = """
    SELECT count(*) FROM {schema}.leases
    WHERE revoked_at IS NULL AND NOT claimed AND expires_at > %(now)s
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
# A resync: the epoch, the last revocation's number, the recent revocations
# and every retired kid, in one snapshot.
_RESYNC = """
SELECT (SELECT epoch FROM {schema}.jitbroker_meta),
    (SELECT revoke_seq FROM {schema}.jitbroker_meta),
    ARRAY(
        SELECT id FROM {schema}.leases
        WHERE (revoked_at IS NOT NULL OR claimed) AND expires_at >= %s
    ),
    ARRAY(SELECT kid FROM {schema}.retired_keys)
"""
# A feed's round: acknowledge what it applied (and that it is alive), and read
# whether it is still listening, the epoch, the last revocation's number and
# the ids revoked after what it applied, and, if anything was numbered since,
# every retired kid (one snapshot). A retirement takes a number but marks no
# lease, so the kids are read whole: the table holds a handful of rows, and the
# cache keeps only the new ones (no schema change for the feed to carry them).
_CATCH_UP = """
WITH ack AS (
    INSERT INTO {schema}.caches (id, acked, seen_at, staleness)
    VALUES (%(id)s, %(acked)s, extract(epoch FROM clock_timestamp()), %(staleness)s)
    ON CONFLICT (id) DO UPDATE SET acked = EXCLUDED.acked, seen_at = EXCLUDED.seen_at
)
SELECT %(channel)s IN (SELECT pg_listening_channels()), meta.epoch, meta.revoke_seq, ARRAY(
    SELECT id FROM {schema}.leases
    WHERE revoke_seq > %(acked)s AND revoke_seq <= meta.revoke_seq
), ARRAY(
    SELECT kid FROM {schema}.retired_keys WHERE meta.revoke_seq > %(acked)s
) FROM (SELECT epoch, revoke_seq FROM {schema}.jitbroker_meta LIMIT 1) AS meta
"""
# Why "LIMIT 1" and scalar subqueries over the one meta row: the planner has no
# statistics for that table and guesses it holds ~1,700 rows, multiplies the
# ARRAY's cost by that, passes jit_above_cost and JIT-compiles every round
# (140 ms each, measured with 100,000 leases): revokes then waited for that.
# A feed's first statement: the cache, as having applied nothing yet.
_REGISTER = """
INSERT INTO {schema}.caches (id, acked, seen_at, staleness)
VALUES (%(id)s, 0, extract(epoch FROM clock_timestamp()), %(staleness)s)
"""
# A cache that stops following: no revoke waits for it. Rows of caches silent
# for an hour go too (killed processes leave theirs).
_LEAVE = """
DELETE FROM {schema}.caches
WHERE id = %(id)s OR seen_at + staleness < extract(epoch FROM clock_timestamp()) - 3600
"""
_PURGE = """
    DELETE FROM {schema}.leases
    WHERE (revoked_at IS NOT NULL OR claimed) AND expires_at < %(before)s
"""

# One UPDATE for a whole batch (arrays, one element per lease): the later time,
# the summed count, the audiences in first-seen order, at most %(max)s. Ids of
# leases not stored match no row. used_by arrives as JSON text per lease (a
# ragged text[][] cannot be sent).
_RECORD_USAGE = """
    UPDATE {schema}.leases AS l SET
        last_used_at = greatest(l.last_used_at, u.last),
        use_count = l.use_count + u.uses,
        used_by = ARRAY(
            SELECT x.a FROM unnest(
                l.used_by || ARRAY(SELECT jsonb_array_elements_text(u.by::jsonb))
            ) WITH ORDINALITY AS x(a, o)
            GROUP BY x.a ORDER BY min(x.o) LIMIT %(max)s
        )
    FROM unnest(%(ids)s::text[], %(last)s::float8[], %(uses)s::bigint[], %(by)s::text[])
        AS u(id, last, uses, by)
    WHERE l.id = u.id
"""
_LEASE_USAGE = """
    SELECT id, last_used_at, use_count, used_by FROM {schema}.leases
    WHERE id = ANY(%(ids)s::text[]) AND use_count > 0
"""

_FILTER_FIELDS = ("task", "parent", "owner", "subject", "key_id", "issuer", "task_run", "provider")
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,54}")  # + "_revoked" fits in 63 bytes
#: Transactions that lost a deadlock or serialization race were rolled back
#: whole, so they are safe to run again; this many attempts in all.
_ATTEMPTS = 3
#: The SQLSTATE jitbroker_read_committed raises outside READ COMMITTED.
_NOT_READ_COMMITTED = "JB001"
#: What a revoke on an autocommit connection sends before its statement.
_BEGIN = b"BEGIN ISOLATION LEVEL READ COMMITTED; "


class PostgresStore(PostgresOutbox):
    """Leases in PostgreSQL (sync, psycopg 3), shared by every broker that uses the
    same database and ``schema``. Install with ``pip install 'jitbroker[postgres]'``.

    ``dsn_or_pool`` is a connection string (the store then keeps its own pool
    of up to ``pool_size`` connections, waits at most ``pool_timeout`` seconds
    for a free one, and replaces broken ones on the next call), or an object
    with a ``connection()`` context manager such as a
    ``psycopg_pool.ConnectionPool`` (left open by ``close``).

    ``timeout`` (seconds, 5 by default) bounds how long one call waits for
    PostgreSQL's answers, from the moment it has a connection to its last
    answer: every statement of the call together, COMMIT and retries included.
    Past it the call raises ``StoreUnavailable`` and its connection is closed,
    never reused (a frozen or unreachable server fails each call cleanly; see
    ``jitbroker.stores.postgres_pool``). It applies to a caller's pool as well.
    Opening a new connection is bounded by libpq's ``connect_timeout``, which
    defaults to ``timeout`` rounded up to whole seconds (2 at least) unless the
    DSN sets it.

    The schema is created, or migrated forward, when the store opens; a schema
    written by a newer jitbroker is refused with ``StoreError``. The schema
    belongs to the store: ``clear`` drops it with everything in it.

    Revocations are numbered and announced on the channel ``channel``
    (``<schema>_revoked``) by their number; ``revocations()`` follows them, and
    with ``strict_revocations`` (the default) ``revoke`` waits for every live
    cache. Each call waits at most ``timeout`` seconds for the server (see
    ``postgres_pool.deadline``). Failing to reach PostgreSQL raises
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
        timeout: float = DEFAULT_TIMEOUT,
        create: bool = True,
        strict_revocations: bool = True,
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
        #: Seconds one call may wait for PostgreSQL's answers (see above).
        self.timeout = _check_seconds("timeout", timeout)
        self._source: ConnectionSource
        if isinstance(dsn_or_pool, str):
            self._source = _Pool(
                dsn_or_pool,
                size=pool_size,
                timeout=pool_timeout,
                connect_timeout=_connect_timeout(self.timeout),
            )
        else:
            self._source = dsn_or_pool
        self._sql = _Statements(schema)
        self._jobs_sql = JobStatements(self._sql.render, self._sql.insert_composed)
        self._create = create  # False: refuse a database without the schema (the CLI)
        # The oldest expiry among dead leases as the last claim saw it (inf:
        # none), for the purge right after it; None: unknown (see ``purge``).
        self._dead_floor: float | None = None
        #: Whether ``revoke`` waits for every live revocation cache (see
        #: ``jitbroker.revocations``); False gives the feed's latency back to
        #: the caller: a cache may then accept a revoked token for milliseconds.
        self.strict_revocations = bool(strict_revocations)
        _check_psycopg(psycopg.__version__)
        try:
            self._call("open the lease schema", self._migrate)
        except BaseException:
            self.close()  # the caller never gets the store, so it cannot close it
            raise

    def __repr__(self) -> str:
        return f"<PostgresStore schema={self.schema!r}>"  # never the DSN: it may hold a password

    # -- the protocol ------------------------------------------------------
    def add(
        self, lease: Lease, quotas: Sequence[Quota] = (), *, outbox: Outbox = NO_OUTBOX
    ) -> bool:
        """Store ``lease`` and its ``on_issue`` jobs; False (nothing written) if its
        parent is not active; ``QuotaExceeded`` (nothing written) if a quota is full."""
        for name in ("issued_at", "expires_at", "max_expires_at", "revoked_at"):
            value = getattr(lease, name)
            if value is not None:
                _check_time(name, value)
        row: tuple[Any, ...] = to_row(lease)
        insert = self._sql.insert
        jobs = event_jobs("on_issue", lease, outbox, lease.issued_at)
        if jobs:  # written by the lease's INSERT statement itself: no round trip more
            _check_time("until", outbox.until)
            insert, row = self._jobs_sql.add(len(jobs)), (*row, *add_params(jobs))

        def work(cur: Cursor) -> bool:
            if quotas:
                self._check_quotas(cur, lease, quotas)
            if lease.parent is not None:
                cur.execute(self._sql.lock_parent, {"id": lease.parent, "at": lease.issued_at})
                if cur.fetchone() is None:
                    return False
            cur.execute(insert, row)
            return True

        # A root lease without quotas is one INSERT: atomic on its own, so on an
        # autocommit connection it needs no BEGIN/COMMIT (one round trip, not three).
        alone = lease.parent is None and not quotas
        stored = self._call("store a lease", work, atomic=not alone)
        if lease.revoked_at is not None:
            self._dead_floor = None  # stored dead
        return stored

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

    def revoke(
        self, lease_id: str, *, at: float, reason: str, outbox: Outbox = NO_OUTBOX
    ) -> list[Lease]:
        """Revoke the lease and its active descendants, recording their
        ``on_revoke`` jobs; those that transitioned."""
        _check_time("at", at)
        params: dict[str, Any] = {"id": lease_id}
        query = self._sql.revoke_id
        if not is_no_outbox(outbox):
            query, params = self._sql.revoke_id_jobs, {**params, **outbox_params(outbox)}
        return self._acked(self._revoke_tree("revoke a lease", query, params, at, reason))

    def revoke_where(
        self, where: LeaseFilter, *, at: float, reason: str, outbox: Outbox = NO_OUTBOX
    ) -> list[Lease]:
        """Revoke every active lease matching ``where`` and their descendants,
        recording their ``on_revoke`` jobs."""
        _check_time("at", at)
        condition, params = _filter(where)
        roots = self._sql.compose(_ROOT_WHERE, where=condition)
        custom = not is_no_outbox(outbox)
        query = self._sql.revoke(roots, outbox=custom)
        if custom:
            params.update(outbox_params(outbox))
        return self._acked(self._revoke_tree("revoke leases", query, params, at, reason))

    def _acked(self, revoked: _Revoked) -> list[Lease]:
        """The leases, once every live cache has the revocation (if strict; see
        ``jitbroker.revocations.acknowledged``). The transaction has committed."""
        if self.strict_revocations and revoked.waiting[0]:
            run(acknowledged(revoked.seq, revoked.waiting, self._waiting_for, sleep), None)
        return revoked.leases

    def _waiting_for(self, seq: int) -> Step:
        def look(_: object) -> tuple[int, float]:
            def work(cur: Cursor) -> tuple[int, float]:
                row = cur.execute(self._sql.waiting, {"seq": seq}).fetchone()
                return (0, 0.0) if row is None else (int(row[0]), float(row[1]))

            return self._call("read the caches' acknowledgements", work, atomic=False)

        return look

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

    def claim_expired(
        self,
        now: float,
        limit: int = 1000,
        expire_hooks: Collection[str] = (),
        *,
        outbox: Outbox = NO_OUTBOX,
    ) -> list[Lease]:
        """Leases expired by ``now`` and not yet claimed, each handed out exactly once
        with its ``on_expire`` jobs recorded: those needing no hook, and those
        whose ``expire_hooks`` is in ``expire_hooks``."""
        _check_time("now", now)
        if limit <= 0:
            return []
        params = {
            "now": now,
            "limit": int(limit),
            "hooks": ["", *expire_hooks],
            **outbox_params(outbox),
        }

        def work(cur: Cursor) -> tuple[float, list[Lease]]:
            rows = cur.execute(self._sql.claim_expired, params).fetchall()
            floor = math.inf if not rows or rows[0][0] is None else float(rows[0][0])
            return floor, [from_row(row[1:]) for row in rows if row[1] is not None]

        floor, claimed = self._call("claim expired leases", work, statement=True)
        self._dead_floor = min([floor, *(lease.expires_at for lease in claimed)])
        return claimed

    def retire_key(self, kid: str, at: float) -> bool:
        """Record ``kid`` as retired at ``at``, numbered and announced like a
        revocation in the same transaction, so the revocation feed carries it;
        if strict, wait for every live cache as ``revoke`` does. True if this
        call recorded it."""
        _check_time("at", at)
        params = {"kid": kid, "at": at, "channel": self.channel}

        def work(cur: Cursor) -> tuple[int, tuple[int, float]] | None:
            if cur.execute(self._sql.retire_key, params).rowcount != 1:
                return None  # retired before, and announced then
            row = cur.execute(self._sql.announce_retired, params).fetchone()
            if row is None:
                raise StoreError("the lease schema has no meta row")
            return int(row[0]), (int(row[1]), float(row[2]))

        announced = self._call("record a retired key", work)
        if announced is None:
            return False
        seq, waiting = announced
        if self.strict_revocations and waiting[0]:
            run(acknowledged(seq, waiting, self._waiting_for, sleep), None)
        return True

    def retired_keys(self) -> dict[str, float]:
        """Every retired kid and when it was retired."""

        def work(cur: Cursor) -> dict[str, float]:
            rows = cur.execute(self._sql.retired_keys).fetchall()
            return {str(kid): float(at) for kid, at in rows}

        return self._call("read the retired keys", work, atomic=False)

    def awaiting_hooks(self, now: float) -> dict[str, int]:
        """Expired, unclaimed leases that need hooks, per ``expire_hooks`` value."""
        _check_time("now", now)

        def work(cur: Cursor) -> dict[str, int]:
            rows = cur.execute(self._sql.awaiting_hooks, {"now": now})
            return {str(hooks): int(n) for hooks, n in rows}

        return self._call("count leases awaiting hooks", work, atomic=False)

    def count_active(self, now: float) -> int:
        """How many leases are active at ``now`` (neither revoked, claimed nor
        expired), for ``health()``. One statement over a partial index of the
        leases awaiting their claim: O(active leases) (PostgreSQL counts by
        visiting entries; docs/metrics.md has the figure at 100k and 1M)."""
        _check_time("now", now)

        def work(cur: Cursor) -> int:
            row = cur.execute(self._sql.count_live, {"now": now}).fetchone()
            return 0 if row is None else int(row[0])

        return self._call("count active leases", work, atomic=False)

    def purge(self, before: float) -> int:
        """Delete dead leases (revoked or claimed) with ``expires_at < before``; how many.

        Right after a ``claim_expired`` (a sweep's last step) that saw no dead
        lease expired before ``before``, this returns 0 without asking the
        server: the claim read the oldest dead lease's expiry, and this store
        has written nothing since. A lease that died meanwhile through another
        store (another broker) is purged by the next sweep."""
        _check_time("before", before)
        floor, self._dead_floor = self._dead_floor, None  # good for one purge
        if floor is not None and floor >= before:
            return 0

        def work(cur: Cursor) -> int:
            return cur.execute(self._sql.purge, {"before": before}).rowcount

        # One DELETE, atomic on its own: no transaction around it (a purge that
        # loses a race with another at REPEATABLE READ is retried by _call).
        return self._call("purge dead leases", work, atomic=False)

    def record_usage(self, batch: Sequence[UsageRecord]) -> None:
        """Merge the batch into the leases' rows: one UPDATE, one round trip."""
        if not batch:
            return
        for rec in batch:
            _check_time("last_used_at", rec.last_used_at)
        params = {
            "max": MAX_USED_BY,
            "ids": [rec.lease_id for rec in batch],
            "last": [rec.last_used_at for rec in batch],
            "uses": [rec.uses for rec in batch],
            "by": [json.dumps(list(rec.used_by)) for rec in batch],
        }

        def work(cur: Cursor) -> None:
            cur.execute(self._sql.record_usage, params)

        self._call("record lease usage", work, atomic=False)

    def lease_usage(self, lease_ids: Collection[str]) -> dict[str, Usage]:
        """The usage of those of ``lease_ids`` that were ever used."""

        def work(cur: Cursor) -> dict[str, Usage]:
            rows = cur.execute(self._sql.lease_usage, {"ids": list(lease_ids)}).fetchall()
            return {
                str(i): Usage(float(last), int(n), tuple(by))
                for i, last, n, by in rows
                if last is not None
            }

        return self._call("read lease usage", work, atomic=False)

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
        """A ``RevocationCache`` that follows this store's revocations, for
        ``Verifier(..., store=store, revocations=...)`` (see ``jitbroker.revocations``).

        It holds one connection of the pool while it runs, LISTENing on the
        store's channel, but a notification is only a wake-up call: the feed
        reads the revoked ids from the leases table (numbered, so nothing is
        skipped whatever the notifications do), at once when woken and every
        ``heartbeat`` seconds anyway, and acknowledges them in the store's
        ``caches`` table so strict revocations wait for it (a verifier with a
        cache needs INSERT, UPDATE and DELETE on that table). ``window`` must be
        at least the longest token lifetime plus leeway; ``clock`` is the
        brokers' clock (a resync loads the leases that died and expired at most
        a minute before its "now"); ``close()`` the cache to stop its thread."""
        cache = RevocationCache(window=window, max_staleness=max_staleness)

        from .postgres_feed import Feed  # the feed needs this module: imported late

        def session(cache: RevocationCache, stop: threading.Event) -> None:
            with (
                _translated("follow revocations"),
                self._source.connection() as conn,
                self._listening(conn) as cur,
            ):
                # On the listening connection itself: a pool of one still works.
                Feed(self, conn, cur, cache, heartbeat).follow(stop, clock)

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
        self._dead_floor = None

    # -- internals -----------------------------------------------------------
    def _call(
        self,
        action: str,
        work: Callable[[Cursor], T],
        *,
        atomic: bool = True,
        statement: bool = False,
    ) -> T:
        """Run ``work`` on a pooled connection, in one transaction if ``atomic``
        (reads are single statements and need none on an autocommit connection).

        ``statement``: ``work`` is one statement, atomic on its own, that needs
        READ COMMITTED and checks it (``jitbroker_read_committed``). On an
        autocommit connection it runs alone, in one round trip; if the session
        defaults to another level it fails with JB001 before touching a row, and
        runs again in a transaction begun READ COMMITTED.

        The transaction runs at READ COMMITTED whatever the server's, role's or
        pool's default (see ``_read_committed``): the quota count after its
        advisory lock, revoke's second pass and claim's SKIP LOCKED all rely on
        each statement seeing what committed before it began.

        Every wait for the server's answers counts against one deadline,
        ``timeout`` seconds after the call first has a connection, retries
        included (see ``postgres_pool.deadline``)."""
        with _translated(action):
            limit: _Deadline | None = None
            for attempt in range(1, _ATTEMPTS + 1):
                try:
                    with self._source.connection() as conn:
                        if limit is None:
                            limit = _Deadline(monotonic() + self.timeout, self.timeout)
                        with (
                            _Bounded(conn, limit),
                            _read_committed(conn),
                            conn.cursor(row_factory=tuple_row) as cur,
                        ):
                            if conn.autocommit and (statement or not atomic):
                                try:
                                    return work(cur)
                                except psycopg.Error as exc:
                                    if not statement or exc.sqlstate != _NOT_READ_COMMITTED:
                                        raise
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
                with deadline(conn, self.timeout):
                    cur.execute(self._sql.listen)
                    self._heartbeat(cur)
                yield cur
        finally:
            # A broken connection fails both, and its pool discards it anyway.
            with contextlib.suppress(psycopg.Error), deadline(conn, self.timeout):
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
        self, action: str, query: Query, params: dict[str, Any], at: float, reason: str
    ) -> _Revoked:
        # One statement, jitbroker_revoke, does it all. Its first pass (a
        # recursive CTE) sees the tree as of that statement's snapshot. A
        # concurrent add that holds a parent FOR SHARE makes the UPDATE wait for
        # that parent, and its child commits after the snapshot: the CTE misses
        # it. Once this transaction holds the locks of every lease it revoked,
        # no such add is still running, so a new statement (a new snapshot: the
        # function is VOLATILE and runs at READ COMMITTED) starting from the
        # children of what was just revoked finds them all. The function loops
        # so until a pass takes nothing: normally one extra pass, server-side.
        params = {**params, "at": at, "reason": reason, "channel": self.channel}

        def work(cur: Cursor) -> _Revoked:
            conn = cur.connection
            if not conn.autocommit:  # in the transaction _call began
                return _read_revoked(cur.execute(query, params))
            # BEGIN travels with the call, in one simple-query message (so the
            # parameters are bound client-side, by psycopg's quoting): two round
            # trips, not three. COMMIT waits for the answer, so a revoke cut
            # short by the deadline never commits; in the same message it would.
            text = psycopg.ClientCursor(conn).mogrify(query, params)
            try:
                cur.execute(_BEGIN + text.encode(conn.info.encoding))
                cur.nextset()
                revoked = _read_revoked(cur)
                cur.execute(b"COMMIT")
            except BaseException:
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    with contextlib.suppress(psycopg.Error):
                        cur.execute(b"ROLLBACK")
                raise
            return revoked

        revoked = self._call(action, work, atomic=False)
        self._dead_floor = None  # what it revoked is dead now
        return revoked


class _Revoked(NamedTuple):
    """What a revoke transaction did: the leases it took, the revocation's number
    (0: none), and the caches to wait for (``acknowledged``'s ``waiting``)."""

    leases: list[Lease]
    seq: int
    waiting: tuple[int, float]


class _Statements:
    """The store's SQL with its schema and column lists filled in, rendered once."""

    def __init__(self, schema: str) -> None:
        self._names = {
            "schema": sql.Identifier(schema),
            "channel": sql.Identifier(f"{schema}_revoked"),
            "columns": sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
            "lease_columns": sql.SQL(", ").join(sql.Identifier("lease", c) for c in COLUMNS),
            "revoked_columns": sql.SQL(", ").join(
                sql.SQL("(r.lease).{}").format(sql.Identifier(c)) for c in COLUMNS
            ),
            "taken_columns": sql.SQL(", ").join(sql.Identifier("taken", c) for c in COLUMNS),
            "margin": sql.Literal(ACK_MARGIN),
        }
        self.get = self.render(_GET)
        self.retire_key = self.render(_RETIRE_KEY)
        self.retired_keys = self.render(_RETIRED_KEYS)
        self.announce_retired = self.render(_ANNOUNCE_RETIRED)
        self.lock_parent = self.render(_LOCK_PARENT)
        self.count_active = self.render(_COUNT_ACTIVE)
        self.count_owner = self.render(_COUNT_ACTIVE_OWNER)
        self.insert_composed = self.compose(
            _INSERT,
            values=sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS)),
            excluded=sql.SQL(", ").join(sql.Identifier("excluded", c) for c in COLUMNS),
        )
        self.insert = self.insert_composed.as_bytes(None)
        self.revoke_id = self.revoke(sql.SQL(_ROOT_ID), outbox=False).as_bytes(None)
        self.revoke_id_jobs = self.revoke(sql.SQL(_ROOT_ID), outbox=True).as_bytes(None)
        self.extend = self.render(_EXTEND)
        self.claim_expired = self.render(_CLAIM_EXPIRED, recorded=self.compose(CLAIM_JOBS_CTE))
        self.awaiting_hooks = self.render(_AWAITING)
        self.count_live = self.render(_COUNT_LIVE)
        self.purge = self.render(_PURGE)
        self.record_usage = self.render(_RECORD_USAGE)
        self.lease_usage = self.render(_LEASE_USAGE)
        self.revoked_since = self.render(_REVOKED_SINCE)
        self.listen = self.render(_LISTEN)
        self.unlisten = self.render(_UNLISTEN)
        self.heartbeat = self.render(_HEARTBEAT)
        self.resync = self.render(_RESYNC)
        self.catch_up = self.render(_CATCH_UP)
        self.register = self.render(_REGISTER)
        self.leave = self.render(_LEAVE)
        self.waiting = self.render(_WAITING_FOR, seq=sql.Placeholder("seq"))
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

    def revoke(self, roots: sql.Composable, *, outbox: bool) -> sql.Composed:
        """The revoke of ``roots``, with the outbox's arguments if ``outbox``
        (without, the function's defaults: ``NO_OUTBOX``)."""
        jobs = sql.SQL(REVOKE_ARGS if outbox else "")
        return self.compose(_REVOKE, roots=roots, jobs=jobs)

    def compose(self, template: LiteralString, **parts: sql.Composable) -> sql.Composed:
        return sql.SQL(template).format(**self._names, **parts)

    def render(self, template: LiteralString, **parts: sql.Composable) -> bytes:
        # As bytes: psycopg then sends it as is, with no composing on each call
        # (and prepares it once it has run a few times on a connection).
        return self.compose(template, **parts).as_bytes(None)


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


#: The oldest psycopg this store runs on. Older 3.2 releases lose notifications
#: received outside ``notifies()`` (3.2.0-3.2.3) or keep every notification a
#: handler received in a backlog that grows forever (up to 3.2.9). The feed no
#: longer depends on notifications arriving, but the floor is checked here
#: anyway: the package's own requirement can be bypassed.
PSYCOPG_REQUIRED = (3, 2, 10)


def _check_psycopg(version: str) -> None:
    """Refuse a psycopg older than ``PSYCOPG_REQUIRED`` (``StoreError``)."""
    parts = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    found = tuple(int(p) for p in parts.groups()) if parts else (0, 0, 0)
    if found < PSYCOPG_REQUIRED:
        need = ".".join(map(str, PSYCOPG_REQUIRED))
        raise StoreError(
            f"PostgresStore needs psycopg {need} or newer, found {version}:"
            f" pip install 'psycopg[binary]>={need}'"
        )


def _read_revoked(cur: Cursor) -> _Revoked:
    """What ``jitbroker_revoke`` answered: seq, pending, longest, then a lease's
    columns, on each row (no row: it took nothing)."""
    rows = cur.fetchall()
    if not rows:
        return _Revoked([], 0, (0, 0.0))
    seq, pending, longest = rows[0][:3]
    return _Revoked([from_row(row[3:]) for row in rows], int(seq), (int(pending), float(longest)))


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
