"""Revocation feeds under attack and under races (issue 15: items 1, 3, 7, 12).

A feed's messages are hints, never the authority; ``revoke`` returns only once
every live cache has the revocation, or can no longer vouch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import psycopg
import pytest
import redis
from psycopg import sql

from conftest import server_or_skip
from jitbroker import Broker, Verifier
from jitbroker.errors import StoreError, TokenRevoked
from jitbroker.revocations import RevocationCache
from jitbroker.stores.postgres import PSYCOPG_REQUIRED, PostgresStore, _check_psycopg
from jitbroker.stores.redis import RedisStore
from jitbroker.testing import TEST_ISSUER
from test_revocations import PG_DSN, Counting, CountingPostgresStore, CountingStore, age, wait_for

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from revocation_race import race  # noqa: E402 - the benchmark's own harness

STORES = ["redis", "postgres"]


def make_store(kind: str, *, strict: bool = True) -> Counting:
    if kind == "redis":
        server_or_skip("Redis", "127.0.0.1", 6379)
        return CountingStore(
            "redis://127.0.0.1:6379/0", prefix=f"jbtest-{uuid4().hex}", strict_revocations=strict
        )
    server_or_skip("PostgreSQL", "127.0.0.1", 5432)
    return CountingPostgresStore(PG_DSN, schema=f"jbtest_{uuid4().hex}", strict_revocations=strict)


@pytest.fixture(params=STORES)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(kind: str) -> Iterator[Counting]:
    made = make_store(kind)
    age(made)
    yield made
    made.clear()
    made.close()


def live(store: Counting, **options: Any) -> RevocationCache:
    cache = store.revocations(max_staleness=1.0, heartbeat=0.1, **options)
    assert wait_for(cache.fresh), "the revocation feed did not come up"
    return cache


def cache_rows(store: Counting) -> set[str]:
    """The ids of the caches registered in the store (one per feed session)."""
    if isinstance(store, RedisStore):
        keys: list[bytes] = store._client.hkeys(f"{{{store.prefix}}}:caches")  # type: ignore[assignment]
        return {k.decode() for k in keys}
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        query = sql.SQL("SELECT id FROM {}.caches").format(sql.Identifier(store.schema))
        return {row[0] for row in conn.execute(query)}


# -- 7: the revoking broker's own cache ----------------------------------------------
def test_a_broker_rejects_what_it_just_revoked_even_without_strict_revocations(
    kind: str,
) -> None:
    store = make_store(kind, strict=False)
    age(store)
    cache = live(store)
    try:
        broker = Broker(issuer=TEST_ISSUER, store=store, revocations=cache)
        for _ in range(200):
            cred = broker.issue("svc:a", "api", ttl=60)
            broker.revoke(cred)
            with pytest.raises(TokenRevoked):
                broker.verify(cred.token, audience="api")
        assert store.gets == 0  # answered by the cache, at once
    finally:
        cache.close()
        store.clear()
        store.close()


# -- 12: strict revocations ------------------------------------------------------------
def test_revoke_returns_once_every_live_cache_has_it(store: Counting) -> None:
    caches = [live(store) for _ in range(3)]
    try:
        assert len(cache_rows(store)) == 3  # each registered
        broker = Broker(issuer=TEST_ISSUER, store=store)
        for _ in range(50):
            cred = broker.issue("svc:a", "api", ttl=60)
            broker.revoke(cred)
            for cache in caches:  # no waiting here: revoke already did
                assert cache.revoked(cred.lease_id) or not cache.fresh()
    finally:
        for cache in caches:
            cache.close()
    assert cache_rows(store) == set()  # a closed cache leaves: nobody waits for it


@pytest.mark.parametrize("kind", STORES)
def test_no_revoked_token_is_accepted_by_another_process_after_revoke_returned(
    kind: str,
) -> None:
    make_store(kind).close()  # skips without a server
    result = race(kind, 400, caches=2, processes=2)
    assert result["accepted_after_revoke"] == 0, result
    assert result["cache_vouched"] > 0, result  # the caches did answer, not the store


def test_a_cache_that_stops_answering_delays_revoke_at_most_its_staleness(
    store: Counting,
) -> None:
    cache = live(store)
    rows = cache_rows(store)
    cache.close()
    # A cache killed with its row left behind (kill -9): written back as live.
    if isinstance(store, RedisStore):
        now_ms = int(time.time() * 1000)
        store._client.hset(f"{{{store.prefix}}}:caches", "ghost", f"0 {now_ms} 1000")
    else:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            table = sql.SQL("{}.caches").format(sql.Identifier(store.schema))
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} VALUES ('ghost', 0, extract(epoch FROM clock_timestamp()), 1)"
                ).format(table)
            )
    assert rows
    broker = Broker(issuer=TEST_ISSUER, store=store)
    cred = broker.issue("svc:a", "api", ttl=60)
    start = time.monotonic()
    broker.revoke(cred)
    took = time.monotonic() - start
    assert 0.5 < took < 2.0  # waited for the ghost to go stale (1 s), not forever
    start = time.monotonic()
    broker.revoke(broker.issue("svc:a", "api", ttl=60))
    assert time.monotonic() - start < 0.5  # a stale row is not waited for


def test_postgres_notify_racing_a_feed_round_is_not_lost() -> None:
    # The round's statement blocks on a lock while a revocation commits and its
    # NOTIFY arrives: the round's snapshot predates the revocation, so only the
    # notification (seen by the handler during the statement) brings it. On
    # psycopg 3.2.0-3.2.3 such a notification was dropped and the next
    # heartbeat marked the cache live again.
    store = make_store("postgres")
    age(store)
    assert isinstance(store, PostgresStore)
    cache = store.revocations(max_staleness=3.0, heartbeat=0.2)
    assert wait_for(cache.fresh)
    broker = Broker(issuer=TEST_ISSUER, store=store)
    verifier = Verifier(
        broker.jwks(), issuer=TEST_ISSUER, audience="api", store=store, revocations=cache
    )
    table = sql.SQL("{}.caches").format(sql.Identifier(store.schema))
    try:
        for _ in range(5):
            cred = broker.issue("svc:a", "api", ttl=60)
            with psycopg.connect(PG_DSN) as locker:
                locker.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(table))
                revoking = threading.Thread(target=broker.revoke, args=(cred,))
                revoking.start()
                time.sleep(0.4)  # the feed's round is blocked; the revoke waits for it
                assert revoking.is_alive()
            revoking.join(timeout=5)
            assert not revoking.is_alive()
            assert cache.revoked(cred.lease_id) or not cache.fresh()
            with pytest.raises(TokenRevoked):
                verifier.verify(cred.token)
    finally:
        cache.close()
        store.clear()
        store.close()


# -- 3: forged and malformed messages ----------------------------------------------
def test_a_forged_notify_revokes_nothing_and_ends_no_session() -> None:
    store = make_store("postgres")
    age(store)
    assert isinstance(store, PostgresStore)
    cache = live(store)
    try:
        broker = Broker(issuer=TEST_ISSUER, store=store)
        cred = broker.issue("svc:a", "api", ttl=60)
        sessions = cache_rows(store)
        forged = [json.dumps([cred.lease_id]), "not json", "\x01" * 50, "", "9" * 30]
        with psycopg.connect(PG_DSN, autocommit=True) as anyone:
            if not anyone.execute("SELECT 1 FROM pg_roles WHERE rolname = 'jb_nobody'").fetchone():
                anyone.execute("CREATE ROLE jb_nobody NOLOGIN")
            anyone.execute("SET ROLE jb_nobody")  # no privilege at all: NOTIFY still works
            for payload in forged:
                anyone.execute("SELECT pg_notify(%s, %s)", (store.channel, payload))
        time.sleep(0.5)  # several rounds
        verifier = Verifier(
            broker.jwks(), issuer=TEST_ISSUER, audience="api", store=store, revocations=cache
        )
        assert verifier.verify(cred.token).lease_id == cred.lease_id
        assert not cache.revoked(cred.lease_id)
        assert store.gets == 0
        assert cache.fresh()
        assert cache_rows(store) == sessions  # the same session all along
    finally:
        cache.close()
        store.clear()
        store.close()


def test_redis_publish_and_foreign_log_entries_revoke_nothing_and_end_no_session() -> None:
    store = make_store("redis")
    age(store)
    assert isinstance(store, RedisStore)
    cache = live(store)
    try:
        broker = Broker(issuer=TEST_ISSUER, store=store)
        cred = broker.issue("svc:a", "api", ttl=60)
        sessions = cache_rows(store)
        client: redis.Redis = store._client
        client.publish(f"{{{store.prefix}}}:revoked", json.dumps([cred.lease_id]))
        for fields in ({"ids": json.dumps([cred.lease_id])}, {"n": "x"}, {"junk": "\x00"}):
            client.xadd(f"{{{store.prefix}}}:revlog", fields)  # type: ignore[arg-type]
        time.sleep(0.5)
        assert not cache.revoked(cred.lease_id)
        assert cache.fresh()
        assert cache_rows(store) == sessions
        broker.revoke(cred)  # the genuine one still arrives after the junk
        assert cache.revoked(cred.lease_id)
    finally:
        cache.close()
        store.clear()
        store.close()


def test_a_gap_in_the_redis_log_makes_the_feed_resync() -> None:
    store = make_store("redis")
    age(store)
    assert isinstance(store, RedisStore)
    cache = live(store)
    try:
        broker = Broker(issuer=TEST_ISSUER, store=store)
        lost, kept = (broker.issue("svc:a", "api", ttl=60) for _ in range(2))
        sessions = cache_rows(store)
        # Revoke `lost` behind the log's back (as a trimmed or deleted entry
        # would leave it): the next entry's number shows the gap.
        store._client.incr(f"{{{store.prefix}}}:revseq")
        store._client.hset(f"{{{store.prefix}}}:lease:{lost.lease_id}", "revoked_at", "1")
        store._client.zadd(
            f"{{{store.prefix}}}:dead", {json.dumps([lost.lease_id, "", "", "", "", ""]): 1e10}
        )
        broker.revoke(kept)
        assert wait_for(lambda: cache.revoked(lost.lease_id))  # by the resync
        assert cache_rows(store) != sessions  # a new session
    finally:
        cache.close()
        store.clear()
        store.close()


# -- 1: the psycopg floor --------------------------------------------------------------
def test_an_old_psycopg_is_refused_at_run_time() -> None:
    _check_psycopg(".".join(map(str, PSYCOPG_REQUIRED)))
    for old in ("3.2.9", "3.2.3", "3.1.18", "garbage"):
        with pytest.raises(StoreError, match=r"psycopg 3\.2\.10 or newer"):
            _check_psycopg(old)


FLOOR_CHECK = """
import sys, time, psycopg
sys.path.insert(0, sys.argv[1])
from revocation_race import race
print(psycopg.__version__)
result = race("postgres", 300, caches=2, processes=1)
print(result)
sys.exit(1 if result["accepted_after_revoke"] else 0)
"""


@pytest.mark.slow
def test_the_postgres_feed_on_the_oldest_psycopg_allowed(tmp_path: Path) -> None:
    server_or_skip("PostgreSQL", "127.0.0.1", 5432)
    floor = ".".join(map(str, PSYCOPG_REQUIRED))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", f"psycopg[binary]=={floor}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if install.returncode != 0:
        message = f"could not install psycopg {floor}: {install.stderr[-500:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    run = subprocess.run(
        [python, "-c", FLOOR_CHECK, str(ROOT / "benchmarks")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines()[0] == floor
