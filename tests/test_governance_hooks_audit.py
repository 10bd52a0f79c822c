"""Lifecycle hooks (``on_issue``, ``on_revoke``, ``on_expire``) and the audit trail.

Hooks run after the operation, get the right leases (sync and async hooks, on
``Broker`` and ``AsyncBroker``), fire ``on_expire`` once per lease across
brokers sharing a store, and when they fail the operation still stands: the
call is a job in the store's outbox, retried by later sweeps (of this broker or
another on the same store) with backoff and the same idempotency key, then
parked where ``failed_hooks()`` and the report show it until it is retried or
forgotten by force. The audit trail has one event type per transition, JSON
lines files that stay whole under threads, and no secret anywhere. Time comes
from a ``FakeClock``: backoff is checked by moving it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jitbroker import (
    AsyncBroker,
    Broker,
    Credential,
    KeyRing,
    Lease,
    LeaseStore,
    MemoryStore,
    Policy,
    PolicyDenied,
    Rule,
)
from jitbroker._drive import run
from jitbroker.audit import AuditEvent, Auditor, EventType, JsonLinesSink
from jitbroker.errors import InvalidRequest, InvalidToken, TokenRevoked, WrongAudience
from jitbroker.hooks import FailedHook, Hooks
from jitbroker.lease import Secret
from jitbroker.outbox import SYNC
from jitbroker.stores.base import Job, job_id
from jitbroker.stores.sqlite import SQLiteStore
from jitbroker.testing import TEST_ISSUER, FakeClock
from test_secrets import Secrets, key_secrets, tampered
from test_store_conformance import STORES, StoreFactory

SUBJECT = "svc:ci-deploy"
AUDIENCE = "db:orders"
SCOPES = ["orders:read", "orders:write"]
ALICE = "alice@example.com"
BOB = "bob@example.com"


#: The name a ``Hook`` instance gets: ``module.qualname`` of its class.
HOOK = "test_governance_hooks_audit.Hook"


class Hook:
    """A hook that records (time, lease id) per call and fails while ``failing``."""

    def __init__(self, clock: FakeClock, *, failing: bool = False) -> None:
        self.clock = clock
        self.failing = failing
        self.calls: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def __call__(self, lease: Lease) -> None:
        with self.lock:
            self.calls.append((self.clock(), lease.id))
        if self.failing:
            raise RuntimeError("the cleanup service is down")

    @property
    def ids(self) -> list[str]:
        return [lease_id for _, lease_id in self.calls]

    @property
    def times(self) -> list[float]:
        return [at for at, _ in self.calls]


def make_broker(clock: FakeClock, events: list[AuditEvent] | None = None, **options: Any) -> Broker:
    return Broker(
        issuer=TEST_ISSUER,
        keys=options.pop("keys", None) or KeyRing.generate("EdDSA"),
        clock=clock,
        audit=[events.append] if events is not None else (),
        **options,
    )


def issue(broker: Broker, **changes: Any) -> Credential:
    request: dict[str, Any] = {
        "subject": SUBJECT,
        "audience": AUDIENCE,
        "scopes": SCOPES,
        "ttl": 600,
        "owner": ALICE,
        "purpose": "nightly export",
    }
    return broker.issue(**{**request, **changes})


def of(events: list[AuditEvent], action: str) -> list[AuditEvent]:
    return [event for event in events if event.action == action]


def waiting(broker: Broker | AsyncBroker) -> list[tuple[str, str, int]]:
    """Every job in the outbox not parked, oldest due first: (event, lease id,
    attempts), retries and not-yet-run (or held) calls alike."""
    return [(job.event, job.lease.id, job.attempts) for job in retries(broker)]


def retries(broker: Broker | AsyncBroker) -> list[Job]:
    """The jobs waiting in the outbox (not parked), oldest due first. A sync
    broker's ``stop`` first deletes the finished ones still waiting for their
    batch (an async broker's ``close`` does)."""
    if isinstance(broker, Broker):
        broker.stop()
    store: LeaseStore = broker.store
    return store.jobs(parked=False)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- hooks get the right leases ----------------------------------------------------
def test_hooks_get_the_right_leases(clock: FakeClock) -> None:
    on_issue, on_revoke, on_expire = Hook(clock), Hook(clock), Hook(clock)
    broker = make_broker(clock, on_issue=[on_issue], on_revoke=on_revoke, on_expire=on_expire)
    a = issue(broker, task="job-1")
    b = issue(broker, ttl=30)
    assert on_issue.ids == [a.lease_id, b.lease_id]
    child = broker.attenuate(a, scopes=["orders:read"])
    assert on_issue.ids == [a.lease_id, b.lease_id, child.lease_id]  # a child is a new lease
    assert broker.revoke(a, reason="done") is True
    assert sorted(on_revoke.ids) == sorted([a.lease_id, child.lease_id])  # the subtree
    assert broker.revoke(a) is False  # already revoked: no second call
    assert len(on_revoke.ids) == 2
    clock.advance(31)
    assert [lease.id for lease in broker.sweep()] == [b.lease_id]
    assert on_expire.ids == [b.lease_id]
    broker.sweep()
    assert on_expire.ids == [b.lease_id]  # once


def test_revoke_where_task_exit_and_key_retirement_fire_on_revoke(clock: FakeClock) -> None:
    on_revoke = Hook(clock)
    broker = make_broker(clock, on_revoke=on_revoke)
    offboarded = [issue(broker, owner=BOB) for _ in range(2)]
    assert broker.revoke_where(owner=BOB, reason="offboarded") == 2
    assert sorted(on_revoke.ids) == sorted(cred.lease_id for cred in offboarded)
    with broker.task("job-9", subject=SUBJECT, audience=AUDIENCE, scopes=SCOPES) as cred:
        pass
    assert on_revoke.ids[-1] == cred.lease_id
    signed = issue(broker)
    old = signed.lease.key_id
    assert old is not None
    broker.rotate_keys()
    assert broker.retire_key(old) == 1
    assert on_revoke.ids[-1] == signed.lease_id
    assert len(on_revoke.ids) == 4


def test_the_lease_a_hook_gets_is_the_transitioned_one(clock: FakeClock) -> None:
    got: list[Lease] = []
    broker = make_broker(clock, on_revoke=got.append, on_expire=got.append)
    revoked = issue(broker)
    expiring = issue(broker, ttl=5)
    broker.revoke(revoked, reason="compromised")
    clock.advance(5)
    broker.sweep()
    first, second = got
    assert (first.id, first.revoked_at, first.revoke_reason) == (
        revoked.lease_id,
        clock() - 5,
        "compromised",
    )
    assert second.id == expiring.lease_id
    assert second.revoked_at is None


def test_async_hooks_on_a_sync_broker(clock: FakeClock) -> None:
    seen: list[tuple[str, str]] = []

    async def on_issue(lease: Lease) -> None:
        await asyncio.sleep(0)
        seen.append(("issue", lease.id))

    async def on_revoke(lease: Lease) -> None:
        seen.append(("revoke", lease.id))

    broker = make_broker(clock, on_issue=on_issue, on_revoke=on_revoke)
    cred = issue(broker)
    broker.revoke(cred)
    assert seen == [("issue", cred.lease_id), ("revoke", cred.lease_id)]

    async def inside_a_running_loop() -> Credential:
        # A sync broker called from async code never blocks the running loop: its
        # async hooks are not run there, but fail and wait for a later sweep.
        other = issue(broker)
        broker.revoke(other)
        return other

    other = asyncio.run(inside_a_running_loop())
    assert len(seen) == 2
    assert waiting(broker) == [("on_issue", other.lease_id, 1), ("on_revoke", other.lease_id, 1)]
    assert all(job.error.startswith("RuntimeError: async hook not run") for job in retries(broker))
    clock.advance(1)
    broker.sweep()  # no loop runs here: they run now
    assert seen[-2:] == [("issue", other.lease_id), ("revoke", other.lease_id)]
    assert waiting(broker) == []


def test_a_failing_async_hook_on_a_sync_broker_is_recorded(clock: FakeClock) -> None:
    async def on_revoke(lease: Lease) -> None:
        raise RuntimeError("async cleanup failed")

    broker = make_broker(clock, on_revoke=on_revoke, hook_retries=0)
    cred = issue(broker)
    assert broker.revoke(cred) is True
    (failed,) = broker.failed_hooks()
    assert failed.error == "RuntimeError: async cleanup failed"
    assert failed.hook.endswith("on_revoke")


def test_sync_and_async_hooks_on_an_async_broker(clock: FakeClock) -> None:
    sync_seen: list[tuple[str, str]] = []
    async_seen: list[tuple[str, str]] = []

    def sync_hook(event: str) -> Any:
        return lambda lease: sync_seen.append((event, lease.id))

    def async_hook(event: str) -> Any:
        async def hook(lease: Lease) -> None:
            await asyncio.sleep(0)
            async_seen.append((event, lease.id))

        return hook

    async def main() -> tuple[str, str, str]:
        broker = AsyncBroker(
            issuer=TEST_ISSUER,
            clock=clock,
            on_issue=[sync_hook("issue"), async_hook("issue")],
            on_revoke=[sync_hook("revoke"), async_hook("revoke")],
            on_expire=[sync_hook("expire"), async_hook("expire")],
        )
        a = await broker.issue(SUBJECT, AUDIENCE, SCOPES, ttl=600)
        b = await broker.issue(SUBJECT, AUDIENCE, SCOPES, ttl=10)
        await broker.revoke(a)
        clock.advance(10)
        assert [lease.id for lease in await broker.sweep()] == [b.lease_id]
        c = await broker.issue(SUBJECT, AUDIENCE, SCOPES, ttl=600, owner=BOB)
        assert await broker.revoke_where(owner=BOB) == 1
        await broker.close()
        return a.lease_id, b.lease_id, c.lease_id

    a, b, c = asyncio.run(main())
    expected = [
        ("issue", a),
        ("issue", b),
        ("revoke", a),
        ("expire", b),
        ("issue", c),
        ("revoke", c),
    ]
    assert sync_seen == expected
    assert async_seen == expected


def test_a_failing_hook_on_an_async_broker_is_retried(clock: FakeClock) -> None:
    attempts: list[float] = []

    async def on_revoke(lease: Lease) -> None:
        attempts.append(clock())
        if len(attempts) < 3:
            raise RuntimeError("not yet")

    async def main() -> list[FailedHook]:
        broker = AsyncBroker(issuer=TEST_ISSUER, clock=clock, on_revoke=on_revoke, hook_backoff=10)
        cred = await broker.issue(SUBJECT, AUDIENCE, SCOPES, ttl=600)
        assert await broker.revoke(cred) is True
        clock.advance(10)
        await broker.sweep()
        clock.advance(20)
        await broker.sweep()
        assert waiting(broker) == []
        return await broker.failed_hooks()

    t0 = clock()
    assert asyncio.run(main()) == []
    assert attempts == [t0, t0 + 10, t0 + 30]


# -- on_expire exactly once across brokers sharing a store ------------------------------
@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LeaseStore]:
    factory: StoreFactory = request.param
    built = factory(tmp_path)
    yield built
    clear = getattr(built, "clear", None)
    if clear is not None:  # a shared server: drop this test's keys or schema
        clear()
    built.close()


def test_on_expire_fires_once_across_brokers_sharing_a_store(
    store: LeaseStore, clock: FakeClock
) -> None:
    keys = KeyRing.generate("EdDSA")
    hooks = [Hook(clock), Hook(clock)]
    brokers = [
        make_broker(clock, keys=keys, store=store, on_expire=hook, reap_interval=10_000)
        for hook in hooks
    ]
    creds = [issue(brokers[i % 2], ttl=10 + i % 7) for i in range(40)]
    revoked = creds[0]
    brokers[1].revoke(revoked)
    clock.advance(20)
    barrier = threading.Barrier(2)
    swept: list[list[Lease]] = [[], []]

    def sweep(i: int) -> None:
        barrier.wait()
        for _ in range(3):
            swept[i] += brokers[i].sweep()

    threads = [threading.Thread(target=sweep, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    called = hooks[0].ids + hooks[1].ids
    expected = sorted(cred.lease_id for cred in creds[1:])  # a revoked lease never expires
    assert sorted(called) == expected
    assert sorted(lease.id for part in swept for lease in part) == expected
    for i in range(2):
        assert sorted(hooks[i].ids) == sorted(lease.id for lease in swept[i])


def test_on_expire_fires_for_leases_that_expired_while_no_broker_ran(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "leases.db"
    # The lease records the hook it needs by name: a later process (a new Hook
    # object, of the same name) runs it.
    first = make_broker(clock, store=SQLiteStore(path), on_expire=Hook(clock))
    cred = issue(first, ttl=10)
    first.close()
    clock.advance(3600)
    hook = Hook(clock)
    later = make_broker(clock, store=SQLiteStore(path), on_expire=hook)
    later.sweep()
    assert hook.ids == [cred.lease_id]
    later.sweep()
    assert hook.ids == [cred.lease_id]
    later.close()


# -- a failing hook never undoes the operation ------------------------------------------
def test_a_failing_on_revoke_hook_keeps_the_revocation_durable(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "leases.db"
    hook = Hook(clock, failing=True)
    broker = make_broker(clock, store=SQLiteStore(path), on_revoke=hook)
    cred = issue(broker)
    with caplog.at_level(logging.WARNING, logger="jitbroker.outbox"):
        assert broker.revoke(cred, reason="compromised") is True
    assert hook.ids == [cred.lease_id]
    assert any("on_revoke" in r.getMessage() for r in caplog.records)
    with pytest.raises(TokenRevoked):
        broker.verify(cred.token, audience=AUDIENCE)
    broker.close()
    reopened = SQLiteStore(path)  # what another process would read
    lease = reopened.get(cred.lease_id)
    assert lease is not None
    assert (lease.revoked_at, lease.revoke_reason) == (clock(), "compromised")
    # And the failed call too: its retry waits in the same file, with the lease.
    (job,) = reopened.jobs()
    assert (job.event, job.lease, job.attempts, job.parked) == ("on_revoke", lease, 1, False)
    assert job.error == "RuntimeError: the cleanup service is down"
    assert job.id == job_id(cred.lease_id, "on_revoke", HOOK)
    reopened.close()


def test_a_failing_on_issue_hook_still_hands_out_the_credential(clock: FakeClock) -> None:
    hook = Hook(clock, failing=True)
    broker = make_broker(clock, on_issue=hook)
    cred = issue(broker)
    assert broker.verify(cred.token, audience=AUDIENCE).lease_id == cred.lease_id
    assert hook.ids == [cred.lease_id]


def test_a_failing_on_expire_hook_does_not_unexpire(clock: FakeClock) -> None:
    hook = Hook(clock, failing=True)
    store = MemoryStore()
    broker = make_broker(clock, store=store, on_expire=hook, hook_backoff=5)
    other = make_broker(clock, store=store)
    cred = issue(broker, ttl=10)
    clock.advance(10)
    assert [lease.id for lease in broker.sweep()] == [cred.lease_id]
    assert other.sweep() == []  # claimed once, whatever the hook did
    clock.advance(5)
    assert broker.sweep() == []  # the retry is of the hook, not of the expiry
    assert hook.ids == [cred.lease_id, cred.lease_id]


def test_only_the_failing_hook_is_retried(clock: FakeClock) -> None:
    good, bad = Hook(clock), Hook(clock, failing=True)
    # Two instances of one class share a derived name: a mapping names each.
    broker = make_broker(
        clock, on_revoke={"good": good, "bad": bad}, hook_backoff=1, hook_retries=2
    )
    cred = issue(broker)
    broker.revoke(cred)
    for _ in range(5):
        clock.advance(10)
        broker.sweep()
    assert good.ids == [cred.lease_id]
    assert bad.ids == [cred.lease_id] * 3
    (failed,) = broker.failed_hooks()
    assert (failed.hook, failed.attempts) == ("bad", 3)
    assert failed.id == job_id(cred.lease_id, "on_revoke", "bad")


# -- retries with backoff, then parking ------------------------------------------------
def test_retries_follow_the_backoff_then_park(clock: FakeClock) -> None:
    events: list[AuditEvent] = []
    hook = Hook(clock, failing=True)
    broker = make_broker(
        clock, events, on_revoke=hook, hook_retries=3, hook_backoff=1.0, reap_interval=10_000
    )
    cred = issue(broker)
    t0 = clock()
    broker.revoke(cred)
    assert hook.times == [t0]
    # Each retry waits backoff, then 2x, 4x ... and not a moment less.
    for wait in (1.0, 2.0, 4.0):
        before = len(hook.calls)
        clock.advance(wait - 0.25)  # binary fractions: the sums stay exact
        broker.sweep()
        assert len(hook.calls) == before, f"retried before the {wait}s backoff"
        assert broker.failed_hooks() == []  # waiting, not parked yet
        clock.advance(0.25)
        broker.sweep()
        assert len(hook.calls) == before + 1
    assert hook.times == [t0, t0 + 1, t0 + 3, t0 + 7]
    (failed,) = broker.failed_hooks()
    assert failed.event == "on_revoke"
    assert failed.hook == "Hook"
    assert failed.lease.id == cred.lease_id
    assert failed.attempts == 4  # the first call and hook_retries retries
    assert failed.error == "RuntimeError: the cleanup service is down"
    assert failed.at == t0 + 7
    clock.advance(100_000)
    broker.sweep()
    assert len(hook.calls) == 4  # parked: sweeps leave it alone
    # Audited: one hook_failed per retried failure, one hook_parked.
    failed_events = of(events, "hook_failed")
    assert [e.at for e in failed_events] == [t0, t0 + 1, t0 + 3]
    for event in failed_events + of(events, "hook_parked"):
        assert event.lease is not None
        assert event.lease.id == cred.lease_id
        assert event.error == "RuntimeError"
        assert event.where == "on_revoke"
    assert [e.at for e in of(events, "hook_parked")] == [t0 + 7]
    # And the report shows it.
    report = broker.report()
    assert report.failed_hooks == (failed,)
    (entry,) = report.to_dict()["failed_hooks"]
    assert entry["event"] == "on_revoke"
    assert entry["lease"] == cred.lease_id
    assert entry["attempts"] == 4
    assert "failed hooks: 1" in str(report)
    assert cred.lease_id in str(report)


def test_backoff_is_capped_at_an_hour(clock: FakeClock) -> None:
    hook = Hook(clock, failing=True)
    broker = make_broker(clock, on_revoke=hook, hook_retries=6, hook_backoff=1000)
    broker.revoke(issue(broker))
    t = clock()
    for wait in (1000, 2000, 3600, 3600):
        before = len(hook.calls)
        clock.advance(wait - 1)
        broker.sweep()
        assert len(hook.calls) == before
        clock.advance(1)
        broker.sweep()
        t += wait
        assert hook.times[-1] == t
    assert len(hook.calls) == 5


def test_no_retries_parks_at_once(clock: FakeClock) -> None:
    events: list[AuditEvent] = []
    hook = Hook(clock, failing=True)
    broker = make_broker(clock, events, on_issue=hook, hook_retries=0)
    cred = issue(broker)
    (failed,) = broker.failed_hooks()
    assert (failed.event, failed.attempts, failed.lease.id) == ("on_issue", 1, cred.lease_id)
    assert of(events, "hook_failed") == []
    assert len(of(events, "hook_parked")) == 1


def test_retry_failed_hooks_runs_them_once_more(clock: FakeClock) -> None:
    events: list[AuditEvent] = []
    hook = Hook(clock, failing=True)
    broker = make_broker(clock, events, on_revoke=hook, hook_retries=1, hook_backoff=1)
    creds = [issue(broker), issue(broker)]
    for cred in creds:
        broker.revoke(cred)
    clock.advance(1)
    broker.sweep()
    assert [f.attempts for f in broker.failed_hooks()] == [2, 2]
    assert len(hook.calls) == 4
    # Still broken: each parked call runs once more and is parked again.
    assert broker.retry_failed_hooks() == 2
    assert len(hook.calls) == 6
    assert [f.attempts for f in broker.failed_hooks()] == [3, 3]
    assert len(of(events, "hook_parked")) == 4
    clock.advance(100_000)
    broker.sweep()
    assert len(hook.calls) == 6
    # Fixed: one more run each, and they are gone from the failed list.
    hook.failing = False
    assert broker.retry_failed_hooks() == 0
    assert sorted(hook.ids[-2:]) == sorted(cred.lease_id for cred in creds)  # due alike
    assert broker.failed_hooks() == []
    assert broker.report().failed_hooks == ()
    assert broker.retry_failed_hooks() == 0
    assert len(hook.calls) == 8


def test_retry_failed_hooks_on_an_async_broker(clock: FakeClock) -> None:
    hook = Hook(clock, failing=True)

    async def main() -> tuple[int, int, int]:
        broker = AsyncBroker(issuer=TEST_ISSUER, clock=clock, on_revoke=hook, hook_retries=0)
        await broker.revoke(await broker.issue(SUBJECT, AUDIENCE, SCOPES))
        parked = len(await broker.failed_hooks())
        still = await broker.retry_failed_hooks()
        hook.failing = False
        return parked, still, await broker.retry_failed_hooks()

    assert asyncio.run(main()) == (1, 1, 0)
    assert len(hook.calls) == 3


@pytest.mark.parametrize(
    "options",
    [
        {"hook_retries": -1},
        {"hook_retries": True},
        {"hook_retries": 1.5},
        {"hook_backoff": 0},
        {"hook_backoff": -1},
        {"hook_timeout": 0},
        {"hook_timeout": -1},
        {"on_issue": "not callable"},
        {"on_revoke": [print, 42]},
        {"on_revoke": {"drop role": print}},  # a name has no spaces
        {"on_revoke": {"": print}},
        {"on_expire": [Hook(FakeClock()), Hook(FakeClock())]},  # one derived name twice
    ],
)
def test_bad_hook_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        Broker(issuer=TEST_ISSUER, **options)


def test_hooks_of_different_events_may_share_a_name(clock: FakeClock) -> None:
    hook = Hook(clock)
    broker = make_broker(clock, on_issue=hook, on_revoke=hook)  # unique per event
    cred = issue(broker)
    broker.revoke(cred)
    assert hook.ids == [cred.lease_id, cred.lease_id]


# -- the audit trail ---------------------------------------------------------------------
#: What the realistic session emits: every event type but a task's failed exit
#: revoke, which needs a store that fails (tests/test_task_exit.py covers it,
#: secrets included), and the broker service's token endpoint events
#: (tests/test_web_service.py: caller identity in, tokens and assertions out).
SESSION_EVENTS = set(EventType) - {EventType.TASK_REVOKE_FAILED, EventType.TOKEN_ENDPOINT}
VAULT = "vault:orders"
ORPHAN = "e" * 32  # a backend principal whose lease the store never had


class Vault:
    """A provider whose principals live in a dict: each lease of audience
    ``VAULT`` gets a user and a password, which must never be audited or logged."""

    name = VAULT

    def __init__(self) -> None:
        self.principals: dict[str, str] = {}  # lease id -> password

    def check(self, lease: Lease) -> None:
        pass

    def create(self, lease: Lease) -> Secret:
        password = "pw-" + os.urandom(12).hex()
        self.principals[lease.id] = password
        return Secret({"user": f"jit_{lease.id}", "password": password})

    def revoke(self, lease: Lease) -> None:
        self.principals.pop(lease.id, None)  # not found: done

    def renew(self, lease: Lease) -> None:
        pass

    def managed(self) -> list[str]:
        return list(self.principals)


def session(broker: Broker, clock: FakeClock) -> dict[str, Any]:
    """A realistic day: every kind of event, with what the checks need."""
    a = issue(broker, task="job-1")
    renewed = broker.renew(a, ttl=900)
    child = broker.attenuate(renewed, scopes=["orders:read"], ttl=60)
    with pytest.raises(PolicyDenied):
        issue(broker, subject="svc:intruder")
    with pytest.raises(WrongAudience):
        broker.verify(a.token, audience="db:payments")
    bad = tampered(child.token)
    for token in bad:
        with pytest.raises(InvalidToken):
            broker.verify(token, audience=AUDIENCE)
    assert broker.revoke(a, reason="done", by="alice") is True
    with pytest.raises(TokenRevoked):
        broker.verify(child.token, audience=AUDIENCE)
    bobs = [issue(broker, owner=BOB, subject="svc:report") for _ in range(2)]
    assert broker.revoke_where(owner=BOB, subject="svc:report", reason="offboarded", by="hr") == 2
    short = issue(broker, ttl=5)
    clock.advance(5)
    assert [lease.id for lease in broker.sweep()] == [short.lease_id]
    first_kid = broker.keys.active.kid
    second = broker.rotate_keys()
    third = broker.rotate_keys()
    assert broker.retire_key(second.kid, revoke=False) == 0
    # A backend credential: the backend loses it, and keeps one of a lease the
    # store never had (a restored backup); reconcile flags one, revokes the other.
    vault: Vault = broker._core.outbox.providers[VAULT]  # type: ignore[assignment]
    backed = issue(broker, audience=VAULT)
    assert backed.secret is not None
    passwords = [backed.secret["password"]]
    del vault.principals[backed.lease_id]
    vault.principals[ORPHAN] = "pw-" + os.urandom(12).hex()
    passwords.append(vault.principals[ORPHAN])
    found = broker.reconcile()
    assert (found.revoked, [x.id for x in found.missing]) == ((ORPHAN,), [backed.lease_id])
    assert broker.revoke(backed, reason="backend-lost") is True
    clock.advance(3600 + 5)  # max_ttl + leeway: the first key's grace is over
    broker.sweep()  # drops it; also retries the failing on_expire hook, which parks it
    assert vault.principals == {}
    # The parked on_expire call is given up on, by force: audited, with who did it.
    (parked,) = [f for f in broker.failed_hooks() if f.event == "on_expire"]
    assert broker.forget_failed_hook(parked, force=True, by="ops") == 1
    return {
        "creds": [a, renewed, child, *bobs, short, backed],
        "passwords": passwords,
        "backed": backed,
        "forgotten": parked,
        "bad": bad,
        "child": child,
        "first_kid": first_kid,
        "second_kid": second.kid,
        "third_kid": third.kid,
        "keys": [second, third],
        "bobs": bobs,
        "short": short,
    }


def audited_broker(clock: FakeClock, keys: KeyRing, *sinks: Any, **options: Any) -> Broker:
    policy = Policy(
        [Rule(subjects=[SUBJECT, "svc:report"], audiences=[AUDIENCE, VAULT], scopes=SCOPES)]
    )
    return Broker(
        issuer=TEST_ISSUER,
        keys=keys,
        clock=clock,
        policy=policy,
        audit=list(sinks),
        on_expire=Hook(clock, failing=True),
        hook_retries=1,
        hook_backoff=1,
        providers=[Vault()],
        **options,
    )


def test_every_event_type_in_a_realistic_session(clock: FakeClock) -> None:
    events: list[AuditEvent] = []
    broker = audited_broker(clock, KeyRing.generate("EdDSA"), events.append)
    seen = session(broker, clock)
    assert {event.action for event in events} == SESSION_EVENTS
    (issued_a, *_) = of(events, "issued")
    assert issued_a.lease == seen["creds"][0].lease
    assert of(events, "renewed")[0].lease == seen["creds"][1].lease
    assert of(events, "attenuated")[0].lease == seen["child"].lease
    revoked = of(events, "revoked")
    by_alice = [e for e in revoked if e.actor == "alice"]
    assert {e.lease.id for e in by_alice if e.lease} == {
        seen["creds"][0].lease_id,
        seen["child"].lease_id,
    }
    assert all(e.reason == "done" for e in by_alice)
    by_hr = [e for e in revoked if e.actor == "hr"]
    assert {e.lease.id for e in by_hr if e.lease} == {c.lease_id for c in seen["bobs"]}
    assert all(e.reason == "offboarded" for e in by_hr)
    (bulk,) = of(events, "revoked_where")
    assert (bulk.count, bulk.where, bulk.actor, bulk.reason) == (
        2,
        "owner='bob@example.com', subject='svc:report'",
        "hr",
        "offboarded",
    )
    assert bulk.lease is None
    (expired,) = of(events, "expired")
    assert expired.actor == "reaper"
    assert expired.lease is not None
    assert expired.lease.id == seen["short"].lease_id
    (denied,) = of(events, "denied")
    assert denied.reasons == ("no rule applies to subject 'svc:intruder'",)
    assert denied.lease is not None
    assert denied.lease.subject == "svc:intruder"
    failures = of(events, "verify_failed")
    assert len(failures) == 1 + len(seen["bad"]) + 1
    assert failures[0].error == "WrongAudience"
    assert failures[-1].error == "TokenRevoked"
    assert failures[-1].where == f"lease_id={seen['child'].lease_id!r}"
    assert all(e.error and e.error[0].isupper() and " " not in e.error for e in failures)
    assert [e.where for e in of(events, "key_rotated")] == [
        f"key_id={seen['second_kid']!r}",
        f"key_id={seen['third_kid']!r}",
    ]
    (retired,) = of(events, "key_retired")
    assert retired.where == f"key_id={seen['second_kid']!r}"
    (dropped,) = of(events, "key_dropped")
    assert dropped.where == f"key_id={seen['first_kid']!r}"
    assert [e.where for e in of(events, "hook_failed")] == ["on_expire"]
    assert [e.where for e in of(events, "hook_parked")] == ["on_expire"]
    (forgotten,) = of(events, "hook_forgotten")
    assert (forgotten.where, forgotten.actor) == (seen["forgotten"].id, "ops")
    assert forgotten.where == job_id(seen["short"].lease_id, "on_expire", HOOK)
    assert forgotten.error == "RuntimeError: the cleanup service is down"
    assert forgotten.lease is not None
    assert forgotten.lease.id == seen["short"].lease_id
    (orphaned,) = of(events, "principal_orphaned")
    assert (orphaned.where, orphaned.actor) == (VAULT, "reconcile")
    assert orphaned.lease is not None
    assert orphaned.lease.id == ORPHAN
    (missing,) = of(events, "principal_missing")
    assert missing.where == VAULT
    assert missing.lease is not None
    assert missing.lease.id == seen["backed"].lease_id
    # to_dict: JSON-ready, the action as its string, unset fields left out.
    for event in events:
        data = event.to_dict()
        assert data["action"] == str(event.action)
        assert None not in data.values()
        json.dumps(data)
    assert bulk.to_dict()["count"] == 2
    assert "lease" not in bulk.to_dict()


def test_event_types_are_strings() -> None:
    assert isinstance(EventType.REVOKED_WHERE, str)
    assert EventType("revoked_where") is EventType.REVOKED_WHERE
    assert [str(e) for e in EventType] == [
        "issued",
        "renewed",
        "attenuated",
        "revoked",
        "revoked_where",
        "expired",
        "denied",
        "verify_failed",
        "key_rotated",
        "key_retired",
        "key_dropped",
        "hook_failed",
        "hook_parked",
        "hook_forgotten",
        "principal_orphaned",
        "principal_missing",
        "task_revoke_failed",
        "token_endpoint",
    ]


def test_revoke_where_counts_with_combined_filters(clock: FakeClock) -> None:
    events: list[AuditEvent] = []
    broker = make_broker(clock, events)
    a1 = issue(broker, owner=ALICE, subject="svc:a", task="t1")
    a1_child = broker.attenuate(a1, scopes=["orders:read"])
    a1_delegate = broker.attenuate(a1, scopes=["orders:read"], subject="svc:c")
    a2 = issue(broker, owner=ALICE, subject="svc:b", task="t1")
    b1 = issue(broker, owner=BOB, subject="svc:a", task="t2")
    a3 = issue(broker, owner=ALICE, subject="svc:a", task="t2")
    b2 = issue(broker, owner=BOB, subject="svc:b", task="t1")
    kid = broker.keys.active.kid

    def bulk(**where: Any) -> tuple[int, AuditEvent, set[str]]:
        before = len(events)
        count = broker.revoke_where(**where)
        new = events[before:]
        (summary,) = of(new, "revoked_where")
        return count, summary, {e.lease.id for e in of(new, "revoked") if e.lease}

    count, summary, ids = bulk(owner=BOB, task="t1", subject="svc:a")
    assert (count, ids, summary.count) == (0, set(), 0)
    assert summary.where == "owner='bob@example.com', subject='svc:a', task='t1'"
    # AND of owner and subject: alice's svc:a leases, with their subtrees (any subject).
    count, summary, ids = bulk(owner=ALICE, subject="svc:a", reason="offboarded", by="hr")
    assert ids == {a1.lease_id, a1_child.lease_id, a1_delegate.lease_id, a3.lease_id}
    assert count == summary.count == 4
    assert (summary.reason, summary.actor) == ("offboarded", "hr")
    assert summary.where == "owner='alice@example.com', subject='svc:a'"
    # Already revoked leases are not counted again.
    count, _, _ = bulk(owner=ALICE, subject="svc:a")
    assert count == 0
    count, summary, ids = bulk(subject="svc:b", task="t1", key_id=kid)
    assert (count, ids) == (2, {a2.lease_id, b2.lease_id})
    assert summary.where == f"subject='svc:b', task='t1', key_id={kid!r}"
    count, _, ids = bulk(owner=BOB, task="t2")
    assert (count, ids) == (1, {b1.lease_id})
    assert list(broker.leases()) == []
    with pytest.raises(InvalidRequest):
        broker.revoke_where(reason="everything")


def test_revoke_where_by_parent(clock: FakeClock) -> None:
    events: list[AuditEvent] = []
    broker = make_broker(clock, events)
    top = issue(broker)
    kids = [broker.attenuate(top, scopes=["orders:read"]) for _ in range(3)]
    grandkid = broker.attenuate(kids[0], scopes=["orders:read"])
    assert broker.revoke_where(parent=top.lease_id, by="ops") == 4
    (summary,) = of(events, "revoked_where")
    assert summary.where == f"parent={top.lease_id!r}"
    assert summary.actor == "ops"
    assert {e.lease.id for e in of(events, "revoked") if e.lease} == {
        *(k.lease_id for k in kids),
        grandkid.lease_id,
    }
    broker.verify(top.token, audience=AUDIENCE)


def test_revoke_records_the_actor(clock: FakeClock) -> None:
    events: list[AuditEvent] = []
    broker = make_broker(clock, events)
    broker.revoke(issue(broker), reason="incident-7", by="oncall@example.com")
    broker.revoke(issue(broker))
    first, second = of(events, "revoked")
    assert (first.actor, first.reason) == ("oncall@example.com", "incident-7")
    assert (second.actor, second.reason) == (None, "revoked")
    assert "actor" not in second.to_dict()
    with pytest.raises(InvalidRequest):
        broker.revoke(issue(broker), by="")


# -- sinks ----------------------------------------------------------------------------------
def test_json_lines_sink_writes_one_object_per_line(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "audit" / "events.jsonl"
    path.parent.mkdir()
    old_umask = os.umask(0)  # the file's mode must not depend on the umask
    try:
        sink = JsonLinesSink(path)
    finally:
        os.umask(old_umask)
    with sink:
        events: list[AuditEvent] = []
        broker = audited_broker(clock, KeyRing.generate("EdDSA"), sink, events.append)
        session(broker, clock)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(events)
    decoded = [json.loads(line) for line in lines]
    assert all(isinstance(item, dict) for item in decoded)
    assert decoded == [json.loads(json.dumps(e.to_dict())) for e in events]
    # A second sink on the same file appends.
    with JsonLinesSink(path) as again:
        again(events[0])
    assert len(path.read_text(encoding="utf-8").splitlines()) == len(events) + 1


def test_json_lines_from_threads_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonLinesSink(path)
    lease = Lease(
        id="a" * 32,
        subject=SUBJECT,
        audience=AUDIENCE,
        scopes=tuple(SCOPES),
        issued_at=0.0,
        expires_at=60.0,
        max_expires_at=60.0,
        purpose="x" * 1000,  # long lines: a torn write would show
    )
    threads, per_thread = 8, 250
    barrier = threading.Barrier(threads)

    def write(i: int) -> None:
        barrier.wait()
        for n in range(per_thread):
            sink(AuditEvent(EventType.ISSUED, float(n), lease, reason=f"thread-{i}", count=n))

    workers = [threading.Thread(target=write, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    sink.close()
    sink.close()  # idempotent
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    decoded = [json.loads(line) for line in lines[:-1]]
    assert len(decoded) == threads * per_thread
    for i in range(threads):
        mine = [d["count"] for d in decoded if d["reason"] == f"thread-{i}"]
        assert mine == list(range(per_thread))  # whole, and in order per thread


def test_a_failing_sink_never_breaks_issue(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: AuditEvent) -> None:
        raise OSError("disk full")

    events: list[AuditEvent] = []
    broker = Broker(issuer=TEST_ISSUER, clock=clock, audit=[broken, events.append, broken])
    with caplog.at_level(logging.ERROR, logger="jitbroker.audit"):
        cred = issue(broker)
        broker.verify(cred.token, audience=AUDIENCE)
        broker.revoke(cred)
    assert [str(e.action) for e in events] == ["issued", "revoked"]
    assert broker._core.audit.sink_failures == 4
    assert broker.report().churn["audit sink failures (this broker)"] == 4
    failures = [r for r in caplog.records if r.name == "jitbroker.audit" and r.exc_info]
    assert len(failures) == 4
    assert "failed on a issued event" in failures[0].getMessage()


def test_the_auditor_counts_and_checks_its_sinks() -> None:
    calls: list[str] = []

    def flaky(event: AuditEvent) -> None:
        calls.append(str(event.action))
        if event.action == EventType.DENIED:
            raise ValueError("no")

    auditor = Auditor([flaky])
    auditor.emit(EventType.ISSUED, 1.0)
    auditor.emit(EventType.DENIED, 2.0, reasons=("r",))
    auditor.emit(EventType.DENIED, 3.0, reasons=("r",))
    assert calls == ["issued", "denied", "denied"]
    assert auditor.sink_failures == 2
    assert auditor.counts["denied"] == 2
    assert auditor.counts[EventType.ISSUED] == 1
    with pytest.raises(InvalidRequest):
        Auditor(["not a sink"])  # type: ignore[list-item]


def test_the_audit_logger_gets_each_event(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    broker = make_broker(clock)
    with caplog.at_level(logging.INFO, logger="jitbroker.audit"):
        cred = issue(broker)
        broker.revoke(cred, by="alice")
    records = [r for r in caplog.records if r.name == "jitbroker.audit"]
    assert [r.levelno for r in records] == [logging.INFO, logging.INFO]
    data = [getattr(r, "jitbroker") for r in records]  # noqa: B009 - set through extra=
    assert [d["action"] for d in data] == ["issued", "revoked"]
    assert data[1]["actor"] == "alice"
    assert data[1]["lease"]["id"] == cred.lease_id
    assert cred.lease_id in records[0].getMessage()


# -- no secret anywhere ---------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["EdDSA", "HS256"])
def test_no_secret_in_events_files_or_logs(
    algorithm: str, tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    keys = KeyRing.generate(algorithm)
    secrets = Secrets(keys)  # the first key's material (session rotates it out)
    events: list[AuditEvent] = []
    path = tmp_path / "events.jsonl"
    caplog.set_level(logging.DEBUG)
    with JsonLinesSink(path) as sink:
        failing = Hook(clock, failing=True)
        broker = audited_broker(clock, keys, sink, events.append, on_revoke=failing)
        seen = session(broker, clock)
    for key in seen["keys"]:  # and the keys rotated in
        secrets.values += key_secrets(key)
    secrets.values += seen["passwords"]  # the backend's, handed out or orphaned
    for cred in seen["creds"]:
        secrets.add(cred)
    for token in seen["bad"]:
        secrets.add_token(token)
    assert {event.action for event in events} == SESSION_EVENTS
    for i, event in enumerate(events):
        secrets.check_object(f"event {i} ({event.action})", event)
        secrets.check(f"event {i} to_dict", repr(event.to_dict()))
        secrets.check(f"event {i} json", json.dumps(event.to_dict()))
    secrets.check("the JSON lines file", path.read_text(encoding="utf-8"))
    assert caplog.records
    for i, record in enumerate(caplog.records):
        secrets.check(f"log record {i} message", record.getMessage())
        secrets.check(f"log record {i} attributes", repr(vars(record)))
    secrets.check("formatted log output", caplog.text)
    report = broker.report()
    secrets.check("report", str(report))
    secrets.check("report dict", json.dumps(report.to_dict()))
    for failed in broker.failed_hooks():
        secrets.check_object("failed hook", failed)


# -- no hook call is lost: interrupted runs, parked work, the store holds it all --------
class Gated:
    """An async hook that starts, then waits for ``gate``; records who finished."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.finished: list[str] = []
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def __call__(self, lease: Lease) -> None:
        self.started.append(lease.id)
        self.entered.set()
        await self.gate.wait()
        self.finished.append(lease.id)


def test_a_cancelled_async_run_hands_back_the_calls_it_did_not_reach(clock: FakeClock) -> None:
    hook = Gated()

    async def main() -> None:
        broker = AsyncBroker(issuer=TEST_ISSUER, clock=clock, on_revoke=hook, hook_backoff=10)
        creds = [await broker.issue(SUBJECT, AUDIENCE, SCOPES, task="t") for _ in range(3)]
        ids = [cred.lease_id for cred in creds]
        revoking = asyncio.create_task(broker.revoke_where(task="t"))
        await hook.entered.wait()  # the first on_revoke is under way
        revoking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await revoking
        assert await broker.leases() == []  # the revocations stand
        # The interrupted call is a failed attempt, due after the backoff; the two
        # not reached are handed back unclaimed, due now.
        (first,) = hook.started
        rest = [i for i in ids if i != first]
        assert sorted(waiting(broker)) == sorted(
            [("on_revoke", first, 1)] + [("on_revoke", i, 0) for i in rest]
        )
        now = clock()
        jobs = retries(broker)
        assert {job.lease.id: job.due for job in jobs} == {
            first: now + 10,
            **dict.fromkeys(rest, now),
        }
        assert [job.claim for job in jobs] == [None, None, None]
        hook.gate.set()
        await broker.sweep()
        assert sorted(hook.finished) == sorted(rest)
        assert waiting(broker) == [("on_revoke", first, 1)]
        (job,) = retries(broker)
        assert job.error.startswith("CancelledError")
        clock.advance(10)
        await broker.sweep()
        assert sorted(hook.finished) == sorted(ids)
        assert waiting(broker) == []
        assert await broker.failed_hooks() == []

    asyncio.run(main())


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit, asyncio.CancelledError])
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_hook_raising_a_base_exception_is_recorded_then_raised(
    clock: FakeClock, error: type[BaseException], kind: str
) -> None:
    after = Hook(clock)

    def sync_hook(lease: Lease) -> None:
        raise error("stop")

    async def async_hook(lease: Lease) -> None:
        raise error("stop")

    bad = sync_hook if kind == "sync" else async_hook
    events: list[AuditEvent] = []
    broker = make_broker(clock, events, on_revoke=[bad, after], hook_retries=0)
    cred = issue(broker)
    with pytest.raises(error):
        broker.revoke(cred)
    assert broker.lease(cred).revoked_at is not None  # the revocation stands
    # The raising call is a failed attempt (parked: no retries); the next one waits.
    (failed,) = broker.failed_hooks()
    assert (failed.attempts, failed.error) == (1, f"{error.__name__}: stop")
    assert [e.error for e in of(events, "hook_parked")] == [error.__name__]
    assert waiting(broker) == [("on_revoke", cred.lease_id, 0)]
    (handed_back,) = retries(broker)
    assert (handed_back.name, handed_back.due, handed_back.claim) == (HOOK, clock(), None)
    broker.sweep()
    assert after.ids == [cred.lease_id]
    assert waiting(broker) == []


def test_a_base_exception_on_an_async_broker_hands_back_the_rest(clock: FakeClock) -> None:
    after = Hook(clock)

    def bad(lease: Lease) -> None:
        raise KeyboardInterrupt

    async def main() -> None:
        broker = AsyncBroker(
            issuer=TEST_ISSUER, clock=clock, on_revoke=[bad, after], hook_backoff=5
        )
        cred = await broker.issue(SUBJECT, AUDIENCE, SCOPES)
        with pytest.raises(KeyboardInterrupt):
            await broker.revoke(cred)
        assert waiting(broker) == [
            ("on_revoke", cred.lease_id, 0),  # not reached: first in line, due now
            ("on_revoke", cred.lease_id, 1),  # failed once: due after the backoff
        ]
        await broker.sweep()
        assert after.ids == [cred.lease_id]
        assert waiting(broker) == [("on_revoke", cred.lease_id, 1)]

    asyncio.run(main())


def test_stopping_the_async_reaper_lets_its_sweep_finish(tmp_path: Path, clock: FakeClock) -> None:
    hook = Gated()
    path = tmp_path / "leases.db"

    async def main() -> None:
        broker = AsyncBroker(
            issuer=TEST_ISSUER,
            clock=clock,
            store=SQLiteStore(path),
            on_expire=hook,
            reap_interval=0.001,
        )
        ids = [(await broker.issue(SUBJECT, AUDIENCE, SCOPES, ttl=1)).lease_id for _ in range(3)]
        clock.advance(1)
        await broker.start()
        await hook.entered.wait()  # the reaper claimed them and runs on_expire
        stopping = asyncio.create_task(broker.stop())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not stopping.done()  # stop waits for the sweep under way
        hook.gate.set()
        await stopping
        assert sorted(hook.finished) == sorted(ids)
        assert waiting(broker) == []
        assert await broker.failed_hooks() == []
        # Each fired exactly once: no broker sharing the store fires them again.
        other = AsyncBroker(issuer=TEST_ISSUER, clock=clock, store=SQLiteStore(path))
        assert await other.sweep() == []
        await other.close()
        await broker.close()

    asyncio.run(main())


@pytest.mark.parametrize("yields", [1, 5])  # stop cancelled before or after the reaper stops
def test_cancelling_stop_cuts_the_sweep_short_and_keeps_the_calls(
    clock: FakeClock, yields: int
) -> None:
    hook = Gated()

    async def main() -> None:
        broker = AsyncBroker(
            issuer=TEST_ISSUER, clock=clock, on_expire=hook, reap_interval=0.001, hook_backoff=10
        )
        ids = [(await broker.issue(SUBJECT, AUDIENCE, SCOPES, ttl=1)).lease_id for _ in range(3)]
        clock.advance(1)
        await broker.start()
        await hook.entered.wait()
        stopping = asyncio.create_task(broker.stop())
        for _ in range(yields):
            await asyncio.sleep(0)
        assert not stopping.done()
        reaper = broker._reaper
        assert reaper is not None
        stopping.cancel()  # a second cancel: the caller will not wait
        with pytest.raises(asyncio.CancelledError):
            await stopping
        # Nor does stop: the reaper records what its sweep did on its own time.
        await asyncio.wait([reaper])
        (first,) = hook.started
        assert sorted(waiting(broker)) == sorted(
            [("on_expire", i, 1 if i == first else 0) for i in ids]
        )
        hook.gate.set()
        await broker.sweep()
        clock.advance(10)
        await broker.sweep()
        assert sorted(hook.finished) == sorted(ids)
        assert waiting(broker) == []
        await broker.close()

    asyncio.run(main())


def test_the_async_reaper_outlives_a_hook_raising_cancelled_error(clock: FakeClock) -> None:
    attempts: list[float] = []
    retried = asyncio.Event()
    failed_once = asyncio.Event()

    async def on_expire(lease: Lease) -> None:
        attempts.append(clock())
        if len(attempts) == 1:
            failed_once.set()
            raise asyncio.CancelledError
        retried.set()

    async def main() -> None:
        broker = AsyncBroker(
            issuer=TEST_ISSUER, clock=clock, on_expire=on_expire, reap_interval=0.001
        )
        await broker.issue(SUBJECT, AUDIENCE, SCOPES, ttl=1)
        clock.advance(1)
        async with broker:
            await asyncio.wait_for(failed_once.wait(), 10)
            clock.advance(1)  # the backoff
            await asyncio.wait_for(retried.wait(), 10)
        assert broker._reaper is None
        assert waiting(broker) == []
        assert await broker.failed_hooks() == []

    asyncio.run(main())
    assert len(attempts) == 2


def test_parked_work_is_never_dropped(clock: FakeClock) -> None:
    events: list[AuditEvent] = []
    hook = Hook(clock, failing=True)
    broker = make_broker(clock, events, on_issue=hook, hook_retries=0)
    ids = []
    for _ in range(3):
        ids.append(issue(broker).lease_id)
        clock.advance(1)  # parked one after another: the list is oldest first
    for _ in range(3):  # sweeps and time leave parked work alone, and keep it
        clock.advance(100_000)
        broker.sweep()
    parked = broker.failed_hooks()
    assert [f.id for f in parked] == [job_id(i, "on_issue", HOOK) for i in ids]
    assert len(hook.calls) == 3
    report = broker.report()
    assert report.failed_hooks == tuple(parked)
    assert not [name for name in report.churn if "dropped" in name]  # nothing is dropped
    # Forgetting means the side effect never happens: only by force.
    with pytest.raises(InvalidRequest, match="force=True"):
        broker.forget_failed_hook(parked[0])
    with pytest.raises(InvalidRequest, match="force=True"):
        broker.forget_failed_hook(parked[0], force="yes")  # type: ignore[arg-type]
    assert broker.failed_hooks() == parked
    assert of(events, "hook_forgotten") == []
    # By FailedHook or by id; each one audited, with who did it.
    assert broker.forget_failed_hook(parked[0], parked[1].id, force=True, by="ops") == 2
    assert broker.failed_hooks() == [parked[2]]
    forgotten = of(events, "hook_forgotten")
    assert sorted((e.where, e.actor, e.error) for e in forgotten) == sorted(
        (f.id, "ops", "RuntimeError: the cleanup service is down") for f in parked[:2]
    )
    assert sorted(e.lease.id for e in forgotten if e.lease) == sorted(ids[:2])
    assert broker.forget_failed_hook(parked[0], force=True) == 0  # gone: nothing audited
    assert len(of(events, "hook_forgotten")) == 2
    # The last one: retried, still failing, parked again (not dropped); then fixed.
    assert broker.retry_failed_hooks() == 1
    (again,) = broker.failed_hooks()
    assert (again.id, again.attempts) == (parked[2].id, 2)
    hook.failing = False
    assert broker.retry_failed_hooks() == 0
    assert broker.failed_hooks() == []
    assert broker.store.jobs() == []


def test_the_hook_defaults(clock: FakeClock) -> None:
    from jitbroker.hooks import MAX_BACKOFF

    hooks = Hooks()
    assert (hooks.retries, hooks.backoff, hooks.timeout) == (5, 1.0, 60.0)
    assert [hooks.delay(n) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]
    assert hooks.delay(10_000) == MAX_BACKOFF == 3600.0
    assert make_broker(clock, hook_timeout=5)._core.hooks.timeout == 5.0


def test_every_failure_waits_in_the_store_for_its_retry(clock: FakeClock) -> None:
    # No queue in memory to fill: however many fail, each waits for its retry.
    events: list[AuditEvent] = []
    hook = Hook(clock, failing=True)
    broker = make_broker(clock, events, on_revoke=hook, hook_retries=5)
    creds = [issue(broker) for _ in range(50)]
    for cred in creds:
        broker.revoke(cred)
    assert sorted(waiting(broker)) == sorted(("on_revoke", c.lease_id, 1) for c in creds)
    assert broker.failed_hooks() == []
    assert len(of(events, "hook_failed")) == 50
    assert of(events, "hook_parked") == []


def test_many_retries_never_overflow_the_backoff(clock: FakeClock) -> None:
    hook = Hook(clock, failing=True)
    broker = make_broker(clock, on_revoke=hook, hook_retries=2000, hook_backoff=0.001)
    cred = issue(broker)
    broker.revoke(cred)
    for _ in range(1100):  # past 2**1024, where float(backoff * 2**n) overflowed
        clock.advance(3600)
        broker.sweep()
    assert len(hook.calls) == 1101
    (job,) = retries(broker)
    assert job.attempts == 1101
    assert job.due == clock() + 3600
    assert broker.failed_hooks() == []


def test_an_async_hook_never_blocks_a_running_loop(clock: FakeClock) -> None:
    ran: list[str] = []

    async def on_revoke(lease: Lease) -> None:
        ran.append(lease.id)

    broker = make_broker(clock, on_revoke=on_revoke, hook_retries=0)
    cred = issue(broker)

    async def app() -> None:
        assert broker.revoke(cred) is True  # returns at once: the hook is not run

    asyncio.run(app())  # filterwarnings=error: no "coroutine was never awaited"
    assert ran == []
    (failed,) = broker.failed_hooks()
    assert failed.error.startswith("RuntimeError: async hook not run")
    assert "AsyncBroker" in failed.error
    broker.retry_failed_hooks()  # from a thread with no running loop: it runs
    assert ran == [cred.lease_id]
    assert broker.failed_hooks() == []


class NoJobs(MemoryStore):
    """A store whose outbox must not be touched."""

    def claim_jobs(self, *args: Any, **kwargs: Any) -> list[Job]:
        raise AssertionError("claim_jobs called")

    def finish_jobs(self, *args: Any, **kwargs: Any) -> int:
        raise AssertionError("finish_jobs called")

    def fail_job(self, *args: Any, **kwargs: Any) -> bool:
        raise AssertionError("fail_job called")

    def get_job(self, *args: Any, **kwargs: Any) -> Job | None:
        raise AssertionError("get_job called")

    def jobs(self, *args: Any, **kwargs: Any) -> list[Job]:
        raise AssertionError("jobs called")


def test_a_broker_without_hooks_never_touches_the_outbox(clock: FakeClock) -> None:
    broker = make_broker(clock, store=NoJobs())
    cred = issue(broker, ttl=5)
    broker.attenuate(cred, scopes=["orders:read"])
    broker.revoke(issue(broker))
    assert broker.revoke_where(owner=ALICE) == 2
    short = issue(broker, ttl=5)
    clock.advance(5)
    assert [lease.id for lease in broker.sweep()] == [short.lease_id]
    runner = broker._core.outbox
    assert run(runner.run([], SYNC), None) == 0  # nothing to run: not even a store
    assert run(runner.sweep(SYNC), None) == 0


def test_a_hook_that_takes_idempotency_key_sees_the_same_key_on_each_retry(
    clock: FakeClock,
) -> None:
    calls: list[tuple[str, str]] = []

    def drop_role(lease: Lease, *, idempotency_key: str) -> None:
        calls.append((lease.id, idempotency_key))
        if len(calls) < 3:
            raise RuntimeError("the role is busy")

    plain = Hook(clock)
    broker = make_broker(clock, on_revoke={"drop-role": drop_role, "notify": plain}, hook_retries=1)
    cred = issue(broker)
    broker.revoke(cred)
    clock.advance(1)
    broker.sweep()  # the retry fails too: parked
    key = f"{cred.lease_id}/on_revoke/drop-role"
    (parked,) = broker.failed_hooks()
    assert (parked.id, parked.hook, parked.attempts) == (key, "drop-role", 2)
    assert broker.retry_failed_hooks() == 0
    assert calls == [(cred.lease_id, key)] * 3
    assert plain.ids == [cred.lease_id]  # a hook without the keyword gets the lease alone
    assert broker.store.jobs() == []


def test_a_hook_slower_than_hook_timeout_runs_again_elsewhere_with_the_same_key(
    clock: FakeClock,
) -> None:
    store = MemoryStore()
    keys: list[str] = []
    brokers: list[Broker] = []

    def slow(lease: Lease, idempotency_key: str) -> None:
        keys.append(idempotency_key)
        if len(keys) == 1:  # the first call outlives its claim; meanwhile the
            clock.advance(31)  # other broker takes the job and runs it
            brokers[1].sweep()

    for _ in range(2):
        brokers.append(make_broker(clock, store=store, on_revoke={"slow": slow}, hook_timeout=30))
    cred = issue(brokers[0])
    assert brokers[0].revoke(cred) is True
    assert keys == [job_id(cred.lease_id, "on_revoke", "slow")] * 2  # idempotent: one key
    assert store.jobs() == []  # done once by each; finished by the one holding it


def test_a_failed_hook_survives_its_broker(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "leases.db"
    down = Hook(clock, failing=True)
    first = make_broker(
        clock,
        store=SQLiteStore(path),
        on_revoke={"drop-role": down},
        hook_retries=1,
        hook_backoff=10,
    )
    gone, later_cred = issue(first), issue(first)
    first.revoke(gone)
    clock.advance(10)
    first.sweep()  # its retry fails too: parked
    first.revoke(later_cred)  # its first failure: retried in 10 s
    first.close()
    # Another process, with a hook of the same name: it lists the parked job and
    # runs the retry when it is due, with the same idempotency key.
    keys: list[str] = []

    def drop_role(lease: Lease, idempotency_key: str) -> None:
        keys.append(idempotency_key)

    later = make_broker(
        clock, store=SQLiteStore(path), on_revoke={"drop-role": drop_role}, hook_retries=1
    )
    stranger = make_broker(clock, store=SQLiteStore(path), on_revoke={"notify": Hook(clock)})
    (parked,) = later.failed_hooks()
    assert (parked.lease.id, parked.hook, parked.attempts) == (gone.lease_id, "drop-role", 2)
    assert parked.error == "RuntimeError: the cleanup service is down"
    later.sweep()
    assert keys == []  # the backoff holds across processes
    clock.advance(10)
    stranger.sweep()  # a broker without a hook of that name leaves the job alone
    assert waiting(later) == [("on_revoke", later_cred.lease_id, 1)]
    later.sweep()
    assert keys == [job_id(later_cred.lease_id, "on_revoke", "drop-role")]
    assert later.retry_failed_hooks() == 0
    assert keys[-1] == parked.id
    assert later.failed_hooks() == []
    assert later.store.jobs() == []
    assert down.ids == [gone.lease_id, gone.lease_id, later_cred.lease_id]
    later.close()
    stranger.close()


def test_a_hook_error_whose_message_cannot_be_read_is_still_recorded(clock: FakeClock) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise ValueError("broken __str__")

    def hook(lease: Lease) -> None:
        raise Unprintable

    broker = make_broker(clock, on_revoke=hook, hook_retries=0)
    cred = issue(broker)
    assert broker.revoke(cred) is True  # no ValueError escapes: the revoke stands
    [failed] = broker.failed_hooks()
    assert failed.error == "Unprintable: <the error's message could not be read>"


def test_a_standalone_verifier_audits_rejected_tokens(clock: FakeClock) -> None:
    """Services that only verify get verify_failed events too: the error class
    and the lease id, never the token."""
    from jitbroker import Verifier

    store = MemoryStore()
    broker = make_broker(clock, store=store)
    events: list[AuditEvent] = []
    verifier = Verifier(
        broker.keys.public(), issuer=TEST_ISSUER, store=store, clock=clock, audit=[events.append]
    )
    cred = issue(broker)
    verifier.verify(cred.token, audience=AUDIENCE)
    assert events == []  # nothing to report on success
    broker.revoke(cred)
    with pytest.raises(TokenRevoked):
        verifier.verify(cred.token, audience=AUDIENCE)
    issue_again = issue(broker)
    with pytest.raises(WrongAudience):
        verifier.verify(issue_again.token, audience="db:payments")
    assert [(e.action, e.error) for e in events] == [
        ("verify_failed", "TokenRevoked"),
        ("verify_failed", "WrongAudience"),
    ]
    assert events[0].where == f"lease_id={cred.lease_id!r}"
    for event in events:
        assert cred.token not in repr(event.to_dict())
        assert issue_again.token not in repr(event.to_dict())
