"""``AsyncBroker``: the same lifecycle as coroutines, its task scope and its reaper.

pytest-asyncio is not a dependency: each test drives its own event loop with
``asyncio.run``. Time comes from a ``FakeClock``; the reaper tests poll with
short real sleeps, bounded at about two seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Coroutine, Sequence
from typing import Any, TypeVar

import pytest

from jitbroker import (
    AsyncBroker,
    AuditEvent,
    Claims,
    Credential,
    InvalidRequest,
    KeyRing,
    Lease,
    LeaseFilter,
    MemoryStore,
)
from jitbroker.errors import (
    LeaseNotActive,
    LeaseNotFound,
    RenewalDenied,
    StoreUnavailable,
    TokenExpired,
    TokenRevoked,
)
from jitbroker.stores.base import Quota
from jitbroker.testing import TEST_ISSUER, FakeClock

SUBJECT = "svc:ci-deploy"
AUDIENCE = "db:orders"
SCOPES = ["orders:read", "orders:write"]
OWNER = "alice@example.com"
LEEWAY = 5
POLL = 0.01
POLL_LIMIT = 2.0

T = TypeVar("T")


class Env:
    """An AsyncBroker on a FakeClock and a MemoryStore, with an audit log."""

    def __init__(self, store: Any = None, **options: Any) -> None:
        self.clock = FakeClock()
        self.store = MemoryStore() if store is None else store
        self.events: list[AuditEvent] = []
        self.broker = AsyncBroker(
            issuer=TEST_ISSUER,
            keys=KeyRing.generate("EdDSA"),
            store=self.store,
            clock=self.clock,
            audit=[self.events.append],
            **options,
        )

    async def issue(self, **kw: Any) -> Credential:
        kw.setdefault("subject", SUBJECT)
        kw.setdefault("audience", AUDIENCE)
        kw.setdefault("scopes", SCOPES)
        kw.setdefault("ttl", 60)
        return await self.broker.issue(**kw)

    async def active(self, cred: Credential) -> bool:
        lease = await self.broker.lease(cred)
        return lease.is_active(self.clock())

    def expired_ids(self) -> list[str]:
        return [e.lease.id for e in self.events if e.action == "expired" and e.lease is not None]


@pytest.fixture
def env() -> Env:
    return Env()


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(main())


async def poll(done: Callable[[], bool]) -> None:
    """Wait (with short real sleeps) until ``done()``, failing after ~2 s."""
    waited = 0.0
    while not done():
        assert waited < POLL_LIMIT, "timed out waiting for the reaper"
        await asyncio.sleep(POLL)
        waited += POLL


def reaper_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "jitbroker-reaper"]


# -- the main paths ---------------------------------------------------------
def test_issue_stores_then_verify(env: Env) -> None:
    async def main() -> None:
        cred = await env.issue(task="job-42", owner=OWNER, purpose="export")
        assert env.store.get(cred.lease_id) == cred.lease
        claims = await env.broker.verify(cred.token, audience=AUDIENCE, scopes=["orders:read"])
        assert isinstance(claims, Claims)
        assert claims.lease_id == cred.lease_id
        assert claims.subject == SUBJECT
        assert claims.scopes == frozenset(SCOPES)
        assert (claims.task, claims.owner, claims.purpose) == ("job-42", OWNER, "export")

    run(main)


def test_renew(env: Env) -> None:
    async def main() -> None:
        start = env.clock()
        cred = await env.issue(ttl=60, max_ttl=100)
        env.clock.advance(30)
        renewed = await env.broker.renew(cred, ttl=60)
        assert renewed.lease_id == cred.lease_id
        assert renewed.expires_at == start + 90
        assert renewed.token != cred.token
        env.clock.advance(30)
        capped = await env.broker.renew(renewed, ttl=60)
        assert capped.expires_at == start + 100
        with pytest.raises(RenewalDenied):
            await env.broker.renew(capped, ttl=60)
        with pytest.raises(LeaseNotFound):
            await env.broker.renew("0" * 32)
        await env.broker.revoke(cred)
        with pytest.raises(LeaseNotActive):
            await env.broker.renew(cred)

    run(main)


def test_revoke_by_credential_id_and_token(env: Env) -> None:
    async def main() -> None:
        creds = [await env.issue() for _ in range(3)]
        refs: list[Credential | str] = [creds[0], creds[1].lease_id, creds[2].token]
        for cred, ref in zip(creds, refs, strict=True):
            assert await env.broker.revoke(ref, reason="done") is True
            assert await env.broker.revoke(ref, reason="again") is False
            with pytest.raises(TokenRevoked) as info:
                await env.broker.verify(cred.token, audience=AUDIENCE)
            assert info.value.reason == "done"

    run(main)


def test_revoke_where(env: Env) -> None:
    async def main() -> None:
        a1 = await env.issue(task="a", owner="alice", subject="svc:one")
        a2 = await env.issue(task="a", owner="bob", subject="svc:two")
        b1 = await env.issue(task="b", owner="alice", subject="svc:two")
        child = await env.broker.attenuate(b1, scopes=["orders:read"])
        assert await env.broker.revoke_where(task="a", owner="alice") == 1
        assert not await env.active(a1)
        assert await env.active(a2)
        assert await env.broker.revoke_where(subject="svc:two", reason="offboarded") == 3
        assert (await env.broker.lease(child)).revoke_reason == "offboarded"
        assert await env.broker.revoke_where(owner="alice") == 0
        with pytest.raises(InvalidRequest):
            await env.broker.revoke_where()

    run(main)


def test_attenuate(env: Env) -> None:
    async def main() -> None:
        parent = await env.issue(audience="db:*", scopes=["orders:*"], ttl=60)
        child = await env.broker.attenuate(
            parent, audience="db:orders", scopes=["orders:read"], ttl=30
        )
        assert child.lease.parent == parent.lease_id
        claims = await env.broker.verify(child.token, audience="db:orders", scopes="orders:read")
        assert claims.parent == parent.lease_id
        grandchild = await env.broker.attenuate(child, ttl=10)
        with pytest.raises(InvalidRequest):
            await env.broker.attenuate(child, scopes=["orders:write"])
        with pytest.raises(InvalidRequest):
            await env.broker.attenuate(child, audience="db:users")
        with pytest.raises(InvalidRequest):
            await env.broker.attenuate(child, ttl=31)
        assert await env.broker.revoke(parent) is True
        for cred, aud in ((child, "db:orders"), (grandchild, "db:orders")):
            with pytest.raises(TokenRevoked):
                await env.broker.verify(cred.token, audience=aud)
        with pytest.raises(LeaseNotActive):
            await env.broker.attenuate(parent)

    run(main)


def test_leases(env: Env) -> None:
    async def main() -> None:
        first = await env.issue(owner=OWNER)
        env.clock.advance(1)
        second = await env.issue(owner=OWNER)
        env.clock.advance(1)
        third = await env.issue(owner=OWNER)
        await env.issue(owner="bob")
        await env.broker.revoke(second)
        active = await env.broker.leases(owner=OWNER)
        assert isinstance(active, list)
        assert [lease.id for lease in active] == [first.lease_id, third.lease_id]
        everything = await env.broker.leases(owner=OWNER, include_inactive=True)
        assert [lease.id for lease in everything] == [
            first.lease_id,
            second.lease_id,
            third.lease_id,
        ]

    run(main)


def test_sweep_exactly_once_then_purge(env: Env) -> None:
    async def main() -> None:
        cred = await env.issue(ttl=30)
        keep = await env.issue(ttl=300)
        env.clock.advance(31)
        assert [lease.id for lease in await env.broker.sweep()] == [cred.lease_id]
        assert await env.broker.sweep() == []
        with pytest.raises(TokenExpired):
            await env.broker.verify(cred.token, audience=AUDIENCE)
        env.clock.advance(LEEWAY)
        await env.broker.sweep()
        assert env.store.get(cred.lease_id) is None
        assert env.store.get(keep.lease_id) is not None
        assert env.expired_ids() == [cred.lease_id]

    run(main)


# -- task scope -------------------------------------------------------------
def test_task_revokes_on_exit(env: Env) -> None:
    async def main() -> None:
        async with env.broker.task("job-1", subject=SUBJECT, audience=AUDIENCE, ttl=60) as cred:
            assert cred.lease.task == "job-1"
            assert await env.broker.verify(cred.token, audience=AUDIENCE)
            child = await env.broker.attenuate(cred)
            other = await env.issue(task="job-2")
        for dead in (cred, child):
            assert (await env.broker.lease(dead)).revoke_reason == "task-ended"
            with pytest.raises(TokenRevoked):
                await env.broker.verify(dead.token, audience=AUDIENCE)
        assert await env.active(other)

    run(main)


def test_task_failure(env: Env) -> None:
    seen: list[Credential] = []

    async def body() -> None:
        async with env.broker.task("job-1", subject=SUBJECT, audience=AUDIENCE, ttl=60) as cred:
            seen.append(cred)
            seen.append(await env.broker.attenuate(cred))
            raise LookupError("boom")

    async def main() -> None:
        with pytest.raises(LookupError, match="boom"):
            await body()
        assert len(seen) == 2
        for cred in seen:
            assert (await env.broker.lease(cred)).revoke_reason == "task-failed"

    run(main)


def test_task_cancelled(env: Env) -> None:
    seen: list[Credential] = []

    async def body() -> None:
        async with env.broker.task("job-1", subject=SUBJECT, audience=AUDIENCE, ttl=60) as cred:
            seen.append(cred)
            await asyncio.Event().wait()  # until cancelled

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(body(), timeout=0.01)
        assert (await env.broker.lease(seen[0])).revoke_reason == "task-failed"

    run(main)


# -- ephemeral --------------------------------------------------------------
def test_ephemeral_async_def(env: Env) -> None:
    seen: list[Credential] = []

    @env.broker.ephemeral(subject="svc:report", audience="api", scopes=["read"], ttl=30)
    async def job(cred: Credential, value: int) -> int:
        """Adds one."""
        assert await env.broker.verify(cred.token, audience="api", scopes=["read"])
        seen.append(cred)
        return value + 1

    async def main() -> None:
        assert await job(1) == 2
        assert await job(2) == 3
        assert job.__name__ == "job"
        assert len({cred.lease.task for cred in seen}) == 1
        assert len({cred.lease.task_run for cred in seen}) == 2
        for cred in seen:
            assert (await env.broker.lease(cred)).revoke_reason == "task-ended"

    run(main)


def test_ephemeral_async_def_failure(env: Env) -> None:
    seen: list[Credential] = []

    @env.broker.ephemeral(subject="svc:report", audience="api", ttl=30)
    async def job(cred: Credential) -> None:
        seen.append(cred)
        raise KeyError("nope")

    async def main() -> None:
        with pytest.raises(KeyError):
            await job()
        assert (await env.broker.lease(seen[0])).revoke_reason == "task-failed"

    run(main)


def test_ephemeral_refuses_a_sync_def(env: Env) -> None:
    def job(cred: Credential) -> None:
        raise AssertionError("never called")

    with pytest.raises(InvalidRequest):
        env.broker.ephemeral(subject="svc:report", audience="api")(job)  # type: ignore[arg-type]


# -- credentials from an AsyncBroker ----------------------------------------
def test_credential_arevoke(env: Env) -> None:
    async def main() -> None:
        cred = await env.issue()
        assert await cred.arevoke() is True
        assert await cred.arevoke() is False
        assert (await env.broker.lease(cred)).revoke_reason == "done"

    run(main)


def test_credential_sync_revoke_is_refused(env: Env) -> None:
    async def main() -> None:
        cred = await env.issue()
        with pytest.raises(InvalidRequest, match="arevoke"):
            cred.revoke()
        assert await env.active(cred)

    run(main)


def test_credential_async_context_manager(env: Env) -> None:
    async def main() -> None:
        async with await env.issue() as cred:
            assert await env.active(cred)
        assert (await env.broker.lease(cred)).revoke_reason == "done"
        failing = await env.issue()
        with pytest.raises(RuntimeError):
            async with failing:
                raise RuntimeError
        assert (await env.broker.lease(failing)).revoke_reason == "failed"

    run(main)


# -- the reaper -------------------------------------------------------------
def test_reaper_expires_without_a_manual_sweep() -> None:
    env = Env(reap_interval=POLL)

    async def main() -> None:
        cred = await env.issue(ttl=30)
        async with env.broker as broker:
            assert broker is env.broker
            assert len(reaper_tasks()) == 1
            env.clock.advance(31)
            await poll(lambda: bool(env.expired_ids()))
            assert env.expired_ids() == [cred.lease_id]
            env.clock.advance(LEEWAY)
            await poll(lambda: env.store.get(cred.lease_id) is None)
        assert reaper_tasks() == []
        # Several more intervals: exactly one expiry event for the lease.
        assert env.expired_ids() == [cred.lease_id]

    run(main)


def test_reaper_start_and_stop_are_idempotent() -> None:
    env = Env(reap_interval=POLL)

    async def main() -> None:
        await env.broker.start()
        await env.broker.start()
        assert len(reaper_tasks()) == 1
        await env.broker.stop()
        await env.broker.stop()
        assert reaper_tasks() == []
        await env.broker.close()

    run(main)


def test_reaper_survives_a_failing_sweep(caplog: pytest.LogCaptureFixture) -> None:
    class Flaky(MemoryStore):
        failures = 0

        def claim_expired(
            self, now: float, limit: int = 1000, expire_hooks: Collection[str] = (), **kw: Any
        ) -> list[Lease]:
            if self.failures:
                self.failures -= 1
                raise StoreUnavailable("backend hiccup")
            return super().claim_expired(now, limit, expire_hooks, **kw)

    store = Flaky()
    env = Env(store=store, reap_interval=POLL)

    async def main() -> None:
        cred = await env.issue(ttl=30)
        store.failures = 2
        env.clock.advance(31)
        async with env.broker:
            await poll(lambda: bool(env.expired_ids()))
        assert env.expired_ids() == [cred.lease_id]

    run(main)
    assert store.failures == 0
    assert "reaper sweep failed" in caplog.text


# -- other store shapes -----------------------------------------------------
class Blocking(MemoryStore):
    """A MemoryStore that claims to block: AsyncBroker must call it in a thread."""

    blocking = True


class AsyncMemoryStore:
    """A native async store wrapping a MemoryStore."""

    def __init__(self) -> None:
        self.sync = MemoryStore()
        self.closed = 0

    async def add(self, lease: Lease, quotas: Sequence[Quota] = ()) -> bool:
        return self.sync.add(lease, quotas)

    async def get(self, lease_id: str) -> Lease | None:
        return self.sync.get(lease_id)

    async def revoke(self, lease_id: str, *, at: float, reason: str) -> list[Lease]:
        return self.sync.revoke(lease_id, at=at, reason=reason)

    async def revoke_where(self, where: LeaseFilter, *, at: float, reason: str) -> list[Lease]:
        return self.sync.revoke_where(where, at=at, reason=reason)

    async def extend(self, lease_id: str, *, expires_at: float, at: float) -> Lease | None:
        return self.sync.extend(lease_id, expires_at=expires_at, at=at)

    async def find(self, where: LeaseFilter) -> list[Lease]:
        return self.sync.find(where)

    async def claim_expired(
        self, now: float, limit: int = 1000, expire_hooks: Collection[str] = ()
    ) -> list[Lease]:
        return self.sync.claim_expired(now, limit, expire_hooks)

    async def purge(self, before: float) -> int:
        return self.sync.purge(before)

    async def close(self) -> None:
        self.closed += 1


@pytest.mark.parametrize("store_type", [Blocking, AsyncMemoryStore])
def test_lifecycle_on_other_store_shapes(store_type: Callable[[], Any]) -> None:
    store = store_type()
    env = Env(store=store)

    async def main() -> None:
        cred = await env.issue(task="t", ttl=60)
        assert await env.broker.verify(cred.token, audience=AUDIENCE)
        env.clock.advance(10)
        renewed = await env.broker.renew(cred, ttl=60)
        child = await env.broker.attenuate(renewed, scopes=["orders:read"])
        assert [lease.id for lease in await env.broker.leases(task="t")] == [
            cred.lease_id,
            child.lease_id,
        ]
        assert await env.broker.revoke(cred) is True
        with pytest.raises(TokenRevoked):
            await env.broker.verify(child.token, audience=AUDIENCE)
        short = await env.issue(ttl=5)
        env.clock.advance(6)
        assert [lease.id for lease in await env.broker.sweep()] == [short.lease_id]
        await env.broker.close()

    run(main)
    if isinstance(store, AsyncMemoryStore):
        assert store.closed == 1


def test_a_cancelled_sweep_still_queues_the_expiry_hooks_of_what_it_claimed() -> None:
    """Once the store claimed an expired lease, nothing will hand it out again:
    cancelling the sweep (stop() under a deadline) must not lose its on_expire."""
    import threading
    import time

    gate = threading.Event()

    class SlowStore(MemoryStore):
        blocking = True  # as the shared stores are: AsyncBroker calls it in a thread

        def claim_expired(
            self, now: float, limit: int = 1000, expire_hooks: Collection[str] = (), **kw: Any
        ) -> list[Lease]:
            if not gate.is_set():
                time.sleep(0.2)  # a slow round trip, under way when stop() gives up
            return super().claim_expired(now, limit, expire_hooks, **kw)

    fired: list[str] = []

    async def main() -> None:
        clock = FakeClock()
        broker = AsyncBroker(
            issuer=TEST_ISSUER,
            store=SlowStore(),
            clock=clock,
            reap_interval=0.01,
            on_expire=lambda lease: fired.append(lease.id),
        )
        creds = [await broker.issue("svc:a", "api", ttl=1) for _ in range(3)]
        clock.advance(2)
        await broker.start()
        await asyncio.sleep(0.05)  # the reaper's sweep is inside claim_expired
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(broker.stop(), 0.01)
        gate.set()
        await asyncio.sleep(0.3)  # the shielded claim finishes, its jobs held by this broker
        await broker.sweep()
        assert fired == []  # held by the cancelled sweep's claim, until hook_timeout
        clock.advance(60)
        await broker.sweep()
        assert sorted(fired) == sorted(cred.lease_id for cred in creds)

    asyncio.run(main())


def test_close_from_a_task_being_cancelled_still_closes_the_store() -> None:
    closed: list[bool] = []

    class Store(MemoryStore):
        def close(self) -> None:
            closed.append(True)

    async def main() -> None:
        broker = AsyncBroker(issuer=TEST_ISSUER, store=Store(), reap_interval=0.01)
        await broker.start()

        async def worker() -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                await broker.close()  # cleanup on shutdown, then re-raise
                raise

        task = asyncio.create_task(worker())
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert closed == [True]


def test_close_waits_for_the_claim_of_a_cancelled_sweep() -> None:
    """close() right after a sweep was cancelled mid-claim: the store must not
    close under the claim, or its leases are dead with no on_expire queued."""
    import time

    class SlowStore(MemoryStore):
        blocking = True
        closed_during_claim = False
        claiming = False

        def claim_expired(
            self, now: float, limit: int = 1000, expire_hooks: Collection[str] = (), **kw: Any
        ) -> list[Lease]:
            self.claiming = True
            time.sleep(0.2)
            try:
                return super().claim_expired(now, limit, expire_hooks, **kw)
            finally:
                self.claiming = False

        def close(self) -> None:
            self.closed_during_claim = self.claiming

    fired: list[str] = []
    store = SlowStore()

    clock = FakeClock()

    def record(lease: Lease) -> None:
        fired.append(lease.id)

    async def main() -> AsyncBroker:
        broker = AsyncBroker(issuer=TEST_ISSUER, store=store, clock=clock, on_expire=record)
        for _ in range(3):
            await broker.issue("svc:a", "api", ttl=1)
        clock.advance(2)
        sweep = asyncio.create_task(broker.sweep())
        await asyncio.sleep(0.05)  # inside claim_expired
        sweep.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweep
        await broker.close()
        return broker

    asyncio.run(main())
    assert store.closed_during_claim is False
    # The claim recorded their on_expire jobs with it (the sweep was cancelled
    # before it ran them): a sweep once the claim has run out runs them.
    assert fired == []
    assert len(store.jobs()) == 3
    clock.advance(60)
    asyncio.run(AsyncBroker(issuer=TEST_ISSUER, store=store, clock=clock, on_expire=record).sweep())
    assert len(fired) == 3
    assert store.jobs() == []
