"""The hot paths against the signature itself: the floor no library goes under.

    python benchmarks/floor.py            # about 40 s
    python benchmarks/floor.py --quick    # smoke run
    python benchmarks/floor.py --json FILE

For each operation, four sides run in one process, their batches interleaved
(A B C D, then D C B A, ...) so drift hits them alike:

- **raw**: the bare Ed25519 sign (or verify) of the same signing input a
  jitbroker token has: the floor;
- **jitbroker**: ``broker.issue`` (a JWS, its lease stored) or an online
  ``broker.verify`` of a fresh token (a cache miss: the full signature check,
  the claims, the lease lookup);
- **minimal JWS**: a hand-written compact JWS of the same claims with no lease
  at all (``json.dumps`` + base64url + sign; split + verify + ``json.loads`` +
  the time and audience checks): what framing alone costs;
- **PyJWT**: ``jwt.encode`` / ``jwt.decode`` with the same claims and checks.

Each figure is the median of the per-batch ratios to the raw batch next to it,
with the interquartile range of those ratios, so a reader sees the noise.
Two variants: the garbage collector paused during a batch (as timeit does) and
left on (as users run). Issue 14's targets: issue / raw sign <= 1.20, online
verify / raw verify <= 1.10.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jwt
from run import (
    AUDIENCE,
    ISSUER,
    SCOPES,
    cycle,
    issuing,
    per_call,
    pyjwt_decode,
    pyjwt_payload,
)

from jitbroker import Broker, KeyRing

TARGETS = {"issue": 1.20, "verify": 1.10}
Side = Callable[[], object]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def ratios(
    sides: dict[str, Side], number: int, repeat: int, gc_on: bool, setup: Callable[[], None]
) -> dict[str, tuple[float, float, float, float]]:
    """Per side: (median seconds per call, median ratio to ``raw``, its first and
    third quartile), from interleaved batches (one warm-up round not counted)."""
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeat + 1):
        setup()
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(per_call(sides[name], number, gc_on=gc_on))
    out = {}
    raw = times["raw"][1:]
    for name in names:
        mine = times[name][1:]
        each = sorted(m / r for m, r in zip(mine, raw, strict=True))
        q1, _, q3 = statistics.quantiles(each, n=4)
        out[name] = (statistics.median(mine), statistics.median(each), q1, q3)
    return out


class Floor:
    def __init__(self, quick: bool) -> None:
        self.number = 300 if quick else 2000
        self.repeat = 6 if quick else 16
        self.ring = KeyRing.generate("EdDSA")
        self.key = self.ring.active
        self.private = self.key._material  # the very key object every side signs with
        self.public = self.key._verifier
        self.broker = Broker(issuer=ISSUER, keys=self.ring, max_ttl=3600)
        self.header = {"alg": "EdDSA", "kid": self.key.kid, "typ": "at+jwt"}
        self.rows: list[dict[str, Any]] = []

    def minimal_token(self) -> str:
        claims = pyjwt_payload(int(time.time()))
        head = b64(json.dumps(self.header, separators=(",", ":")).encode())
        body = b64(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{head}.{body}"
        return f"{signing_input}.{b64(self.private.sign(signing_input.encode('ascii')))}"

    def minimal_verify(self, token: str) -> dict[str, Any]:
        head, body, sig = token.split(".")
        self.public.verify(unb64(sig), f"{head}.{body}".encode("ascii"))
        claims: dict[str, Any] = json.loads(unb64(body))
        now = time.time()
        if claims["aud"] != AUDIENCE or not claims["nbf"] - 5 <= now < claims["exp"] + 5:
            raise ValueError("not valid")
        return claims

    def issue(self, gc_on: bool) -> None:
        sample = issuing(self.broker)().token
        signing_input = sample.rsplit(".", 1)[0].encode("ascii")
        private = self.private

        sides: dict[str, Side] = {
            "raw": lambda: private.sign(signing_input),
            "jitbroker": issuing(self.broker),
            "minimal JWS": self.minimal_token,
            "PyJWT": lambda: jwt.encode(
                pyjwt_payload(int(time.time())), private, "EdDSA", self.header
            ),
        }
        self.report(
            "issue",
            "raw Ed25519 sign",
            gc_on,
            ratios(sides, self.number, self.repeat, gc_on, lambda: None),
        )

    def verify(self, gc_on: bool) -> None:
        issue, public = issuing(self.broker), self.public
        pools: dict[str, Callable[[], str]] = {}

        def fresh() -> None:  # new tokens every round: every verify is a cache miss
            ours = [issue().token for _ in range(self.number)]
            pools["jitbroker"] = cycle(ours)
            pools["raw"] = cycle(ours)
            pools["minimal JWS"] = cycle([self.minimal_token() for _ in range(self.number)])
            pools["PyJWT"] = cycle(
                [
                    jwt.encode(pyjwt_payload(int(time.time())), self.private, "EdDSA", self.header)
                    for _ in range(self.number)
                ]
            )

        def raw() -> object:
            signing_input, _, sig = pools["raw"]().rpartition(".")
            public.verify(unb64(sig), signing_input.encode("ascii"))
            return None

        sides: dict[str, Side] = {
            "raw": raw,
            "jitbroker": lambda: self.broker.verify(
                pools["jitbroker"](), audience=AUDIENCE, scopes=SCOPES
            ),
            "minimal JWS": lambda: self.minimal_verify(pools["minimal JWS"]()),
            "PyJWT": lambda: pyjwt_decode(pools["PyJWT"](), public),
        }
        self.report(
            "verify",
            "raw Ed25519 verify",
            gc_on,
            ratios(sides, self.number, self.repeat, gc_on, fresh),
        )

    def report(
        self,
        operation: str,
        floor: str,
        gc_on: bool,
        found: dict[str, tuple[float, float, float, float]],
    ) -> None:
        for side, (seconds, ratio, q1, q3) in found.items():
            if side == "raw":
                continue
            target = TARGETS[operation] if side == "jitbroker" else None
            self.rows.append(
                {
                    "name": f"{operation} {side} / {floor}",
                    "gc": "on" if gc_on else "paused",
                    "us": round(seconds * 1e6, 2),
                    "floor_us": round(found["raw"][0] * 1e6, 2),
                    "ratio": round(ratio, 3),
                    "iqr": [round(q1, 3), round(q3, 3)],
                    "target": target,
                    "ok": None if target is None else ratio <= target,
                }
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches, for a smoke run")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    bench = Floor(args.quick)
    for gc_on in (False, True):
        bench.issue(gc_on)
        bench.verify(gc_on)
    print(f"python {sys.version.split()[0]}, PyJWT {jwt.__version__}, {bench.repeat} rounds")
    print(
        f"{'ratio to the floor':48} {'gc':>6} {'us':>8} {'floor':>7} {'ratio':>6} "
        f"{'IQR':>13} {'target':>7}"
    )
    for r in bench.rows:
        mark = {True: "ok", False: "MISS", None: ""}[r["ok"]]
        target = "" if r["target"] is None else f"<={r['target']}"
        iqr = f"{r['iqr'][0]:.3f}-{r['iqr'][1]:.3f}"
        print(
            f"{r['name']:48} {r['gc']:>6} {r['us']:8.2f} {r['floor_us']:7.2f} "
            f"{r['ratio']:6.3f} {iqr:>13} {target:>7} {mark}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(bench.rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
