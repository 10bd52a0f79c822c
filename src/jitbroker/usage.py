"""Lease usage: which leases are used, how often, and by which audiences.

An online verify records its lease in memory (``UsageLog.record``: one dict
update under a lock, no store call); the broker's sweep hands the batch to the
store (``record_usage``) at most every ``usage_interval`` seconds, one write
for every lease used since. A crash loses at most one interval of counts,
never a lease. The store merges: ``last_used_at`` the latest, ``use_count``
summed, ``used_by`` the union of audiences, bounded by ``MAX_USED_BY``.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

__all__ = ["MAX_PENDING", "MAX_USED_BY", "Usage", "UsageLog", "UsageRecord", "merge"]

#: Audiences kept per lease: a lease has one audience, so more than one is
#: already a finding; the bound keeps a flood of audiences from growing a record.
MAX_USED_BY = 4
#: Leases remembered between two flushes; past it, uses of new leases are
#: counted in ``dropped`` only (memory stays bounded when no sweep runs).
MAX_PENDING = 100_000


@attrs.frozen
class Usage:
    """What the store knows of a lease's use."""

    last_used_at: float | None = None
    use_count: int = 0
    used_by: tuple[str, ...] = ()


@attrs.frozen
class UsageRecord:
    """The uses of one lease since the last flush: one entry of a ``record_usage`` batch."""

    lease_id: str
    last_used_at: float
    uses: int
    used_by: tuple[str, ...]


def merge(old: Usage | None, new: UsageRecord) -> Usage:
    """``old`` plus the uses in ``new``: latest time, summed count, bounded union."""
    if old is None:
        old = Usage()
    last = new.last_used_at if old.last_used_at is None else max(old.last_used_at, new.last_used_at)
    return Usage(last, old.use_count + new.uses, union(old.used_by, new.used_by))


def union(have: Sequence[str], more: Iterable[str]) -> tuple[str, ...]:
    """``have`` then the audiences of ``more`` it lacks, at most ``MAX_USED_BY``."""
    out = list(have)
    for audience in more:
        if len(out) >= MAX_USED_BY:
            break
        if audience not in out:
            out.append(audience)
    return tuple(out)


class UsageLog:
    """Uses recorded since the last flush, per lease id. Thread-safe.

    A repeat use (the lease already pending, for that audience) takes no lock:
    one dict read, one store into a list, and ``next`` on an ``itertools.count``,
    each atomic under the GIL (``record`` is on the verify hot path: a lock and
    an in-place add cost a cached verify about 6%). A use racing the flush that
    takes its entry may go uncounted: these are counters, not an audit trail
    (the audit log records every verify failure, and every lease event).
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.next_flush = 0.0  # 0: not started; the first sweep starts the interval
        self.dropped = 0
        # lease id -> [last used at, a count of uses, audiences]
        self._pending: dict[str, list[Any]] = {}
        self._lock = threading.Lock()  # new entries, new audiences, drain and restore

    def __len__(self) -> int:
        return len(self._pending)

    def record(self, lease_id: str, audience: str, now: float) -> None:
        """One successful online verify of ``lease_id`` for ``audience`` at ``now``."""
        entry = self._pending.get(lease_id)
        if entry is not None and audience in entry[2]:
            entry[0] = now
            next(entry[1])
            return
        with self._lock:
            entry = self._pending.get(lease_id)
            if entry is not None:
                entry[0] = now
                next(entry[1])
                entry[2] = union(entry[2], (audience,))
            elif len(self._pending) < MAX_PENDING:
                uses = itertools.count()
                next(uses)
                self._pending[lease_id] = [now, uses, (audience,)]
            else:
                self.dropped += 1

    def due(self, now: float) -> bool:
        """Whether a flush is due at ``now`` (and there is something to flush)."""
        if not self.next_flush:
            self.next_flush = now + self.interval
        return bool(self._pending) and now >= self.next_flush

    def drain(self, now: float) -> list[UsageRecord]:
        """Take every pending use (the log starts empty again); the next flush
        is due ``interval`` seconds after ``now``."""
        with self._lock:
            pending, self._pending = self._pending, {}
        self.next_flush = now + self.interval
        return [
            UsageRecord(lease_id, last, next(uses), audiences)
            for lease_id, (last, uses, audiences) in pending.items()
        ]

    def restore(self, batch: Iterable[UsageRecord]) -> None:
        """Put back a batch the store refused, merged with uses recorded since."""
        with self._lock:
            pending = self._pending
            for rec in batch:
                entry = pending.get(rec.lease_id)
                if entry is None:
                    if len(pending) < MAX_PENDING:
                        pending[rec.lease_id] = [
                            rec.last_used_at,
                            itertools.count(rec.uses),
                            rec.used_by,
                        ]
                    continue
                last, uses, audiences = entry
                pending[rec.lease_id] = [
                    max(last, rec.last_used_at),
                    itertools.count(next(uses) + rec.uses),
                    union(rec.used_by, audiences),
                ]
