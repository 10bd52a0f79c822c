"""The outbox part of the ``LeaseStore`` contract, once, for every store.

A lease event (add, revoke, expiry claim) records the jobs ``event_jobs``
names in the same atomic step; ``claim_jobs`` hands each job to one claim at a
time, until its deadline; ``fail_job`` retries or parks it; parked jobs are
listed, retried and forgotten. Stores never read a clock: every time is given.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from jitbroker.errors import QuotaExceeded
from jitbroker.lease import Lease
from jitbroker.stores.base import (
    NO_OUTBOX,
    Job,
    LeaseFilter,
    LeaseStore,
    Outbox,
    Quota,
    event_jobs,
    job_id,
)
from test_store_conformance import REASON, STORES, T0, TTL, StoreFactory, make

HOOKS = Outbox(hooks=("app.notify", "app.audit"), claim="c1", until=T0 + 30, limit=3)


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LeaseStore]:
    factory: StoreFactory = request.param
    store = factory(tmp_path)
    yield store
    clear = getattr(store, "clear", None)
    if clear is not None:  # a shared server: drop this test's keys
        clear()
    store.close()


def by_id(jobs: list[Job]) -> dict[str, Job]:
    return {job.id: job for job in jobs}


def job_ids(jobs: list[Job]) -> list[str]:
    return sorted(job.id for job in jobs)


# -- events record their jobs -------------------------------------------------
def test_add_without_outbox_records_nothing(store: LeaseStore) -> None:
    assert store.add(make("a" * 32)) is True
    assert store.jobs() == []


def test_add_records_its_on_issue_jobs_claimed(store: LeaseStore) -> None:
    lease = make("a" * 32)
    assert store.add(lease, outbox=HOOKS) is True
    want = event_jobs("on_issue", lease, HOOKS, lease.issued_at)
    assert by_id(store.jobs()) == by_id(want)
    job = store.get_job(job_id(lease.id, "on_issue", "app.notify"))
    assert job is not None
    assert (job.claim, job.due, job.limit, job.attempts, job.parked) == ("c1", T0 + 30, 3, 0, False)
    assert job.kind == "on_issue:app.notify"
    assert job.lease == lease


def test_the_job_keeps_every_field_of_the_lease(store: LeaseStore) -> None:
    lease = Lease(
        id="b" * 32,
        subject="svc:ci",
        audience="orders-db",
        scopes=("orders:read", "orders:write"),
        issued_at=T0 + 0.25,
        expires_at=T0 + 60.75,
        max_expires_at=T0 + 3600.5,
        key_id="kid-1",
        task="job-42",
        owner="alice@example.com",
        purpose="nightly: ünïcode ✓",
        renewable=False,
        holder="h" * 43,
        issuer="urn:example:broker",
        task_run="r" * 24,
        expire_hooks="app.a app.b",
        provider="orders-db",
    )
    assert store.add(lease) is True
    assert store.get(lease.id) == lease
    [job] = store.jobs()
    assert job.lease == lease
    assert isinstance(job.lease.scopes, tuple)


def test_a_provider_lease_records_its_create_even_without_outbox(store: LeaseStore) -> None:
    lease = make("c" * 32, audience="orders-db", provider="orders-db")
    assert store.add(lease) is True
    [job] = store.jobs()
    assert (job.id, job.event, job.name) == (f"{lease.id}/create/orders-db", "create", "orders-db")
    assert (job.claim, job.due) == (None, T0)  # due at once, for a broker with the provider


def test_a_provider_job_is_claimed_by_a_caller_that_has_it(store: LeaseStore) -> None:
    lease = make("c" * 32, audience="orders-db", provider="orders-db")
    outbox = attrs.evolve(HOOKS, providers=frozenset({"orders-db"}))
    assert store.add(lease, outbox=outbox) is True
    job = store.get_job(f"{lease.id}/create/orders-db")
    assert job is not None
    assert (job.claim, job.due) == ("c1", T0 + 30)
    assert len(store.jobs()) == 3


def test_a_refused_add_records_no_job(store: LeaseStore) -> None:
    parent = make("p" * 32)
    assert store.add(parent) is True
    store.revoke(parent.id, at=T0 + 1, reason=REASON)
    child = make("q" * 32, at=T0 + 2, parent=parent, provider="db")
    assert store.add(child, outbox=HOOKS) is False
    quota = Quota(subject="svc:a", owner=None, limit=0)
    with pytest.raises(QuotaExceeded):
        store.add(make("r" * 32, provider="db"), [quota], outbox=HOOKS)
    assert store.jobs() == []


def test_revoke_records_jobs_for_every_lease_that_transitioned(store: LeaseStore) -> None:
    root = make("1" * 32, provider="db")
    child = make("2" * 32, at=T0 + 1, parent=root)
    dead = make("3" * 32, at=T0 + 1, parent=root)
    for lease in (root, child, dead):
        assert store.add(lease) is True
    store.revoke(dead.id, at=T0 + 2, reason=REASON)
    assert job_ids(store.jobs()) == [f"{root.id}/create/db"]
    store.forget_jobs([f"{root.id}/create/db"])
    outbox = Outbox(hooks=("app.h",), providers=frozenset({"db"}), claim="c2", until=T0 + 40)
    revoked = store.revoke(root.id, at=T0 + 3, reason=REASON, outbox=outbox)
    assert {lease.id for lease in revoked} == {root.id, child.id}
    want = [j for lease in revoked for j in event_jobs("on_revoke", lease, outbox, T0 + 3)]
    assert by_id(store.jobs()) == by_id(want)
    snapshot = store.get_job(f"{root.id}/revoke/db")
    assert snapshot is not None
    assert (snapshot.lease.revoked_at, snapshot.lease.revoke_reason) == (T0 + 3, REASON)
    assert store.revoke(root.id, at=T0 + 4, reason=REASON, outbox=outbox) == []
    assert len(store.jobs()) == len(want)


def test_revoke_where_records_jobs_and_filters_on_provider(store: LeaseStore) -> None:
    a = make("a" * 32, provider="db")
    b = make("b" * 32, provider="cache")
    c = make("c" * 32)
    for lease in (a, b, c):
        assert store.add(lease) is True
    assert {x.id for x in store.find(LeaseFilter(provider="db"))} == {a.id}
    store.forget_jobs([j.id for j in store.jobs()])
    revoked = store.revoke_where(LeaseFilter(provider="db"), at=T0 + 1, reason=REASON)
    assert [x.id for x in revoked] == [a.id]
    [job] = store.jobs()
    assert (job.id, job.claim, job.due) == (f"{a.id}/revoke/db", None, T0 + 1)


def test_claim_expired_records_on_expire_and_provider_jobs(store: LeaseStore) -> None:
    hooked = make("a" * 32, expire_hooks="app.x app.y")
    backed = make("b" * 32, provider="db")
    plain = make("c" * 32)
    for lease in (hooked, backed, plain):
        assert store.add(lease) is True
    store.forget_jobs([j.id for j in store.jobs()])
    outbox = Outbox(providers=frozenset(), claim="c3", until=T0 + TTL + 30, limit=2)
    claimed = store.claim_expired(T0 + TTL, 10, ("app.x app.y",), outbox=outbox)
    assert {x.id for x in claimed} == {hooked.id, backed.id, plain.id}
    jobs = by_id(store.jobs())
    assert set(jobs) == {
        f"{hooked.id}/on_expire/app.x",
        f"{hooked.id}/on_expire/app.y",
        f"{backed.id}/revoke/db",
    }
    assert jobs[f"{hooked.id}/on_expire/app.x"].claim == "c3"
    assert jobs[f"{backed.id}/revoke/db"].claim is None  # this caller has no such provider
    assert store.claim_expired(T0 + TTL + 1, 10, ("app.x app.y",), outbox=outbox) == []
    assert len(store.jobs()) == 3


# -- held on_issue jobs: what every issue of a broker with a hook writes --------
# (SQLite and Redis keep them inline in the lease's row; the contract is the same.)
NOTIFY, AUDIT = "on_issue:app.notify", "on_issue:app.audit"


def held(store: LeaseStore, lease_id: str = "h" * 32, **fields: Any) -> Lease:
    lease = make(lease_id, **fields)
    assert store.add(lease, outbox=HOOKS) is True
    return lease


def test_held_jobs_finished_by_their_holder_are_gone(store: LeaseStore) -> None:
    leases = [held(store, f"{i:032x}") for i in range(3)]
    ids = [job_id(lease.id, "on_issue", name) for lease in leases for name in HOOKS.hooks]
    assert store.finish_jobs(ids, "not-the-holder") == 0
    assert len(store.jobs()) == 6
    assert store.finish_jobs([*ids, ids[0]], "c1") == 6  # a repeated id counts once
    assert store.jobs() == []
    assert store.finish_jobs(ids, "c1") == 0
    assert all(store.get(lease.id) == lease for lease in leases)  # the leases stay
    assert store.claim_jobs(T0 + 999, (NOTIFY, AUDIT), claim="x", until=T0 + 2000) == []


def test_a_held_job_finished_alone_leaves_its_sibling(store: LeaseStore) -> None:
    lease = held(store)
    notify, audit = (job_id(lease.id, "on_issue", name) for name in HOOKS.hooks)
    assert store.finish_jobs([notify], "c1") == 1
    assert store.get_job(notify) is None
    left = store.get_job(audit)
    assert left is not None
    assert (left.claim, left.due, left.attempts, left.lease) == ("c1", T0 + 30, 0, lease)
    assert [j.id for j in store.jobs()] == [audit]
    assert store.claim_jobs(T0 + 29, (NOTIFY, AUDIT), claim="x", until=T0 + 60) == []
    [taken] = store.claim_jobs(T0 + 30, (NOTIFY, AUDIT), claim="x", until=T0 + 60)
    assert (taken.id, taken.claim, taken.due) == (audit, "x", T0 + 60)
    assert store.finish_jobs([audit], "c1") == 0  # its deadline passed: not c1's any more
    assert store.finish_jobs([audit], "x") == 1
    assert store.jobs() == []


def test_held_jobs_past_their_deadline_go_to_another_claimer(store: LeaseStore) -> None:
    first = held(store, "a" * 32)
    second = held(store, "b" * 32, at=T0 + 5)
    assert store.claim_jobs(T0 + 29, (NOTIFY,), claim="x", until=T0 + 90) == []
    got = store.claim_jobs(T0 + 30, (NOTIFY,), claim="x", until=T0 + 90)
    assert [(j.id, j.claim, j.due) for j in got] == [
        (job_id(first.id, "on_issue", "app.notify"), "x", T0 + 90),
        (job_id(second.id, "on_issue", "app.notify"), "x", T0 + 90),
    ]
    assert got[0].lease == first
    # The audit jobs were not asked for: still held by c1, and c1 can finish them.
    ids = [job_id(lease.id, "on_issue", "app.audit") for lease in (first, second)]
    assert store.finish_jobs(ids, "c1") == 2
    assert store.finish_jobs([j.id for j in got], "c1") == 0
    assert store.finish_jobs([j.id for j in got], "x") == 2
    assert store.jobs() == []


def test_a_held_job_fails_retries_and_parks_like_any_other(store: LeaseStore) -> None:
    lease = held(store)
    notify = job_id(lease.id, "on_issue", "app.notify")
    assert store.fail_job(notify, "x", due=T0 + 1, error="E", park=False) is False
    assert store.fail_job(notify, "c1", due=T0 + 2, error="RuntimeError: no", park=False)
    job = store.get_job(notify)
    assert job is not None
    assert (job.attempts, job.error, job.due, job.claim, job.parked) == (
        1, "RuntimeError: no", T0 + 2, None, False,
    )  # fmt: skip
    assert len(store.claim_jobs(T0 + 2, (NOTIFY,), claim="y", until=T0 + 40)) == 1
    assert store.fail_job(notify, "y", due=T0 + 3, error="E: last", park=True)
    assert [j.id for j in store.jobs(parked=True)] == [notify]
    audit = job_id(lease.id, "on_issue", "app.audit")
    assert [j.id for j in store.jobs(parked=False)] == [audit]  # still held by c1
    assert store.finish_jobs([audit], "c1") == 1
    assert store.retry_jobs([notify], T0 + 10) == 1
    [retried] = store.claim_jobs(T0 + 10, (NOTIFY,), claim="z", until=T0 + 50)
    assert (retried.id, retried.attempts) == (notify, 2)


def test_held_jobs_are_listed_and_forgotten(store: LeaseStore) -> None:
    queued(store, "h")  # an on_revoke job due at T0
    lease = held(store, "h" * 32, at=T0 - 100)  # held until T0 + 30: listed after it
    listed = store.jobs()
    assert [j.event for j in listed] == ["on_revoke", "on_issue", "on_issue"]
    assert [j.due for j in listed] == [T0, T0 + 30, T0 + 30]
    assert len(store.jobs(limit=2)) == 2
    assert store.jobs(parked=True) == []
    notify = job_id(lease.id, "on_issue", "app.notify")
    gone = store.forget_jobs([notify, notify])
    assert [(j.id, j.claim) for j in gone] == [(notify, "c1")]
    assert store.get_job(notify) is None
    assert [j.name for j in store.jobs() if j.event == "on_issue"] == ["app.audit"]
    assert store.finish_jobs([job_id(lease.id, "on_issue", "app.audit")], "c1") == 1


def test_held_jobs_outlive_their_leases_death_and_purge(store: LeaseStore) -> None:
    lease = held(store)
    child = make("k" * 32, at=T0 + 1, parent=lease)
    assert store.add(child, outbox=HOOKS) is True
    revoked = store.revoke(lease.id, at=T0 + 2, reason=REASON)
    assert {x.id for x in revoked} == {lease.id, child.id}
    assert store.purge(T0 + 10 * TTL) >= 2
    assert store.get(lease.id) is None
    jobs = store.jobs()
    assert len(jobs) == 4
    assert {j.lease.id for j in jobs} == {lease.id, child.id}
    assert all(j.claim == "c1" for j in jobs)
    got = store.claim_jobs(T0 + 30, (NOTIFY, AUDIT), claim="x", until=T0 + 99)
    assert len(got) == 4
    assert store.finish_jobs([j.id for j in got], "x") == 4
    assert store.jobs() == []


def test_an_expired_claim_of_a_held_lease_keeps_its_jobs(store: LeaseStore) -> None:
    lease = held(store)
    assert [x.id for x in store.claim_expired(T0 + TTL, 10)] == [lease.id]
    assert store.purge(T0 + 10 * TTL) >= 1
    assert {j.id for j in store.jobs()} == {
        job_id(lease.id, "on_issue", name) for name in HOOKS.hooks
    }
    ids = [job_id(lease.id, "on_issue", name) for name in HOOKS.hooks]
    assert store.finish_jobs(ids, "c1") == 2


# -- claiming, finishing, failing --------------------------------------------
def queued(store: LeaseStore, *names: str, at: float = T0) -> list[Lease]:
    """One lease per name, each revoked at ``at`` with an unclaimed on_revoke
    job named ``name`` (due at ``at``)."""
    leases = []
    for i, name in enumerate(names):
        lease = make(f"{i:032x}")
        assert store.add(lease) is True
        store.revoke(lease.id, at=at, reason=REASON, outbox=Outbox(hooks=(name,)))
        leases.append(lease)
    return leases


def test_claim_jobs_hands_out_due_jobs_of_the_kinds_asked(store: LeaseStore) -> None:
    queued(store, "a", "b", "a")
    assert store.claim_jobs(T0, (), claim="x", until=T0 + 9) == []
    assert store.claim_jobs(T0 - 1, ("on_revoke:a",), claim="x", until=T0 + 9) == []
    got = store.claim_jobs(T0, ("on_revoke:a", "on_expire:zzz"), claim="x", until=T0 + 9)
    assert [j.name for j in got] == ["a", "a"]
    assert all((j.claim, j.due) == ("x", T0 + 9) for j in got)
    assert store.claim_jobs(T0 + 5, ("on_revoke:a",), claim="y", until=T0 + 20) == []
    again = store.claim_jobs(T0 + 9, ("on_revoke:a",), claim="y", until=T0 + 20)
    assert job_ids(again) == job_ids(got)  # the first claim's deadline passed
    assert store.finish_jobs([j.id for j in got], "x") == 0  # that claim was lost
    assert store.finish_jobs([j.id for j in got], "y") == 2
    assert [j.name for j in store.jobs()] == ["b"]


def test_claim_jobs_takes_the_oldest_first_up_to_the_limit(store: LeaseStore) -> None:
    for i, at in enumerate((T0 + 3, T0 + 1, T0 + 2)):
        lease = make(f"{i:032x}")
        assert store.add(lease) is True
        store.revoke(lease.id, at=at, reason=REASON, outbox=Outbox(hooks=("h",)))
    first = store.claim_jobs(T0 + 5, ("on_revoke:h",), claim="x", until=T0 + 60, limit=2)
    assert [j.lease.id for j in first] == [f"{1:032x}", f"{2:032x}"]
    rest = store.claim_jobs(T0 + 5, ("on_revoke:h",), claim="x", until=T0 + 60, limit=2)
    assert [j.lease.id for j in rest] == [f"{0:032x}"]


def test_fail_job_retries_then_parks(store: LeaseStore) -> None:
    [lease] = queued(store, "h")
    jid = job_id(lease.id, "on_revoke", "h")
    [claimed] = store.claim_jobs(T0, ("on_revoke:h",), claim="x", until=T0 + 30)
    assert claimed.id == jid
    assert store.fail_job(jid, "other", due=T0 + 1, error="E", park=False) is False
    assert store.fail_job(jid, "x", due=T0 + 2, error="RuntimeError: no", park=False) is True
    job = store.get_job(jid)
    assert job is not None
    assert (job.attempts, job.error, job.due, job.claim, job.parked) == (
        1,
        "RuntimeError: no",
        T0 + 2,
        None,
        False,
    )
    assert store.claim_jobs(T0 + 1, ("on_revoke:h",), claim="y", until=T0 + 30) == []
    [job] = store.claim_jobs(T0 + 2, ("on_revoke:h",), claim="y", until=T0 + 30)
    assert store.fail_job(jid, "y", due=T0 + 3, error="deferred", park=False, attempt=False)
    [job] = store.claim_jobs(T0 + 3, ("on_revoke:h",), claim="z", until=T0 + 30)
    assert job.attempts == 1  # a deferral is not an attempt
    assert store.fail_job(jid, "z", due=T0 + 4, error="E: last", park=True) is True
    assert store.claim_jobs(T0 + 999, ("on_revoke:h",), claim="w", until=T0 + 1999) == []
    [parked] = store.jobs(parked=True)
    assert (parked.id, parked.attempts, parked.parked, parked.error) == (jid, 2, True, "E: last")
    assert store.jobs(parked=False) == []


def test_retry_and_forget_parked_jobs(store: LeaseStore) -> None:
    leases = queued(store, "h", "h", "h")
    for job in store.claim_jobs(T0, ("on_revoke:h",), claim="x", until=T0 + 30):
        assert store.fail_job(job.id, "x", due=T0 + 1, error="E", park=True)
    parked = store.jobs(parked=True)
    assert len(parked) == 3
    first = job_id(leases[0].id, "on_revoke", "h")
    assert store.retry_jobs([first, "missing"], T0 + 10) == 1
    again = store.get_job(first)
    assert again is not None
    assert (again.parked, again.due, again.limit, again.attempts) == (False, T0 + 10, 1, 1)
    assert store.retry_jobs([first], T0 + 10) == 0  # not parked any more
    assert [
        j.id for j in store.claim_jobs(T0 + 10, ("on_revoke:h",), claim="y", until=T0 + 40)
    ] == [first]
    second = job_id(leases[1].id, "on_revoke", "h")
    gone = store.forget_jobs([second, "missing"])
    assert [j.id for j in gone] == [second]
    assert store.get_job(second) is None
    assert store.retry_jobs(None, T0 + 20) == 1
    assert store.jobs(parked=True) == []


def test_jobs_lists_oldest_due_first_within_the_limit(store: LeaseStore) -> None:
    queued(store, "a", "b", "c")
    listed = store.jobs(limit=2)
    assert len(listed) == 2
    assert [j.due for j in listed] == sorted(j.due for j in listed)
    assert len(store.jobs()) == 3


def test_a_repeated_id_counts_once(store: LeaseStore) -> None:
    leases = queued(store, "h", "h", "h")
    first, second, third = (job_id(lease.id, "on_revoke", "h") for lease in leases)
    held = store.claim_jobs(T0, ("on_revoke:h",), claim="x", until=T0 + 30)
    assert job_ids(held) == sorted([first, second, third])
    assert store.finish_jobs([first, first], "x") == 1
    for job_id_ in (second, third):
        assert store.fail_job(job_id_, "x", due=T0 + 1, error="E", park=True)
    assert store.retry_jobs([second, second], T0 + 10) == 1
    assert [j.id for j in store.forget_jobs([third, third])] == [third]
    assert job_ids(store.jobs()) == [second]


@pytest.mark.parametrize("limit", [0, -1])
def test_a_limit_below_one_lists_and_claims_nothing(store: LeaseStore, limit: int) -> None:
    queued(store, "h", "h")
    assert store.jobs(limit=limit) == []
    assert store.claim_jobs(T0, ("on_revoke:h",), claim="x", until=T0 + 30, limit=limit) == []
    assert len(store.claim_jobs(T0, ("on_revoke:h",), claim="x", until=T0 + 30)) == 2


def test_purge_never_deletes_jobs(store: LeaseStore) -> None:
    queued(store, "h", at=T0 + 1)
    assert store.purge(T0 + 10 * TTL) >= 1
    [job] = store.jobs()
    assert job.lease.revoked_at == T0 + 1


def test_concurrent_claimers_never_share_a_job(store: LeaseStore) -> None:
    queued(store, *["h"] * 40)
    taken: list[list[str]] = [[] for _ in range(4)]

    def claimer(n: int) -> None:
        while True:
            got = store.claim_jobs(T0, ("on_revoke:h",), claim=f"c{n}", until=T0 + 60, limit=3)
            if not got:
                return
            taken[n] += [j.id for j in got]

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [i for ids in taken for i in ids]
    assert len(every) == len(set(every)) == 40


def test_no_outbox_is_the_default() -> None:
    assert Outbox() == NO_OUTBOX
    assert NO_OUTBOX.claim is None
