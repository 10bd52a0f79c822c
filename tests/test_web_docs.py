"""Every example in docs/web.md runs, and every service in it is served by a real
server and called over TCP: no token, a good token, a token without the scope,
and a revoked one.

Each service example runs in its own interpreter (Django's settings are
configured once per process), after the doc's first block, which makes the
shared broker and verifier.

The examples under "## Clients" are client examples: each runs in this process
after the first block, against a real uvicorn serving a small Starlette app
(``BearerAuth`` with the shared verifier, DPoP nonces required, and
``require(scopes=["orders:read"])``) at the address the examples call,
``https://orders.internal`` (replaced by the server's). Every request must
reach the route, and every lease it saw must be revoked by the example's
``with`` (reason ``client-closed``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from jitbroker import Claims

ROOT = Path(__file__).resolve().parent.parent
CLIENTS_SECTION = "Clients"
SERVICE_URL = "https://orders.internal"  # where the client examples call the service


def _blocks(text: str) -> tuple[list[str], list[int]]:
    """The ```python blocks of ``text``, and the indices of those under "## Clients"
    (its ### subsections included)."""
    blocks: list[str] = []
    clients: list[int] = []
    section = ""
    for match in re.finditer(r"^## ([^\n]+)$|```python\n(.*?)```", text, re.M | re.S):
        if match[1] is not None:
            section = match[1].strip()
            continue
        if section == CLIENTS_SECTION:
            clients.append(len(blocks))
        blocks.append(match[2])
    return blocks, clients


BLOCKS, CLIENT_EXAMPLES = _blocks((ROOT / "docs" / "web.md").read_text())
SERVICE_EXAMPLES = [i for i in range(1, len(BLOCKS)) if i not in CLIENT_EXAMPLES]


def _id(index: int) -> str:
    return f"docs/web.md#{index}"


def test_the_doc_has_client_examples() -> None:
    assert len(CLIENT_EXAMPLES) >= 3  # a wrong heading would silently drop them
    assert all(SERVICE_URL in BLOCKS[i] for i in CLIENT_EXAMPLES)


@pytest.mark.parametrize("index", SERVICE_EXAMPLES, ids=_id)
def test_doc_example(index: int) -> None:
    run = subprocess.run(
        [sys.executable, __file__, str(index)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().endswith("ok")


def orders_service(verifier: Any, seen: list[Claims], statuses: list[int]) -> Any:
    """The service the client examples call: what the FastAPI example serves,
    plus DPoP nonces (so a key-bound client goes through the nonce dance). The
    claims of each request served go to ``seen``, every response's status to
    ``statuses``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from jitbroker.web import BearerAuth, DPoPNonces, require

    need_read = require(scopes=["orders:read"])

    async def orders(request: Request) -> JSONResponse:
        claims = await need_read(request)
        seen.append(claims)
        return JSONResponse({"subject": claims.subject})

    app = Starlette(routes=[Route("/orders", orders)])
    app.add_middleware(
        BearerAuth,
        verifier=verifier,
        audience="api:orders",
        dpop_nonces=DPoPNonces(secret=os.urandom(32)),
    )

    async def recorded(scope: Any, receive: Any, send: Any) -> None:
        async def send_recorded(message: Any) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
            await send(message)

        await app(scope, receive, send_recorded)

    return recorded


@pytest.mark.parametrize("index", CLIENT_EXAMPLES, ids=_id)
def test_client_example(index: int) -> None:
    from web_servers import uvicorn_server

    names: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(BLOCKS[0], _id(0), "exec"), names)  # noqa: S102 - our docs
    seen: list[Claims] = []
    statuses: list[int] = []
    with uvicorn_server(orders_service(names["verifier"], seen, statuses)) as base:
        code = BLOCKS[index].replace(SERVICE_URL, base)
        exec(compile(code, _id(index), "exec"), names)  # noqa: S102 - our docs
    assert seen, "no request of the example reached the service"
    bound = "holder_key=" in BLOCKS[index]
    # Every request gets through; with DPoP, the first is asked for a nonce
    # (401 use_dpop_nonce) and retried once with it, later ones carry it.
    assert statuses == [401] * bound + [200] * len(seen), statuses
    store = names["broker"].store
    for claims in seen:
        assert claims.subject == "svc:report"
        assert (claims.holder is not None) == bound
        lease = store.get(claims.lease_id)
        assert lease is not None
        assert lease.revoke_reason == "client-closed"  # the example's `with` closed the auth


def test_the_web_benchmark_runs() -> None:
    """Not a timing test: the script must run; its figures are read by people."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "web.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "bearer, httpx.ASGITransport" in run.stdout


def drive(index: int) -> None:
    """Run block ``index`` (after the first) as module ``docs_example``; serve and call it."""
    import httpx

    from web_servers import uvicorn_server, wsgi_server

    module = types.ModuleType("docs_example")
    sys.modules["docs_example"] = module  # Django's ROOT_URLCONF=__name__ imports it
    code = BLOCKS[0] + "\n" + BLOCKS[index]
    exec(compile(code, f"docs/web.md#{index}", "exec"), module.__dict__)  # noqa: S102 - our docs
    names: dict[str, Any] = module.__dict__
    if '"/orders"' not in BLOCKS[index]:  # not a service: that it ran is the test
        print("ok")
        return
    broker = names["broker"]
    django = "application" in names
    app = names["application"] if django else names["app"]
    server = (
        wsgi_server(app, werkzeug=not django)
        if django or hasattr(app, "wsgi_app")
        else uvicorn_server(app)
    )
    with server as base, httpx.Client(base_url=base, timeout=10) as client:

        def get(token: str | None) -> httpx.Response:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return client.get("/orders", headers=headers)

        read = broker.issue("svc:docs", "api:orders", ["orders:read"], ttl=60)
        write = broker.issue("svc:docs", "api:orders", ["orders:write"], ttl=60)
        assert get(None).status_code in (401, 403)  # 403: Starlette's @requires, anonymous
        ok = get(read.token)
        assert ok.status_code == 200, ok.text
        assert ok.json()["subject"] == "svc:docs"
        assert get(write.token).status_code == 403
        broker.revoke(read)
        refused = get(read.token)
        assert refused.status_code == 401
        assert 'error="invalid_token"' in refused.headers["www-authenticate"]
        if 'get("/health")' in BLOCKS[index]:
            assert client.get("/health").status_code == 200
    print("ok")


if __name__ == "__main__":
    drive(int(sys.argv[1]))
