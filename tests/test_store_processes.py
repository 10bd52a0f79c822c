"""The ``LeaseStore`` promises that only several OS processes can break, for
every store that processes share.

The store under test is built by the conformance suite's factories; each
worker process (tests/store_worker.py) rebuilds it from its address alone (the
file, or the server URL plus the Redis prefix or PostgreSQL schema) and runs
JSON commands it reads from stdin. Races start when the test writes the same
command to every worker, one pipe after the other; waits are on pipes, never
sleeps. ``MemoryStore`` is not here: it is one process's dict, nothing another
process can open.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jitbroker.stores.base import LeaseFilter, LeaseStore
from test_store_conformance import POSTGRES_DSN, REDIS_URL, STORES, T0, StoreFactory, make

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "store_worker.py"
TIMEOUT = 60  # seconds; a safety net for a hung worker, the tests take a few seconds

SHARED = [
    pytest.param((param.id, param.values[0]), id=param.id)
    for param in STORES
    if param.id != "memory"  # a dict in one process: there is nothing to share
]


class Shared:
    """The store in this process, and the address a worker rebuilds it from."""

    def __init__(self, kind: str, store: LeaseStore, tmp_path: Path) -> None:
        self.kind, self.store, self.tmp_path = kind, store, tmp_path
        inner: Any = getattr(store, "store", store)  # the async store behind the sync facade
        self.address = {
            "sqlite": [str(getattr(store, "path", "")), ""],
            "redis": [REDIS_URL, str(getattr(inner, "prefix", ""))],
            "redis-async": [REDIS_URL, str(getattr(inner, "prefix", ""))],
            "postgres": [POSTGRES_DSN, str(getattr(inner, "schema", ""))],
        }[kind]


class Worker:
    """One worker process: ``send`` a command, ``read`` its answers."""

    def __init__(self, shared: Shared) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)])}
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), shared.kind, *shared.address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def send(self, name: str, *args: object) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps([name, *args]) + "\n")
        self.process.stdin.flush()

    def read(self) -> Any:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.endswith("\n"), f"worker exited early ({self.process.poll()})"
        return json.loads(line)

    def ask(self, name: str, *args: object) -> Any:
        self.send(name, *args)
        return self.read()

    def finish(self) -> None:
        """Close stdin (the worker closes its store and exits) and reap it."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=TIMEOUT)
        finally:
            if self.process.poll() is None:  # a failed test left it hanging
                self.process.kill()
                self.process.wait(timeout=TIMEOUT)
            if self.process.stdout is not None:
                self.process.stdout.close()


Spawn = Callable[[int], list[Worker]]


@pytest.fixture(params=SHARED)
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Shared]:
    kind, factory = request.param
    build: StoreFactory = factory
    store = build(tmp_path)
    yield Shared(kind, store, tmp_path)
    clear = getattr(store, "clear", None)
    if clear is not None:  # a shared server: drop this test's keys or schema
        clear()
    store.close()


@pytest.fixture
def spawn(shared: Shared) -> Iterator[Spawn]:
    """``spawn(n)``: n workers on the shared store, each ready (store open)."""
    started: list[Worker] = []

    def start(count: int) -> list[Worker]:
        workers = [Worker(shared) for _ in range(count)]  # they start up side by side
        started.extend(workers)
        for worker in workers:
            assert worker.read() == "ready"
        return workers

    yield start
    for worker in started:
        worker.finish()
    for worker in started:
        assert worker.process.returncode == 0, f"a worker failed ({worker.process.returncode})"


def test_each_expired_lease_is_claimed_exactly_once(shared: Shared, spawn: Spawn) -> None:
    store = shared.store
    due = [f"due{i:03}" for i in range(300)]
    for i, lease_id in enumerate(due):
        store.add(make(lease_id, ttl=1 + i % 50))
    for i in range(20):
        store.add(make(f"later{i}", ttl=500))  # not due at T0 + 100
    workers = spawn(4)
    for worker in workers:  # the start line, to all of them at once
        worker.send("claim_all", T0 + 100, 7)
    claimed = [lease_id for worker in workers for lease_id in worker.read()]
    assert sorted(claimed) == due  # every due lease, once; nothing else
    assert store.claim_expired(T0 + 100) == []


def test_one_winner_when_processes_revoke_the_same_lease(shared: Shared, spawn: Spawn) -> None:
    store = shared.store
    roots = [f"root{i:02}" for i in range(40)]
    for lease_id in roots:
        parent = make(lease_id, ttl=600)
        store.add(parent)
        store.add(make(f"{lease_id}-child", at=T0 + 1, ttl=300, parent=parent))
    workers = spawn(4)
    for worker in workers:  # every worker revokes the same leases in the same order
        worker.send("revoke_each", roots, T0 + 5)
    results = [worker.read() for worker in workers]
    for n, root in enumerate(roots):
        won = [result[n] for result in results if result[n]]
        assert len(won) == 1, (root, [result[n] for result in results])
        assert sorted(won[0]) == [root, f"{root}-child"]  # the winner took the subtree
    for lease in store.find(LeaseFilter()):
        assert (lease.revoked_at, lease.revoke_reason) == (T0 + 5, "race")


def test_a_revocation_is_visible_to_another_process_at_once(shared: Shared, spawn: Spawn) -> None:
    store = shared.store
    (other,) = spawn(1)
    for i in range(10):
        parent = make(f"p{i}", ttl=600)
        store.add(parent)
        store.add(make(f"c{i}", at=T0 + 1, ttl=300, parent=parent))
        pair = [f"p{i}", f"c{i}"]
        assert other.ask("states", pair) == [[True, None], [True, None]]
        if i % 2:  # revoked here, read there, right after revoke returned
            assert len(store.revoke(f"p{i}", at=T0 + 2, reason="gone")) == 2
            assert other.ask("states", pair) == [[True, T0 + 2], [True, T0 + 2]]
        else:  # and the other way round
            (took,) = other.ask("revoke_each", [f"p{i}"], T0 + 2)
            assert sorted(took) == sorted(pair)
            assert [revoked_at(store, lease_id) for lease_id in pair] == [T0 + 2, T0 + 2]


def revoked_at(store: LeaseStore, lease_id: str) -> float | None:
    lease = store.get(lease_id)
    assert lease is not None, lease_id
    return lease.revoked_at


def test_a_child_added_while_its_parent_is_revoked_is_refused_or_revoked(
    shared: Shared, spawn: Spawn
) -> None:
    store = shared.store
    revoker, *adders = spawn(3)
    for round_ in range(3):
        parent = f"parent{round_}"
        store.add(make(parent, ttl=600))
        for n, adder in enumerate(adders):
            adder.send("add_children", parent, f"r{round_}a{n}-", T0 + 1, 10)
        for adder in adders:
            assert adder.read() == "adding"  # children are being added right now
        took = set(revoker.ask("revoke_each", [parent], T0 + 2)[0])
        added: set[str] = set()
        for adder in adders:
            answers: dict[str, bool] = adder.read()
            results = list(answers.values())
            assert False in results  # the revoke landed while this process was adding
            first_refusal = results.index(False)
            assert not any(results[first_refusal:])  # a dead parent stays dead
            added |= {lease_id for lease_id, ok in answers.items() if ok}
        # Never an active child of a revoked parent: every child that add
        # accepted was taken by the revoke; every refused one was never stored.
        assert took == added | {parent}
        stored = store.find(LeaseFilter(parent=parent))
        assert {lease.id for lease in stored} == added
        assert all(lease.revoked_at == T0 + 2 for lease in stored)
