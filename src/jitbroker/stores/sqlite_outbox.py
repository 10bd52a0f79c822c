"""The outbox of ``SQLiteStore``: its table and statements, as functions over a
connection the store has already locked (and, for writes, put in a transaction).

One row per job in ``jobs``; the lease is kept as JSON (``codec.to_mapping``),
so a job outlives the lease's purge. ``jobs_due`` (kind, due) over the unparked
rows serves ``claim_jobs``: one index range per kind the caller can run, so a
backlog of jobs nobody here can run is never read.

Held ``on_issue`` hook jobs, the commonest by far (every issue of a broker with
an ``on_issue`` hook writes them, and the same broker finishes them a moment
later), are written inline instead: four columns of the lease's own row
(``issue_hooks``, the names; ``issue_claim``, ``issue_due``, ``issue_limit``)
and one entry of the partial index ``leases_issue``, in the single statement
that adds the lease. A second row with three index entries, written and then
deleted, was most of what a hook cost an issue (1.6x). Finishing every hook
of a lease clears the columns. Anything else that touches such a job (a claim
after its deadline, a failure, a partial finish, ``forget``, the purge of its
lease) first *materializes* it: the jobs become rows of ``jobs`` like any
other, so every other statement here sees one kind of job. Reads (``get``,
``listed``) see inline jobs without writing. An inline job's ``lease`` is the
row as it is when the job is read: it may show a revocation or renewal that
came after the issue.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from ..errors import StoreError
from .base import Job, new_job
from .codec import COLUMNS, from_mapping, from_row, to_mapping

__all__ = [
    "INLINE",
    "INLINE_MIGRATION",
    "MIGRATION",
    "claim",
    "fail",
    "finish",
    "forget",
    "get",
    "insert",
    "listed",
    "materialize_dead",
    "retry",
]

#: The schema step that adds the outbox (and the lease's provider column).
MIGRATION = (
    "ALTER TABLE leases ADD COLUMN provider TEXT",
    """CREATE TABLE jobs (
        id TEXT PRIMARY KEY NOT NULL,
        kind TEXT NOT NULL,
        event TEXT NOT NULL,
        name TEXT NOT NULL,
        lease TEXT NOT NULL,
        due REAL NOT NULL,
        job_limit INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        error TEXT NOT NULL,
        parked INTEGER NOT NULL,
        claim TEXT
    )""",
    "CREATE INDEX jobs_due ON jobs (kind, due) WHERE parked = 0",
    "CREATE INDEX jobs_order ON jobs (due, id)",
)
#: The schema step that puts held on_issue hook jobs in the lease's row.
INLINE_MIGRATION = (
    "ALTER TABLE leases ADD COLUMN issue_hooks TEXT",
    "ALTER TABLE leases ADD COLUMN issue_claim TEXT",
    "ALTER TABLE leases ADD COLUMN issue_due REAL",
    "ALTER TABLE leases ADD COLUMN issue_limit INTEGER",
    "CREATE INDEX leases_issue ON leases (issue_due) WHERE issue_due IS NOT NULL",
)
#: The inline columns, in the order the store appends their values to a row.
INLINE = ("issue_hooks", "issue_claim", "issue_due", "issue_limit")

# Fixed column names, never input: safe to splice (hence the noqa: S608 below).
_FIELDS = "id, event, name, lease, due, job_limit, attempts, error, parked, claim"
_INSERT = (
    "INSERT OR IGNORE INTO jobs (kind, " + _FIELDS + ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"  # noqa: S608
)
_DUE = (
    "SELECT " + _FIELDS + " FROM jobs INDEXED BY jobs_due"  # noqa: S608
    " WHERE kind = ? AND parked = 0 AND due <= ? ORDER BY due, id LIMIT ?"
)
_TAKE = "UPDATE jobs SET due = ?, claim = ? WHERE id = ?"
_FINISH = "DELETE FROM jobs WHERE id = ? AND claim = ?"
_FAIL = (
    "UPDATE jobs SET attempts = attempts + ?, error = ?, due = ?, parked = ?, claim = NULL"
    " WHERE id = ? AND claim = ?"
)
_GET = "SELECT " + _FIELDS + " FROM jobs WHERE id = ?"  # noqa: S608
_LIST = "SELECT " + _FIELDS + " FROM jobs WHERE {condition} ORDER BY due, id LIMIT ?"  # noqa: S608
_RETRY = (
    "UPDATE jobs SET parked = 0, due = ?, job_limit = attempts, claim = NULL"
    " WHERE parked = 1 AND {condition}"
)


_LEASE = ", ".join(COLUMNS) + ", " + ", ".join(INLINE)
_INLINE_OF = f"SELECT {_LEASE} FROM leases WHERE id = ? AND issue_due IS NOT NULL"  # noqa: S608
_INLINE_DUE = (
    f"SELECT {_LEASE} FROM leases INDEXED BY leases_issue"  # noqa: S608
    " WHERE issue_due IS NOT NULL AND issue_due <= ? ORDER BY issue_due LIMIT ?"
)
_INLINE_ALL = (
    f"SELECT {_LEASE} FROM leases INDEXED BY leases_issue"  # noqa: S608
    " WHERE issue_due IS NOT NULL ORDER BY issue_due LIMIT ?"
)
_INLINE_DEAD = (
    f"SELECT {_LEASE} FROM leases WHERE dead = 1 AND expires_at < ?"  # noqa: S608
    " AND issue_due IS NOT NULL"
)
_CLEAR = (
    "UPDATE leases SET issue_hooks = NULL, issue_claim = NULL, issue_due = NULL,"
    " issue_limit = NULL WHERE id = ?"
)
_FINISH_INLINE = _CLEAR + " AND issue_claim = ? AND issue_hooks = ?"


def _inline_jobs(row: Sequence[Any]) -> list[Job]:
    """The on_issue jobs a lease row holds inline (its lease as the row has it)."""
    names, holder, due, limit = row[len(COLUMNS) :]
    lease = from_row(row[: len(COLUMNS)])
    return [
        new_job(f"{lease.id}/on_issue/{name}", "on_issue", name, lease, float(due), int(limit),
                0, "", False, None if holder is None else str(holder))
        for name in str(names).split()
    ]  # fmt: skip


def _materialize(db: sqlite3.Connection, rows: Iterable[Sequence[Any]]) -> None:
    """Move the inline jobs of these lease rows into ``jobs``."""
    rows = list(rows)
    if rows:
        insert(db, [job for row in rows for job in _inline_jobs(row)])
        db.executemany(_CLEAR, [(row[0],) for row in rows])


def _materialize_ids(db: sqlite3.Connection, ids: Iterable[str]) -> None:
    """Materialize the inline jobs of the leases these on_issue job ids name."""
    leases = dict.fromkeys(_lease_of(job_id) for job_id in ids)
    leases.pop(None, None)
    _materialize(db, [row for lid in leases if (row := db.execute(_INLINE_OF, (lid,)).fetchone())])


def _lease_of(job_id: str) -> str | None:
    """The lease id of an ``on_issue`` job id (the only jobs kept inline), else None."""
    lease_id, _, rest = job_id.partition("/on_issue/")
    return lease_id if rest and "/" not in lease_id else None


def materialize_dead(db: sqlite3.Connection, before: float) -> None:
    """Before the purge of dead leases expired before ``before``: their inline jobs."""
    _materialize(db, db.execute(_INLINE_DEAD, (before,)).fetchall())


def insert(db: sqlite3.Connection, jobs: Iterable[Job]) -> None:
    """Record ``jobs`` (a job whose id is there already is kept as it is)."""
    db.executemany(_INSERT, [_row(job) for job in jobs])


def _row(job: Job) -> tuple[Any, ...]:
    lease = json.dumps(to_mapping(job.lease), separators=(",", ":"))
    return (
        job.kind, job.id, job.event, job.name, lease, job.due, job.limit, job.attempts,
        job.error, int(job.parked), job.claim,
    )  # fmt: skip


def _job(row: Sequence[Any]) -> Job:
    job_id, event, name, lease, due, limit, attempts, error, parked, claim = row
    try:
        snapshot = from_mapping(json.loads(lease))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"corrupt outbox job {job_id!r}: its lease does not decode") from exc
    return Job(
        str(job_id), str(event), str(name), snapshot, float(due), int(limit), int(attempts),
        str(error), bool(parked), None if claim is None else str(claim),
    )  # fmt: skip


def claim(
    db: sqlite3.Connection,
    now: float,
    kinds: Collection[str],
    holder: str,
    until: float,
    limit: int,
) -> list[Job]:
    """Take the due jobs of ``kinds`` (oldest first, at most ``limit``) for ``holder``."""
    if any(kind.startswith("on_issue:") for kind in kinds):  # inline ones past their deadline
        _materialize(db, db.execute(_INLINE_DUE, (now, limit)).fetchall())
    due: list[Job] = []
    for kind in kinds:
        due += map(_job, db.execute(_DUE, (kind, now, limit)).fetchall())
    due.sort(key=lambda job: (job.due, job.id))
    taken = due[:limit]
    db.executemany(_TAKE, [(until, holder, job.id) for job in taken])
    return [_held(job, until, holder) for job in taken]


def _held(job: Job, until: float, holder: str) -> Job:
    return Job(job.id, job.event, job.name, job.lease, until, job.limit, job.attempts, job.error,
               job.parked, holder)  # fmt: skip


def finish(db: sqlite3.Connection, ids: Collection[str], holder: str) -> int:
    """Delete the jobs of ``ids`` that ``holder`` holds; how many."""
    # Inline jobs first: a lease whose every inline job is among ids, still held
    # by holder, is cleared in one statement; any other is materialized first.
    names: dict[str, list[str]] = {}
    rest: list[str] = []
    for job_id in dict.fromkeys(ids):
        lease_id = _lease_of(job_id)
        if lease_id is None:
            rest.append(job_id)
        else:
            names.setdefault(lease_id, []).append(job_id.partition("/on_issue/")[2])
    done = 0
    partial: list[str] = []
    for lease_id, finished in names.items():
        if db.execute(_FINISH_INLINE, (lease_id, holder, " ".join(finished))).rowcount:
            done += len(finished)
        else:
            partial.append(lease_id)
            rest += (f"{lease_id}/on_issue/{name}" for name in finished)
    if partial:
        _materialize(db, [r for lid in partial if (r := db.execute(_INLINE_OF, (lid,)).fetchone())])
    if rest:
        done += int(db.executemany(_FINISH, [(job_id, holder) for job_id in rest]).rowcount)
    return done


def fail(
    db: sqlite3.Connection,
    job_id: str,
    holder: str,
    *,
    due: float,
    error: str,
    park: bool,
    attempt: bool,
) -> bool:
    """Release a job ``holder`` holds after a failure (see the store protocol)."""
    _materialize_ids(db, (job_id,))
    params = (int(attempt), error, due, int(park), job_id, holder)
    return int(db.execute(_FAIL, params).rowcount) == 1


def get(db: sqlite3.Connection, job_id: str) -> Job | None:
    """The job with this id, or None."""
    row = db.execute(_GET, (job_id,)).fetchone()
    if row is not None:
        return _job(row)
    lease_id = _lease_of(job_id)
    inline = None if lease_id is None else db.execute(_INLINE_OF, (lease_id,)).fetchone()
    if inline is None:
        return None
    return next((job for job in _inline_jobs(inline) if job.id == job_id), None)


def listed(db: sqlite3.Connection, parked: bool | None, limit: int) -> list[Job]:
    """Jobs, oldest due first: parked ones, unparked ones, or all."""
    condition = "1" if parked is None else f"parked = {int(parked)}"
    found = [_job(row) for row in db.execute(_LIST.format(condition=condition), (limit,))]
    if parked is not True:  # inline jobs are never parked
        found += (job for row in db.execute(_INLINE_ALL, (limit,)) for job in _inline_jobs(row))
        found.sort(key=lambda job: (job.due, job.id))
    return found[: max(limit, 0)]


def retry(db: sqlite3.Connection, ids: Collection[str] | None, now: float) -> int:
    """Unpark the parked jobs of ``ids`` (all if None); how many."""
    if ids is None:
        return int(db.execute(_RETRY.format(condition="1"), (now,)).rowcount)
    sql = _RETRY.format(condition="id = ?")
    return int(db.executemany(sql, [(now, job_id) for job_id in ids]).rowcount)


def forget(db: sqlite3.Connection, ids: Collection[str]) -> list[Job]:
    """Delete the jobs of ``ids``; those deleted."""
    _materialize_ids(db, ids)
    gone = [job for job in (get(db, i) for i in ids) if job is not None]
    db.executemany("DELETE FROM jobs WHERE id = ?", [(job.id,) for job in gone])
    return gone
