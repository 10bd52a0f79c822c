"""Hostile input against ``Broker.verify`` and an offline ``Verifier``.

Every case asserts the exact ``jitbroker.errors`` class raised. Where a hostile
token is built by signing with the broker's own key, the only thing wrong with
it is the part under test: without the check that rejects it, it would verify
(the control tests at the top show that the helpers produce accepted tokens).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any, TypeVar, cast

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from jitbroker import Broker, Claims, Credential, KeyRing, Verifier
from jitbroker.errors import (
    BadSignature,
    InsufficientScope,
    InvalidToken,
    MalformedToken,
    TokenExpired,
    TokenNotYetValid,
    TokenRevoked,
    UnknownKey,
    UnknownLease,
    WrongAudience,
    WrongIssuer,
)
from jitbroker.keys import Key, b64url
from jitbroker.testing import TEST_ISSUER, FakeClock
from jitbroker.tokens import MAX_TOKEN_LENGTH, encode_jws, opaque_lease_id

SUBJECT = "svc:ci-deploy"
AUDIENCE = "db:orders"
SCOPES = ["orders:read"]
TTL = 60
LEEWAY = 5  # the broker's default
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

Verifies = Broker | Verifier
E = TypeVar("E", bound=InvalidToken)


# -- helpers ----------------------------------------------------------------
def enc(obj: object) -> str:
    """A JSON value as a compact base64url segment."""
    return b64url(json.dumps(obj, separators=(",", ":")).encode("utf-8"))


def dec(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def sign(key: Key, header: str, payload: str) -> str:
    """Sign two already-encoded segments with ``key`` (whatever they contain)."""
    signing_input = f"{header}.{payload}"
    return f"{signing_input}.{b64url(key.sign(signing_input.encode('ascii')))}"


def header_of(key: Key, **changes: object) -> dict[str, object]:
    return {"alg": key.alg, "typ": "at+jwt", "kid": key.kid, **changes}


def claims_of(token: str) -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(dec(token.split(".")[1])))


def with_claims(cred: Credential, **changes: object) -> dict[str, Any]:
    return {**claims_of(cred.token), **changes}


def without_claim(cred: Credential, name: str) -> dict[str, Any]:
    claims = claims_of(cred.token)
    del claims[name]
    return claims


def resign(broker: Broker, claims: dict[str, Any]) -> str:
    """A token the broker's own key signed, carrying ``claims``."""
    return encode_jws(broker.keys.active, claims)


def signed_raw_payload(broker: Broker, payload: bytes) -> str:
    key = broker.keys.active
    return sign(key, key.header, b64url(payload))


def segments(token: str) -> tuple[str, str, str]:
    header, payload, signature = token.split(".")
    return header, payload, signature


def replace_signature(token: str, signature: bytes) -> str:
    header, payload, _ = segments(token)
    return f"{header}.{payload}.{b64url(signature)}"


def replace_char(text: str, index: int, char: str) -> str:
    if text[index] == char:  # keep the mutation a mutation
        char = "B" if char == "A" else "A"
    return text[:index] + char + text[index + 1 :]


def noncanonical(segment: str) -> str:
    """The same bytes with nonzero unused low bits in the last character."""
    rem = len(segment) % 4
    assert rem in (2, 3), "this segment length has no unused bits"
    value = B64URL_ALPHABET.index(segment[-1])
    return segment[:-1] + B64URL_ALPHABET[value | 1]


def rejects(verifier: Verifies, token: object, error: type[E], **kw: Any) -> E:
    """Verify ``token`` and require exactly ``error`` (not a subclass, not a parent)."""
    kw.setdefault("audience", AUDIENCE)
    with pytest.raises(error) as info:
        verifier.verify(cast(str, token), **kw)
    assert type(info.value) is error, f"expected {error.__name__}, got {info.value!r}"
    return info.value


def accepts(verifier: Verifies, token: str, **kw: Any) -> Claims:
    kw.setdefault("audience", AUDIENCE)
    return verifier.verify(token, **kw)


def broker_with(alg: str, clock: FakeClock, **options: Any) -> Broker:
    return Broker(issuer=TEST_ISSUER, keys=KeyRing.generate(alg), clock=clock, **options)


def issue(broker: Broker, **options: Any) -> Credential:
    options.setdefault("ttl", TTL)
    return broker.issue(
        SUBJECT, AUDIENCE, SCOPES, task="job-42", owner="alice@example.com", **options
    )


@pytest.fixture
def cred(jitbroker_broker: Broker) -> Credential:
    return issue(jitbroker_broker)


@pytest.fixture
def offline(jitbroker_broker: Broker, jitbroker_clock: FakeClock) -> Verifier:
    return Verifier(
        jitbroker_broker.jwks(), issuer=TEST_ISSUER, offline=True, clock=jitbroker_clock
    )


@pytest.fixture
def opaque_broker(jitbroker_keys: KeyRing, jitbroker_clock: FakeClock) -> Broker:
    return Broker(
        issuer=TEST_ISSUER, keys=jitbroker_keys, clock=jitbroker_clock, token_format="opaque"
    )


# -- controls: the helpers build tokens that verify ---------------------------
def test_control_issued_token_verifies(jitbroker_broker: Broker, cred: Credential) -> None:
    claims = accepts(jitbroker_broker, cred.token, scopes=SCOPES)
    assert claims.lease_id == cred.lease_id


def test_control_resigned_claims_verify(jitbroker_broker: Broker, cred: Credential) -> None:
    token = resign(jitbroker_broker, with_claims(cred, extra="ignored"))
    assert accepts(jitbroker_broker, token).lease_id == cred.lease_id


def test_control_resigned_raw_payload_verifies(jitbroker_broker: Broker, cred: Credential) -> None:
    payload = json.dumps(claims_of(cred.token), indent=1).encode("utf-8")
    assert accepts(jitbroker_broker, signed_raw_payload(jitbroker_broker, payload))


@pytest.mark.parametrize(
    "header",
    [
        {"kid": "K", "typ": "at+jwt", "alg": "A"},  # members reordered: the slow path
        {"alg": "A", "typ": "application/at+jwt", "kid": "K"},
        {"alg": "A", "typ": "at+jwt", "kid": "K", "x-unknown": 1},
    ],
    ids=["reordered", "media-type", "unknown-member"],
)
def test_control_slow_path_header_verifies(
    jitbroker_broker: Broker, cred: Credential, header: dict[str, object]
) -> None:
    key = jitbroker_broker.keys.active
    real = {k: {"A": key.alg, "K": key.kid}.get(cast(str, v), v) for k, v in header.items()}
    token = sign(key, enc(real), segments(cred.token)[1])
    assert accepts(jitbroker_broker, token).lease_id == cred.lease_id


# -- signatures ----------------------------------------------------------------
def test_forged_signature_same_kid_header(jitbroker_broker: Broker, cred: Credential) -> None:
    attacker = KeyRing.generate("EdDSA").active
    claims = with_claims(cred, scope="orders:read orders:write")
    token = sign(attacker, jitbroker_broker.keys.active.header, enc(claims))
    rejects(jitbroker_broker, token, BadSignature)


@pytest.mark.parametrize(
    "changes",
    [
        {"scope": "orders:read orders:write"},
        {"sub": "svc:admin"},
        {"aud": "db:payments"},
        {"exp": 1_767_225_600 + 3600},
        {"iss": "urn:evil"},
        {"jti": "0" * 32},
        {"owner": "mallory@example.com"},
    ],
    ids=["scope", "sub", "aud", "exp", "iss", "jti", "owner"],
)
def test_tampered_payload_keeps_signature(
    jitbroker_broker: Broker, cred: Credential, changes: dict[str, object]
) -> None:
    header, _, signature = segments(cred.token)
    token = f"{header}.{enc(with_claims(cred, **changes))}.{signature}"
    rejects(jitbroker_broker, token, BadSignature)


@pytest.mark.parametrize(
    "changes",
    [{"typ": "application/at+jwt"}, {"x-extra": "1"}, {"cty": "JWT"}],
    ids=["typ-media-type", "extra-member", "cty"],
)
def test_tampered_header_keeps_signature(
    jitbroker_broker: Broker, cred: Credential, changes: dict[str, object]
) -> None:
    _, payload, signature = segments(cred.token)
    header = enc(header_of(jitbroker_broker.keys.active, **changes))
    rejects(jitbroker_broker, f"{header}.{payload}.{signature}", BadSignature)


def test_header_names_another_key_of_the_ring(
    jitbroker_broker: Broker, jitbroker_keys: KeyRing, cred: Credential
) -> None:
    new_key = jitbroker_keys.rotate()
    _, payload, signature = segments(cred.token)  # signed by the old key
    rejects(jitbroker_broker, f"{new_key.header}.{payload}.{signature}", BadSignature)


def test_signature_of_another_token(jitbroker_broker: Broker, cred: Credential) -> None:
    other = issue(jitbroker_broker)
    header, payload, _ = segments(cred.token)
    rejects(jitbroker_broker, f"{header}.{payload}.{segments(other.token)[2]}", BadSignature)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda sig: sig[:-1],
        lambda sig: sig + b"\x00",
        lambda sig: b"\x00" + sig,
        lambda sig: bytes(64),
        lambda sig: sig[:32] * 2,
    ],
    ids=["short", "trailing-zero", "leading-zero", "all-zero", "r-repeated"],
)
def test_eddsa_mangled_signature(
    jitbroker_broker: Broker, cred: Credential, mangle: Callable[[bytes], bytes]
) -> None:
    signature = dec(segments(cred.token)[2])
    rejects(jitbroker_broker, replace_signature(cred.token, mangle(signature)), BadSignature)


# -- algorithm confusion ---------------------------------------------------------
def _public_forms(key: Key) -> dict[str, bytes]:
    jwk = cast(dict[str, str], key.public_jwk())
    forms = {
        "pem": key.public().to_pem(),
        "jwk-json": json.dumps(jwk).encode(),
        "kid": key.kid.encode(),
    }
    if key.alg == "EdDSA":
        forms["raw"] = dec(jwk["x"])
    if key.alg == "RS256":
        material = serialization.load_pem_public_key(forms["pem"])
        forms["der"] = material.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.PKCS1
        )
    return forms


@pytest.mark.parametrize("alg", ["EdDSA", "RS256", "ES256"])
def test_hs256_signed_with_public_key_as_hmac_secret(alg: str, jitbroker_clock: FakeClock) -> None:
    broker = broker_with(alg, jitbroker_clock)
    cred = issue(broker)
    key = broker.keys.active
    header = enc(header_of(key, alg="HS256"))
    payload = enc(with_claims(cred, scope="orders:read orders:write"))
    for secret in _public_forms(key).values():
        rejects(broker, sign(Key("HS256", secret, None), header, payload), BadSignature)
    offline = Verifier(broker.jwks(), issuer=TEST_ISSUER, offline=True, clock=jitbroker_clock)
    secret = _public_forms(key)["pem"]
    rejects(offline, sign(Key("HS256", secret, None), header, payload), BadSignature)


@pytest.mark.parametrize("alg", ["ES256", "RS256", "HS256", "Ed25519", "EDDSA", "PS256"])
def test_header_alg_changed(jitbroker_broker: Broker, cred: Credential, alg: str) -> None:
    _, payload, signature = segments(cred.token)
    header = enc(header_of(jitbroker_broker.keys.active, alg=alg))
    rejects(jitbroker_broker, f"{header}.{payload}.{signature}", BadSignature)


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signature", ["empty", "garbage", "real"])
def test_alg_none(jitbroker_broker: Broker, cred: Credential, alg: str, signature: str) -> None:
    key = jitbroker_broker.keys.active
    header, payload = enc(header_of(key, alg=alg)), segments(cred.token)[1]
    token = {
        "empty": f"{header}.{payload}.",
        "garbage": f"{header}.{payload}.AAAA",
        "real": sign(key, header, payload),
    }[signature]
    rejects(jitbroker_broker, token, MalformedToken)


@pytest.mark.parametrize("alg", [None, 0, ["EdDSA"], {"alg": "EdDSA"}, True, "missing"])
def test_alg_missing_or_not_a_string(
    jitbroker_broker: Broker, cred: Credential, alg: object
) -> None:
    key = jitbroker_broker.keys.active
    header = header_of(key, alg=alg)
    if alg == "missing":
        del header["alg"]
    rejects(jitbroker_broker, sign(key, enc(header), segments(cred.token)[1]), MalformedToken)


def test_alg_of_another_key_type_in_the_ring(
    jitbroker_broker: Broker, jitbroker_keys: KeyRing, cred: Credential
) -> None:
    es256 = KeyRing.generate("ES256").active
    jitbroker_keys.add(es256)
    # Signed by the EdDSA key, but the header names the ES256 key with alg EdDSA.
    eddsa = jitbroker_keys.active
    token = sign(eddsa, enc(header_of(es256, alg="EdDSA")), segments(cred.token)[1])
    rejects(jitbroker_broker, token, BadSignature)


# -- header parameters -----------------------------------------------------------
def test_unknown_kid(jitbroker_broker: Broker, cred: Credential) -> None:
    stranger = KeyRing.generate("EdDSA").active
    token = sign(stranger, stranger.header, segments(cred.token)[1])
    rejects(jitbroker_broker, token, UnknownKey)


def test_unknown_kid_made_up(jitbroker_broker: Broker, cred: Credential) -> None:
    key = jitbroker_broker.keys.active
    token = sign(key, enc(header_of(key, kid="no-such-kid")), segments(cred.token)[1])
    rejects(jitbroker_broker, token, UnknownKey)


def test_retired_key_after_its_token_was_cached(
    jitbroker_broker: Broker, jitbroker_keys: KeyRing, cred: Credential
) -> None:
    accepts(jitbroker_broker, cred.token)  # now in the verified-token cache
    old = jitbroker_keys.active.kid
    jitbroker_keys.rotate()
    jitbroker_keys.retire(old)
    rejects(jitbroker_broker, cred.token, UnknownKey)


def test_missing_kid(jitbroker_broker: Broker, cred: Credential) -> None:
    key = jitbroker_broker.keys.active
    header = header_of(key)
    del header["kid"]
    rejects(jitbroker_broker, sign(key, enc(header), segments(cred.token)[1]), MalformedToken)


@pytest.mark.parametrize("kid", [None, 1, 1.5, True, ["K"], {"kid": "K"}])
def test_kid_of_wrong_type(jitbroker_broker: Broker, cred: Credential, kid: object) -> None:
    key = jitbroker_broker.keys.active
    if kid == ["K"]:
        kid = [key.kid]
    token = sign(key, enc(header_of(key, kid=kid)), segments(cred.token)[1])
    rejects(jitbroker_broker, token, MalformedToken)


@pytest.mark.parametrize(
    "extra",
    [
        {"crit": ["exp"], "exp": 1},
        {"crit": []},
        {"jku": "https://attacker.example/jwks.json"},
        {"x5u": "https://attacker.example/cert.pem"},
        {"x5c": ["MIIBszCCAVmgAwIBAgIU"]},
        {"x5t": "AAAA"},
        {"x5t#S256": "AAAA"},
        {"b64": False},
    ],
    ids=["crit", "crit-empty", "jku", "x5u", "x5c", "x5t", "x5t-s256", "b64"],
)
def test_forbidden_header_parameter(
    jitbroker_broker: Broker, cred: Credential, extra: dict[str, object]
) -> None:
    key = jitbroker_broker.keys.active
    token = sign(key, enc(header_of(key, **extra)), segments(cred.token)[1])
    rejects(jitbroker_broker, token, MalformedToken)


@pytest.mark.parametrize("kid", ["attacker", "real"])
def test_embedded_jwk_header(jitbroker_broker: Broker, cred: Credential, kid: str) -> None:
    attacker = KeyRing.generate("EdDSA").active
    real = jitbroker_broker.keys.active
    header = header_of(
        attacker,
        kid=attacker.kid if kid == "attacker" else real.kid,
        jwk=attacker.public_jwk(),
    )
    token = sign(attacker, enc(header), segments(cred.token)[1])
    rejects(jitbroker_broker, token, MalformedToken)


@pytest.mark.parametrize(
    "typ",
    ["JWT", "jwt", "AT+JWT", "application/jwt", "at+jwt ", "", None, 1, ["at+jwt"], "missing"],
)
def test_wrong_typ(jitbroker_broker: Broker, cred: Credential, typ: object) -> None:
    key = jitbroker_broker.keys.active
    header = header_of(key, typ=typ)
    if typ == "missing":
        del header["typ"]
    rejects(jitbroker_broker, sign(key, enc(header), segments(cred.token)[1]), MalformedToken)


@pytest.mark.parametrize(
    "template",
    [
        '{"alg":"A","typ":"at+jwt","kid":"K","kid":"K"}',
        '{"alg":"none","alg":"A","typ":"at+jwt","kid":"K"}',
        '{"alg":"A","typ":"JWT","typ":"at+jwt","kid":"K"}',
    ],
    ids=["kid-twice", "alg-none-then-real", "typ-twice"],
)
def test_duplicate_header_members(
    jitbroker_broker: Broker, cred: Credential, template: str
) -> None:
    key = jitbroker_broker.keys.active
    raw = template.replace('"A"', json.dumps(key.alg)).replace('"K"', json.dumps(key.kid))
    token = sign(key, b64url(raw.encode()), segments(cred.token)[1])
    rejects(jitbroker_broker, token, MalformedToken)


@pytest.mark.parametrize(
    "raw",
    [b"[]", b'"at+jwt"', b"1", b"null", b"true", b"", b"{", b'{"alg":"EdDSA"', b"\xff\xfe"],
    ids=["array", "string", "number", "null", "true", "empty", "open", "unclosed", "bad-utf8"],
)
def test_header_not_a_json_object(jitbroker_broker: Broker, cred: Credential, raw: bytes) -> None:
    key = jitbroker_broker.keys.active
    rejects(jitbroker_broker, sign(key, b64url(raw), segments(cred.token)[1]), MalformedToken)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"])
def test_header_not_utf8(jitbroker_broker: Broker, cred: Credential, encoding: str) -> None:
    key = jitbroker_broker.keys.active
    header = json.dumps(header_of(key), separators=(",", ":")).encode(encoding)
    rejects(jitbroker_broker, sign(key, b64url(header), segments(cred.token)[1]), MalformedToken)


def test_header_deeply_nested(jitbroker_broker: Broker, cred: Credential) -> None:
    # Valid in every other way and signed: only the nesting can reject it.
    key = jitbroker_broker.keys.active
    raw = json.dumps(header_of(key), separators=(",", ":"))[:-1] + ',"x":'
    raw += "[" * 2000 + "]" * 2000 + "}"
    token = sign(key, b64url(raw.encode()), segments(cred.token)[1])
    assert len(token) <= MAX_TOKEN_LENGTH
    rejects(jitbroker_broker, token, MalformedToken)


def test_header_noncanonical_base64(jitbroker_broker: Broker, cred: Credential) -> None:
    key = jitbroker_broker.keys.active
    header = enc(header_of(key))
    pad = 0
    while len(header) % 4 not in (2, 3):  # need a length whose last char has spare bits
        pad += 1
        header = enc(header_of(key, p="x" * pad))
    rejects(
        jitbroker_broker, sign(key, noncanonical(header), segments(cred.token)[1]), MalformedToken
    )


# -- the compact form --------------------------------------------------------------
def _insert(index: Callable[[str], int], text: str) -> Callable[[str], str]:
    return lambda t: t[: index(t)] + text + t[index(t) :]


def _in_payload(t: str) -> int:
    return t.index(".") + 6


def _in_signature(t: str) -> int:
    return t.rindex(".") + 10


COMPACT_CASES: list[tuple[str, Callable[[str], str]]] = [
    ("two-segments", lambda t: t.rsplit(".", 1)[0]),
    ("one-segment", lambda t: t.split(".")[0]),
    ("four-segments", lambda t: t + "." + t.split(".")[2]),
    ("five-segments", lambda t: t + ".AAAA.AAAA"),
    ("empty-header", lambda t: "." + t.split(".", 1)[1]),
    ("empty-payload", lambda t: t.split(".")[0] + ".." + t.split(".")[2]),
    ("empty-signature", lambda t: t.rsplit(".", 1)[0] + "."),
    ("all-empty", lambda t: ".."),
    ("empty-string", lambda t: ""),
    ("leading-dot", lambda t: "." + t),
    ("trailing-dot", lambda t: t + "."),
    ("doubled-dot", lambda t: t.replace(".", "..", 1)),
    ("padding-on-signature", lambda t: t + "=="),
    ("one-pad-char", lambda t: t + "="),
    ("padding-on-header", lambda t: t.replace(".", "==.", 1)),
    ("plus", lambda t: replace_char(t, _in_signature(t), "+")),
    ("slash", lambda t: replace_char(t, _in_signature(t), "/")),
    ("leading-space", lambda t: " " + t),
    ("trailing-space", lambda t: t + " "),
    ("trailing-newline", lambda t: t + "\n"),
    ("trailing-crlf", lambda t: t + "\r\n"),
    ("space-inside", _insert(_in_payload, " ")),
    ("tab-inside", _insert(_in_payload, "\t")),
    ("nbsp-inside", _insert(_in_payload, "\u00a0")),
    ("line-separator", _insert(_in_payload, "\u2028")),
    ("nul-byte", _insert(_in_payload, "\x00")),
    ("bearer-prefix", lambda t: "Bearer " + t),
    ("bom-prefix", lambda t: "\ufeff" + t),
    ("zero-width-space", _insert(_in_payload, "\u200b")),
    ("fullwidth-letter", lambda t: replace_char(t, _in_payload(t), "\uff21")),
    ("e-acute", lambda t: replace_char(t, _in_payload(t), "\u00e9")),
    ("arabic-indic-digit", lambda t: replace_char(t, _in_payload(t), "\u0663")),
    ("kelvin-sign", lambda t: replace_char(t, _in_payload(t), "\u212a")),
    ("long-s", lambda t: replace_char(t, _in_payload(t), "\u017f")),
    ("emoji", _insert(_in_signature, "\U0001f511")),
    ("percent-encoded-dot", lambda t: t.replace(".", "%2E", 1)),
    ("segment-length-4k+1", lambda t: t + "A" * ((1 - len(t.rsplit(".", 1)[1])) % 4 or 4)),
    (
        "noncanonical-signature",
        lambda t: t.rsplit(".", 1)[0] + "." + noncanonical(t.rsplit(".", 1)[1]),
    ),
    ("oversized-garbage", lambda t: "A" * (MAX_TOKEN_LENGTH + 1)),
    ("oversized-three-segments", lambda t: "A" * 4096 + "." + "A" * 4096 + ".AAAA"),
    ("valid-token-twice", lambda t: t + t),
]


@pytest.mark.parametrize(("name", "mangle"), COMPACT_CASES, ids=[c[0] for c in COMPACT_CASES])
def test_malformed_compact_form(
    jitbroker_broker: Broker, cred: Credential, name: str, mangle: Callable[[str], str]
) -> None:
    token = mangle(cred.token)
    assert token != cred.token, name
    rejects(jitbroker_broker, token, MalformedToken)


def test_noncanonical_signature_decodes_to_the_same_bytes(cred: Credential) -> None:
    # Why the case above matters: without the canonical check it would verify.
    signature = segments(cred.token)[2]
    assert dec(noncanonical(signature)) == dec(signature)


def test_noncanonical_payload_signed_by_the_key(jitbroker_broker: Broker, cred: Credential) -> None:
    key = jitbroker_broker.keys.active
    claims = claims_of(cred.token)
    payload, pad = enc(claims), 0
    while len(payload) % 4 not in (2, 3):
        pad += 1
        payload = enc({**claims, "p": "x" * pad})
    assert accepts(jitbroker_broker, sign(key, key.header, payload))
    rejects(jitbroker_broker, sign(key, key.header, noncanonical(payload)), MalformedToken)


def _sized_tokens(broker: Broker, cred: Credential) -> tuple[str, str]:
    """The longest signed token within the length cap and the shortest beyond it."""
    fits, key = "", broker.keys.active
    for size in range(5000, MAX_TOKEN_LENGTH):
        # Signed by hand: encode_jws refuses to mint a token past the cap.
        token = sign(key, key.header, enc(with_claims(cred, filler="x" * size)))
        if len(token) > MAX_TOKEN_LENGTH:
            return fits, token
        fits = token
    raise AssertionError("unreachable")


def test_oversized_token(jitbroker_broker: Broker, cred: Credential) -> None:
    fits, too_long = _sized_tokens(jitbroker_broker, cred)
    assert len(fits) <= MAX_TOKEN_LENGTH < len(too_long)
    assert accepts(jitbroker_broker, fits).lease_id == cred.lease_id
    rejects(jitbroker_broker, too_long, MalformedToken)


# -- the payload (signed by the broker's key: only its content is hostile) --------
@pytest.mark.parametrize(
    "raw",
    [b"[]", b'["iss","sub"]', b'"claims"', b"1767225600", b"null", b"true", b"", b"{"],
    ids=["array", "array-of-names", "string", "number", "null", "true", "empty", "unclosed"],
)
def test_payload_not_a_json_object(jitbroker_broker: Broker, raw: bytes) -> None:
    rejects(jitbroker_broker, signed_raw_payload(jitbroker_broker, raw), MalformedToken)


@pytest.mark.parametrize(
    ("name", "value"),
    [("sub", "svc:admin"), ("scope", "orders:read orders:admin"), ("jti", "0" * 32)],
)
def test_payload_duplicate_members(
    jitbroker_broker: Broker, cred: Credential, name: str, value: str
) -> None:
    raw = json.dumps(claims_of(cred.token))[:-1] + f", {json.dumps(name)}: {json.dumps(value)}}}"
    rejects(jitbroker_broker, signed_raw_payload(jitbroker_broker, raw.encode()), MalformedToken)


def test_payload_duplicate_members_nested(jitbroker_broker: Broker, cred: Credential) -> None:
    raw = json.dumps(claims_of(cred.token))[:-1] + ', "x": {"a": 1, "a": 2}}'
    rejects(jitbroker_broker, signed_raw_payload(jitbroker_broker, raw.encode()), MalformedToken)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("name", ["exp", "x"])
def test_payload_nan_infinity(
    jitbroker_broker: Broker, cred: Credential, constant: str, name: str
) -> None:
    claims = claims_of(cred.token)
    claims.pop(name, None)
    raw = json.dumps(claims)[:-1] + f', "{name}": {constant}}}'
    rejects(jitbroker_broker, signed_raw_payload(jitbroker_broker, raw.encode()), MalformedToken)


@pytest.mark.parametrize(
    "bad",
    [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80"],
    ids=["ff", "overlong-slash", "utf8-surrogate", "truncated", "lone-continuation"],
)
def test_payload_invalid_utf8(jitbroker_broker: Broker, cred: Credential, bad: bytes) -> None:
    claims = claims_of(cred.token)
    raw = json.dumps({**claims, "owner": "OWNER"}).encode().replace(b"OWNER", bad)
    rejects(jitbroker_broker, signed_raw_payload(jitbroker_broker, raw), MalformedToken)


# -- strict JSON: a nesting cap and no lone surrogates ---------------------------
def with_member(document: dict[str, Any], json_value: str) -> bytes:
    """``document`` plus a member ``"x"`` whose value is the raw JSON ``json_value``."""
    return (json.dumps(document)[:-1] + f', "x": {json_value}}}').encode()


def nesting(levels: int, opener: str = "[") -> str:
    """A JSON value ``levels`` deep, alternating arrays and objects from ``opener``."""
    text = "0"
    for level in range(levels):
        array = (level % 2 == 0) == (opener == "[")
        text = f"[{text}]" if array else f'{{"a":{text}}}'
    return text


@pytest.mark.parametrize("opener", ["[", "{"])
@pytest.mark.parametrize(("depth", "ok"), [(32, True), (33, False), (200, False)])
def test_payload_nesting_is_capped_at_32_levels(
    jitbroker_broker: Broker, cred: Credential, opener: str, depth: int, ok: bool
) -> None:
    """The payload object is level 1; a member nested to ``depth`` in total."""
    raw = with_member(claims_of(cred.token), nesting(depth - 1, opener))
    token = signed_raw_payload(jitbroker_broker, raw)
    if ok:
        assert accepts(jitbroker_broker, token).lease_id == cred.lease_id
    else:
        rejects(jitbroker_broker, token, MalformedToken)


@pytest.mark.parametrize("depth", [32, 33])
def test_header_nesting_is_capped_at_32_levels(
    jitbroker_broker: Broker, cred: Credential, depth: int
) -> None:
    key = jitbroker_broker.keys.active
    header = b64url(with_member(header_of(key), nesting(depth - 1)))
    token = sign(key, header, segments(cred.token)[1])
    if depth <= 32:
        assert accepts(jitbroker_broker, token).lease_id == cred.lease_id
    else:
        rejects(jitbroker_broker, token, MalformedToken)


def test_brackets_inside_strings_do_not_count_as_nesting(
    jitbroker_broker: Broker, cred: Credential
) -> None:
    value = json.dumps('[{\\"' * 100 + "]}" * 100)  # brackets, quotes and backslashes
    raw = with_member(claims_of(cred.token), f"[{value}, {nesting(20)}]")
    token = signed_raw_payload(jitbroker_broker, raw)
    assert accepts(jitbroker_broker, token).raw["x"][0] == json.loads(value)


@pytest.mark.parametrize(
    "member",
    [
        '"x": "\\ud800"',
        '"x": "\\udc00"',
        '"x": "\\uDBFF"',
        '"x": "a\\ud83d"',
        '"x": "\\ude00\\ud83d"',
        '"x": ["ok", {"y": "\\udfff"}]',
        '"\\ud800": 1',
        '"x": {"\\udc00": "ok"}',
        '"owner": "alice\\ud800"',
    ],
    ids=[
        "high",
        "low",
        "upper-case",
        "high-at-end",
        "pair-reversed",
        "nested-value",
        "member-name",
        "nested-member-name",
        "known-claim",
    ],
)
def test_payload_lone_surrogates(jitbroker_broker: Broker, cred: Credential, member: str) -> None:
    claims = claims_of(cred.token)
    claims.pop("owner")
    raw = (json.dumps(claims)[:-1] + f", {member}}}").encode()
    rejects(jitbroker_broker, signed_raw_payload(jitbroker_broker, raw), MalformedToken)


def test_header_lone_surrogate(jitbroker_broker: Broker, cred: Credential) -> None:
    key = jitbroker_broker.keys.active
    header = b64url(with_member(header_of(key), '"\\ud800"'))
    rejects(jitbroker_broker, sign(key, header, segments(cred.token)[1]), MalformedToken)


@pytest.mark.parametrize(
    ("json_value", "text"),
    [('"\\ud83d\\ude00"', "\U0001f600"), ('"\\\\ud800"', "\\ud800")],
    ids=["surrogate-pair", "escaped-backslash"],
)
def test_surrogate_controls_verify(
    jitbroker_broker: Broker, cred: Credential, json_value: str, text: str
) -> None:
    """A proper pair is one character, and an escaped backslash is no escape."""
    raw = with_member(claims_of(cred.token), json_value)
    claims = accepts(jitbroker_broker, signed_raw_payload(jitbroker_broker, raw))
    assert claims.raw["x"] == text


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"])
def test_payload_not_utf8(jitbroker_broker: Broker, cred: Credential, encoding: str) -> None:
    raw = json.dumps(claims_of(cred.token)).encode(encoding)
    rejects(jitbroker_broker, signed_raw_payload(jitbroker_broker, raw), MalformedToken)


@pytest.mark.parametrize(("opener", "closer"), [("[", "]"), ('{"":', "}")], ids=["list", "dict"])
def test_payload_deeply_nested(
    jitbroker_broker: Broker, cred: Credential, opener: str, closer: str
) -> None:
    depth = 2500 if opener == "[" else 1050  # far past the recursion limit
    raw = json.dumps(claims_of(cred.token), separators=(",", ":"))[:-1] + ',"x":'
    raw += opener * depth + "0"
    raw += closer * depth + "}"
    token = signed_raw_payload(jitbroker_broker, raw.encode())
    assert len(token) <= MAX_TOKEN_LENGTH
    rejects(jitbroker_broker, token, MalformedToken)


@pytest.mark.parametrize(
    "changes",
    [
        {"exp": 10**400},
        {"exp": 2**63},
        {"iat": -(10**400), "nbf": -(10**400)},
        {"iat": 0, "nbf": 0},
    ],
    ids=["exp-huge", "exp-2**63", "iat-huge-negative", "iat-epoch"],
)
def test_huge_lifetime_from_huge_integers(
    jitbroker_broker: Broker, cred: Credential, changes: dict[str, object]
) -> None:
    rejects(
        jitbroker_broker, resign(jitbroker_broker, with_claims(cred, **changes)), MalformedToken
    )


def test_integer_with_too_many_digits(jitbroker_broker: Broker, cred: Credential) -> None:
    raw = json.dumps(claims_of(cred.token))[:-1] + ', "x": ' + "9" * 5000 + "}"
    token = signed_raw_payload(jitbroker_broker, raw.encode())
    assert len(token) <= MAX_TOKEN_LENGTH
    rejects(jitbroker_broker, token, MalformedToken)


@pytest.mark.parametrize(
    ("sign_of", "expected"),
    [(1, TokenNotYetValid), (-1, TokenExpired)],
    ids=["far-future", "far-past"],
)
def test_huge_times_with_a_plausible_lifetime(
    jitbroker_broker: Broker, cred: Credential, sign_of: int, expected: type[InvalidToken]
) -> None:
    start = sign_of * 10**400
    token = resign(jitbroker_broker, with_claims(cred, iat=start, nbf=start, exp=start + TTL))
    with pytest.raises(InvalidToken) as info:
        jitbroker_broker.verify(token, audience=AUDIENCE)
    # Either the honest time error or a refusal of out-of-range NumericDates.
    assert type(info.value) in (expected, MalformedToken)


def test_offline_huge_negative_exp(
    jitbroker_broker: Broker, cred: Credential, offline: Verifier
) -> None:
    start = -(10**400)
    token = resign(jitbroker_broker, with_claims(cred, iat=start, nbf=start, exp=start + TTL))
    with pytest.raises(InvalidToken) as info:
        offline.verify(token, audience=AUDIENCE)
    assert type(info.value) in (TokenExpired, MalformedToken)


@pytest.mark.parametrize("name", ["iss", "sub", "aud", "exp", "iat", "nbf", "jti"])
def test_missing_required_claim(jitbroker_broker: Broker, cred: Credential, name: str) -> None:
    token = resign(jitbroker_broker, without_claim(cred, name))
    rejects(jitbroker_broker, token, MalformedToken)


@pytest.mark.parametrize("name", ["iss", "sub", "aud", "jti"])
def test_empty_required_claim(jitbroker_broker: Broker, cred: Credential, name: str) -> None:
    token = resign(jitbroker_broker, with_claims(cred, **{name: ""}))
    rejects(jitbroker_broker, token, MalformedToken)


WRONG_TYPES: list[tuple[str, object]] = [
    ("exp", 1_767_225_660.0),
    ("exp", 1_767_225_660.5),
    ("exp", True),
    ("exp", "1767225660"),
    ("exp", None),
    ("exp", [1_767_225_660]),
    ("iat", 1_767_225_600.0),
    ("iat", False),
    ("nbf", "1767225600"),
    ("aud", ["db:orders"]),
    ("aud", None),
    ("aud", {"db:orders": True}),
    ("sub", 42),
    ("iss", ["urn:jitbroker:test"]),
    ("jti", 12345),
    ("scope", ["orders:read"]),
    ("scope", 1),
    ("scope", None),
    ("scope", "orders:read  orders:write"),
    ("scope", " orders:read"),
    ("scope", "orders:read "),
    ("scope", " "),
    ("task", 42),
    ("owner", ["alice@example.com"]),
    ("purpose", {"why": "x"}),
    ("parent", True),
]


@pytest.mark.parametrize(("name", "value"), WRONG_TYPES, ids=[f"{n}={v!r}" for n, v in WRONG_TYPES])
def test_claim_of_wrong_type(
    jitbroker_broker: Broker, cred: Credential, name: str, value: object
) -> None:
    token = resign(jitbroker_broker, with_claims(cred, **{name: value}))
    rejects(jitbroker_broker, token, MalformedToken)


# -- time -------------------------------------------------------------------------
def test_expired_beyond_leeway(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock, cred: Credential
) -> None:
    exp = claims_of(cred.token)["exp"]
    jitbroker_clock.advance(TTL + LEEWAY)
    error = rejects(jitbroker_broker, cred.token, TokenExpired)
    assert error.expired_at == exp


def test_expired_lease_within_token_leeway(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock, cred: Credential
) -> None:
    # Online, the lease is the authority: its expiry has no leeway.
    jitbroker_clock.advance(TTL + 1)
    rejects(jitbroker_broker, cred.token, TokenExpired)


def test_expiry_within_leeway_is_accepted_offline(
    jitbroker_clock: FakeClock, cred: Credential, offline: Verifier
) -> None:
    jitbroker_clock.advance(TTL + LEEWAY - 1)
    assert accepts(offline, cred.token).lease_id == cred.lease_id
    jitbroker_clock.advance(1)
    rejects(offline, cred.token, TokenExpired)


def test_just_before_expiry_is_accepted_online(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock, cred: Credential
) -> None:
    jitbroker_clock.advance(TTL - 1)
    assert accepts(jitbroker_broker, cred.token)


@pytest.mark.parametrize("name", ["nbf", "iat"])
def test_not_yet_valid(jitbroker_broker: Broker, cred: Credential, name: str) -> None:
    future = claims_of(cred.token)[name] + LEEWAY + 1
    token = resign(jitbroker_broker, with_claims(cred, **{name: future}))
    rejects(jitbroker_broker, token, TokenNotYetValid)


@pytest.mark.parametrize("name", ["nbf", "iat"])
def test_not_yet_valid_within_leeway_is_accepted(
    jitbroker_broker: Broker, cred: Credential, name: str
) -> None:
    future = claims_of(cred.token)[name] + LEEWAY
    assert accepts(jitbroker_broker, resign(jitbroker_broker, with_claims(cred, **{name: future})))


def test_verifier_clock_behind_the_issuer(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock, cred: Credential
) -> None:
    jitbroker_clock.set(jitbroker_clock() - LEEWAY - 1)
    rejects(jitbroker_broker, cred.token, TokenNotYetValid)


def test_lifetime_beyond_max_ttl(jitbroker_broker: Broker, cred: Credential) -> None:
    iat = claims_of(cred.token)["iat"]
    token = resign(jitbroker_broker, with_claims(cred, exp=iat + 3600 + 2))
    rejects(jitbroker_broker, token, MalformedToken)


def test_lifetime_beyond_offline_max_ttl(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock
) -> None:
    strict = Verifier(
        jitbroker_broker.jwks(),
        issuer=TEST_ISSUER,
        offline=True,
        max_ttl=TTL,
        clock=jitbroker_clock,
    )
    assert accepts(strict, issue(jitbroker_broker, ttl=TTL).token)
    rejects(strict, issue(jitbroker_broker, ttl=TTL + 1).token, MalformedToken)


# -- issuer, audience, scope ----------------------------------------------------------
@pytest.mark.parametrize(
    "issuer",
    [
        TEST_ISSUER[:-1],  # prefix
        TEST_ISSUER + "x",  # suffix
        TEST_ISSUER + ":evil",
        "urn:jitbroker",
        "x" + TEST_ISSUER,
        TEST_ISSUER.upper(),
        " " + TEST_ISSUER,
        TEST_ISSUER + " ",
        TEST_ISSUER + "\x00",
        "urn:evil",
    ],
    ids=[
        "prefix", "suffix", "subpath", "parent", "leading-x", "upper", "leading-space",
        "trailing-space", "trailing-nul", "other",
    ],
)  # fmt: skip
def test_wrong_issuer(jitbroker_broker: Broker, cred: Credential, issuer: str) -> None:
    rejects(jitbroker_broker, resign(jitbroker_broker, with_claims(cred, iss=issuer)), WrongIssuer)


def test_issuer_sharing_the_key_ring(
    jitbroker_broker: Broker, jitbroker_keys: KeyRing, jitbroker_clock: FakeClock
) -> None:
    other = Broker(issuer=TEST_ISSUER + ":other", keys=jitbroker_keys, clock=jitbroker_clock)
    rejects(jitbroker_broker, issue(other).token, WrongIssuer)


@pytest.mark.parametrize(
    "audience", ["db:order", "db:orders2", "DB:ORDERS", "db:*", "*", " db:orders", "db:payments"]
)
def test_wrong_audience(jitbroker_broker: Broker, cred: Credential, audience: str) -> None:
    rejects(jitbroker_broker, cred.token, WrongAudience, audience=audience)


@pytest.mark.parametrize(
    ("required", "missing"),
    [
        (["orders:write"], ("orders:write",)),
        (["orders:read", "orders:write"], ("orders:write",)),
        (["orders:*"], ("orders:*",)),
        (["orders"], ("orders",)),
        ("orders:write orders:admin", ("orders:admin", "orders:write")),
    ],
)
def test_insufficient_scope(
    jitbroker_broker: Broker,
    cred: Credential,
    required: list[str] | str,
    missing: tuple[str, ...],
) -> None:
    error = rejects(jitbroker_broker, cred.token, InsufficientScope, scopes=required)
    assert error.missing == missing


# -- leases -------------------------------------------------------------------------
def test_revoked_lease(jitbroker_broker: Broker, cred: Credential) -> None:
    accepts(jitbroker_broker, cred.token)  # cached: the cache must not skip the lease check
    jitbroker_broker.revoke(cred, reason="done")
    error = rejects(jitbroker_broker, cred.token, TokenRevoked)
    assert (error.lease_id, error.reason) == (cred.lease_id, "done")


def test_revoked_parent_revokes_child(jitbroker_broker: Broker, cred: Credential) -> None:
    child = jitbroker_broker.attenuate(cred, scopes=SCOPES, ttl=30)
    jitbroker_broker.revoke(cred, reason="compromised")
    error = rejects(jitbroker_broker, child.token, TokenRevoked)
    assert (error.lease_id, error.reason) == (child.lease_id, "compromised")


def test_token_of_an_ended_task(jitbroker_broker: Broker) -> None:
    with jitbroker_broker.task("job-7", subject=SUBJECT, audience=AUDIENCE, scopes=SCOPES) as c:
        token = c.token
    assert rejects(jitbroker_broker, token, TokenRevoked).reason == "task-ended"


def test_offboarded_owner(jitbroker_broker: Broker, cred: Credential) -> None:
    jitbroker_broker.revoke_where(owner="alice@example.com", reason="offboarded")
    assert rejects(jitbroker_broker, cred.token, TokenRevoked).reason == "offboarded"


def test_unknown_lease(jitbroker_broker: Broker, cred: Credential) -> None:
    token = resign(jitbroker_broker, with_claims(cred, jti="f" * 32))
    assert rejects(jitbroker_broker, token, UnknownLease).lease_id == "f" * 32


def test_unknown_lease_never_issued_at_all(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock
) -> None:
    now = int(jitbroker_clock())
    claims = {
        "iss": TEST_ISSUER, "sub": SUBJECT, "aud": AUDIENCE, "iat": now, "nbf": now,
        "exp": now + TTL, "jti": "never-stored", "scope": "orders:read",
    }  # fmt: skip
    rejects(jitbroker_broker, resign(jitbroker_broker, claims), UnknownLease)


@pytest.mark.parametrize(
    "changes",
    [{"sub": "svc:other"}, {"aud": "db:payments"}, {"sub": "svc:other", "aud": "db:payments"}],
    ids=["subject", "audience", "both"],
)
def test_lease_of_another_subject(
    jitbroker_broker: Broker, cred: Credential, changes: dict[str, str]
) -> None:
    token = resign(jitbroker_broker, with_claims(cred, **changes))
    audience = changes.get("aud", AUDIENCE)
    error = rejects(jitbroker_broker, token, UnknownLease, audience=audience)
    assert error.lease_id == cred.lease_id


def test_token_claiming_more_scopes_than_its_lease(
    jitbroker_broker: Broker, cred: Credential
) -> None:
    token = resign(jitbroker_broker, with_claims(cred, scope="orders:read orders:admin"))
    with pytest.raises(InvalidToken) as info:
        jitbroker_broker.verify(token, audience=AUDIENCE, scopes=["orders:admin"])
    assert type(info.value) in (UnknownLease, InsufficientScope)


# -- ES256, RS256, HS256 ---------------------------------------------------------------
def _es256(r: int, s: int) -> bytes:
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@pytest.mark.parametrize(
    "make",
    [
        lambda r, s: _es256(0, 0),
        lambda r, s: _es256(0, s),
        lambda r, s: _es256(r, 0),
        lambda r, s: _es256(P256_ORDER, s),
        lambda r, s: _es256(r, P256_ORDER),
        lambda r, s: _es256(P256_ORDER, P256_ORDER),
        lambda r, s: _es256(2**256 - 1, s),
        lambda r, s: _es256(r, 2**256 - 1),
        lambda r, s: _es256(r, s)[:63],
        lambda r, s: _es256(r, s) + b"\x00",
        lambda r, s: encode_dss_signature(r, s),
    ],
    ids=[
        "r=s=0", "r=0", "s=0", "r=n", "s=n", "r=s=n", "r=2**256-1", "s=2**256-1", "63-bytes",
        "65-bytes", "der",
    ],
)  # fmt: skip
def test_es256_invalid_signature(
    jitbroker_clock: FakeClock, make: Callable[[int, int], bytes]
) -> None:
    broker = broker_with("ES256", jitbroker_clock)
    cred = issue(broker)
    raw = dec(segments(cred.token)[2])
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    rejects(broker, replace_signature(cred.token, make(r, s)), BadSignature)


def test_es256_psychic_signature_offline(jitbroker_clock: FakeClock) -> None:
    broker = broker_with("ES256", jitbroker_clock)
    offline = Verifier(broker.jwks(), issuer=TEST_ISSUER, offline=True, clock=jitbroker_clock)
    token = replace_signature(issue(broker).token, bytes(64))
    rejects(offline, token, BadSignature)


@pytest.fixture(scope="module")
def rsa_keys() -> KeyRing:
    return KeyRing.generate("RS256")  # generated once: RSA generation is slow


@pytest.mark.parametrize(
    "mangle",
    [
        lambda sig: sig[:-1],
        lambda sig: sig[1:],
        lambda sig: b"\x00" + sig,
        lambda sig: sig + b"\x00",
        lambda sig: bytes(len(sig)),
        lambda sig: sig + sig,
    ],
    ids=["255-bytes", "255-bytes-head-cut", "257-leading-zero", "257-trailing-zero", "zero",
         "doubled"],
)  # fmt: skip
def test_rs256_signature_of_wrong_length(
    rsa_keys: KeyRing, jitbroker_clock: FakeClock, mangle: Callable[[bytes], bytes]
) -> None:
    broker = Broker(issuer=TEST_ISSUER, keys=rsa_keys, clock=jitbroker_clock)
    cred = issue(broker)
    signature = dec(segments(cred.token)[2])
    assert len(signature) == 256
    rejects(broker, replace_signature(cred.token, mangle(signature)), BadSignature)


def test_hs256_forged_truncated_and_none(jitbroker_clock: FakeClock) -> None:
    broker = broker_with("HS256", jitbroker_clock)
    cred = issue(broker)
    key = broker.keys.active
    header, payload, _ = segments(cred.token)
    attacker = KeyRing.generate("HS256").active
    mac = dec(segments(cred.token)[2])
    rejects(broker, sign(attacker, header, payload), BadSignature)
    rejects(broker, replace_signature(cred.token, mac[:16]), BadSignature)
    rejects(broker, replace_signature(cred.token, mac + b"\x00"), BadSignature)
    none = enc(header_of(key, alg="none"))
    rejects(broker, f"{none}.{payload}.", MalformedToken)
    rejects(broker, sign(key, none, payload), MalformedToken)
    eddsa = enc(header_of(key, alg="EdDSA"))
    rejects(broker, sign(key, eddsa, payload), BadSignature)


# -- tokens that are not strings ----------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.encode("ascii"),
        lambda t: memoryview(t.encode("ascii")),
        lambda t: None,
        lambda t: 0,
        lambda t: 1.5,
        lambda t: True,
        lambda t: object(),
        lambda t: (t,),
    ],
    ids=["bytes", "memoryview", "none", "int", "float", "bool", "object", "tuple"],
)
def test_token_not_a_string(
    jitbroker_broker: Broker, cred: Credential, make: Callable[[str], object]
) -> None:
    rejects(jitbroker_broker, make(cred.token), MalformedToken)


@pytest.mark.parametrize("value", [[], {}, set(), bytearray(b"a.b.c")], ids=repr)
def test_unhashable_token(jitbroker_broker: Broker, value: object) -> None:
    rejects(jitbroker_broker, value, MalformedToken)


# -- opaque tokens ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "token",
    [
        "jbo_",
        "jbo_" + "0" * 63,
        "jbo_" + "0" * 65,
        "jbo_" + "A" * 64,
        "jbo_" + "g" * 64,
        "jbo_" + "0" * 63 + "\n",
        "jbo_" + "0" * 64 + "\n",
        "jbo_" + "0" * 64 + " ",
        "jbo_" + "0" * 63 + "\u0660",
        "jbo_" + "0" * 64 + ".x.y",
        "jbo_jbo_" + "0" * 60,
    ],
    ids=[
        "prefix-only", "short", "long", "uppercase-hex", "non-hex", "short-newline",
        "trailing-newline", "trailing-space", "arabic-zero", "dotted", "double-prefix",
    ],
)  # fmt: skip
def test_opaque_malformed(opaque_broker: Broker, token: str) -> None:
    rejects(opaque_broker, token, MalformedToken)


def test_opaque_unknown(opaque_broker: Broker) -> None:
    token = "jbo_" + "0" * 64
    assert rejects(opaque_broker, token, UnknownLease).lease_id == opaque_lease_id(token)


def test_opaque_revoked(opaque_broker: Broker) -> None:
    cred = issue(opaque_broker)
    assert accepts(opaque_broker, cred.token, scopes=SCOPES).lease_id == cred.lease_id
    opaque_broker.revoke(cred, reason="leaked")
    error = rejects(opaque_broker, cred.token, TokenRevoked)
    assert (error.lease_id, error.reason) == (cred.lease_id, "leaked")


def test_opaque_expired(opaque_broker: Broker, jitbroker_clock: FakeClock) -> None:
    cred = issue(opaque_broker)
    jitbroker_clock.advance(TTL)
    rejects(opaque_broker, cred.token, TokenExpired)


def test_opaque_wrong_audience_and_scope(opaque_broker: Broker) -> None:
    cred = issue(opaque_broker)
    rejects(opaque_broker, cred.token, WrongAudience, audience="db:payments")
    error = rejects(opaque_broker, cred.token, InsufficientScope, scopes=["orders:write"])
    assert error.missing == ("orders:write",)


def test_opaque_one_character_off(opaque_broker: Broker) -> None:
    cred = issue(opaque_broker)
    last = "1" if cred.token[-1] == "0" else "0"
    rejects(opaque_broker, cred.token[:-1] + last, UnknownLease)


def test_opaque_to_offline_verifier(opaque_broker: Broker, offline: Verifier) -> None:
    cred = issue(opaque_broker)
    rejects(offline, cred.token, UnknownLease)


# -- offline verification ----------------------------------------------------------------
def test_offline_control_and_forgeries(
    jitbroker_broker: Broker, cred: Credential, offline: Verifier
) -> None:
    assert accepts(offline, cred.token).lease_id == cred.lease_id
    attacker = KeyRing.generate("EdDSA").active
    payload = segments(cred.token)[1]
    rejects(offline, sign(attacker, jitbroker_broker.keys.active.header, payload), BadSignature)
    rejects(offline, sign(attacker, attacker.header, payload), UnknownKey)
    header, _, signature = segments(cred.token)
    tampered = f"{header}.{enc(with_claims(cred, scope='orders:admin'))}.{signature}"
    rejects(offline, tampered, BadSignature)
    wrong_iss = resign(jitbroker_broker, with_claims(cred, iss=TEST_ISSUER + "x"))
    rejects(offline, wrong_iss, WrongIssuer)
    rejects(offline, cred.token, WrongAudience, audience="db:payments")
