"""What a backend credential costs: issue and revoke with a provider, and without.

    python benchmarks/providers.py [--quick] [--json FILE]

For each shipped provider whose server answers (PostgreSQL at 127.0.0.1:5432
as role postgres, database test; Redis at 127.0.0.1:6379): a broker on a
MemoryStore with the provider, issuing for its audience (a login role or an
ACL user made per lease, then dropped), against the same broker issuing for a
plain audience. Batches interleave, medians are reported as ratios, and each
operation's backend round trips are counted (the provider's ``round_trips``).
A provider whose server is not running is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from jitbroker import Broker, Credential, KeyRing, MemoryStore

ISSUER = "urn:bench:providers"
SUBJECT = "svc:bench"
SCOPE = "orders:read"
TTL = 600
POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
TEMPLATE = "jitbench_orders_reader"


@contextmanager
def postgres_provider() -> Iterator[Any]:
    import psycopg

    from jitbroker.providers import PostgresRoles

    with psycopg.connect(POSTGRES_DSN, autocommit=True, connect_timeout=3) as admin:
        if admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (TEMPLATE,)).fetchone():
            pass
        else:
            admin.execute(f"CREATE ROLE {TEMPLATE} NOLOGIN")
    provider = PostgresRoles(admin_dsn=POSTGRES_DSN, roles={SCOPE: TEMPLATE}, prefix="jitbench_")
    try:
        yield provider
    finally:
        provider.close()


@contextmanager
def redis_provider() -> Iterator[Any]:
    import redis

    from jitbroker.providers import RedisUsers

    redis.Redis.from_url(REDIS_URL, socket_timeout=3).ping()
    rules = {SCOPE: "%R~orders:* +get +mget"}
    provider = RedisUsers(admin_url=REDIS_URL, rules=rules, prefix="jitbench_")
    try:
        yield provider
    finally:
        provider.close()


PROVIDERS: dict[str, Callable[[], Any]] = {
    "postgres": postgres_provider,
    "redis": redis_provider,
}


def timed(fn: Callable[[], object], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def measure(provider: Any, number: int, repeat: int) -> list[dict[str, Any]]:
    ring = KeyRing.generate("EdDSA")
    options: dict[str, Any] = {"reap_interval": 3600, "reconcile_interval": 10**6}
    ours = Broker(issuer=ISSUER, keys=ring, providers=[provider], **options)
    base = Broker(issuer=ISSUER, keys=ring, store=MemoryStore(), **options)
    audience = provider.name

    def issue_ours() -> Credential:
        return ours.issue(SUBJECT, audience, [SCOPE], TTL)

    def issue_base() -> Credential:
        return base.issue(SUBJECT, "api", [SCOPE], TTL)

    def batch() -> tuple[float, float, float, float, int, int]:
        made: list[Credential] = []
        made0: list[Credential] = []
        before = provider.round_trips
        issue = timed(lambda: made.append(issue_ours()), number)
        issue_trips = provider.round_trips - before
        issue0 = timed(lambda: made0.append(issue_base()), number)
        ours_left, base_left = iter(made), iter(made0)
        before = provider.round_trips
        revoke = timed(lambda: ours.revoke(next(ours_left)), number)
        revoke_trips = provider.round_trips - before
        revoke0 = timed(lambda: base.revoke(next(base_left)), number)
        return issue, issue0, revoke, revoke0, issue_trips, revoke_trips

    batch()  # warms connections and caches up: not counted
    runs = [batch() for _ in range(repeat)]
    samples = {
        key: [run[i] for run in runs]
        for i, key in enumerate(("issue", "issue0", "revoke", "revoke0"))
    }
    trips = {"issue": [run[4] for run in runs], "revoke": [run[5] for run in runs]}
    assert ours.failed_hooks() == [], "a revoke failed: the backend was not cleaned"
    ours.close()
    base.close()
    rows = []
    for op in ("issue", "revoke"):
        a, b = statistics.median(samples[op]), statistics.median(samples[op + "0"])
        rows.append(
            {
                "name": f"{provider.name}: {op} with the provider / without",
                "jitbroker_us": round(a * 1e6, 2),
                "baseline_us": round(b * 1e6, 2),
                "ratio": round(a / b, 3),
                "round_trips": statistics.median(trips[op]) / number,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--only", choices=sorted(PROVIDERS), action="append")
    args = parser.parse_args(argv)
    number, repeat = (20, 3) if args.quick else (200, 9)
    rows: list[dict[str, Any]] = []
    for name in args.only or sorted(PROVIDERS):
        try:
            with PROVIDERS[name]() as provider:
                rows += measure(provider, number, repeat)
        except Exception as exc:  # a server that is not running: say so, go on
            print(f"skipping {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    print(f"python {sys.version.split()[0]}, median of {repeat} batches of {number}")
    print(f"{'benchmark':44} {'jitbroker':>10} {'baseline':>10} {'ratio':>8} {'trips':>6}")
    for r in rows:
        print(
            f"{r['name']:44} {r['jitbroker_us']:>8.1f}us {r['baseline_us']:>8.1f}us"
            f" {r['ratio']:>8} {r['round_trips']:>6g}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
