"""The ``LeaseStore`` contract, once, for every store implementation.

A store is done when it passes this suite. To add one, add a factory to
``STORES`` (it gets pytest's ``tmp_path`` for stores that need a file or a
scratch namespace); nothing else changes.

Leases are built directly with explicit times: stores never read a clock, so
``at``/``now``/``before`` are always passed in.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import attrs
import pytest

from conftest import server_or_skip
from jitbroker.lease import Lease
from jitbroker.stores.base import (
    ActiveCount,
    KeyRetirements,
    LeaseFilter,
    LeaseStore,
    UsageRecording,
)
from jitbroker.stores.memory import MemoryStore
from jitbroker.stores.sqlite import SQLiteStore
from jitbroker.usage import MAX_USED_BY, Usage, UsageRecord

StoreFactory = Callable[[Path], LeaseStore]

# The servers CI starts (see .ci/run); tests/test_store_processes.py reuses them.
REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def memory_store(tmp_path: Path) -> LeaseStore:
    return MemoryStore()


def sqlite_store(tmp_path: Path) -> LeaseStore:
    return SQLiteStore(tmp_path / "leases.db")


def redis_store(tmp_path: Path) -> LeaseStore:
    server_or_skip("Redis", "127.0.0.1", 6379)
    from jitbroker.stores.redis import RedisStore

    return RedisStore(REDIS_URL, prefix=f"jbtest-{uuid4().hex}")


def async_redis_store(tmp_path: Path) -> LeaseStore:
    server_or_skip("Redis", "127.0.0.1", 6379)
    from async_adapter import SyncOverAsync
    from jitbroker.stores.redis_async import AsyncRedisStore

    async def build() -> AsyncRedisStore:  # on the facade's loop: connections belong to it
        return AsyncRedisStore(REDIS_URL, prefix=f"jbtest-{uuid4().hex}")

    return SyncOverAsync(build)


def postgres_store(tmp_path: Path) -> LeaseStore:
    server_or_skip("PostgreSQL", "127.0.0.1", 5432)
    from jitbroker.stores.postgres import PostgresStore

    return PostgresStore(POSTGRES_DSN, schema=f"jbtest_{uuid4().hex}")


# One entry per implementation, e.g. pytest.param(sqlite_store, id="sqlite").
STORES = [
    pytest.param(memory_store, id="memory"),
    pytest.param(sqlite_store, id="sqlite"),
    pytest.param(redis_store, id="redis"),
    pytest.param(async_redis_store, id="redis-async"),
    pytest.param(postgres_store, id="postgres"),
]

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
TTL = 60.0
REASON = "test"


def make(
    lease_id: str,
    *,
    at: float = T0,
    ttl: float = TTL,
    parent: Lease | None = None,
    **fields: Any,
) -> Lease:
    """A fresh (unrevoked) lease issued at ``at`` for ``ttl`` seconds."""
    values: dict[str, Any] = {
        "subject": "svc:a",
        "audience": "api",
        "scopes": ("read",),
        "key_id": "k1",
        "max_expires_at": at + 3600,
    }
    if parent is not None:
        values.update(task=parent.task, owner=parent.owner, key_id=parent.key_id)
    values.update(fields)
    return Lease(
        id=lease_id,
        issued_at=at,
        expires_at=at + ttl,
        parent=None if parent is None else parent.id,
        **values,
    )


def ids(leases: list[Lease]) -> set[str]:
    return {lease.id for lease in leases}


def id_list(leases: list[Lease]) -> list[str]:
    return sorted(lease.id for lease in leases)


class TestLeaseStoreConformance:
    """Every ``LeaseStore`` behaves the same; ``store`` is parametrized over them."""

    @pytest.fixture(params=STORES)
    def store(self, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LeaseStore]:
        factory: StoreFactory = request.param
        store = factory(tmp_path)
        yield store
        clear = getattr(store, "clear", None)
        if clear is not None:  # a shared server: drop this test's keys
            clear()
        store.close()

    def add(self, store: LeaseStore, *leases: Lease) -> None:
        for lease in leases:
            assert store.add(lease) is True, lease.id

    def tree(self, store: LeaseStore) -> dict[str, Lease]:
        """root -> (child -> grandchild, child2); plus an unrelated lease."""
        root = make("root", task="job", owner="alice")
        child = make("child", at=T0 + 1, ttl=30, parent=root)
        grandchild = make("grandchild", at=T0 + 2, ttl=20, parent=child)
        child2 = make("child2", at=T0 + 1, ttl=30, parent=root)
        other = make("other", task="job", owner="alice")
        self.add(store, root, child, grandchild, child2, other)
        return {lease.id: lease for lease in (root, child, grandchild, child2, other)}

    # -- the protocol itself ------------------------------------------------
    def test_implements_the_protocol(self, store: LeaseStore) -> None:
        assert isinstance(store, LeaseStore)
        assert isinstance(store.blocking, bool)

    # -- add / get ----------------------------------------------------------
    def test_add_then_get_round_trips_every_field(self, store: LeaseStore) -> None:
        lease = Lease(
            id="a" * 32,
            subject="svc:ci-deploy",
            audience="db:orders",
            scopes=("orders:read", "orders:write"),
            issued_at=T0 + 0.25,
            expires_at=T0 + 60.75,
            max_expires_at=T0 + 3600.5,
            key_id="kid-1",
            task="job-42",
            owner="alice@example.com",
            purpose="nightly export: ünïcode ✓",
            parent=None,
            renewable=False,
            holder="h" * 43,
            issuer="urn:example:broker",
            task_run="r" * 24,
            expire_hooks="app.hooks.drop_role app.hooks.notify",
        )
        assert store.add(lease) is True
        got = store.get(lease.id)
        assert got == lease
        assert got is not None
        assert isinstance(got.scopes, tuple)

    def test_add_minimal_lease(self, store: LeaseStore) -> None:
        lease = Lease("min", "svc:a", "api", (), T0, T0 + 1, T0 + 1)
        self.add(store, lease)
        assert store.get("min") == lease

    def test_get_unknown(self, store: LeaseStore) -> None:
        assert store.get("nope") is None

    def test_add_child_of_active_parent(self, store: LeaseStore) -> None:
        parent = make("parent")
        child = make("child", at=T0 + 59, ttl=1, parent=parent)
        self.add(store, parent, child)
        assert store.get("child") == child
        assert ids(store.find(LeaseFilter(parent="parent"))) == {"child"}

    def test_add_child_of_revoked_parent_stores_nothing(self, store: LeaseStore) -> None:
        parent = make("parent")
        self.add(store, parent)
        store.revoke("parent", at=T0 + 1, reason=REASON)
        child = make("child", at=T0 + 2, ttl=10, parent=parent)
        assert store.add(child) is False
        self.assert_absent(store, child)

    @pytest.mark.parametrize("late", [0, 1], ids=["at-expiry", "after-expiry"])
    def test_add_child_of_expired_parent_stores_nothing(
        self, store: LeaseStore, late: float
    ) -> None:
        parent = make("parent")
        self.add(store, parent)
        child = make("child", at=parent.expires_at + late, ttl=10, parent=parent)
        assert store.add(child) is False
        self.assert_absent(store, child)

    def test_add_child_of_claimed_parent_stores_nothing(self, store: LeaseStore) -> None:
        parent = make("parent")
        self.add(store, parent)
        assert ids(store.claim_expired(parent.expires_at)) == {"parent"}
        child = make("child", at=parent.expires_at, ttl=10, parent=parent)
        assert store.add(child) is False
        self.assert_absent(store, child)

    def test_add_child_of_unknown_parent_stores_nothing(self, store: LeaseStore) -> None:
        child = make("child", parent=make("ghost"))
        assert store.add(child) is False
        self.assert_absent(store, child)

    def assert_absent(self, store: LeaseStore, lease: Lease) -> None:
        assert store.get(lease.id) is None
        assert lease.id not in ids(store.find(LeaseFilter()))
        assert lease.id not in ids(store.claim_expired(lease.expires_at + 3600))

    # -- revoke -------------------------------------------------------------
    def test_revoke_transitions_an_active_lease(self, store: LeaseStore) -> None:
        lease = make("a")
        self.add(store, lease)
        revoked = store.revoke("a", at=T0 + 10, reason="done")
        expected = attrs.evolve(lease, revoked_at=T0 + 10, revoke_reason="done")
        assert revoked == [expected]
        assert store.get("a") == expected

    def test_revoke_takes_the_subtree(self, store: LeaseStore) -> None:
        tree = self.tree(store)
        revoked = store.revoke("root", at=T0 + 5, reason="compromised")
        assert id_list(revoked) == ["child", "child2", "grandchild", "root"]
        for lease in revoked:
            assert lease.revoked_at == T0 + 5
            assert lease.revoke_reason == "compromised"
            assert store.get(lease.id) == lease
        assert store.get("other") == tree["other"]

    def test_revoke_in_the_middle_spares_the_ancestors(self, store: LeaseStore) -> None:
        tree = self.tree(store)
        assert id_list(store.revoke("child", at=T0 + 5, reason=REASON)) == [
            "child",
            "grandchild",
        ]
        for name in ("root", "child2", "other"):
            assert store.get(name) == tree[name]

    def test_revoke_skips_already_dead_descendants(self, store: LeaseStore) -> None:
        self.tree(store)
        store.revoke("child", at=T0 + 5, reason="first")
        assert id_list(store.revoke("root", at=T0 + 6, reason="second")) == ["child2", "root"]
        child = store.get("child")
        grandchild = store.get("grandchild")
        assert child is not None
        assert grandchild is not None
        assert (child.revoked_at, child.revoke_reason) == (T0 + 5, "first")
        assert (grandchild.revoked_at, grandchild.revoke_reason) == (T0 + 5, "first")

    def test_revoke_skips_expired_descendants(self, store: LeaseStore) -> None:
        self.tree(store)  # child expires at T0 + 31, grandchild at T0 + 22
        assert id_list(store.revoke("root", at=T0 + 40, reason=REASON)) == ["root"]
        child = store.get("child")
        assert child is not None
        assert child.revoked_at is None

    def test_revoke_twice(self, store: LeaseStore) -> None:
        self.add(store, make("a"))
        assert ids(store.revoke("a", at=T0 + 1, reason="first")) == {"a"}
        assert store.revoke("a", at=T0 + 2, reason="second") == []
        lease = store.get("a")
        assert lease is not None
        assert (lease.revoked_at, lease.revoke_reason) == (T0 + 1, "first")

    def test_revoke_unknown(self, store: LeaseStore) -> None:
        assert store.revoke("nope", at=T0, reason=REASON) == []

    @pytest.mark.parametrize("late", [0, 1], ids=["at-expiry", "after-expiry"])
    def test_revoke_expired(self, store: LeaseStore, late: float) -> None:
        lease = make("a")
        self.add(store, lease)
        assert store.revoke("a", at=lease.expires_at + late, reason=REASON) == []
        assert store.get("a") == lease

    def test_revoke_claimed(self, store: LeaseStore) -> None:
        lease = make("a")
        self.add(store, lease)
        store.claim_expired(lease.expires_at)
        assert store.revoke("a", at=lease.expires_at, reason=REASON) == []

    # -- revoke_where -------------------------------------------------------
    @pytest.fixture
    def population(self, store: LeaseStore) -> dict[str, Lease]:
        leases = [
            make("a1", task="a", owner="alice", subject="svc:one", key_id="k1"),
            make("a2", task="a", owner="bob", subject="svc:two", key_id="k2"),
            make("b1", task="b", owner="alice", subject="svc:two", key_id="k1"),
            make("n1", owner="carol", subject="svc:one", key_id="k2"),
        ]
        self.add(store, *leases)
        # A child of b1 that matches none of b1's filters but dies with it.
        child = make("b1c", at=T0 + 1, ttl=30, parent=leases[2], owner="dave", task="c")
        self.add(store, child)
        return {lease.id: lease for lease in [*leases, child]}

    @pytest.mark.parametrize(
        ("where", "expected"),
        [
            (LeaseFilter(task="a"), {"a1", "a2"}),
            (LeaseFilter(owner="alice"), {"a1", "b1", "b1c"}),
            (LeaseFilter(subject="svc:two"), {"a2", "b1", "b1c"}),
            (LeaseFilter(key_id="k2"), {"a2", "n1"}),
            (LeaseFilter(parent="b1"), {"b1c"}),
            (LeaseFilter(task="a", owner="alice"), {"a1"}),
            (LeaseFilter(owner="alice", subject="svc:two"), {"b1", "b1c"}),
            (LeaseFilter(subject="svc:one", key_id="k2"), {"n1"}),
            (LeaseFilter(task="c", parent="b1"), {"b1c"}),
            (LeaseFilter(task="b", subject="svc:one"), set()),
            (LeaseFilter(owner="nobody"), set()),
            (LeaseFilter(parent="a1"), set()),
        ],
    )
    def test_revoke_where(
        self,
        store: LeaseStore,
        population: dict[str, Lease],
        where: LeaseFilter,
        expected: set[str],
    ) -> None:
        revoked = store.revoke_where(where, at=T0 + 10, reason="offboarded")
        assert len(revoked) == len(expected)
        assert ids(revoked) == expected
        for lease_id, original in population.items():
            got = store.get(lease_id)
            if lease_id in expected:
                assert got == attrs.evolve(original, revoked_at=T0 + 10, revoke_reason="offboarded")
            else:
                assert got == original

    def test_revoke_where_only_transitions_active_leases(
        self, store: LeaseStore, population: dict[str, Lease]
    ) -> None:
        store.revoke("a1", at=T0 + 1, reason="earlier")
        assert ids(store.revoke_where(LeaseFilter(owner="alice"), at=T0 + 2, reason=REASON)) == {
            "b1",
            "b1c",
        }
        assert store.revoke_where(LeaseFilter(owner="alice"), at=T0 + 3, reason=REASON) == []
        a1 = store.get("a1")
        assert a1 is not None
        assert a1.revoke_reason == "earlier"

    def test_revoke_where_skips_expired_leases(
        self, store: LeaseStore, population: dict[str, Lease]
    ) -> None:
        later = make("late", ttl=600, task="a")
        self.add(store, later)
        assert ids(store.revoke_where(LeaseFilter(task="a"), at=T0 + 60, reason=REASON)) == {"late"}

    # -- extend -------------------------------------------------------------
    def test_extend_an_active_lease(self, store: LeaseStore) -> None:
        lease = make("a")
        self.add(store, lease)
        extended = store.extend("a", expires_at=T0 + 120.5, at=T0 + 30)
        assert extended == attrs.evolve(lease, expires_at=T0 + 120.5)
        assert store.get("a") == extended

    def test_extend_revoked(self, store: LeaseStore) -> None:
        lease = make("a")
        self.add(store, lease)
        store.revoke("a", at=T0 + 1, reason=REASON)
        assert store.extend("a", expires_at=T0 + 120, at=T0 + 2) is None
        got = store.get("a")
        assert got is not None
        assert got.expires_at == lease.expires_at

    @pytest.mark.parametrize("late", [0, 1], ids=["at-expiry", "after-expiry"])
    def test_extend_expired(self, store: LeaseStore, late: float) -> None:
        lease = make("a")
        self.add(store, lease)
        assert store.extend("a", expires_at=T0 + 120, at=lease.expires_at + late) is None
        assert store.get("a") == lease

    def test_extend_claimed(self, store: LeaseStore) -> None:
        lease = make("a")
        self.add(store, lease)
        store.claim_expired(lease.expires_at)
        assert store.extend("a", expires_at=T0 + 120, at=lease.expires_at - 1) is None
        assert store.get("a") == lease

    def test_extend_unknown(self, store: LeaseStore) -> None:
        assert store.extend("nope", expires_at=T0 + 120, at=T0) is None

    # -- find ---------------------------------------------------------------
    def test_find_everything(self, store: LeaseStore, population: dict[str, Lease]) -> None:
        assert ids(store.find(LeaseFilter())) == set(population)

    @pytest.mark.parametrize(
        ("where", "expected"),
        [
            (LeaseFilter(task="a"), {"a1", "a2"}),
            (LeaseFilter(owner="alice"), {"a1", "b1"}),
            (LeaseFilter(subject="svc:one"), {"a1", "n1"}),
            (LeaseFilter(key_id="k1"), {"a1", "b1", "b1c"}),
            (LeaseFilter(parent="b1"), {"b1c"}),
            (LeaseFilter(task="a", subject="svc:two"), {"a2"}),
            (LeaseFilter(owner="alice", key_id="k1", subject="svc:two"), {"b1"}),
            (LeaseFilter(parent="b1", owner="alice"), set()),
            (LeaseFilter(task="zzz"), set()),
        ],
    )
    def test_find(
        self,
        store: LeaseStore,
        population: dict[str, Lease],
        where: LeaseFilter,
        expected: set[str],
    ) -> None:
        found = store.find(where)
        assert len(found) == len(expected)
        assert ids(found) == expected
        for lease in found:
            assert lease == population[lease.id]

    def test_find_includes_dead_leases_until_purged(
        self, store: LeaseStore, population: dict[str, Lease]
    ) -> None:
        store.revoke("a1", at=T0 + 1, reason=REASON)
        store.claim_expired(T0 + TTL)  # everything issued at T0 expires now
        found = {lease.id: lease for lease in store.find(LeaseFilter(task="a"))}
        assert set(found) == {"a1", "a2"}
        assert found["a1"].revoked_at == T0 + 1
        store.purge(T0 + TTL + 1)
        assert store.find(LeaseFilter(task="a")) == []
        assert store.find(LeaseFilter(owner="alice")) == []

    def test_find_sees_the_current_version(self, store: LeaseStore) -> None:
        self.add(store, make("a", task="t"))
        store.extend("a", expires_at=T0 + 100, at=T0)
        store.revoke("a", at=T0 + 1, reason=REASON)
        (found,) = store.find(LeaseFilter(task="t"))
        assert (found.expires_at, found.revoked_at) == (T0 + 100, T0 + 1)

    # -- claim_expired ------------------------------------------------------
    def test_claim_expired_hands_each_lease_once(self, store: LeaseStore) -> None:
        self.add(store, make("a", ttl=10), make("b", ttl=20), make("c", ttl=30))
        assert store.claim_expired(T0 + 9) == []
        assert ids(store.claim_expired(T0 + 10)) == {"a"}  # due at exactly expires_at
        assert store.claim_expired(T0 + 10) == []
        assert ids(store.claim_expired(T0 + 25)) == {"b"}
        assert ids(store.claim_expired(T0 + 100)) == {"c"}
        assert store.claim_expired(T0 + 1000) == []

    def test_claim_expired_returns_the_leases(self, store: LeaseStore) -> None:
        lease = make("a", task="t", owner="o")
        self.add(store, lease)
        assert store.claim_expired(T0 + TTL) == [lease]
        assert store.get("a") == lease  # claiming does not rewrite the lease

    def test_claim_expired_respects_limit(self, store: LeaseStore) -> None:
        leases = [make(f"l{i}", ttl=10 + i) for i in range(5)]
        self.add(store, *leases)
        batches = [store.claim_expired(T0 + 100, limit=2) for _ in range(4)]
        assert [len(batch) for batch in batches] == [2, 2, 1, 0]
        claimed = [lease.id for batch in batches for lease in batch]
        assert sorted(claimed) == sorted(lease.id for lease in leases)

    def test_claim_expired_skips_revoked(self, store: LeaseStore) -> None:
        self.add(store, make("a"), make("b"))
        store.revoke("a", at=T0 + 1, reason=REASON)
        assert ids(store.claim_expired(T0 + 100)) == {"b"}
        assert store.claim_expired(T0 + 1000) == []

    def test_claim_expired_skips_renewed_later(self, store: LeaseStore) -> None:
        self.add(store, make("a", ttl=10))
        renewed = store.extend("a", expires_at=T0 + 50, at=T0 + 5)
        assert store.claim_expired(T0 + 10) == []
        assert store.claim_expired(T0 + 49) == []
        assert store.claim_expired(T0 + 50) == [renewed]
        assert store.claim_expired(T0 + 1000) == []

    def test_claim_expired_after_several_renewals(self, store: LeaseStore) -> None:
        self.add(store, make("a", ttl=10))
        for step in range(1, 6):
            store.extend("a", expires_at=T0 + 10 + step, at=T0 + step)
        final = store.extend("a", expires_at=T0 + 15, at=T0 + 6)  # the same expiry again
        batches = [store.claim_expired(T0 + t) for t in range(10, 40)]
        assert batches[5] == [final]  # at T0 + 15, not before
        assert sum(len(batch) for batch in batches) == 1

    def test_claim_expired_then_revoke_and_extend_are_refused(self, store: LeaseStore) -> None:
        self.add(store, make("a"))
        store.claim_expired(T0 + TTL)
        assert store.revoke("a", at=T0 + TTL - 1, reason=REASON) == []
        assert store.extend("a", expires_at=T0 + 600, at=T0 + TTL - 1) is None

    def test_claim_expired_is_exactly_once_across_threads(self, store: LeaseStore) -> None:
        count = 300
        self.add(store, *(make(f"l{i:03}", ttl=1 + i % 7) for i in range(count)))
        results: list[list[Lease]] = [[] for _ in range(8)]
        barrier = threading.Barrier(8)

        def claim(i: int) -> None:
            barrier.wait()
            while batch := store.claim_expired(T0 + 100, limit=7):
                results[i].extend(batch)

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        claimed = [lease.id for result in results for lease in result]
        assert len(claimed) == count
        assert set(claimed) == {f"l{i:03}" for i in range(count)}

    def test_revoke_is_exactly_once_across_threads(self, store: LeaseStore) -> None:
        self.tree(store)
        results: list[list[Lease]] = [[] for _ in range(8)]
        barrier = threading.Barrier(8)

        def revoke(i: int) -> None:
            barrier.wait()
            results[i] = store.revoke("root", at=T0 + 1, reason=f"r{i}")

        threads = [threading.Thread(target=revoke, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        winners = [result for result in results if result]
        assert len(winners) == 1
        assert id_list(winners[0]) == ["child", "child2", "grandchild", "root"]

    # -- purge --------------------------------------------------------------
    def test_purge_removes_only_old_dead_leases(self, store: LeaseStore) -> None:
        self.add(
            store,
            make("revoked-old", ttl=10),
            make("revoked-new", ttl=100),
            make("claimed-old", ttl=10),
            make("claimed-edge", ttl=20),
            make("active", ttl=1000),
        )
        store.revoke("revoked-old", at=T0 + 1, reason=REASON)
        store.revoke("revoked-new", at=T0 + 1, reason=REASON)
        assert ids(store.claim_expired(T0 + 20)) == {"claimed-old", "claimed-edge"}
        self.add(store, make("unclaimed", at=T0 + 10, ttl=5))  # expired, never claimed
        # Cut-off T0 + 20: dead leases with expires_at < T0 + 20 go.
        assert store.purge(T0 + 20) == 2
        for gone in ("revoked-old", "claimed-old"):
            assert store.get(gone) is None
        for kept in ("revoked-new", "claimed-edge", "active", "unclaimed"):
            assert store.get(kept) is not None, kept
        assert store.purge(T0 + 20) == 0
        assert store.purge(T0 + 20.5) == 1
        assert store.get("claimed-edge") is None

    def test_a_purge_right_after_a_claim_sees_what_died_since(self, store: LeaseStore) -> None:
        # A claim may tell the purge right after it (a sweep's) that nothing is
        # old enough to go, sparing it a round trip; what the claim itself took
        # and any write through the store in between must still be purged.
        self.add(store, make("a", ttl=10))
        assert store.claim_expired(T0 + 5) == []  # nothing dead yet
        store.revoke("a", at=T0 + 1, reason=REASON)
        assert store.purge(T0 + 11) == 1
        self.add(store, make("c", ttl=10))
        assert store.claim_expired(T0 + 5) == []
        assert store.purge(T0 + 11) == 0  # c is alive
        assert ids(store.claim_expired(T0 + 11)) == {"c"}
        assert store.purge(T0 + 10) == 0  # c expired at T0 + 10: not before it
        assert store.claim_expired(T0 + 11) == []
        assert store.purge(T0 + 11) == 1
        assert store.find(LeaseFilter()) == []

    def test_purge_never_removes_live_or_unclaimed_leases(self, store: LeaseStore) -> None:
        active = make("active", ttl=1000)
        expired = make("expired", ttl=10)
        self.add(store, active, expired)
        assert store.purge(T0 + 500) == 0
        assert store.get("active") == active
        assert store.get("expired") == expired
        # Once claimed, the expired one is dead and goes.
        assert ids(store.claim_expired(T0 + 500)) == {"expired"}
        assert store.purge(T0 + 500) == 1
        assert store.get("expired") is None

    def test_purge_a_whole_revoked_tree(self, store: LeaseStore) -> None:
        self.tree(store)
        store.revoke("root", at=T0 + 5, reason=REASON)
        assert store.purge(T0 + TTL) == 3  # child, child2, grandchild expire earlier
        assert store.purge(T0 + TTL + 1) == 1
        assert ids(store.find(LeaseFilter())) == {"other"}
        assert store.find(LeaseFilter(parent="root")) == []

    def test_purged_lease_is_never_claimed(self, store: LeaseStore) -> None:
        self.add(store, make("a", ttl=10))
        store.revoke("a", at=T0 + 1, reason=REASON)
        assert store.purge(T0 + 11) == 1
        assert store.claim_expired(T0 + 1000) == []
        assert store.revoke("a", at=T0 + 2, reason=REASON) == []
        assert store.extend("a", expires_at=T0 + 20, at=T0 + 2) is None

    def test_purge_of_a_renewed_lease_uses_its_current_expiry(self, store: LeaseStore) -> None:
        self.add(store, make("a", ttl=10))
        store.extend("a", expires_at=T0 + 100, at=T0 + 5)
        store.revoke("a", at=T0 + 6, reason=REASON)
        assert store.purge(T0 + 50) == 0
        assert store.get("a") is not None
        assert store.purge(T0 + 101) == 1

    # -- leases that need on_expire hooks ----------------------------------
    def hooked(self, store: LeaseStore) -> dict[str, Lease]:
        """Expired by T0 + 60: one lease per expire_hooks value, two for "a"."""
        leases = [
            make("none"),
            make("a1", expire_hooks="a"),
            make("a2", ttl=30, expire_hooks="a"),
            make("ab", expire_hooks="a b"),
            make("b", expire_hooks="b"),
        ]
        self.add(store, *leases)
        return {lease.id: lease for lease in leases}

    def test_claim_expired_takes_only_the_hooks_it_is_given(self, store: LeaseStore) -> None:
        leases = self.hooked(store)
        # Named no hooks: only what needs none (the protocol's safe default).
        assert store.claim_expired(T0 + TTL) == [leases["none"]]
        assert store.claim_expired(T0 + TTL, expire_hooks=["c", "a b c"]) == []
        assert ids(store.claim_expired(T0 + TTL, expire_hooks=["a"])) == {"a1", "a2"}
        claimed = store.claim_expired(T0 + TTL, expire_hooks=["a", "b", "a b"])
        assert sorted(claimed, key=lambda lease: lease.id) == [leases["ab"], leases["b"]]
        assert store.claim_expired(T0 + 1000, expire_hooks=["a", "b", "a b"]) == []

    def test_claim_expired_limit_spans_the_hooks(self, store: LeaseStore) -> None:
        self.hooked(store)
        every = ["a", "b", "a b"]
        batches = [store.claim_expired(T0 + TTL, 2, every) for _ in range(4)]
        assert [len(batch) for batch in batches] == [2, 2, 1, 0]
        assert {lease.id for batch in batches for lease in batch} == {
            "none",
            "a1",
            "a2",
            "ab",
            "b",
        }

    def test_leases_awaiting_hooks_stay_unclaimed_and_counted(self, store: LeaseStore) -> None:
        self.hooked(store)
        counter = getattr(store, "awaiting_hooks", None)
        assert counter is not None, "every bundled store counts them (for the report)"
        assert counter(T0 + 29) == {}
        assert counter(T0 + 30) == {"a": 1}
        assert counter(T0 + TTL) == {"a": 2, "a b": 1, "b": 1}
        store.claim_expired(T0 + TTL)  # needs none: the others stay
        store.revoke("b", at=T0 + 1, reason=REASON)
        assert counter(T0 + TTL) == {"a": 2, "a b": 1}
        store.claim_expired(T0 + TTL, expire_hooks=["a"])
        assert counter(T0 + TTL) == {"a b": 1}
        assert store.purge(T0 + 10_000) == 4  # the awaiting one is never purged
        assert store.get("ab") is not None
        assert counter(T0 + 10_000) == {"a b": 1}

    def test_a_lease_needing_hooks_lives_dies_and_renews_like_any(self, store: LeaseStore) -> None:
        parent = make("p", expire_hooks="a")
        self.add(store, parent)
        child = make("c", at=T0 + 1, ttl=10, parent=parent, expire_hooks="a")
        self.add(store, child)  # its parent is active
        renewed = store.extend("p", expires_at=T0 + 120, at=T0 + 2)
        assert renewed == attrs.evolve(parent, expires_at=T0 + 120)
        assert store.claim_expired(T0 + TTL, expire_hooks=["a"]) == [child]
        assert store.claim_expired(T0 + TTL, expire_hooks=["a"]) == []
        assert store.revoke("c", at=T0 + 5, reason=REASON) == []  # claimed: dead
        assert ids(store.revoke("p", at=T0 + 61, reason=REASON)) == {"p"}
        assert store.claim_expired(T0 + 1000, expire_hooks=["a"]) == []
        assert store.purge(T0 + 121) == 2
        assert store.find(LeaseFilter()) == []

    def test_claim_of_leases_needing_hooks_is_exactly_once_across_threads(
        self, store: LeaseStore
    ) -> None:
        count, profiles = 120, ["a", "a b", "b"]
        self.add(
            store,
            *(make(f"l{i:03}", ttl=1 + i % 5, expire_hooks=profiles[i % 3]) for i in range(count)),
        )
        results: list[list[Lease]] = [[] for _ in range(6)]
        barrier = threading.Barrier(6)

        def claim(i: int) -> None:
            barrier.wait()
            while batch := store.claim_expired(T0 + 100, 5, profiles):
                results[i].extend(batch)

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        claimed = [lease.id for result in results for lease in result]
        assert sorted(claimed) == [f"l{i:03}" for i in range(count)]

    # -- issuer and task run ------------------------------------------------
    def test_find_and_revoke_by_issuer_and_task_run(self, store: LeaseStore) -> None:
        leases = [
            make("x1", task="deploy", issuer="urn:x", task_run="run-1"),
            make("x2", task="deploy", issuer="urn:x", task_run="run-2"),
            make("y1", task="deploy", issuer="urn:y", task_run="run-3"),
            make("y2", issuer="urn:y"),
            make("old"),  # stored before issuers were recorded
        ]
        self.add(store, *leases)
        child = make("x1c", at=T0 + 1, ttl=30, parent=leases[0], issuer="urn:z")
        self.add(store, child)
        assert ids(store.find(LeaseFilter(issuer="urn:x"))) == {"x1", "x2"}
        assert ids(store.find(LeaseFilter(issuer="urn:y", task="deploy"))) == {"y1"}
        assert ids(store.find(LeaseFilter(task_run="run-2"))) == {"x2"}
        assert ids(store.find(LeaseFilter(task="deploy", task_run="run-3"))) == {"y1"}
        assert store.find(LeaseFilter(task_run="run-3", issuer="urn:x")) == []
        revoked = store.revoke_where(LeaseFilter(task_run="run-1"), at=T0 + 2, reason=REASON)
        assert ids(revoked) == {"x1", "x1c"}  # the run's lease and its subtree
        assert ids(store.revoke_where(LeaseFilter(issuer="urn:y"), at=T0 + 3, reason=REASON)) == {
            "y1",
            "y2",
        }
        active = {lease.id for lease in store.find(LeaseFilter()) if lease.is_active(T0 + 4)}
        assert active == {"x2", "old"}
        store.claim_expired(T0 + TTL)
        store.purge(T0 + 1000)
        assert store.find(LeaseFilter(issuer="urn:x")) == []
        assert store.find(LeaseFilter(task_run="run-2")) == []

    # -- retired keys (KeyRetirements, invariant 11) ---------------------------
    def test_retired_keys_are_recorded_once_and_read_back(self, store: LeaseStore) -> None:
        assert isinstance(store, KeyRetirements)
        assert store.retired_keys() == {}
        assert store.retire_key("kid-1", T0) is True
        assert store.retire_key("kid-1", T0 + 5) is False  # the first time stays
        assert store.retire_key("kid-2", T0 + 1) is True
        assert store.retired_keys() == {"kid-1": T0, "kid-2": T0 + 1}

    def test_retired_keys_outlive_purge_and_do_not_touch_leases(self, store: LeaseStore) -> None:
        assert isinstance(store, KeyRetirements)
        self.add(store, make("a", key_id="kid-1"))
        store.retire_key("kid-1", T0)
        lease = store.get("a")
        assert lease is not None
        assert lease.is_active(T0)
        store.revoke("a", at=T0 + 1, reason=REASON)
        store.purge(T0 + 10_000)
        assert store.retired_keys() == {"kid-1": T0}

    # -- count_active (health's lease count, ActiveCount) ----------------------
    def test_count_active_counts_only_active_leases(self, store: LeaseStore) -> None:
        assert isinstance(store, ActiveCount), "every bundled store counts (for health)"
        assert store.count_active(T0) == 0
        self.tree(store)  # root, child, grandchild, child2, other
        self.add(store, make("hooked", expire_hooks="a"), make("short", ttl=5))
        assert store.count_active(T0 + 3) == 7
        assert ids(store.revoke("child", at=T0 + 3, reason=REASON)) == {"child", "grandchild"}
        assert store.count_active(T0 + 3) == 5  # revoked: not active
        assert store.count_active(T0 + 5) == 4  # expired (now == expires_at), unclaimed
        assert ids(store.claim_expired(T0 + 10)) == {"short"}
        assert store.count_active(T0 + 10) == 4
        assert store.extend("root", expires_at=T0 + 120, at=T0 + 10) is not None
        assert store.count_active(T0 + 31) == 3  # child2 expired; root renewed
        assert store.count_active(T0 + TTL) == 1  # other and hooked (awaiting hooks) expired
        claimed = store.claim_expired(T0 + 100, expire_hooks=["a"])
        assert ids(claimed) == {"child2", "other", "hooked"}
        store.purge(T0 + 100)
        assert store.count_active(T0 + 100) == 1  # root, until its renewed expiry
        assert store.count_active(T0 + 120) == 0

    def test_count_active_is_a_point_in_time(self, store: LeaseStore) -> None:
        assert isinstance(store, ActiveCount)
        self.add(store, *(make(f"l{i}", ttl=10 * (i + 1)) for i in range(5)))
        assert [store.count_active(T0 + t) for t in (0, 10, 25, 49, 50)] == [5, 4, 3, 1, 0]

    # -- lease usage (UsageRecording, jitbroker.usage) -------------------------
    def usage_store(self, store: LeaseStore) -> UsageRecording:
        assert isinstance(store, UsageRecording), "every bundled store records usage"
        return store

    def test_record_usage_merges(self, store: LeaseStore) -> None:
        usage = self.usage_store(store)
        self.add(store, make("a"), make("b"), make("never"))
        assert usage.lease_usage(["a", "b", "never"]) == {}
        usage.record_usage([UsageRecord("a", T0 + 5, 3, ("api",))])
        usage.record_usage(
            [UsageRecord("a", T0 + 2, 2, ("api", "other")), UsageRecord("b", T0 + 1, 1, ("api",))]
        )
        assert usage.lease_usage(["a", "b", "never", "missing"]) == {
            "a": Usage(T0 + 5, 5, ("api", "other")),  # latest time kept, counts summed
            "b": Usage(T0 + 1, 1, ("api",)),
        }
        usage.record_usage([])  # nothing to write: no error

    def test_record_usage_ignores_unknown_and_purged_leases(self, store: LeaseStore) -> None:
        usage = self.usage_store(store)
        self.add(store, make("a", ttl=5))
        usage.record_usage(
            [UsageRecord("ghost", T0, 1, ("api",)), UsageRecord("a", T0, 1, ("api",))]
        )
        assert usage.lease_usage(["ghost"]) == {}
        assert store.get("ghost") is None  # never created by a usage write
        assert ids(store.claim_expired(T0 + 10)) == {"a"}
        store.purge(T0 + 100)
        usage.record_usage([UsageRecord("a", T0 + 101, 1, ("api",))])
        assert usage.lease_usage(["a"]) == {}
        assert store.get("a") is None

    def test_record_usage_keeps_lease_state(self, store: LeaseStore) -> None:
        usage = self.usage_store(store)
        self.add(store, make("a"))
        usage.record_usage([UsageRecord("a", T0 + 1, 1, ("api",))])
        assert store.extend("a", expires_at=T0 + 120, at=T0 + 2) is not None
        lease = store.get("a")
        assert lease is not None
        assert lease.expires_at == T0 + 120
        assert lease.revoked_at is None
        store.revoke("a", at=T0 + 3, reason=REASON)
        assert usage.lease_usage(["a"]) == {"a": Usage(T0 + 1, 1, ("api",))}

    def test_used_by_is_bounded(self, store: LeaseStore) -> None:
        usage = self.usage_store(store)
        self.add(store, make("a"))
        many = tuple(f"aud-{i}" for i in range(MAX_USED_BY + 3))
        usage.record_usage([UsageRecord("a", T0, 1, many[:2])])
        usage.record_usage([UsageRecord("a", T0, 1, many)])
        got = usage.lease_usage(["a"])["a"]
        assert got.use_count == 2
        assert got.used_by == many[:MAX_USED_BY]  # first seen kept

    # -- close --------------------------------------------------------------
    def test_close_is_idempotent(self, store: LeaseStore) -> None:
        store.close()
        store.close()
