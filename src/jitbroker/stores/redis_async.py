"""``AsyncRedisStore``: ``RedisStore`` for asyncio code, on ``redis.asyncio``.

Nothing here decides anything: the key layout, the Lua scripts, the argument
building, the reply parsing, the time checks and the error translation all
live once in ``jitbroker.stores.redis`` (``RedisLeases``) and, for the
outbox, ``jitbroker.stores.redis_outbox`` (``OutboxSteps``), written as steps
that the sync store runs and this one awaits (see ``jitbroker._drive``). The
two stores read and write the same keys, so they can share one prefix.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .._drive import Step, arun
from ..lease import Lease
from ..usage import Usage, UsageRecord
from .base import NO_OUTBOX, Job, LeaseFilter, Outbox, Quota
from .redis import CLIENT_OPTIONS, RedisLeases, _translated

__all__ = ["AsyncRedisStore"]


class AsyncRedisStore(RedisLeases[redis.asyncio.Redis]):
    """Leases in Redis for ``AsyncBroker``: ``RedisStore``'s behaviour, guarantees
    and options, with every method a coroutine (so no thread hop per call).

    ``url_or_client`` is a ``redis://`` URL (the store then owns a
    ``redis.asyncio.Redis`` without retries and with 5 s socket timeouts, and
    ``close`` closes it) or an existing ``redis.asyncio.Redis`` (left open).
    Build the store, or at least use it, on one event loop: redis.asyncio
    connections belong to the loop that opened them.

    Errors reaching Redis raise ``StoreUnavailable``, any other Redis error
    ``StoreError``, each with the original as ``__cause__``. ``revocations()``
    gives a revocation cache as ``RedisStore``'s does: its feed runs in a thread
    of its own, on a sync connection made with this client's options, and a
    strict ``revoke`` awaits the caches without blocking the event loop.
    """

    def _connect(self, url: str) -> redis.asyncio.Redis:
        return redis.asyncio.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **CLIENT_OPTIONS)

    def _pause(self, seconds: float) -> Step:
        # A strict revoke's wait for the caches must not block the event loop.
        return lambda client: asyncio.sleep(seconds)

    # -- the protocol ------------------------------------------------------
    async def add(
        self, lease: Lease, quotas: Sequence[Quota] = (), *, outbox: Outbox = NO_OUTBOX
    ) -> bool:
        """Store ``lease`` and its ``on_issue`` jobs; False (nothing written) if its
        parent is not active; ``QuotaExceeded`` (nothing written) if a quota is full."""
        return await arun(self._add_steps(lease, quotas, outbox), self._client)

    async def get(self, lease_id: str) -> Lease | None:
        """The lease with this id, or None."""
        return await arun(self._get_steps(lease_id), self._client)

    async def revoke(
        self, lease_id: str, *, at: float, reason: str, outbox: Outbox = NO_OUTBOX
    ) -> list[Lease]:
        """Revoke the lease and its active descendants, with their ``on_revoke``
        jobs; those that transitioned."""
        return await arun(self._revoke_steps(lease_id, at, reason, outbox), self._client)

    async def revoke_where(
        self, where: LeaseFilter, *, at: float, reason: str, outbox: Outbox = NO_OUTBOX
    ) -> list[Lease]:
        """Revoke every active lease matching ``where`` and their descendants, with
        their ``on_revoke`` jobs."""
        return await arun(self._revoke_where_steps(where, at, reason, outbox), self._client)

    async def extend(self, lease_id: str, *, expires_at: float, at: float) -> Lease | None:
        """Set a new expiry if the lease is active and unclaimed at ``at``."""
        return await arun(self._extend_steps(lease_id, expires_at, at), self._client)

    async def find(self, where: LeaseFilter) -> list[Lease]:
        """Every stored lease matching ``where`` (live or dead, not yet purged)."""
        return await arun(self._find_steps(where), self._client)

    async def claim_expired(
        self,
        now: float,
        limit: int = 1000,
        expire_hooks: Collection[str] = (),
        *,
        outbox: Outbox = NO_OUTBOX,
    ) -> list[Lease]:
        """Leases expired by ``now`` and not yet claimed, each handed out exactly once
        with its ``on_expire`` jobs: those needing no hook, and those whose
        ``expire_hooks`` is in ``expire_hooks``."""
        steps = self._claim_expired_steps(now, limit, expire_hooks, outbox)
        return await arun(steps, self._client)

    async def awaiting_hooks(self, now: float) -> dict[str, int]:
        """Expired, unclaimed leases that need hooks, per ``expire_hooks`` value."""
        return await arun(self._awaiting_hooks_steps(now), self._client)

    async def count_active(self, now: float) -> int:
        """How many leases are active at ``now`` (see ``RedisStore.count_active``)."""
        return await arun(self._count_active_steps(now), self._client)

    async def retire_key(self, kid: str, at: float) -> bool:
        """Record ``kid`` as retired at ``at``; True if this call recorded it."""
        return await arun(self._retire_key_steps(kid, at), self._client)

    async def retired_keys(self) -> dict[str, float]:
        """Every retired kid and when it was retired."""
        return await arun(self._retired_keys_steps(), self._client)

    async def purge(self, before: float) -> int:
        """Delete and unindex dead leases with ``expires_at < before``; how many."""
        return await arun(self._purge_steps(before), self._client)

    async def record_usage(self, batch: Sequence[UsageRecord]) -> None:
        """Merge the batch into the leases' records (see ``RedisStore.record_usage``)."""
        await arun(self._record_usage_steps(batch), self._client)

    async def lease_usage(self, lease_ids: Collection[str]) -> dict[str, Usage]:
        """The usage of those of ``lease_ids`` that were ever used."""
        return await arun(self._lease_usage_steps(lease_ids), self._client)

    async def close(self) -> None:
        """Close the client if this store created it from a URL. Idempotent."""
        if self._owns_client:
            with _translated("close the connection"):
                await self._client.aclose()

    # -- the outbox (see jitbroker.stores.redis_outbox) ----------------------
    async def claim_jobs(
        self, now: float, kinds: Collection[str], *, claim: str, until: float, limit: int = 100
    ) -> list[Job]:
        """Up to ``limit`` due jobs of ``kinds``, oldest first, now held by ``claim``
        until ``until``."""
        return await arun(self._outbox.claim(now, kinds, claim, until, limit), self._client)

    async def finish_jobs(self, ids: Collection[str], claim: str) -> int:
        """Delete the jobs of ``ids`` that ``claim`` still holds; how many."""
        return await arun(self._outbox.finish(ids, claim), self._client)

    async def fail_job(
        self, job_id: str, claim: str, *, due: float, error: str, park: bool, attempt: bool = True
    ) -> bool:
        """Release a job ``claim`` holds after a failure (due again, or parked)."""
        steps = self._outbox.fail(job_id, claim, due, error, park, attempt)
        return await arun(steps, self._client)

    async def get_job(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        return await arun(self._outbox.get(job_id), self._client)

    async def jobs(self, *, parked: bool | None = None, limit: int = 1000) -> list[Job]:
        """Up to ``limit`` jobs, oldest due first: parked ones, unparked ones, or all."""
        return await arun(self._outbox.listed(parked, limit), self._client)

    async def retry_jobs(self, ids: Collection[str] | None, now: float) -> int:
        """Unpark the parked jobs of ``ids`` (all if None), due at ``now``; how many."""
        return await arun(self._outbox.retry(ids, now), self._client)

    async def forget_jobs(self, ids: Collection[str]) -> list[Job]:
        """Delete the jobs of ``ids`` whatever their state; those deleted."""
        return await arun(self._outbox.forget(ids), self._client)

    # -- beyond the protocol -----------------------------------------------
    async def revoked_since(self, since: float) -> list[str]:
        """Ids of dead leases (revoked, or claimed expired) whose ``expires_at`` is
        at or after ``since``: what a revocation cache must know after a resync."""
        return await arun(self._revoked_since_steps(since), self._client)

    async def clear(self) -> int:
        """Delete every key of this store's prefix; how many (tests, teardown).

        Uses SCAN, so it is not atomic: do not call it while brokers are running.
        """
        return await arun(self._clear_steps(), self._client)
