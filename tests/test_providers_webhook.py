"""``WebhookProvider`` in a broker, against a real HTTP service on a loopback port:
a tiny API-key service (a WSGI app, served by wsgiref in a thread) that checks
every request with ``verify_webhook``. A lease's key dies with it by every path;
an outage is retried, parked, then finished; reconciliation converges; hostile
answers fail without echoing the body or the key; the receiver's check refuses
forged, replayed and malformed requests; bad configuration is refused; and the
receivers in docs/webhook.md (Python, and Node when it is installed) serve it.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import logging
import os
import re
import secrets
import select
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import httpx
import pytest

from jitbroker import Broker, Credential
from jitbroker.errors import (
    BadSignature,
    InvalidRequest,
    InvalidToken,
    MalformedToken,
    ProviderError,
    TokenExpired,
    TokenNotYetValid,
)
from jitbroker.providers import Provider, WebhookProvider, sign_webhook, verify_webhook
from jitbroker.testing import FakeClock

ROOT = Path(__file__).parent.parent
DOC = (ROOT / "docs" / "webhook.md").read_text()
KEY = secrets.token_bytes(32)
#: In every hostile body: must show in no error, log line or parked job.
MARK = "m4rk" + secrets.token_hex(8)
BASE = "/svc"
ACTIONS = ("create", "revoke", "renew", "managed")
Reply = tuple[str, list[tuple[str, str]], Iterable[bytes]]
Build = Callable[..., WebhookProvider]


# -- the service -----------------------------------------------------------------------
def reply(status: str, payload: object = None, raw: bytes | None = None) -> Reply:
    body = raw if raw is not None else b"" if payload is None else json.dumps(payload).encode()
    return status, [("Content-Type", "application/json")], [body]


class Service:
    """An API-key service: one key per lease, every request verified first.
    ``hostile`` maps an action to the reply that replaces the service's own."""

    def __init__(self, key: bytes = KEY) -> None:
        self.key = key
        self.keys: dict[str, dict[str, Any]] = {}  # lease id -> api_key, expires_at
        self.requests: list[dict[str, Any]] = []  # every verified request body, in order
        self.raw: list[tuple[bytes, str, str]] = []  # (body, signature, content type)
        self.refused = 0  # requests verify_webhook refused
        self.followed = 0  # hits on the redirect target
        self.hostile: dict[str, Callable[[], Reply]] = {}
        self.lock = threading.Lock()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        status, headers, body = self.answer(environ)
        start_response(status, headers)
        return body

    def answer(self, environ: WSGIEnvironment) -> Reply:
        action = environ["PATH_INFO"].removeprefix(BASE + "/")
        if action == "followed":
            with self.lock:
                self.followed += 1
            return reply("200 OK", {"api_key": MARK})
        if environ["REQUEST_METHOD"] != "POST" or action not in ACTIONS:
            return reply("404 Not Found")
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        header = environ.get("HTTP_JITBROKER_SIGNATURE", "")
        try:
            request = verify_webhook(self.key, body, header)
        except InvalidToken:
            with self.lock:
                self.refused += 1
            return reply("401 Unauthorized")
        if request["action"] != action:
            return reply("400 Bad Request")
        with self.lock:
            self.requests.append(request)
            self.raw.append((body, header, environ.get("CONTENT_TYPE", "")))
            if action in self.hostile:
                return self.hostile[action]()
            handler: Callable[[dict[str, Any]], Reply] = getattr(self, "on_" + action)
            return handler(request)

    def on_create(self, request: dict[str, Any]) -> Reply:
        lease = request["lease"]
        made = self.keys.setdefault(
            lease["id"], {"api_key": "ak_" + secrets.token_urlsafe(16), "expires_at": 0.0}
        )
        made["expires_at"] = lease["expires_at"]
        return reply("200 OK", {"api_key": made["api_key"]})

    def on_revoke(self, request: dict[str, Any]) -> Reply:
        gone = self.keys.pop(request["lease"]["id"], None)
        return reply("204 No Content" if gone else "404 Not Found")

    def on_renew(self, request: dict[str, Any]) -> Reply:
        held = self.keys.get(request["lease"]["id"])
        if held is None:
            return reply("404 Not Found")
        held["expires_at"] = max(held["expires_at"], request["lease"]["expires_at"])
        return reply("204 No Content")

    def on_managed(self, request: dict[str, Any]) -> Reply:
        return reply("200 OK", {"leases": sorted(self.keys)})

    def last(self, action: str) -> dict[str, Any]:
        return next(r for r in reversed(self.requests) if r["action"] == action)


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up mid-body (the cap at work)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class Running:
    """A WSGI app served on 127.0.0.1 in a thread; ``stop`` and ``start`` again
    on the same port (an outage)."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app
        self.port = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{BASE}"

    def start(self) -> None:
        server = make_server(
            "127.0.0.1", self.port, self.app, server_class=_Server, handler_class=_Quiet
        )
        self.port = server.server_port
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()  # joins the handler threads
            self._thread.join(5)
            self._server = None


@pytest.fixture
def service() -> Service:
    return Service()


@pytest.fixture
def running(service: Service) -> Iterator[Running]:
    server = Running(service)
    yield server
    server.stop()


@pytest.fixture
def build(running: Running) -> Iterator[Build]:
    """Builds providers for the running service (``key`` KEY); closes them at the end."""
    made: list[WebhookProvider] = []

    def make(url: str | None = None, **options: Any) -> WebhookProvider:
        options.setdefault("key", KEY)
        provider = WebhookProvider(url=url or running.url, **options)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.close()


def leaked(texts: Iterable[str]) -> list[str]:
    """The texts holding the hostile body's mark or the key, in any form."""
    forms = (MARK, KEY.hex(), repr(KEY), KEY.decode("latin-1"))
    return [text for text in texts if any(form in text for form in forms)]


def owed(broker: Broker) -> list[str]:
    """Every job still in the broker's outbox, parked or due: what it still owes."""
    return [job.id for job in broker.store.jobs()]


def chain(exc: BaseException) -> list[str]:
    """``str`` and ``repr`` of ``exc`` and of every exception it chains."""
    texts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None:
        texts += [str(seen), repr(seen)]
        seen = seen.__cause__ or seen.__context__
    return texts


# -- 1. the lifecycle ------------------------------------------------------------------
def test_a_lease_gets_an_api_key_the_service_holds(service: Service, build: Build) -> None:
    provider = build()
    assert isinstance(provider, Provider)
    broker = Broker(providers=[provider], clock=FakeClock())
    cred = broker.issue(
        "svc:a", "webhook", ["billing:read"], ttl=60, task="nightly", owner="team-a", purpose="pay"
    )
    secret = cred.secret
    assert secret is not None
    assert dict(secret) == {"api_key": service.keys[cred.lease_id]["api_key"]}
    shown = repr(cred) + str(cred) + repr(secret) + repr(provider) + repr(cred.lease)
    assert secret["api_key"] not in shown
    assert leaked([shown]) == []

    body, header, content_type = service.raw[0]
    request = json.loads(body)
    assert content_type == "application/json"
    assert header == sign_webhook(KEY, body, at=request["sent_at"])
    assert body == json.dumps(request, sort_keys=True, separators=(",", ":")).encode()
    assert abs(request["sent_at"] - time.time()) < 10  # the wall clock, not the broker's
    assert request == {
        "action": "create",
        "idempotency_key": f"{cred.lease_id}/create",
        "provider": "webhook",
        "sent_at": request["sent_at"],
        "lease": {
            "id": cred.lease_id,
            "subject": "svc:a",
            "audience": "webhook",
            "scopes": ["billing:read"],
            "expires_at": cred.lease.expires_at,
            "owner": "team-a",
            "purpose": "pay",
            "task": "nightly",
        },
    }
    documented = json.loads(re.findall(r"```json\n(.*?)\n```", DOC, re.S)[0])
    assert set(documented) == set(request)
    assert set(documented["lease"]) == set(request["lease"])

    assert broker.revoke(cred) is True
    assert service.keys == {}
    assert service.last("revoke")["idempotency_key"] == f"{cred.lease_id}/revoke"
    # The first issue's sweep also reconciles (every reconcile_interval): /managed.
    assert [r["action"] for r in service.requests] == ["create", "managed", "revoke"]
    assert provider.round_trips == 3


DEATHS = ["revoke", "task-end", "ttl-sweep", "parent-revoke", "revoke-where"]


@pytest.mark.parametrize("death", DEATHS)
def test_the_key_dies_with_its_lease(service: Service, running: Running, death: str) -> None:
    provider = WebhookProvider(url=running.url + "/", key=KEY)  # a trailing / is dropped
    clock = FakeClock()
    broker = Broker(providers=[provider], clock=clock)
    subject = f"svc:{uuid4().hex[:8]}"
    with contextlib.ExitStack() as stack:
        if death == "task-end":
            cred = stack.enter_context(broker.task("job", subject=subject, audience="webhook"))
        else:
            cred = broker.issue(subject, "webhook", ttl=60)
        creds = [cred]
        if death == "parent-revoke":
            creds.append(broker.attenuate(cred, ttl=30))
        assert sorted(service.keys) == sorted(c.lease_id for c in creds)
        die(death, broker, clock, cred, subject)
        if death == "task-end":
            stack.close()
    assert service.keys == {}
    assert [r["action"] for r in service.requests].count("revoke") == len(creds)
    assert owed(broker) == []
    assert provider.managed() == []
    provider.close()


def die(death: str, broker: Broker, clock: FakeClock, cred: Credential, subject: str) -> None:
    if death in {"revoke", "parent-revoke"}:
        assert broker.revoke(cred) is True
    elif death == "ttl-sweep":
        clock.advance(61)
        assert [lease.id for lease in broker.sweep()] == [cred.lease_id]
    elif death == "revoke-where":
        assert broker.revoke_where(subject=subject) == 1


def test_renew_reaches_the_service_and_a_lost_key_fails_it(service: Service, build: Build) -> None:
    clock = FakeClock()
    broker = Broker(providers=[build()], clock=clock)
    cred = broker.issue("svc:a", "webhook", ttl=60)
    clock.advance(30)
    renewed = broker.renew(cred, ttl=120)
    assert renewed.lease.expires_at > cred.lease.expires_at
    assert service.last("renew")["lease"]["expires_at"] == renewed.lease.expires_at
    assert service.keys[cred.lease_id]["expires_at"] == renewed.lease.expires_at
    assert renewed.secret == cred.secret  # the same key, with a later expiry

    del service.keys[cred.lease_id]  # the service lost it: 404, an error for renew
    clock.advance(30)
    with pytest.raises(ProviderError, match="could not move its backend expiry") as caught:
        broker.renew(renewed, ttl=120)
    assert "HTTP 404" in str(caught.value.__cause__)
    broker.revoke(cred)  # and its revoke's 404 is success
    assert owed(broker) == []


def test_reconcile_revokes_unknown_keys_and_flags_lost_ones(service: Service, build: Build) -> None:
    broker = Broker(providers=[build()], clock=FakeClock())
    kept = broker.issue("svc:a", "webhook", ttl=60)
    lost = broker.issue("svc:b", "webhook", ttl=60)
    stranger = uuid4().hex  # a key for a lease this broker never issued
    service.keys[stranger] = {"api_key": "ak_stranger", "expires_at": 0.0}
    del service.keys[lost.lease_id]

    found = broker.reconcile()
    assert found.revoked == (stranger,)
    assert [lease.id for lease in found.missing] == [lost.lease_id]
    assert found.failed == ()
    assert sorted(service.keys) == [kept.lease_id]
    stand_in = service.last("revoke")["lease"]
    assert (stand_in["id"], stand_in["audience"]) == (stranger, "webhook")


def test_threads_share_one_provider(service: Service, build: Build) -> None:
    provider = build()
    broker = Broker(providers=[provider])
    made: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                cred = broker.issue("svc:t", "webhook", ttl=60)
                assert cred.secret is not None
                made.append(cred.secret["api_key"])
                broker.revoke(cred)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert len(set(made)) == 40
    assert service.keys == {}
    created = [r["lease"]["id"] for r in service.requests if r["action"] == "create"]
    revoked = Counter(r["lease"]["id"] for r in service.requests if r["action"] == "revoke")
    assert len(set(created)) == len(created) == 40
    # Each lease is revoked once by its thread; the first issue's sweep also
    # reconciles, and a lease it listed that another thread revoked meanwhile
    # is revoked again by reconcile (a 404: idempotent, hence the receiver rule).
    assert set(revoked) == set(created)
    assert max(revoked.values()) <= 2
    assert provider.round_trips == len(service.requests)
    assert provider._client is not None  # one client, made once


# -- 2. outages ------------------------------------------------------------------------
def test_a_revoke_while_the_service_is_down_is_retried_parked_then_done(
    service: Service, running: Running, build: Build
) -> None:
    provider = build(timeout=1.0)
    clock = FakeClock()
    broker = Broker(providers=[provider], clock=clock, hook_retries=2, hook_backoff=0.001)
    cred = broker.issue("svc:a", "webhook", ttl=600)
    assert cred.secret is not None
    api_key = cred.secret["api_key"]
    running.stop()

    assert broker.revoke(cred) is True  # the lease dies at once; the revoke is owed
    for _ in range(6):
        if broker.failed_hooks():
            break
        clock.advance(1)
        assert broker.sweep() == []
    parked = broker.failed_hooks()
    assert [(hook.lease.id, hook.attempts) for hook in parked] == [(cred.lease_id, 3)]
    assert "ConnectError" in parked[0].error
    assert api_key not in parked[0].error
    assert leaked([parked[0].error]) == []

    running.start()  # the same port
    assert cred.lease_id in service.keys  # nothing removed it while the service was down
    assert broker.retry_failed_hooks() == 0
    assert service.keys == {}
    assert owed(broker) == []
    assert service.last("revoke")["idempotency_key"] == f"{cred.lease_id}/revoke"


def test_a_service_down_at_issue_fails_it_with_no_active_lease(
    service: Service, running: Running, build: Build
) -> None:
    clock = FakeClock()
    broker = Broker(providers=[build()], clock=clock, hook_retries=2, hook_backoff=0.001)
    running.stop()
    with pytest.raises(ProviderError, match="the lease was revoked") as caught:
        broker.issue("svc:a", "webhook", ttl=60)
    cause = caught.value.__cause__
    assert isinstance(cause, ProviderError)
    assert isinstance(cause.__cause__, httpx.ConnectError)
    assert list(broker.leases()) == []
    lease_id = caught.value.lease_id or ""
    assert broker.lease(lease_id).revoke_reason == "provider-failed"

    running.start()  # the owed revoke finds nothing to remove: success
    clock.advance(1)
    broker.sweep()
    assert owed(broker) == []
    assert service.last("revoke")["lease"]["id"] == lease_id
    assert service.keys == {}


def test_a_hung_service_times_out(build: Build) -> None:
    with socket.create_server(("127.0.0.1", 0)) as hung:  # listens, never answers
        port = hung.getsockname()[1]
        broker = Broker(providers=[build(f"http://127.0.0.1:{port}/svc", timeout=0.3)])
        started = time.monotonic()
        with pytest.raises(ProviderError) as caught:
            broker.issue("svc:a", "webhook", ttl=60)
        assert time.monotonic() - started < 3  # the create, and the revoke undoing it
        cause = caught.value.__cause__
        assert cause is not None
        assert isinstance(cause.__cause__, httpx.ReadTimeout)
        assert list(broker.leases()) == []


# -- 3. the receiver's side ------------------------------------------------------------
NOW = 1_767_225_600


def genuine(at: int = NOW, **fields: object) -> tuple[bytes, str]:
    request = {"action": "revoke", "idempotency_key": "x/revoke", "provider": "p", "sent_at": at}
    body = json.dumps({**request, **fields}, sort_keys=True, separators=(",", ":")).encode()
    return body, sign_webhook(KEY, body, at=at)


def test_verify_accepts_the_genuine_request_and_sign_round_trips() -> None:
    body, header = genuine()
    assert re.fullmatch(rf"t={NOW},v1=[0-9a-f]{{64}}", header)
    assert verify_webhook(KEY, body, header, now=NOW) == json.loads(body)
    assert verify_webhook(KEY, body, header, now=NOW + 300)["sent_at"] == NOW  # the edges
    assert verify_webhook(KEY, body, header, now=NOW - 300)["sent_at"] == NOW
    assert verify_webhook(KEY, body, header, now=NOW + 9, tolerance=10)["sent_at"] == NOW
    fresh = json.dumps({"action": "managed", "idempotency_key": "k", "sent_at": int(time.time())})
    assert verify_webhook(KEY, fresh.encode(), sign_webhook(KEY, fresh.encode()))  # now, both


def test_the_documented_test_vector() -> None:
    found = dict(re.findall(r"^(key|t|body|header): +(.+)$", DOC, re.M))
    key, body = bytes.fromhex(found["key"]), found["body"].encode()
    assert key == bytes(range(32))
    assert sign_webhook(key, body, at=int(found["t"])) == found["header"]
    assert verify_webhook(key, body, found["header"], now=int(found["t"]))["action"] == "managed"


def test_verify_refuses_a_forgery_or_a_replay() -> None:
    body, header = genuine()
    other = secrets.token_bytes(32)
    refused: list[tuple[type[InvalidToken], bytes, str, dict[str, Any]]] = [
        (BadSignature, body, sign_webhook(other, body, at=NOW), {}),  # another key
        (BadSignature, body.replace(b"x/revoke", b"y/revoke"), header, {}),  # tampered
        (BadSignature, body + b" ", header, {}),
        (BadSignature, body, header.replace(f"t={NOW}", f"t={NOW + 1}"), {}),  # moved t
        (TokenExpired, body, header, {"now": NOW + 301}),  # replayed later
        (TokenNotYetValid, body, header, {"now": NOW - 301}),
        (TokenExpired, body, header, {"now": NOW + 11, "tolerance": 10}),
    ]
    for kind, sent, signature, options in refused:
        with pytest.raises(kind) as caught:
            verify_webhook(KEY, sent, signature, now=options.pop("now", NOW), **options)
        assert isinstance(caught.value, InvalidToken)
        assert signature[20:] not in str(caught.value)
        assert "x/revoke" not in str(caught.value)
    with pytest.raises(TokenExpired) as expired:
        verify_webhook(KEY, body, header, now=NOW + 301)
    assert expired.value.expired_at == NOW + 300


MAC = "ab" * 32
MALFORMED = [
    "",
    f"v1={MAC}",  # no t
    f"t={NOW}",  # no v1
    f"t={NOW},t={NOW},v1={MAC}",
    f"t={NOW},v1={MAC},v1={MAC}",
    f"v1={MAC},t={NOW}",
    f"t={NOW},v1={'zz' * 32}",  # not hex
    f"t={NOW},v1={MAC.upper()}",
    f"t={NOW},v1={MAC[:-1]}",
    f"t={NOW},v1={MAC}0",
    f"t=0{NOW},v1={MAC}",
    f"t=-{NOW},v1={MAC}",
    f"t={NOW}.5,v1={MAC}",
    f"t=\u0661\u0662,v1={MAC}",  # Arabic-Indic digits
    f" t={NOW},v1={MAC}",
    f"t={NOW}, v1={MAC}",
    f"t={NOW},v1={MAC}\n",
    f"t={NOW},v1={MAC},v0={MAC}",
    f"t={NOW},v1={MAC}" + "0" * 100_000,  # huge
    "t=" + "1" * 13 + f",v1={MAC}",
]


@pytest.mark.parametrize("header", [*MALFORMED, None, b"t=1,v1=" + MAC.encode()])
def test_verify_refuses_a_malformed_header_without_echoing_it(header: Any) -> None:
    body, _ = genuine()
    with pytest.raises(MalformedToken) as caught:
        verify_webhook(KEY, body, header, now=NOW)
    assert MAC not in str(caught.value)
    assert "x/revoke" not in str(caught.value)
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize(
    "body",
    [
        b"not json " + MARK.encode(),
        b"\xff\xfe" + MARK.encode(),
        json.dumps([MARK]).encode(),
        b"[" * 100_000,
        genuine(sent_at=NOW + 1)[0],  # sent_at is not the signature's t
        genuine(sent_at=float(NOW))[0],
        genuine(sent_at=str(NOW))[0],
        genuine(action="drop-everything")[0],
        genuine(idempotency_key=None)[0],
    ],
)
def test_verify_refuses_a_signed_body_that_is_not_a_request(body: bytes) -> None:
    with pytest.raises(MalformedToken) as caught:
        verify_webhook(KEY, body, sign_webhook(KEY, body, at=NOW), now=NOW)
    assert leaked(chain(caught.value)) == []
    assert caught.value.__cause__ is None


def test_sign_and_verify_refuse_bad_arguments() -> None:
    body, header = genuine()
    for key in ("k" * 40, bytearray(32), None, b"k" * 31):
        with pytest.raises(InvalidRequest, match="bytes"):
            verify_webhook(key, body, header, now=NOW)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest, match="bytes"):
            sign_webhook(key, body)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="bytes"):
        verify_webhook(KEY, body.decode(), header, now=NOW)  # type: ignore[arg-type]
    for tolerance in (0, -1, float("inf"), float("nan"), True, "300"):
        with pytest.raises(InvalidRequest):
            verify_webhook(KEY, body, header, now=NOW, tolerance=tolerance)  # type: ignore[arg-type]
    for now in (float("nan"), "now", True):
        with pytest.raises(InvalidRequest):
            verify_webhook(KEY, body, header, now=now)  # type: ignore[arg-type]
    for at in (-1, 10**12, 1.5, True, "1"):
        with pytest.raises(InvalidRequest):
            sign_webhook(KEY, body, at=at)  # type: ignore[arg-type]


# -- 4. hostile answers ----------------------------------------------------------------
TEN_MB = 10 * 2**20
CHUNK = b"a" * 65536


def huge(declared: bool) -> Reply:
    head = [("Content-Length", str(TEN_MB))] if declared else []
    start = b'{"api_key":"' + MARK.encode()
    return "200 OK", head, [start, *[CHUNK] * (TEN_MB // len(CHUNK))]


def endless() -> Reply:
    def body() -> Iterator[bytes]:
        yield b'{"api_key":"' + MARK.encode()
        while True:
            yield CHUNK

    return "200 OK", [], body()


def drip() -> Reply:
    def body() -> Iterator[bytes]:
        yield b'{"api_key":"' + MARK.encode()
        while True:
            time.sleep(0.05)
            yield b"a"

    return "200 OK", [], body()


HOSTILE_CREATES = [
    ("500", lambda: reply("500 Internal Server Error", raw=MARK.encode()), "HTTP 500"),
    ("201", lambda: reply("201 Created", {"api_key": MARK}), "HTTP 201"),
    ("404", lambda: reply("404 Not Found", {"api_key": MARK}), "HTTP 404"),
    ("401", lambda: reply("401 Unauthorized", raw=MARK.encode()), "same key"),
    (
        "302",
        lambda: ("302 Found", [("Location", BASE + "/followed")], [MARK.encode()]),
        "redirect",
    ),
    ("not-json", lambda: reply("200 OK", raw=b"<html>" + MARK.encode()), "not a JSON object"),
    ("not-utf8", lambda: reply("200 OK", raw=b'{"k":"\xff' + MARK.encode() + b'"}'), "not a JSON"),
    ("non-string", lambda: reply("200 OK", {"api_key": MARK, "n": 1}), "not a JSON object"),
    ("nested", lambda: reply("200 OK", {"api_key": {"v": MARK}}), "not a JSON object"),
    ("list", lambda: reply("200 OK", [MARK]), "not a JSON object"),
    ("null", lambda: reply("200 OK", raw=b"null"), "not a JSON object"),
    ("empty", lambda: reply("200 OK", {}), "not a JSON object"),
    ("deep", lambda: reply("200 OK", raw=b"[" * 60000), "not a JSON object"),
    (
        "gzip",
        lambda: ("200 OK", [("Content-Encoding", "gzip")], [gzip.compress(MARK.encode())]),
        "compressed",
    ),
    ("10MB", lambda: huge(declared=False), "more than max_response"),
    ("10MB-declared", lambda: huge(declared=True), "more than max_response"),
    ("endless", endless, "more than max_response"),
]


@pytest.mark.parametrize(
    ("answer", "why"), [pytest.param(a, w, id=name) for name, a, w in HOSTILE_CREATES]
)
def test_a_hostile_create_fails_the_issue_without_echoing_it(
    service: Service, build: Build, caplog: pytest.LogCaptureFixture, answer: Any, why: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="jitbroker")
    service.hostile["create"] = answer
    broker = Broker(providers=[build(timeout=3.0)], clock=FakeClock())
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        broker.issue("svc:a", "webhook", ttl=60)
    assert time.monotonic() - started < 2  # stopped at the cap, not at the timeout
    assert why in str(caught.value.__cause__)
    assert leaked([*chain(caught.value), caplog.text]) == []
    assert list(broker.leases()) == []
    assert service.followed == 0  # the redirect was not followed
    assert service.keys == {}
    assert owed(broker) == []  # the revoke undoing it went through (404)


def test_a_body_that_drips_in_fails_at_the_timeout(service: Service, build: Build) -> None:
    service.hostile["create"] = drip
    broker = Broker(providers=[build(timeout=0.3)], clock=FakeClock())
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        broker.issue("svc:a", "webhook", ttl=60)
    assert time.monotonic() - started < 2
    assert "took longer than timeout" in str(caught.value.__cause__)
    assert leaked(chain(caught.value)) == []
    assert list(broker.leases()) == []


HOSTILE_MANAGED: list[object] = [
    {"leases": [MARK]},
    {"leases": ["A" * 32]},
    {"leases": ["a" * 31]},
    {"leases": ["a" * 33]},
    {"leases": ["a" * 32 + "\n"]},
    {"leases": ["g" * 32]},
    {"leases": [1]},
    {"leases": None},
    {"leases": MARK},
    {"leases": {"a" * 32: MARK}},
    {"other": [MARK]},
    [MARK],
    MARK,
]


@pytest.mark.parametrize("listed", HOSTILE_MANAGED)
def test_a_hostile_managed_list_fails_reconcile_and_revokes_nothing(
    service: Service, build: Build, caplog: pytest.LogCaptureFixture, listed: object
) -> None:
    caplog.set_level(logging.DEBUG, logger="jitbroker")
    provider = build()
    broker = Broker(providers=[provider], clock=FakeClock())
    cred = broker.issue("svc:a", "webhook", ttl=60)
    service.hostile["managed"] = lambda: reply("200 OK", listed)
    found = broker.reconcile()
    assert found.failed == ("webhook: ProviderError",)
    assert (found.revoked, found.missing) == ((), ())
    assert sorted(service.keys) == [cred.lease_id]
    with pytest.raises(ProviderError, match="not") as caught:
        provider.managed()
    assert caught.value.lease_id is None
    assert leaked([*chain(caught.value), caplog.text]) == []


def test_managed_answers_other_than_200_fail(service: Service, build: Build) -> None:
    provider = build()
    for status in ("204 No Content", "500 Internal Server Error", "301 Moved Permanently"):
        service.hostile["managed"] = functools.partial(reply, status, raw=MARK.encode())
        with pytest.raises(ProviderError, match="HTTP") as caught:
            provider.managed()
        assert leaked(chain(caught.value)) == []
    service.hostile.pop("managed")
    service.keys["a" * 32] = {"api_key": "x", "expires_at": 0.0}
    assert provider.managed() == ["a" * 32]


def test_a_wrong_key_is_refused_by_the_service(service: Service, build: Build) -> None:
    wrong = secrets.token_bytes(32)
    broker = Broker(providers=[build(key=wrong)], clock=FakeClock())
    with pytest.raises(ProviderError) as caught:
        broker.issue("svc:a", "webhook", ttl=60)
    assert "HTTP 401" in str(caught.value.__cause__)
    assert wrong.hex() not in "".join(chain(caught.value))
    assert service.refused == 2  # the create, and the revoke undoing it
    assert service.requests == []


# -- 5. configuration ------------------------------------------------------------------
BAD_OPTIONS: list[tuple[str, dict[str, Any], str]] = [
    ("http://127.0.0.1:1/x", {"key": b"k" * 31}, "32 bytes"),
    ("http://127.0.0.1:1/x", {"key": "k" * 40}, "bytes"),
    ("http://127.0.0.1:1/x", {"key": bytearray(32)}, "bytes"),
    ("http://127.0.0.1:1/x", {"key": None}, "bytes"),
    ("http://127.0.0.1:1/x", {"name": "a/b"}, "provider name"),
    ("http://127.0.0.1:1/x", {"name": ""}, "provider name"),
    ("http://127.0.0.1:1/x", {"name": 3}, "provider name"),
    ("http://127.0.0.1:1/x", {"timeout": 0}, "timeout"),
    ("http://127.0.0.1:1/x", {"timeout": -1}, "timeout"),
    ("http://127.0.0.1:1/x", {"timeout": True}, "timeout"),
    ("http://127.0.0.1:1/x", {"timeout": "5"}, "timeout"),
    ("http://127.0.0.1:1/x", {"timeout": float("inf")}, "timeout"),
    ("http://127.0.0.1:1/x", {"timeout": float("nan")}, "timeout"),
    ("http://127.0.0.1:1/x", {"max_response": 0}, "max_response"),
    ("http://127.0.0.1:1/x", {"max_response": True}, "max_response"),
    ("http://127.0.0.1:1/x", {"max_response": 1.5}, "max_response"),
    ("http://127.0.0.1:1/x", {"max_response": 2**31}, "max_response"),
    ("http://127.0.0.1:1/x", {"insecure_http": "yes"}, "insecure_http"),
    ("http://example.com/x", {}, "https"),
    ("http://10.0.0.1/x", {}, "https"),
    ("http://localhost.example.com/x", {}, "https"),
    ("http://127.0.0.1.nip.io/x", {}, "https"),
    ("http://0x7f000001/x", {}, "https"),
    ("http://[::ffff:127.0.0.1]/x", {}, "https"),
    ("http://user:hunter2@127.0.0.1/x", {}, "password"),
    ("https://:hunter2@example.com/x", {}, "password"),
    ("https://hunter2@example.com/x", {}, "password"),
    ("https://example.com/x?token=hunter2", {}, "query"),
    ("https://example.com/x#hunter2", {}, "fragment"),
    ("https://example.com\\@hunter2.example/x", {}, "printable"),
    ("https://example.com/a b", {}, "printable"),
    ("https://example.com/\u00e9", {}, "printable"),
    ("ftp://example.com/x", {}, "http"),
    ("127.0.0.1:8080/x", {}, "http"),
    ("https:///x", {}, "host"),
    ("", {}, "http"),
    ("http://127.0.0.1:99999/x", {}, "port"),
    ("http://127.0.0.1:abc/x", {}, "port"),
]


@pytest.mark.parametrize(("url", "options", "why"), BAD_OPTIONS)
def test_bad_configuration_is_refused(url: str, options: dict[str, Any], why: str) -> None:
    options.setdefault("key", KEY)
    with pytest.raises(InvalidRequest, match=why) as caught:
        WebhookProvider(url=url, **options)
    assert "hunter2" not in str(caught.value)
    assert leaked(chain(caught.value)) == []


def test_a_bad_url_type_is_refused() -> None:
    for url in (b"https://example.com", None, 3):
        with pytest.raises(InvalidRequest):
            WebhookProvider(url=url, key=KEY)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:1/x",
        "http://127.8.9.10/x",
        "http://[::1]:8080/x",
        "http://localhost:1/x",
        "http://LOCALHOST/x",
        "HTTP://127.0.0.1/x/",
        "https://example.com",
        "https://example.com:8443/jit/broker",
    ],
)
def test_https_and_loopback_urls_are_taken(url: str) -> None:
    provider = WebhookProvider(url=url, key=KEY)
    assert provider.url == url.rstrip("/")
    assert WebhookProvider(url="http://example.com/x", key=KEY, insecure_http=True).url


def test_repr_shows_no_key_and_construction_does_no_io() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there
    provider = WebhookProvider(url=f"http://127.0.0.1:{port}/svc/", key=KEY, name="billing-api")
    assert repr(provider) == f"<WebhookProvider 'billing-api' http://127.0.0.1:{port}/svc>"
    assert leaked([repr(provider), str(provider), str(vars(provider).get("url"))]) == []
    assert provider.round_trips == 0
    assert provider._client is None  # made at the first request
    provider.check(None)  # type: ignore[arg-type]  # no I/O, refuses nothing


def test_without_httpx_the_provider_names_the_extra_and_the_receiver_works() -> None:
    code = """
import sys
sys.modules["httpx"] = None  # as if jitbroker[web] were not installed
from jitbroker.errors import InvalidRequest
from jitbroker.providers import WebhookProvider, sign_webhook, verify_webhook
key = b"k" * 32
body = b'{"action":"managed","idempotency_key":"k","sent_at":1}'
assert verify_webhook(key, body, sign_webhook(key, body, at=1), now=1)["sent_at"] == 1
try:
    WebhookProvider(url="http://127.0.0.1:1", key=key)
except InvalidRequest as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'jitbroker[web]'" in out.stdout


# -- the receivers in docs/webhook.md --------------------------------------------------
def doc_block(heading: str, language: str) -> str:
    section = DOC.split(f"\n## {heading}\n", 1)[1]
    found = re.search(rf"```{language}\n(.*?)\n```", section, re.S)
    assert found is not None
    return found[1]


def exercise(provider: WebhookProvider, held: Callable[[], set[str]]) -> None:
    """Every action against a receiver: issue, renew, reconcile, revoke."""
    clock = FakeClock()
    broker = Broker(providers=[provider], clock=clock)
    cred = broker.issue("svc:doc", "webhook", ttl=60)
    assert cred.secret is not None
    assert len(cred.secret["api_key"]) >= 24
    assert held() == {cred.lease_id}
    clock.advance(10)
    broker.renew(cred, ttl=120)
    found = broker.reconcile()
    assert (found.revoked, found.missing, found.failed) == ((), (), ())
    broker.revoke(cred)
    provider.revoke(cred.lease)  # an unknown lease is success
    assert held() == set()
    other = WebhookProvider(url=provider.url, key=secrets.token_bytes(32))
    with pytest.raises(ProviderError, match="HTTP 401"):
        other.managed()
    other.close()
    provider.close()


def test_the_documented_python_receiver_serves_the_provider(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("JITBROKER_WEBHOOK_KEY", KEY.hex())
    receiver: dict[str, Any] = {}
    code = doc_block("A receiver in Python", "python")
    exec(compile(code, "docs/webhook.md", "exec"), receiver)  # noqa: S102 - our own docs
    server = Running(receiver["app"])
    try:
        exercise(WebhookProvider(url=server.url, key=KEY), lambda: set(receiver["keys"]))
    finally:
        server.stop()


def test_the_documented_node_receiver_serves_the_provider(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the Node receiver of docs/webhook.md)")
    script = tmp_path / "receiver.js"
    script.write_text(doc_block("A receiver in Node", "javascript"))
    env = {**os.environ, "JITBROKER_WEBHOOK_KEY": KEY.hex(), "PORT": "0"}
    with subprocess.Popen(
        [node, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], 10)
            assert ready, "the Node receiver did not start"
            port = int(process.stdout.readline())  # printed once it listens
            provider = WebhookProvider(url=f"http://127.0.0.1:{port}/jit", key=KEY)
            exercise(provider, lambda: set(provider.managed()))
        finally:
            process.terminate()
            process.communicate(timeout=10)
