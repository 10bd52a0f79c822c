"""A task's exit revokes exactly its own leases (issue 15, the ``task(name)`` weakness).

Each ``broker.task(...)`` call is a run with a unique id (``Lease.task_run``):
its own lease and the leases the broker issues with the same task name inside
the block (in the same thread or asyncio task, or one that copied its context)
carry it, and the exit revokes by it. Two CI jobs both called "deploy", or
another issuer's "deploy", on one store are left alone. Leases also record
their issuer, and ``revoke_where(issuer=...)`` takes only that issuer's.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from typing import Any

import pytest

from jitbroker import AsyncBroker, Broker, Credential, KeyRing, LeaseStore, MemoryStore
from jitbroker.cli import main
from jitbroker.stores.sqlite import SQLiteStore
from jitbroker.testing import FakeClock
from test_hooks_across_brokers import Opener, open_store

__all__ = ["open_store"]  # the fixture, imported for pytest

REQUEST: dict[str, Any] = {"subject": "svc:ci", "audience": "api", "scopes": ["deploy"], "ttl": 60}


def make(store: LeaseStore, issuer: str = "urn:ci", **options: Any) -> Broker:
    return Broker(issuer=issuer, keys=KeyRing.generate("HS256"), store=store, **options)


def active(b: Broker, cred: Credential) -> bool:
    return b.lease(cred).is_active(b.clock())


def test_concurrent_runs_of_one_task_name_leave_each_other_alone(open_store: Opener) -> None:
    """Two CI jobs both called "deploy": the one that ends first revokes only its own."""
    ci = make(open_store())
    inside, first_done, second_checked = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, list[Credential]] = {}

    def job(name: str, first: bool) -> None:
        with ci.task("deploy", **REQUEST) as cred:
            extra = ci.issue(task="deploy", **REQUEST)  # joins this run, not the other
            seen[name] = [cred, extra]
            if first:
                inside.wait(10)
            else:
                inside.set()
                first_done.wait(10)
                seen[name + "-alive"] = [c for c in (cred, extra) if active(ci, c)]
                second_checked.set()
        if first:
            first_done.set()

    threads = [
        threading.Thread(target=job, args=("a", True)),
        threading.Thread(target=job, args=("b", False)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert second_checked.is_set()
    assert seen["b-alive"] == seen["b"]  # a's exit left b's leases alone
    a_run, b_run = (seen[k][0].lease.task_run for k in ("a", "b"))
    assert a_run
    assert b_run
    assert a_run != b_run
    for name in ("a", "b"):
        cred, extra = seen[name]
        assert extra.lease.task_run == cred.lease.task_run
        for c in (cred, extra):
            assert ci.lease(c).revoke_reason == "task-ended"


def test_a_task_never_reaches_another_issuers_task_of_the_same_name(open_store: Opener) -> None:
    ours, theirs = make(open_store(), "urn:tenant-a"), make(open_store(), "urn:tenant-b")
    other = theirs.issue(task="deploy", **REQUEST)
    outside = ours.issue(task="deploy", **REQUEST)  # same broker, not in the block
    with ours.task("deploy", **REQUEST) as cred:
        assert cred.lease.issuer == "urn:tenant-a"
        child = ours.attenuate(cred, ttl=10)
        named_otherwise = ours.issue(task="build", **REQUEST)
    assert ours.lease(cred).revoke_reason == "task-ended"
    assert ours.lease(child).revoke_reason == "task-ended"  # the subtree, as before
    for alive in (other, outside, named_otherwise):
        assert ours.lease(alive).revoke_reason is None
        assert ours.lease(alive).task_run is None
    assert other.lease.issuer == "urn:tenant-b"


def test_revoke_where_by_issuer(open_store: Opener) -> None:
    a, b = make(open_store(), "urn:a"), make(open_store(), "urn:b")
    mine = [a.issue(task="t", owner="o", **REQUEST) for _ in range(2)]
    kept = b.issue(task="t", owner="o", **REQUEST)
    assert {lease.id for lease in b.leases(issuer="urn:a")} == {c.lease_id for c in mine}
    assert b.revoke_where(issuer="urn:a", task="t", reason="tenant-offboarded") == 2
    assert active(b, kept)
    assert b.revoke_where(issuer="urn:a") == 0


def test_leases_issued_in_a_thread_join_the_run_only_with_the_context() -> None:
    ci = make(MemoryStore())
    joined: list[Credential] = []
    with ci.task("deploy", **REQUEST) as cred:
        context = contextvars.copy_context()
        worker = threading.Thread(
            target=context.run, args=(lambda: joined.append(ci.issue(task="deploy", **REQUEST)),)
        )
        worker.start()
        worker.join()
        bare: list[Credential] = []
        plain = threading.Thread(target=lambda: bare.append(ci.issue(task="deploy", **REQUEST)))
        plain.start()
        plain.join()
    assert joined[0].lease.task_run == cred.lease.task_run
    assert ci.lease(joined[0]).revoke_reason == "task-ended"
    assert bare[0].lease.task_run is None  # a thread without the context: on its own
    assert active(ci, bare[0])


def test_nested_runs_of_one_name_each_take_their_own() -> None:
    ci = make(MemoryStore())
    with ci.task("deploy", **REQUEST) as outer:
        with ci.task("deploy", **REQUEST) as inner:
            in_inner = ci.issue(task="deploy", **REQUEST)
        assert in_inner.lease.task_run == inner.lease.task_run
        assert not active(ci, inner)
        assert not active(ci, in_inner)
        in_outer = ci.issue(task="deploy", **REQUEST)
        assert in_outer.lease.task_run == outer.lease.task_run
        assert active(ci, outer)
    assert not active(ci, in_outer)


def test_another_broker_in_the_block_is_not_part_of_the_run() -> None:
    store = MemoryStore()
    ci, other = make(store), make(store)
    with ci.task("deploy", **REQUEST):
        separate = other.issue(task="deploy", **REQUEST)
    assert separate.lease.task_run is None
    assert active(other, separate)


def test_async_tasks_of_one_name_are_separate_runs() -> None:
    clock = FakeClock()
    broker = AsyncBroker(issuer="urn:ci", keys=KeyRing.generate("HS256"), clock=clock)

    async def job(started: asyncio.Event, release: asyncio.Event) -> tuple[Credential, ...]:
        async with broker.task("deploy", **REQUEST) as cred:
            # A task created inside the block copies the context: it joins the run.
            spawned = await asyncio.create_task(broker.issue(task="deploy", **REQUEST))
            started.set()
            await release.wait()
            return cred, spawned

    async def main() -> None:
        a_in, b_in, a_go, b_go = (asyncio.Event() for _ in range(4))
        a = asyncio.create_task(job(a_in, a_go))
        b = asyncio.create_task(job(b_in, b_go))
        await a_in.wait()
        await b_in.wait()
        a_go.set()
        a_cred, a_spawned = await a
        assert a_spawned.lease.task_run == a_cred.lease.task_run
        for cred in (a_cred, a_spawned):
            assert (await broker.lease(cred)).revoke_reason == "task-ended"
        assert not b.done()
        b_lease = (await broker.leases(task="deploy"))[0]
        assert b_lease.is_active(clock())  # b is still running: untouched
        b_go.set()
        b_cred, _ = await b
        assert b_cred.lease.task_run != a_cred.lease.task_run
        assert await broker.leases(task="deploy") == []

    asyncio.run(main())


def test_ephemeral_calls_are_runs_of_one_task() -> None:
    ci = make(MemoryStore())
    seen: list[Credential] = []

    @ci.ephemeral(**REQUEST)
    def job(cred: Credential) -> None:
        seen.append(cred)
        seen.append(ci.issue(task=cred.lease.task, **REQUEST))  # joins this call's run

    job()
    job()
    assert len({c.lease.task for c in seen}) == 1
    assert seen[0].lease.task == f"{__name__}.{job.__qualname__}"
    assert seen[0].lease.task_run == seen[1].lease.task_run != seen[2].lease.task_run
    assert all(ci.lease(c).revoke_reason == "task-ended" for c in seen)


def test_the_cli_revokes_by_task_and_by_issuer(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "leases.db"
    a, b = make(SQLiteStore(path), "urn:a"), make(SQLiteStore(path), "urn:b")
    a_task, b_task = a.issue(task="deploy", **REQUEST), b.issue(task="deploy", **REQUEST)
    b_other = b.issue(task="build", **REQUEST)
    store = str(path)
    assert main(["revoke", "--store", store, "--task", "deploy", "--issuer", "urn:a"]) == 0
    assert "issuer='urn:a'" in capsys.readouterr().out
    assert not active(b, a_task)
    assert active(b, b_task)
    assert main(["revoke", "--store", store, "--issuer", "urn:b"]) == 0
    assert not active(b, b_task)
    assert not active(b, b_other)
    assert main(["revoke", "--store", store, "--task", "deploy"]) == 1  # nothing left
