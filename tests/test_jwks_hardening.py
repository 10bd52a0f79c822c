"""JWKS fetching against hostile URLs and servers (issue 15, "Hardening, round 2").

Every test talks to a real loopback server that writes raw bytes, so broken
HTTP (bad status lines, truncated bodies, a byte every 0.2 s) is what the
client really sees: nothing in urllib or http.client is mocked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import socketserver
import ssl
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from jitbroker import Broker, KeyRing, Verifier
from jitbroker.errors import InvalidRequest, KeySourceError, UnknownKey
from jitbroker.jwks import MAX_JWKS_BYTES, JWKSource
from jitbroker.testing import TEST_ISSUER, FakeClock

SECRET = "s3cr3t"  # stands for a password or query token in a URL: never in a message
Reply = Callable[[socket.socket, threading.Event], None]


class RawServer:
    """A loopback TCP server that answers each request with what ``reply`` writes.

    ``reply(sock, stopping)`` writes the response; ``stopping`` is set when the
    test ends, so a trickling or gated reply returns at once.
    """

    def __init__(self, reply: Reply, tls: ssl.SSLContext | None = None) -> None:
        self.reply = reply
        self.hits = 0
        self.stopping = threading.Event()
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                server.hits += 1
                # OSError: the client hung up (or refused our certificate), as
                # the deadline and TLS tests expect.
                with contextlib.suppress(OSError):
                    sock = self.request
                    if tls is not None:  # the TLS socket takes over the connection
                        sock = tls.wrap_socket(sock, server_side=True)
                    with sock:
                        _read_request_head(sock)
                        server.reply(sock, server.stopping)

        self.tcp = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.tcp.daemon_threads = True
        self.port = self.tcp.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/jwks.json"
        threading.Thread(
            target=self.tcp.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        ).start()

    def serve(self, *rings: KeyRing, marks: dict[str, Any] | None = None) -> None:
        """Answer with a JWKS of the rings' public keys (each updated with ``marks``)."""
        keys = [{**jwk, **(marks or {})} for ring in rings for jwk in ring.jwks()["keys"]]
        self.reply = ok(json.dumps({"keys": keys}).encode())

    def stop(self) -> None:
        self.stopping.set()
        self.tcp.shutdown()
        self.tcp.server_close()


def _read_request_head(sock: socket.socket) -> None:
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = sock.recv(65536)
        # A TLS ClientHello is no HTTP request: answer it at once (with HTTP).
        if not chunk or not chunk[:1].isalpha():
            return
        data += chunk


def send(data: bytes) -> Reply:
    """Write ``data`` and close the connection."""
    return lambda sock, stopping: sock.sendall(data)


def ok(body: bytes) -> Reply:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
    return send(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def trickle(head: bytes, slow: bytes, interval: float = 0.2) -> Reply:
    """Write ``head`` at once, then ``slow`` one byte per ``interval``."""

    def reply(sock: socket.socket, stopping: threading.Event) -> None:
        sock.sendall(head)
        for i in range(len(slow)):
            if stopping.wait(interval):
                return
            sock.sendall(slow[i : i + 1])

    return reply


@pytest.fixture
def server() -> Iterator[RawServer]:
    srv = RawServer(ok(b'{"keys": []}'))
    yield srv
    srv.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: (cert file, key file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jitbroker test")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@pytest.fixture
def tls_server(certificate: tuple[Path, Path]) -> Iterator[RawServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    srv = RawServer(ok(b'{"keys": []}'), tls=context)
    yield srv
    srv.stop()


def url_verifier(url: str, clock: FakeClock, **options: Any) -> Verifier:
    options.setdefault("min_refresh_interval", 60)
    return Verifier.from_jwks_url(
        url,
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


def token_of(ring: KeyRing, clock: FakeClock) -> str:
    return Broker(issuer=TEST_ISSUER, keys=ring, clock=clock).issue("svc:a", "api", ttl=600).token


# -- 5. credentials and malformed URLs, translated errors ---------------------
@pytest.mark.parametrize(
    "url",
    [
        f"https://user:{SECRET}@host/x",  # http.client: "nonnumeric port: 's3cr3t@host'"
        f"https://:{SECRET}@host/x",
        f"https://{SECRET}@host/x",
        f"https://user:{SECRET}@127.0.0.1:1/x",
        "https://h:99999/x",
        "https://h:-1/x",
        "https://h:port/x",
        "https://h:12ab/x",
        "https://[::1/x",
        "https://[not-an-ip]/x",
        f"https://h/x y?token={SECRET}",
        f"https://h/x\r\nX-Token: {SECRET}",
        f"https://h/\x00?{SECRET}",
    ],
)
def test_credentials_and_malformed_urls_are_refused_before_any_fetch(url: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        JWKSource(url, allow_http=True)
    assert SECRET not in str(info.value)
    with pytest.raises(InvalidRequest):
        Verifier.from_jwks_url(url, issuer=TEST_ISSUER, offline=True)


def test_credentials_are_refused_without_touching_the_server(server: RawServer) -> None:
    url = server.url.replace("http://", f"http://user:{SECRET}@")
    with pytest.raises(InvalidRequest, match="credentials"):
        JWKSource(url, allow_http=True)
    assert server.hits == 0


@pytest.mark.parametrize(
    "location",
    [
        f"http://user:{SECRET}@127.0.0.1/jwks.json",
        f"http://user:{SECRET}@127.0.0.1:1/jwks.json",
        "http://127.0.0.1:99999/jwks.json",
        f"file:///etc/passwd?{SECRET}",
    ],
)
def test_a_redirect_to_a_refused_url_is_refused_without_echoing_it(
    location: str, server: RawServer
) -> None:
    server.reply = send(b"HTTP/1.1 302 Found\r\nLocation: " + location.encode() + b"\r\n\r\n")
    with pytest.raises(KeySourceError, match="not allowed") as info:
        JWKSource(server.url, allow_http=True)
    assert SECRET not in str(info.value)


JSON_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
CHUNKED_HEAD = JSON_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "response",
    [
        b"",
        JSON_HEAD + b'Content-Length: 100\r\n\r\n{"keys": [',
        b"SPAM 200 OK\r\n\r\n",
        b"HTTP/1.1 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        CHUNKED_HEAD + b'zz\r\n{"keys": []}\r\n0\r\n\r\n',
        CHUNKED_HEAD + b'40\r\n{"keys": []}',
        JSON_HEAD + b"X-Long: " + b"a" * 70_000 + b"\r\n\r\n",
        JSON_HEAD + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n",
    ],
    ids=[
        "closed-before-responding",
        "closed-mid-body",
        "bad-status-line",
        "no-status-code",
        "status-out-of-range",
        "bad-chunk-size",
        "truncated-chunk",
        "header-line-too-long",
        "too-many-headers",
    ],
)
def test_a_broken_response_is_a_key_source_error(response: bytes, server: RawServer) -> None:
    server.reply = send(response)
    with pytest.raises(KeySourceError, match="could not fetch") as info:
        JWKSource(f"{server.url}?token={SECRET}", allow_http=True)
    assert info.value.__cause__ is not None  # the original, for whoever debugs it
    assert SECRET not in str(info.value)


def test_a_huge_body_with_a_content_length_is_too_large(server: RawServer) -> None:
    server.reply = ok(b" " * (MAX_JWKS_BYTES + 10))
    with pytest.raises(KeySourceError, match="larger than"):
        JWKSource(server.url, allow_http=True)


def test_a_tls_failure_is_a_key_source_error(server: RawServer) -> None:
    server.reply = ok(b'{"keys": []}')  # plain HTTP where TLS was expected
    with pytest.raises(KeySourceError, match="could not fetch") as info:
        JWKSource(f"https://127.0.0.1:{server.port}/jwks.json?token={SECRET}")
    assert info.value.__cause__ is not None
    assert SECRET not in str(info.value)


def test_https_still_verifies_the_certificate(tls_server: RawServer) -> None:
    with pytest.raises(KeySourceError, match="could not fetch") as info:
        JWKSource(tls_server.url)  # a self-signed certificate nobody trusts
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    assert isinstance(info.value.__cause__.reason, ssl.SSLCertVerificationError)


def test_https_fetches_from_a_trusted_server(
    tls_server: RawServer, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))  # OpenSSL reads it per context
    ring = KeyRing.generate()
    tls_server.serve(ring)
    assert [key.kid for key in JWKSource(tls_server.url).keys] == [ring.active.kid]


def test_a_trickling_tls_server_cannot_outlast_the_timeout(
    tls_server: RawServer, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    tls_server.reply = trickle(JSON_HEAD + b"Content-Length: %d\r\n\r\n" % len(BODY), BODY)
    started = time.monotonic()
    with pytest.raises(KeySourceError, match="timed out"):
        JWKSource(tls_server.url, timeout=1)
    assert time.monotonic() - started < 3


def test_a_broken_response_on_refresh_keeps_the_keys(server: RawServer, clock: FakeClock) -> None:
    ring = KeyRing.generate()
    server.serve(ring)
    verifier = url_verifier(server.url, clock, max_age=300)
    server.reply = send(b"SPAM 200 OK\r\n\r\n")
    clock.advance(301)
    assert verifier.verify(token_of(ring, clock)).key_id == ring.active.kid
    settle(verifier)
    assert verifier.verify(token_of(ring, clock)).key_id == ring.active.kid
    assert server.hits == 2


# -- 6. one deadline for the whole fetch ---------------------------------------
BODY = b'{"keys": []}' + b" " * 20


@pytest.mark.parametrize(
    ("head", "slow"),
    [
        (b"", JSON_HEAD + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY),
        (JSON_HEAD + b"Content-Length: %d\r\n\r\n" % len(BODY), BODY),
        (CHUNKED_HEAD, b"%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n\r\n"),
    ],
    ids=["headers", "body", "chunked-body"],
)
def test_a_trickling_server_cannot_outlast_the_timeout(
    head: bytes, slow: bytes, server: RawServer
) -> None:
    server.reply = trickle(head, slow)  # each read gets a byte well within the timeout
    started = time.monotonic()
    with pytest.raises(KeySourceError, match="timed out"):
        JWKSource(server.url, allow_http=True, timeout=1)
    assert time.monotonic() - started < 3


def test_a_trickling_refresh_does_not_hold_the_request(server: RawServer, clock: FakeClock) -> None:
    ring = KeyRing.generate()
    server.serve(ring)
    verifier = url_verifier(server.url, clock, max_age=300, timeout=1)
    server.reply = trickle(b"", JSON_HEAD + b"Content-Length: 1000\r\n\r\n" + b" " * 1000)
    clock.advance(301)
    started = time.monotonic()
    assert verifier.verify(token_of(ring, clock)).key_id == ring.active.kid
    assert time.monotonic() - started < 3


# -- 10. only signature keys verify (RFC 7517 4.2, 4.3) --------------------------
def test_a_mixed_jwks_verifies_with_its_signature_keys_only(
    server: RawServer, clock: FakeClock
) -> None:
    sig, enc = KeyRing.generate(), KeyRing.generate()
    enc_jwk = {**enc.jwks()["keys"][0], "use": "enc"}
    server.reply = ok(json.dumps({"keys": [enc_jwk, *sig.jwks()["keys"]]}).encode())
    verifier = url_verifier(server.url, clock)
    assert [key.kid for key in verifier.keys] == [sig.active.kid]
    assert verifier.verify(token_of(sig, clock)).key_id == sig.active.kid
    with pytest.raises(UnknownKey):
        verifier.verify(token_of(enc, clock))  # its kid names the encryption key


@pytest.mark.parametrize(
    "marks",
    [
        {"use": "enc"},
        {"use": "SIG"},  # member values are case-sensitive
        {"use": "tls"},
        {"use": None},
        {"use": ["sig"]},
        {"key_ops": ["encrypt", "wrapKey"]},
        {"key_ops": ["sign"]},
        {"key_ops": []},
        {"key_ops": "verify"},
        {"use": "sig", "key_ops": ["decrypt"]},
        {"use": "enc", "key_ops": ["verify"]},
    ],
)
def test_keys_not_for_signatures_never_verify(marks: dict[str, Any], clock: FakeClock) -> None:
    ring = KeyRing.generate("ES256")
    jwk = {k: v for k, v in ring.jwks()["keys"][0].items() if k != "use"}
    verifier = Verifier(
        {"keys": [{**jwk, **marks}]}, issuer=TEST_ISSUER, audience="api", offline=True, clock=clock
    )
    assert len(verifier.keys) == 0
    with pytest.raises(UnknownKey):
        verifier.verify(token_of(ring, clock))


@pytest.mark.parametrize(
    "marks",
    [{}, {"use": "sig"}, {"key_ops": ["verify"]}, {"key_ops": ["sign", "verify"]}],
)
def test_keys_for_signatures_verify(marks: dict[str, Any], clock: FakeClock) -> None:
    ring = KeyRing.generate("ES256")
    jwk = {k: v for k, v in ring.jwks()["keys"][0].items() if k != "use"}
    verifier = Verifier(
        {"keys": [{**jwk, **marks}]}, issuer=TEST_ISSUER, audience="api", offline=True, clock=clock
    )
    assert verifier.verify(token_of(ring, clock)).key_id == ring.active.kid


@pytest.mark.parametrize(
    "enc_jwk",
    [
        # Encryption keys of kinds we cannot load must not sink the whole JWKS.
        {"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA", "use": "enc"},
        {"kty": "OKP", "crv": "X25519", "x": "AA", "use": "enc", "alg": "ECDH-ES"},
        {"kty": "RSA", "n": "AQAB", "e": "AQAB", "key_ops": ["wrapKey"], "alg": "RSA-OAEP"},
    ],
    ids=["ec-p384", "x25519", "rsa-oaep"],
)
def test_an_encryption_key_we_cannot_load_is_skipped(
    enc_jwk: dict[str, Any], server: RawServer, clock: FakeClock
) -> None:
    sig = KeyRing.generate()
    server.reply = ok(json.dumps({"keys": [enc_jwk, *sig.jwks()["keys"]]}).encode())
    verifier = url_verifier(server.url, clock)
    assert verifier.verify(token_of(sig, clock)).key_id == sig.active.kid


@pytest.mark.parametrize("alg", ["EdDSA", "HS256"])
def test_a_skipped_key_with_private_material_is_still_refused(
    alg: str, server: RawServer, clock: FakeClock
) -> None:
    private = {**KeyRing.generate(alg).active.to_jwk(private=True), "use": "enc"}
    server.reply = ok(json.dumps({"keys": [private, *KeyRing.generate().jwks()["keys"]]}).encode())
    with pytest.raises(KeySourceError, match="private"):
        url_verifier(server.url, clock)


def test_a_jwks_of_only_encryption_keys_gives_an_empty_ring_and_a_warning(
    server: RawServer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    ring = KeyRing.generate()
    server.serve(ring, marks={"use": "enc"})
    with caplog.at_level(logging.WARNING, logger="jitbroker"):
        verifier = url_verifier(server.url, clock)
    assert len(verifier.keys) == 0
    assert "no key for verifying signatures" in caplog.text
    with pytest.raises(UnknownKey):
        verifier.verify(token_of(ring, clock))


# -- cached tokens and the max_age refresh ------------------------------------
def test_a_cached_token_stops_verifying_once_a_refresh_drops_its_key(
    server: RawServer, clock: FakeClock
) -> None:
    ring = KeyRing.generate()
    server.serve(ring)
    verifier = url_verifier(server.url, clock, max_age=300)
    token = token_of(ring, clock)
    verifier.verify(token)  # now cached
    server.serve(KeyRing.generate())  # the issuer dropped the key
    clock.advance(301)
    verifier.verify(token)  # stale: refreshed in the background, the keys held used
    settle(verifier)
    with pytest.raises(UnknownKey):
        verifier.verify(token)
    assert server.hits == 2


def test_a_cached_token_survives_a_refresh_that_keeps_its_key(
    server: RawServer, clock: FakeClock
) -> None:
    ring = KeyRing.generate()
    server.serve(ring)
    verifier = url_verifier(server.url, clock, max_age=300)
    token = token_of(ring, clock)
    verifier.verify(token)
    ring.rotate()  # a new signer; the old key is still published
    server.serve(ring)
    clock.advance(301)
    for _ in range(20):
        assert verifier.verify(token).key_id != ring.active.kid
    settle(verifier)
    assert verifier.verify(token).key_id != ring.active.kid
    assert server.hits == 2
    assert ring.active.kid in verifier.keys


def test_cached_hits_on_stale_keys_are_rate_limited(server: RawServer, clock: FakeClock) -> None:
    ring = KeyRing.generate()
    server.serve(ring)
    verifier = url_verifier(server.url, clock, max_age=300, min_refresh_interval=60)
    token = token_of(ring, clock)
    verifier.verify(token)
    server.reply = send(b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\n\r\n")
    clock.advance(301)
    for _ in range(50):  # stale the whole time: the endpoint keeps failing
        verifier.verify(token)
        settle(verifier)
    assert server.hits == 2
    clock.advance(61)
    verifier.verify(token)
    settle(verifier)
    assert server.hits == 3


def test_one_thread_refreshes_while_the_others_use_the_keys_held(
    server: RawServer, clock: FakeClock
) -> None:
    ring = KeyRing.generate()
    server.serve(ring)
    verifier = url_verifier(server.url, clock, max_age=300)
    cached = token_of(ring, clock)
    verifier.verify(cached)
    gate = threading.Event()
    served = ok(json.dumps(ring.jwks()).encode())

    def slow(sock: socket.socket, stopping: threading.Event) -> None:
        gate.wait(5)
        served(sock, stopping)

    server.reply = slow
    clock.advance(301)
    fetching = threading.Thread(target=verifier.verify, args=(cached,))
    fetching.start()
    deadline = time.monotonic() + 2
    while server.hits < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert server.hits == 2  # the refresh is in flight, held at the gate
    results: list[str | None] = []

    def verify_some() -> None:
        for token in (cached, token_of(ring, clock), cached):
            results.append(verifier.verify(token).key_id)

    started = time.monotonic()
    workers = [threading.Thread(target=verify_some) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=5)
    assert time.monotonic() - started < 1  # nobody waited for the fetch
    assert results == [ring.active.kid] * 24
    assert server.hits == 2
    gate.set()
    fetching.join(timeout=5)
    assert not fetching.is_alive()
