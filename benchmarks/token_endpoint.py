"""What ``POST /token`` over loopback HTTP costs, against ``broker.issue`` in process.

    python benchmarks/token_endpoint.py            # full run (~20 s)
    python benchmarks/token_endpoint.py --quick    # smoke run

The server is ``broker_app`` under uvicorn in its own process (one worker, a
``Broker`` on a ``MemoryStore``, EdDSA keys). Clients are 1 and then 4
processes, each sending client-credentials requests one after another over a
keep-alive connection, authenticated by ``private_key_jwt`` (an EdDSA
``ClientKey``): each request carries a fresh assertion, minted before the
clock starts (assertions are single-use). The baseline is the same
``broker.issue`` call (same subject, audience, scopes, TTL, owner) made in
process, one after another.

Reported: per-request p50 for each side, the ratio, requests per second, and
the HTTP layer's added latency at p50 (``POST /token`` p50 minus ``issue``
p50: client authentication, form parsing, JSON and HTTP; on a MemoryStore the
broker is called on the event loop, with no worker-thread hop);
the issue's target is <= 1 ms with one client (http.client, the leanest
client, so the figure is the server's; an httpx row shows what a heavier client
adds). The "HTTP floor" row is a request refused right after its form is
parsed (no client authentication, no thread hop, no issue): uvicorn, h11,
Starlette and loopback TCP alone. The "SQLite store" row serves a broker on a
SQLite file (a store that does I/O, so each request takes one worker-thread
hop), against ``issue`` on a SQLite file in process. On a 2-core machine the 4-client row shares
the cores with the server: its latency is an upper bound.
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import httpx

from jitbroker import Broker, KeyRing
from jitbroker.jwk import b64url
from jitbroker.keys import Key, generate_key
from jitbroker.tokens import json_text

TARGET_MS = 1.0
CLIENT_ID = "bench-client"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FORM = {"grant_type": "client_credentials", "audience": "api:orders", "scope": "orders:read"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def serve(port: int, client_jwks: dict[str, Any], store_path: str | None = None) -> None:
    """The server process: broker_app under uvicorn, quiet."""
    import uvicorn

    from jitbroker.web import ClientKey, broker_app

    base = f"http://127.0.0.1:{port}"
    broker = _broker(store_path)
    client = ClientKey(CLIENT_ID, client_jwks, "svc:bench", max_ttl=3600)
    app = broker_app(broker, [client], base_url=base, allow_any_access=True)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        proxy_headers=False,
    )


def assertion(key: Key, token_endpoint: str, now: float) -> str:
    """A private_key_jwt (RFC 7523 section 3) for one request."""
    header = {"alg": key.alg, "typ": "JWT", "kid": key.kid}
    claims = {
        "iss": CLIENT_ID,
        "sub": CLIENT_ID,
        "aud": token_endpoint,
        "jti": os.urandom(16).hex(),
        "iat": int(now),
        "exp": int(now) + 300,
    }
    signing_input = b64url(json_text(header).encode()) + "." + b64url(json_text(claims).encode())
    return signing_input + "." + b64url(key.sign(signing_input.encode("ascii")))


def client(base: str, assertions: list[str], start: Any, out: Any, library: str) -> None:
    """One client process: wait for the start signal, send every request, report."""
    bodies = [
        urlencode({**FORM, "client_assertion_type": JWT_BEARER, "client_assertion": signed})
        for signed in assertions
    ]
    if library == "floor":  # no grant_type: refused after parsing, before anything else
        bodies = ["audience=api%3Aorders&scope=orders%3Aread"] * len(bodies)
    post = _httpx_post(base) if library == "httpx" else _stdlib_post(base, library == "floor")
    post(bodies[0])  # connect before the clock starts (an assertion is spent on it)
    times: list[float] = []
    start.wait()
    began = time.perf_counter()
    for body in bodies[1:]:
        t0 = time.perf_counter()
        post(body)
        times.append(time.perf_counter() - t0)
    out.put((times, time.perf_counter() - began))


_HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}


def _check(status: int, text: str, expected: int = 200) -> None:
    if status != expected:
        raise RuntimeError(f"/token answered {status}: {text}")


def _stdlib_post(base: str, floor: bool = False) -> Callable[[str], None]:
    """POST with http.client: the leanest client, so the figure is the server's."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port))

    def post(body: str) -> None:
        connection.request("POST", "/token", body=body.encode(), headers=_HEADERS)
        response = connection.getresponse()
        _check(response.status, response.read().decode(), 400 if floor else 200)

    return post


def _httpx_post(base: str) -> Callable[[str], None]:
    session = httpx.Client(base_url=base, timeout=10)

    def post(body: str) -> None:
        response = session.post("/token", content=body, headers=_HEADERS)
        _check(response.status_code, response.text)

    return post


def over_http(
    base: str, key: Key, processes: int, per_client: int, library: str = "http.client"
) -> tuple[list[float], float]:
    """Every request's latency and the aggregate requests per second."""
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    now = time.time()
    workers = [
        ctx.Process(
            target=client,
            args=(
                base,
                [assertion(key, base + "/token", now) for _ in range(per_client + 1)],
                start,
                out,
                library,
            ),
        )
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    time.sleep(0.5)  # every client connected
    began = time.perf_counter()
    start.set()
    results = [out.get(timeout=300) for _ in workers]
    elapsed = time.perf_counter() - began
    for worker in workers:
        worker.join(30)
    latencies = [t for times, _ in results for t in times]
    return latencies, len(latencies) / elapsed


def _broker(store_path: str | None) -> Broker:
    if store_path is None:
        return Broker(issuer="urn:bench:broker", keys=KeyRing.generate("EdDSA"))
    from jitbroker.stores.sqlite import SQLiteStore

    store = SQLiteStore(store_path)
    return Broker(issuer="urn:bench:broker", keys=KeyRing.generate("EdDSA"), store=store)


def in_process(count: int, store_path: str | None = None) -> tuple[list[float], float]:
    """``broker.issue`` called directly, as the endpoint calls it."""
    broker = _broker(store_path)
    times = []
    began = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        broker.issue(
            "svc:bench", "api:orders", ["orders:read"], 300, owner="svc:bench", max_ttl=3600
        )
        times.append(time.perf_counter() - t0)
    return times, count / (time.perf_counter() - began)


def wait_for(base: str, server: Any) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not server.is_alive():
            raise RuntimeError("the server process died")
        try:
            httpx.get(base + "/jwks.json", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("the server did not start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches, for a smoke run")
    args = parser.parse_args(argv)
    per_client = 200 if args.quick else 2000
    key = generate_key("EdDSA")
    jwks = KeyRing([key]).public().jwks()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ctx = multiprocessing.get_context("fork")
    scratch = tempfile.mkdtemp(prefix="jitbroker-bench-")
    sqlite_port = free_port()
    sqlite_base = f"http://127.0.0.1:{sqlite_port}"
    server = ctx.Process(target=serve, args=(port, jwks), daemon=True)
    sqlite_server = ctx.Process(
        target=serve, args=(sqlite_port, jwks, os.path.join(scratch, "served.db")), daemon=True
    )
    server.start()
    sqlite_server.start()
    try:
        wait_for(base, server)
        wait_for(sqlite_base, sqlite_server)
        over_http(base, key, 1, 50)  # warm: imports, caches, code paths
        over_http(sqlite_base, key, 1, 50)
        memory = in_process(per_client)
        on_file = in_process(per_client, os.path.join(scratch, "in-process.db"))
        rows = [
            (
                f"POST /token, {n} client{'s' if n > 1 else ''}, http.client",
                n == 1,
                *over_http(base, key, n, per_client),
                memory,
            )
            for n in (1, 4)
        ]
        rows.append(
            (
                "POST /token, 1 client, httpx",
                False,
                *over_http(base, key, 1, per_client, "httpx"),
                memory,
            )
        )
        rows.append(
            (
                "POST /token, 1 client, SQLite store",
                False,
                *over_http(sqlite_base, key, 1, per_client),
                on_file,
            )
        )
        rows.append(
            (
                "HTTP floor: a 400 before client auth",
                False,
                *over_http(base, key, 1, per_client, "floor"),
                memory,
            )
        )
    finally:
        for process in (server, sqlite_server):
            process.terminate()
            process.join(10)
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"python {sys.version.split()[0]}, {per_client} requests per client, p50 latencies")
    print(
        f"{'benchmark':44} {'POST /token':>12} {'issue()':>10} {'ratio':>8} "
        f"{'req/s':>9} {'issue/s':>9} {'added':>9} {'target':>8}"
    )
    failed = False
    for label, gated, latencies, rate, (issue_times, issue_rate) in rows:
        issue_p50 = statistics.median(issue_times) * 1e3
        http_p50 = statistics.median(latencies) * 1e3
        added = http_p50 - issue_p50
        ok = added <= TARGET_MS
        failed |= gated and not ok
        mark = (f"<= {TARGET_MS:g} ms " + ("ok" if ok else "MISSED")) if gated else "(info)"
        name = label
        print(
            f"{name:44} {http_p50:9.3f} ms {issue_p50:7.3f} ms {http_p50 / issue_p50:7.1f}x "
            f"{rate:9.0f} {issue_rate:9.0f} {added:6.3f} ms {mark}"
        )
    return 1 if failed and not args.quick else 0


if __name__ == "__main__":
    raise SystemExit(main())
