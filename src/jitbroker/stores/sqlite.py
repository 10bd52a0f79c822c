"""``SQLiteStore``: leases in one SQLite file, shared by the processes of one host.

Standard library only (``sqlite3``). The file is in WAL mode, so readers never
wait for the writer; every write is one short transaction that takes the write
lock up front (``BEGIN IMMEDIATE``, or a single write statement, which SQLite
also locks before it reads), so two writers never deadlock on a lock upgrade
and each check-then-write (a child's parent is alive, a lease is unclaimed)
sees the latest commit of every process. Opening an up-to-date file only
reads; the write lock is taken only to create or migrate the schema.

The table holds one column per codec field plus ``dead``: 1 once the lease is
revoked or claimed expired. ``dead = 0`` is "live, or expired awaiting its
claim", so the claims read ``(expire_hooks, expires_at) WHERE dead = 0`` (one
range per hook set the claimer runs) and the purge ``(expires_at) WHERE dead =
1``. Task, parent, owner, subject, key id and task run are indexed for
``find`` (issuer and provider are not: see the migrations).

The outbox is the ``jobs`` table (``sqlite_outbox``). An event's jobs are
written in the event's own transaction; an event that makes none (no hook asked
for, no provider) runs exactly the statements it ran before the outbox existed.

WAL does not work over a network file system: keep the file on a local disk.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import stat
import threading
import time
import weakref
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import attrs

from ..errors import InvalidRequest, StoreError, StoreUnavailable
from ..lease import Lease
from ..usage import Usage, UsageRecord, merge
from . import sqlite_outbox as outbox_sql
from .base import NO_OUTBOX, Job, LeaseFilter, Outbox, Quota, event_jobs
from .codec import COLUMNS, from_row, to_row

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

log = logging.getLogger("jitbroker")

#: ``PRAGMA application_id`` of our files ("JITB"): tells our database from a foreign one.
APPLICATION_ID = 0x4A495442

# Forward migrations: entry i takes the schema from version i to i + 1. They are
# history: never edit one, append a new one. All pending ones run in the one
# transaction that opens the file, so a file is at one version or the next.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE leases (
            id TEXT PRIMARY KEY NOT NULL,
            subject TEXT NOT NULL,
            audience TEXT NOT NULL,
            scopes TEXT NOT NULL,
            issued_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            max_expires_at REAL NOT NULL,
            key_id TEXT,
            task TEXT,
            owner TEXT,
            purpose TEXT,
            parent TEXT,
            renewable INTEGER NOT NULL,
            revoked_at REAL,
            revoke_reason TEXT,
            holder TEXT,
            dead INTEGER NOT NULL
        )""",
        "CREATE INDEX leases_due ON leases (dead, expires_at)",
        # Partial where the field is often absent: smaller, and `x = ?` still uses them.
        "CREATE INDEX leases_task ON leases (task) WHERE task IS NOT NULL",
        "CREATE INDEX leases_parent ON leases (parent) WHERE parent IS NOT NULL",
        "CREATE INDEX leases_owner ON leases (owner) WHERE owner IS NOT NULL",
        "CREATE INDEX leases_subject ON leases (subject)",
        "CREATE INDEX leases_key_id ON leases (key_id) WHERE key_id IS NOT NULL",
    ),
    (
        # Quota counts: the live leases of a subject (and owner), without reading
        # the dead ones a long retention keeps.
        "CREATE INDEX leases_live_subject ON leases (subject, owner, expires_at) WHERE dead = 0",
    ),
    (
        # Who issued a lease, the task run it belongs to, and the on_expire hooks
        # it needs (NULL in rows written before: none). A claim takes only the
        # hooks its broker runs, one range of leases_claim per value, ordered by
        # expiry; leases_due gives way to it and to leases_dead (purge), so an
        # add still writes one of the two. No index on issuer: every lease has
        # one, so it would cost every add an index write (13%) for a filter that
        # is rare on its own (offboarding an issuer scans; with another field,
        # that field's index serves).
        "ALTER TABLE leases ADD COLUMN issuer TEXT",
        "ALTER TABLE leases ADD COLUMN task_run TEXT",
        "ALTER TABLE leases ADD COLUMN expire_hooks TEXT",
        "CREATE INDEX leases_task_run ON leases (task_run) WHERE task_run IS NOT NULL",
        "CREATE INDEX leases_claim ON leases (expire_hooks, expires_at) WHERE dead = 0",
        "CREATE INDEX leases_dead ON leases (expires_at) WHERE dead = 1",
        "DROP INDEX leases_due",
    ),
    # The provider of a lease's backend credential, and the outbox (sqlite_outbox).
    outbox_sql.MIGRATION,
    # Held on_issue hook jobs inline in the lease's row (sqlite_outbox).
    outbox_sql.INLINE_MIGRATION,
    # Retired signing keys, read by every broker sharing the file (invariant 11).
    (
        """CREATE TABLE IF NOT EXISTS retired_keys (
            kid TEXT PRIMARY KEY NOT NULL,
            retired_at REAL NOT NULL
        )""",
    ),
    # Lease usage (jitbroker.usage), in the lease's row so a purge takes it too;
    # written by the sweep in batches, never by verify. used_by: a JSON list.
    (
        "ALTER TABLE leases ADD COLUMN last_used_at REAL",
        "ALTER TABLE leases ADD COLUMN use_count INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE leases ADD COLUMN used_by TEXT",
    ),
)

#: The schema version this code writes; a file at a higher one is refused.
SCHEMA_VERSION = len(_MIGRATIONS)
PAGE_SIZE = 2048  # of new files; see _prepare

# Column names come from the codec (identifiers, never input): safe to splice.
# `dead` follows the codec's columns in every row written.
_COLS = ", ".join(COLUMNS)
_MARKS = ", ".join("?" * (len(COLUMNS) + 1))
# Unary `+` keeps the planner off leases_due for liveness: without statistics it
# would rather range-scan every live lease than look up one id, task or parent.
_LIVE = "+dead = 0 AND :at < +expires_at"
_GET = f"SELECT {_COLS} FROM leases WHERE id = ?"  # noqa: S608
_FIND = f"SELECT {_COLS} FROM leases WHERE {{condition}}"  # noqa: S608


def _inserts(columns: str, marks: str) -> tuple[str, str]:
    """The statements adding a lease row (with these columns): a root, and a child,
    which goes in only if its parent is live at its issue time (one statement, atomic)."""
    insert = "INSERT OR REPLACE INTO leases (" + columns + ") "
    child = (
        insert + "SELECT " + marks + " WHERE EXISTS"  # noqa: S608 - fixed names, never input
        " (SELECT 1 FROM leases WHERE id = ? AND +dead = 0 AND ? < +expires_at)"
    )
    return insert + "VALUES (" + marks + ")", child


_INSERT, _INSERT_CHILD = _inserts(f"{_COLS}, dead", _MARKS)
# The same with held on_issue hook jobs inline (sqlite_outbox).
_INSERT_HELD, _INSERT_HELD_CHILD = _inserts(
    f"{_COLS}, dead, {', '.join(outbox_sql.INLINE)}", ", ".join("?" * (len(COLUMNS) + 5))
)
# The live leases matching {roots} and, recursively, their live children. A dead
# lease's children died with it (or expired first), so the walk stops there.
_TREE = f"""WITH RECURSIVE tree(id) AS (
    SELECT id FROM leases WHERE {{roots}} AND {_LIVE}
    UNION
    SELECT leases.id FROM leases JOIN tree ON leases.parent = tree.id
    WHERE +leases.dead = 0 AND :at < +leases.expires_at
) SELECT {_COLS} FROM leases WHERE id IN tree"""  # noqa: S608
# Active leases counted against a quota; the owner term is dropped when it has none.
_COUNT = (
    "SELECT COUNT(*) FROM leases INDEXED BY leases_live_subject"
    " WHERE subject = :subject AND dead = 0 AND expires_at > :at"
)
_COUNT_OWNER = _COUNT + " AND owner = :owner"
_REVOKE = "UPDATE leases SET revoked_at = ?, revoke_reason = ?, dead = 1 WHERE id = ?"
_LIVE_ONE = f"SELECT {_COLS} FROM leases WHERE id = :id AND {_LIVE}"  # noqa: S608
_EXTEND = "UPDATE leases SET expires_at = ? WHERE id = ?"
# Due leases that need no hook; then those needing the hooks `expire_hooks`
# (leases_claim: one range per value, so leases awaiting hooks the claimer
# lacks are never read).
_DUE = (
    f"SELECT {_COLS} FROM leases WHERE expire_hooks IS NULL"  # noqa: S608
    " AND dead = 0 AND expires_at <= ? ORDER BY expires_at LIMIT ?"
)
_DUE_HOOKS = (
    f"SELECT {_COLS} FROM leases WHERE expire_hooks = ?"  # noqa: S608
    " AND dead = 0 AND expires_at <= ? ORDER BY expires_at LIMIT ?"
)
_AWAITING = (
    "SELECT expire_hooks, COUNT(*) FROM leases INDEXED BY leases_claim"
    " WHERE expire_hooks IS NOT NULL AND dead = 0 AND expires_at <= ? GROUP BY expire_hooks"
)
# Active leases, for health(): leases_claim holds exactly the live rows (dead =
# 0), so the count reads that partial index alone, never a dead row.
_COUNT_LIVE = (
    "SELECT COUNT(*) FROM leases INDEXED BY leases_claim WHERE dead = 0 AND expires_at > ?"
)
_CLAIM = "UPDATE leases SET dead = 1 WHERE id = ?"
_PURGE = "DELETE FROM leases WHERE dead = 1 AND expires_at < ?"
_FILTER_FIELDS = ("task", "parent", "owner", "subject", "key_id", "issuer", "task_run", "provider")

# SQLite primary result codes (the low byte of ``sqlite_errorcode``) that mean
# "could not get at the file right now", as opposed to a broken or foreign file.
_UNAVAILABLE = {
    5: "busy",  # SQLITE_BUSY: another connection holds the lock past the timeout
    6: "locked",
    8: "read-only",
    10: "I/O error",
    13: "disk full",
    14: "cannot open",
    15: "lock protocol error",
}

# Connections a fork left behind: a child must neither use nor close its
# parent's connection (closing could checkpoint or delete the parent's WAL),
# so they are kept referenced forever instead of being garbage collected.
_FORK_ORPHANS: list[sqlite3.Connection] = []
_OPEN_STORES: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()


class SQLiteStore:
    """Leases in the SQLite file at ``path`` (created if missing); durable, one host.

    Safe for several threads (one connection, used under a lock: SQLite runs one
    writer at a time anyway, and a lock queues threads without busy polling) and
    for several processes on one host (WAL; each waits up to ``timeout`` seconds
    for another's write lock, then raises ``StoreUnavailable``). Safe across
    ``fork``: a child opens its own connection on first use.

    Durability: commits use ``synchronous=NORMAL``, which survives a crash of
    any process but may lose the last commits on power loss or an OS crash. That
    fails closed (a lost lease makes its token unknown, a lost renewal expires
    sooner), except for revocations, so ``revoke`` and ``revoke_where`` commit
    with ``synchronous=FULL``: once they return, the revocation is on disk.

    Opening a file written by a newer jitbroker, another application's SQLite
    database, or a file that is not SQLite raises ``StoreError`` naming the path.
    Opening an up-to-date file only reads, so it works while another process
    writes; only creating or migrating the schema takes the write lock.

    A new file is created with mode 0600 (its -wal and -shm files follow). An
    existing file keeps its mode, but one every user can write is refused with
    ``StoreError``, and one every user can read is logged as a warning.
    """

    blocking = True

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 5.0) -> None:
        self.path = os.fspath(path)
        if not self.path or self.path == ":memory:" or self.path.startswith("file:"):
            raise InvalidRequest("SQLiteStore needs a file path (use MemoryStore in memory)")
        if not (timeout >= 0 and math.isfinite(timeout)):
            raise InvalidRequest(f"timeout must be finite seconds >= 0, got {timeout!r}")
        self.timeout = float(timeout)
        self._lock = threading.Lock()
        self._closed = False
        self._db: sqlite3.Connection | None = self._open()
        _OPEN_STORES.add(self)

    def __repr__(self) -> str:
        return f"<SQLiteStore path={self.path!r}>"

    # -- the protocol ------------------------------------------------------
    def add(
        self, lease: Lease, quotas: Sequence[Quota] = (), *, outbox: Outbox = NO_OUTBOX
    ) -> bool:
        """Store ``lease`` and its jobs; False (nothing written) if its parent is
        not active."""
        _check_times(lease)
        row = (*to_row(lease), lease.revoked_at is not None)
        parent = lease.parent
        insert, insert_child = _INSERT, _INSERT_CHILD
        hooks = outbox.hooks
        if hooks and outbox.claim is not None:  # held hook jobs: inline, in the same row
            row = (*row, " ".join(hooks), outbox.claim, outbox.until, outbox.limit)
            insert, insert_child = _INSERT_HELD, _INSERT_HELD_CHILD
            outbox = attrs.evolve(outbox, hooks=()) if lease.provider is not None else NO_OUTBOX
        # event_jobs gives none without a hook or a provider: the hot path skips the call.
        jobs = (
            event_jobs("on_issue", lease, outbox, lease.issued_at)
            if outbox.hooks or lease.provider is not None
            else ()
        )
        if quotas or jobs:  # count, insert and record in one write transaction
            with self._transaction("store a lease") as db:
                for quota in quotas:
                    sql = _COUNT if quota.owner is None else _COUNT_OWNER
                    params = {"subject": quota.subject, "owner": quota.owner, "at": lease.issued_at}
                    (active,) = db.execute(sql, params).fetchone()
                    if active >= quota.limit:
                        raise quota.exceeded()
                if parent is None:
                    db.execute(insert, row)
                elif db.execute(insert_child, (*row, parent, lease.issued_at)).rowcount != 1:
                    return False
                if jobs:
                    outbox_sql.insert(db, jobs)
                return True
        # The hot path (every issue): `_session` spelled out, without a generator.
        db = self._enter("store a lease")
        try:
            if parent is None:  # a single statement: its own immediate transaction
                db.execute(insert, row)
                return True
            return db.execute(insert_child, (*row, parent, lease.issued_at)).rowcount == 1
        except sqlite3.Error as exc:
            raise _translate(exc, "store a lease", self.path) from exc
        finally:
            self._lock.release()

    def get(self, lease_id: str) -> Lease | None:
        """The lease with this id, or None."""
        with self._session("read a lease") as db:
            row = db.execute(_GET, (lease_id,)).fetchone()
        return None if row is None else from_row(row)

    def revoke(
        self, lease_id: str, *, at: float, reason: str, outbox: Outbox = NO_OUTBOX
    ) -> list[Lease]:
        """Revoke the lease and its active descendants; those that transitioned."""
        return self._revoke_tree("id = :id", {"id": lease_id}, at, reason, outbox)

    def revoke_where(
        self, where: LeaseFilter, *, at: float, reason: str, outbox: Outbox = NO_OUTBOX
    ) -> list[Lease]:
        """Revoke every active lease matching ``where`` and their descendants."""
        roots, params = _where(where)
        return self._revoke_tree(roots, params, at, reason, outbox)

    def extend(self, lease_id: str, *, expires_at: float, at: float) -> Lease | None:
        """Set a new expiry if the lease is active and unclaimed at ``at``."""
        _check_time("expires_at", expires_at)
        with self._transaction("extend a lease") as db:
            row = db.execute(_LIVE_ONE, {"id": lease_id, "at": at}).fetchone()
            if row is None:
                return None
            db.execute(_EXTEND, (expires_at, lease_id))
        return attrs.evolve(from_row(row), expires_at=expires_at)

    def find(self, where: LeaseFilter) -> list[Lease]:
        """Every stored lease matching ``where`` (live or dead, not yet purged)."""
        condition, params = _where(where)
        with self._session("find leases") as db:
            rows = db.execute(_FIND.format(condition=condition), params).fetchall()
        return _rows(rows)

    def claim_expired(
        self,
        now: float,
        limit: int = 1000,
        expire_hooks: Collection[str] = (),
        *,
        outbox: Outbox = NO_OUTBOX,
    ) -> list[Lease]:
        """Leases expired by ``now`` and not yet claimed, each handed out exactly once:
        those needing no hook, and those whose ``expire_hooks`` is in ``expire_hooks``.

        Selecting and marking happen in one write transaction, and write
        transactions run one at a time across every process: a second claimer
        sees the first one's marks.
        """
        if limit <= 0:  # SQLite reads a negative LIMIT as "no limit"
            return []
        with self._transaction("claim expired leases") as db:
            rows = db.execute(_DUE, (now, limit)).fetchall()
            for hooks in expire_hooks:  # in-process statements: one each is cheap
                if len(rows) >= limit:
                    break
                rows += db.execute(_DUE_HOOKS, (hooks, now, limit - len(rows))).fetchall()
            db.executemany(_CLAIM, [(row[0],) for row in rows])
            claimed = _rows(rows)
            jobs = _jobs("on_expire", claimed, outbox, now)
            if jobs:
                outbox_sql.insert(db, jobs)
        return claimed

    def awaiting_hooks(self, now: float) -> dict[str, int]:
        """Expired, unclaimed leases that need hooks, per ``expire_hooks`` value."""
        with self._session("count leases awaiting hooks") as db:
            return {str(hooks): int(n) for hooks, n in db.execute(_AWAITING, (now,))}

    def count_active(self, now: float) -> int:
        """How many leases are active at ``now`` (neither revoked, claimed nor
        expired), for ``health()``: a scan of the partial index of live leases,
        O(live leases) (docs/metrics.md has the figure at 1M)."""
        _check_time("now", now)
        with self._session("count active leases") as db:
            return int(db.execute(_COUNT_LIVE, (now,)).fetchone()[0])

    def purge(self, before: float) -> int:
        """Delete dead leases (revoked or claimed expired) with ``expires_at < before``;
        any job still inline in one moves to the jobs table first (never lost)."""
        with self._transaction("purge dead leases") as db:
            outbox_sql.materialize_dead(db, before)
            return int(db.execute(_PURGE, (before,)).rowcount)

    # -- usage (UsageRecording) --------------------------------------------------
    def record_usage(self, batch: Sequence[UsageRecord]) -> None:
        """Merge the batch into the leases' rows in one write transaction (read,
        merge, one executemany); ids of leases not stored are ignored."""
        if not batch:
            return
        with self._transaction("record lease usage") as db:
            have = _usage_rows(db, [rec.lease_id for rec in batch], used_only=False)
            rows = [
                (u.last_used_at, u.use_count, json.dumps(u.used_by), rec.lease_id)
                for rec in batch
                if rec.lease_id in have
                for u in (merge(have[rec.lease_id], rec),)
            ]
            db.executemany(
                "UPDATE leases SET last_used_at = ?, use_count = ?, used_by = ? WHERE id = ?",
                rows,
            )

    def lease_usage(self, lease_ids: Collection[str]) -> dict[str, Usage]:
        """The usage of those of ``lease_ids`` that were ever used."""
        with self._session("read lease usage") as db:
            found = _usage_rows(db, list(lease_ids), used_only=True)
        return {lease_id: usage for lease_id, usage in found.items() if usage is not None}

    # -- retired keys (KeyRetirements) ------------------------------------------
    def retire_key(self, kid: str, at: float) -> bool:
        """Record ``kid`` as retired at ``at``; True if this call recorded it."""
        with self._transaction("record a retired key", durable=True) as db:
            sql = "INSERT OR IGNORE INTO retired_keys (kid, retired_at) VALUES (?, ?)"
            return db.execute(sql, (kid, at)).rowcount == 1

    def retired_keys(self) -> dict[str, float]:
        """Every retired kid and when it was retired."""
        with self._session("read the retired keys") as db:
            rows = db.execute("SELECT kid, retired_at FROM retired_keys").fetchall()
        return {str(kid): float(at) for kid, at in rows}

    # -- the outbox (statements in sqlite_outbox) ----------------------------
    def claim_jobs(
        self, now: float, kinds: Collection[str], *, claim: str, until: float, limit: int = 100
    ) -> list[Job]:
        """Due jobs of ``kinds``, each now held by ``claim`` until ``until``."""
        if not kinds or limit <= 0:  # SQLite reads a negative LIMIT as "no limit"
            return []
        kinds = dict.fromkeys(kinds)  # a kind named twice must not hand a job out twice
        with self._transaction("claim outbox jobs") as db:
            return outbox_sql.claim(db, now, kinds, claim, until, limit)

    def finish_jobs(self, ids: Collection[str], claim: str) -> int:
        """Delete the jobs of ``ids`` that ``claim`` still holds; how many."""
        if not ids:  # no write lock taken for nothing
            return 0
        with self._transaction("finish outbox jobs") as db:
            return outbox_sql.finish(db, ids, claim)

    def fail_job(
        self, job_id: str, claim: str, *, due: float, error: str, park: bool, attempt: bool = True
    ) -> bool:
        """Record a failed (or deferred) attempt of a job ``claim`` holds."""
        with self._transaction("record an outbox failure") as db:
            return outbox_sql.fail(
                db, job_id, claim, due=due, error=error, park=park, attempt=attempt
            )

    def get_job(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        with self._session("read an outbox job") as db:
            return outbox_sql.get(db, job_id)

    def jobs(self, *, parked: bool | None = None, limit: int = 1000) -> list[Job]:
        """Jobs, oldest due first: parked ones, unparked ones, or all."""
        if limit <= 0:  # not "no limit", as SQLite would read a negative one
            return []
        with self._session("list outbox jobs") as db:
            return outbox_sql.listed(db, parked, limit)

    def retry_jobs(self, ids: Collection[str] | None, now: float) -> int:
        """Unpark parked jobs (all if ``ids`` is None); how many."""
        if ids is not None and not ids:
            return 0
        with self._transaction("retry outbox jobs") as db:
            return outbox_sql.retry(db, ids, now)

    def forget_jobs(self, ids: Collection[str]) -> list[Job]:
        """Delete these jobs whatever their state; those deleted."""
        if not ids:
            return []
        with self._transaction("forget outbox jobs") as db:
            return outbox_sql.forget(db, dict.fromkeys(ids))  # each deleted job once

    def close(self) -> None:
        """Close the connection. Idempotent; any later call raises ``StoreError``."""
        with self._lock:
            self._closed = True
            db, self._db = self._db, None
            if db is not None:
                with _translated("close the store", self.path):
                    db.close()

    # -- connection and transactions ---------------------------------------
    def _open(self) -> sqlite3.Connection:
        # On every (re)open, not only the first: SQLite would recreate a file
        # deleted meanwhile with its default mode.
        _create_private(self.path)
        with _translated("open the store", self.path):
            # Autocommit mode (isolation_level=None): transactions are ours to begin.
            db = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
            try:
                _prepare(db, self.path, self.timeout)
            except BaseException:
                db.close()
                raise
        return db

    @contextmanager
    def _session(self, action: str) -> Iterator[sqlite3.Connection]:
        """The connection, held under the lock, with sqlite3 errors translated."""
        db = self._enter(action)
        try:
            with _translated(action, self.path):
                yield db
        finally:
            self._lock.release()

    def _enter(self, action: str) -> sqlite3.Connection:
        """Take the lock and return the connection; the caller releases the lock."""
        if not self._lock.acquire(timeout=self.timeout):
            message = f"SQLite store {self.path}: busy in this process, could not {action}"
            raise StoreUnavailable(message)
        try:
            db = self._db
            if db is None:
                if self._closed:
                    raise StoreError(f"SQLite store {self.path} is closed, could not {action}")
                db = self._db = self._open()  # first use after a fork
        except BaseException:
            self._lock.release()
            raise
        return db

    @contextmanager
    def _transaction(self, action: str, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed on success, rolled back on any error."""
        with self._session(action) as db:
            if durable:
                db.execute("PRAGMA synchronous = FULL")
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                    db.execute("COMMIT")
                finally:
                    if db.in_transaction:
                        self._rollback(db)
            finally:
                if durable and self._db is db:  # not if _rollback dropped it
                    db.execute("PRAGMA synchronous = NORMAL")

    def _rollback(self, db: sqlite3.Connection) -> None:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            # The connection is in an unknown state: drop it, reopen on next use.
            self._db = None
            with suppress(sqlite3.Error):
                db.close()

    def _revoke_tree(
        self, roots: str, params: dict[str, Any], at: float, reason: str, outbox: Outbox
    ) -> list[Lease]:
        with self._transaction("revoke leases", durable=True) as db:
            rows = db.execute(_TREE.format(roots=roots), {**params, "at": at}).fetchall()
            db.executemany(_REVOKE, [(at, reason, row[0]) for row in rows])
            revoked = [
                attrs.evolve(from_row(row), revoked_at=at, revoke_reason=reason) for row in rows
            ]
            jobs = _jobs("on_revoke", revoked, outbox, at)
            if jobs:
                outbox_sql.insert(db, jobs)
        return revoked

    def _after_fork(self) -> None:
        # Called in a forked child: the lock may have been held by a thread that
        # does not exist here, and the connection belongs to the parent.
        self._lock = threading.Lock()
        if self._db is not None:
            _FORK_ORPHANS.append(self._db)
            self._db = None


def _forget_connections_after_fork() -> None:
    for store in list(_OPEN_STORES):
        store._after_fork()


if hasattr(os, "register_at_fork"):  # POSIX only
    os.register_at_fork(after_in_child=_forget_connections_after_fork)


# -- opening a file ---------------------------------------------------------------
def _create_private(path: str) -> None:
    """Create the file with mode 0600 before SQLite opens it; check an existing one.

    SQLite would create it 0644 under the usual umask, and it gives the -wal
    and -shm files the main file's mode: created 0600 here, all three are.
    """
    # SQLite follows symbolic links (and puts -wal and -shm next to the target):
    # create and check the file it will open, even behind a dangling link.
    real = os.path.realpath(path)
    try:
        fd = os.open(real, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        _check_existing(real)
        return
    except OSError as exc:  # as SQLite would fail to open it: no directory, no access
        raise StoreUnavailable(
            f"SQLite store {path} unavailable (cannot open), could not create it: {exc.strerror}"
        ) from exc
    try:
        os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
    finally:
        os.close(fd)


def _check_existing(path: str) -> None:
    """Refuse a store file every user can write; warn if every user can read it.

    An existing file's mode is never changed: a group may share it on purpose
    (brokers running as several users of one host). But whoever can write it
    can un-revoke a lease, and whoever can read it sees every lease's subject,
    owner and purpose (never a token). The -wal file holds recent leases too,
    and a forged -shm index could make readers see a lease before its revocation.
    """
    for name in (path, path + "-wal", path + "-shm"):
        try:
            mode = stat.S_IMODE(os.stat(name).st_mode)
        except OSError:  # absent (-wal, -shm), or SQLite will say what is wrong
            continue
        if mode & stat.S_IWOTH:
            raise StoreError(
                f"SQLite store file {name} is writable by every user (mode {mode:04o}), "
                f"who could un-revoke leases: run `chmod o-rw {name}` (or chmod 600)"
            )
        if mode & stat.S_IROTH and not name.endswith("-shm"):  # the index holds no lease
            log.warning(
                "SQLite store file %s is readable by every user (mode %04o), who can "
                "read every lease's subject, owner and purpose: run `chmod o-r %s`",
                name,
                mode,
                name,
            )


def _prepare(db: sqlite3.Connection, path: str, timeout: float) -> None:
    """Check the file is ours, migrate it to ``SCHEMA_VERSION``, switch to WAL."""
    # Only takes effect when this creates the file. Every commit writes each page
    # it dirtied to the WAL (an add: the row and 6 index pages), so smaller pages
    # mean fewer bytes per add: issue measured ~10% faster than with 4096.
    db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    if _read_schema(db, path) < SCHEMA_VERSION:
        _migrate(db, path)
    # Only after the checks: a foreign database must not be switched to WAL.
    mode = _switch_to_wal(db, timeout)
    if mode != "wal":
        raise StoreError(f"SQLite store {path}: cannot use WAL mode (journal mode {mode!r})")
    db.execute("PRAGMA synchronous = NORMAL")  # see the class docstring


def _switch_to_wal(db: sqlite3.Connection, timeout: float) -> str:
    """``PRAGMA journal_mode = WAL``: the journal mode it leaves. The switch of a
    new file needs it alone, and SQLite answers "locked" at once, without its busy
    handler, while another process still reads it in its old mode (several
    processes creating one file at once): retried until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return str(db.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            busy = isinstance(code, int) and code & 0xFF in (5, 6)  # SQLITE_BUSY, _LOCKED
            if not busy or time.monotonic() >= deadline:
                raise
        time.sleep(0.005)


def _read_schema(db: sqlite3.Connection, path: str) -> int:
    """The file's schema version (its columns checked if current), without the write lock."""
    # A deferred transaction that only reads: in WAL mode it never waits for a
    # writer, so an up-to-date store opens however busy other processes are.
    db.execute("BEGIN")
    try:
        version = _schema_version(db, path)
        if version == SCHEMA_VERSION:
            _check_columns(db, path)
        return version
    finally:
        if db.in_transaction:
            db.execute("ROLLBACK")  # nothing was written


def _migrate(db: sqlite3.Connection, path: str) -> None:
    """Create or migrate the schema, all steps in one write transaction."""
    db.execute("BEGIN IMMEDIATE")  # one opener at a time checks and migrates
    try:
        # Read again under the lock: another opener may have migrated meanwhile.
        version = _schema_version(db, path)
        for steps in _MIGRATIONS[version:]:
            for sql in steps:
                db.execute(sql)
        if version < SCHEMA_VERSION:
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        _check_columns(db, path)
        db.execute("COMMIT")
    finally:
        if db.in_transaction:
            db.execute("ROLLBACK")


def _schema_version(db: sqlite3.Connection, path: str) -> int:
    application_id = db.execute("PRAGMA application_id").fetchone()[0]
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if application_id == APPLICATION_ID:
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"SQLite store {path} has schema version {version}, written by a newer "
                f"jitbroker (this one reads up to {SCHEMA_VERSION}): upgrade jitbroker"
            )
        return version
    empty = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    if application_id == 0 and version == 0 and empty:
        return 0  # a new (or zero-length) file
    raise StoreError(f"{path} is an SQLite database of another application, not a lease store")


def _check_columns(db: sqlite3.Connection, path: str) -> None:
    have = {row[1] for row in db.execute("PRAGMA table_info(leases)")}
    missing = set(COLUMNS) - have
    if missing:
        raise StoreError(f"SQLite store {path}: table leases lacks columns {sorted(missing)}")


def _usage_rows(
    db: sqlite3.Connection, ids: list[str], *, used_only: bool
) -> dict[str, Usage | None]:
    """id -> its usage (None: stored, never used) for the stored leases of ``ids``."""
    found: dict[str, Usage | None] = {}
    for at in range(0, len(ids), 500):  # under SQLite's limit of bound parameters
        chunk = ids[at : at + 500]
        marks = ", ".join("?" * len(chunk))  # placeholders only: no input spliced
        sql = f"SELECT id, last_used_at, use_count, used_by FROM leases WHERE id IN ({marks})"  # noqa: S608
        if used_only:
            sql += " AND use_count > 0"
        for lease_id, last, count, by in db.execute(sql, chunk):
            used = count and last is not None
            found[str(lease_id)] = (
                Usage(float(last), int(count), tuple(json.loads(by or "[]"))) if used else None
            )
    return found


# -- helpers (no I/O) ---------------------------------------------------------------
@contextmanager
def _translated(action: str, path: str) -> Iterator[None]:
    """sqlite3 errors become ours at the boundary, the original chained as cause."""
    try:
        yield
    except sqlite3.Error as exc:
        raise _translate(exc, action, path) from exc


def _translate(exc: sqlite3.Error, action: str, path: str) -> StoreError:
    """``StoreUnavailable`` if SQLite could not get at the file now, else ``StoreError``."""
    code = getattr(exc, "sqlite_errorcode", None)
    kind = _UNAVAILABLE.get(code & 0xFF) if isinstance(code, int) else None
    if kind is not None:
        return StoreUnavailable(
            f"SQLite store {path} unavailable ({kind}), could not {action}: {exc}"
        )
    return StoreError(f"SQLite store {path}: could not {action}: {exc}")


def _jobs(event: str, leases: list[Lease], outbox: Outbox, at: float) -> list[Job]:
    """The jobs ``event`` makes for ``leases``. event_jobs is called only for a
    lease it may give some (a hook asked for, a provider, or for ``on_expire``
    the lease's own hooks): revoking many plain leases builds nothing."""
    return [
        job
        for lease in leases
        if outbox.hooks or lease.provider is not None or lease.expire_hooks is not None
        for job in event_jobs(event, lease, outbox, at)
    ]


def _where(where: LeaseFilter) -> tuple[str, dict[str, Any]]:
    """The filter as an SQL condition over fixed column names, and its parameters."""
    params = {name: getattr(where, name) for name in _FILTER_FIELDS}
    params = {name: value for name, value in params.items() if value is not None}
    return " AND ".join(f"{name} = :{name}" for name in params) or "1", params


def _check_times(lease: Lease) -> None:
    for name in ("issued_at", "expires_at", "max_expires_at"):
        _check_time(name, getattr(lease, name))
    if lease.revoked_at is not None:
        _check_time("revoked_at", lease.revoked_at)


def _check_time(name: str, value: float) -> None:
    # SQLite stores NaN as NULL and infinities as REAL: neither reads back as a lease.
    if not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number of seconds, got {value!r}")


def _rows(rows: Sequence[Sequence[Any]]) -> list[Lease]:
    return [from_row(row) for row in rows]
