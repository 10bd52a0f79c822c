"""What ``Verifier.averify`` costs over ``Verifier.verify``, per call.

    python benchmarks/averify.py            # about 10 s
    python benchmarks/averify.py --quick    # smoke run

Both run the same verification steps; ``averify`` adds a coroutine and the
async driver (``arun``), and for MemoryStore one inline coroutine per store
call. Each figure is the median over repeats of the per-call time of a batch,
``verify`` and ``averify`` batches interleaved in one event loop (``verify``
is called from the loop's thread too, so both see the same machine state).
Results are printed as ratios (averify / verify).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

from jitbroker import Broker, MemoryStore, Verifier
from jitbroker.lease import Claims
from jitbroker.revocations import RevocationCache

ISSUER = "urn:example:broker"
AUDIENCE = "db:orders"
SCOPES = ["orders:read"]


def per_call(fn: Callable[[], object], number: int) -> float:
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - start) / number
    finally:
        gc.enable()


async def per_await(fn: Callable[[], Awaitable[object]], number: int) -> float:
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(number):
            await fn()
        return (time.perf_counter() - start) / number
    finally:
        gc.enable()


async def compare(
    sync: Callable[[], Claims],
    coro: Callable[[], Awaitable[Claims]],
    number: int,
    repeat: int,
) -> tuple[float, float]:
    """Medians of interleaved batches (one uncounted warm-up each): (verify, averify)."""
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeat + 1):
        a.append(per_call(sync, number))
        b.append(await per_await(coro, number))
    return statistics.median(a[1:]), statistics.median(b[1:])


async def run(number: int, repeat: int) -> list[tuple[str, float, float]]:
    store = MemoryStore()
    broker = Broker(issuer=ISSUER, store=store)
    token = broker.issue("svc:ci-deploy", AUDIENCE, SCOPES, 600).token
    jwks = broker.jwks()
    online = Verifier(jwks, issuer=ISSUER, audience=AUDIENCE, store=store)
    offline = Verifier(jwks, issuer=ISSUER, audience=AUDIENCE, offline=True)
    cache = RevocationCache(window=3700)
    cache.resync([], epoch=0.0)  # live and current: it answers for the store
    cached = Verifier(jwks, issuer=ISSUER, audience=AUDIENCE, store=store, revocations=cache)
    uncached = Verifier(jwks, issuer=ISSUER, audience=AUDIENCE, store=store, cache_size=0)
    cases = [
        ("MemoryStore, cached token (lease lookup)", online),
        ("offline, cached token", offline),
        ("live revocation cache, cached token", cached),
        ("MemoryStore, no token cache (signature)", uncached),
    ]
    rows = []
    for name, verifier in cases:

        def sync(verifier: Verifier = verifier) -> Claims:
            return verifier.verify(token, scopes=SCOPES)

        def coro(verifier: Verifier = verifier) -> Awaitable[Claims]:
            return verifier.averify(token, scopes=SCOPES)

        n = number // 20 if verifier is uncached else number
        rows.append((name, *await compare(sync, coro, n, repeat)))
    cache.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args(argv)
    number, repeat = (200, 3) if args.quick else (20_000, 15)
    rows = asyncio.run(run(number, repeat))
    print(f"python {sys.version.split()[0]}, median of {repeat} batches of {number}")
    print(f"{'averify / verify':44} {'verify':>10} {'averify':>10} {'extra':>9} {'ratio':>7}")
    for name, sync, coro in rows:
        extra = (coro - sync) * 1e6
        print(
            f"{name:44} {sync * 1e6:>8.2f}us {coro * 1e6:>8.2f}us "
            f"{extra:>+7.2f}us {coro / sync:>7.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
