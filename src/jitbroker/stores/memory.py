"""``MemoryStore``: the default, in-process, thread-safe store.

Leases live in a dict; reads take no lock (a dict lookup is atomic), writes take
one short lock. Expiry is ordered by a heap with lazy deletion: renewals push
a new entry and stale ones are skipped when popped, so a sweep costs
O(k log n) for k expired leases, never a scan. Leases that need ``on_expire``
hooks wait in one heap per ``expire_hooks`` value, so a sweep only pops the
heaps of leases it can finish: a backlog awaiting other hooks costs it nothing.
Dead leases wait in a second heap until their tokens can no longer verify, then
they are purged, which keeps memory bounded by the number of live leases (and
of expired ones awaiting a broker with their hooks).
"""

from __future__ import annotations

import heapq
import math
import threading
from collections.abc import Collection, Sequence
from heapq import heappush

import attrs

from ..lease import Lease
from ..usage import Usage, UsageRecord, merge
from .base import NO_OUTBOX, Job, LeaseFilter, Outbox, Quota, event_jobs

__all__ = ["MemoryStore"]


class _Index:
    """Attribute value -> lease ids. A single id is kept as a bare string (most
    tasks and parents have one lease), more as a set: saves ~200 bytes a lease."""

    __slots__ = ("_map",)

    def __init__(self) -> None:
        self._map: dict[str, str | set[str]] = {}

    def add(self, value: str, lease_id: str) -> None:
        current = self._map.setdefault(value, lease_id)  # one lookup in the common case
        if current is lease_id:
            return
        if isinstance(current, str):
            self._map[value] = {current, lease_id}
        else:
            current.add(lease_id)

    def discard(self, value: str, lease_id: str) -> None:
        current = self._map.get(value)
        if isinstance(current, set):
            current.discard(lease_id)
            if not current:
                del self._map[value]
        elif current == lease_id:
            del self._map[value]

    def get(self, value: str) -> Collection[str]:
        current = self._map.get(value)
        if current is None:
            return ()
        return (current,) if isinstance(current, str) else current


class _Counted:
    """The leases of one (subject, owner or None) key not yet dead for good
    (revoked, claimed or purged): their ids; a heap of (expires_at, id) so that
    those that expire are found without a scan (a renewal pushes a new entry;
    stale ones are skipped); and which of them had expired by ``horizon``, the
    latest time counted at. An expired lease stays in ``ids`` until it is
    claimed, so a count at an earlier time (a clock stepped back) is exact."""

    __slots__ = ("expired", "heap", "horizon", "ids")

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.heap: list[tuple[float, str]] = []
        self.expired: set[str] = set()
        self.horizon = -math.inf

    def add(self, lease: Lease, leases: dict[str, Lease]) -> None:
        self.ids.add(lease.id)
        if lease.expires_at > self.horizon:  # a renewal brings an expired one back
            self.expired.discard(lease.id)
        heappush(self.heap, (lease.expires_at, lease.id))
        if len(self.heap) > 2 * len(self.ids) + 32:  # stale entries: rebuild, amortized O(1)
            self.heap = [(leases[i].expires_at, i) for i in self.ids if i in leases]
            heapq.heapify(self.heap)


class MemoryStore:
    """Leases in this process's memory; lost when it exits. Thread-safe."""

    blocking = False

    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}
        self._claimed: set[str] = set()  # expired leases already handed to a sweeper
        self._expiry: list[tuple[float, str]] = []  # (expires_at, id), lazily deleted
        # The same for leases that need on_expire hooks, one heap per expire_hooks.
        self._hook_expiry: dict[str, list[tuple[float, str]]] = {}
        self._dead: list[tuple[float, str]] = []  # (expires_at, id) of dead leases
        # Task run, task and parent are indexed: task exit and subtree revocation
        # are hot. Owner, subject, key id and issuer filters (offboarding, key
        # retirement) scan: an index would hold every lease under a handful of
        # values (one issuer, typically, in a store that lives in one process).
        self._by_task = _Index()
        self._by_run = _Index()
        self._by_parent = _Index()
        # Quota counting, off (one falsy check per add) until a quota is first
        # checked; then one scan counts what is there, and add, extend, revoke and
        # purge keep (subject, owner or None) -> _Counted up to date. A key with
        # nothing left in it is dropped: memory follows the live leases.
        self._counting = False
        self._counted: dict[tuple[str, str | None], _Counted] = {}
        self._jobs = _Jobs()
        self._retired: dict[str, float] = {}  # kid -> retired at (KeyRetirements)
        self._usage: dict[str, Usage] = {}  # lease id -> usage (UsageRecording)
        self._lock = threading.Lock()
        self._acquire, self._release = self._lock.acquire, self._lock.release

    def __repr__(self) -> str:
        return f"<MemoryStore leases={len(self._leases)}>"

    def __len__(self) -> int:
        return len(self._leases)

    # -- the protocol ------------------------------------------------------
    def add(
        self, lease: Lease, quotas: Sequence[Quota] = (), *, outbox: Outbox = NO_OUTBOX
    ) -> bool:
        lease_id, parent, task = lease.id, lease.parent, lease.task
        self._acquire()  # not `with`: half the cost, and this is on every issue
        try:
            for quota in quotas:
                if self._active_count(quota, lease.issued_at) >= quota.limit:
                    raise quota.exceeded()
            if parent is not None:
                if not self._live(parent, lease.issued_at):
                    return False
                self._by_parent.add(parent, lease_id)
            self._leases[lease_id] = lease
            hooks = lease.expire_hooks
            heappush(
                self._expiry if hooks is None else self._heap(hooks), (lease.expires_at, lease_id)
            )
            if task is not None:
                self._by_task.add(task, lease_id)
            if lease.task_run is not None:
                self._by_run.add(lease.task_run, lease_id)
            if self._counting and lease.revoked_at is None:
                self._count(lease)
            if outbox.hooks or lease.provider is not None:
                self._jobs.add(event_jobs("on_issue", lease, outbox, lease.issued_at))
        finally:
            self._release()
        return True

    def get(self, lease_id: str) -> Lease | None:
        return self._leases.get(lease_id)

    def revoke(
        self, lease_id: str, *, at: float, reason: str, outbox: Outbox = NO_OUTBOX
    ) -> list[Lease]:
        with self._lock:
            return self._revoke_tree([lease_id], at, reason, outbox)

    def revoke_where(
        self, where: LeaseFilter, *, at: float, reason: str, outbox: Outbox = NO_OUTBOX
    ) -> list[Lease]:
        with self._lock:
            ids = [lease.id for lease in self._find(where)]
            return self._revoke_tree(ids, at, reason, outbox)

    def extend(self, lease_id: str, *, expires_at: float, at: float) -> Lease | None:
        with self._lock:
            if not self._live(lease_id, at):
                return None
            lease = attrs.evolve(self._leases[lease_id], expires_at=expires_at)
            self._leases[lease_id] = lease
            hooks = lease.expire_hooks
            heap = self._expiry if hooks is None else self._heap(hooks)
            heapq.heappush(heap, (expires_at, lease_id))
            if self._counting:
                self._count(lease)  # its new expiry: counted until then
            return lease

    def find(self, where: LeaseFilter) -> list[Lease]:
        with self._lock:
            return self._find(where)

    def claim_expired(
        self,
        now: float,
        limit: int = 1000,
        expire_hooks: Collection[str] = (),
        *,
        outbox: Outbox = NO_OUTBOX,
    ) -> list[Lease]:
        claimed: list[Lease] = []
        with self._lock:
            self._claim_from(self._expiry, None, now, limit, claimed)
            for hooks in expire_hooks:
                heap = self._hook_expiry.get(hooks)
                if heap is not None:
                    self._claim_from(heap, hooks, now, limit, claimed)
                    if not heap:
                        del self._hook_expiry[hooks]
            for lease in claimed:
                if lease.expire_hooks is not None or lease.provider is not None:
                    self._jobs.add(event_jobs("on_expire", lease, outbox, now))
        return claimed

    def awaiting_hooks(self, now: float) -> dict[str, int]:
        """Expired, unclaimed leases that need hooks, per ``expire_hooks`` value."""
        with self._lock:
            counts = {h: self._due(heap, h, now) for h, heap in self._hook_expiry.items()}
        return {hooks: n for hooks, n in counts.items() if n}

    def count_active(self, now: float) -> int:
        """How many leases are active at ``now`` (neither revoked, claimed nor
        expired), for ``health()``: a scan, O(stored leases), about 65 ms at 1M
        leases, in the probe's thread. The copy of the values is atomic under the
        GIL (no lock held while counting: issue never waits for a probe)."""
        try:
            leases = list(self._leases.values())
        except RuntimeError:  # changed during the copy (a build without the GIL)
            with self._lock:
                leases = list(self._leases.values())
        claimed = self._claimed
        return sum(
            1
            for lease in leases
            if lease.revoked_at is None and now < lease.expires_at and lease.id not in claimed
        )

    def purge(self, before: float) -> int:
        purged = 0
        with self._lock:
            heap = self._dead
            while heap and heap[0][0] < before:
                _, lease_id = heapq.heappop(heap)
                lease = self._leases.pop(lease_id, None)
                if lease is None:
                    continue
                self._claimed.discard(lease_id)
                self._usage.pop(lease_id, None)
                self._unindex(lease)
                if self._counting:
                    self._uncount(lease)
                purged += 1
        return purged

    # -- usage (UsageRecording) ------------------------------------------------
    def record_usage(self, batch: Sequence[UsageRecord]) -> None:
        """Merge the batch into the usage of the leases still stored."""
        with self._lock:
            usage, leases = self._usage, self._leases
            for rec in batch:
                if rec.lease_id in leases:
                    usage[rec.lease_id] = merge(usage.get(rec.lease_id), rec)

    def lease_usage(self, lease_ids: Collection[str]) -> dict[str, Usage]:
        """The usage of those of ``lease_ids`` that were ever used."""
        usage = self._usage
        with self._lock:
            return {i: usage[i] for i in lease_ids if i in usage}

    def retire_key(self, kid: str, at: float) -> bool:
        """Record ``kid`` as retired (see ``KeyRetirements``)."""
        with self._lock:
            if kid in self._retired:
                return False
            self._retired = {**self._retired, kid: at}
            return True

    def retired_keys(self) -> dict[str, float]:
        """Every retired kid and when (copy-on-write: read without the lock)."""
        return dict(self._retired)

    def close(self) -> None:
        """Nothing to release; kept for the protocol."""

    # -- the outbox --------------------------------------------------------
    def claim_jobs(
        self, now: float, kinds: Collection[str], *, claim: str, until: float, limit: int = 100
    ) -> list[Job]:
        if not kinds or limit <= 0:
            return []
        with self._lock:
            return self._jobs.claim(now, kinds, claim, until, limit)

    def finish_jobs(self, ids: Collection[str], claim: str) -> int:
        with self._lock:
            return self._jobs.finish(ids, claim)

    def fail_job(
        self, job_id: str, claim: str, *, due: float, error: str, park: bool, attempt: bool = True
    ) -> bool:
        with self._lock:
            job = self._jobs.held(job_id, claim)
            if job is None:
                return False
            attempts = job.attempts + 1 if attempt else job.attempts
            self._jobs.put(
                attrs.evolve(job, due=due, error=error, parked=park, claim=None, attempts=attempts)
            )
            return True

    def get_job(self, job_id: str) -> Job | None:
        return self._jobs.by_id.get(job_id)

    def jobs(self, *, parked: bool | None = None, limit: int = 1000) -> list[Job]:
        with self._lock:
            found = [j for j in self._jobs.by_id.values() if parked is None or j.parked == parked]
        return sorted(found, key=lambda job: (job.due, job.id))[: max(limit, 0)]

    def retry_jobs(self, ids: Collection[str] | None, now: float) -> int:
        with self._lock:
            jobs = self._jobs.by_id
            chosen = (
                [jobs[i] for i in dict.fromkeys(ids) if i in jobs]
                if ids is not None
                else list(jobs.values())
            )
            parked = [job for job in chosen if job.parked]
            for job in parked:
                self._jobs.put(attrs.evolve(job, parked=False, due=now, limit=job.attempts))
            return len(parked)

    def forget_jobs(self, ids: Collection[str]) -> list[Job]:
        with self._lock:
            gone = (self._jobs.by_id.pop(job_id, None) for job_id in dict.fromkeys(ids))
            return [job for job in gone if job is not None]

    # -- helpers (caller holds the lock) ----------------------------------
    def _heap(self, hooks: str) -> list[tuple[float, str]]:
        heap = self._hook_expiry.get(hooks)
        if heap is None:
            heap = self._hook_expiry[hooks] = []
        return heap

    def _awaiting(self, due: float, hooks: str | None, lease_id: str) -> Lease | None:
        """The lease of an entry of ``hooks``' heap if it still awaits its claim at
        ``due``; None for a stale entry (purged, renewed since, revoked, claimed,
        or its id stored again with other hooks)."""
        lease = self._leases.get(lease_id)
        if lease is None or lease.expires_at != due or lease.revoked_at is not None:
            return None
        if lease.expire_hooks != hooks or lease_id in self._claimed:
            return None
        return lease

    def _claim_from(
        self,
        heap: list[tuple[float, str]],
        hooks: str | None,
        now: float,
        limit: int,
        claimed: list[Lease],
    ) -> None:
        while heap and heap[0][0] <= now and len(claimed) < limit:
            due, lease_id = heapq.heappop(heap)
            lease = self._awaiting(due, hooks, lease_id)
            if lease is None:
                continue
            self._claimed.add(lease_id)
            heapq.heappush(self._dead, (due, lease_id))
            claimed.append(lease)
            if self._counting:
                self._uncount(lease)

    def _due(self, heap: list[tuple[float, str]], hooks: str, now: float) -> int:
        """How many leases of ``heap`` await their claim at ``now``."""
        # The entries due by `now` are a subtree at the heap's root: walk only it.
        found: set[str] = set()  # a lease extended to the same time twice has two entries
        stack = [0] if heap else []
        while stack:
            i = stack.pop()
            due, lease_id = heap[i]
            if due > now:
                continue
            if self._awaiting(due, hooks, lease_id) is not None:
                found.add(lease_id)
            stack += (j for j in (2 * i + 1, 2 * i + 2) if j < len(heap))
        return len(found)

    def _live(self, lease_id: str, at: float) -> bool:
        lease = self._leases.get(lease_id)
        return lease is not None and lease.is_active(at) and lease_id not in self._claimed

    def _active_count(self, quota: Quota, at: float) -> int:
        if not self._counting:
            self._counting = True
            for lease in self._leases.values():  # all but the dead for good
                if lease.revoked_at is None and lease.id not in self._claimed:
                    self._count(lease)
        key = (quota.subject, quota.owner)
        counted = self._counted.get(key)
        if counted is None:
            return 0
        if at < counted.horizon:  # the clock stepped back: count exactly, by a scan
            return sum(1 for i in counted.ids if self._live(i, at))
        counted.horizon = at
        ids, heap, expired = counted.ids, counted.heap, counted.expired
        while heap and heap[0][0] <= at:  # O(log n) per lease that expired since
            _, lease_id = heapq.heappop(heap)
            current = self._leases.get(lease_id)
            if lease_id in ids and current is not None and current.expires_at <= at:
                expired.add(lease_id)  # else renewed: it has a later entry
        return len(ids) - len(expired)

    @staticmethod
    def _keys(lease: Lease) -> tuple[tuple[str, str | None], ...]:
        subject = lease.subject
        return (
            ((subject, None),) if lease.owner is None else ((subject, None), (subject, lease.owner))
        )

    def _count(self, lease: Lease) -> None:
        counted_by = self._counted
        for key in self._keys(lease):
            counted = counted_by.get(key)
            if counted is None:
                counted = counted_by[key] = _Counted()
            counted.add(lease, self._leases)

    def _uncount(self, lease: Lease) -> None:
        for key in self._keys(lease):
            counted = self._counted.get(key)
            if counted is not None:
                counted.ids.discard(lease.id)
                counted.expired.discard(lease.id)
                if not counted.ids:
                    del self._counted[key]

    def _find(self, where: LeaseFilter) -> list[Lease]:
        ids: Collection[str]
        if where.task_run is not None:
            ids = self._by_run.get(where.task_run)
        elif where.task is not None:
            ids = self._by_task.get(where.task)
        elif where.parent is not None:
            ids = self._by_parent.get(where.parent)
        else:
            ids = self._leases.keys()
        leases = (self._leases[i] for i in ids)
        return [lease for lease in leases if where.matches(lease)]

    def _revoke_tree(self, roots: list[str], at: float, reason: str, outbox: Outbox) -> list[Lease]:
        # Walk down from each root; a dead lease's children were revoked with it,
        # so the walk only descends through leases that transition now.
        revoked: list[Lease] = []
        stack = list(roots)
        while stack:
            lease_id = stack.pop()
            if not self._live(lease_id, at):
                continue
            lease = attrs.evolve(self._leases[lease_id], revoked_at=at, revoke_reason=reason)
            self._leases[lease_id] = lease
            heapq.heappush(self._dead, (lease.expires_at, lease_id))
            revoked.append(lease)
            stack.extend(self._by_parent.get(lease_id))
            if self._counting:
                self._uncount(lease)
            if outbox.hooks or lease.provider is not None:
                self._jobs.add(event_jobs("on_revoke", lease, outbox, at))
        return revoked

    def _unindex(self, lease: Lease) -> None:
        if lease.task is not None:
            self._by_task.discard(lease.task, lease.id)
        if lease.task_run is not None:
            self._by_run.discard(lease.task_run, lease.id)
        if lease.parent is not None:
            self._by_parent.discard(lease.parent, lease.id)


class _Jobs:
    """The outbox: jobs by id, and one heap of (due, id) per kind for the
    unparked ones, lazily deleted (a stale entry is skipped when popped; a heap
    with more stale entries than live ones is rebuilt, amortized O(1))."""

    __slots__ = ("by_id", "heaps")

    def __init__(self) -> None:
        self.by_id: dict[str, Job] = {}
        self.heaps: dict[str, list[tuple[float, str]]] = {}

    def add(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.id not in self.by_id:  # insert if absent, as every store does
                self.put(job)

    def put(self, job: Job) -> None:
        self.by_id[job.id] = job
        if job.parked:
            return
        heap = self.heaps.get(job.kind)
        if heap is None:
            heap = self.heaps[job.kind] = []
        heappush(heap, (job.due, job.id))
        if len(heap) > 2 * len(self.by_id) + 32:
            self._rebuild(job.kind)

    def _rebuild(self, kind: str) -> None:
        live = [(j.due, j.id) for j in self.by_id.values() if j.kind == kind and not j.parked]
        heapq.heapify(live)
        self.heaps[kind] = live

    def held(self, job_id: str, claim: str) -> Job | None:
        job = self.by_id.get(job_id)
        return job if job is not None and job.claim == claim else None

    def claim(
        self, now: float, kinds: Collection[str], claim: str, until: float, limit: int
    ) -> list[Job]:
        due: dict[str, Job] = {}  # by id: a job pushed twice at one due time is one job
        for kind in kinds:
            heap = self.heaps.get(kind)
            while heap and heap[0][0] <= now:
                at, job_id = heapq.heappop(heap)
                job = self.by_id.get(job_id)
                if job is not None and job.due == at and not job.parked:
                    due[job_id] = job
            if heap is not None and not heap:
                del self.heaps[kind]
        ordered = sorted(due.values(), key=lambda job: (job.due, job.id))
        for job in ordered[limit:]:  # not taken this time: back in their heaps
            heappush(self.heaps.setdefault(job.kind, []), (job.due, job.id))
        taken = [attrs.evolve(job, due=until, claim=claim) for job in ordered[:limit]]
        for job in taken:
            self.put(job)
        return taken

    def finish(self, ids: Collection[str], claim: str) -> int:
        done = [i for i in dict.fromkeys(ids) if self.held(i, claim) is not None]
        for job_id in done:
            del self.by_id[job_id]
        return len(done)
