"""The lease store protocol: a few small methods every store implements.

Each method is atomic on its own. The broker never holds a store lock across
calls; every invariant that needs two steps to agree is enforced inside one
store call (``add`` refuses a child whose parent died, ``revoke`` takes the
whole subtree, ``claim_expired`` hands each lease to exactly one caller).

Stores translate their own errors: a failure to reach the backend becomes
``StoreUnavailable`` with the original as ``__cause__``.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import attrs

from ..errors import InvalidRequest, QuotaExceeded
from ..lease import Lease

__all__ = ["AsyncLeaseStore", "LeaseFilter", "LeaseStore", "Quota", "as_async"]

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


@runtime_checkable
class LeaseStore(Protocol):
    """Where leases live. ``now`` is always passed in: stores never read a clock."""

    #: False for stores that never block (MemoryStore): AsyncBroker calls them inline.
    blocking: bool

    def add(self, lease: Lease, quotas: Sequence[Quota] = ()) -> bool:
        """Store a new lease. If it has a parent that is not active at
        ``lease.issued_at``, store nothing and return False. If a quota already
        counts ``limit`` leases active at ``lease.issued_at``, store nothing and
        raise ``quota.exceeded()``: the count and the insert are one atomic step."""
        ...

    def get(self, lease_id: str) -> Lease | None:
        """The lease with this id, or None (never stored, or purged)."""
        ...

    def revoke(self, lease_id: str, *, at: float, reason: str) -> list[Lease]:
        """Revoke the lease and its active descendants; return those that transitioned.

        Only a lease active at ``at`` transitions; an unknown or dead lease gives ``[]``.
        The change is durable and visible to every reader when this returns.
        """
        ...

    def revoke_where(self, where: LeaseFilter, *, at: float, reason: str) -> list[Lease]:
        """Revoke every active lease matching ``where`` and their descendants."""
        ...

    def extend(self, lease_id: str, *, expires_at: float, at: float) -> Lease | None:
        """Set a new expiry if the lease is active at ``at``; the updated lease, or None."""
        ...

    def find(self, where: LeaseFilter) -> list[Lease]:
        """Every stored lease matching ``where`` (live or dead, not yet purged)."""
        ...

    def claim_expired(
        self, now: float, limit: int = 1000, expire_hooks: Collection[str] = ()
    ) -> list[Lease]:
        """Leases expired by ``now`` and not yet claimed, each handed out exactly once.

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

    # Optional (not checked by ``isinstance``; the report says "not known"
    # without it): ``awaiting_hooks(now) -> dict[str, int]``, the expired leases
    # not yet claimed that need hooks, counted per ``expire_hooks`` value.


class AsyncLeaseStore(Protocol):
    """The async twin of ``LeaseStore``: the same methods, as coroutines."""

    async def add(self, lease: Lease, quotas: Sequence[Quota] = ()) -> bool: ...
    async def get(self, lease_id: str) -> Lease | None: ...
    async def revoke(self, lease_id: str, *, at: float, reason: str) -> list[Lease]: ...
    async def revoke_where(self, where: LeaseFilter, *, at: float, reason: str) -> list[Lease]: ...
    async def extend(self, lease_id: str, *, expires_at: float, at: float) -> Lease | None: ...
    async def find(self, where: LeaseFilter) -> list[Lease]: ...
    async def claim_expired(
        self, now: float, limit: int = 1000, expire_hooks: Collection[str] = ()
    ) -> list[Lease]: ...
    async def purge(self, before: float) -> int: ...
    async def close(self) -> None: ...


_METHODS = ("add", "get", "revoke", "revoke_where", "extend", "find", "claim_expired", "purge")


class _SyncAsAsync:
    """Presents a sync store as an ``AsyncLeaseStore``.

    A non-blocking store is called inline (no thread hop on the hot path); a
    blocking one runs in the default executor so the event loop never stalls.
    """

    def __init__(self, store: LeaseStore) -> None:
        self.sync = store
        for name in _METHODS:
            setattr(self, name, self._wrap(getattr(store, name), store.blocking))
        counter = getattr(store, "awaiting_hooks", None)  # optional
        if counter is not None:
            self.awaiting_hooks = self._wrap(counter, store.blocking)

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
