"""Kill -9 a broker at random points of issue-with-provider, revoke, sweep and
reconcile, many times per store, then let one survivor finish: no backend
principal outlives its lease, every dead lease's hook ran (and every run of it
had the same idempotency key), and no live lease lacks its backend credential.

``JITBROKER_CRASH_RUNS`` (default 200) sets the kills per store.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from conftest import server_or_skip
from jitbroker.outbox import orphan
from jitbroker.stores.base import LeaseFilter, LeaseStore, job_id
from outbox_worker import HOOK_TIMEOUT, PROVIDER, TTL, backend_for, broker_for
from store_worker import open_store
from test_store_conformance import POSTGRES_DSN, REDIS_URL

pytestmark = pytest.mark.slow
RUNS = int(os.environ.get("JITBROKER_CRASH_RUNS", "200"))
HERE = Path(__file__).parent


#: (store, provider): files with every store, Redis ACL users with the Redis store.
CASES = [("sqlite", "files"), ("redis", "files"), ("redis", "redis-users"), ("postgres", "files")]


@pytest.fixture(params=CASES, ids=["-".join(case) for case in CASES])
def case(request: pytest.FixtureRequest) -> tuple[str, str]:
    kind, backend = request.param
    return str(kind), str(backend)


@pytest.fixture
def target(case: tuple[str, str], tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    kind = case[0]
    if kind == "sqlite":
        yield kind, str(tmp_path / "leases.db"), ""
        return
    if kind == "redis":
        server_or_skip("Redis", "127.0.0.1", 6379)
        where, namespace = REDIS_URL, f"jbcrash-{uuid4().hex}"
    else:
        server_or_skip("PostgreSQL", "127.0.0.1", 5432)
        where, namespace = POSTGRES_DSN, f"jbcrash_{uuid4().hex}"
    yield kind, where, namespace
    store = open_store(kind, where, namespace)
    clear = getattr(store, "clear", None)
    if clear is not None:
        clear()
    store.close()


def run_and_kill(
    kind: str, where: str, namespace: str, base: Path, rng: random.Random, backend: str = "files"
) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    worker = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "outbox_worker.py"),
            kind,
            where,
            namespace,
            str(base),
            backend,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert worker.stdout is not None
    assert worker.stdout.readline().strip() == b"ready"
    time.sleep(rng.uniform(0.0, 0.25))
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    worker.stdout.close()


def assert_no_live_lease_lacks_its_credential(store: LeaseStore, principals: set[str]) -> None:
    now = time.time()
    for lease in store.find(LeaseFilter(provider=PROVIDER)):
        if not lease.is_active(now + 0.05):  # leases expiring as we look may be claimed already
            continue
        if store.get_job(job_id(lease.id, "create", PROVIDER)) is not None:
            continue  # a create under way (or to be undone): not handed out
        assert lease.id in principals, f"active lease {lease.id} has no backend principal"


def test_kill_9_at_random_points_loses_nothing(
    target: tuple[str, str, str], case: tuple[str, str], tmp_path: Path
) -> None:
    kind, where, namespace = target
    backend = case[1]
    rng = random.Random(1234)
    base = tmp_path / "backend"
    (base / "principals").mkdir(parents=True)
    provider = backend_for(backend, base, namespace)
    try:
        for _ in range(RUNS):
            run_and_kill(kind, where, namespace, base, rng, backend)
            store = open_store(kind, where, namespace)
            try:
                assert_no_live_lease_lacks_its_credential(store, set(provider.managed()))
            finally:
                store.close()
        survive(kind, where, namespace, base, backend, provider)
    finally:
        for lease_id in provider.managed():  # nothing, unless the test failed
            provider.revoke(orphan(lease_id, PROVIDER))


def survive(kind: str, where: str, namespace: str, base: Path, backend: str, provider: Any) -> None:
    """One broker finishes what the killed ones left: then nothing is left."""
    survivor = broker_for(kind, where, namespace, base, backend)
    try:
        leases = survivor.store.find(LeaseFilter())
        assert leases, "the workers issued nothing"
        time.sleep(TTL + HOOK_TIMEOUT + 0.1)  # every lease expired, every claim ran out
        deadline = time.monotonic() + 60
        while survivor.store.jobs(parked=None) or survivor.reconcile().revoked:
            survivor.sweep()
            assert time.monotonic() < deadline, survivor.store.jobs()
            time.sleep(0.05)
        assert survivor.failed_hooks() == []
        leases = survivor.store.find(LeaseFilter())
        assert all(lease.status(time.time()) != "active" for lease in leases)
        assert provider.managed() == []
        runs: dict[tuple[str, str], set[str]] = defaultdict(set)
        for line in (base / "hooks.log").read_text().splitlines():
            event, lease_id, key = line.split()
            runs[(event, lease_id)].add(key)
        for lease in leases:
            death = "on_revoke" if lease.revoked_at is not None else "on_expire"
            for event in ("on_issue", death):
                keys = runs.get((event, lease.id))
                assert keys, f"lease {lease.id} ({lease.status(time.time())}): {event} never ran"
                assert keys == {job_id(lease.id, event, "record")}, keys
    finally:
        survivor.close()
