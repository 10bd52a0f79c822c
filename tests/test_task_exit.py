"""A task's exit revokes however the process ends (issue 12).

A SIGTERM to a script inside ``with broker.task(...)`` (or ``async with``)
revokes its leases, reason ``task-terminated``, and the process still dies of
SIGTERM, or does what its own SIGTERM handler does. The exit revoke is retried
when the store blips; if the store stays down, the leases are left to their
TTL, the job's own exception propagates (the failure attached as a note and
audited), and a job that succeeded gets ``StoreUnavailable``. Real processes,
real signals and real stores (SQLite files, a private redis-server); no mocks.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from jitbroker import AsyncBroker, Broker, KeyRing
from jitbroker.audit import AuditEvent, EventType
from jitbroker.errors import InvalidRequest, StoreUnavailable
from jitbroker.stores.redis import RedisStore
from jitbroker.stores.sqlite import SQLiteStore
from test_store_redis import PrivateServer, fast_client
from test_store_redis import private_server as private_server  # the fixture

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
REQUEST: dict[str, Any] = {"subject": "svc:ci", "audience": "api", "scopes": ["deploy"], "ttl": 600}
TIMEOUT = 30

# The child: opens a task block on the store named by argv, prints its lease
# ids, and waits to be signalled. ``{setup}`` may install a handler first.
SCRIPT = """
import asyncio, signal, sys, time
from jitbroker import AsyncBroker, Broker, KeyRing
from jitbroker.stores.redis import RedisStore
from jitbroker.stores.sqlite import SQLiteStore
import redis

kind, where, mode, sigterm = sys.argv[1:5]
store = SQLiteStore(where) if kind == "sqlite" else RedisStore(
    redis.Redis(port=int(where)), prefix="exit")
request = dict(subject="svc:ci", audience="api", scopes=["deploy"], ttl=600)
{setup}
if mode in ("sync", "nested"):
    broker = Broker(keys=KeyRing.generate("HS256"), store=store,
                    revoke_on_sigterm=sigterm == "on")
    with broker.task("job", **request) as cred:
        if mode == "nested":
            with broker.task("step", **request) as child:
                print(cred.lease_id, child.lease_id, flush=True)
                while True:
                    time.sleep(0.05)
        child = broker.attenuate(cred, ttl=60)
        print(cred.lease_id, child.lease_id, flush=True)
        while True:
            time.sleep(0.05)
elif mode == "ephemeral":  # Broker.ephemeral on an async def
    broker = Broker(keys=KeyRing.generate("HS256"), store=store)

    @broker.ephemeral(**request)
    async def job(cred):
        child = broker.attenuate(cred, ttl=60)
        print(cred.lease_id, child.lease_id, flush=True)
        await asyncio.sleep(600)
    asyncio.run(job())
else:
    async def main():
        broker = AsyncBroker(keys=KeyRing.generate("HS256"), store=store,
                             revoke_on_sigterm=sigterm == "on")
        async with broker.task("job", **request) as cred:
            child = await broker.attenuate(cred, ttl=60)
            print(cred.lease_id, child.lease_id, flush=True)
            await asyncio.sleep(600)
    asyncio.run(main())
"""

HANDLER = """
def handler(signum, frame):
    print("own handler", flush=True)
    sys.exit(7)
signal.signal(signal.SIGTERM, handler)
"""


def terminate(
    tmp_path: Path, kind: str, where: str, mode: str, *, sigterm: str = "on", setup: str = ""
) -> tuple[int, list[str], str]:
    """Run the child, SIGTERM it once its block is open: (status, lease ids, output)."""
    script = tmp_path / "child.py"
    script.write_text(SCRIPT.format(setup=textwrap.dedent(setup)))
    child = subprocess.Popen(
        [sys.executable, str(script), kind, where, mode, sigterm],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        ids = child.stdout.readline().split()
        assert len(ids) == 2, child.stderr.read() if child.stderr else ""
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=TIMEOUT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return child.returncode, ids, out + err


def reasons(store: Any, ids: list[str]) -> list[str | None]:
    leases = [store.get(lease_id) for lease_id in ids]
    return [lease.revoke_reason for lease in leases]


@pytest.mark.parametrize("mode", ["sync", "async", "nested", "ephemeral"])
def test_sigterm_revokes_a_task_on_sqlite_and_the_process_dies_of_it(
    tmp_path: Path, mode: str
) -> None:
    path = str(tmp_path / "leases.db")
    status, ids, output = terminate(tmp_path, "sqlite", path, mode)
    assert status == -signal.SIGTERM, output
    assert reasons(SQLiteStore(path), ids) == ["task-terminated", "task-terminated"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigterm_revokes_a_task_on_redis(
    tmp_path: Path, mode: str, private_server: PrivateServer
) -> None:
    status, ids, output = terminate(tmp_path, "redis", str(private_server.port), mode)
    assert status == -signal.SIGTERM, output
    store = RedisStore(fast_client(private_server.port), prefix="exit")
    assert reasons(store, ids) == ["task-terminated", "task-terminated"]
    store.close()


def test_sigterm_chains_the_handler_already_there(tmp_path: Path) -> None:
    path = str(tmp_path / "leases.db")
    status, ids, output = terminate(tmp_path, "sqlite", path, "sync", setup=HANDLER)
    assert status == 7  # what the application's own handler decided
    assert "own handler" in output
    assert reasons(SQLiteStore(path), ids) == ["task-terminated", "task-terminated"]


def test_opting_out_leaves_sigterm_alone(tmp_path: Path) -> None:
    path = str(tmp_path / "leases.db")
    status, ids, _ = terminate(tmp_path, "sqlite", path, "sync", sigterm="off")
    assert status == -signal.SIGTERM
    assert reasons(SQLiteStore(path), ids) == [None, None]  # left to their TTL


def make(store: Any = None, **options: Any) -> Broker:
    return Broker(keys=KeyRing.generate("HS256"), store=store, **options)


def test_the_handler_is_installed_only_while_a_main_thread_block_is_open() -> None:
    broker = make()
    before = signal.getsignal(signal.SIGTERM)
    seen: list[object] = []
    with broker.task("outer", **REQUEST):
        ours = signal.getsignal(signal.SIGTERM)
        assert ours != before
        with broker.task("inner", **REQUEST):
            assert signal.getsignal(signal.SIGTERM) == ours
        assert signal.getsignal(signal.SIGTERM) == ours  # the outer block is still open

        def in_a_thread() -> None:
            with broker.task("threaded", **REQUEST):
                seen.append(signal.getsignal(signal.SIGTERM))

        worker = threading.Thread(target=in_a_thread)
        worker.start()
        worker.join()
    assert signal.getsignal(signal.SIGTERM) == before
    assert seen == [ours]  # a thread neither installs nor removes it
    with make(revoke_on_sigterm=False).task("quiet", **REQUEST):
        assert signal.getsignal(signal.SIGTERM) == before


def test_a_graceful_handler_already_there_decides_and_is_restored() -> None:
    """An application handler that only asks for a graceful stop: it is called
    once, the job goes on to its end, and the exit revokes as usual."""
    calls: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    graceful = signal.getsignal(signal.SIGTERM)
    broker = make()
    try:
        with broker.task("job", **REQUEST) as cred:
            os.kill(os.getpid(), signal.SIGTERM)
            assert calls == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is graceful
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert broker.lease(cred).revoke_reason == "task-ended"


def test_an_ignored_sigterm_stays_ignored() -> None:
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with make().task("job", **REQUEST):
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_options_are_checked() -> None:
    with pytest.raises(InvalidRequest, match="task_revoke_tries"):
        make(task_revoke_tries=0)
    with pytest.raises(InvalidRequest, match="task_revoke_backoff"):
        make(task_revoke_backoff=-1)
    with pytest.raises(InvalidRequest, match="revoke_on_sigterm"):
        make(revoke_on_sigterm="yes")


# -- a store that blips or stays down at the exit -------------------------------
def lock(path: str) -> sqlite3.Connection:
    """Another connection holding the file's write lock (SQLITE_BUSY for us)."""
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    return other


def test_a_blip_at_exit_is_retried(tmp_path: Path) -> None:
    path = str(tmp_path / "leases.db")
    store = SQLiteStore(path, timeout=0.05)
    broker = make(store, task_revoke_tries=5, task_revoke_backoff=0.1)
    events: list[AuditEvent] = []
    broker._core.audit.sinks = (events.append,)
    with broker.task("job", **REQUEST) as cred:
        other = lock(path)
        threading.Timer(0.2, other.rollback).start()  # the blip ends mid-retry
    assert broker.lease(cred).revoke_reason == "task-ended"
    assert EventType.TASK_REVOKE_FAILED not in {event.action for event in events}
    other.close()
    store.close()


def test_the_jobs_own_exception_propagates_with_the_revoke_failure_attached(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "leases.db")
    store = SQLiteStore(path, timeout=0.05)
    broker = make(store, task_revoke_tries=3, task_revoke_backoff=0.05)
    events: list[AuditEvent] = []
    broker._core.audit.sinks = (events.append,)
    started = time.monotonic()
    job = pytest.raises(ValueError, match="the job failed")
    with job as raised, broker.task("job", **REQUEST) as cred:
        other = lock(path)
        raise ValueError("the job failed")
    assert time.monotonic() - started < 2  # three tries, then left to the TTL
    notes = getattr(raised.value, "__notes__", [])
    assert any("StoreUnavailable" in note and "until their TTL" in note for note in notes)
    failed = [event for event in events if event.action == EventType.TASK_REVOKE_FAILED]
    assert [event.error for event in failed] == ["StoreUnavailable"]
    assert cred.token not in repr(failed[0].to_dict()) + "".join(notes)
    other.rollback()
    assert broker.lease(cred).is_active(broker.clock())  # left to its TTL
    other.close()
    store.close()


def test_a_job_that_succeeded_learns_its_lease_outlives_it(
    private_server: PrivateServer,
) -> None:
    store = RedisStore(fast_client(private_server.port), prefix="down")
    broker = make(store, task_revoke_backoff=0.01)
    with pytest.raises(StoreUnavailable), broker.task("job", **REQUEST) as cred:
        private_server.kill()
    private_server.start()
    assert broker.lease(cred).is_active(broker.clock())
    store.close()


def test_async_exit_keeps_the_jobs_exception_and_retries_a_blip(
    private_server: PrivateServer,
) -> None:
    store = RedisStore(fast_client(private_server.port), prefix="adown")
    keys = KeyRing.generate("HS256")
    brief = AsyncBroker(keys=keys, store=store, task_revoke_backoff=0.01)
    patient = AsyncBroker(keys=keys, store=store, task_revoke_tries=8)

    async def main() -> None:
        with pytest.raises(KeyError) as raised:  # noqa: PT012 - raised inside the block
            async with brief.task("job", **REQUEST) as failed:
                private_server.kill()
                raise KeyError("job")
        assert any("StoreUnavailable" in note for note in raised.value.__notes__)
        private_server.start()
        assert (await brief.lease(failed)).revoke_reason is None  # left to its TTL
        async with patient.task("job", **REQUEST) as cred:
            private_server.kill()
            threading.Timer(0.05, private_server.start).start()  # back within the retries
        assert (await patient.lease(cred)).revoke_reason == "task-ended"

    asyncio.run(main())
    store.close()
