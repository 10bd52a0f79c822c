"""The PostgreSQL store's outbox (``stores.base``): the ``jobs`` table, the SQL
that records a lease event's jobs inside the event's own transaction, and the
job methods ``PostgresStore`` takes from ``PostgresOutbox``.

Layout, schema version 7 (``MIGRATION``)::

    <schema>.jobs   one row per ``Job``: ``lease`` is its snapshot (the codec's
                    mapping, as jsonb), ``kind`` is ``event || ':' || name``
                    (generated), ``claim`` holds it until ``due``;
                    ``jobs_claim`` (kind, due, id) over unparked jobs serves
                    ``claim_jobs``, ``jobs_parked`` (due, id) the parked list

Where each event writes its jobs, so that no crash leaves one without the other,
and at no round trip beyond the event's own:

- ``add``: ``event_jobs`` in Python, inserted by the lease's INSERT itself (a
  data-modifying CTE, ``JobStatements.add``): still one statement;
- ``revoke`` and ``revoke_where``: inside ``jitbroker_revoke``, for the revoked
  leases it took; its outbox arguments default to ``NO_OUTBOX``, so a caller
  that has none sends the same five-argument call as before (and a jitbroker
  of schema version 6 still revokes, recording its providers' revokes);
- ``claim_expired``: a CTE of its one statement, for the leases it claimed.

Those two build their rows with ``jitbroker_event_jobs``, ``event_jobs`` in SQL
(the tests compare the two, case by case): a STABLE SQL function, which the
planner inlines. Every insert is insert-if-absent (``ON CONFLICT DO NOTHING``).

Not public API: ``PostgresStore`` is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, LiteralString

from psycopg import sql

from ..errors import InvalidRequest, StoreError
from .base import NO_OUTBOX, Job, Outbox
from .codec import from_mapping

if TYPE_CHECKING:
    from .postgres import Cursor, T

__all__ = [
    "CLAIM_JOBS_CTE",
    "MIGRATION",
    "REVOKE_ARGS",
    "JobStatements",
    "PostgresOutbox",
    "add_params",
    "is_no_outbox",
    "outbox_params",
    "read_job",
]

# -- the schema (version 7) --------------------------------------------------------
# Appended to postgres._MIGRATIONS; like every migration, never changed once released.
MIGRATION: tuple[LiteralString, ...] = (
    # The provider holding a lease's backend credential. revoke_where(provider=)
    # and reconciliation read the few leases that have one.
    "ALTER TABLE {schema}.leases ADD COLUMN provider text",
    "CREATE INDEX leases_provider ON {schema}.leases (provider) WHERE provider IS NOT NULL",
    """CREATE TABLE {schema}.jobs (
        id text PRIMARY KEY,
        event text NOT NULL,
        name text NOT NULL,
        kind text GENERATED ALWAYS AS (event || ':' || name) STORED,
        lease jsonb NOT NULL,
        due double precision NOT NULL,
        attempt_limit integer NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        error text NOT NULL DEFAULT '',
        parked boolean NOT NULL DEFAULT false,
        claim text
    )""",
    # What claim_jobs reads: one range per kind, in its order (due, then id: a
    # revoke's jobs share their due, and the id decides the rest without a
    # sort of every due job of a backlog).
    "CREATE INDEX jobs_claim ON {schema}.jobs (kind, due, id) WHERE NOT parked",
    "CREATE INDEX jobs_parked ON {schema}.jobs (due, id) WHERE parked",
    # stores.base.event_jobs, row for row: one job per hook (for on_expire,
    # the names in each lease's expire_hooks), then the lease's provider's
    # create (on_issue) or revoke. Held by p_claim until p_until, or due at
    # p_at unclaimed (a provider job: unless p_providers has it). The snapshot
    # leaves out the store's own columns.
    r"""CREATE FUNCTION {schema}.jitbroker_event_jobs(
            p_event text, p_leases {schema}.leases[], p_at double precision, p_hooks text[],
            p_providers text[], p_claim text, p_until double precision, p_limit integer
        ) RETURNS TABLE (
            id text, event text, name text, lease jsonb, due double precision,
            attempt_limit integer, claim text
        ) LANGUAGE sql STABLE AS $$
            SELECT l.id || '/' || j.event || '/' || j.name, j.event, j.name,
                to_jsonb(l) - 'claimed' - 'revoke_seq',
                CASE WHEN j.held THEN p_until ELSE p_at END, p_limit,
                CASE WHEN j.held THEN p_claim END
            FROM unnest(p_leases) AS l CROSS JOIN LATERAL (
                SELECT p_event, h.name, p_claim IS NOT NULL
                FROM unnest(CASE WHEN p_event = 'on_expire'
                    THEN regexp_split_to_array(coalesce(l.expire_hooks, ''), '\s+')
                    ELSE p_hooks END) AS h (name)
                WHERE p_event <> 'on_expire' OR h.name <> ''
              UNION ALL
                SELECT CASE WHEN p_event = 'on_issue' THEN 'create' ELSE 'revoke' END,
                    l.provider, p_claim IS NOT NULL AND l.provider = ANY(p_providers)
                WHERE l.provider IS NOT NULL
            ) AS j (event, name, held)
        $$""",
    # jitbroker_revoke of version 6, and the jobs of what it took (the revoked
    # leases), in its transaction. The outbox arguments default to NO_OUTBOX.
    """DROP FUNCTION {schema}.jitbroker_revoke(
        text[], double precision, text, text, double precision
    )""",
    """CREATE FUNCTION {schema}.jitbroker_revoke(
            p_roots text[], p_at double precision, p_reason text, p_channel text,
            p_margin double precision, p_hooks text[] DEFAULT ARRAY[]::text[],
            p_providers text[] DEFAULT ARRAY[]::text[], p_claim text DEFAULT NULL,
            p_until double precision DEFAULT 0, p_limit integer DEFAULT 5
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
            -- Nothing to write (no hooks, no provider): no statement either.
            IF cardinality(p_hooks) > 0
                OR EXISTS (SELECT 1 FROM unnest(v_taken) AS t WHERE t.provider IS NOT NULL)
            THEN
                INSERT INTO {schema}.jobs (id, event, name, lease, due, attempt_limit, claim)
                SELECT * FROM {schema}.jitbroker_event_jobs(
                    'on_revoke', v_taken, p_at, p_hooks, p_providers, p_claim, p_until, p_limit
                )
                ON CONFLICT (id) DO NOTHING;
            END IF;
            UPDATE {schema}.jitbroker_meta AS meta SET revoke_seq = meta.revoke_seq + 1
            RETURNING meta.revoke_seq INTO v_seq;
            UPDATE {schema}.leases AS l SET revoke_seq = v_seq
            WHERE l.id = ANY(ARRAY(SELECT t.id FROM unnest(v_taken) AS t));
            PERFORM pg_notify(p_channel, v_seq::text);
            SELECT count(*), coalesce(max(k.seen_at + k.staleness + p_margin - now.t), 0)
            INTO pending, longest
            FROM {schema}.caches AS k,
                (SELECT extract(epoch FROM clock_timestamp()) AS t) AS now
            WHERE k.acked < v_seq AND k.seen_at + k.staleness + p_margin > now.t;
            RETURN QUERY SELECT v_seq, pending, longest, v_taken[i]
                FROM generate_subscripts(v_taken, 1) AS i;
        END $$""",
)

# -- the statements ------------------------------------------------------------------
# The arguments a revoke with an outbox adds to its jitbroker_revoke call.
REVOKE_ARGS: LiteralString = (
    ", %(job_hooks)s::text[], %(job_providers)s::text[], %(job_claim)s::text,"
    " %(job_until)s::float8, %(job_limit)s::int"
)
# claim_expired's jobs: a CTE of its statement (``taken`` is what it claimed, with
# each lease's row as ``snapshot``); a data-modifying CTE always runs to the end.
CLAIM_JOBS_CTE: LiteralString = """
    recorded AS (
        INSERT INTO {schema}.jobs (id, event, name, lease, due, attempt_limit, claim)
        SELECT job.* FROM (
            SELECT array_agg(taken.snapshot) AS leases FROM taken
            WHERE taken.expire_hooks IS NOT NULL OR taken.provider IS NOT NULL
        ) AS need CROSS JOIN LATERAL {schema}.jitbroker_event_jobs(
            'on_expire', need.leases, %(now)s, ARRAY[]::text[], %(job_providers)s::text[],
            %(job_claim)s::text, %(job_until)s::float8, %(job_limit)s::int
        ) AS job
        WHERE need.leases IS NOT NULL
        ON CONFLICT (id) DO NOTHING
    )"""
# add's jobs, computed by event_jobs: the lease's INSERT ({insert}) in a CTE, so
# one statement still (on an autocommit connection, atomic alone). The snapshot
# is the row it stored, made as jitbroker_event_jobs makes it. {rows}: one
# _JOB_ROW per job, scalars (arrays would cost ~150 us more per add to adapt).
_ADD: LiteralString = """
    WITH stored AS ({insert} RETURNING to_jsonb(leases) - 'claimed' - 'revoke_seq' AS lease)
    INSERT INTO {schema}.jobs (id, event, name, lease, due, attempt_limit, claim)
    SELECT job.id, job.event, job.name, stored.lease, job.due, job.attempt_limit, job.claim
    FROM stored, (VALUES {rows}) AS job (id, event, name, due, attempt_limit, claim)
    ON CONFLICT (id) DO NOTHING
"""
_JOB_ROW: LiteralString = "(%s, %s, %s, %s::float8, %s::int, %s::text)"
#: The job counts whose add statement is kept (a broker's hooks, plus one).
_KEPT = 16

_COLUMNS: LiteralString = (
    "id, event, name, lease, due, attempt_limit, attempts, error, parked, claim"
)
# SKIP LOCKED, as claim_expired: each claimer passes over the jobs another is
# taking right now, and a job claimed since this statement's snapshot is re-read
# under its lock and dropped (its due moved past now). One range of jobs_claim
# per kind; the outer ORDER BY and LIMIT take the oldest across kinds. Checked
# to run at READ COMMITTED (see postgres._call's ``statement``).
_CLAIM: LiteralString = """
    WITH ready AS (
        SELECT pick.id, pick.due FROM (
            SELECT want.kind FROM unnest(%(kinds)s::text[]) AS want (kind)
            WHERE {schema}.jitbroker_read_committed()
        ) AS want
        CROSS JOIN LATERAL (
            SELECT job.id, job.due FROM {schema}.jobs AS job
            WHERE job.kind = want.kind AND NOT job.parked AND job.due <= %(now)s
            ORDER BY job.due, job.id
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        ) AS pick
        ORDER BY pick.due, pick.id
        LIMIT %(limit)s
    ), taken AS (
        UPDATE {schema}.jobs AS job SET due = %(until)s, claim = %(claim)s
        FROM ready WHERE job.id = ready.id
        RETURNING ready.due AS was, job.*
    )
    SELECT {job_columns} FROM taken ORDER BY was, id
"""
_FINISH: LiteralString = (
    "DELETE FROM {schema}.jobs WHERE id = ANY(%(ids)s::text[]) AND claim = %(claim)s"
)
_FAIL: LiteralString = """
    UPDATE {schema}.jobs
    SET attempts = attempts + %(step)s, error = %(error)s, claim = NULL, due = %(due)s,
        parked = %(park)s
    WHERE id = %(id)s AND claim = %(claim)s
"""
_GET: LiteralString = "SELECT {job_columns} FROM {schema}.jobs WHERE id = %(id)s"
_LIST: LiteralString = (
    "SELECT {job_columns} FROM {schema}.jobs {where} ORDER BY due, id LIMIT %(limit)s"
)
_RETRY: LiteralString = """
    UPDATE {schema}.jobs SET parked = false, due = %(now)s, attempt_limit = attempts, claim = NULL
    WHERE parked {which}
"""
_FORGET: LiteralString = (
    "DELETE FROM {schema}.jobs WHERE id = ANY(%(ids)s::text[]) RETURNING {job_columns}"
)


class JobStatements:
    """The outbox's SQL for one schema, rendered once (``render`` is the store's,
    ``insert`` its lease INSERT)."""

    def __init__(self, render: Callable[..., bytes], insert: sql.Composable) -> None:
        def job(template: LiteralString, **parts: Any) -> bytes:
            return render(template, job_columns=sql.SQL(_COLUMNS), **parts)

        self._render, self._insert = render, insert
        self._adds: dict[int, bytes] = {}
        self.claim = job(_CLAIM)
        self.finish = render(_FINISH)
        self.fail = render(_FAIL)
        self.get = job(_GET)
        self.all = job(_LIST, where=sql.SQL(""))
        self.parked = job(_LIST, where=sql.SQL("WHERE parked"))
        self.unparked = job(_LIST, where=sql.SQL("WHERE NOT parked"))
        self.retry_all = render(_RETRY, which=sql.SQL(""))
        self.retry = render(_RETRY, which=sql.SQL("AND id = ANY(%(ids)s::text[])"))
        self.forget = job(_FORGET)

    def add(self, count: int) -> bytes:
        """The INSERT of a lease with ``count`` jobs (``add_params``), rendered
        once per count."""
        query = self._adds.get(count)
        if query is None:
            rows = sql.SQL(", ").join([sql.SQL(_JOB_ROW)] * count)
            query = self._render(_ADD, insert=self._insert, rows=rows)
            if count <= _KEPT:
                self._adds[count] = query
        return query


def outbox_params(outbox: Outbox) -> dict[str, Any]:
    """The outbox as the ``job_*`` parameters of ``REVOKE_ARGS`` and ``CLAIM_JOBS_CTE``."""
    _check_time("until", outbox.until)
    return {
        "job_hooks": list(outbox.hooks),
        "job_providers": sorted(outbox.providers),
        "job_claim": outbox.claim,
        "job_until": outbox.until,
        "job_limit": int(outbox.limit),
    }


def add_params(jobs: Sequence[Job]) -> list[Any]:
    """The parameters of ``JobStatements.add`` after the lease row's."""
    return [value for j in jobs for value in (j.id, j.event, j.name, j.due, j.limit, j.claim)]


def read_job(row: Sequence[Any]) -> Job:
    """The job stored as ``row`` (``_COLUMNS`` order); ``StoreError`` if it is not one."""
    job_id, event, name, lease, due, limit, attempts, error, parked, claim = row
    if not isinstance(lease, dict):
        raise StoreError(f"corrupt outbox job {job_id!r}: its lease is not a record")
    return Job(
        job_id,
        event,
        name,
        from_mapping(lease),
        float(due),
        int(limit),
        attempts=int(attempts),
        error=error,
        parked=bool(parked),
        claim=claim,
    )


def is_no_outbox(outbox: Outbox) -> bool:
    """True if ``outbox`` is ``NO_OUTBOX`` (a revoke then sends no outbox arguments:
    ``jitbroker_revoke``'s defaults are those)."""
    return outbox is NO_OUTBOX or outbox == NO_OUTBOX


def _check_time(name: str, value: float) -> None:
    # As the store's own check: PostgreSQL would keep NaN, the codec would not read it.
    if not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number of seconds, got {value!r}")


class PostgresOutbox:
    """The outbox methods of ``PostgresStore`` (see ``stores.base.LeaseStore``):
    each one statement, atomic on its own (one round trip on an autocommit
    connection)."""

    if TYPE_CHECKING:
        _jobs_sql: JobStatements

        def _call(
            self,
            action: str,
            work: Callable[[Cursor], T],
            *,
            atomic: bool = True,
            statement: bool = False,
        ) -> T: ...

    def claim_jobs(
        self, now: float, kinds: Collection[str], *, claim: str, until: float, limit: int = 100
    ) -> list[Job]:
        """Up to ``limit`` due, unparked jobs of ``kinds``, oldest first, now held
        by ``claim`` until ``until``; none is handed to two claimers."""
        _check_time("now", now)
        _check_time("until", until)
        if not kinds or limit <= 0:
            return []
        params = {
            "kinds": sorted(set(kinds)),  # once each: a kind listed twice is one range
            "now": now,
            "until": until,
            "claim": claim,
            "limit": int(limit),
        }

        def work(cur: Cursor) -> list[Job]:
            return [read_job(row) for row in cur.execute(self._jobs_sql.claim, params)]

        return self._call("claim outbox jobs", work, statement=True)

    def finish_jobs(self, ids: Collection[str], claim: str) -> int:
        """Delete the jobs of ``ids`` that ``claim`` still holds; how many."""
        if not ids:
            return 0
        params = {"ids": list(ids), "claim": claim}

        def work(cur: Cursor) -> int:
            return cur.execute(self._jobs_sql.finish, params).rowcount

        return self._call("finish outbox jobs", work, atomic=False)

    def fail_job(
        self, job_id: str, claim: str, *, due: float, error: str, park: bool, attempt: bool = True
    ) -> bool:
        """Release a job ``claim`` holds after a failure (see ``LeaseStore.fail_job``)."""
        _check_time("due", due)
        params = {
            "id": job_id,
            "claim": claim,
            "due": due,
            "error": error,
            "park": bool(park),
            "step": 1 if attempt else 0,
        }

        def work(cur: Cursor) -> bool:
            return cur.execute(self._jobs_sql.fail, params).rowcount == 1

        return self._call("record an outbox job's failure", work, atomic=False)

    def get_job(self, job_id: str) -> Job | None:
        """The job with this id, or None."""

        def work(cur: Cursor) -> Job | None:
            row = cur.execute(self._jobs_sql.get, {"id": job_id}).fetchone()
            return None if row is None else read_job(row)

        return self._call("read an outbox job", work, atomic=False)

    def jobs(self, *, parked: bool | None = None, limit: int = 1000) -> list[Job]:
        """Up to ``limit`` jobs, oldest due first: parked ones, unparked ones, or all."""
        if limit <= 0:
            return []
        statements = self._jobs_sql
        query = (
            statements.all
            if parked is None
            else statements.parked
            if parked
            else statements.unparked
        )

        def work(cur: Cursor) -> list[Job]:
            return [read_job(row) for row in cur.execute(query, {"limit": int(limit)})]

        return self._call("list outbox jobs", work, atomic=False)

    def retry_jobs(self, ids: Collection[str] | None, now: float) -> int:
        """Unpark the parked jobs of ``ids`` (all if None), due at ``now``; how many."""
        _check_time("now", now)
        if ids is not None and not ids:
            return 0
        query = self._jobs_sql.retry_all if ids is None else self._jobs_sql.retry
        params = {"now": now, "ids": None if ids is None else list(ids)}

        def work(cur: Cursor) -> int:
            return cur.execute(query, params).rowcount

        return self._call("retry parked outbox jobs", work, atomic=False)

    def forget_jobs(self, ids: Collection[str]) -> list[Job]:
        """Delete the jobs of ``ids`` whatever their state; those deleted."""
        if not ids:
            return []

        def work(cur: Cursor) -> list[Job]:
            return [read_job(row) for row in cur.execute(self._jobs_sql.forget, {"ids": list(ids)})]

        return self._call("forget outbox jobs", work, atomic=False)
