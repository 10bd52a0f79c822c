"""Race revocations against cached verifiers in other processes (invariant 3).

    python benchmarks/revocation_race.py --store redis --races 100000 --caches 2
    python benchmarks/revocation_race.py --store postgres --latency 1,4,16

One process issues tokens and revokes them one by one; after each ``revoke``
returns it sends the index of that token to every verifier process (each with
its own revocation caches, ``store.revocations()``) and waits until each has
verified it: any acceptance is a revoked token accepted after ``revoke``
returned. With strict revocations (the default) there must be
none; ``--no-strict`` shows what the feed's latency alone allows.

``--latency`` measures ``revoke`` (p50, p99) with that many live caches, spread
over up to four processes. ``tests/test_revocation_feeds.py`` runs a short
race of each kind.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from multiprocessing.connection import Connection
from typing import Any
from uuid import uuid4

from jitbroker import Broker, KeyRing, Verifier
from jitbroker.errors import InvalidToken
from jitbroker.stores.base import LeaseStore

REDIS_URL = "redis://127.0.0.1:6379/0"
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
ISSUER = "urn:jitbroker:race"


def open_store(kind: str, namespace: str, *, strict: bool = True) -> Any:
    """The store ``kind`` under ``namespace`` (a Redis prefix or a PostgreSQL schema)."""
    if kind == "redis":
        from jitbroker.stores.redis import RedisStore

        return RedisStore(REDIS_URL, prefix=namespace, strict_revocations=strict)
    from jitbroker.stores.postgres import PostgresStore

    return PostgresStore(PG_DSN, schema=namespace, strict_revocations=strict)


def _verify_loop(
    kind: str,
    namespace: str,
    jwks: dict[str, Any],
    tokens: list[str],
    caches: int,
    pipe: Connection,
) -> None:
    """One verifier process: ``caches`` caches; for each index the revoker sends,
    verify that token with each, then answer (the counts, at the end)."""
    store = open_store(kind, namespace)
    feeds = [store.revocations(max_staleness=2.0, heartbeat=0.25) for _ in range(caches)]
    deadline = time.monotonic() + 30
    while not all(feed.fresh() for feed in feeds):
        if time.monotonic() > deadline:
            raise SystemExit("the revocation feeds did not come up")
        time.sleep(0.01)
    verifiers = [
        Verifier(jwks, issuer=ISSUER, audience="api", store=store, revocations=feed)
        for feed in feeds
    ]
    pipe.send("ready")
    accepted = checks = vouched = 0
    while (index := pipe.recv()) is not None:  # blocks: the feeds' threads run meanwhile
        for verifier, feed in zip(verifiers, feeds, strict=True):
            checks += 1
            vouched += feed.fresh()
            try:
                verifier.verify(tokens[index])
            except InvalidToken:
                continue
            accepted += 1
        pipe.send(index)
    for feed in feeds:
        feed.close()
    store.close()
    pipe.send({"accepted": accepted, "checks": checks, "vouched": vouched})


def race(
    kind: str, races: int, *, caches: int = 2, processes: int = 2, strict: bool = True
) -> dict[str, Any]:
    """Run the race; what the verifiers saw and how long each revoke took."""
    namespace = f"race_{uuid4().hex[:12]}"
    store = open_store(kind, namespace, strict=strict)
    broker = Broker(issuer=ISSUER, keys=KeyRing.generate("EdDSA"), store=store, max_ttl=3600)
    creds = [broker.issue("svc:race", "api", ttl=3000) for _ in range(races)]
    tokens = [cred.token for cred in creds]
    spawn = multiprocessing.get_context("spawn")
    per = [n for i in range(processes) if (n := caches // processes + (i < caches % processes))]
    pipes, workers = [], []
    for n in per:
        ours, theirs = spawn.Pipe()
        worker = spawn.Process(
            target=_verify_loop, args=(kind, namespace, broker.jwks(), tokens, n, theirs)
        )
        worker.start()
        pipes.append(ours)
        workers.append(worker)
    took: list[float] = []
    try:
        for pipe in pipes:
            if not pipe.poll(120) or pipe.recv() != "ready":
                raise SystemExit("a verifier process did not start")
        for index, cred in enumerate(creds):
            start = time.perf_counter()
            broker.revoke(cred)
            took.append(time.perf_counter() - start)
            # Each verifier checks the token right after revoke returned: the
            # tightest race there is. Then the next one.
            for pipe in pipes:
                pipe.send(index)
            for pipe in pipes:
                pipe.recv()
    finally:
        for pipe in pipes:
            pipe.send(None)
        seen = [pipe.recv() for pipe in pipes]
        for worker in workers:
            worker.join(timeout=30)
        _clear(store)
    took.sort()
    return {
        "store": kind,
        "strict": strict,
        "races": races,
        "caches": caches,
        "accepted_after_revoke": sum(r["accepted"] for r in seen),
        "checks": sum(r["checks"] for r in seen),
        "cache_vouched": sum(r["vouched"] for r in seen),
        "revoke_ms_p50": round(statistics.median(took) * 1000, 3),
        "revoke_ms_p99": round(took[int(len(took) * 0.99)] * 1000, 3),
        "revoke_ms_max": round(took[-1] * 1000, 3),
    }


def _clear(store: LeaseStore) -> None:
    clear = getattr(store, "clear", None)
    if clear is not None:
        clear()
    store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=["redis", "postgres"], default="redis")
    parser.add_argument("--races", type=int, default=2000)
    parser.add_argument("--caches", type=int, default=2)
    parser.add_argument("--no-strict", action="store_true")
    parser.add_argument("--latency", help="comma-separated cache counts, e.g. 1,4,16")
    args = parser.parse_args(argv)
    if args.latency:
        for count in (int(c) for c in args.latency.split(",")):
            result = race(
                args.store, args.races, caches=count, processes=min(count, 4),
                strict=not args.no_strict,
            )  # fmt: skip
            print(json.dumps(result))
        return 0
    result = race(args.store, args.races, caches=args.caches, strict=not args.no_strict)
    print(json.dumps(result))
    return 1 if result["accepted_after_revoke"] and not args.no_strict else 0


if __name__ == "__main__":
    sys.exit(main())
