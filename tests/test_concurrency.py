"""Threads against one ``Broker`` on one ``MemoryStore``.

Revocation is immediately visible to every thread, expiry is handed out
exactly once however many sweepers race, a child never outlives a parent
revoked concurrently, and the background reaper works without a manual sweep.
Time comes from a ``FakeClock``; waits are short polls bounded at ~2 s.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from jitbroker import (
    AuditEvent,
    Broker,
    Credential,
    KeyRing,
    Lease,
    LeaseFilter,
    MemoryStore,
    Verifier,
)
from jitbroker.errors import LeaseNotActive, LeaseNotFound, TokenExpired, TokenRevoked
from jitbroker.keys import generate_key
from jitbroker.testing import TEST_ISSUER, FakeClock

THREADS = 8
ITERATIONS = 200
AUDIENCE = "api"
SCOPES = ["read", "write"]
LEEWAY = 5
POLL = 0.01
POLL_LIMIT = 2.0


def make_broker(clock: FakeClock, **options: Any) -> Broker:
    return Broker(
        issuer=TEST_ISSUER,
        keys=KeyRing.generate("EdDSA"),
        store=MemoryStore(),
        clock=clock,
        **options,
    )


def run_threads(target: Callable[[int], None], count: int = THREADS) -> None:
    """Run ``target(i)`` in ``count`` threads started together; re-raise the first error."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait()
            target(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive(), "a worker thread hung"
    if errors:
        raise errors[0]


def poll(done: Callable[[], bool]) -> None:
    """Wait with short real sleeps until ``done()``; fail after ~2 s."""
    deadline = time.monotonic() + POLL_LIMIT
    while not done():
        assert time.monotonic() < deadline, "timed out waiting for the reaper"
        time.sleep(POLL)


def expired_ids(events: list[AuditEvent]) -> list[str]:
    return [e.lease.id for e in events if e.action == "expired" and e.lease is not None]


def reaper_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "jitbroker-reaper"]


# -- revocation is visible at once, to every thread -------------------------
def test_revoked_tokens_never_verify_again() -> None:
    broker = make_broker(FakeClock())
    revoked: list[Credential] = []
    revoked_lock = threading.Lock()
    checked = [0] * THREADS

    def worker(i: int) -> None:
        rng = random.Random(i)
        for n in range(ITERATIONS):
            cred = broker.issue(f"svc:worker-{i}", AUDIENCE, SCOPES, ttl=300, task=f"t{i}-{n}")
            claims = broker.verify(cred.token, audience=AUDIENCE, scopes=["read"])
            assert claims.lease_id == cred.lease_id
            assert broker.revoke(cred, reason=f"done-{i}") is True
            # The revoking thread itself, right after revoke returned.
            with pytest.raises(TokenRevoked):
                broker.verify(cred.token, audience=AUDIENCE)
            with revoked_lock:
                revoked.append(cred)
                sample = rng.sample(revoked, min(3, len(revoked)))
            # Other threads' revocations, recorded only after their revoke returned.
            for old in sample:
                with pytest.raises(TokenRevoked):
                    broker.verify(old.token, audience=AUDIENCE)
                checked[i] += 1

    run_threads(worker)
    assert len(revoked) == THREADS * ITERATIONS
    assert len({cred.lease_id for cred in revoked}) == THREADS * ITERATIONS
    assert sum(checked) >= THREADS * ITERATIONS
    assert list(broker.leases()) == []
    for cred in random.Random(0).sample(revoked, 50):
        with pytest.raises(TokenRevoked):
            broker.verify(cred.token, audience=AUDIENCE)


def test_concurrent_revokes_of_one_lease_transition_once() -> None:
    broker = make_broker(FakeClock())
    creds = [broker.issue("svc:a", AUDIENCE, SCOPES, ttl=300) for _ in range(50)]
    wins: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        for cred in creds:
            ref: Credential | str = (cred, cred.lease_id, cred.token)[i % 3]
            if broker.revoke(ref, reason=f"r{i}"):
                with lock:
                    wins.append(cred.lease_id)

    run_threads(worker)
    assert sorted(wins) == sorted(cred.lease_id for cred in creds)


def test_verify_races_revoke_without_unexpected_errors() -> None:
    # Verifiers hammer tokens that other threads revoke: each verify either
    # passes (before the revoke) or raises TokenRevoked, nothing else.
    broker = make_broker(FakeClock())
    creds = [broker.issue("svc:a", AUDIENCE, SCOPES, ttl=300) for _ in range(200)]
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        rng = random.Random(i)
        mine = creds[i::THREADS] if i % 2 else []
        for cred in mine:
            broker.revoke(cred)
        for _ in range(ITERATIONS):
            cred = rng.choice(creds)
            try:
                broker.verify(cred.token, audience=AUDIENCE)
                outcome = "ok"
            except TokenRevoked:
                outcome = "revoked"
            with lock:
                outcomes.append(outcome)

    run_threads(worker)
    assert set(outcomes) <= {"ok", "revoked"}
    assert len(outcomes) == THREADS * ITERATIONS


def test_key_swaps_never_hide_a_key_still_held() -> None:
    """Copy-on-write key ring: threads verify tokens of the old and the active
    key while another thread rotates, prunes and retires other keys. Every
    verification passes (no UnknownKey, no KeyError) and both keys survive."""
    clock = FakeClock()
    ring = KeyRing.generate("EdDSA")
    broker = Broker(issuer=TEST_ISSUER, keys=ring, store=MemoryStore(), clock=clock)
    old = broker.issue("svc:a", AUDIENCE, SCOPES, ttl=300)
    ring.rotate()  # no grace: the old key verifies until retired
    active = broker.issue("svc:a", AUDIENCE, SCOPES, ttl=300)
    held = {old.lease.key_id, active.lease.key_id}
    tokens = [old.token, active.token]
    verifiers = [  # uncached: every call looks the key up; cached: every hit checks the kid
        Verifier(
            ring, issuer=TEST_ISSUER, audience=AUDIENCE, offline=True, clock=clock, cache_size=size
        )
        for size in (0, 4096)
    ]
    finished: list[int] = []
    rounds = 0

    def churn() -> None:
        nonlocal rounds
        ring.rotate()  # the active key is demoted while its tokens are verified
        while len(finished) < THREADS - 1 or rounds < 30:
            rounds += 1
            ring.rotate(grace=0, now=float(rounds))  # schedules the last churn key
            assert ring.prune(float(rounds)) != []
            previous = ring.active.kid
            ring.rotate()
            ring.retire(previous)
            extra = generate_key("EdDSA")
            ring.add(extra)
            ring.retire(extra.kid)

    def verify(i: int) -> None:
        try:
            for n in range(ITERATIONS):
                claims = verifiers[n % 2].verify(tokens[(n + i) % 2], scopes=SCOPES)
                assert claims.key_id in held
        finally:
            finished.append(i)

    run_threads(lambda i: churn() if i == 0 else verify(i))
    assert rounds >= 30
    assert held <= {key.kid for key in ring}
    assert len(ring) == 3  # the two held keys and the last churn signer


def test_revocation_is_visible_to_brokers_sharing_the_store() -> None:
    # Invariant 3 across brokers: once revoke returns on one, no other verifies.
    clock = FakeClock()
    keys = KeyRing.generate("EdDSA")
    store = MemoryStore()
    brokers = [
        Broker(issuer=TEST_ISSUER, keys=keys, store=store, clock=clock) for _ in range(THREADS)
    ]
    revoked: list[Credential] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        rng = random.Random(i)
        mine = brokers[i]
        for _ in range(ITERATIONS // 2):
            cred = mine.issue(f"svc:{i}", AUDIENCE, SCOPES, ttl=300)
            other = brokers[rng.randrange(THREADS)]
            assert other.verify(cred.token, audience=AUDIENCE).lease_id == cred.lease_id
            assert mine.revoke(cred) is True
            with lock:
                revoked.append(cred)
                sample = rng.sample(revoked, min(3, len(revoked)))
            for old in sample:
                with pytest.raises(TokenRevoked):
                    brokers[rng.randrange(THREADS)].verify(old.token, audience=AUDIENCE)

    run_threads(worker)
    assert len(revoked) == THREADS * (ITERATIONS // 2)


# -- expiry is handed out exactly once --------------------------------------
@pytest.mark.parametrize("past", [1, LEEWAY + 1], ids=["expired", "purgeable"])
def test_concurrent_sweeps_expire_each_lease_once(past: float) -> None:
    clock = FakeClock()
    events: list[AuditEvent] = []
    broker = make_broker(clock, audit=[events.append])
    leases = [broker.issue("svc:a", AUDIENCE, SCOPES, ttl=60).lease for _ in range(500)]
    survivor = broker.issue("svc:a", AUDIENCE, SCOPES, ttl=3000)
    clock.advance(60 + past)
    results: list[list[Lease]] = [[] for _ in range(THREADS)]

    def worker(i: int) -> None:
        for _ in range(5):
            results[i].extend(broker.sweep())

    run_threads(worker)
    swept = [lease.id for result in results for lease in result]
    assert len(swept) == len(set(swept))
    assert set(swept) == {lease.id for lease in leases}
    assert sorted(expired_ids(events)) == sorted(swept)
    assert broker.sweep() == []
    assert broker.verify(survivor.token, audience=AUDIENCE)


def test_brokers_sharing_a_store_expire_each_lease_once() -> None:
    # Invariant 5: several brokers on one store; the issuing broker is gone.
    clock = FakeClock()
    store = MemoryStore()
    keys = KeyRing.generate("EdDSA")
    events: list[AuditEvent] = []
    issuer = Broker(issuer=TEST_ISSUER, keys=keys, store=store, clock=clock)
    leases = [issuer.issue("svc:a", AUDIENCE, SCOPES, ttl=60).lease for _ in range(300)]
    issuer.close()
    clock.advance(61)
    sweepers = [
        Broker(issuer=TEST_ISSUER, keys=keys, store=store, clock=clock, audit=[events.append])
        for _ in range(4)
    ]

    def worker(i: int) -> None:
        for _ in range(3):
            sweepers[i % len(sweepers)].sweep()

    run_threads(worker)
    assert sorted(expired_ids(events)) == sorted(lease.id for lease in leases)


def test_sweeps_race_issue_and_renew() -> None:
    # Sweepers run while other threads issue, renew and move the clock: each
    # lease expires exactly once, and never before its (renewed) expiry.
    clock = FakeClock()
    events: list[AuditEvent] = []
    broker = make_broker(clock, audit=[events.append])
    stop = threading.Event()
    errors: list[BaseException] = []

    def sweeper() -> None:
        try:
            while not stop.is_set():
                for lease in broker.sweep():
                    # The claimed lease is the latest version: a renewal moved its expiry.
                    assert lease.expires_at <= clock()
                    assert lease.revoked_at is None
                time.sleep(0)  # let the issuers run
        except BaseException as exc:
            errors.append(exc)

    issued: list[str] = []
    revoked: list[str] = []

    def issuer(i: int) -> None:
        for n in range(ITERATIONS):
            cred = broker.issue(f"svc:{i}", AUDIENCE, SCOPES, ttl=10)
            issued.append(cred.lease_id)
            # A starved thread: its lease expired first (or was even purged, on a
            # loaded machine where the other threads moved the clock far enough).
            with contextlib.suppress(LeaseNotActive, LeaseNotFound):
                broker.renew(cred, ttl=20)
            if n % 4 == 0 and broker.revoke(cred):
                revoked.append(cred.lease_id)
            clock.advance(0.05)

    sweepers = [threading.Thread(target=sweeper) for _ in range(3)]
    for thread in sweepers:
        thread.start()
    try:
        run_threads(issuer, count=4)
    finally:
        stop.set()
        for thread in sweepers:
            thread.join(timeout=30)
    assert errors == []
    clock.advance(3600)
    broker.sweep()
    expired = expired_ids(events)
    assert len(expired) == len(set(expired))
    assert len(issued) == 4 * ITERATIONS
    assert set(expired) == set(issued) - set(revoked)
    assert len(revoked) > 0
    # Each expiry carries the lease's last expiry time, and comes no earlier.
    expiry = {
        e.lease.id: e.lease.expires_at
        for e in events
        if e.action in ("issued", "renewed") and e.lease is not None
    }
    for event in events:
        if event.action == "expired" and event.lease is not None:
            assert event.lease.expires_at == expiry[event.lease.id]
            assert event.at >= expiry[event.lease.id]


# -- attenuation races revocation of the parent -----------------------------
def test_attenuate_racing_revoke_never_leaves_a_live_orphan() -> None:
    clock = FakeClock()
    broker = make_broker(clock)
    store = broker.store
    assert isinstance(store, MemoryStore)
    rounds = 40
    outcomes: dict[str, int] = {"attenuated": 0, "refused": 0}
    lock = threading.Lock()

    rng = random.Random(7)
    for _ in range(rounds):
        root = broker.issue("svc:a", AUDIENCE, SCOPES, ttl=300)
        children: list[Credential] = []
        delay = rng.uniform(0, 0.002)

        def worker(
            i: int,
            root: Credential = root,
            children: list[Credential] = children,
            delay: float = delay,
        ) -> None:
            if i == 0:
                time.sleep(delay)
                broker.revoke(root, reason="race")
                return
            for _ in range(10):
                try:
                    child = broker.attenuate(root, scopes=["read"])
                    grandchild = broker.attenuate(child, scopes=["read"])
                except LeaseNotActive:
                    with lock:
                        outcomes["refused"] += 1
                    continue
                with lock:
                    outcomes["attenuated"] += 1
                    children.extend([child, grandchild])

        run_threads(worker)
        now = clock()
        stored_root = store.get(root.lease_id)
        assert stored_root is not None
        assert stored_root.revoke_reason == "race"
        descendants = store.find(LeaseFilter(parent=root.lease_id))
        descendants += [
            lease for child in descendants for lease in store.find(LeaseFilter(parent=child.id))
        ]
        assert {lease.id for lease in descendants} >= {c.lease_id for c in children}
        for lease in descendants:
            assert not lease.is_active(now), f"live child {lease.id} of a revoked parent"
            assert lease.revoke_reason == "race"
        for cred in children:
            with pytest.raises(TokenRevoked):
                broker.verify(cred.token, audience=AUDIENCE)
    assert outcomes["attenuated"] + outcomes["refused"] == rounds * (THREADS - 1) * 10


# -- the background reaper --------------------------------------------------
def test_reaper_thread_expires_without_a_manual_sweep() -> None:
    clock = FakeClock()
    events: list[AuditEvent] = []
    broker = make_broker(clock, reap_interval=POLL, audit=[events.append])
    store = broker.store
    assert isinstance(store, MemoryStore)

    def expired() -> list[str]:
        return expired_ids(events)

    creds = [broker.issue("svc:a", AUDIENCE, SCOPES, ttl=30) for _ in range(20)]
    keep = broker.issue("svc:a", AUDIENCE, SCOPES, ttl=300)
    assert reaper_threads() == []
    with broker as entered:
        assert entered is broker
        assert len(reaper_threads()) == 1
        clock.advance(31)
        poll(lambda: len(expired()) == len(creds))
        assert sorted(expired()) == sorted(c.lease_id for c in creds)
        with pytest.raises(TokenExpired):
            broker.verify(creds[0].token, audience=AUDIENCE)
        clock.advance(LEEWAY)
        poll(lambda: len(store) == 1)
        assert store.get(keep.lease_id) is not None
    assert reaper_threads() == []
    assert sorted(expired()) == sorted(c.lease_id for c in creds)  # exactly once


def test_reaper_start_stop_idempotent_and_restartable() -> None:
    clock = FakeClock()
    broker = make_broker(clock, reap_interval=POLL)
    broker.start()
    broker.start()
    assert len(reaper_threads()) == 1
    broker.stop()
    broker.stop()
    assert reaper_threads() == []
    cred = broker.issue("svc:a", AUDIENCE, SCOPES, ttl=30)
    clock.advance(30 + LEEWAY + 1)
    with broker:
        poll(lambda: broker.store.get(cred.lease_id) is None)
    assert reaper_threads() == []
    broker.close()
