"""Quotas (``max_active``, ``max_active_per_owner``) on every store.

Each store counts and inserts in one atomic step, so a full quota refuses the
lease with ``QuotaExceeded`` and stores nothing, a revoked or expired lease
frees its slot, and racing issuers never overshoot: threads (one ``Broker`` per
thread on one shared store) and OS processes (this file doubles as the worker:
``python tests/test_governance_quotas.py KIND WHERE NAMESPACE``, rebuilding the
store as tests/store_worker.py does).

Time comes from a ``FakeClock``; processes start together on a pipe, never a sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jitbroker import Broker, KeyRing, LeaseFilter, LeaseStore, Policy, PolicyDenied, Rule
from jitbroker.audit import AuditEvent
from jitbroker.errors import QuotaExceeded
from jitbroker.stores.base import Quota
from jitbroker.testing import TEST_ISSUER, FakeClock
from test_concurrency import run_threads
from test_store_conformance import POSTGRES_DSN, REDIS_URL, STORES, StoreFactory

SUBJECT = "svc:ci-deploy"
AUDIENCE = "db:orders"
SCOPES = ["orders:read", "orders:write"]
ALICE = "alice@example.com"
BOB = "bob@example.com"
LIMIT = 3
THREADS = 8
TESTS = Path(__file__).resolve().parent
TIMEOUT = 60  # seconds: a safety net for a hung worker process


def quota_rules(max_active: int | None = LIMIT, per_owner: int | None = None) -> list[Rule]:
    return [
        Rule(
            subjects="svc:*",
            audiences=AUDIENCE,
            scopes=SCOPES,
            name="ci",
            max_active=max_active,
            max_active_per_owner=per_owner,
        )
    ]


def make_broker(store: LeaseStore, clock: FakeClock, rules: list[Rule], **options: Any) -> Broker:
    return Broker(
        issuer=TEST_ISSUER,
        keys=KeyRing.generate("EdDSA"),
        store=store,
        policy=Policy(rules),
        clock=clock,
        **options,
    )


def issue(broker: Broker, **changes: Any) -> Any:
    request: dict[str, Any] = {
        "subject": SUBJECT,
        "audience": AUDIENCE,
        "scopes": ["orders:read"],
        "ttl": 600,
        "owner": ALICE,
    }
    return broker.issue(**{**request, **changes})


def active(store: LeaseStore, clock: FakeClock, **where: str) -> int:
    return sum(1 for lease in store.find(LeaseFilter(**where)) if lease.is_active(clock()))


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LeaseStore]:
    factory: StoreFactory = request.param
    built = factory(tmp_path)
    yield built
    clear = getattr(built, "clear", None)
    if clear is not None:  # a shared server: drop this test's keys or schema
        clear()
    built.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- the quota itself -----------------------------------------------------------
def test_a_full_quota_refuses_and_stores_nothing(store: LeaseStore, clock: FakeClock) -> None:
    events: list[AuditEvent] = []
    broker = make_broker(store, clock, quota_rules(), audit=[events.append])
    issued = [issue(broker) for _ in range(LIMIT)]
    with pytest.raises(QuotaExceeded) as info:
        issue(broker, task="one-too-many")
    error = info.value
    assert isinstance(error, PolicyDenied)
    assert error.quota == Quota(SUBJECT, None, LIMIT, "ci")
    assert error.reasons == (
        f"ci allows at most {LIMIT} active leases for subject {SUBJECT!r}; "
        "revoke one or wait for one to expire",
    )
    stored = store.find(LeaseFilter(subject=SUBJECT))
    assert sorted(lease.id for lease in stored) == sorted(cred.lease_id for cred in issued)
    assert store.find(LeaseFilter(task="one-too-many")) == []
    assert [str(e.action) for e in events] == ["issued"] * LIMIT + ["denied"]
    assert events[-1].reasons == error.reasons
    # Other subjects have their own count.
    issue(broker, subject="svc:other")


def test_a_revoked_lease_frees_a_slot(store: LeaseStore, clock: FakeClock) -> None:
    broker = make_broker(store, clock, quota_rules())
    first, *_ = [issue(broker) for _ in range(LIMIT)]
    with pytest.raises(QuotaExceeded):
        issue(broker)
    assert broker.revoke(first) is True
    issue(broker)
    with pytest.raises(QuotaExceeded):
        issue(broker)
    assert active(store, clock, subject=SUBJECT) == LIMIT


def test_a_revoke_where_frees_every_slot_it_took(store: LeaseStore, clock: FakeClock) -> None:
    broker = make_broker(store, clock, quota_rules())
    for _ in range(LIMIT):
        issue(broker, task="job-1")
    assert broker.revoke_where(task="job-1") == LIMIT
    for _ in range(LIMIT):
        issue(broker)


@pytest.mark.parametrize("swept", [False, True], ids=["unswept", "swept"])
def test_an_expired_lease_frees_a_slot(store: LeaseStore, clock: FakeClock, swept: bool) -> None:
    broker = make_broker(store, clock, quota_rules(), reap_interval=10_000)
    short = issue(broker, ttl=30)
    for _ in range(LIMIT - 1):
        issue(broker)
    with pytest.raises(QuotaExceeded):
        issue(broker)
    clock.advance(29.5)
    with pytest.raises(QuotaExceeded):  # not yet: it expires at 30 s
        issue(broker)
    clock.advance(0.5)
    if swept:
        assert [lease.id for lease in broker.sweep()] == [short.lease_id]
    issue(broker)
    with pytest.raises(QuotaExceeded):
        issue(broker)


def test_a_clock_stepped_back_counts_what_is_active_then(
    store: LeaseStore, clock: FakeClock
) -> None:
    """The count is of leases active at the issuer's time, also when that time
    goes backwards (NTP, freezegun): an unswept expired lease is active again."""
    broker = make_broker(store, clock, quota_rules(max_active=1), reap_interval=10_000)
    issue(broker, ttl=10)
    clock.advance(11)
    second = issue(broker, ttl=600)  # the first one expired: its slot is free
    broker.revoke(second)
    clock.set(clock() - 5)  # back to when the first was still active (not swept)
    with pytest.raises(QuotaExceeded):
        issue(broker, ttl=1)
    clock.advance(5)
    issue(broker, ttl=1)  # forward again: the first has expired, the second is revoked


def test_per_owner_quota_counts_only_that_owners_leases(
    store: LeaseStore, clock: FakeClock
) -> None:
    broker = make_broker(store, clock, quota_rules(max_active=None, per_owner=2))
    for _ in range(2):
        issue(broker, owner=ALICE)
    with pytest.raises(QuotaExceeded) as info:
        issue(broker, owner=ALICE)
    assert info.value.quota == Quota(SUBJECT, ALICE, 2, "ci")
    assert "with owner 'alice@example.com'" in info.value.reasons[0]
    for _ in range(2):  # bob has his own two
        issue(broker, owner=BOB)
    with pytest.raises(QuotaExceeded):
        issue(broker, owner=BOB)
    for _ in range(2):  # and alice has two under another subject
        issue(broker, owner=ALICE, subject="svc:other")
    for _ in range(5):  # a lease with no owner counts against no per-owner quota
        issue(broker, owner=None)
    assert active(store, clock, subject=SUBJECT, owner=ALICE) == 2
    assert active(store, clock, subject=SUBJECT) == 2 + 2 + 5


def test_both_quotas_at_once(store: LeaseStore, clock: FakeClock) -> None:
    broker = make_broker(store, clock, quota_rules(max_active=3, per_owner=2))
    issue(broker, owner=ALICE)
    issue(broker, owner=ALICE)
    with pytest.raises(QuotaExceeded) as by_owner:
        issue(broker, owner=ALICE)
    assert by_owner.value.quota == Quota(SUBJECT, ALICE, 2, "ci")
    issue(broker, owner=BOB)
    with pytest.raises(QuotaExceeded) as by_subject:
        issue(broker, owner="carol@example.com")
    assert by_subject.value.quota == Quota(SUBJECT, None, 3, "ci")
    with pytest.raises(QuotaExceeded):
        issue(broker, owner=None)


def test_attenuated_children_count_against_their_subject(
    store: LeaseStore, clock: FakeClock
) -> None:
    rules = [
        Rule(subjects=SUBJECT, audiences=AUDIENCE, scopes=SCOPES, name="ci", max_active=2),
        Rule(subjects="svc:helper", audiences=AUDIENCE, scopes=SCOPES, name="h", max_active=1),
    ]
    events: list[AuditEvent] = []
    broker = make_broker(store, clock, rules, audit=[events.append])
    parent = issue(broker)
    child = broker.attenuate(parent, scopes=["orders:read"], ttl=60)
    with pytest.raises(QuotaExceeded) as info:
        broker.attenuate(parent, ttl=60)
    assert info.value.quota == Quota(SUBJECT, None, 2, "ci")
    assert events[-1].action == "denied"
    with pytest.raises(QuotaExceeded):
        issue(broker)
    assert {lease.id for lease in store.find(LeaseFilter(parent=parent.lease_id))} == {
        child.lease_id
    }
    # Delegated to another subject: counted against that subject's quota.
    helper = broker.attenuate(child, ttl=30, subject="svc:helper")
    with pytest.raises(QuotaExceeded) as helper_full:
        broker.attenuate(parent, ttl=30, subject="svc:helper")
    assert helper_full.value.quota == Quota("svc:helper", None, 1, "h")
    # Revoking the child (and its delegate below it) frees both subjects' slots.
    assert broker.revoke(child) is True
    revoked = store.get(helper.lease_id)
    assert revoked is not None
    assert revoked.revoked_at == clock()
    broker.attenuate(parent, ttl=30, subject="svc:helper")
    broker.attenuate(parent, ttl=30)


def test_renewal_does_not_count_again(store: LeaseStore, clock: FakeClock) -> None:
    broker = make_broker(store, clock, quota_rules())
    creds = [issue(broker, ttl=60) for _ in range(LIMIT)]
    clock.advance(30)
    for cred in creds:
        broker.renew(cred, ttl=60)
    with pytest.raises(QuotaExceeded):
        issue(broker)


def test_a_quota_lowered_by_a_new_policy_applies_to_new_leases(
    store: LeaseStore, clock: FakeClock
) -> None:
    loose = make_broker(store, clock, quota_rules(max_active=5))
    for _ in range(4):
        issue(loose)
    strict = make_broker(store, clock, quota_rules(max_active=2))  # same store
    with pytest.raises(QuotaExceeded):
        issue(strict)
    assert active(store, clock, subject=SUBJECT) == 4


# -- races: threads, one broker each, one shared store ------------------------------
ROUNDS = 5


def test_racing_threads_never_overshoot_the_quota(store: LeaseStore, clock: FakeClock) -> None:
    brokers = [make_broker(store, clock, quota_rules()) for _ in range(THREADS)]
    wins: list[list[str]] = [[] for _ in range(THREADS)]
    refusals = [0] * THREADS

    def race(i: int) -> None:
        for round_ in range(ROUNDS):
            try:
                cred = issue(brokers[i], subject=f"svc:race-{round_}")
            except QuotaExceeded:
                refusals[i] += 1
            else:
                wins[i].append(cred.lease_id)

    run_threads(race)
    for round_ in range(ROUNDS):
        stored = store.find(LeaseFilter(subject=f"svc:race-{round_}"))
        assert len(stored) == LIMIT, round_
    won = [lease_id for ids in wins for lease_id in ids]
    assert len(won) == ROUNDS * LIMIT
    assert sorted(won) == sorted(lease.id for lease in store.find(LeaseFilter()))
    assert sum(refusals) == ROUNDS * (THREADS - LIMIT)


def test_racing_per_owner_quotas_never_overshoot(store: LeaseStore, clock: FakeClock) -> None:
    brokers = [make_broker(store, clock, quota_rules(max_active=5, per_owner=2)) for _ in range(8)]

    def race(i: int) -> None:
        owner = ALICE if i % 2 else BOB
        for _ in range(3):
            with contextlib.suppress(QuotaExceeded):
                issue(brokers[i], owner=owner)

    run_threads(race)
    assert active(store, clock, subject=SUBJECT, owner=ALICE) == 2
    assert active(store, clock, subject=SUBJECT, owner=BOB) == 2
    assert active(store, clock, subject=SUBJECT) == 4


def test_racing_issuers_and_revokers_keep_the_quota(store: LeaseStore, clock: FakeClock) -> None:
    # Issuers race while a revoker frees slots: at no point are more than LIMIT active.
    brokers = [make_broker(store, clock, quota_rules()) for _ in range(THREADS)]
    for _ in range(LIMIT):
        issue(brokers[0])
    seen: list[int] = []

    def race(i: int) -> None:
        for _ in range(6):
            if i == 0:
                leases = list(brokers[0].leases(subject=SUBJECT))
                if leases:
                    brokers[0].revoke(leases[0].id)
            else:
                with contextlib.suppress(QuotaExceeded):
                    issue(brokers[i])
            seen.append(active(store, clock, subject=SUBJECT))

    run_threads(race)
    assert max(seen) <= LIMIT
    assert active(store, clock, subject=SUBJECT) <= LIMIT


# -- races: OS processes on one shared store ------------------------------------------
SHARED = [
    pytest.param((param.id, param.values[0]), id=param.id)
    for param in STORES
    if param.id != "memory"  # one process's dict: nothing another process can open
]
PROCESSES = 4
ATTEMPTS = 6  # per process and round
PROCESS_ROUNDS = 3


def address(kind: str, store: LeaseStore) -> list[str]:
    """Where a worker process finds ``store``: as tests/test_store_processes.py does."""
    inner: Any = getattr(store, "store", store)  # the async store behind the sync facade
    return {
        "sqlite": [str(getattr(store, "path", "")), ""],
        "redis": [REDIS_URL, str(getattr(inner, "prefix", ""))],
        "redis-async": [REDIS_URL, str(getattr(inner, "prefix", ""))],
        "postgres": [POSTGRES_DSN, str(getattr(inner, "schema", ""))],
    }[kind]


@pytest.fixture(params=SHARED)
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, LeaseStore]]:
    kind, factory = request.param
    build: StoreFactory = factory
    built = build(tmp_path)
    yield kind, built
    clear = getattr(built, "clear", None)
    if clear is not None:
        clear()
    built.close()


def spawn(kind: str, store: LeaseStore) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)])}
    return subprocess.Popen(
        [sys.executable, __file__, kind, *address(kind, store)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def read_line(process: subprocess.Popen[str]) -> Any:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.endswith("\n"), f"worker exited early ({process.poll()})"
    return json.loads(line)


def test_racing_processes_never_overshoot_the_quota(shared: tuple[str, LeaseStore]) -> None:
    kind, store = shared
    workers = [spawn(kind, store) for _ in range(PROCESSES)]
    try:
        for worker in workers:
            assert read_line(worker) == "ready"
        for worker in workers:  # the start line, to every worker at once
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        results: list[dict[str, Any]] = [read_line(worker) for worker in workers]
    finally:
        for worker in workers:
            if worker.stdin is not None:
                worker.stdin.close()
            try:
                worker.wait(timeout=TIMEOUT)
            finally:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait(timeout=TIMEOUT)
                if worker.stdout is not None:
                    worker.stdout.close()
    assert all(worker.returncode == 0 for worker in workers)
    for round_ in range(PROCESS_ROUNDS):
        subject = f"svc:proc-{round_}"
        won = [lease_id for result in results for lease_id in result["won"][round_]]
        refused = sum(result["refused"][round_] for result in results)
        assert len(won) == LIMIT, (round_, [r["won"][round_] for r in results])
        assert refused == PROCESSES * ATTEMPTS - LIMIT
        stored = store.find(LeaseFilter(subject=subject))
        assert sorted(lease.id for lease in stored) == sorted(won)
    assert all(not result["errors"] for result in results), results


def worker_main(kind: str, where: str, namespace: str) -> None:
    """The worker: rebuild the store, say "ready", wait for "go", then race."""
    from store_worker import open_store

    store = open_store(kind, where, namespace)
    broker = make_broker(store, FakeClock(), quota_rules())
    print(json.dumps("ready"), flush=True)
    sys.stdin.readline()
    won: list[list[str]] = []
    refused: list[int] = []
    errors: list[str] = []
    for round_ in range(PROCESS_ROUNDS):
        won.append([])
        refused.append(0)
        for _ in range(ATTEMPTS):
            try:
                won[-1].append(issue(broker, subject=f"svc:proc-{round_}").lease_id)
            except QuotaExceeded:
                refused[-1] += 1
            except Exception as exc:  # reported to the test, which fails on it
                errors.append(f"{type(exc).__name__}: {exc}")
    print(json.dumps({"won": won, "refused": refused, "errors": errors}), flush=True)
    sys.stdin.read()  # until the test closes our stdin
    store.close()


if __name__ == "__main__":
    worker_main(*sys.argv[1:4])
