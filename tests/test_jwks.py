"""Verifiers fed from a JWKS URL or file: schemes, refresh rate limits, size caps."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from jitbroker import Broker, KeyRing, Verifier
from jitbroker.errors import InvalidRequest, KeySourceError, UnknownKey
from jitbroker.jwks import MAX_JWKS_BYTES
from jitbroker.testing import TEST_ISSUER, FakeClock


class JWKSServer:
    """A local HTTP server whose responses the test controls; counts requests."""

    def __init__(self) -> None:
        self.body = b'{"keys": []}'
        self.status = 200
        self.location: str | None = None
        self.hits = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits += 1
                self.send_response(server.status)
                if server.location:
                    self.send_header("Location", server.location)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self.thread.start()

    def serve(self, ring: KeyRing) -> None:
        self.body = json.dumps(ring.jwks()).encode()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[JWKSServer]:
    srv = JWKSServer()
    yield srv
    srv.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def broker_for(ring: KeyRing, clock: FakeClock) -> Broker:
    return Broker(issuer=TEST_ISSUER, keys=ring, clock=clock)


def url_verifier(server: JWKSServer, clock: FakeClock, **options: Any) -> Verifier:
    options.setdefault("min_refresh_interval", 60)
    return Verifier.from_jwks_url(
        server.url,
        allow_http=True,
        issuer=TEST_ISSUER,
        audience="api",
        offline=True,
        clock=clock,
        **options,
    )


def settle(verifier: Verifier) -> None:
    """Wait for the verifier's background JWKS refresh, if one runs."""
    assert verifier.source is not None
    fetch = verifier.source.fetching
    if fetch is not None:
        fetch.wait()


def test_verifies_tokens_with_keys_from_the_url(server: JWKSServer, clock: FakeClock) -> None:
    ring = KeyRing.generate()
    server.serve(ring)
    verifier = url_verifier(server, clock)
    cred = broker_for(ring, clock).issue("svc:a", "api", ["read"], ttl=60)
    assert verifier.verify(cred.token, scopes="read").lease_id == cred.lease_id
    assert server.hits == 1


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "data:application/json,{}",
        "ftp://example.com/jwks.json",
        "gopher://example.com/",
        "jar:https://example.com/x.jar!/jwks",
        "//example.com/jwks.json",
        "example.com/jwks.json",
        "https:///no-host",
        "",
    ],
)
def test_only_http_schemes_are_fetched(url: str, server: JWKSServer) -> None:
    with pytest.raises(InvalidRequest):
        Verifier.from_jwks_url(url, allow_http=True, issuer=TEST_ISSUER, offline=True)
    assert server.hits == 0


def test_plain_http_needs_allow_http(server: JWKSServer) -> None:
    with pytest.raises(InvalidRequest, match="allow_http"):
        Verifier.from_jwks_url(server.url, issuer=TEST_ISSUER, offline=True)
    assert server.hits == 0


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1:9/jwks.json"])
def test_a_redirect_to_another_scheme_is_refused(location: str, server: JWKSServer) -> None:
    server.status, server.location = 302, location
    with pytest.raises(KeySourceError, match="not allowed"):
        Verifier.from_jwks_url(server.url, allow_http=True, issuer=TEST_ISSUER, offline=True)


def test_a_redirect_within_allowed_schemes_is_followed(server: JWKSServer) -> None:
    target = JWKSServer()
    try:
        target.serve(KeyRing.generate())
        server.status, server.location = 302, target.url
        verifier = Verifier.from_jwks_url(
            server.url, allow_http=True, issuer=TEST_ISSUER, offline=True
        )
        assert len(verifier.keys) == 1
    finally:
        target.stop()


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"not json", 200),
        (b"[]", 200),
        (b'{"keys": "nope"}', 200),
        (b'{"keys": [], "keys": []}', 200),
        (b'{"keys": [{"kty": "oct", "k": "' + b"A" * 43 + b'"}]}', 200),
        (b'{"keys": []}', 500),
        (b"x" * (MAX_JWKS_BYTES + 1), 200),
    ],
    ids=["not-json", "array", "keys-not-list", "duplicate", "hmac-secret", "http-500", "huge"],
)
def test_a_bad_jwks_is_refused_at_startup(body: bytes, status: int, server: JWKSServer) -> None:
    server.body, server.status = body, status
    with pytest.raises(KeySourceError):
        Verifier.from_jwks_url(server.url, allow_http=True, issuer=TEST_ISSUER, offline=True)


def test_a_private_key_in_the_jwks_is_refused(server: JWKSServer) -> None:
    key = KeyRing.generate().active
    server.body = json.dumps({"keys": [key.to_jwk(private=True)]}).encode()
    with pytest.raises(KeySourceError, match="private"):
        Verifier.from_jwks_url(server.url, allow_http=True, issuer=TEST_ISSUER, offline=True)


def test_an_unreachable_url_is_refused_at_startup() -> None:
    with pytest.raises(KeySourceError, match="could not fetch"):
        Verifier.from_jwks_url(
            "http://127.0.0.1:9/jwks.json", allow_http=True, issuer=TEST_ISSUER, offline=True
        )


def test_credentials_in_the_url_are_refused_unfetched(server: JWKSServer) -> None:
    url = server.url.replace("http://", "http://user:s3cret@") + "?token=hunter2"
    with pytest.raises(InvalidRequest, match="credentials") as info:
        Verifier.from_jwks_url(url, allow_http=True, issuer=TEST_ISSUER, offline=True)
    assert "s3cret" not in str(info.value)
    assert "hunter2" not in str(info.value)
    assert server.hits == 0


def test_a_query_secret_never_reaches_messages(server: JWKSServer) -> None:
    server.status = 500
    with pytest.raises(KeySourceError) as info:
        Verifier.from_jwks_url(
            server.url + "?token=hunter2", allow_http=True, issuer=TEST_ISSUER, offline=True
        )
    assert "hunter2" not in str(info.value)


def test_an_unknown_kid_refetches_and_finds_a_new_key(server: JWKSServer, clock: FakeClock) -> None:
    ring = KeyRing.generate()
    server.serve(ring)
    verifier = url_verifier(server, clock)
    clock.advance(61)
    ring.rotate()  # the issuer publishes a new key after our first fetch
    server.serve(ring)
    cred = broker_for(ring, clock).issue("svc:a", "api", ttl=60)
    assert verifier.verify(cred.token).lease_id == cred.lease_id
    assert server.hits == 2


def test_unknown_kids_cannot_cause_a_refetch_storm(server: JWKSServer, clock: FakeClock) -> None:
    """CVE-2026-48524: a flood of tokens naming unknown keys costs one fetch per interval."""
    server.serve(KeyRing.generate())
    verifier = url_verifier(server, clock)
    clock.advance(61)
    stranger = broker_for(KeyRing.generate(), clock)
    for _ in range(50):
        with pytest.raises(UnknownKey):
            verifier.verify(stranger.issue("svc:a", "api", ttl=60).token)
    assert server.hits == 2  # startup, then one refetch for the whole flood
    clock.advance(61)
    with pytest.raises(UnknownKey):
        verifier.verify(stranger.issue("svc:a", "api", ttl=60).token)
    assert server.hits == 3


def test_keys_are_refreshed_after_max_age(server: JWKSServer, clock: FakeClock) -> None:
    old = KeyRing.generate()
    server.serve(old)
    verifier = url_verifier(server, clock, max_age=300)
    cred = broker_for(old, clock).issue("svc:a", "api", ttl=60)
    verifier.verify(cred.token)
    server.serve(KeyRing.generate())  # the issuer dropped the old key
    clock.advance(301)
    # Stale keys stay in use while the refresh they started runs in the background.
    assert verifier.verify(broker_for(old, clock).issue("svc:a", "api", ttl=60).token)
    settle(verifier)
    with pytest.raises(UnknownKey):
        verifier.verify(broker_for(old, clock).issue("svc:a", "api", ttl=60).token)
    assert server.hits == 2


def test_a_failed_refresh_keeps_the_keys(server: JWKSServer, clock: FakeClock) -> None:
    ring = KeyRing.generate()
    server.serve(ring)
    verifier = url_verifier(server, clock, max_age=300)
    server.status = 503
    clock.advance(301)
    cred = broker_for(ring, clock).issue("svc:a", "api", ttl=60)
    assert verifier.verify(cred.token).lease_id == cred.lease_id


def test_from_jwks_file(tmp_path: Path, clock: FakeClock) -> None:
    ring = KeyRing.generate("ES256")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(ring.jwks()))
    verifier = Verifier.from_jwks_file(
        path, issuer=TEST_ISSUER, audience="api", offline=True, clock=clock
    )
    cred = broker_for(ring, clock).issue("svc:a", "api", ttl=60)
    assert verifier.verify(cred.token).key_id == ring.active.kid


@pytest.mark.parametrize(
    "content",
    [None, b"{", b'{"keys": [{"kty": "oct", "k": "' + b"A" * 43 + b'"}]}'],
    ids=["missing", "not-json", "hmac"],
)
def test_from_jwks_file_refuses_bad_files(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "jwks.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(KeySourceError):
        Verifier.from_jwks_file(path, issuer=TEST_ISSUER, offline=True)
