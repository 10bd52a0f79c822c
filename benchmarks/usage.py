"""What lease usage tracking (``Broker(track_usage=True)``, the default) costs on verify.

    python benchmarks/usage.py            # about 15 s, plus Redis and PostgreSQL if up
    python benchmarks/usage.py --quick    # smoke run

Two brokers with the same keys on MemoryStore, side by side in one process:
usage tracking off and on. Each figure is the median over repeats of the
per-call time of a batch, the two brokers' batches interleaved so drift hits
them alike; the ratio is each "on" batch over the "off" batch run next to it.
Verify runs on a repeated token (the verified-token cache hit, the cheapest
online verify, where a fixed cost weighs most) and on a fresh token per call.
Then, on Redis and PostgreSQL when they are up, the round trips of 10 online
verifies with tracking off and on, counted on the wire as benchmarks/run.py
does, and those of the flush that writes their usage.
Targets (issue 13): on / off <= 1.05 (memory); 0 extra round trips on verify.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator

# benchmarks/run.py: one timing loop for every benchmark, and its counted stores
from run import measure, postgres_store, redis_store

from jitbroker import Broker, KeyRing, MemoryStore
from jitbroker.testing import FakeClock

SUBJECT = "svc:ci-deploy"
AUDIENCE = "db:orders"
SCOPES = ["orders:read"]
TARGET = 1.05


def brokers(token_format: str) -> dict[str, Broker]:
    keys = KeyRing.generate("EdDSA")
    options = {"keys": keys, "token_format": token_format, "max_ttl": 86400}
    return {
        "off": Broker(store=MemoryStore(), track_usage=False, **options),  # type: ignore[arg-type]
        "on": Broker(store=MemoryStore(), **options),  # type: ignore[arg-type]
    }


def repeated(broker: Broker) -> Callable[[], object]:
    token = broker.issue(SUBJECT, AUDIENCE, SCOPES, 3600).token
    return lambda: broker.verify(token, audience=AUDIENCE, scopes=SCOPES)


def fresh(broker: Broker) -> Callable[[], object]:
    tokens: Iterator[str] = iter(
        [broker.issue(SUBJECT, AUDIENCE, SCOPES, 3600).token for _ in range(40_000)]
    )
    return lambda: broker.verify(next(tokens), audience=AUDIENCE, scopes=SCOPES)


def round_trips() -> list[tuple[str, int, int, int]]:
    """(store, 10 verifies off, 10 verifies on, the flush) on the stores that are up."""
    out = []
    for name, build in (("redis", redis_store), ("postgres", postgres_store)):
        try:
            shared = build()
        except Exception as exc:  # a server not running: skip it, say why
            print(f"{name}: not measured ({type(exc).__name__})", file=sys.stderr)
            continue
        try:
            counting = shared.counting
            if counting is None:
                continue
            clock = FakeClock(time.time())  # never moves: no opportunistic sweep
            trips = []
            broker = None
            for track in (False, True):
                broker = Broker(
                    keys=KeyRing.generate("EdDSA"),
                    store=counting.store,
                    clock=clock,
                    track_usage=track,
                )
                broker.sweep()
                token = broker.issue(SUBJECT, AUDIENCE, SCOPES, 600).token
                for _ in range(8):  # warm-up: scripts loaded, statements prepared
                    broker.verify(token, audience=AUDIENCE)

                def ten(b: Broker = broker, t: str = token) -> None:
                    for _ in range(10):
                        b.verify(t, audience=AUDIENCE)

                trips.append(counting.round_trips(ten))
            assert broker is not None
            out.append((name, trips[0], trips[1], counting.round_trips(broker.flush_usage)))
        finally:
            shared.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches (a smoke run)")
    args = parser.parse_args(argv)
    number, repeat = (200, 3) if args.quick else (2000, 15)
    worst = 0.0
    print(f"{'operation':<26} {'usage':<6} {'us/call':>9} {'ratio':>7}")
    for fmt in ("jws", "opaque"):
        for label, make in (("verify (cache)", repeated), ("verify (fresh)", fresh)):
            if fmt == "opaque" and label == "verify (fresh)":
                continue  # an opaque token has no signature to cache: the same as above
            cases = {name: make(broker) for name, broker in brokers(fmt).items()}
            for name, (seconds, ratio) in measure(cases, number, repeat).items():
                print(f"{label + ' ' + fmt:<26} {name:<6} {seconds * 1e6:>9.2f} {ratio:>6.3f}x")
                worst = max(worst, ratio)
    verdict = "ok" if worst <= TARGET else "OVER TARGET"
    print(f"worst on/off ratio {worst:.3f}x (target <= {TARGET:.2f}x): {verdict}")
    extra = 0
    for name, off, on, flush in round_trips():
        extra = max(extra, on - off)
        print(
            f"{name}: round trips of 10 verifies: off {off}, on {on} (extra {on - off},"
            f" target 0); the flush of their usage: {flush}"
        )
    return 0 if args.quick or (worst <= TARGET and extra == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
