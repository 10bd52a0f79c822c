"""The outbox of ``SQLiteStore``: its table and statements, as functions over a
connection the store has already locked (and, for writes, put in a transaction).

One row per job in ``jobs``; the lease is kept as JSON (``codec.to_mapping``),
so a job outlives the lease's purge. ``jobs_due`` (kind, due) over the unparked
rows serves ``claim_jobs``: one index range per kind the caller can run, so a
backlog of jobs nobody here can run is never read.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from ..errors import StoreError
from .base import Job
from .codec import from_mapping, to_mapping

__all__ = ["MIGRATION", "claim", "fail", "finish", "forget", "get", "insert", "listed", "retry"]

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
    return int(db.executemany(_FINISH, [(job_id, holder) for job_id in ids]).rowcount)


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
    params = (int(attempt), error, due, int(park), job_id, holder)
    return int(db.execute(_FAIL, params).rowcount) == 1


def get(db: sqlite3.Connection, job_id: str) -> Job | None:
    """The job with this id, or None."""
    row = db.execute(_GET, (job_id,)).fetchone()
    return None if row is None else _job(row)


def listed(db: sqlite3.Connection, parked: bool | None, limit: int) -> list[Job]:
    """Jobs, oldest due first: parked ones, unparked ones, or all."""
    condition = "1" if parked is None else f"parked = {int(parked)}"
    return [_job(row) for row in db.execute(_LIST.format(condition=condition), (limit,))]


def retry(db: sqlite3.Connection, ids: Collection[str] | None, now: float) -> int:
    """Unpark the parked jobs of ``ids`` (all if None); how many."""
    if ids is None:
        return int(db.execute(_RETRY.format(condition="1"), (now,)).rowcount)
    sql = _RETRY.format(condition="id = ?")
    return int(db.executemany(sql, [(now, job_id) for job_id in ids]).rowcount)


def forget(db: sqlite3.Connection, ids: Collection[str]) -> list[Job]:
    """Delete the jobs of ``ids``; those deleted."""
    gone = [job for job in (get(db, i) for i in ids) if job is not None]
    db.executemany("DELETE FROM jobs WHERE id = ?", [(job.id,) for job in gone])
    return gone
