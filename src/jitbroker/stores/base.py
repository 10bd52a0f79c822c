"""The lease store protocol: a few small methods every store implements.

Each method is atomic on its own. The broker never holds a store lock across
calls; every invariant that needs two steps to agree is enforced inside one
store call (``add`` refuses a child whose parent died, ``revoke`` takes the
whole subtree, ``claim_expired`` hands each lease to exactly one caller).

Stores translate their own errors: a failure to reach the backend becomes
``StoreUnavailable`` with the original as ``__cause__``.

The outbox. Every side effect a lease event requires (a hook call, a provider's
create or revoke) is a ``Job`` the store records in the same atomic step as the
event: ``add``, ``revoke``, ``revoke_where`` and ``claim_expired`` take an
``Outbox`` saying which hooks the caller runs for the event, and the store
writes ``event_jobs(...)`` for every lease the event applies to. A job is
handed to one caller at a time by a claim with a deadline (``claim_jobs``); a
caller that dies mid-job leaves it to whoever claims it after the deadline.
A job that keeps failing is parked (``fail_job(..., park=True)``): listed by
``jobs(parked=True)``, made due again by ``retry_jobs``, deleted by
``forget_jobs``. Its id, ``<lease id>/<event>/<name>``, is the idempotency
key: the same on every attempt, in every process.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import attrs

from ..errors import InvalidRequest, QuotaExceeded
from ..lease import Lease, _builder
from ..usage import Usage, UsageRecord

__all__ = [
    "EVENTS",
    "NO_OUTBOX",
    "ActiveCount",
    "AsyncLeaseStore",
    "Job",
    "LeaseFilter",
    "LeaseStore",
    "Outbox",
    "Quota",
    "UsageRecording",
    "as_async",
    "event_jobs",
    "job_id",
]

T = TypeVar("T")


@attrs.frozen
class LeaseFilter:
    """Which leases an operation applies to: every given field must match (AND)."""

    owner: str | None = None
    subject: str | None = None
    task: str | None = None
    parent: str | None = None
    key_id: str | None = None
    issuer: str | None = None
    task_run: str | None = None
    provider: str | None = None

    def is_empty(self) -> bool:
        """True if no field is set (it would match every lease)."""
        return all(value is None for value in attrs.astuple(self))

    def matches(self, lease: Lease) -> bool:
        """True if ``lease`` matches every set field."""
        return all(
            want is None or getattr(lease, name) == want
            for name, want in attrs.asdict(self).items()
        )

    def describe(self) -> str:
        """``owner='alice', task='job-42'``: for messages and audit events."""
        return ", ".join(f"{k}={v!r}" for k, v in attrs.asdict(self).items() if v is not None)


@attrs.frozen
class Quota:
    """At most ``limit`` active leases of ``subject`` (of ``subject`` held by
    ``owner``, if set). ``add`` checks it in the same atomic step that stores the
    lease, so concurrent issuers can never overshoot it."""

    subject: str
    owner: str | None
    limit: int
    rule: str = "policy"  # who set it, for the message

    def describe(self) -> str:
        """``subject 'svc:x' with owner 'alice'``: whose leases it counts."""
        whom = f"subject {self.subject!r}"
        return whom if self.owner is None else f"{whom} with owner {self.owner!r}"

    def exceeded(self) -> QuotaExceeded:
        """The error a store raises when the quota is full."""
        return QuotaExceeded(
            f"{self.rule} allows at most {self.limit} active leases for {self.describe()}; "
            "revoke one or wait for one to expire",
            quota=self,
        )


#: The lease events that make jobs: hook events, and a provider's create (when
#: a lease with a provider is added) and revoke (when it dies, by any path).
EVENTS = ("on_issue", "on_revoke", "on_expire", "create", "revoke")


@attrs.frozen(slots=True, weakref_slot=False)
class Job:
    """One side effect a lease event requires, waiting in the store's outbox."""

    #: ``<lease id>/<event>/<name>``: unique, and the idempotency key a hook
    #: receives (the same on a retry after a crash, in any process).
    id: str
    event: str  # one of EVENTS
    name: str  # the hook's name, or the provider's
    lease: Lease  # the lease as the event left it
    #: When it may be claimed next; while claimed, the claim's deadline.
    due: float
    limit: int  # a failure that makes ``attempts`` exceed it parks the job
    attempts: int = 0
    error: str = ""  # the last failure's class and message, shortened
    parked: bool = False
    claim: str | None = None  # who holds it (until ``due``), or None

    @property
    def kind(self) -> str:
        """``event:name``: what ``claim_jobs`` filters on (who can run it)."""
        return f"{self.event}:{self.name}"


@attrs.frozen(slots=True, weakref_slot=False)
class Outbox:
    """What the caller of a lease event asks the store to record with it.

    ``hooks`` are the caller's hook names for the event (for ``on_expire`` the
    names come from each lease's ``expire_hooks`` instead). Jobs the caller
    runs itself are written claimed by ``claim`` until ``until``; a provider
    job for a provider not in ``providers`` is written unclaimed, due at once,
    for a broker that has it.
    """

    hooks: tuple[str, ...] = ()
    providers: frozenset[str] = frozenset()
    claim: str | None = None
    until: float = 0.0
    limit: int = 5


#: Positional constructors for the hot paths (see ``lease._builder``).
new_job = _builder(Job)
new_outbox = _builder(Outbox)

#: No hooks, nothing claimed: what a store records when given no ``Outbox``
#: (a provider's jobs are still written: a lease with a provider never dies
#: without its revoke recorded).
NO_OUTBOX = Outbox()


def job_id(lease_id: str, event: str, name: str) -> str:
    """The id (and idempotency key) of ``event``'s job ``name`` for a lease."""
    return f"{lease_id}/{event}/{name}"


# The last on_issue answer of event_jobs, by identity of its lease and outbox: an
# issue asks twice for the same jobs (the store writing them, the broker then
# running those it holds), and jobs are immutable, so the second gets the first's.
_last_issue: tuple[Lease, Outbox, float, list[Job]] | None = None


def event_jobs(event: str, lease: Lease, outbox: Outbox, at: float) -> list[Job]:
    """The jobs a store records when ``event`` (``on_issue``, ``on_revoke`` or
    ``on_expire``) happens to ``lease`` at ``at``: one per hook, and the
    lease's provider's create (``on_issue``) or revoke (otherwise)."""
    global _last_issue
    if event == "on_issue":
        last = _last_issue  # one read: another thread may replace it meanwhile
        if last is not None and last[0] is lease and last[1] is outbox and last[2] == at:
            return list(last[3])
        jobs = _event_jobs(event, lease, outbox, at)
        _last_issue = (lease, outbox, at, jobs)
        return list(jobs)
    return _event_jobs(event, lease, outbox, at)


def _event_jobs(event: str, lease: Lease, outbox: Outbox, at: float) -> list[Job]:
    if event == "on_expire":
        names: tuple[str, ...] | list[str] = (lease.expire_hooks or "").split()
    else:
        names = outbox.hooks
    claim, until, limit = outbox.claim, outbox.until, outbox.limit
    held = claim is not None
    due = until if held else at
    jobs = [
        new_job(f"{lease.id}/{event}/{name}", event, name, lease, due, limit, 0, "", False, claim)
        for name in names
    ]
    provider = lease.provider
    if provider is not None:
        step = "create" if event == "on_issue" else "revoke"
        mine = held and provider in outbox.providers
        jobs.append(
            new_job(
                f"{lease.id}/{step}/{provider}",
                step,
                provider,
                lease,
                until if mine else at,
                limit,
                0,
                "",
                False,
                claim if mine else None,
            )
        )
    return jobs


@runtime_checkable
class LeaseStore(Protocol):
    """Where leases live. ``now`` is always passed in: stores never read a clock."""

    #: False for stores that never block (MemoryStore): AsyncBroker calls them inline.
    blocking: bool

    def add(
        self, lease: Lease, quotas: Sequence[Quota] = (), *, outbox: Outbox = NO_OUTBOX
    ) -> bool:
        """Store a new lease, and ``event_jobs("on_issue", lease, outbox,
        lease.issued_at)`` in the same atomic step. If it has a parent that is
        not active at ``lease.issued_at``, store nothing and return False. If a
        quota already counts ``limit`` leases active at ``lease.issued_at``,
        store nothing and raise ``quota.exceeded()``: the count and the insert
        are one atomic step."""
        ...

    def get(self, lease_id: str) -> Lease | None:
        """The lease with this id, or None (never stored, or purged)."""
        ...

    def revoke(
        self, lease_id: str, *, at: float, reason: str, outbox: Outbox = NO_OUTBOX
    ) -> list[Lease]:
        """Revoke the lease and its active descendants; return those that transitioned.

        Only a lease active at ``at`` transitions; an unknown or dead lease gives ``[]``.
        For each that transitioned, ``event_jobs("on_revoke", lease, outbox, at)``
        (with the revoked lease) is recorded in the same atomic step. The change
        is durable and visible to every reader when this returns.
        """
        ...

    def revoke_where(
        self, where: LeaseFilter, *, at: float, reason: str, outbox: Outbox = NO_OUTBOX
    ) -> list[Lease]:
        """Revoke every active lease matching ``where`` and their descendants,
        recording their jobs as ``revoke`` does."""
        ...

    def extend(self, lease_id: str, *, expires_at: float, at: float) -> Lease | None:
        """Set a new expiry if the lease is active at ``at``; the updated lease, or None."""
        ...

    def find(self, where: LeaseFilter) -> list[Lease]:
        """Every stored lease matching ``where`` (live or dead, not yet purged)."""
        ...

    def claim_expired(
        self,
        now: float,
        limit: int = 1000,
        expire_hooks: Collection[str] = (),
        *,
        outbox: Outbox = NO_OUTBOX,
    ) -> list[Lease]:
        """Leases expired by ``now`` and not yet claimed, each handed out exactly
        once, with ``event_jobs("on_expire", lease, outbox, now)`` recorded for
        each in the same atomic step.

        Only leases the caller can finish are claimed: those needing no hook
        (``expire_hooks`` None) and those whose ``expire_hooks`` value is one of
        ``expire_hooks``. The others stay unclaimed, in the same atomic step, for
        a caller that can run their hooks. The filter must be served by an index
        (one per value, ordered by expiry): a backlog of leases the caller cannot
        finish must cost it nothing.
        """
        ...

    def purge(self, before: float) -> int:
        """Delete dead leases (revoked or claimed expired) with ``expires_at < before``."""
        ...

    def close(self) -> None:
        """Release connections and files. Idempotent."""
        ...

    # -- the outbox --------------------------------------------------------
    def claim_jobs(
        self, now: float, kinds: Collection[str], *, claim: str, until: float, limit: int = 100
    ) -> list[Job]:
        """Up to ``limit`` jobs due by ``now``, not parked, whose ``kind`` is one of
        ``kinds``, oldest due first: each now held by ``claim`` until ``until``
        (returned so: ``due=until``, ``claim=claim``). A job held by another
        claim past its deadline is due. Served by an index per kind: jobs no
        caller can run must cost it nothing."""
        ...

    def finish_jobs(self, ids: Collection[str], claim: str) -> int:
        """Delete the jobs of ``ids`` that ``claim`` still holds; how many."""
        ...

    def fail_job(
        self, job_id: str, claim: str, *, due: float, error: str, park: bool, attempt: bool = True
    ) -> bool:
        """Release a job ``claim`` holds after a failure: ``attempts`` + 1 (unless
        not ``attempt``: a deferral), ``error`` kept, due again at ``due``, or
        parked if ``park``. False (nothing changed) if the claim was lost."""
        ...

    def get_job(self, job_id: str) -> Job | None:
        """The job with this id, or None (finished, forgotten, or never made)."""
        ...

    def jobs(self, *, parked: bool | None = None, limit: int = 1000) -> list[Job]:
        """Up to ``limit`` jobs, oldest due first: parked ones, unparked ones, or all."""
        ...

    def retry_jobs(self, ids: Collection[str] | None, now: float) -> int:
        """Unpark the parked jobs of ``ids`` (every parked job if None): due at
        ``now``, with one more attempt (``limit`` = ``attempts``); how many."""
        ...

    def forget_jobs(self, ids: Collection[str]) -> list[Job]:
        """Delete the jobs of ``ids`` whatever their state; those deleted."""
        ...

    # Optional (not checked by ``isinstance``; the report says "not known"
    # without it): ``awaiting_hooks(now) -> dict[str, int]``, the expired leases
    # not yet claimed that need hooks, counted per ``expire_hooks`` value.
    # Optional too (see ``ActiveCount``): ``count_active(now) -> int``.


class AsyncLeaseStore(Protocol):
    """The async twin of ``LeaseStore``: the same methods, as coroutines."""

    async def add(
        self, lease: Lease, quotas: Sequence[Quota] = (), *, outbox: Outbox = NO_OUTBOX
    ) -> bool: ...
    async def get(self, lease_id: str) -> Lease | None: ...
    async def revoke(
        self, lease_id: str, *, at: float, reason: str, outbox: Outbox = NO_OUTBOX
    ) -> list[Lease]: ...
    async def revoke_where(
        self, where: LeaseFilter, *, at: float, reason: str, outbox: Outbox = NO_OUTBOX
    ) -> list[Lease]: ...
    async def extend(self, lease_id: str, *, expires_at: float, at: float) -> Lease | None: ...
    async def find(self, where: LeaseFilter) -> list[Lease]: ...
    async def claim_expired(
        self,
        now: float,
        limit: int = 1000,
        expire_hooks: Collection[str] = (),
        *,
        outbox: Outbox = NO_OUTBOX,
    ) -> list[Lease]: ...
    async def purge(self, before: float) -> int: ...
    async def close(self) -> None: ...
    async def claim_jobs(
        self, now: float, kinds: Collection[str], *, claim: str, until: float, limit: int = 100
    ) -> list[Job]: ...
    async def finish_jobs(self, ids: Collection[str], claim: str) -> int: ...
    async def fail_job(
        self, job_id: str, claim: str, *, due: float, error: str, park: bool, attempt: bool = True
    ) -> bool: ...
    async def get_job(self, job_id: str) -> Job | None: ...
    async def jobs(self, *, parked: bool | None = None, limit: int = 1000) -> list[Job]: ...
    async def retry_jobs(self, ids: Collection[str] | None, now: float) -> int: ...
    async def forget_jobs(self, ids: Collection[str]) -> list[Job]: ...


@runtime_checkable
class KeyRetirements(Protocol):
    """Optional: a store that records retired signing keys, so a key retired by
    one broker is retired by every broker sharing the store (invariant 11).
    Every store shipped has it; a broker on a store without it retires keys in
    its own ring only."""

    def retire_key(self, kid: str, at: float) -> bool:
        """Record ``kid`` as retired at ``at`` (idempotent: the first time stays);
        True if this call recorded it."""
        ...

    def retired_keys(self) -> dict[str, float]:
        """Every retired kid and when it was retired."""
        ...


@runtime_checkable
class ActiveCount(Protocol):
    """Optional: a store that counts its active leases, so ``health()`` judges
    the lease-count warning threshold by the store (every process's leases)
    rather than by this process's metrics. Every store shipped has it; its
    docstring says what a count costs (docs/metrics.md has the figures)."""

    def count_active(self, now: float) -> int:
        """How many leases are active at ``now``: neither revoked, nor claimed,
        nor expired (``now < expires_at``)."""
        ...


@runtime_checkable
class UsageRecording(Protocol):
    """Optional: a store that keeps lease usage (jitbroker.usage), written by the
    sweep in batches, read by the report. Every store shipped has it; a broker
    on a store without it records nothing (docs/stores.md, "Lease usage")."""

    def record_usage(self, batch: Sequence[UsageRecord]) -> None:
        """Merge ``batch`` into the leases' usage in one write: ``last_used_at``
        the latest, ``use_count`` summed, ``used_by`` the union (at most
        ``MAX_USED_BY``). Ids of leases not stored (purged) are ignored."""
        ...

    def lease_usage(self, lease_ids: Collection[str]) -> dict[str, Usage]:
        """The usage of those of ``lease_ids`` that were ever used."""
        ...


_METHODS = (
    "add",
    "get",
    "revoke",
    "revoke_where",
    "extend",
    "find",
    "claim_expired",
    "purge",
    "claim_jobs",
    "finish_jobs",
    "fail_job",
    "get_job",
    "jobs",
    "retry_jobs",
    "forget_jobs",
)


class _SyncAsAsync:
    """Presents a sync store as an ``AsyncLeaseStore``.

    A non-blocking store is called inline (no thread hop on the hot path); a
    blocking one runs in the default executor so the event loop never stalls.
    """

    def __init__(self, store: LeaseStore) -> None:
        self.sync = store
        for name in _METHODS:
            setattr(self, name, self._wrap(getattr(store, name), store.blocking))
        optionals = ("awaiting_hooks", "retire_key", "retired_keys", "count_active")
        for optional in (*optionals, "record_usage", "lease_usage"):
            method = getattr(store, optional, None)
            if method is not None:
                # A count scans (MemoryStore: ~65 ms at 1M leases): never on the loop.
                threaded = store.blocking or optional == "count_active"
                setattr(self, optional, self._wrap(method, threaded))

    @staticmethod
    def _wrap(fn: Callable[..., T], blocking: bool) -> Callable[..., Any]:
        if blocking:

            async def threaded(*args: Any, **kwargs: Any) -> T:
                return await asyncio.to_thread(fn, *args, **kwargs)

            return threaded

        async def inline(*args: Any, **kwargs: Any) -> T:
            return fn(*args, **kwargs)

        return inline

    async def close(self) -> None:
        self.sync.close()


def as_async(store: LeaseStore | AsyncLeaseStore) -> AsyncLeaseStore:
    """The async view of ``store``: itself if it is async already (its methods are
    coroutine functions; the protocol check alone cannot tell, it only sees names)."""
    if inspect.iscoroutinefunction(getattr(store, "add", None)):
        return store  # type: ignore[return-value]
    if isinstance(store, LeaseStore):
        return _SyncAsAsync(store)  # type: ignore[return-value]
    raise InvalidRequest("store must implement LeaseStore or its async twin AsyncLeaseStore")
