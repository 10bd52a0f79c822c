"""``RedisStore`` beyond the conformance suite: its key layout, one round trip per
call, key expiry of dead records, the revocation channel, the outbox's Lua
against ``event_jobs``, and error translation (including a private
``redis-server`` killed and restarted under the store).

The shared server is the one CI starts at 127.0.0.1:6379; every test works under
a random prefix and deletes its keys at the end. Waits are short polls.
"""

from __future__ import annotations

import json
import operator
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar
from uuid import uuid4

import attrs
import pytest
import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from conftest import server_or_skip
from jitbroker import Broker, KeyRing
from jitbroker.errors import InvalidRequest, StoreError, StoreUnavailable, TokenRevoked
from jitbroker.lease import Lease
from jitbroker.stores import redis as redis_module
from jitbroker.stores.base import NO_OUTBOX, Job, LeaseFilter, Outbox, Quota, event_jobs
from jitbroker.stores.codec import from_mapping
from jitbroker.stores.redis import RedisStore
from jitbroker.stores.redis_async import AsyncRedisStore
from jitbroker.stores.redis_outbox import add_args
from jitbroker.testing import TEST_ISSUER, FakeClock

URL = "redis://127.0.0.1:6379/0"
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
POLL = 0.01
POLL_LIMIT = 2.0
#: An outbox whose hooks (and provider "db") the caller runs itself: its jobs held.
HELD = Outbox(
    hooks=("app.a", "app.b"), providers=frozenset({"db"}), claim="c1", until=T0 + 30.125, limit=3
)


def make(lease_id: str, *, at: float = T0, ttl: float = 60.0, **fields: Any) -> Lease:
    values: dict[str, Any] = {"subject": "svc:a", "audience": "api", "scopes": ("read",)}
    values.update(fields)
    return Lease(id=lease_id, issued_at=at, expires_at=at + ttl, max_expires_at=at + 3600, **values)


def fast_client(port: int = 6379, **options: Any) -> redis.Redis:
    """A client that fails fast: short timeouts and no retries (redis-py retries
    ten times with backoff by default, seconds per call against a dead server)."""
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
        **options,
    )


def poll(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + POLL_LIMIT
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)
    return True


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    server_or_skip("Redis", "127.0.0.1", 6379)
    client = fast_client()
    yield client
    client.close()


@pytest.fixture
def new_store(client: redis.Redis) -> Iterator[Callable[..., RedisStore]]:
    """Builds stores under fresh random prefixes; clears every one at the end."""
    made: list[RedisStore] = []

    def build(url_or_client: str | redis.Redis = client, **options: Any) -> RedisStore:
        options.setdefault("prefix", f"jbtest-{uuid4().hex}")
        store = RedisStore(url_or_client, **options)
        made.append(store)
        return store

    yield build
    for store in made:
        store.clear()
        store.close()


@pytest.fixture
def store(new_store: Callable[..., RedisStore]) -> RedisStore:
    return new_store()


def keys_of(client: redis.Redis, store: RedisStore) -> set[str]:
    return {key.decode() for key in client.scan_iter(match=f"{{{store.prefix}}}:*")}


# -- construction -----------------------------------------------------------
@pytest.mark.parametrize("prefix", ["", "a{b", "a}b"])
def test_prefix_must_keep_the_hash_tag_intact(prefix: str) -> None:
    with pytest.raises(InvalidRequest):
        RedisStore(URL, prefix=prefix)


@pytest.mark.parametrize("retention", [0, -1.0, float("inf"), float("nan")])
def test_retention_must_be_positive(retention: float) -> None:
    with pytest.raises(InvalidRequest):
        RedisStore(URL, retention=retention)


@pytest.mark.parametrize(
    "url",
    [
        "http://user:hunter2@127.0.0.1:6379/0",
        "redis://user:hunter2@127.0.0.1:abc/0",
        "redis://user:hunter2@127.0.0.1:99999/0",
        "redis://user:hunter2@127.0.0.1:6379/0?socket_timeout=abc",
        "",
    ],
)
@pytest.mark.parametrize("kind", [RedisStore, AsyncRedisStore])
def test_a_bad_url_is_refused_without_echoing_it(
    url: str, kind: type[RedisStore] | type[AsyncRedisStore]
) -> None:
    with pytest.raises(InvalidRequest) as info:  # not redis-py's bare ValueError
        kind(url)
    assert "hunter2" not in str(info.value)
    assert info.value.__cause__ is None


def test_construction_does_no_io() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    assert store.blocking is True
    store.close()


def test_repr_never_shows_the_url() -> None:
    store = RedisStore("redis://user:hunter2@127.0.0.1:6379/0", prefix="p")
    assert repr(store) == "<RedisStore prefix='p'>"
    assert "hunter2" not in repr(store)


def test_lazy_export() -> None:
    import jitbroker.stores

    assert jitbroker.stores.RedisStore is RedisStore
    assert "RedisStore" not in jitbroker.stores.__all__  # `import *` never needs redis


def test_a_url_store_owns_its_client(new_store: Callable[..., RedisStore]) -> None:
    store = new_store(URL)
    assert store.add(make("a")) is True
    store.close()
    store.close()
    assert store.get("a") == make("a")  # redis-py reconnects on use after close


def test_a_borrowed_client_is_left_open(
    client: redis.Redis, new_store: Callable[..., RedisStore]
) -> None:
    new_store(client).close()
    assert client.ping()


@pytest.mark.parametrize("decode", [False, True], ids=["bytes", "str"])
def test_works_with_either_response_decoding(
    new_store: Callable[..., RedisStore], decode: bool
) -> None:
    store = new_store(fast_client(decode_responses=decode))
    parent = make("p", task="t", owner="o", purpose="ünïcode ✓")
    child = make("c", at=T0 + 1, ttl=10, parent="p", task="t")
    assert store.add(parent) is True
    assert store.add(child) is True
    assert store.get("p") == parent
    assert {lease.id for lease in store.find(LeaseFilter(task="t"))} == {"p", "c"}
    assert store.extend("c", expires_at=T0 + 20, at=T0 + 2) == attrs.evolve(
        child, expires_at=T0 + 20
    )
    assert {lease.id for lease in store.revoke("p", at=T0 + 3, reason="x")} == {"p", "c"}
    assert store.purge(T0 + 1000) == 2
    backed = make("b", provider="db", owner="ünïcode ✓")
    assert store.add(backed, outbox=HELD) is True
    assert {job.lease for job in store.jobs()} == {backed}
    job = store.get_job("b/create/db")
    assert job is not None
    assert (job.claim, job.due, job.lease) == ("c1", T0 + 30.125, backed)
    [held] = store.claim_jobs(T0 + 31, ["create:db"], claim="x", until=T0 + 40)
    assert attrs.evolve(job, claim="x", due=T0 + 40) == held
    assert [j.id for j in store.forget_jobs(["b/create/db"])] == ["b/create/db"]


# -- layout -----------------------------------------------------------------
def test_every_key_carries_the_hash_tag(client: redis.Redis, store: RedisStore) -> None:
    store.add(make("root", task="t", owner="o", key_id="k"))
    store.add(make("child", parent="root", task="t", owner="o", subject="svc:b"))
    store.add(make("other", ttl=1))
    store.add(make("backed", provider="db", expire_hooks="app.x"), outbox=HELD)
    store.revoke("child", at=T0 + 1, reason="x")
    store.claim_expired(T0 + 1)
    [job] = store.claim_jobs(T0 + 31, ["create:db"], claim="c", until=T0 + 32)
    store.fail_job(job.id, "c", due=T0 + 2, error="E", park=True)
    keys = keys_of(client, store)
    tag = f"{{{store.prefix}}}:"
    assert f"{tag}lease:root" in keys
    assert {f"{tag}exp", f"{tag}dead", f"{tag}all", f"{tag}idx:task:t"} <= keys
    assert {f"{tag}job:backed/create/db", f"{tag}queue:on_issue:app.a", f"{tag}jobs"} <= keys
    assert {f"{tag}parked", f"{tag}idx:provider:db"} <= keys
    assert len({key_slot(key.encode()) for key in keys}) == 1  # one Cluster slot


def test_floats_round_trip_exactly(store: RedisStore) -> None:
    # Lua's tostring() keeps 14 digits; these need 17, so they must never pass through it.
    issued, expires, at = T0 + 0.1 + 1e-7, T0 + 1 / 3, T0 + 0.2 + 3e-7
    lease = make("a", at=issued, ttl=expires - issued)
    assert store.add(lease) is True
    extended = store.extend("a", expires_at=T0 + 2 / 3, at=at)
    assert extended is not None
    assert extended.expires_at == T0 + 2 / 3
    (revoked,) = store.revoke("a", at=at, reason="x")
    assert revoked.revoked_at == at
    assert store.get("a") == revoked
    assert store.get("a") == attrs.evolve(
        lease, expires_at=T0 + 2 / 3, revoked_at=at, revoke_reason="x"
    )


def test_non_finite_times_are_refused_before_any_io(client: redis.Redis, store: RedisStore) -> None:
    with pytest.raises(InvalidRequest):
        store.add(make("a", ttl=float("nan")))
    store.add(make("b"))
    with pytest.raises(InvalidRequest):
        store.extend("b", expires_at=float("inf"), at=T0)
    assert store.get("a") is None
    assert store.get("b") == make("b")


# -- one round trip per call --------------------------------------------------
class CountingConnection(redis.Connection):
    """Counts what is sent: one send (then one reply) is one round trip."""

    sent: ClassVar[list[str]] = []

    def send_command(self, *args: Any, **kwargs: Any) -> None:
        self.sent.append(str(args[0]))
        super().send_command(*args, **kwargs)  # type: ignore[no-untyped-call]  # unannotated


def test_each_call_is_one_round_trip(new_store: Callable[..., RedisStore]) -> None:
    pool = redis.ConnectionPool(
        connection_class=CountingConnection, host="127.0.0.1", port=6379, socket_timeout=2
    )
    store = new_store(redis.Redis(connection_pool=pool))
    # Warm up: connect, and load each script once (EVALSHA -> NOSCRIPT -> SCRIPT LOAD).
    store.add(make("w", task="w"))
    store.add(make("wc", parent="w"))
    store.extend("w", expires_at=T0 + 61, at=T0)
    store.find(LeaseFilter(task="w"))
    store.revoke("w", at=T0 + 1, reason="x")
    store.revoke_where(LeaseFilter(owner="nobody"), at=T0, reason="x")
    store.claim_expired(T0)
    store.purge(T0)
    store.get("w")
    store.add(make("wp", provider="db"), [Quota("svc:a", None, 100)], outbox=HELD)
    store.claim_jobs(T0, ["create:db"], claim="w", until=T0 + 1)
    store.finish_jobs(["wp/create/db"], "w")
    store.fail_job("wp/on_issue/app.a", "c1", due=T0, error="E", park=True)
    store.jobs()
    store.retry_jobs(None, T0)
    store.forget_jobs(["wp/on_issue/app.a"])

    calls: dict[str, Callable[[], object]] = {
        "add": lambda: store.add(make("a", task="t")),
        "add-child": lambda: store.add(make("c", at=T0 + 1, parent="a", task="t")),
        "get": lambda: store.get("a"),
        "extend": lambda: store.extend("a", expires_at=T0 + 90, at=T0 + 1),
        "find": lambda: store.find(LeaseFilter(task="t")),
        "revoke": lambda: store.revoke("a", at=T0 + 2, reason="x"),
        "revoke_where": lambda: store.revoke_where(LeaseFilter(task="t"), at=T0, reason="x"),
        "claim_expired": lambda: store.claim_expired(T0 + 1000),
        "purge": lambda: store.purge(T0 + 1000),
        # With jobs, an event is still its one script.
        "add with jobs": lambda: store.add(make("p", provider="db"), outbox=HELD),
        "add counted with jobs": lambda: store.add(
            make("q", provider="db"), [Quota("svc:a", None, 100)], outbox=HELD
        ),
        "revoke with jobs": lambda: store.revoke("p", at=T0 + 2, reason="x", outbox=HELD),
        "revoke_where with jobs": lambda: store.revoke_where(
            LeaseFilter(provider="db"), at=T0 + 2, reason="x", outbox=HELD
        ),
        "claim_expired with jobs": lambda: store.claim_expired(T0 + 1000, outbox=HELD),
        "claim_jobs": lambda: store.claim_jobs(T0 + 2, ["revoke:db"], claim="x", until=T0 + 9),
        "claim_jobs, no kinds": lambda: store.claim_jobs(T0, [], claim="x", until=T0 + 9),
        "finish_jobs": lambda: store.finish_jobs(["p/revoke/db"], "x"),
        "fail_job": lambda: store.fail_job("q/revoke/db", "c1", due=T0, error="E", park=True),
        "get_job": lambda: store.get_job("q/revoke/db"),
        "jobs": lambda: store.jobs(),
        "retry_jobs": lambda: store.retry_jobs(None, T0 + 3),
        "forget_jobs": lambda: store.forget_jobs(["q/revoke/db"]),
    }
    trips = {}
    for name, call in calls.items():
        CountingConnection.sent.clear()
        call()
        trips[name] = list(CountingConnection.sent)
    assert trips == {
        "add": ["EVALSHA"],
        "add-child": ["EVALSHA"],
        "get": ["HGETALL"],
        "extend": ["EVALSHA"],
        "find": ["EVALSHA"],
        "revoke": ["EVALSHA"],
        "revoke_where": ["EVALSHA"],
        "claim_expired": ["EVALSHA"],
        "purge": ["EVALSHA"],
        "add with jobs": ["EVALSHA"],
        "add counted with jobs": ["EVALSHA"],
        "revoke with jobs": ["EVALSHA"],
        "revoke_where with jobs": ["EVALSHA"],
        "claim_expired with jobs": ["EVALSHA"],
        "claim_jobs": ["EVALSHA"],
        "claim_jobs, no kinds": [],
        "finish_jobs": ["EVALSHA"],
        "fail_job": ["EVALSHA"],
        "get_job": ["EVALSHA"],
        "jobs": ["EVALSHA"],
        "retry_jobs": ["EVALSHA"],
        "forget_jobs": ["EVALSHA"],
    }


def test_a_big_purge_runs_in_batches(store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_module, "PURGE_BATCH", 2)
    for i in range(5):
        store.add(make(f"l{i}", task="t"))
    assert len(store.revoke_where(LeaseFilter(task="t"), at=T0, reason="x")) == 5
    assert store.purge(T0 + 1000) == 5
    assert store.find(LeaseFilter()) == []


# -- several brokers on one store -------------------------------------------
def test_separate_clients_claim_disjoint_leases(
    client: redis.Redis, new_store: Callable[..., RedisStore]
) -> None:
    prefix = f"jbtest-{uuid4().hex}"
    stores = [new_store(fast_client(), prefix=prefix) for _ in range(4)]
    count = 200
    for i in range(count):
        stores[0].add(make(f"l{i:03}", ttl=1 + i % 5))
    stores[1].extend("l000", expires_at=T0 + 500, at=T0)  # renewed: not due at T0 + 100
    claimed: list[str] = []
    while True:
        batches = [store.claim_expired(T0 + 100, limit=9) for store in stores]
        if not any(batches):
            break
        claimed += [lease.id for batch in batches for lease in batch]
    assert len(claimed) == len(set(claimed)) == count - 1
    assert [lease.id for lease in stores[3].claim_expired(T0 + 500)] == ["l000"]


# -- key expiry of dead records ---------------------------------------------
def test_only_dead_records_get_a_ttl(client: redis.Redis, store: RedisStore) -> None:
    store.add(make("live"))
    store.add(make("revoked"))
    store.add(make("claimed", ttl=1))
    store.revoke("revoked", at=T0, reason="x")
    store.claim_expired(T0 + 1)
    tag = f"{{{store.prefix}}}:lease:"
    assert client.pttl(tag + "live") == -1
    for dead in ("revoked", "claimed"):
        assert 0 < client.pttl(tag + dead) <= 86_400_000  # from the server's clock, not T0


def test_no_ttl_without_retention(
    client: redis.Redis, new_store: Callable[..., RedisStore]
) -> None:
    store = new_store(retention=None)
    store.add(make("a"))
    store.revoke("a", at=T0, reason="x")
    assert client.pttl(f"{{{store.prefix}}}:lease:a") == -1


def test_purge_unindexes_records_redis_already_dropped(
    client: redis.Redis, new_store: Callable[..., RedisStore]
) -> None:
    store = new_store(retention=0.02)
    store.add(make("root", task="t", owner="o", subject="s", key_id="k"))
    store.add(make("child", at=T0 + 1, parent="root", task="t"))
    store.add(make("live", task="t"))
    assert len(store.revoke("root", at=T0 + 2, reason="x")) == 2
    assert poll(lambda: store.get("root") is None and store.get("child") is None)
    assert [lease.id for lease in store.find(LeaseFilter(task="t"))] == ["live"]
    assert store.purge(T0 + 1000) == 0  # nothing left to delete, but unindexed
    tag = f"{{{store.prefix}}}:"
    assert keys_of(client, store) == {
        f"{tag}{name}"
        for name in (
            "lease:live",
            "exp",
            "all",
            "idx:task:t",
            "idx:subject:svc:a",
            "live:svc:a",  # the quota count of the one live lease
            "epoch",
            "revseq",  # the revocation log: its last number...
            "revlog",  # ...and its entries (trimmed after an hour)
        )
    }


# -- revocation channel -----------------------------------------------------
def test_the_first_add_into_an_empty_store_sets_the_epoch(
    client: redis.Redis, store: RedisStore
) -> None:
    key = f"{{{store.prefix}}}:epoch"
    assert client.get(key) is None
    before = time.time()
    store.add(make("a"))  # T0 is long past: the epoch is the server's time, not the lease's
    epoch = float(client.get(key) or 0)
    assert before - 1 <= epoch <= time.time() + 1
    store.add(make("b"))
    store.revoke("a", at=T0 + 1, reason="x")
    assert float(client.get(key) or 0) == epoch  # written once
    store.clear()
    store.add(make("c"))
    assert float(client.get(key) or 0) >= epoch  # an emptied store starts a new one


def test_revocations_are_numbered_in_the_log(client: redis.Redis, store: RedisStore) -> None:
    store.add(make("root"))
    store.add(make("child", at=T0 + 1, parent="root"))
    store.add(make("other"))
    store.revoke("root", at=T0 + 2, reason="x")
    store.revoke("root", at=T0 + 3, reason="x")  # nothing transitions: nothing logged
    store.revoke("other", at=T0 + 3, reason="x")
    entries: Any = client.xrange(f"{{{store.prefix}}}:revlog")
    logged = [(fields[b"n"], sorted(json.loads(fields[b"ids"]))) for _, fields in entries]
    assert logged == [(b"1", ["child", "root"]), (b"2", ["other"])]
    assert client.get(f"{{{store.prefix}}}:revseq") == b"2"


# -- errors -----------------------------------------------------------------
def test_a_corrupt_record_is_a_store_error(client: redis.Redis, store: RedisStore) -> None:
    store.add(make("a", task="t"))
    client.hset(f"{{{store.prefix}}}:lease:a", "expires_at", "soon")
    with pytest.raises(StoreError, match="expires_at"):
        store.get("a")
    with pytest.raises(StoreError, match="expires_at"):
        store.find(LeaseFilter(task="t"))


def test_a_redis_error_is_a_store_error(client: redis.Redis, store: RedisStore) -> None:
    client.set(f"{{{store.prefix}}}:lease:a", "not a hash")
    with pytest.raises(StoreError) as caught:
        store.get("a")
    assert not isinstance(caught.value, StoreUnavailable)
    assert isinstance(caught.value.__cause__, redis.ResponseError)


CALLS: dict[str, Callable[[RedisStore], object]] = {
    "add": lambda store: store.add(make("a")),
    "add with jobs": lambda store: store.add(make("a", provider="db"), outbox=HELD),
    "get": lambda store: store.get("a"),
    "revoke": lambda store: store.revoke("a", at=T0, reason="x"),
    "revoke_where": lambda store: store.revoke_where(LeaseFilter(task="t"), at=T0, reason="x"),
    "extend": lambda store: store.extend("a", expires_at=T0 + 1, at=T0),
    "find": lambda store: store.find(LeaseFilter()),
    "claim_expired": lambda store: store.claim_expired(T0),
    "purge": lambda store: store.purge(T0),
    "clear": lambda store: store.clear(),
    "claim_jobs": lambda store: store.claim_jobs(T0, ["on_revoke:h"], claim="c", until=T0),
    "finish_jobs": lambda store: store.finish_jobs(["a/on_revoke/h"], "c"),
    "fail_job": lambda store: store.fail_job("a/on_revoke/h", "c", due=T0, error="", park=False),
    "get_job": lambda store: store.get_job("a/on_revoke/h"),
    "jobs": lambda store: store.jobs(),
    "retry_jobs": lambda store: store.retry_jobs(None, T0),
    "forget_jobs": lambda store: store.forget_jobs(["a/on_revoke/h"]),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_no_server_is_store_unavailable(call: Callable[[RedisStore], object]) -> None:
    store = RedisStore(fast_client(free_port()))  # nothing listens there
    with pytest.raises(StoreUnavailable) as caught:
        call(store)
    assert isinstance(caught.value.__cause__, redis.ConnectionError)


# -- a private server, killed and restarted ---------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateServer:
    """A ``redis-server`` of our own on a free port, with an fsync'd append-only
    file so that what it acknowledged survives a kill and a restart."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary, self.directory, self.port = binary, directory, free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                *("--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "yes", "--appendfsync", "always"),
                *("--dir", str(self.directory)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        probe = fast_client(self.port)
        # A start-up budget of its own: on a loaded machine a fresh redis-server
        # (appendfsync always) can take seconds; a passing start waits no longer.
        assert poll_long(lambda: self._answers(probe)), "the private redis-server did not start"
        probe.close()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    @staticmethod
    def _answers(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[PrivateServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; under CI=true it must be")
        pytest.skip(message)
    server = PrivateServer(binary, tmp_path)
    server.start()
    yield server
    server.kill()


def test_a_killed_server_is_unavailable_then_recovers(private_server: PrivateServer) -> None:
    store = RedisStore(fast_client(private_server.port), prefix="fault")
    parent = make("parent", task="t")
    child = make("child", at=T0 + 1, parent="parent", task="t")
    assert store.add(parent) is True

    private_server.kill()
    with pytest.raises(StoreUnavailable) as caught:
        store.add(child)
    assert isinstance(caught.value.__cause__, redis.ConnectionError)
    with pytest.raises(StoreUnavailable):
        store.get("parent")
    with pytest.raises(StoreUnavailable):
        store.revoke("parent", at=T0 + 2, reason="x")

    private_server.start()  # same port, same append-only file
    # The same store object, not rebuilt: it reconnects on its own.
    assert store.get("parent") == parent  # acknowledged before the kill: kept
    assert store.get("child") is None  # refused while down: nothing half-written
    assert store.find(LeaseFilter(task="t")) == [parent]
    assert store.add(child) is True
    assert {lease.id for lease in store.revoke("parent", at=T0 + 2, reason="x")} == {
        "parent",
        "child",
    }
    store.close()


# -- a private server past maxmemory (noeviction) ----------------------------------
BALLAST = "ballast"


def fill(client: redis.Redis) -> None:
    """Take the server past ``maxmemory`` with policy ``noeviction``: a 2 MB key,
    then a limit 1 MB above what the server used without it (deleting the key
    brings it back below). The key is sent on a connection of its own, closed at
    once: a connection keeps its 2 MB query buffer, counted as used memory."""
    used = int(client.info("memory")["used_memory"])
    writer = fast_client(client.get_connection_kwargs()["port"])
    writer.set(BALLAST, b"x" * 2_000_000)
    writer.close()
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", used + 1_000_000)
    assert int(client.info("memory")["used_memory"]) > used + 1_000_000
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("probe", "x")  # the server's own refusal, before any script


def snapshot(client: redis.Redis, prefix: str) -> dict[bytes, bytes | None]:
    """Every key of the store with its serialized value: equal means nothing written."""
    pattern = f"{{{prefix}}}:*"
    return {key: client.dump(key) for key in client.scan_iter(match=pattern)}


def test_past_maxmemory_issuing_fails_closed_and_revoking_still_works(
    private_server: PrivateServer,
) -> None:
    client = fast_client(private_server.port)
    store = RedisStore(client, prefix="oom")
    clock = FakeClock(T0)
    broker = Broker(issuer=TEST_ISSUER, keys=KeyRing.generate("EdDSA"), store=store, clock=clock)
    kept = broker.issue("svc:a", "api", ["read"], ttl=600, task="t")
    owned = broker.issue("svc:a", "api", ["read"], ttl=600, owner="alice")
    short = broker.issue("svc:a", "api", ["read"], ttl=10)
    fill(client)
    before = snapshot(client, "oom")

    with pytest.raises(StoreError, match="out of memory") as caught:
        broker.issue("svc:a", "api", ["read"], ttl=60)
    assert isinstance(caught.value.__cause__, redis.exceptions.OutOfMemoryError)
    with pytest.raises(StoreError, match="out of memory"):
        broker.attenuate(kept, ttl=30)  # a child is an add too
    with pytest.raises(StoreError, match="out of memory"):
        store.add(make("counted"), [Quota("svc:a", None, 100)])  # the quota-counting script
    with pytest.raises(StoreError, match="out of memory"):
        broker.renew(kept, ttl=900)  # extend
    assert snapshot(client, "oom") == before  # refused whole: nothing written
    by_id = operator.attrgetter("id")
    stored = sorted(store.find(LeaseFilter()), key=by_id)
    assert stored == sorted([kept.lease, owned.lease, short.lease], key=by_id)  # reads run

    client.script_flush()  # as after a restart: the scripts are loaded again while full
    assert broker.revoke(kept) is True
    assert store.get(kept.lease_id).revoked_at is not None  # type: ignore[union-attr]
    with pytest.raises(TokenRevoked):
        broker.verify(kept.token, audience="api")
    assert broker.revoke_where(owner="alice", reason="offboarded") == 1
    clock.advance(11)
    assert [lease.id for lease in broker.sweep()] == [short.lease_id]
    assert store.purge(T0 + 10_000) == 3  # frees memory: runs too

    client.delete(BALLAST)  # back below maxmemory: issuing works again
    cred = broker.issue("svc:a", "api", ["read"], ttl=60)
    assert store.get(cred.lease_id) == cred.lease
    assert broker.verify(cred.token, audience="api").lease_id == cred.lease_id
    client.close()


def test_a_server_without_script_flags_is_named(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redis 6 parses "#!lua" as Lua and fails to compile (no server of that age here).
    def redis_6(**_: object) -> None:
        raise redis.ResponseError(
            "Error compiling script (new function): user_script:1: unexpected symbol near '#'"
        )

    monkeypatch.setattr(store, "_add", redis_6)
    with pytest.raises(StoreError, match=r"needs Redis 7\.0 or newer") as caught:
        store.add(make("a"))
    assert isinstance(caught.value.__cause__, redis.ResponseError)


def test_an_id_stored_again_replaces_the_old_record_whole(store: RedisStore) -> None:
    store.add(make("a", task="old", owner="o"))
    store.revoke("a", at=T0, reason="x")
    again = make("a", task="new")
    assert store.add(again) is True
    assert store.get("a") == again
    assert store.find(LeaseFilter(task="old")) == []
    assert store.revoke_where(LeaseFilter(owner="o"), at=T0, reason="x") == []
    assert store.purge(T0 + 1000) == 0  # the old record's DEAD entry went with it
    assert store.get("a") == again


# -- several OS processes ---------------------------------------------------------
CLAIMER = """if True:
    import json, os, sys, time
    from jitbroker.stores.redis import RedisStore

    url, prefix, ready, go, now = sys.argv[1:6]
    store = RedisStore(url, prefix=prefix)
    open(ready, "w").close()
    while not os.path.exists(go):
        time.sleep(0.005)
    claimed = []
    while batch := store.claim_expired(float(now), limit=5):
        claimed += [lease.id for lease in batch]
    store.close()
    print(json.dumps(claimed))
"""


def test_claim_expired_is_exactly_once_across_processes(store: RedisStore, tmp_path: Path) -> None:
    import sys

    count, workers = 400, 4
    for i in range(count):
        store.add(make(f"l{i:03}", ttl=1 + i % 11))
    go = tmp_path / "go"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CLAIMER,
                URL,
                store.prefix,
                str(tmp_path / f"ready{n}"),
                str(go),
                str(T0 + 100),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for n in range(workers)
    ]
    try:
        assert poll_long(lambda: all((tmp_path / f"ready{n}").exists() for n in range(workers)))
        go.touch()
        outputs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    claimed = [lease_id for out, _ in outputs for lease_id in json.loads(out)]
    assert sorted(claimed) == [f"l{i:03}" for i in range(count)]  # each exactly once


def poll_long(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + 30
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# -- the outbox: the jobs are written by the event's own script ---------------
OUTBOXES = {
    "no outbox": NO_OUTBOX,
    "hooks held, has db": HELD,
    "hooks unclaimed": Outbox(hooks=("app.a",), providers=frozenset({"db"}), limit=7),
    "held, no hooks, no providers": Outbox(claim="c2", until=T0 + 1 / 3),
}
LEASES = {
    "plain": {},
    "provider db": {"provider": "db"},
    "provider cache": {"provider": "cache"},
    "expire hooks": {"expire_hooks": "app.x app.y"},
    "everything": {
        "provider": "db",
        "expire_hooks": "app.x",
        "task": "t",
        "owner": "ünïcode ✓",
        "purpose": 'quotes " and \\ and /',
        "holder": "h" * 43,
        "issuer": "urn:x",
        "task_run": "r" * 24,
    },
}


def written(store: RedisStore) -> dict[str, Job]:
    return {job.id: job for job in store.jobs()}


def by_id(jobs: list[Job]) -> dict[str, Job]:
    return {job.id: job for job in jobs}


@pytest.mark.parametrize("outbox", OUTBOXES.values(), ids=OUTBOXES.keys())
@pytest.mark.parametrize("fields", LEASES.values(), ids=LEASES.keys())
def test_the_lua_writes_what_event_jobs_says(
    store: RedisStore, fields: dict[str, Any], outbox: Outbox
) -> None:
    # Times that need 17 digits: the jobs' due must never pass through a Lua number.
    issued = T0 + 0.1 + 1e-7
    lease = make("a" * 32, at=issued, ttl=60.2, **fields)
    child = make("b" * 32, at=issued + 1, parent=lease.id, **fields)
    assert store.add(lease, outbox=outbox) is True
    assert store.add(child) is True  # NO_OUTBOX: only a provider's create
    want = event_jobs("on_issue", lease, outbox, issued) + event_jobs(
        "on_issue", child, NO_OUTBOX, child.issued_at
    )
    assert written(store) == by_id(want)
    store.forget_jobs(list(written(store)))

    at = T0 + 2 / 3
    revoked = store.revoke(lease.id, at=at, reason="r", outbox=outbox)  # the subtree: both
    assert len(revoked) == 2
    assert written(store) == by_id(
        [j for x in revoked for j in event_jobs("on_revoke", x, outbox, at)]
    )
    store.forget_jobs(list(written(store)))

    other = make("c" * 32, at=issued, **{**fields, "task": "w"})
    assert store.add(other) is True
    store.forget_jobs(list(written(store)))
    [gone] = store.revoke_where(LeaseFilter(task="w"), at=at, reason="r", outbox=outbox)
    assert written(store) == by_id(event_jobs("on_revoke", gone, outbox, at))
    store.forget_jobs(list(written(store)))

    expiring = make("d" * 32, at=issued, **fields)
    assert store.add(expiring) is True
    store.forget_jobs(list(written(store)))
    now = expiring.expires_at + 1e-6
    hooks = [fields["expire_hooks"]] if "expire_hooks" in fields else []
    [claimed] = store.claim_expired(now, 10, hooks, outbox=outbox)
    assert written(store) == by_id(event_jobs("on_expire", claimed, outbox, now))


def test_a_job_is_a_hash_in_its_kinds_queue(client: redis.Redis, store: RedisStore) -> None:
    lease = make("a" * 32, provider="db", owner="ünïcode ✓")
    assert store.add(lease, outbox=HELD) is True
    tag = f"{{{store.prefix}}}:"
    raw = client.hgetall(f"{tag}job:{lease.id}/create/db")
    snapshot = json.loads(raw.pop(b"lease"))
    assert raw == {
        b"id": f"{lease.id}/create/db".encode(),
        b"event": b"create",
        b"name": b"db",
        b"due": repr(T0 + 30.125).encode(),
        b"limit": b"3",
        b"attempts": b"0",
        b"error": b"",
        b"parked": b"0",
        b"claim": b"c1",
    }
    assert from_mapping(snapshot) == lease
    assert client.zscore(f"{tag}queue:create:db", f"{lease.id}/create/db") == T0 + 30.125
    assert client.zcard(f"{tag}jobs") == 3
    assert client.exists(f"{tag}parked") == 0
    # No outbox and no provider: the script is told to skip the jobs section.
    assert add_args(make("b" * 32), NO_OUTBOX) == ("0", "")
    assert store.add(make("b" * 32)) is True
    assert client.zcard(f"{tag}jobs") == 3


def test_claim_jobs_orders_ties_by_id_byte_by_byte(store: RedisStore) -> None:
    # Lua compares strings by the server's locale; a sorted set and Python by bytes.
    ids = ["B" * 32, "a" * 32, "_" * 32, "Z" * 32]
    for n, lease_id in enumerate(ids):
        assert store.add(make(lease_id)) is True
        hook = "x" if n % 2 else "y"
        store.revoke(lease_id, at=T0 + 1, reason="r", outbox=Outbox(hooks=(hook,)))
    got = store.claim_jobs(T0 + 1, ["on_revoke:x", "on_revoke:y"], claim="c", until=T0 + 9)
    assert [job.id for job in got] == sorted(job.id for job in got)
    assert [job.lease.id for job in got] == sorted(ids)
    first = store.claim_jobs(
        T0 + 9, ["on_revoke:y", "on_revoke:x"], claim="d", until=T0 + 20, limit=1
    )
    assert [job.lease.id for job in first] == ["B" * 32]


def test_the_provider_filter_is_served_by_an_index(client: redis.Redis, store: RedisStore) -> None:
    assert store.add(make("a", provider="db")) is True
    assert store.add(make("b", provider="cache")) is True
    assert store.add(make("c")) is True
    key = f"{{{store.prefix}}}:idx:provider:db"
    assert client.smembers(key) == {b"a"}
    assert [lease.id for lease in store.find(LeaseFilter(provider="db"))] == ["a"]
    assert [x.id for x in store.revoke_where(LeaseFilter(provider="db"), at=T0, reason="r")] == [
        "a"
    ]
    assert store.purge(T0 + 1000) == 1
    assert client.exists(key) == 0


def test_purge_and_expired_records_leave_the_jobs(
    client: redis.Redis, new_store: Callable[..., RedisStore]
) -> None:
    store = new_store(retention=0.02)
    lease = make("a", provider="db")
    assert store.add(lease) is True
    [revoked] = store.revoke("a", at=T0 + 1, reason="r", outbox=Outbox(hooks=("h",)))
    assert poll(lambda: store.get("a") is None)  # Redis dropped the dead record itself
    assert store.purge(T0 + 10_000) == 0
    assert store.get("a") is None
    assert set(written(store)) == {"a/create/db", "a/revoke/db", "a/on_revoke/h"}
    job = store.get_job("a/revoke/db")
    assert job is not None
    assert job.lease == revoked  # the snapshot outlives the record
    tag = f"{{{store.prefix}}}:job:"
    assert all(client.pttl(tag + job_id) == -1 for job_id in written(store))  # no TTL, ever


def test_a_corrupt_job_is_a_store_error(client: redis.Redis, store: RedisStore) -> None:
    store.add(make("a", provider="db"))
    client.hset(f"{{{store.prefix}}}:job:a/create/db", "lease", "{not json")
    with pytest.raises(StoreError, match="corrupt outbox job 'a/create/db'"):
        store.get_job("a/create/db")
    with pytest.raises(StoreError, match="corrupt outbox job"):
        store.jobs()


def test_unparked_listing_skips_parked_jobs(store: RedisStore) -> None:
    for n in range(7):
        lease_id = f"{n:032x}"
        assert store.add(make(lease_id)) is True
        store.revoke(lease_id, at=T0 + n, reason="r", outbox=Outbox(hooks=("h",)))
    for job in store.claim_jobs(T0 + 9, ["on_revoke:h"], claim="c", until=T0 + 99, limit=5):
        assert store.fail_job(job.id, "c", due=job.lease.revoked_at or 0, error="E", park=True)
    assert [job.due for job in store.jobs(parked=False, limit=1)] == [T0 + 5]
    assert [job.due for job in store.jobs(parked=False)] == [T0 + 5, T0 + 6]
    assert [job.due for job in store.jobs(parked=True, limit=2)] == [T0, T0 + 1]
    assert len(store.jobs(limit=6)) == 6
    assert store.jobs(limit=0) == []


JOB_CLAIMER = """if True:
    import json, os, sys, time
    from jitbroker.stores.redis import RedisStore

    url, prefix, ready, go, name = sys.argv[1:6]
    store = RedisStore(url, prefix=prefix)
    open(ready, "w").close()
    while not os.path.exists(go):
        time.sleep(0.005)
    kinds, taken = ["on_revoke:h", "revoke:db"], []
    while batch := store.claim_jobs(2e9, kinds, claim=name, until=3e9, limit=3):
        taken += [job.id for job in batch if job.claim == name]
    store.close()
    print(json.dumps(taken))
"""


def test_concurrent_claimers_never_share_a_job(store: RedisStore, tmp_path: Path) -> None:
    import sys

    count, workers = 150, 4
    for i in range(count):
        lease = make(f"l{i:03}", provider="db" if i % 3 == 0 else None)
        assert store.add(lease) is True
        store.revoke(lease.id, at=T0 + i % 7, reason="r", outbox=Outbox(hooks=("h",)))
    store.forget_jobs([job.id for job in store.jobs() if job.event == "create"])
    go = tmp_path / "go"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    procs = [
        subprocess.Popen(
            [
                *(sys.executable, "-c", JOB_CLAIMER, URL, store.prefix),
                *(str(tmp_path / f"ready{n}"), str(go), f"claimer{n}"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for n in range(workers)
    ]
    try:
        assert poll_long(lambda: all((tmp_path / f"ready{n}").exists() for n in range(workers)))
        go.touch()
        outputs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    taken = [job_id for out, _ in outputs for job_id in json.loads(out)]
    assert len(taken) == len(set(taken)) == count + count // 3  # each exactly once
    holders = {job.id: job.claim for job in store.jobs()}
    for n, (out, _) in enumerate(outputs):
        assert all(holders[job_id] == f"claimer{n}" for job_id in json.loads(out))


def test_past_maxmemory_revoking_still_records_and_runs_its_jobs(
    private_server: PrivateServer,
) -> None:
    client = fast_client(private_server.port)
    store = RedisStore(client, prefix="oom")
    lease = make("a", provider="db", expire_hooks="app.x")
    assert store.add(lease) is True
    assert store.add(make("b", provider="db", expire_hooks="app.x")) is True
    fill(client)
    with pytest.raises(StoreError, match="out of memory"):
        store.add(make("c", provider="db"), outbox=HELD)  # issuing fails closed, jobs too
    outbox = Outbox(providers=frozenset({"db"}), claim="r", until=T0 + 30)
    [revoked] = store.revoke("a", at=T0 + 1, reason="r", outbox=outbox)
    assert store.claim_expired(T0 + 61, 10, ["app.x"], outbox=outbox) != []
    got = store.claim_jobs(T0 + 1, ["create:db"], claim="r", until=T0 + 30)
    assert {job.id for job in got} == {"a/create/db", "b/create/db"}
    assert store.finish_jobs([job.id for job in got], "r") == 2
    job = store.get_job("a/revoke/db")
    assert job is not None
    assert (job.claim, job.lease) == ("r", revoked)
    assert store.fail_job(job.id, "r", due=T0 + 2, error="E", park=True) is True
    assert store.retry_jobs(None, T0 + 3) == 1
    assert len(store.forget_jobs([j.id for j in store.jobs()])) == 3
    client.delete(BALLAST)
    client.close()
