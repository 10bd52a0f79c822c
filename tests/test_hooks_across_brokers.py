"""``on_expire`` across brokers sharing a store (issue 15, defect 13).

Hooks are per-broker configuration, but what must run when a lease expires is
decided when the lease is created and travels with it (``Lease.expire_hooks``):
a sweep claims only the leases whose hooks its broker runs, so a broker without
hooks (or with other hooks) never takes another's expiries away, and a lease
that needs none runs none, wherever it is swept. Every broker here has its own
store object on one backend, as separate processes would.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from conftest import server_or_skip
from jitbroker import AsyncBroker, Broker, KeyRing, Lease, LeaseStore, MemoryStore
from jitbroker.errors import InvalidRequest
from jitbroker.hooks import MAX_EXPIRE_HOOKS, Hooks, hook_name
from jitbroker.stores.sqlite import SQLiteStore
from jitbroker.testing import FakeClock
from test_store_conformance import POSTGRES_DSN, REDIS_URL

Opener = Callable[[], LeaseStore]
BACKENDS = ["memory", "sqlite", "redis", "postgres"]


@pytest.fixture(params=BACKENDS)
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens another store on the same backend each call (memory: the same one)."""
    kind: str = request.param
    opened: list[LeaseStore] = []
    memory = MemoryStore()
    name = f"jbtest_{uuid4().hex}"

    def opener() -> LeaseStore:
        store: LeaseStore
        if kind == "memory":
            store = memory
        elif kind == "sqlite":
            store = SQLiteStore(tmp_path / "leases.db")
        elif kind == "redis":
            server_or_skip("Redis", "127.0.0.1", 6379)
            from jitbroker.stores.redis import RedisStore

            store = RedisStore(REDIS_URL, prefix=name)
        else:
            server_or_skip("PostgreSQL", "127.0.0.1", 5432)
            from jitbroker.stores.postgres import PostgresStore

            store = PostgresStore(POSTGRES_DSN, schema=name)
        opened.append(store)
        return store

    yield opener
    if opened:
        clear = getattr(opened[0], "clear", None)
        if clear is not None:
            clear()
    for store in opened:
        store.close()


class Recorder:
    """A hook recording the ids it saw; its name is given by the mapping."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, lease: Lease) -> None:
        with self.lock:
            self.ids.append(lease.id)


def broker(clock: FakeClock, store: LeaseStore, **options: Any) -> Broker:
    return Broker(
        issuer="urn:test", keys=KeyRing.generate("HS256"), store=store, clock=clock, **options
    )


def issue_many(b: Broker, n: int, ttl: float = 10) -> set[str]:
    return {b.issue("svc:a", "api", ["read"], ttl).lease_id for _ in range(n)}


# -- the reproduction ------------------------------------------------------------------
def test_a_broker_without_hooks_never_swallows_the_expiries_of_another(open_store: Opener) -> None:
    clock = FakeClock()
    hook = Recorder()
    a = broker(clock, open_store(), on_expire={"drop-role": hook})
    b = broker(clock, open_store())
    mine = issue_many(a, 100)
    clock.advance(11)
    b.issue("svc:b", "api", ["read"], 60)  # its opportunistic sweep runs now
    assert not mine & {lease.id for lease in b.sweep()}
    assert {lease.id for lease in a.sweep()} == mine
    assert sorted(hook.ids) == sorted(mine)  # all 100, where before none ran
    a.sweep()
    assert len(hook.ids) == 100  # exactly once


def test_a_broker_never_claims_what_needs_a_hook_it_lacks(open_store: Opener) -> None:
    clock = FakeClock()
    x, only_x = Recorder(), Recorder()
    both = broker(clock, open_store(), on_expire={"x": x, "y": Recorder()})
    just_x = broker(clock, open_store(), on_expire={"x": only_x})
    needs_x, needs_xy = issue_many(just_x, 3), issue_many(both, 3)
    clock.advance(11)
    assert {lease.id for lease in just_x.sweep()} == needs_x
    assert sorted(only_x.ids) == sorted(needs_x)
    assert (just_x.report().awaiting_hooks or {}) == {"x y": 3}
    assert {lease.id for lease in both.sweep()} == needs_xy
    assert sorted(x.ids) == sorted(needs_xy)


def test_the_lease_decides_which_hooks_run(open_store: Opener) -> None:
    """A lease that needs no hook is claimed by anyone and runs none, even on a
    broker with hooks; one that needs some hooks runs exactly those."""
    clock = FakeClock()
    x, y, only_x = Recorder(), Recorder(), Recorder()
    both = broker(clock, open_store(), on_expire={"x": x, "y": y})
    just_x = broker(clock, open_store(), on_expire={"x": only_x})
    plain = broker(clock, open_store())
    needs_none = issue_many(plain, 3)
    needs_x = issue_many(just_x, 3)
    needs_xy = issue_many(both, 3)
    assert {plain.lease(i).expire_hooks for i in needs_none} == {None}
    assert {just_x.lease(i).expire_hooks for i in needs_x} == {"x"}
    assert {both.lease(i).expire_hooks for i in needs_xy} == {"x y"}
    clock.advance(11)
    # "both" can run any subset of its hooks: it takes everything, and runs for
    # each lease exactly the hooks that lease recorded.
    assert {lease.id for lease in both.sweep()} == needs_none | needs_x | needs_xy
    assert sorted(x.ids) == sorted(needs_x | needs_xy)
    assert sorted(y.ids) == sorted(needs_xy)  # not for leases that only need "x"
    assert only_x.ids == []
    assert just_x.sweep() == []
    assert plain.sweep() == []


def test_expiries_awaiting_a_capable_broker_are_in_the_report(open_store: Opener) -> None:
    clock = FakeClock()
    hook = Recorder()
    a = broker(clock, open_store(), on_expire={"drop-role": hook})
    b = broker(clock, open_store())
    issue_many(a, 4)
    assert b.report().awaiting_hooks == {}
    clock.advance(11)
    b.sweep()
    report = b.report()
    assert report.awaiting_hooks == {"drop-role": 4}
    assert report.to_dict()["awaiting_hooks"] == {"drop-role": 4}
    assert "awaiting a broker with their on_expire hooks: 4\n  drop-role  4" in str(report)
    clock.advance(10_000)
    b.sweep()  # not purged while they wait (invariant 7 holds for the rest)
    assert b.report().awaiting_hooks == {"drop-role": 4}
    a.sweep()
    assert len(hook.ids) == 4
    assert b.report().awaiting_hooks == {}


def test_brokers_with_the_same_hooks_share_the_work_exactly_once(open_store: Opener) -> None:
    clock = FakeClock()
    hooks = [Recorder() for _ in range(4)]
    brokers = [broker(clock, open_store(), on_expire={"drop-role": h}) for h in hooks]
    issued = issue_many(brokers[0], 200)
    clock.advance(11)
    barrier = threading.Barrier(len(brokers))

    def sweep(b: Broker) -> None:
        barrier.wait()
        b.sweep()

    threads = [threading.Thread(target=sweep, args=(b,)) for b in brokers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    ran = [i for h in hooks for i in h.ids]
    assert sorted(ran) == sorted(issued)


def test_an_async_broker_claims_only_what_it_can_finish() -> None:
    import asyncio

    clock = FakeClock()
    store = MemoryStore()
    hook = Recorder()
    sync = broker(clock, store, on_expire={"drop-role": hook})
    needs = issue_many(sync, 3)

    async def main() -> None:
        plain = AsyncBroker(
            issuer="urn:test", keys=KeyRing.generate("HS256"), store=store, clock=clock
        )
        mine = {(await plain.issue("svc:b", "api", ["read"], 10)).lease_id for _ in range(2)}
        clock.advance(11)
        assert {lease.id for lease in await plain.sweep()} == mine
        assert (await plain.report()).awaiting_hooks == {"drop-role": 3}

    asyncio.run(main())
    assert {lease.id for lease in sync.sweep()} == needs
    assert sorted(hook.ids) == sorted(needs)


def test_children_record_the_hooks_of_the_broker_that_made_them() -> None:
    clock, store = FakeClock(), MemoryStore()
    hook = Recorder()
    parent = broker(clock, store).issue("svc:a", "api", ["read"], 60)
    delegate = broker(clock, store, on_expire={"notify": hook})
    child = delegate.attenuate(parent, ttl=10)
    assert parent.lease.expire_hooks is None
    assert child.lease.expire_hooks == "notify"
    assert child.lease.issuer == delegate.issuer
    clock.advance(11)
    assert [lease.id for lease in delegate.sweep()] == [child.lease_id]
    assert hook.ids == [child.lease_id]


# -- hook identity ---------------------------------------------------------------------
def drop_role(lease: Lease) -> None:
    """A module-level hook: its name is module.qualname."""


def test_a_hook_is_named_by_module_and_qualname_or_by_the_mapping() -> None:
    clock, store = FakeClock(), MemoryStore()
    assert hook_name(drop_role) == f"{__name__}.drop_role"
    assert hook_name(Recorder()) == f"{__name__}.Recorder"  # a callable object: its class
    b = broker(clock, store, on_expire=[drop_role, Recorder()])
    lease = b.issue("svc:a", "api", ["read"], 10).lease
    assert lease.expire_hooks == f"{__name__}.Recorder {__name__}.drop_role"  # sorted
    named = broker(clock, store, on_expire={"z-last": drop_role, "a-first": Recorder()})
    assert named.issue("svc:a", "api", ["read"], 10).lease.expire_hooks == "a-first z-last"
    assert broker(clock, store).issue("svc:a", "api").lease.expire_hooks is None


@pytest.mark.parametrize(
    "on_expire",
    [
        {"has space": drop_role},
        {"": drop_role},
        {"x" * 129: drop_role},
        {"tab\there": drop_role},
        [Recorder(), Recorder()],  # two hooks, one identity
        [drop_role, drop_role],
        {f"h{i}": drop_role for i in range(MAX_EXPIRE_HOOKS + 1)},
        {"ok": "not callable"},
    ],
)
def test_on_expire_hooks_need_distinct_usable_names(on_expire: Any) -> None:
    with pytest.raises(InvalidRequest):
        Hooks(on_expire=on_expire)


@pytest.mark.parametrize("event", ["on_issue", "on_revoke"])
def test_every_event_needs_distinct_hook_names(event: str) -> None:
    # A name is the identity of the hook's jobs in the outbox (and their
    # idempotency keys), so two hooks of one event must not share one.
    with pytest.raises(InvalidRequest, match="several hooks named"):
        Hooks(**{event: [Recorder(), Recorder()]})  # type: ignore[arg-type]
    hooks = Hooks(**{event: {"a": Recorder(), "b": Recorder()}})  # type: ignore[arg-type]
    assert hooks.names(event) == ("a", "b")
    assert hooks.expire_profile is None
    assert hooks.expire_profiles == ()


def test_a_broker_names_every_subset_of_its_hooks_to_the_store() -> None:
    hooks = Hooks(on_expire={"b": drop_role, "a": drop_role, "c": drop_role})
    assert hooks.expire_profile == "a b c"
    assert sorted(hooks.expire_profiles) == ["a", "a b", "a b c", "a c", "b", "b c", "c"]


def test_a_store_that_ignores_the_claim_filter_is_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Careless(MemoryStore):
        def claim_expired(
            self, now: float, limit: int = 1000, expire_hooks: Any = (), **kw: Any
        ) -> list[Lease]:
            return super().claim_expired(now, limit, ["someone-else"], **kw)

    clock, store = FakeClock(), Careless()
    broker(clock, store, on_expire={"someone-else": drop_role}).issue("svc:a", "api", ttl=10)
    clock.advance(11)
    with caplog.at_level(logging.ERROR, logger="jitbroker"):
        assert len(broker(clock, store).sweep()) == 1
    assert "their hooks will not run" in caplog.text
