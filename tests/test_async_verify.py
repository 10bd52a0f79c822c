"""``Verifier.averify``: ``verify``'s checks, errors and audit events, on an event
loop that never stalls; and the background JWKS refresh both share.

pytest-asyncio is not a dependency: each test drives its own loop with
``asyncio.run``. Stores are real (SQLite files, Redis and PostgreSQL on
loopback) and the JWKS comes from a real HTTP server in a thread whose answers
a test can hold back. "The loop never blocks" is measured: a ticker task
records its ticks while the work runs, and the longest gap between two ticks
must stay far below the time the work waited.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from uuid import uuid4

import pytest

from conftest import server_or_skip
from jitbroker import Broker, KeyRing, Verifier
from jitbroker.audit import AuditEvent
from jitbroker.dpop import make_proof
from jitbroker.errors import InvalidRequest, KeySourceError, TokenRevoked, UnknownKey
from jitbroker.keys import generate_key
from jitbroker.lease import Claims
from jitbroker.revocations import RevocationCache
from jitbroker.stores.base import LeaseStore
from jitbroker.stores.memory import MemoryStore
from jitbroker.stores.sqlite import SQLiteStore
from jitbroker.testing import TEST_ISSUER, FakeClock

T = TypeVar("T")
URL = "https://api.example.com/orders"
REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"
HOLD = 1.0  # how long a server (JWKS or PostgreSQL) holds back its answer
# A loop that ran the held work itself would stall for all of HOLD; one that
# waits for it keeps ticking every 10 ms, with some slack for a loaded machine.
MAX_GAP = HOLD / 3


class Timed(NamedTuple):
    """What ``ticking`` saw: the outcome, how long it took, the longest stall."""

    value: Any
    error: BaseException | None
    elapsed: float
    gap: float


async def ticking(work: Awaitable[Any]) -> Timed:
    """Await ``work`` while a ticker task ticks every 10 ms."""
    ticks = [time.monotonic()]

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.01)
            ticks.append(time.monotonic())

    ticker = asyncio.create_task(tick())
    value: Any = None
    error: BaseException | None = None
    try:
        value = await work
    except Exception as exc:
        error = exc
    finally:
        ticker.cancel()
        ticks.append(time.monotonic())
    gap = max(later - earlier for earlier, later in itertools.pairwise(ticks))
    return Timed(value, error, ticks[-1] - ticks[0], gap)


def at_once(coro: Coroutine[Any, Any, T]) -> T:
    """The coroutine's result if it completes without ever suspending: proof
    that it made no store call, no thread hop and no wait on the loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("the coroutine suspended: it waited for something")


class CountingExecutor(ThreadPoolExecutor):
    """The loop's default executor, counting the calls handed to worker threads."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.calls = 0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return super().submit(fn, *args, **kwargs)


def in_loop(main: Callable[[CountingExecutor], Coroutine[Any, Any, T]]) -> T:
    """Run ``main(executor)`` on a new loop whose default executor counts."""
    executor = CountingExecutor()

    async def wrapped() -> T:
        asyncio.get_running_loop().set_default_executor(executor)
        return await main(executor)

    try:
        return asyncio.run(wrapped())
    finally:
        executor.shutdown()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def verifier_for(broker: Broker, store: Any, **options: Any) -> Verifier:
    return Verifier(
        broker.jwks(),
        issuer=TEST_ISSUER,
        audience="api",
        store=store,
        clock=broker.clock,
        **options,
    )


# -- the same outcome as verify, every time ----------------------------------------
Scenario = Callable[[Broker, FakeClock], tuple[Any, dict[str, Any]]]


def _ok(broker: Broker, clock: FakeClock) -> tuple[Any, dict[str, Any]]:
    return broker.issue("svc:a", "api", ["read", "write"], 60).token, {"scopes": ["read"]}


def _opaque(broker: Broker, clock: FakeClock) -> tuple[Any, dict[str, Any]]:
    opaque = Broker(
        issuer=TEST_ISSUER, keys=broker.keys, store=broker.store, clock=clock, token_format="opaque"
    )
    return opaque.issue("svc:a", "api", ["read"], 60).token, {}


def _opaque_delegated(broker: Broker, clock: FakeClock) -> tuple[Any, dict[str, Any]]:
    opaque = Broker(
        issuer=TEST_ISSUER, keys=broker.keys, store=broker.store, clock=clock, token_format="opaque"
    )
    parent = opaque.issue("svc:a", "api", ["read", "write"], 60)
    child = opaque.attenuate(parent, scopes=["read"], ttl=30)
    return opaque.attenuate(child, scopes=["read"], ttl=20).token, {"scopes": "read"}


def _opaque_revoked(broker: Broker, clock: FakeClock) -> tuple[Any, dict[str, Any]]:
    opaque = Broker(
        issuer=TEST_ISSUER, keys=broker.keys, store=broker.store, clock=clock, token_format="opaque"
    )
    cred = opaque.issue("svc:a", "api", ["read"], 60)
    opaque.revoke(cred, reason="done")
    return cred.token, {}


def _expired(broker: Broker, clock: FakeClock) -> tuple[Any, dict[str, Any]]:
    token = broker.issue("svc:a", "api", ttl=60).token
    clock.advance(120)
    return token, {}


def _not_yet_valid(broker: Broker, clock: FakeClock) -> tuple[Any, dict[str, Any]]:
    ahead = Broker(
        issuer=TEST_ISSUER, keys=broker.keys, store=broker.store, clock=FakeClock(clock() + 600)
    )
    return ahead.issue("svc:a", "api", ttl=60).token, {}


def _wrong_audience(broker: Broker, clock: FakeClock) -> tuple[Any, dict[str, Any]]:
    return broker.issue("svc:a", "other", ttl=60).token, {}


def _insufficient_scope(broker: Broker, clock: FakeClock) -> tuple[Any, dict[str, Any]]:
    return broker.issue("svc:a", "api", ["read"], 60).token, {"scopes": ["read", "write"]}


def _revoked(broker: Broker, clock: FakeClock) -> tuple[Any, dict[str, Any]]:
    cred = broker.issue("svc:a", "api", ttl=60)
    broker.revoke(cred, reason="compromised")
    return cred.token, {}


def _unknown_lease(broker: Broker, clock: FakeClock) -> tuple[Any, dict[str, Any]]:
    elsewhere = Broker(issuer=TEST_ISSUER, keys=broker.keys, store=MemoryStore(), clock=clock)
    return elsewhere.issue("svc:a", "api", ttl=60).token, {}


def _wrong_issuer(broker: Broker, clock: FakeClock) -> tuple[Any, dict[str, Any]]:
    other = Broker(issuer="urn:other", keys=broker.keys, store=broker.store, clock=clock)
    return other.issue("svc:a", "api", ttl=60).token, {}


def _unknown_key(broker: Broker, clock: FakeClock) -> tuple[Any, dict[str, Any]]:
    stranger = Broker(issuer=TEST_ISSUER, store=broker.store, clock=clock)
    return stranger.issue("svc:a", "api", ttl=60).token, {}


def _malformed(broker: Broker, clock: FakeClock) -> tuple[Any, dict[str, Any]]:
    return "not.a.token", {}


def _not_a_string(broker: Broker, clock: FakeClock) -> tuple[Any, dict[str, Any]]:
    return 12345, {}


def _bound_with_proof(broker: Broker, clock: FakeClock) -> tuple[Any, dict[str, Any]]:
    holder = generate_key("ES256")
    token = broker.issue("svc:a", "api", ttl=60, holder_key=holder.public()).token
    proof = make_proof(holder, "GET", URL, token=token, now=clock())
    return token, {"proof": proof, "method": "GET", "url": URL}


def _bound_without_proof(broker: Broker, clock: FakeClock) -> tuple[Any, dict[str, Any]]:
    holder = generate_key("ES256")
    return broker.issue("svc:a", "api", ttl=60, holder_key=holder.public()).token, {}


def _bound_wrong_method(broker: Broker, clock: FakeClock) -> tuple[Any, dict[str, Any]]:
    token, options = _bound_with_proof(broker, clock)
    return token, {**options, "method": "POST"}


def _no_audience(broker: Broker, clock: FakeClock) -> tuple[Any, dict[str, Any]]:
    return broker.issue("svc:a", "api", ttl=60).token, {"audience": None, "_no_default": True}


SCENARIOS: list[Scenario] = [
    _ok,
    _opaque,
    _opaque_delegated,
    _opaque_revoked,
    _expired,
    _not_yet_valid,
    _wrong_audience,
    _insufficient_scope,
    _revoked,
    _unknown_lease,
    _wrong_issuer,
    _unknown_key,
    _malformed,
    _not_a_string,
    _bound_with_proof,
    _bound_without_proof,
    _bound_wrong_method,
    _no_audience,
]


def outcome(call: Callable[[], Claims]) -> tuple[str, Any]:
    try:
        return "ok", call()
    except Exception as exc:
        return type(exc).__name__, (str(exc), getattr(exc, "lease_id", None))


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__.strip("_"))
def test_averify_gives_what_verify_gives(scenario: Scenario, clock: FakeClock) -> None:
    broker = Broker(issuer=TEST_ISSUER, clock=clock)
    token, options = scenario(broker, clock)
    audience = None if options.pop("_no_default", False) else "api"
    sync_events: list[AuditEvent] = []
    async_events: list[AuditEvent] = []
    sync = Verifier(
        broker.jwks(), issuer=TEST_ISSUER, audience=audience, store=broker.store, clock=clock,
        audit=[sync_events.append],
    )  # fmt: skip
    sync_outcome = outcome(lambda: sync.verify(token, **options))
    coroutines = Verifier(
        broker.jwks(), issuer=TEST_ISSUER, audience=audience, store=broker.store, clock=clock,
        audit=[async_events.append],
    )  # fmt: skip
    async_outcome = outcome(lambda: asyncio.run(coroutines.averify(token, **options)))
    assert async_outcome == sync_outcome
    assert async_events == sync_events
    if scenario is _ok:
        assert sync_outcome[0] == "ok"
    else:
        assert sync_events or sync_outcome[0] in ("ok", "InvalidRequest")


def test_the_signature_is_the_documented_one() -> None:
    import inspect

    sync, coro = inspect.signature(Verifier.verify), inspect.signature(Verifier.averify)
    assert coro.parameters == sync.parameters
    assert inspect.iscoroutinefunction(Verifier.averify)


# -- no thread hop where there is no store call --------------------------------------
def test_offline_and_memory_store_verification_never_suspends(clock: FakeClock) -> None:
    broker = Broker(issuer=TEST_ISSUER, clock=clock)
    cred = broker.issue("svc:a", "api", ["read"], 60)
    offline = Verifier(broker.jwks(), issuer=TEST_ISSUER, audience="api", offline=True, clock=clock)
    online = verifier_for(broker, broker.store)
    for verifier in (offline, online):
        for _ in range(2):  # a miss, then a cache hit
            assert at_once(verifier.averify(cred.token, scopes="read")).lease_id == cred.lease_id
    broker.revoke(cred)
    assert at_once(offline.averify(cred.token)).lease_id == cred.lease_id
    with pytest.raises(TokenRevoked):
        at_once(online.averify(cred.token))


def test_a_live_revocation_cache_answers_with_no_thread_hop(
    clock: FakeClock, tmp_path: Path
) -> None:
    """The store is blocking (SQLite), but the cache vouches: no store call at all."""
    store = SQLiteStore(tmp_path / "leases.db")
    try:
        broker = Broker(issuer=TEST_ISSUER, store=store, clock=clock)
        cred = broker.issue("svc:a", "api", ttl=60)
        cache = RevocationCache(window=3700, clock=time.monotonic)
        cache.resync([], epoch=0.0)
        verifier = verifier_for(broker, store, revocations=cache)

        async def main(executor: CountingExecutor) -> None:
            assert at_once(verifier.averify(cred.token)).lease_id == cred.lease_id
            cache.add([cred.lease_id])
            with pytest.raises(TokenRevoked):
                at_once(verifier.averify(cred.token))
            assert executor.calls == 0

        in_loop(main)
    finally:
        store.close()


def test_a_blocking_store_is_called_in_a_worker_thread(clock: FakeClock, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "leases.db")
    try:
        broker = Broker(issuer=TEST_ISSUER, store=store, clock=clock)
        cred = broker.issue("svc:a", "api", ttl=60)
        verifier = verifier_for(broker, store)

        async def main(executor: CountingExecutor) -> None:
            for _ in range(3):
                assert (await verifier.averify(cred.token)).lease_id == cred.lease_id
            assert executor.calls == 3  # one lookup each, cached signature or not
            broker.revoke(cred)
            with pytest.raises(TokenRevoked):
                await verifier.averify(cred.token)

        in_loop(main)
    finally:
        store.close()


# -- real shared stores ------------------------------------------------------------
@pytest.fixture
def postgres() -> Iterator[Any]:
    server_or_skip("PostgreSQL", "127.0.0.1", 5432)
    from jitbroker.stores.postgres import PostgresStore

    store = PostgresStore(POSTGRES_DSN, schema=f"jbtest_{uuid4().hex}")
    yield store
    store.clear()
    store.close()


def test_a_slow_postgres_lookup_does_not_block_the_loop(postgres: Any, clock: FakeClock) -> None:
    import psycopg
    from psycopg import sql

    store: LeaseStore = postgres
    broker = Broker(issuer=TEST_ISSUER, store=store, clock=clock)
    cred = broker.issue("svc:a", "api", ttl=60)
    verifier = verifier_for(broker, store)
    with psycopg.connect(POSTGRES_DSN) as locker:
        # An exclusive table lock holds every read of the leases until it commits.
        table = sql.SQL("{}.leases").format(sql.Identifier(postgres.schema))
        locker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table))
        release = threading.Timer(HOLD, locker.commit)
        release.start()
        try:
            seen = asyncio.run(ticking(verifier.averify(cred.token)))
        finally:
            release.join()
    assert seen.error is None
    assert seen.value.lease_id == cred.lease_id
    assert seen.elapsed >= HOLD * 0.9  # the lookup really waited for the lock
    assert seen.gap < MAX_GAP  # and the loop ran on meanwhile


def test_an_async_redis_store_is_awaited_directly(clock: FakeClock) -> None:
    server_or_skip("Redis", "127.0.0.1", 6379)
    from jitbroker import AsyncBroker
    from jitbroker.stores.redis_async import AsyncRedisStore

    async def main(executor: CountingExecutor) -> None:
        store = AsyncRedisStore(REDIS_URL, prefix=f"jbtest-{uuid4().hex}")
        try:
            broker = AsyncBroker(issuer=TEST_ISSUER, store=store, clock=clock)
            cred = await broker.issue("svc:a", "api", ["read"], 60)
            verifier = Verifier(
                broker.jwks(), issuer=TEST_ISSUER, audience="api", store=store, clock=clock
            )
            assert (await verifier.averify(cred.token, scopes="read")).lease_id == cred.lease_id
            with pytest.raises(InvalidRequest, match="averify"):
                verifier.verify(cred.token)  # a coroutine cannot run in the sync call
            await broker.revoke(cred, reason="done")
            with pytest.raises(TokenRevoked):
                await verifier.averify(cred.token)
            assert executor.calls == 0  # awaited on the loop, no worker thread
        finally:
            await store.clear()
            await store.close()

    in_loop(main)


# -- keys from a JWKS URL ----------------------------------------------------------
class JWKSServer:
    """A loopback HTTP server serving a JWKS; ``hold`` delays each answer."""

    def __init__(self) -> None:
        self.body = b'{"keys": []}'
        self.status = 200
        self.hold = 0.0
        self.hits = 0
        self.stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits += 1
                if server.hold:
                    server.stopping.wait(server.hold)
                body, status = server.body, server.status
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        ).start()

    def serve(self, ring: KeyRing) -> None:
        self.body = json.dumps(ring.jwks()).encode()

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[JWKSServer]:
    srv = JWKSServer()
    yield srv
    srv.stop()


def url_verifier(server: JWKSServer, clock: FakeClock, **options: Any) -> Verifier:
    options.setdefault("min_refresh_interval", 60)
    return Verifier.from_jwks_url(
        server.url,
        allow_http=True,
        issuer=TEST_ISSUER,
        audience="api",
        offline=True,
        clock=clock,
        **options,
    )


def token_of(ring: KeyRing, clock: FakeClock) -> str:
    return Broker(issuer=TEST_ISSUER, keys=ring, clock=clock).issue("svc:a", "api", ttl=600).token


def settle(verifier: Verifier) -> None:
    assert verifier.source is not None
    fetch = verifier.source.fetching
    if fetch is not None:
        fetch.wait()


def refresh_threads() -> list[threading.Thread]:
    """The JWKS refresh threads alive now (every source names its thread alike)."""
    return [t for t in threading.enumerate() if t.name == "jitbroker-jwks"]


def no_refresh_threads() -> bool:
    """True once the refresh threads of earlier tests ended (each ends with its fetch)."""
    for thread in refresh_threads():
        thread.join(timeout=5)
    return refresh_threads() == []


def test_an_unknown_kid_awaits_the_refetch_while_the_loop_runs(
    server: JWKSServer, clock: FakeClock
) -> None:
    ring = KeyRing.generate()
    server.serve(ring)
    verifier = url_verifier(server, clock)
    clock.advance(61)
    ring.rotate()  # the issuer publishes a new key after our fetch
    server.serve(ring)
    server.hold = HOLD
    seen = asyncio.run(ticking(verifier.averify(token_of(ring, clock))))
    assert seen.error is None
    assert seen.value.key_id == ring.active.kid
    assert seen.elapsed >= HOLD * 0.9
    assert seen.gap < MAX_GAP
    assert server.hits == 2


def test_a_refetch_is_awaited_at_most_the_timeout(
    server: JWKSServer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    ring = KeyRing.generate()
    server.serve(ring)
    verifier = url_verifier(server, clock, timeout=HOLD)
    clock.advance(61)
    ring.rotate()
    server.serve(ring)
    server.hold = 10 * HOLD  # longer than the timeout: released when the test ends
    seen = asyncio.run(ticking(verifier.averify(token_of(ring, clock))))
    assert isinstance(seen.error, UnknownKey)
    assert HOLD * 0.9 <= seen.elapsed < HOLD * 3
    assert seen.gap < MAX_GAP
    settle(verifier)  # the fetch ends after its loop closed: nothing may break then
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_coroutines_share_one_refetch_for_a_new_key(server: JWKSServer, clock: FakeClock) -> None:
    """Unlike threads, coroutines await a refetch another caller started: it
    holds no thread, and a burst of tokens signed by a just-published key all pass."""
    ring = KeyRing.generate()
    server.serve(ring)
    verifier = url_verifier(server, clock)
    clock.advance(61)
    ring.rotate()
    server.serve(ring)
    server.hold = HOLD / 2
    tokens = [token_of(ring, clock) for _ in range(50)]

    async def main() -> list[Claims]:
        return await asyncio.gather(*(verifier.averify(token) for token in tokens))

    seen = asyncio.run(ticking(main()))
    assert seen.error is None
    assert [claims.key_id for claims in seen.value] == [ring.active.kid] * 50
    assert server.hits == 2
    assert seen.gap < MAX_GAP


def test_a_cancelled_wait_does_not_cancel_the_refetch(server: JWKSServer, clock: FakeClock) -> None:
    ring = KeyRing.generate()
    server.serve(ring)
    verifier = url_verifier(server, clock)
    clock.advance(61)
    ring.rotate()
    server.serve(ring)
    server.hold = HOLD / 2
    token = token_of(ring, clock)

    async def main() -> Claims:
        first = asyncio.create_task(verifier.averify(token))
        await asyncio.sleep(0.05)  # it started the refetch and awaits it
        first.cancel()  # the client hung up
        with pytest.raises(asyncio.CancelledError):
            await first
        return await verifier.averify(token)  # the same fetch goes on

    assert asyncio.run(main()).key_id == ring.active.kid
    assert server.hits == 2


def test_a_thread_does_not_wait_for_another_threads_refetch(
    server: JWKSServer, clock: FakeClock
) -> None:
    """CVE-2026-48524: the sync verify waits only for a refetch it started."""
    ring = KeyRing.generate()
    server.serve(ring)
    verifier = url_verifier(server, clock)
    clock.advance(61)
    server.hold = HOLD
    stranger = token_of(KeyRing.generate(), clock)
    errors: list[BaseException] = []

    def fetching() -> None:
        try:
            verifier.verify(stranger)
        except Exception as exc:
            errors.append(exc)

    first = threading.Thread(target=fetching)
    first.start()
    deadline = time.monotonic() + 2
    while server.hits < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    started = time.monotonic()
    with pytest.raises(UnknownKey):
        verifier.verify(token_of(KeyRing.generate(), clock))
    assert time.monotonic() - started < HOLD / 2
    first.join(timeout=5)
    assert [type(error) for error in errors] == [UnknownKey]  # after waiting for its fetch
    assert server.hits == 2


def test_stale_keys_are_refreshed_in_the_background(server: JWKSServer, clock: FakeClock) -> None:
    assert no_refresh_threads()
    ring = KeyRing.generate()
    server.serve(ring)
    verifier = url_verifier(server, clock, max_age=300)
    token, kid = token_of(ring, clock), ring.active.kid
    for _ in range(5):
        assert verifier.verify(token)
        assert at_once(verifier.averify(token))
    assert refresh_threads() == []  # nothing stale: no thread
    clock.advance(301)
    ring.rotate()
    server.serve(ring)
    server.hold = HOLD
    started = time.monotonic()
    for _ in range(20):  # the keys held serve, while one thread fetches
        assert verifier.verify(token).key_id == kid
        assert at_once(verifier.averify(token)).key_id == kid
    assert time.monotonic() - started < HOLD / 2  # nobody waited for the fetch
    assert len(refresh_threads()) == 1
    settle(verifier)
    assert at_once(verifier.averify(token_of(ring, clock))).key_id == ring.active.kid
    assert no_refresh_threads()  # the thread ended with its fetch
    assert server.hits == 2


def test_past_max_stale_a_call_waits_for_fresh_keys(server: JWKSServer, clock: FakeClock) -> None:
    """A service idle for longer than max_age + max_stale: the first calls wait
    for the refetch rather than use a set that old, or fail while it runs."""
    ring = KeyRing.generate()
    server.serve(ring)
    verifier = url_verifier(server, clock, max_age=300, max_stale=100)
    token = token_of(ring, clock)
    assert verifier.verify(token)
    clock.advance(400)
    server.hold = HOLD

    async def main() -> list[Claims]:
        return await asyncio.gather(*(verifier.averify(token) for _ in range(5)))

    seen = asyncio.run(ticking(main()))
    assert seen.error is None
    assert len(seen.value) == 5
    assert seen.elapsed >= HOLD * 0.9
    assert seen.gap < MAX_GAP
    assert server.hits == 2
    clock.advance(400)
    server.hold = 0
    assert verifier.verify(token_of(ring, clock))  # the sync call blocks for it instead
    assert server.hits == 3


def test_past_max_stale_with_the_endpoint_down_fails_closed(
    server: JWKSServer, clock: FakeClock
) -> None:
    ring = KeyRing.generate()
    server.serve(ring)
    verifier = url_verifier(server, clock, max_age=300, max_stale=100)
    token = token_of(ring, clock)
    assert verifier.verify(token)
    server.status = 503
    clock.advance(350)  # stale but within the grace: the keys held still verify
    assert verifier.verify(token)
    settle(verifier)
    assert asyncio.run(verifier.averify(token))
    clock.advance(61)  # 411 s: past max_age + max_stale, and a refetch is allowed
    with pytest.raises(KeySourceError, match="past max_age"):
        asyncio.run(verifier.averify(token))
    assert server.hits == 3
    with pytest.raises(KeySourceError, match="past max_age"):
        verifier.verify(token)  # rate-limited: refused at once, with no fetch
    assert server.hits == 3
    clock.advance(61)
    server.status = 200
    assert verifier.verify(token_of(ring, clock))  # the endpoint is back: waits, verifies
    assert server.hits == 4


def test_max_stale_defaults_to_max_age_and_is_checked(server: JWKSServer, clock: FakeClock) -> None:
    source = url_verifier(server, clock, max_age=300).source
    assert source is not None
    assert source.max_stale == 300
    assert not source.expired(clock() + 599)
    assert source.expired(clock() + 600)
    zero = url_verifier(server, clock, max_age=300, max_stale=0).source
    assert zero is not None
    assert zero.expired(clock() + 300)
    for bad in (-1, "60", float("inf")):
        with pytest.raises(InvalidRequest, match="max_stale"):
            url_verifier(server, clock, max_stale=bad)
