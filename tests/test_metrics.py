"""``jitbroker.metrics``: the instruments (read with the SDK's in-memory reader),
``health()`` on real stores up and down, and ``/metrics`` + ``/healthz`` of the
served app under a real uvicorn."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from conftest import server_or_skip
from jitbroker import AsyncBroker, Broker, MemoryStore, Policy, Rule
from jitbroker.errors import (
    InvalidRequest,
    PolicyDenied,
    StoreError,
    TokenRevoked,
    WrongAudience,
)
from jitbroker.metrics import DEFAULT_LEASE_WARNING, Metrics
from jitbroker.stores.redis import RedisStore
from jitbroker.stores.sqlite import SQLiteStore
from jitbroker.testing import FakeClock
from redis_server import fast_client, free_port
from test_web_serve import write_config
from web_servers import uvicorn_server

OWNER = "alice@example.com"
SUBJECT = "svc:secret-subject"
Points = dict[str, list[tuple[dict[str, Any], Any]]]


def points(reader: InMemoryMetricReader) -> Points:
    """Every data point by instrument name: (attributes, value or histogram count)."""
    out: Points = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                out[metric.name] = [
                    (dict(p.attributes or {}), getattr(p, "count", None) or getattr(p, "value", 0))
                    for p in metric.data.data_points
                ]
    return out


def value(found: Points, name: str, **attributes: str) -> Any:
    return sum(v for a, v in found.get(name, []) if attributes.items() <= a.items())


def broker_with(reader: InMemoryMetricReader, **options: Any) -> tuple[Broker, Metrics]:
    metrics = Metrics(_provider(reader), verify_samples=10**9)
    return Broker(metrics=metrics, **options), metrics


_PROVIDERS: dict[int, MeterProvider] = {}


@pytest.fixture(autouse=True)
def _no_leftover_providers() -> Iterator[None]:
    yield
    for provider in _PROVIDERS.values():
        provider.shutdown()
    _PROVIDERS.clear()


def _provider(reader: InMemoryMetricReader) -> MeterProvider:
    # A reader belongs to one provider: make the test's provider with it.
    provider = _PROVIDERS.get(id(reader))
    if provider is None:
        provider = _PROVIDERS[id(reader)] = MeterProvider(
            metric_readers=[reader], shutdown_on_exit=False
        )
    return provider


@pytest.fixture
def memory_reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


def no_secret_in(found: Points, *secrets_: str) -> None:
    for name, series in found.items():
        for attributes, _ in series:
            for key, attr in attributes.items():
                for secret in secrets_:
                    assert secret not in str(attr), (name, key)


def test_import_jitbroker_does_not_import_opentelemetry() -> None:
    probe = (
        "import sys, jitbroker, jitbroker.broker\n"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry', 'prometheus'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_lease_counters_move_with_the_events(memory_reader: InMemoryMetricReader) -> None:
    clock = FakeClock()
    broker, _ = broker_with(memory_reader, clock=clock)
    a = broker.issue(SUBJECT, "db:orders", ["read"], ttl=60, owner=OWNER)
    b = broker.issue(SUBJECT, "db:orders", ["read"], ttl=60, owner=OWNER)
    c = broker.issue(SUBJECT, "api", ["read"], ttl=10, owner=OWNER)
    child = broker.attenuate(a, scopes=["read"], ttl=30)
    broker.revoke(b, reason="task-ended")
    broker.revoke(child, reason=f"ticket {secrets.token_hex(4)} closed by bob")  # free text
    clock.advance(11)
    assert [lease.id for lease in broker.sweep()] == [c.lease_id]
    found = points(memory_reader)
    assert value(found, "jitbroker.lease.issued", via="issue") == 3
    assert value(found, "jitbroker.lease.issued", via="attenuate") == 1
    assert value(found, "jitbroker.lease.issued", audience="db:orders") == 3
    assert value(found, "jitbroker.lease.revoked", reason="task-ended") == 1
    assert value(found, "jitbroker.lease.revoked", reason="other") == 1
    assert value(found, "jitbroker.lease.expired", audience="api", provider="none") == 1
    assert value(found, "jitbroker.lease.active") == 1  # a is all that is left
    for lease in (a, b, c, child):
        no_secret_in(found, lease.token, lease.lease_id, SUBJECT, OWNER)


def test_denials_count_policy_and_quota(memory_reader: InMemoryMetricReader) -> None:
    policy = Policy([Rule(subjects=["svc:*"], audiences=["db"], scopes=["read"], max_active=1)])
    broker, _ = broker_with(memory_reader, policy=policy)
    broker.issue("svc:a", "db", ["read"])
    with pytest.raises(PolicyDenied):
        broker.issue("svc:a", "db", ["write"])
    with pytest.raises(PolicyDenied):
        broker.issue("svc:a", "db", ["read"])
    found = points(memory_reader)
    assert value(found, "jitbroker.lease.denied", reason="policy", audience="db") == 1
    assert value(found, "jitbroker.lease.denied", reason="quota", audience="db") == 1


def test_verify_duration_by_outcome(memory_reader: InMemoryMetricReader) -> None:
    broker, _ = broker_with(memory_reader)
    cred = broker.issue(SUBJECT, "db", ["read"])
    broker.verify(cred.token, audience="db")
    broker.verify(cred.token, audience="db")
    with pytest.raises(WrongAudience):
        broker.verify(cred.token, audience="api")
    broker.revoke(cred)
    with pytest.raises(TokenRevoked):
        broker.verify(cred.token, audience="db")
    found = points(memory_reader)
    assert value(found, "jitbroker.verify.duration", outcome="ok") == 2
    assert value(found, "jitbroker.verify.duration", outcome="WrongAudience") == 1
    assert value(found, "jitbroker.verify.duration", outcome="TokenRevoked") == 1
    assert value(found, "jitbroker.verify.failed", outcome="TokenRevoked") == 1
    no_secret_in(found, cred.token, cred.lease_id, SUBJECT)


def test_verify_samples_bound_the_sdk_calls(memory_reader: InMemoryMetricReader) -> None:
    broker = Broker(metrics=Metrics(_provider(memory_reader), verify_samples=1))
    cred = broker.issue(SUBJECT, "db", ["read"])
    for _ in range(50):  # well within one second: one sample
        broker.verify(cred.token, audience="db")
    assert value(points(memory_reader), "jitbroker.verify.duration") == 1


def test_parked_hooks_are_counted(memory_reader: InMemoryMetricReader) -> None:
    def broken(lease: object) -> None:
        raise RuntimeError("backend down")

    broker, _ = broker_with(memory_reader, on_revoke=broken, hook_retries=0)
    broker.revoke(broker.issue(SUBJECT, "db", ["read"]))
    assert value(points(memory_reader), "jitbroker.hooks.parked", event="on_revoke") == 1
    health = broker.health()
    assert health.status == "degraded"
    assert health.parked == 1
    assert any("parked" in reason for reason in health.reasons)


def test_store_errors_are_counted(memory_reader: InMemoryMetricReader) -> None:
    store = RedisStore(fast_client(free_port()), prefix="jbmetrics")  # nobody listens
    broker, _ = broker_with(memory_reader, store=store)
    with pytest.raises(StoreError):
        broker.issue(SUBJECT, "db", ["read"])
    with pytest.raises(StoreError):
        broker.lease("0" * 32)
    found = points(memory_reader)
    errors = found["jitbroker.store.errors"]
    assert value(found, "jitbroker.store.errors", store="redis", operation="add") == 1
    assert value(found, "jitbroker.store.errors", store="redis", operation="get") == 1
    assert {a["error"] for a, _ in errors} == {"StoreUnavailable"}
    assert value(found, "jitbroker.lease.issued") == 0  # no token left


def test_audiences_are_capped(memory_reader: InMemoryMetricReader) -> None:
    broker = Broker(metrics=Metrics(_provider(memory_reader), max_audiences=2))
    for audience in ("a", "b", "c", "d"):
        broker.issue(SUBJECT, audience, ["read"])
    found = points(memory_reader)
    assert {a["audience"] for a, _ in found["jitbroker.lease.issued"]} == {"a", "b", "other"}


def test_metrics_needs_a_metrics_object() -> None:
    with pytest.raises(InvalidRequest, match="metrics must be"):
        Broker(metrics=object())  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="lease_warning_threshold"):
        Broker(lease_warning_threshold=0)


# -- health ---------------------------------------------------------------------
def test_health_of_a_memory_broker() -> None:
    broker = Broker()
    health = broker.health()
    assert health.status == "ok"
    assert health.ok
    assert health.reasons == ()
    assert health.store_reachable
    assert health.store_latency is not None
    assert health.revocation_feed == "none"
    assert health.feed_lag is None
    assert health.key_id == broker.keys.active.kid
    assert health.key_age is not None
    assert health.parked == 0
    assert health.active_leases == 0
    assert health.active_leases_source == "store"
    assert health.active_leases_age == 0.0
    assert health.lease_warning_threshold == DEFAULT_LEASE_WARNING
    json.dumps(health.to_dict())


class Uncounted:
    """A MemoryStore without ``count_active``, as a third-party store may be."""

    blocking = False

    def __init__(self) -> None:
        self.inner = MemoryStore()

    def __getattr__(self, name: str) -> Any:
        if name == "count_active":
            raise AttributeError(name)
        return getattr(self.inner, name)


def test_health_without_a_store_count_uses_the_metrics(
    memory_reader: InMemoryMetricReader,
) -> None:
    assert Broker(store=Uncounted()).health().active_leases_source == "unknown"
    broker = Broker(
        store=Uncounted(),
        metrics=Metrics(_provider(memory_reader)),
        lease_warning_threshold=2,
    )
    broker.issue(SUBJECT, "db", ["read"])
    assert broker.health().status == "ok"
    broker.issue(SUBJECT, "db", ["read"])
    health = broker.health()
    assert health.status == "degraded"
    assert health.active_leases == 2
    assert health.active_leases_source == "process"
    assert health.active_leases_age is None
    assert "2 active leases (warning threshold 2)" in health.reasons


def test_health_on_sqlite(tmp_path: Path) -> None:
    broker = Broker(store=SQLiteStore(tmp_path / "leases.db"))
    assert broker.health().status == "ok"
    broker.close()


def test_health_on_redis_up_and_down() -> None:
    server_or_skip("Redis", "127.0.0.1", 6379)
    up = Broker(store=RedisStore(fast_client(6379), prefix=f"jbhealth{secrets.token_hex(4)}"))
    store = up.store
    cache = store.revocations()  # type: ignore[attr-defined]
    live = Broker(store=store, revocations=cache)
    try:
        assert up.health().status == "ok"
        health = live.health()
        assert health.revocation_feed in ("live", "stale")
    finally:
        cache.close()
        up.close()
    down = Broker(store=RedisStore(fast_client(free_port()), prefix="jbhealth"))
    health = down.health()
    assert health.status == "down"
    assert not health.ok
    assert not health.store_reachable
    assert health.reasons[0].startswith("store unreachable: StoreUnavailable")


def test_health_times_out_on_a_frozen_store(tmp_path: Path) -> None:
    from redis_server import start_or_skip

    server = start_or_skip(tmp_path)
    try:
        broker = Broker(store=RedisStore(fast_client(server.port), prefix="jbfrozen"))
        assert broker.health().status == "ok"
        with server.frozen():
            health = broker.health(timeout=0.2)
        assert health.status == "down"
        assert "no answer within 0.2s" in health.reasons[0]
    finally:
        server.kill()


def test_async_broker_metrics_and_health(memory_reader: InMemoryMetricReader) -> None:
    async def main() -> None:
        broker = AsyncBroker(
            store=MemoryStore(), metrics=Metrics(_provider(memory_reader), verify_samples=10**9)
        )
        cred = await broker.issue(SUBJECT, "db", ["read"])
        await broker.verify(cred.token, audience="db")
        await broker.revoke(cred)
        with pytest.raises(TokenRevoked):
            await broker.verify(cred.token, audience="db")
        health = await broker.health()
        assert health.status == "ok"
        assert health.active_leases == 0

    asyncio.run(main())
    found = points(memory_reader)
    assert value(found, "jitbroker.lease.issued") == 1
    assert value(found, "jitbroker.lease.revoked") == 1
    assert value(found, "jitbroker.verify.duration", outcome="ok") == 1
    assert value(found, "jitbroker.verify.duration", outcome="TokenRevoked") == 1


def test_async_store_errors_are_counted(memory_reader: InMemoryMetricReader) -> None:
    async def main() -> None:
        store = RedisStore(fast_client(free_port()), prefix="jbmetrics")
        broker = AsyncBroker(store=store, metrics=Metrics(_provider(memory_reader)))
        with pytest.raises(StoreError):
            await broker.lease("0" * 32)
        assert (await broker.health()).status == "down"

    asyncio.run(main())
    assert value(points(memory_reader), "jitbroker.store.errors", operation="get") >= 1


# -- the served app -------------------------------------------------------------------
def test_served_metrics_and_healthz(tmp_path: Path) -> None:
    from jitbroker.web.serve import build

    config = write_config(
        tmp_path,
        'base_url = "http://127.0.0.1:1"\nmetrics = true\nhealth = true\n'
        "lease_warning_threshold = 1000",
        clients='[[clients]]\nclient_id = "x"\nsubject = "svc:x"\nsecret_hash = "' + _hash() + '"',
    )
    broker, app, _ = build(config)
    try:
        cred = broker.issue(SUBJECT, "db", ["read"], owner=OWNER)
        broker.verify(cred.token, audience="db")
        broker.revoke(cred, reason="task-ended")
        with uvicorn_server(app) as base:
            page = httpx.get(base + "/metrics", timeout=5)
            health = httpx.get(base + "/healthz", timeout=5)
    finally:
        broker.close()
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/plain")
    text = page.text
    for family in (
        "jitbroker_lease_issued",
        "jitbroker_lease_revoked",
        "jitbroker_lease_active",
        "jitbroker_verify_duration_seconds",
    ):
        assert f"# TYPE {family}" in text, family
    assert 'reason="task-ended"' in text
    for secret in (cred.token, cred.lease_id, SUBJECT, OWNER):
        assert secret not in text
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok"
    assert body["lease_warning_threshold"] == 1000


def test_served_app_without_metrics_has_no_endpoints(tmp_path: Path) -> None:
    from jitbroker.web.serve import build

    config = write_config(
        tmp_path,
        'base_url = "http://127.0.0.1:1"',
        clients='[[clients]]\nclient_id = "x"\nsubject = "svc:x"\nsecret_hash = "' + _hash() + '"',
    )
    broker, app, _ = build(config)
    try:
        with uvicorn_server(app) as base:
            assert httpx.get(base + "/metrics", timeout=5).status_code == 404
            assert httpx.get(base + "/healthz", timeout=5).status_code == 404
    finally:
        broker.close()


def _hash() -> str:
    from jitbroker.web import hash_client_secret

    return hash_client_secret("s3cret-" + secrets.token_hex(8))


# -- health counts active leases in the store (count_active), metrics or not ------------
def _counted_store(kind: str, tmp_path: Path) -> Any:
    """A fresh store of ``kind`` (a shared server: a scratch prefix or schema)."""
    from test_store_conformance import POSTGRES_DSN, REDIS_URL

    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        return SQLiteStore(tmp_path / "leases.db")
    if kind == "redis":
        server_or_skip("Redis", "127.0.0.1", 6379)
        return RedisStore(REDIS_URL, prefix=f"jbhealth{secrets.token_hex(4)}")
    server_or_skip("PostgreSQL", "127.0.0.1", 5432)
    from jitbroker.stores.postgres import PostgresStore

    return PostgresStore(POSTGRES_DSN, schema=f"jbhealth_{secrets.token_hex(4)}")


def _drop(store: Any) -> None:
    clear = getattr(store, "clear", None)
    if clear is not None:
        clear()
    store.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis", "postgres"])
def test_health_counts_the_stores_active_leases(kind: str, tmp_path: Path) -> None:
    store = _counted_store(kind, tmp_path)
    clock = FakeClock()
    broker = Broker(store=store, clock=clock, lease_warning_threshold=3)  # no metrics
    other = Broker(store=store, clock=clock, keys=broker.keys)  # another process, as far as
    try:  # the count goes: its leases are in the same store
        first = broker.issue(SUBJECT, "db", ["read"], ttl=60)
        broker.issue(SUBJECT, "db", ["read"], ttl=60)
        other.issue(SUBJECT, "db", ["read"], ttl=10)
        health = broker.health()
        assert (health.active_leases, health.active_leases_source) == (3, "store")
        assert health.active_leases_age == 0.0
        assert health.status == "degraded"
        assert health.reasons == ("3 active leases (warning threshold 3)",)
        broker.revoke(first)
        health = broker.health()
        assert (health.status, health.active_leases) == ("ok", 2)
        clock.advance(10)  # expired, not yet swept: not active either
        assert broker.health().active_leases == 1
        assert other.health().active_leases == 1
    finally:
        _drop(store)


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis-async"])
def test_async_broker_health_counts_in_the_store(kind: str, tmp_path: Path) -> None:
    """Over a sync store (through ``as_async``: a non-blocking one inline, a
    blocking one in a thread) and over the async Redis store."""

    async def main() -> None:
        if kind == "redis-async":
            server_or_skip("Redis", "127.0.0.1", 6379)
            from jitbroker.stores.redis_async import AsyncRedisStore
            from test_store_conformance import REDIS_URL

            store: Any = AsyncRedisStore(REDIS_URL, prefix=f"jbhealth{secrets.token_hex(4)}")
        else:
            store = _counted_store(kind, tmp_path)
        clock = FakeClock()
        broker = AsyncBroker(store=store, clock=clock, lease_warning_threshold=2)
        try:
            await broker.issue(SUBJECT, "db", ["read"], ttl=60)
            await broker.issue(SUBJECT, "db", ["read"], ttl=5)
            health = await broker.health()
            assert (health.active_leases, health.active_leases_source) == (2, "store")
            assert health.status == "degraded"
            clock.advance(5)
            health = await broker.health()
            assert (health.status, health.active_leases) == ("ok", 1)
        finally:
            if kind == "redis-async":
                await store.clear()
            await broker.close()

    asyncio.run(main())


class SlowCount:
    """A MemoryStore whose count takes 20 ms (a SQL store at ~300k leases)."""

    blocking = False

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.counts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def count_active(self, now: float) -> int:
        import time

        self.counts += 1
        time.sleep(0.02)
        return self.inner.count_active(now)


def test_a_slow_count_is_reused_for_a_while() -> None:
    from jitbroker.metrics import COUNT_REUSE

    store = SlowCount()
    broker = Broker(store=store)
    ticks = [1000.0]
    broker._health.monotonic = lambda: ticks[0]
    assert broker.health().active_leases == 0
    broker.issue(SUBJECT, "db", ["read"])
    ticks[0] += 5
    health = broker.health()  # the count of 5 s ago: the store is not asked
    assert (health.active_leases, health.active_leases_age, store.counts) == (0, 5.0, 1)
    assert health.store_latency is not None
    assert health.store_latency < 0.02  # the get and the job listing, not the count
    ticks[0] += COUNT_REUSE
    health = broker.health()
    assert (health.active_leases, health.active_leases_age, store.counts) == (1, 0.0, 2)


def test_a_fast_count_is_taken_by_every_probe() -> None:
    broker = Broker()
    assert broker.health().active_leases == 0
    broker.issue(SUBJECT, "db", ["read"])
    assert broker.health().active_leases == 1  # no reuse: counting a small store is cheap


def test_open_broker_takes_metrics_and_the_threshold(
    tmp_path: Path, memory_reader: InMemoryMetricReader
) -> None:
    from jitbroker.config import load_config

    config = load_config(write_config(tmp_path, 'base_url = "http://127.0.0.1:1"'))
    with pytest.raises(InvalidRequest, match="lease_warning_threshold"):
        config.open_broker(lease_warning_threshold=0)
    assert not (tmp_path / "leases.db").exists()  # refused before the store was opened
    broker = config.open_broker(
        metrics=Metrics(_provider(memory_reader)), lease_warning_threshold=1
    )
    try:
        broker.issue(SUBJECT, "db", ["read"])
        assert value(points(memory_reader), "jitbroker.lease.issued") == 1
        health = broker.health()
        assert (health.status, health.lease_warning_threshold) == ("degraded", 1)
        assert health.active_leases_source == "store"
    finally:
        broker.close()
    with pytest.raises(InvalidRequest, match="metrics must be"):
        config.open_broker(metrics=object())  # type: ignore[arg-type]
