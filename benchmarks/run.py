"""Hot-path benchmarks, side by side with PyJWT in the same process.

    python benchmarks/run.py            # full run (about a minute; 1,000,000 leases)
    python benchmarks/run.py --quick    # smoke run with small sizes
    python benchmarks/run.py --only stores  # SQLite, Redis, PostgreSQL; round trips counted

Each figure is the median over repeats of the per-call time of a batch, with
jitbroker and PyJWT batches interleaved so drift hits both alike. The same
claims and the same key object are used on both sides. Results are printed as
ratios (jitbroker / PyJWT) against the targets of the foundation issue.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jwt

from jitbroker import Broker, Credential, KeyRing, LeaseStore, MemoryStore, Policy, Rule
from jitbroker.lease import Lease
from jitbroker.policy import labels
from jitbroker.revocations import RevocationCache
from jitbroker.testing import FakeClock

ISSUER = "urn:example:broker"
SUBJECT = "svc:ci-deploy"
AUDIENCE = "db:orders"
SCOPES = ["orders:read"]
TTL = 600
TASK = "job-42"
OWNER = "alice@example.com"
PURPOSE = "nightly export"


def issuing(broker: Broker) -> Callable[[], Credential]:
    """One ``issue`` with the benchmark's claims, written as a caller writes it.

    Both sides spell their arguments out (no ``**dict`` merging in the measured
    loop: that would time the harness, ~0.3 us a call, not the library).
    """

    def one() -> Credential:
        return broker.issue(SUBJECT, AUDIENCE, SCOPES, TTL, task=TASK, owner=OWNER, purpose=PURPOSE)

    return one


def per_call(fn: Callable[[], object], number: int, *, gc_on: bool = False) -> float:
    """Seconds per call of ``fn`` over one batch (gc paused, as timeit does,
    unless ``gc_on``: as users run)."""
    gc_was = gc.isenabled()
    if not gc_on:
        gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - start) / number
    finally:
        if gc_was:
            gc.enable()


def compare(
    ours: Callable[[], object],
    theirs: Callable[[], object],
    number: int,
    repeat: int,
    setup: Callable[[], None] | None = None,
) -> tuple[float, float]:
    """Medians of interleaved batches: (ours, theirs) seconds per call.

    One more batch of each side runs first and is not counted: a store's first
    calls also fill its page cache, statement cache and connection, which is
    start-up, not the steady state either side is compared in.
    """
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeat + 1):
        if setup:
            setup()
        a.append(per_call(ours, number))
        b.append(per_call(theirs, number))
    return statistics.median(a[1:]), statistics.median(b[1:])


def measure(
    cases: dict[str, Callable[[], object]], number: int, repeat: int
) -> dict[str, tuple[float, float]]:
    """Per case: (median seconds per call, median ratio to the "off" case batch
    by batch), the cases' batches interleaved; the first round warms up."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeat + 1):
        for name, fn in cases.items():
            times[name].append(per_call(fn, number))
    off = times["off"][1:]
    return {
        name: (
            statistics.median(runs[1:]),
            statistics.median(x / y for x, y in zip(runs[1:], off, strict=True)),
        )
        for name, runs in times.items()
    }


def compare_paired(
    ours: Callable[[], object], theirs: Callable[[], object], number: int, repeat: int
) -> tuple[float, float, float]:
    """``compare``, and the median of the ratios of each batch of ours to the
    batch of theirs run right after it: a ratio that a slow stretch of the
    machine (other processes, a store's checkpoint) hits on both sides alike."""
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeat + 1):
        a.append(per_call(ours, number))
        b.append(per_call(theirs, number))
    ratios = [x / y for x, y in zip(a[1:], b[1:], strict=True)]
    return statistics.median(a[1:]), statistics.median(b[1:]), statistics.median(ratios)


def pyjwt_payload(now: int) -> dict[str, Any]:
    """The same claims jitbroker puts in its tokens (and a fresh ``jti``, as it draws)."""
    return {
        "iss": ISSUER,
        "sub": SUBJECT,
        "aud": AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + TTL,
        "jti": secrets.token_urlsafe(16),
        "scope": " ".join(SCOPES),
        "task": TASK,
        "owner": OWNER,
        "purpose": PURPOSE,
    }


def pyjwt_decode(token: str, key: Any) -> dict[str, Any]:
    """jwt.decode with the checks jitbroker makes (minus the lease, which PyJWT has not)."""
    claims: dict[str, Any] = jwt.decode(
        token,
        key,
        algorithms=["EdDSA"],
        audience=AUDIENCE,
        issuer=ISSUER,
        leeway=5,
        options={"require": ["iss", "sub", "aud", "exp", "iat", "nbf", "jti"]},
    )
    if not set(SCOPES) <= set(claims["scope"].split(" ")):
        raise jwt.InvalidTokenError("missing scope")
    return claims


def cycle(items: list[str]) -> Callable[[], str]:
    it: Iterator[str] = iter(items)

    def nxt() -> str:
        return next(it)

    return nxt


class Bench:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.number = 300 if quick else 2000
        self.repeat = 5 if quick else 15
        self.ring = KeyRing.generate("EdDSA")
        self.key = self.ring.active
        self.private = self.key._material  # the same key object PyJWT signs with
        self.public = self.key._verifier
        self.broker = Broker(issuer=ISSUER, keys=self.ring, max_ttl=3600)
        self.rows: list[dict[str, Any]] = []

    def row(
        self,
        name: str,
        ours: float,
        theirs: float,
        target: float | None,
        ratio: float | None = None,
    ) -> None:
        ratio = ours / theirs if ratio is None else ratio
        self.rows.append(
            {
                "name": name,
                "jitbroker_us": round(ours * 1e6, 2),
                "baseline_us": round(theirs * 1e6, 2),
                "ratio": round(ratio, 3),
                "target": target,
                "ok": None if target is None else ratio <= target,
            }
        )

    def count(self, name: str, value: float, target: float | None) -> None:
        self.rows.append(
            {
                "name": name,
                "jitbroker_us": None,
                "baseline_us": None,
                "ratio": value,
                "target": target,
                "ok": None if target is None else value <= target,
            }
        )

    def issue(self) -> None:
        broker, private = self.broker, self.private
        headers = {"kid": self.key.kid, "typ": "at+jwt"}

        ours = issuing(broker)

        def theirs() -> object:
            return jwt.encode(pyjwt_payload(int(time.time())), private, "EdDSA", headers)

        self.row("issue EdDSA / jwt.encode", *compare(ours, theirs, self.number, self.repeat), 1.10)

    def verify(self) -> None:
        broker, public = self.broker, self.public
        issue = issuing(broker)
        pool: list[str] = []
        theirs_pool: list[str] = []
        headers = {"kid": self.key.kid, "typ": "at+jwt"}

        def fresh() -> None:
            # New tokens every repeat: every verify is a cache miss (full signature check).
            pool[:] = [issue().token for _ in range(self.number)]
            theirs_pool[:] = [
                jwt.encode(pyjwt_payload(int(time.time())), self.private, "EdDSA", headers)
                for _ in range(self.number)
            ]
            nxt_ours[0] = cycle(pool)
            nxt_theirs[0] = cycle(theirs_pool)

        nxt_ours: list[Callable[[], str]] = [cycle([])]
        nxt_theirs: list[Callable[[], str]] = [cycle([])]

        def ours() -> object:
            return broker.verify(nxt_ours[0](), audience=AUDIENCE, scopes=SCOPES)

        def theirs() -> object:
            return pyjwt_decode(nxt_theirs[0](), public)

        result = compare(ours, theirs, self.number, self.repeat, setup=fresh)
        self.row("verify online EdDSA / jwt.decode", *result, 1.00)

        token = issue().token
        jtoken = theirs_pool[0]

        def cached() -> object:
            return broker.verify(token, audience=AUDIENCE, scopes=SCOPES)

        def decode_same() -> object:
            return pyjwt_decode(jtoken, public)

        result = compare(cached, decode_same, self.number, self.repeat)
        self.row("verify repeated (cache) / jwt.decode", *result, 0.05)

    def opaque(self) -> None:
        broker = Broker(issuer=ISSUER, keys=self.ring, token_format="opaque")
        secret = secrets.token_bytes(32)

        ours = issuing(broker)

        def theirs() -> object:
            return jwt.encode(pyjwt_payload(int(time.time())), secret, "HS256")

        self.row(
            "opaque issue / jwt.encode HS256",
            *compare(ours, theirs, self.number, self.repeat),
            0.30,
        )

    def scale(self) -> None:
        big_n = 50_000 if self.quick else 1_000_000
        small = Broker(issuer=ISSUER, keys=self.ring)
        large = Broker(issuer=ISSUER, keys=self.ring)
        fill(small.store, 1_000, self.key.kid)
        fill(large.store, big_n, self.key.kid)

        result = compare(issuing(large), issuing(small), self.number, self.repeat)
        self.row(f"issue with {big_n:,} leases / with 1,000", *result, 1.20)

    def memory(self) -> None:
        n = 20_000 if self.quick else 100_000
        store = MemoryStore()
        broker = Broker(issuer=ISSUER, keys=self.ring, store=store)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            # Realistic mix: every lease has its own task id; the rest repeats.
            broker.issue(
                SUBJECT, AUDIENCE, SCOPES, TTL, task=f"job-{i}", owner=OWNER, purpose=PURPOSE
            )
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        per_lease = (after - before) / n
        assert len(store) == n
        self.rows.append(
            {
                "name": f"bytes per active lease (MemoryStore, {n:,} leases)",
                "jitbroker_us": None,
                "baseline_us": None,
                "ratio": round(per_lease),
                "target": 1024,
                "ok": per_lease <= 1024,
            }
        )

    def governance(self) -> None:
        """What least privilege costs on the issue path: a policy (one rule with
        owner, purpose and a label condition), then the same with a quota, each
        against the same broker without a policy; EdDSA and opaque tokens."""

        def policy(max_active: int | None) -> Policy:
            return Policy(
                [
                    Rule(
                        ["svc:ci-*"],
                        [AUDIENCE],
                        SCOPES,
                        max_ttl=900,
                        owner_required=True,
                        purpose_required=True,
                        conditions=[labels(env="prod")],
                        max_active=max_active,
                    )
                ]
            )

        cases = (("a policy", policy(None)), ("a policy and a quota", policy(10**9)))
        for fmt in ("jws", "opaque"):
            base = Broker(issuer=ISSUER, keys=self.ring, token_format=fmt)
            for name, rules in cases:
                ours = Broker(
                    issuer=ISSUER,
                    keys=self.ring,
                    token_format=fmt,
                    policy=rules,
                    labels={"env": "prod"},
                )
                result = compare(issuing(ours), issuing(base), self.number, self.repeat)
                self.row(f"{fmt} issue with {name} / without", *result, None)

    def outbox(self) -> None:
        """What the durable outbox costs a plain issue with an ``on_issue`` hook (a
        hook that does nothing: the job is recorded with the lease, run, and
        deleted in a batch), against the same broker without a hook, on each
        store (a shared store whose server is not running is skipped)."""

        def nothing(lease: Lease) -> None:
            """The cheapest hook: what is measured is the outbox around it."""

        def memory() -> SharedStore:
            store = MemoryStore()
            return SharedStore(store, store.close)

        for name, make in (("memory", memory), *shared_stores()):
            try:
                pair = make(), make()
            except Exception as exc:  # a server that is not running: say so, go on
                print(f"skipping {name}: {exc}", file=sys.stderr)
                continue
            options: dict[str, Any] = {"issuer": ISSUER, "keys": self.ring, "reap_interval": 3600}
            base = Broker(store=pair[0].store, **options)
            ours = Broker(store=pair[1].store, on_issue={"nothing": nothing}, **options)
            # Many short batches, paired: the ratio is the median of each pair's.
            number = self.number // 4 if name == "memory" else max(self.number // 40, 25)
            mine, theirs, ratio = compare_paired(
                issuing(ours), issuing(base), number, self.repeat * 4
            )
            self.row(f"{name} issue with an on_issue hook / without", mine, theirs, 1.2, ratio)
            ours.stop()  # deletes the finished jobs still waiting for their batch
            for shared in pair:
                shared.close()

    def stores(self) -> None:
        """Each shared store against MemoryStore: issue, verify (online), revoke,
        sweep, and verify through a live revocation cache; round trips counted."""
        for name, make in shared_stores():
            try:
                shared = make()
            except Exception as exc:  # a server that is not running: say so, go on
                print(f"skipping {name}: {exc}", file=sys.stderr)
                continue
            try:
                self.compare_store(name, shared.store)
                if shared.counting is not None:
                    self.count_round_trips(name, shared.counting)
            finally:
                shared.close()

    def revoke_and_sweep(self, name: str, store: LeaseStore, number: int, repeat: int) -> None:
        ours = Broker(issuer=ISSUER, keys=self.ring, store=store)
        base = Broker(issuer=ISSUER, keys=self.ring)
        a: list[float] = []
        b: list[float] = []
        for _ in range(repeat):
            mine, theirs = revoke_pair(ours, base, number)
            a.append(per_call(mine, number))
            b.append(per_call(theirs, number))
        self.row(f"{name}: revoke / MemoryStore", statistics.median(a), statistics.median(b), None)
        clock = FakeClock()
        swept: list[float] = []
        for broker in (
            Broker(issuer=ISSUER, keys=self.ring, store=store, clock=clock),
            Broker(issuer=ISSUER, keys=self.ring, clock=clock),
        ):
            for _ in range(number):
                broker.issue(SUBJECT, AUDIENCE, SCOPES, 60, task=TASK)
            clock.advance(61)
            start = time.perf_counter()
            assert len(broker.sweep()) >= number
            swept.append((time.perf_counter() - start) / number)
        self.row(f"{name}: sweep, per expired lease / MemoryStore", swept[0], swept[1], None)

    def compare_store(self, name: str, store: LeaseStore) -> None:
        number, repeat = max(50, self.number // 10), max(3, self.repeat // 3)
        ours = Broker(issuer=ISSUER, keys=self.ring, store=store)
        base = Broker(issuer=ISSUER, keys=self.ring)
        result = compare(issuing(ours), issuing(base), number, repeat)
        self.row(f"{name}: issue / MemoryStore issue", *result, STORE_TARGETS.get(name))
        token, base_token = issuing(ours)().token, issuing(base)().token

        def verify_ours() -> object:
            return ours.verify(token, audience=AUDIENCE)

        def verify_base() -> object:
            return base.verify(base_token, audience=AUDIENCE)

        self.row(
            f"{name}: verify (cached token) / MemoryStore",
            *compare(verify_ours, verify_base, number, repeat),
            None,
        )
        self.revoke_and_sweep(name, store, number, repeat)
        revocations = getattr(store, "revocations", None)
        if revocations is not None:
            cache = live(revocations())
            fast = Broker(
                issuer=ISSUER, keys=self.ring, store=store, leeway=LEEWAY, revocations=cache
            )
            fast_token = issuing(fast)().token

            def verify_fast() -> object:
                return fast.verify(fast_token, audience=AUDIENCE)

            result = compare(verify_fast, verify_base, number, repeat)
            cache.close()
            self.row(f"{name}: verify, live revocation cache / MemoryStore", *result, 1.10)

    def count_round_trips(self, name: str, counting: Counting) -> None:
        """Round trips per broker call, counted on the connection (see SharedStore),
        in the steady state: after warm-up calls have loaded Redis's scripts and
        let psycopg prepare its statements (a statement's 6th run on a connection
        costs one extra round trip, for the Parse)."""
        clock = FakeClock(time.time())  # a clock that never moves: no opportunistic sweep
        broker = Broker(issuer=ISSUER, keys=self.ring, store=counting.store, clock=clock)
        broker.sweep()  # the first issue would run one otherwise
        issue = issuing(broker)

        def verify() -> Callable[[], object]:
            token = issue().token
            return lambda: broker.verify(token, audience=AUDIENCE)

        def revoke() -> Callable[[], object]:
            cred = issue()
            return lambda: broker.revoke(cred)

        def attenuate() -> Callable[[], object]:
            cred = issue()
            return lambda: broker.attenuate(cred, scopes=SCOPES, ttl=60)

        Op = tuple[str, Callable[[], Callable[[], object]], float | None]
        ops: list[Op] = [
            ("issue", lambda: issue, ROUND_TRIP_TARGETS.get((name, "issue"))),
            ("verify, no revocation cache", verify, ROUND_TRIP_TARGETS.get((name, "verify"))),
            ("revoke, no revocation cache", revoke, ROUND_TRIP_TARGETS.get((name, "revoke"))),
            ("attenuate", attenuate, None),
            ("sweep, nothing due", lambda: broker.sweep, ROUND_TRIP_TARGETS.get((name, "sweep"))),
        ]
        self.count_ops(name, counting, ops)
        # With a live cache (in this process: its feed's own calls are on another
        # connection and not counted), a strict revoke also asks whether the
        # cache has acknowledged: the extra round trips are those looks.
        cache = live(counting.revocations())
        fast = Broker(
            issuer=ISSUER,
            keys=self.ring,
            store=counting.store,
            clock=clock,
            leeway=LEEWAY,
            revocations=cache,
        )

        def verify_cached() -> Callable[[], object]:
            token = issuing(fast)().token
            return lambda: fast.verify(token, audience=AUDIENCE)

        try:
            cached: list[Op] = [
                ("revoke, one live revocation cache (strict)", revoke, None),
                ("verify, live revocation cache", verify_cached, 0.0),
            ]
            self.count_ops(name, counting, cached)
        finally:
            cache.close()

    def count_ops(
        self,
        name: str,
        counting: Counting,
        ops: list[tuple[str, Callable[[], Callable[[], object]], float | None]],
    ) -> None:
        for op, prepare, target in ops:
            trips = [counting.round_trips(prepare()) for _ in range(WARM_UP + COUNTED)]
            mean = statistics.mean(trips[WARM_UP:])
            self.count(f"{name}: round trips per {op}", mean, target)


def live(cache: RevocationCache) -> RevocationCache:
    """``cache`` once it vouches for a token issued now (or after 15 s: the rows then
    show a cache that does not). Besides a live feed, that takes a store epoch
    ``LEEWAY`` seconds old: a benchmark store is brand new, a deployed one is not."""
    deadline = time.monotonic() + 15
    while not cache.vouches_for(int(time.time()), LEEWAY) and time.monotonic() < deadline:
        time.sleep(0.05)
    return cache


def revoke_pair(ours: Broker, base: Broker, number: int) -> tuple[Callable[[], object], ...]:
    """Revoke calls over fresh credentials, ours and the MemoryStore baseline."""
    pools = [[issuing(b)() for _ in range(number)] for b in (ours, base)]
    iters = [iter(pool) for pool in pools]
    return (lambda: ours.revoke(next(iters[0])), lambda: base.revoke(next(iters[1])))


# Targets from the stores issue (stores without one are reported only).
STORE_TARGETS = {"sqlite": 3.0}
ROUND_TRIP_TARGETS = {
    ("redis", "issue"): 1.0,
    ("redis", "verify"): 1.0,
    ("redis", "revoke"): 1.0,
    ("redis", "sweep"): 1.0,
    ("postgres", "revoke"): 2.0,  # BEGIN with the revoke, then COMMIT (issue 14)
    ("postgres", "sweep"): 1.0,
}
WARM_UP, COUNTED = 8, 10  # calls per operation before counting, and counted
LEEWAY = 5.0  # the verifying brokers' clock skew allowance (Broker's default)


RoundTrips = Callable[[Callable[[], object]], int]


class Counting(NamedTuple):
    """The same data as a benchmarked store, through a connection that counts:
    ``round_trips(fn)`` runs ``fn`` and says how many request/response exchanges
    it made on that connection from this thread (a revocation feed's own
    connection and thread are never counted)."""

    store: LeaseStore
    round_trips: RoundTrips
    revocations: Callable[[], RevocationCache]


class SharedStore(NamedTuple):
    """A store to benchmark, how to clean up after it, and (networked stores) counting."""

    store: LeaseStore
    close: Callable[[], None]
    counting: Counting | None = None


def shared_stores() -> list[tuple[str, Callable[[], SharedStore]]]:
    """The shared stores to compare, built lazily (a missing server skips one)."""
    return [("sqlite", sqlite_store), ("redis", redis_store), ("postgres", postgres_store)]


def sqlite_store() -> SharedStore:
    from jitbroker.stores.sqlite import SQLiteStore

    folder = tempfile.mkdtemp(prefix="jbbench-")
    store = SQLiteStore(os.path.join(folder, "leases.db"))

    def close() -> None:
        store.close()
        shutil.rmtree(folder, ignore_errors=True)

    return SharedStore(store, close)


def redis_store() -> SharedStore:
    import redis

    from jitbroker.stores.redis import RedisStore

    counter: dict[str, int] = {"thread": -1, "sent": 0}

    class CountingConnection(redis.Connection):
        """Counts what it sends from the counting thread. Every command and every
        pipeline goes out in one send_packed_command, then waits for its replies."""

        def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
            if threading.get_ident() == counter["thread"]:
                counter["sent"] += 1
            super().send_packed_command(*args, **kwargs)  # type: ignore[no-untyped-call]

    def round_trips(fn: Callable[[], object]) -> int:
        counter.update(thread=threading.get_ident(), sent=0)
        try:
            fn()
            return counter["sent"]
        finally:
            counter["thread"] = -1

    pool = redis.ConnectionPool(host="127.0.0.1", port=6379, connection_class=CountingConnection)
    client = redis.Redis(connection_pool=pool, socket_connect_timeout=1)
    client.ping()
    store = RedisStore(client, prefix=f"jbbench-{secrets.token_hex(8)}")

    def close() -> None:
        store.clear()
        store.close()
        client.close()

    return SharedStore(store, close, Counting(store, round_trips, store.revocations))


def postgres_store() -> SharedStore:
    from jitbroker.stores.postgres import PostgresStore

    dsn = os.environ.get("JITBROKER_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    store = PostgresStore(dsn, schema=f"jbbench_{secrets.token_hex(8)}")
    traced: TracedConnection | None = None

    def close() -> None:
        store.clear()
        store.close()
        if traced is not None:
            traced.close()

    if sys.platform != "linux":  # psycopg supports libpq's trace on Linux only
        print("postgres: round trips not counted (needs Linux)", file=sys.stderr)
        return SharedStore(store, close)
    traced = TracedConnection(dsn)
    counted = PostgresStore(traced, schema=store.schema)  # the same tables

    # The revocation feed comes from the timed store: it holds a pooled connection of
    # its own, which the counted store's single connection could not lend it.
    return SharedStore(store, close, Counting(counted, traced.round_trips, store.revocations))


class TracedConnection:
    """One autocommit connection (as PostgresStore's own pool makes them), lent to
    a store, with libpq's protocol trace (``PQtrace``) on while ``round_trips``
    runs. The client ends every request with a Sync or a simple Query and then
    waits; the server answers each with exactly one ReadyForQuery. So the
    ReadyForQuery messages in the trace are the round trips: BEGIN, each
    statement and COMMIT are counted as they went over the wire."""

    def __init__(self, dsn: str) -> None:
        import psycopg

        self.conn = psycopg.connect(dsn, autocommit=True)

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        yield self.conn

    def round_trips(self, fn: Callable[[], object]) -> int:
        from psycopg import pq

        pgconn = self.conn.pgconn
        with tempfile.TemporaryFile() as log:
            fd = os.dup(log.fileno())  # libpq writes through a FILE* of its own on this
            pgconn.trace(fd)
            pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
            try:
                fn()
            finally:
                pgconn.untrace()  # flushes libpq's FILE*, which is never written again
                os.close(fd)
            log.seek(0)
            return sum(line.startswith(b"B\t") and b"\tReadyForQuery" in line for line in log)

    def close(self) -> None:
        self.conn.close()


def fill(store: LeaseStore, n: int, kid: str) -> None:
    """Put ``n`` active leases straight into the store (no signing: only size matters)."""
    now = time.time()
    for i in range(n):
        store.add(
            Lease(
                id=secrets.token_urlsafe(16),
                subject=f"svc:worker-{i % 100}",
                audience=AUDIENCE,
                scopes=tuple(SCOPES),
                issued_at=now,
                expires_at=now + 3000,
                max_expires_at=now + 3000,
                key_id=kid,
                task=f"job-{i}",
                owner=OWNER,
            )
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    steps = ["issue", "verify", "opaque", "scale", "memory", "governance", "outbox", "stores"]
    parser.add_argument("--only", choices=steps, action="append", help="run only these")
    args = parser.parse_args(argv)
    bench = Bench(args.quick)
    for step in args.only or steps:
        getattr(bench, step)()
    print(f"python {sys.version.split()[0]}, PyJWT {jwt.__version__}, median of {bench.repeat}")
    print(f"{'benchmark':56} {'jitbroker':>10} {'baseline':>10} {'ratio':>8} {'target':>8}")
    for r in bench.rows:
        ours = "" if r["jitbroker_us"] is None else f"{r['jitbroker_us']:.2f}us"
        base = "" if r["baseline_us"] is None else f"{r['baseline_us']:.2f}us"
        mark = {True: "ok", False: "MISS", None: ""}[r["ok"]]
        target = "" if r["target"] is None else f"<={r['target']}"
        print(f"{r['name']:56} {ours:>10} {base:>10} {r['ratio']:>8} {target:>8} {mark}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(bench.rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
