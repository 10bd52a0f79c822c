"""Key retirement carried by the revocation feed (invariant 11, issue 13).

A retirement recorded through a shared store is numbered and logged like a
revocation, so every broker whose ``RevocationCache`` follows the store drops
the key as the feed delivers it, with no sweep; with strict revocations
``retire_key`` returns only once every live cache has it. Real Redis and
PostgreSQL; the brokers' clocks are ``FakeClock`` s that never reach their next
sweep, so the sweep path (``sync_retired``) cannot be what delivered it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import uuid4

import psycopg
import pytest
from psycopg import sql

from conftest import server_or_skip
from jitbroker import Broker, KeyRing, Verifier
from jitbroker.audit import AuditEvent, EventType
from jitbroker.cli import main
from jitbroker.errors import InvalidToken, UnknownKey
from jitbroker.revocations import RevocationCache, parse_entry, parse_ids
from jitbroker.stores import open_store
from jitbroker.stores.redis import RedisStore
from jitbroker.stores.redis_feed import LogPosition
from jitbroker.testing import TEST_ISSUER, FakeClock
from test_keys_across_processes import jwks_server
from test_revocation_feeds import STORES, cache_rows, live, make_store
from test_revocations import PG_DSN, Counting, age, wait_for

HERE = Path(__file__).parent


# -- the payload: a lease id and a kid never confuse each other ---------------------
def test_an_old_revocation_entry_carries_lease_ids_only() -> None:
    assert parse_entry(b'["lease-1", "lease-2"]') == (["lease-1", "lease-2"], [])
    assert parse_entry('["lease-1"]', None) == (["lease-1"], [])


def test_a_key_entry_carries_kids_only_and_reads_as_no_revocation_to_old_feeds() -> None:
    assert parse_entry(b"[]", b'["kid-1"]') == ([], ["kid-1"])
    # What a feed that knows nothing of `keys` reads from the same entry:
    assert parse_ids(b"[]") == []


@pytest.mark.parametrize(
    ("ids", "keys"),
    [
        (b'["lease-1"]', b'["kid-1"]'),  # both kinds in one entry: not ours
        (b"[]", b"[]"),  # a key entry retiring nothing
        (b"[]", b'{"kid": "kid-1"}'),
        (b"[]", b"[1]"),
        (b"[]", b"kid-1"),
        (b"", b'["kid-1"]'),
    ],
)
def test_a_malformed_entry_is_refused(ids: bytes, keys: bytes) -> None:
    with pytest.raises(ValueError, match=r"unexpected|Expecting|JSON"):
        parse_entry(ids, keys)


def test_the_redis_log_position_splits_revocations_from_retirements() -> None:
    position = LogPosition(0, "0-0")
    entries = [
        (b"1-0", {b"n": b"1", b"ids": b'["lease-1"]'}),
        (b"2-0", {b"n": b"2", b"ids": b"[]", b"keys": b'["kid-1"]'}),
        (b"3-0", {b"ids": b'["kid-2"]'}),  # not ours (no number): skipped
        (b"4-0", {b"n": b"3", b"ids": b'["kid-1"]'}),  # a lease whose id looks like a kid
    ]
    assert position.take(entries) == (["lease-1", "kid-1"], ["kid-1"])
    assert position.applied == 3


def test_the_cache_tells_its_listeners_each_new_kid_once() -> None:
    cache = RevocationCache(window=60)
    heard: list[list[str]] = []
    cache.retire(["kid-1"])
    cache.on_retired(heard.append)  # told at once what it already knows
    cache.retire(["kid-1", "kid-2"])
    cache.resync((), epoch=None, retired=["kid-2", "kid-3"])
    assert heard == [["kid-1"], ["kid-2"], ["kid-3"]]
    assert cache.retired_keys == {"kid-1", "kid-2", "kid-3"}
    assert not cache.revoked("kid-1")  # a kid is never a revoked lease id


# -- two brokers in one process, each with its own feed -------------------------------
def rings(folder: Path) -> tuple[str, KeyRing, KeyRing]:
    """Two copies of one key directory: the old kid, then the rings."""
    KeyRing.generate().save_dir(folder)
    old = KeyRing.from_dir(folder).active.kid
    return old, KeyRing.from_dir(folder), KeyRing.from_dir(folder)


class Events(list[AuditEvent]):
    def retired(self) -> list[tuple[str | None, str | None]]:
        return [(e.where, e.actor) for e in self if e.action is EventType.KEY_RETIRED]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest) -> Iterator[Counting]:
    made = make_store(str(request.param))
    age(made)
    yield made
    made.clear()
    made.close()


@pytest.mark.parametrize("revoke", [False, True])
def test_after_retire_key_returns_another_broker_refuses_the_key_at_once(
    store: Counting, tmp_path: Path, revoke: bool
) -> None:
    old, ring_a, ring_b = rings(tmp_path / "keys")
    clock = FakeClock(time.time())
    caches = [live(store), live(store)]
    events = Events()
    try:
        a = Broker(issuer=TEST_ISSUER, keys=ring_a, store=store, clock=clock, revocations=caches[0])
        b = Broker(
            issuer=TEST_ISSUER,
            keys=ring_b,
            store=store,
            clock=clock,
            revocations=caches[1],
            audit=[events.append],
        )
        token = b.issue("svc:a", "api", ttl=60).token  # signed by the old key; B sweeps once
        assert b.verify(token, audience="api").key_id == old  # and now B has it cached
        for broker in (a, b):
            broker.rotate_keys()  # each signs with a key of its own; the old one verifies
        next_sweep = b._core.next_sweep
        assert clock() < next_sweep  # the clock never moves: B sweeps no more

        a.retire_key(old, revoke=revoke)

        # No waiting: strict retire_key returned once B's cache had applied it.
        assert old not in ring_b
        with pytest.raises(UnknownKey if not revoke else InvalidToken):
            b.verify(token, audience="api")
        assert b.issue("svc:a", "api", ttl=60).lease.key_id not in (old, None)
        assert b._core.next_sweep == next_sweep  # no sweep delivered it
        assert events.retired() == [(f"key_id={old!r}", "revocation-feed")]
    finally:
        for cache in caches:
            cache.close()


@pytest.mark.parametrize("kind", STORES)
def test_without_strict_revocations_the_feed_still_delivers_it(kind: str, tmp_path: Path) -> None:
    store = make_store(kind, strict=False)
    cache: RevocationCache | None = None
    try:
        age(store)
        old, ring_a, ring_b = rings(tmp_path / "keys")
        clock = FakeClock(time.time())
        cache = live(store)
        dropped = threading.Event()
        cache.on_retired(lambda _: dropped.set())
        a = Broker(issuer=TEST_ISSUER, keys=ring_a, store=store, clock=clock)
        b = Broker(issuer=TEST_ISSUER, keys=ring_b, store=store, clock=clock, revocations=cache)
        token = b.issue("svc:a", "api", ttl=60).token
        a.rotate_keys()
        b.rotate_keys()
        a.retire_key(old, revoke=False)
        assert dropped.wait(5), "the feed did not deliver the retirement"
        assert old not in ring_b
        with pytest.raises(UnknownKey):
            b.verify(token, audience="api")
    finally:
        if cache is not None:
            cache.close()
        store.clear()
        store.close()


def test_a_jwks_url_verifier_with_a_cache_refuses_a_retired_kid(
    store: Counting, tmp_path: Path
) -> None:
    """Its keys come from a JWKS that still lists the key (a broker of the
    fleet without a feed, not told yet) and are refetched after the
    retirement: the cache's retired kids are checked as well."""
    old, ring_a, ring_c = rings(tmp_path / "keys")
    a = Broker(issuer=TEST_ISSUER, keys=ring_a, store=store)
    c = Broker(issuer=TEST_ISSUER, keys=ring_c)  # its JWKS keeps the old key
    cache = live(store)
    try:
        with jwks_server(c) as (url, fetched):
            verifier = Verifier.from_jwks_url(
                url,
                allow_http=True,
                issuer=TEST_ISSUER,
                store=store,
                revocations=cache,
                min_refresh_interval=0,
            )
            token = a.issue("svc:a", "api", ttl=60).token
            assert verifier.verify(token, audience="api").key_id == old
            a.rotate_keys()
            a.retire_key(old, revoke=False)  # strict: the cache has it on return
            source = verifier.source
            assert source is not None
            assert source.refresh()
            assert len(fetched) == 2
            assert old in source.keys  # the JWKS still lists it
            with pytest.raises(UnknownKey):
                verifier.verify(token, audience="api")
    finally:
        cache.close()


def test_a_feed_that_missed_a_retirement_picks_it_up_when_it_resyncs(
    store: Counting, tmp_path: Path
) -> None:
    old, ring_a, ring_b = rings(tmp_path / "keys")
    clock = FakeClock(time.time())
    cache = live(store)
    events = Events()
    try:
        b = Broker(
            issuer=TEST_ISSUER,
            keys=ring_b,
            store=store,
            clock=clock,
            revocations=cache,
            audit=[events.append],
        )
        token = b.issue("svc:a", "api", ttl=60).token
        b.rotate_keys()
        sessions = cache_rows(store)
        # Retired while the feed could not see it: recorded with no log entry
        # (a log trimmed while the feed was away, or a writer without a feed).
        if isinstance(store, RedisStore):
            store._client.hsetnx(f"{{{store.prefix}}}:retired", old, clock())
            # ...and a revocation lost from the log with it: the next entry's
            # number shows the gap, and the feed resyncs.
            store._client.incr(f"{{{store.prefix}}}:revseq")
            Broker(issuer=TEST_ISSUER, keys=ring_a, store=store, clock=clock).revoke(
                b.issue("svc:a", "api", ttl=60)
            )
        else:
            schema = sql.Identifier(store.schema)
            with psycopg.connect(PG_DSN, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("INSERT INTO {}.retired_keys VALUES (%s, %s)").format(schema),
                    (old, clock()),
                )
                time.sleep(0.3)  # three heartbeats: a live feed would not see it
                assert old in ring_b
                # The feed's connection drops (a failover, a restart): it
                # reconnects and resyncs.
                killed = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE pid <> pg_backend_pid() AND query LIKE %s",
                    (f'%"{store.schema}".caches%',),
                ).fetchall()
                assert killed
        assert wait_for(lambda: old not in ring_b), "the resync did not bring the retirement"
        assert cache_rows(store) != sessions  # a new session brought it
        with pytest.raises(UnknownKey):
            b.verify(token, audience="api")
        assert events.retired() == [(f"key_id={old!r}", "revocation-feed")]
    finally:
        cache.close()


# -- a broker in another process --------------------------------------------------------
def worker(url: str, folder: str) -> None:
    """A broker following ``url``'s revocation feed, no reaper and a sweep an hour
    away, behind a loopback HTTP server (``ready PORT``); until stdin closes."""
    store = open_store(url)
    cache = store.revocations(max_staleness=1.0, heartbeat=0.1)  # type: ignore[attr-defined]
    keys = KeyRing.from_dir(folder)
    broker = Broker(
        issuer=TEST_ISSUER, keys=keys, store=store, revocations=cache, reap_interval=3600
    )
    broker.sweep()  # the only sweep: the next is an hour away

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"] or 0)).decode()
            answer: dict[str, Any]
            if self.path == "/issue":
                answer = {"kid": broker.issue("svc:a", "api", ttl=60).lease.key_id}
            elif self.path == "/state":
                answer = {"keys": sorted(k.kid for k in keys), "fresh": cache.fresh()}
            else:
                try:
                    broker.verify(body, audience="api")
                    answer = {"outcome": "ok"}
                except InvalidToken as exc:
                    answer = {"outcome": type(exc).__name__}
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"ready {server.server_address[1]}", flush=True)
    sys.stdin.read()
    server.shutdown()
    cache.close()
    store.close()


class Worker:
    def __init__(self, url: str, folder: Path) -> None:
        code = "import sys, test_key_retirement_feed as t; t.worker(sys.argv[1], sys.argv[2])"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, url, str(folder)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=HERE,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        assert line[:1] == ["ready"], line
        self.base = f"http://127.0.0.1:{line[1]}"

    def call(self, path: str, body: str = "") -> Any:
        request = self.base + path
        with urllib.request.urlopen(request, data=body.encode(), timeout=10) as answer:  # noqa: S310 - loopback http
            return json.loads(answer.read())

    def close(self) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", STORES)
def test_a_broker_in_another_process_refuses_the_key_once_retire_key_returns(
    kind: str, tmp_path: Path
) -> None:
    make_store(kind).close()  # skips without a server
    if kind == "redis":
        server_or_skip("Redis", "127.0.0.1", 6379)
        url = f"redis://127.0.0.1:6379/0?prefix=jbret-{uuid4().hex}"
    else:
        url = f"{PG_DSN}?schema=jbret_{uuid4().hex}"
    folder = tmp_path / "keys"
    assert main(["keys", "generate", str(folder)]) == 0
    old = KeyRing.from_dir(folder).active.kid
    store = open_store(url)
    age(store)  # type: ignore[arg-type]
    token = Broker(issuer=TEST_ISSUER, keys=KeyRing.from_dir(folder), store=store).issue(
        "svc:a", "api", ttl=60
    )
    assert main(["keys", "rotate", str(folder), "--publish-ahead=0"]) == 0
    other = Worker(url, folder)
    cache = store.revocations(max_staleness=1.0, heartbeat=0.1)  # type: ignore[attr-defined]
    try:
        assert wait_for(cache.fresh)
        assert wait_for(lambda: other.call("/state")["fresh"])
        assert other.call("/verify", token.token) == {"outcome": "ok"}
        a = Broker(
            issuer=TEST_ISSUER, keys=KeyRing.from_dir(folder), store=store, revocations=cache
        )

        a.retire_key(old, revoke=False)

        assert old not in other.call("/state")["keys"]  # no waiting: it was acknowledged
        assert other.call("/verify", token.token) == {"outcome": "UnknownKey"}
        assert other.call("/issue")["kid"] != old
    finally:
        other.close()
        cache.close()
        store.clear()  # type: ignore[attr-defined]
        store.close()
