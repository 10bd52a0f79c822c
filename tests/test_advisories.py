"""One regression per known JWT-library advisory class, named by its CVE.

Each test builds the token the advisory's exploit used, against jitbroker, and
asserts the specific ``jitbroker.errors`` class that rejects it. A control at
the top shows the helpers make tokens that do verify, so each rejection is the
check under test and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from jitbroker import Broker, Credential, KeyRing, Verifier
from jitbroker.errors import (
    BadSignature,
    InvalidRequest,
    InvalidToken,
    KeySourceError,
    MalformedToken,
    UnknownKey,
    WrongIssuer,
)
from jitbroker.keys import Key, b64url, generate_key
from jitbroker.testing import TEST_ISSUER, FakeClock
from jitbroker.tokens import encode_jws

AUDIENCE = "api"
# Every advisory this file covers; each must be named, literally, in the
# docstring of a test (so `grep CVE-...` finds its regression).
ADVISORIES = (
    "CVE-2015-9235",
    "CVE-2022-29217",
    "CVE-2024-33663",
    "CVE-2024-37568",
    "CVE-2026-48526",
    "CVE-2022-21449",
    "CVE-2022-23540",
    "CVE-2024-53861",
    "CVE-2025-61920",
    "CVE-2026-48525",
    "CVE-2026-32597",
    "CVE-2018-0114",
    "CVE-2026-27962",
    "CVE-2026-48524",
    "CVE-2026-48522",
    "CVE-2022-39227",
)


def enc(obj: object) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def claims_of(token: str) -> dict[str, Any]:
    segment = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))))


def hs256(secret: bytes, header: dict[str, Any], claims: dict[str, Any]) -> str:
    signing_input = f"{enc(header)}.{enc(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def signed(key: Key, header: dict[str, Any], claims: dict[str, Any]) -> str:
    signing_input = f"{enc(header)}.{enc(claims)}"
    return f"{signing_input}.{b64url(key.sign(signing_input.encode()))}"


@pytest.fixture(params=["EdDSA", "ES256", "RS256"])
def broker(request: pytest.FixtureRequest, jitbroker_clock: FakeClock) -> Broker:
    return Broker(issuer=TEST_ISSUER, keys=KeyRing.generate(request.param), clock=jitbroker_clock)


@pytest.fixture
def cred(broker: Broker) -> Credential:
    return broker.issue("svc:a", AUDIENCE, ["read"], ttl=60)


def rejects(broker: Broker, token: str, error: type[InvalidToken]) -> InvalidToken:
    with pytest.raises(error) as raised:
        broker.verify(token, audience=AUDIENCE)
    return raised.value


def test_control_the_helpers_make_tokens_that_verify(broker: Broker, cred: Credential) -> None:
    key = broker.keys.active
    header = {"alg": key.alg, "typ": "at+jwt", "kid": key.kid}
    token = signed(key, header, claims_of(cred.token))
    assert broker.verify(token, audience=AUDIENCE).lease_id == cred.lease_id


# -- key confusion --------------------------------------------------------------------
@pytest.mark.parametrize(
    "cve", ["CVE-2015-9235", "CVE-2022-29217", "CVE-2024-33663", "CVE-2024-37568"]
)
@pytest.mark.parametrize("form", ["pem", "jwk-json", "der", "raw-x"])
def test_public_key_used_as_hmac_secret(
    broker: Broker, cred: Credential, cve: str, form: str
) -> None:
    """CVE-2015-9235, CVE-2022-29217, CVE-2024-33663, CVE-2024-37568: the classic,
    sign HS256 with the bytes of our own public key. The key behind ``kid`` is
    asymmetric, so its alg is pinned and HS256 never applies."""
    key = broker.keys.active
    public = key._verifier
    secret = {
        "pem": public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "der": public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "jwk-json": json.dumps(key.public_jwk()).encode(),
        "raw-x": str((key.public_jwk() or {}).get("x", (key.public_jwk() or {}).get("n"))).encode(),
    }[form]
    header = {"alg": "HS256", "typ": "at+jwt", "kid": key.kid}
    rejects(broker, hs256(secret, header, claims_of(cred.token)), BadSignature)


def test_cve_2026_48526_alg_switch_between_asymmetric_algorithms(broker: Broker) -> None:
    """CVE-2026-48526: a token signed by a key of another algorithm, claiming our
    kid. The header alg must equal the pinned alg of the key the kid names."""
    cred = broker.issue("svc:a", AUDIENCE, ttl=60)
    mine = broker.keys.active
    other_alg = "ES256" if mine.alg != "ES256" else "EdDSA"
    forger = generate_key(other_alg)
    header = {"alg": other_alg, "typ": "at+jwt", "kid": mine.kid}
    rejects(broker, signed(forger, header, claims_of(cred.token)), BadSignature)


def test_cve_2026_48526_verify_only_ring_never_accepts_hs256(jitbroker_clock: FakeClock) -> None:
    """CVE-2026-48526: a verifier holding only a public key cannot be talked into
    HMAC mode."""
    broker = Broker(issuer=TEST_ISSUER, clock=jitbroker_clock)
    verifier = Verifier(
        broker.jwks(), issuer=TEST_ISSUER, audience=AUDIENCE, offline=True, clock=jitbroker_clock
    )
    cred = broker.issue("svc:a", AUDIENCE, ttl=60)
    key = broker.keys.active
    secret = json.dumps(key.public_jwk()).encode()
    token = hs256(secret, {"alg": "HS256", "typ": "at+jwt", "kid": key.kid}, claims_of(cred.token))
    with pytest.raises(BadSignature):
        verifier.verify(token)


def test_cve_2026_48526_jwks_mixing_hmac_and_asymmetric_is_refused() -> None:
    """CVE-2026-48526: one ring never holds both an HMAC secret and public keys."""
    public = generate_key("EdDSA").public_jwk()
    oct_key = {"kty": "oct", "k": b64url(b"k" * 32)}
    with pytest.raises(InvalidRequest):
        KeyRing.from_jwks({"keys": [public, oct_key]})
    with pytest.raises(InvalidRequest):
        KeyRing([generate_key("EdDSA"), generate_key("HS256")])


# -- ECDSA "psychic signatures" ---------------------------------------------------------
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@pytest.mark.parametrize(
    "signature",
    [
        bytes(64),
        P256_N.to_bytes(32, "big") + P256_N.to_bytes(32, "big"),
        bytes(32) + (1).to_bytes(32, "big"),
        (1).to_bytes(32, "big") + bytes(32),
        bytes(63),
        b"",
    ],
    ids=["zero", "r=s=n", "r=0", "s=0", "short", "empty"],
)
def test_cve_2022_21449_psychic_ecdsa_signatures(
    jitbroker_clock: FakeClock, signature: bytes
) -> None:
    """CVE-2022-21449: an all-zero (or r, s out of range) ES256 signature."""
    broker = Broker(issuer=TEST_ISSUER, keys=KeyRing.generate("ES256"), clock=jitbroker_clock)
    cred = broker.issue("svc:a", AUDIENCE, ttl=60)
    header, payload, _ = cred.token.split(".")
    token = f"{header}.{payload}.{b64url(signature)}"
    rejects(broker, token, MalformedToken if not signature else BadSignature)


# -- alg none ---------------------------------------------------------------------------
@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signature", ["", "AAAA"])
def test_cve_2022_23540_alg_none(
    broker: Broker, cred: Credential, alg: str, signature: str
) -> None:
    """CVE-2022-23540: an unsigned token (alg none, in any case) is never accepted."""
    key = broker.keys.active
    header = enc({"alg": alg, "typ": "at+jwt", "kid": key.kid})
    token = f"{header}.{enc(claims_of(cred.token))}.{signature}"
    rejects(broker, token, MalformedToken)


# -- partial issuer match ---------------------------------------------------------------
@pytest.mark.parametrize(
    "issuer",
    [
        TEST_ISSUER + "-evil",
        TEST_ISSUER[:-1],
        "x" + TEST_ISSUER,
        TEST_ISSUER.upper(),
        TEST_ISSUER + " ",
        [TEST_ISSUER],
        {"iss": TEST_ISSUER},
    ],
    ids=["suffix", "prefix", "superstring", "case", "space", "list", "object"],
)
def test_cve_2024_53861_partial_issuer_match(broker: Broker, cred: Credential, issuer: Any) -> None:
    """CVE-2024-53861: iss is compared whole and exactly, never as a substring."""
    token = encode_jws(broker.keys.active, {**claims_of(cred.token), "iss": issuer})
    rejects(broker, token, WrongIssuer if isinstance(issuer, str) else MalformedToken)


# -- unbounded segments -------------------------------------------------------------------
@pytest.mark.parametrize("cve", ["CVE-2025-61920", "CVE-2026-48525"])
@pytest.mark.parametrize(
    "shape",
    ["huge-header", "huge-payload", "huge-signature", "ten-megabytes", "many-dots", "deep-json"],
)
def test_unbounded_segments(broker: Broker, cred: Credential, cve: str, shape: str) -> None:
    """CVE-2025-61920, CVE-2026-48525: huge segments are refused by the length cap."""
    header, payload, signature = cred.token.split(".")
    token = {
        "huge-header": f"{'A' * 100_000}.{payload}.{signature}",
        "huge-payload": f"{header}.{'A' * 100_000}.{signature}",
        "huge-signature": f"{header}.{payload}.{'A' * 100_000}",
        "ten-megabytes": "A" * 10_000_000,
        "many-dots": "." * 100_000,
        "deep-json": f"{enc({'alg': 'EdDSA'})[:-1]}.{b64url(b'[' * 50_000)}.{signature}",
    }[shape]
    rejects(broker, token, MalformedToken)


def test_cve_2026_48525_huge_integers_and_nesting_inside_the_cap(
    broker: Broker, cred: Credential
) -> None:
    """CVE-2026-48525, inside the length cap: a 4,000-digit exp and 2,000 nested arrays."""
    key = broker.keys.active
    for digits in (4000, 5000):  # under and over CPython's int-parsing limit
        big = json.dumps(claims_of(cred.token)).replace('"exp": ', f'"exp": {"9" * digits}, "x": ')
        signing_input = f"{key.header}.{b64url(big.encode())}"
        token = f"{signing_input}.{b64url(key.sign(signing_input.encode()))}"
        if len(token) <= 8192:
            rejects(broker, token, MalformedToken)
    token = encode_jws(key, {**claims_of(cred.token), "exp": 2**64})
    rejects(broker, token, MalformedToken)
    nested = b64url(b'{"a":' + b"[" * 2000 + b"]" * 2000 + b"}")
    signing_input = f"{key.header}.{nested}"
    token = f"{signing_input}.{b64url(key.sign(signing_input.encode()))}"
    rejects(broker, token, MalformedToken)


# -- crit ---------------------------------------------------------------------------------
@pytest.mark.parametrize("crit", [["exp"], ["b64"], ["x-unknown"], [], "exp"])
def test_cve_2026_32597_crit_header(broker: Broker, cred: Credential, crit: Any) -> None:
    """CVE-2026-32597: a crit header is refused, whatever it lists."""
    key = broker.keys.active
    header = {"alg": key.alg, "typ": "at+jwt", "kid": key.kid, "crit": crit}
    rejects(broker, signed(key, header, claims_of(cred.token)), MalformedToken)


# -- embedded keys --------------------------------------------------------------------------
@pytest.mark.parametrize("cve", ["CVE-2018-0114", "CVE-2026-27962"])
def test_embedded_jwk_header(broker: Broker, cred: Credential, cve: str) -> None:
    """CVE-2018-0114, CVE-2026-27962: the attacker signs with their own key and
    ships it in the header."""
    attacker = generate_key(broker.keys.active.alg)
    header = {"alg": attacker.alg, "typ": "at+jwt", "jwk": attacker.public_jwk()}
    rejects(broker, signed(attacker, header, claims_of(cred.token)), MalformedToken)
    header["kid"] = attacker.kid
    rejects(broker, signed(attacker, header, claims_of(cred.token)), MalformedToken)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("jku", "https://evil.example/jwks.json"),
        ("x5u", "https://evil.example/cert.pem"),
        ("x5c", ["MIIB"]),
    ],
)
def test_cve_2018_0114_key_fetching_headers(
    broker: Broker, cred: Credential, name: str, value: Any
) -> None:
    """CVE-2018-0114: headers that point at keys (jku, x5u, x5c) are refused."""
    key = broker.keys.active
    header = {"alg": key.alg, "typ": "at+jwt", "kid": key.kid, name: value}
    rejects(broker, signed(key, header, claims_of(cred.token)), MalformedToken)


# -- JWKS URLs: refetch storms and schemes ---------------------------------------------------
class JWKSServer:
    def __init__(self, body: bytes) -> None:
        self.hits = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        ).start()


@pytest.fixture
def jwks_server(jitbroker_clock: FakeClock) -> Iterator[JWKSServer]:
    server = JWKSServer(json.dumps(KeyRing.generate().jwks()).encode())
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def test_cve_2026_48524_unknown_kid_refetch_storm(
    jwks_server: JWKSServer, jitbroker_clock: FakeClock
) -> None:
    """CVE-2026-48524: a flood of unknown kids costs one JWKS refetch, not fifty."""
    verifier = Verifier.from_jwks_url(
        jwks_server.url,
        allow_http=True,
        issuer=TEST_ISSUER,
        audience=AUDIENCE,
        offline=True,
        min_refresh_interval=60,
        clock=jitbroker_clock,
    )
    jitbroker_clock.advance(61)
    for _ in range(50):
        stranger = generate_key("EdDSA")  # a new random kid each time
        header = {"alg": "EdDSA", "typ": "at+jwt", "kid": stranger.kid}
        claims = {
            "iss": TEST_ISSUER,
            "sub": "x",
            "aud": AUDIENCE,
            "jti": "0" * 32,
            "iat": 1,
            "nbf": 1,
            "exp": 2,
            "scope": "",
        }
        with pytest.raises(UnknownKey):
            verifier.verify(signed(stranger, header, claims))
    assert jwks_server.hits <= 2  # the startup fetch and one refetch for all fifty


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        'data:application/json,{"keys":[]}',
        "ftp://example.com/jwks.json",
        "gopher://example.com/",
        "http://example.com/jwks.json",  # plain http without allow_http
    ],
)
def test_cve_2026_48522_jwks_url_schemes(url: str) -> None:
    """CVE-2026-48522: only https (or http when allowed) JWKS URLs are fetched."""
    with pytest.raises(InvalidRequest):
        Verifier.from_jwks_url(url, issuer=TEST_ISSUER, offline=True)


def test_cve_2026_48522_a_redirect_to_file_is_refused(jwks_server: JWKSServer) -> None:
    """CVE-2026-48522: a redirect cannot reach a scheme the URL could not name."""

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    ).start()
    try:
        with pytest.raises(KeySourceError):
            Verifier.from_jwks_url(
                f"http://127.0.0.1:{httpd.server_address[1]}/",
                allow_http=True,
                issuer=TEST_ISSUER,
                offline=True,
            )
    finally:
        httpd.shutdown()
        httpd.server_close()


# -- JSON serialization mixing ------------------------------------------------------------------
def test_cve_2022_39227_json_serialization_mixing(broker: Broker, cred: Credential) -> None:
    """CVE-2022-39227: python-jwt accepted a JSON-serialized token whose keys
    smuggled a second, forged payload past the signature. Only the compact form
    is accepted here."""
    header, payload, signature = cred.token.split(".")
    forged = enc({**claims_of(cred.token), "sub": "svc:admin", "scope": "read admin"})
    mixed = json.dumps(
        {
            f" {header}.{forged}.": "",
            "protected": header,
            "payload": payload,
            "signature": signature,
        }
    )
    rejects(broker, mixed, MalformedToken)
    flattened = json.dumps({"protected": header, "payload": payload, "signature": signature})
    rejects(broker, flattened, MalformedToken)
    general = json.dumps(
        {"payload": payload, "signatures": [{"protected": header, "signature": signature}]}
    )
    rejects(broker, general, MalformedToken)
    rejects(broker, f"{header}.{forged}.{signature}", BadSignature)


# -- adjacent classics ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kid", ["../../dev/null", "' OR 1=1 --", "/etc/passwd", "\u0000", "a" * 10_000, ""]
)
def test_kid_is_only_ever_a_dictionary_key(broker: Broker, cred: Credential, kid: str) -> None:
    key = broker.keys.active
    header = {"alg": key.alg, "typ": "at+jwt", "kid": kid}
    token = signed(key, header, claims_of(cred.token))
    error = MalformedToken if len(token) > 8192 else UnknownKey
    rejects(broker, token, error)


def test_duplicate_alg_member_in_the_header(broker: Broker, cred: Credential) -> None:
    key = broker.keys.active
    raw = f'{{"alg":"{key.alg}","alg":"none","typ":"at+jwt","kid":"{key.kid}"}}'.encode()
    signing_input = f"{b64url(raw)}.{enc(claims_of(cred.token))}"
    token = f"{signing_input}.{b64url(key.sign(signing_input.encode()))}"
    rejects(broker, token, MalformedToken)


@pytest.mark.parametrize("typ", ["JWT", "jwt", "dpop+jwt", None])
def test_typ_must_be_ours(broker: Broker, cred: Credential, typ: str | None) -> None:
    key = broker.keys.active
    header: dict[str, Any] = {"alg": key.alg, "kid": key.kid}
    if typ is not None:
        header["typ"] = typ
    rejects(broker, signed(key, header, claims_of(cred.token)), MalformedToken)


@pytest.mark.parametrize("value", [1.5, True, "1767225660", None])
def test_time_claims_must_be_integers(broker: Broker, cred: Credential, value: Any) -> None:
    rejects(
        broker,
        encode_jws(broker.keys.active, {**claims_of(cred.token), "exp": value}),
        MalformedToken,
    )


def test_lifetime_beyond_max_ttl_is_refused(broker: Broker, cred: Credential) -> None:
    claims = claims_of(cred.token)
    claims["exp"] = claims["iat"] + 10 * 3600
    rejects(broker, encode_jws(broker.keys.active, claims), MalformedToken)


# -- the index ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cve", ADVISORIES)
def test_every_advisory_names_its_regression(cve: str) -> None:
    """The list above is the contract: each id appears literally in a test docstring."""
    tests = {
        name: fn
        for name, fn in globals().items()
        if name.startswith("test_")
        and callable(fn)
        and name != "test_every_advisory_names_its_regression"
    }
    assert any(cve in (fn.__doc__ or "") for fn in tests.values()), f"no test names {cve}"
