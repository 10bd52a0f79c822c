"""BrokerAuth's cost per request with a cached token: the auth flow driven directly.

    python benchmarks/web_client.py            # about 10 seconds
    python benchmarks/web_client.py --quick    # smoke run

No network and no client: each call builds the flow generator, takes the
authorized request from it and sends it a response, exactly what httpx does
around a request. The token is issued before timing and never due for
renewal, so the figure is the steady state. A do-nothing ``httpx.Auth`` driven
the same way is the floor: what httpx pays for any auth. The overhead,
BrokerAuth minus the floor, has a target of <= 5 us a request (issue 10); the
absolute figure is printed too, and the DPoP figures (a freshly signed proof
per request) for information. Exits 1 if the overhead is over its target.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Callable
from functools import partial

import httpx

from jitbroker import Broker
from jitbroker.keys import generate_key
from jitbroker.web.client import BrokerAuth

TARGET_US = 5.0
URL = "https://api.example.com/orders?page=2"


def driver(auth: httpx.Auth) -> Callable[[], None]:
    """One request through ``auth``'s sync flow, as ``httpx.Client`` drives it."""
    request = httpx.Request("GET", URL)
    response = httpx.Response(200, request=request)
    flow_of = auth.sync_auth_flow

    def one() -> None:
        flow = flow_of(request)
        next(flow)
        try:  # noqa: SIM105 - contextlib.suppress would time itself too
            flow.send(response)
        except StopIteration:
            pass

    return one


def async_per_call(auth: httpx.Auth, number: int) -> float:
    """Seconds per request through ``auth``'s async flow (one loop, no awaiting I/O)."""
    request = httpx.Request("GET", URL)
    response = httpx.Response(200, request=request)

    async def batch() -> float:
        flow_of = auth.async_auth_flow
        start = time.perf_counter()
        for _ in range(number):
            flow = flow_of(request)
            await flow.__anext__()
            try:  # noqa: SIM105 - as above
                await flow.asend(response)
            except StopAsyncIteration:
                pass
        return (time.perf_counter() - start) / number

    return asyncio.run(batch())


def per_call(fn: Callable[[], None], number: int) -> float:
    """Seconds per call over one batch, gc paused (as timeit does)."""
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - start) / number
    finally:
        gc.enable()


def median(fn: Callable[[], float], repeat: int) -> float:
    fn()  # warm-up, not counted
    return statistics.median(fn() for _ in range(repeat))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches: a smoke run")
    quick = parser.parse_args().quick
    number, repeat = (2_000, 3) if quick else (50_000, 7)

    broker = Broker(issuer="urn:example:broker", default_ttl=3600, max_ttl=3600)

    def make(holder_key: object = None) -> BrokerAuth:
        return BrokerAuth(
            broker, subject="svc:bench", audience="api:orders", scopes=["orders:read"],
            ttl=3600, holder_key=holder_key,
        )  # fmt: skip

    bearer = make()
    floor = httpx.Auth()

    def sync(auth: httpx.Auth, n: int = number) -> float:
        return median(partial(per_call, driver(auth), n), repeat)

    rows: list[tuple[str, float, float | None]] = [
        ("no auth (httpx.Auth), the floor", sync(floor), None),
        ("BrokerAuth, bearer, cached token", sync(bearer), TARGET_US),
        (
            "BrokerAuth, bearer, async flow",
            median(partial(async_per_call, bearer, number), repeat),
            None,
        ),
    ]
    for alg in ("EdDSA", "ES256"):
        dpop = make(generate_key(alg))
        rows.append((f"BrokerAuth, DPoP {alg} proof", sync(dpop, number // 10), None))
        dpop.close()
    bearer.close()

    over = False
    print(f"BrokerAuth per request, median of {repeat} batches of {number} (us)")
    floor_s = rows[0][1]
    for name, seconds, target in rows:
        extra = "" if seconds is floor_s else f"  (+{(seconds - floor_s) * 1e6:.2f} over the floor)"
        verdict = ""
        if target is not None:  # the overhead: what BrokerAuth adds to httpx's own flow
            ok = (seconds - floor_s) * 1e6 <= target
            over = over or not ok
            verdict = f"  overhead target <= {target:.0f} us: {'ok' if ok else 'OVER'}"
        print(f"  {name:<36} {seconds * 1e6:8.2f}{extra}{verdict}")
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
