"""Hot-path benchmarks, side by side with PyJWT in the same process.

    python benchmarks/run.py            # full run (about a minute; 1,000,000 leases)
    python benchmarks/run.py --quick    # smoke run with small sizes

Each figure is the median over repeats of the per-call time of a batch, with
jitbroker and PyJWT batches interleaved so drift hits both alike. The same
claims and the same key object are used on both sides. Results are printed as
ratios (jitbroker / PyJWT) against the targets of the foundation issue.
"""

from __future__ import annotations

import argparse
import gc
import json
import secrets
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import jwt

from jitbroker import Broker, Credential, KeyRing, LeaseStore, MemoryStore
from jitbroker.lease import Lease

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


def per_call(fn: Callable[[], object], number: int) -> float:
    """Seconds per call of ``fn`` over one batch (gc paused, as timeit does)."""
    gc_was = gc.isenabled()
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
    """Medians of interleaved batches: (ours, theirs) seconds per call."""
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeat):
        if setup:
            setup()
        a.append(per_call(ours, number))
        b.append(per_call(theirs, number))
    return statistics.median(a), statistics.median(b)


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

    def row(self, name: str, ours: float, theirs: float, target: float, unit: str = "us") -> None:
        ratio = ours / theirs
        self.rows.append(
            {
                "name": name,
                "jitbroker_us": round(ours * 1e6, 2),
                "baseline_us": round(theirs * 1e6, 2),
                "ratio": round(ratio, 3),
                "target": target,
                "ok": ratio <= target,
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
    steps = ["issue", "verify", "opaque", "scale", "memory"]
    parser.add_argument("--only", choices=steps, action="append", help="run only these")
    args = parser.parse_args(argv)
    bench = Bench(args.quick)
    for step in args.only or steps:
        getattr(bench, step)()
    print(f"python {sys.version.split()[0]}, PyJWT {jwt.__version__}, median of {bench.repeat}")
    print(f"{'benchmark':48} {'jitbroker':>10} {'PyJWT':>10} {'ratio':>8} {'target':>8}")
    for r in bench.rows:
        ours = "" if r["jitbroker_us"] is None else f"{r['jitbroker_us']:.2f}us"
        base = "" if r["baseline_us"] is None else f"{r['baseline_us']:.2f}us"
        mark = "ok" if r["ok"] else "MISS"
        target = f"<={r['target']}"
        print(f"{r['name']:48} {ours:>10} {base:>10} {r['ratio']:>8} {target:>8} {mark}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(bench.rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
