"""A broker's side of the outbox: backend credentials that die with their
lease by every path, creates that a crash cannot orphan, revokes retried and
parked, and reconciliation.

The provider here is ``Backend``, a plain in-process provider implementing the
protocol (the shipped PostgreSQL and Redis providers are tested against real
servers in ``test_providers.py``); it records what it was asked and can be
told to fail.
"""

from __future__ import annotations

import asyncio
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jitbroker import AsyncBroker, Broker, KeyRing, Lease, LeaseStore, MemoryStore, Policy, Rule
from jitbroker.audit import AuditEvent, EventType
from jitbroker.errors import InvalidRequest, PolicyDenied, ProviderError, QuotaExceeded
from jitbroker.lease import Secret
from jitbroker.outbox import CREATE_INTERRUPTED, FLUSH_BATCH
from jitbroker.stores.base import LeaseFilter, Outbox, job_id
from jitbroker.stores.sqlite import SQLiteStore
from jitbroker.testing import FakeClock

ISSUER = "urn:test:outbox"


class Backend:
    """A provider whose principals live in a dict."""

    def __init__(self, name: str = "orders-db") -> None:
        self.name = name
        self.principals: dict[str, float] = {}  # lease id -> backend expiry
        self.revoked: list[str] = []
        self.down = False
        self.fail_create = False

    def check(self, lease: Lease) -> None:
        unknown = [s for s in lease.scopes if not s.startswith("orders:")]
        if unknown:
            raise InvalidRequest(f"scope {unknown[0]!r} maps to no role of {self.name}")

    def create(self, lease: Lease) -> Secret:
        if self.down or self.fail_create:
            raise ConnectionError("backend down: password=hunter2")
        self.principals[lease.id] = lease.expires_at
        return Secret({"user": f"jit_{lease.id}", "password": "s3cr3t-" + lease.id[:6]})

    def revoke(self, lease: Lease) -> None:
        if self.down:
            raise ConnectionError("backend down")
        self.principals.pop(lease.id, None)
        self.revoked.append(lease.id)

    def renew(self, lease: Lease) -> None:
        if self.down:
            raise ConnectionError("backend down")
        self.principals[lease.id] = lease.expires_at

    def managed(self) -> list[str]:
        if self.down:
            raise ConnectionError("backend down")
        return list(self.principals)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LeaseStore]:
    made: LeaseStore = (
        MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "l.db")
    )
    yield made
    made.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def broker_on(store: LeaseStore, clock: FakeClock, backend: Backend, **options: Any) -> Broker:
    options.setdefault("keys", KeyRing.generate())
    return Broker(issuer=ISSUER, store=store, clock=clock, providers=[backend], **options)


def test_a_lease_for_a_provider_carries_its_backend_credential(
    store: LeaseStore, clock: FakeClock
) -> None:
    backend = Backend()
    broker = broker_on(store, clock, backend)
    cred = broker.issue("svc:export", "orders-db", ["orders:read"], ttl=60)
    assert cred.lease.provider == "orders-db"
    assert cred.secret is not None
    password = cred.secret["password"]
    assert cred.secret["user"] == f"jit_{cred.lease_id}"
    assert backend.principals == {cred.lease_id: cred.expires_at}
    for shown in (repr(cred), str(cred), repr(cred.secret), str(cred.secret)):
        assert password not in shown
    with pytest.raises(TypeError):
        pickle.dumps(cred)
    assert store.jobs() == []  # the create job is done
    other = broker.issue("svc:export", "api", ["read"], ttl=60)
    assert (other.secret, other.lease.provider) == (None, None)


@pytest.mark.parametrize("path", ["revoke", "task", "expiry", "parent", "bulk", "key"])
def test_the_credential_dies_with_its_lease_by_every_path(
    store: LeaseStore, clock: FakeClock, path: str
) -> None:
    backend = Backend()
    broker = broker_on(store, clock, backend)
    if path == "task":
        with broker.task("export", subject="svc:x", audience="orders-db", ttl=60) as cred:
            assert backend.principals
    elif path == "parent":
        root = broker.issue("svc:x", "orders-*", ["orders:read"], ttl=60)
        cred = broker.attenuate(root, audience="orders-db")
        assert cred.secret is not None
        assert root.secret is None
        broker.revoke(root)
    else:
        cred = broker.issue("svc:x", "orders-db", ["orders:read"], ttl=60, owner="alice")
        if path == "revoke":
            broker.revoke(cred)
        elif path == "expiry":
            clock.advance(61)
            broker.sweep()
        elif path == "bulk":
            assert broker.revoke_where(owner="alice") == 1
        else:
            broker.rotate_keys()
            assert broker.retire_key(cred.lease.key_id or "") == 1
    assert backend.principals == {}
    assert backend.revoked == [cred.lease_id]
    assert store.jobs() == []


def test_a_scope_the_provider_cannot_grant_is_refused_before_anything_is_stored(
    store: LeaseStore, clock: FakeClock
) -> None:
    backend = Backend()
    broker = broker_on(store, clock, backend)
    with pytest.raises(InvalidRequest, match="maps to no role"):
        broker.issue("svc:x", "orders-db", ["billing:write"], ttl=60)
    assert list(broker.leases(include_inactive=True)) == []
    assert store.jobs() == []
    assert backend.principals == {}


def test_a_failed_create_revokes_the_lease_and_gives_no_token(
    store: LeaseStore, clock: FakeClock
) -> None:
    backend = Backend()
    backend.fail_create = True
    events: list[AuditEvent] = []
    broker = broker_on(store, clock, backend, audit=[events.append])
    with pytest.raises(ProviderError, match="could not create") as caught:
        broker.issue("svc:x", "orders-db", ["orders:read"], ttl=60)
    assert "hunter2" not in str(caught.value)
    assert caught.value.provider == "orders-db"
    [lease] = broker.leases(include_inactive=True)
    assert (lease.status(clock()), lease.revoke_reason) == ("revoked", "provider-failed")
    assert backend.revoked == [lease.id]  # whatever the create left is cleaned
    assert store.jobs() == []
    assert [e.action for e in events].count(EventType.ISSUED) == 0


def crashed_issue(store: LeaseStore, clock: FakeClock, backend: Backend) -> Lease:
    """What a broker that died inside ``provider.create`` leaves: the lease with
    its create job held by a claim nobody will finish, and maybe a principal."""
    lease = Lease(
        id="d" * 32,
        subject="svc:x",
        audience=backend.name,
        scopes=("orders:read",),
        issued_at=clock(),
        expires_at=clock() + 600,
        max_expires_at=clock() + 3600,
        key_id="gone",
        provider=backend.name,
    )
    outbox = Outbox(providers=frozenset({backend.name}), claim="dead.0", until=clock() + 60)
    assert store.add(lease, outbox=outbox)
    backend.principals[lease.id] = lease.expires_at  # it got as far as the backend
    return lease


def test_a_create_its_broker_never_finished_is_undone_after_the_deadline(
    store: LeaseStore, clock: FakeClock
) -> None:
    backend = Backend()
    lease = crashed_issue(store, clock, backend)
    survivor = broker_on(store, clock, backend)
    survivor.sweep()
    assert backend.principals  # the claim's deadline has not passed: maybe still under way
    assert survivor.lease(lease.id).is_active(clock())
    clock.advance(60)
    survivor.sweep()
    after = survivor.lease(lease.id)
    assert (after.status(clock()), after.revoke_reason) == ("revoked", CREATE_INTERRUPTED)
    assert backend.principals == {}
    assert backend.revoked == [lease.id]
    assert store.jobs() == []


def test_a_revoke_waits_while_the_create_is_under_way(store: LeaseStore, clock: FakeClock) -> None:
    backend = Backend()
    lease = crashed_issue(store, clock, backend)
    broker = broker_on(store, clock, backend)
    broker.revoke(lease.id)  # another broker revokes while the create is in flight
    assert backend.revoked == []  # not before the create is settled
    waiting = store.get_job(job_id(lease.id, "revoke", backend.name))
    assert waiting is not None
    assert waiting.attempts == 0
    clock.advance(60)
    broker.sweep()  # the create's claim ran out: undone, then the revoke runs
    assert backend.principals == {}
    assert lease.id in backend.revoked
    assert store.jobs() == []


def test_a_backend_down_while_revoking_is_retried_parked_and_cleaned(
    store: LeaseStore, clock: FakeClock
) -> None:
    backend = Backend()
    broker = broker_on(store, clock, backend, hook_retries=2, hook_backoff=1)
    cred = broker.issue("svc:x", "orders-db", ["orders:read"], ttl=60)
    backend.down = True
    assert broker.revoke(cred) is True  # the revocation itself stands
    for _ in range(5):
        clock.advance(10)
        broker.sweep()
    [parked] = broker.failed_hooks()
    assert (parked.event, parked.hook, parked.lease.id) == ("revoke", "orders-db", cred.lease_id)
    assert parked.attempts == 3
    assert parked.id == job_id(cred.lease_id, "revoke", "orders-db")
    assert broker.report().failed_hooks == (parked,)
    assert cred.lease_id in backend.principals  # irrevocable for now: listed, not lost
    backend.down = False
    assert broker.retry_failed_hooks() == 0
    assert backend.principals == {}
    assert broker.failed_hooks() == []


def test_renew_moves_the_backend_expiry(store: LeaseStore, clock: FakeClock) -> None:
    backend = Backend()
    broker = broker_on(store, clock, backend)
    cred = broker.issue("svc:x", "orders-db", ["orders:read"], ttl=60)
    clock.advance(30)
    renewed = broker.renew(cred, ttl=120)
    assert backend.principals[cred.lease_id] == renewed.expires_at == clock() + 120
    assert renewed.secret == cred.secret  # the same login, a later expiry
    assert broker.renew(cred.lease_id, ttl=60).secret is None  # an id carries no secret
    backend.down = True
    clock.advance(30)
    with pytest.raises(ProviderError, match="could not move its backend expiry"):
        broker.renew(renewed, ttl=300)


def test_reconcile_revokes_orphans_and_flags_missing_principals(
    store: LeaseStore, clock: FakeClock
) -> None:
    backend = Backend()
    events: list[AuditEvent] = []
    broker = broker_on(store, clock, backend, audit=[events.append])
    live = broker.issue("svc:x", "orders-db", ["orders:read"], ttl=600)
    lost = broker.issue("svc:x", "orders-db", ["orders:read"], ttl=600)
    orphan = "e" * 32  # a principal from a store restored from an old backup
    backend.principals[orphan] = clock() + 600
    del backend.principals[lost.lease_id]  # dropped behind our back
    result = broker.reconcile()
    assert result.revoked == (orphan,)
    assert [x.id for x in result.missing] == [lost.lease_id]
    assert set(backend.principals) == {live.lease_id}
    actions = [(e.action, e.lease.id if e.lease else None) for e in events]
    assert (EventType.PRINCIPAL_ORPHANED, orphan) in actions
    assert (EventType.PRINCIPAL_MISSING, lost.lease_id) in actions
    backend.down = True
    assert broker.reconcile().failed == ("orders-db: ConnectionError",)


def test_the_reaper_reconciles_at_its_interval(store: LeaseStore, clock: FakeClock) -> None:
    backend = Backend()
    broker = broker_on(store, clock, backend, reconcile_interval=100)
    broker.sweep()
    backend.principals["f" * 32] = 0.0
    broker.sweep()
    assert backend.principals  # not yet: once per interval
    clock.advance(100)
    broker.sweep()
    assert backend.principals == {}


def test_providers_are_checked_when_the_broker_is_built() -> None:
    with pytest.raises(InvalidRequest, match="two providers are named"):
        Broker(providers=[Backend(), Backend()])
    with pytest.raises(InvalidRequest, match="must be Provider objects"):
        Broker(providers=[object()])


def test_an_async_broker_runs_providers_off_the_event_loop(tmp_path: Path) -> None:
    backend = Backend()
    clock = FakeClock()
    threads: list[bool] = []
    create = backend.create

    def create_in_thread(lease: Lease) -> Secret:
        try:
            asyncio.get_running_loop()
            threads.append(False)
        except RuntimeError:
            threads.append(True)
        return create(lease)

    backend.create = create_in_thread  # type: ignore[method-assign]

    async def main() -> None:
        broker = AsyncBroker(
            issuer=ISSUER, store=SQLiteStore(tmp_path / "a.db"), clock=clock, providers=[backend]
        )
        cred = await broker.issue("svc:x", "orders-db", ["orders:read"], ttl=60)
        assert cred.secret is not None
        await broker.revoke(cred)
        assert await broker.failed_hooks() == []
        assert (await broker.reconcile()).revoked == ()
        await broker.close()

    asyncio.run(main())
    assert threads == [True]
    assert backend.principals == {}


def test_the_policy_judges_who_gets_which_provider_scopes(
    store: LeaseStore, clock: FakeClock
) -> None:
    backend = Backend()
    policy = Policy(
        [
            Rule(subjects=["svc:report-*"], audiences=["orders-db"], scopes=["orders:read"]),
            Rule(subjects=["svc:etl"], audiences=["orders-*"], scopes=["orders:*"], max_active=1),
        ]
    )
    broker = broker_on(store, clock, backend, policy=policy)
    assert broker.issue("svc:report-daily", "orders-db", ["orders:read"], ttl=60).secret
    for subject, scopes in (("svc:report-daily", ["orders:write"]), ("svc:other", ["orders:read"])):
        with pytest.raises(PolicyDenied):
            broker.issue(subject, "orders-db", scopes, ttl=60)
    assert len(backend.principals) == 1  # a refusal creates nothing in the backend
    # quotas count leases holding a backend credential like any other
    etl = broker.issue("svc:etl", "orders-db", ["orders:write"], ttl=60)
    with pytest.raises(QuotaExceeded):
        broker.issue("svc:etl", "orders-db", ["orders:read"], ttl=60)
    assert len(backend.principals) == 2
    broker.revoke(etl)
    assert broker.issue("svc:etl", "orders-db", ["orders:read"], ttl=60).secret
    # attenuating into the provider's audience is judged too
    reader = broker.issue("svc:report-x", "orders-db", ["orders:read"], ttl=60)
    with pytest.raises(PolicyDenied):
        broker.attenuate(reader, subject="svc:other")


def test_a_provider_only_reaches_leases_issued_for_its_exact_name(
    store: LeaseStore, clock: FakeClock
) -> None:
    keys = KeyRing.generate()
    before = Broker(issuer=ISSUER, store=store, clock=clock, keys=keys)
    old = before.issue("svc:x", "orders-db", ["orders:read"], ttl=60)
    backend = Backend()
    broker = broker_on(store, clock, backend, keys=keys)
    # a lease issued before the provider existed holds no backend credential: its
    # revoke and reconciliation leave the backend alone
    assert broker.revoke(old) is True
    assert backend.revoked == []
    assert broker.reconcile().missing == ()
    for audience in ("orders-*", "ORDERS-DB", "orders-db ", "orders-db2"):
        cred = broker.issue("svc:x", audience, ["orders:read"], ttl=60)
        assert (cred.secret, cred.lease.provider) == (None, None)
    assert backend.principals == {}
    for name in ("orders-*", "orders db", "", "a" * 65):
        with pytest.raises(InvalidRequest):
            Broker(providers=[Backend(name)])


def test_finished_hook_jobs_are_deleted_in_batches(store: LeaseStore, clock: FakeClock) -> None:
    ran: list[Lease] = []
    broker = Broker(
        issuer=ISSUER, store=store, clock=clock, reap_interval=3600, on_issue=ran.append
    )
    broker.issue("svc:x", "api", ttl=60)  # the first issue also sweeps, which deletes
    assert store.jobs() == []
    first = broker.issue("svc:x", "api", ttl=60)
    assert ran[-1] == first.lease
    assert len(store.jobs()) == 1  # done, waiting for its batch
    clock.advance(0.5)
    broker.issue("svc:x", "api", ttl=60)
    assert len(store.jobs()) == 2
    clock.advance(0.6)  # the oldest has waited a second: the next event deletes them all
    broker.issue("svc:x", "api", ttl=60)
    assert store.jobs() == []
    for _ in range(FLUSH_BATCH):  # or a full batch, whatever the clock says
        broker.issue("svc:x", "api", ttl=60)
    assert store.jobs() == []
    broker.issue("svc:x", "api", ttl=60)
    broker.sweep()  # a sweep deletes what waits
    assert store.jobs() == []
    broker.issue("svc:x", "api", ttl=60)
    assert broker.failed_hooks() == []  # so does listing parked work
    assert store.jobs() == []
    broker.issue("svc:x", "api", ttl=60)
    broker.stop()  # and stop (close) does
    assert store.jobs() == []
    clock.advance(120)  # nothing was left to run again
    broker.sweep()
    assert len(ran) == FLUSH_BATCH + 7


def test_a_script_that_never_closes_its_broker_leaves_no_job(tmp_path: Path) -> None:
    path = tmp_path / "leases.db"
    code = (
        "from jitbroker import Broker;"
        "from jitbroker.stores.sqlite import SQLiteStore;"
        f"b = Broker(store=SQLiteStore({str(path)!r}), on_issue=lambda lease: None);"
        "b.issue('svc:x', 'api', ttl=60)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    store = SQLiteStore(path)
    assert len(store.find(LeaseFilter())) == 1
    assert store.jobs() == []  # deleted when the interpreter exited
    store.close()


def test_reconcile_leaves_a_lease_that_died_as_it_listed_to_its_own_revoke(
    store: LeaseStore, clock: FakeClock
) -> None:
    backend = Backend()
    broker = broker_on(store, clock, backend)
    cred = broker.issue("svc:x", "orders-db", ["orders:read"], ttl=60)
    # the listing was taken just before the revoke's delete reached the backend
    backend.revoke = lambda lease: backend.revoked.append(lease.id)  # type: ignore[method-assign]
    broker.revoke(cred)
    assert backend.principals  # what a listing taken a moment earlier still shows
    assert broker.reconcile().revoked == ()  # its revoke job had it: no second revoke
    clock.advance(2)
    del backend.revoke  # the backend's delete really was lost: now it is an orphan
    assert broker.reconcile().revoked == (cred.lease_id,)
    assert backend.principals == {}
