"""What BearerAuth costs per request, against the same app calling ``Verifier.verify`` itself.

    python benchmarks/web.py            # full run (a few seconds)
    python benchmarks/web.py --quick    # smoke run

Requests go through ``httpx.ASGITransport`` (in process, so the network does
not dominate) to two Starlette apps with the same endpoint: one behind
``BearerAuth`` (``await verifier.averify``), one that reads the header and
calls ``verifier.verify`` in the endpoint. The ratio of their per-request
times is the middleware's overhead; the target is <= 1.15x. The same pair is
also timed as bare ASGI calls (no httpx, no Starlette routing in the way), the
strictest view of the gate's own cost, and with DPoP-bound tokens (a fresh
proof per request, made before the clock starts).

Figures are medians over repeats of a batch, the two sides interleaved so
drift hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from jitbroker import Broker, KeyRing, Verifier
from jitbroker.dpop import make_proof
from jitbroker.keys import generate_key
from jitbroker.web import BearerAuth

ISSUER = "urn:example:broker"
AUDIENCE = "api:orders"
TARGET = 1.15
BASE = "http://bench.local"
URL = BASE + "/orders"


def apps(verifier: Verifier) -> tuple[Any, Any]:
    """The protected app and the same app verifying in its endpoint."""

    async def protected(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.scope["jitbroker.claims"].subject)

    async def by_hand(request: Request) -> PlainTextResponse:
        token = request.headers["authorization"].partition(" ")[2]
        claims = verifier.verify(
            token,
            audience=AUDIENCE,
            proof=request.headers.get("dpop"),
            method=request.method,
            url=URL,
        )
        return PlainTextResponse(claims.subject)

    with_middleware = Starlette(routes=[Route("/orders", protected)])
    with_middleware.add_middleware(BearerAuth, verifier=verifier, audience=AUDIENCE)
    return with_middleware, Starlette(routes=[Route("/orders", by_hand)])


async def per_request(
    send: Callable[[dict[str, str]], Awaitable[Any]], headers: list[Any]
) -> float:
    """Microseconds per request over one batch of ``headers``."""
    gc.disable()
    try:
        start = time.perf_counter()
        for h in headers:
            await send(h)
        return (time.perf_counter() - start) / len(headers) * 1e6
    finally:
        gc.enable()


async def compare(
    name: str, make_a: Any, make_b: Any, headers: Callable[[], list[Any]], repeats: int
) -> tuple[str, float, float]:
    """Median per-request times of the two senders, batches interleaved."""
    a_times, b_times = [], []
    for _ in range(repeats):
        a_times.append(await per_request(make_a, headers()))
        b_times.append(await per_request(make_b, headers()))
    return name, statistics.median(a_times), statistics.median(b_times)


def asgi_sender(app: Any) -> Callable[[dict[str, str]], Awaitable[None]]:
    """Call ``app`` directly with a minimal scope: no client library at all."""

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start" and message["status"] != 200:
            raise RuntimeError(f"status {message['status']}")

    async def call(headers: dict[str, str]) -> None:
        scope = {
            "type": "http",
            "method": "GET",
            "scheme": "http",
            "path": "/orders",
            "raw_path": b"/orders",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"bench.local")]
            + [(k.encode(), v.encode()) for k, v in headers.items()],
            "server": ("bench.local", 80),
            "client": ("127.0.0.1", 5000),
        }
        await app(scope, receive, send)

    return call


async def run(quick: bool) -> list[tuple[str, float, float]]:
    broker = Broker(issuer=ISSUER, keys=KeyRing.generate("EdDSA"))
    verifier = Verifier(broker.keys, issuer=ISSUER, store=broker.store, cache_size=4096)
    protected, by_hand = apps(verifier)
    batch, repeats = (200, 5) if quick else (2000, 9)
    token = broker.issue("svc:bench", AUDIENCE, ["orders:read"], ttl=3600).token
    bearer = [{"authorization": f"Bearer {token}"}] * batch

    def proofs() -> list[dict[str, str]]:
        # A holder key per batch: one key may have 10,000 live proofs at a time.
        holder = generate_key("EdDSA")
        bound = broker.issue("svc:bench", AUDIENCE, ttl=3600, holder_key=holder.public()).token
        return [
            {"authorization": f"DPoP {bound}", "dpop": make_proof(holder, "GET", URL, token=bound)}
            for _ in range(batch)
        ]

    results = []
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=protected), base_url=BASE) as a,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=by_hand), base_url=BASE) as b,
    ):

        async def get_a(h: dict[str, str]) -> None:
            (await a.get("/orders", headers=h)).raise_for_status()

        async def get_b(h: dict[str, str]) -> None:
            (await b.get("/orders", headers=h)).raise_for_status()

        await per_request(get_a, bearer[:50])  # warm both: caches, imports, code paths
        await per_request(get_b, bearer[:50])
        results.append(
            await compare("bearer, httpx.ASGITransport", get_a, get_b, lambda: bearer, repeats)
        )
        results.append(await compare("DPoP, httpx.ASGITransport", get_a, get_b, proofs, repeats))
    direct_a, direct_b = asgi_sender(protected), asgi_sender(by_hand)
    results.append(
        await compare("bearer, bare ASGI call", direct_a, direct_b, lambda: bearer, repeats)
    )
    results.append(await compare("DPoP, bare ASGI call", direct_a, direct_b, proofs, repeats))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches, for a smoke run")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args.quick))
    print(f"{'per request':34} {'BearerAuth':>11} {'by hand':>9} {'ratio':>7}  target")
    failed = False
    for name, with_middleware, by_hand in results:
        ratio = with_middleware / by_hand
        gated = name.endswith("ASGITransport")  # the issue's target is on these rows
        failed |= gated and ratio > TARGET
        verdict = f"<= {TARGET}x {'ok' if ratio <= TARGET else 'MISSED'}" if gated else "(info)"
        print(f"{name:34} {with_middleware:9.1f}us {by_hand:7.1f}us {ratio:6.2f}x  {verdict}")
    return 1 if failed and not args.quick else 0


if __name__ == "__main__":
    raise SystemExit(main())
