"""KeyRing and Key: generation, RFC 7638 key ids, JWKS, import/export, rotation."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import pickle
from collections.abc import Mapping
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from jitbroker import Broker, KeyRing, Verifier
from jitbroker.errors import InvalidRequest, UnknownKey
from jitbroker.keys import Key, thumbprint
from jitbroker.testing import TEST_ISSUER, FakeClock

ASYMMETRIC = ("EdDSA", "ES256", "RS256")
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "k"})

# RFC 7638 section 3.1: the example RSA key and its SHA-256 thumbprint.
RFC7638_JWK = {
    "kty": "RSA",
    "n": (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFF"
        "xuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lq"
        "t7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu"
        "6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksI"
        "NHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    ),
    "e": "AQAB",
}
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def rfc7638(jwk: Mapping[str, str]) -> str:
    """An independent RFC 7638 thumbprint: required members, sorted, no whitespace."""
    required = {
        "OKP": ("crv", "kty", "x"),
        "EC": ("crv", "kty", "x", "y"),
        "RSA": ("e", "kty", "n"),
        "oct": ("k", "kty"),
    }[jwk["kty"]]
    canonical = json.dumps({m: jwk[m] for m in required}, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@pytest.fixture(scope="module")
def rsa_ring() -> KeyRing:
    """One RS256 ring per module: RSA generation is slow. Tests must not mutate it."""
    return KeyRing.generate("RS256")


@pytest.fixture(scope="module")
def rings(rsa_ring: KeyRing) -> dict[str, KeyRing]:
    """One ring per algorithm, shared by the read-only tests of this module."""
    return {
        "EdDSA": KeyRing.generate("EdDSA"),
        "ES256": KeyRing.generate("ES256"),
        "RS256": rsa_ring,
        "HS256": KeyRing.generate("HS256"),
    }


def only_key(ring: KeyRing) -> Key:
    (key,) = list(ring)
    return key


def broker_on(ring: KeyRing, clock: FakeClock) -> Broker:
    return Broker(issuer=TEST_ISSUER, keys=ring, clock=clock)


# -- generation -----------------------------------------------------------
def test_generate_defaults_to_eddsa() -> None:
    ring = KeyRing.generate()
    assert len(ring) == 1
    assert ring.active.alg == "EdDSA"
    assert ring.active.private
    assert ring.active.to_jwk()["crv"] == "Ed25519"


@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "RS256", "HS256"])
def test_generate_each_algorithm(alg: str, rings: dict[str, KeyRing]) -> None:
    ring = rings[alg]
    key = ring.active
    assert key.alg == alg
    assert key.private
    assert key.symmetric == (alg == "HS256")
    assert key.kid in ring
    assert ring.get(key.kid) is key


def test_generate_es256_is_p256(rings: dict[str, KeyRing]) -> None:
    jwk = rings["ES256"].active.to_jwk()
    assert jwk["kty"] == "EC"
    assert jwk["crv"] == "P-256"
    # Fixed-length coordinates (RFC 7518 section 6.2.1.2).
    assert len(base64.urlsafe_b64decode(jwk["x"] + "=")) == 32
    assert len(base64.urlsafe_b64decode(jwk["y"] + "=")) == 32


def test_generate_rs256_is_2048_bits(rsa_ring: KeyRing) -> None:
    pem = rsa_ring.active.to_pem()
    material = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(material, rsa.RSAPrivateKey)
    assert material.key_size == 2048
    assert rsa_ring.active.to_jwk()["e"] == "AQAB"


def test_generate_hs256_is_a_32_byte_secret(rings: dict[str, KeyRing]) -> None:
    jwk = rings["HS256"].active.to_jwk(private=True)
    assert jwk["kty"] == "oct"
    assert len(base64.urlsafe_b64decode(jwk["k"] + "=")) == 32


def test_generate_makes_fresh_keys() -> None:
    assert KeyRing.generate().active.kid != KeyRing.generate().active.kid


@pytest.mark.parametrize("alg", ["none", "HS512", "RS512", "ES384", "eddsa", "", "PS256"])
def test_generate_unsupported_algorithm(alg: str) -> None:
    with pytest.raises(InvalidRequest, match="unsupported algorithm"):
        KeyRing.generate(alg)


# -- key ids: RFC 7638 thumbprints ------------------------------------------
def test_thumbprint_rfc7638_example_vector() -> None:
    assert thumbprint(RFC7638_JWK) == RFC7638_THUMBPRINT
    assert rfc7638(RFC7638_JWK) == RFC7638_THUMBPRINT


def test_rfc7638_example_key_gets_its_thumbprint_as_kid() -> None:
    ring = KeyRing.from_jwk({**RFC7638_JWK, "alg": "RS256"})
    key = only_key(ring)
    assert key.kid == RFC7638_THUMBPRINT
    assert key.alg == "RS256"
    assert not key.private
    # Non-required members (alg, kid, use) do not change the thumbprint.
    assert thumbprint({**RFC7638_JWK, "alg": "RS256", "use": "sig"}) == RFC7638_THUMBPRINT


def test_rfc7638_example_with_its_own_kid_is_refused() -> None:
    # The RFC's example carries kid "2011-04-29": not a thumbprint, so not ours.
    with pytest.raises(InvalidRequest, match="thumbprint"):
        KeyRing.from_jwk({**RFC7638_JWK, "kid": "2011-04-29"})


@pytest.mark.parametrize("alg", ASYMMETRIC)
def test_kid_is_thumbprint_of_public_jwk(alg: str, rings: dict[str, KeyRing]) -> None:
    key = rings[alg].active
    jwk = key.to_jwk()
    assert key.kid == jwk["kid"] == rfc7638(jwk)


def test_hmac_kid_is_thumbprint_of_oct_jwk(rings: dict[str, KeyRing]) -> None:
    key = rings["HS256"].active
    assert key.kid == rfc7638(key.to_jwk(private=True))


# -- the public JWKS ----------------------------------------------------------
def test_jwks_has_only_public_members(rings: dict[str, KeyRing]) -> None:
    ring = KeyRing([rings[alg].active for alg in ASYMMETRIC])
    jwks = ring.jwks()
    assert set(jwks) == {"keys"}
    assert len(jwks["keys"]) == 3
    by_alg = {jwk["alg"]: jwk for jwk in jwks["keys"]}
    assert set(by_alg) == set(ASYMMETRIC)
    for alg, jwk in by_alg.items():
        assert not PRIVATE_MEMBERS & set(jwk), alg
        assert jwk["use"] == "sig"
        assert jwk["kid"] == rings[alg].active.kid
    assert by_alg["EdDSA"].keys() == {"kty", "crv", "x", "kid", "alg", "use"}
    assert by_alg["ES256"].keys() == {"kty", "crv", "x", "y", "kid", "alg", "use"}
    assert by_alg["RS256"].keys() == {"kty", "n", "e", "kid", "alg", "use"}


def test_jwks_never_contains_hmac_keys(rings: dict[str, KeyRing]) -> None:
    assert rings["HS256"].jwks() == {"keys": []}
    broker = Broker(issuer=TEST_ISSUER, keys=rings["HS256"])
    assert broker.jwks() == {"keys": []}


def test_hmac_key_has_no_public_form(rings: dict[str, KeyRing]) -> None:
    key = rings["HS256"].active
    assert key.public_jwk() is None
    with pytest.raises(InvalidRequest):
        key.to_jwk()
    with pytest.raises(InvalidRequest):
        key.to_pem()


def test_jwks_is_json_serializable(rings: dict[str, KeyRing]) -> None:
    jwks = rings["RS256"].jwks()
    assert json.loads(json.dumps(jwks)) == jwks


# -- PEM round trips ------------------------------------------------------------
@pytest.mark.parametrize("alg", ASYMMETRIC)
def test_pem_round_trip(alg: str, rings: dict[str, KeyRing]) -> None:
    key = rings[alg].active
    pem = key.to_pem()
    assert b"BEGIN PRIVATE KEY" in pem
    loaded = KeyRing.from_pem(pem)
    assert loaded.active.kid == key.kid
    assert loaded.active.alg == alg
    assert key.verify(loaded.active.sign(b"data"), b"data")
    # str input works too.
    assert KeyRing.from_pem(pem.decode("ascii")).active.kid == key.kid


@pytest.mark.parametrize("alg", ASYMMETRIC)
def test_encrypted_pem_round_trip(alg: str, rings: dict[str, KeyRing]) -> None:
    key = rings[alg].active
    pem = key.to_pem(password=b"correct horse")
    assert b"ENCRYPTED PRIVATE KEY" in pem
    assert KeyRing.from_pem(pem, password=b"correct horse").active.kid == key.kid


@pytest.mark.parametrize("password", [b"wrong", None])
def test_encrypted_pem_wrong_or_missing_password(password: bytes | None) -> None:
    pem = KeyRing.generate("ES256").active.to_pem(password=b"correct horse")
    with pytest.raises(InvalidRequest, match="password"):
        KeyRing.from_pem(pem, password=password)


def test_wrong_password_error_does_not_quote_the_key() -> None:
    pem = KeyRing.generate().active.to_pem(password=b"correct horse")
    with pytest.raises(InvalidRequest) as info:
        KeyRing.from_pem(pem, password=b"wrong")
    assert "correct horse" not in str(info.value)
    assert "BEGIN" not in str(info.value)


def test_garbage_pem_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        KeyRing.from_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(InvalidRequest):
        KeyRing.from_pem("not a pem at all")


@pytest.mark.parametrize("alg", ASYMMETRIC)
def test_public_pem_gives_verify_only_ring(alg: str, rings: dict[str, KeyRing]) -> None:
    key = rings[alg].active
    pem = key.public().to_pem()
    assert b"BEGIN PUBLIC KEY" in pem
    ring = KeyRing.from_pem(pem)
    public = only_key(ring)
    assert public.kid == key.kid
    assert not public.private
    assert public.verify(key.sign(b"data"), b"data")
    with pytest.raises(InvalidRequest, match="cannot sign"):
        ring.active  # noqa: B018


# -- JWK round trips ------------------------------------------------------------
@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "RS256", "HS256"])
def test_private_jwk_round_trip(alg: str, rings: dict[str, KeyRing]) -> None:
    key = rings[alg].active
    jwk = key.to_jwk(private=True)
    assert jwk["kid"] == key.kid
    assert jwk["alg"] == alg
    assert "d" in jwk or "k" in jwk
    ring = KeyRing.from_jwk(jwk)
    assert ring.active.kid == key.kid
    assert ring.active.alg == alg
    assert key.verify(ring.active.sign(b"data"), b"data")
    assert ring.active.to_jwk(private=True) == jwk


@pytest.mark.parametrize("alg", ASYMMETRIC)
def test_public_jwk_gives_verify_only_ring(alg: str, rings: dict[str, KeyRing]) -> None:
    key = rings[alg].active
    ring = KeyRing.from_jwk(key.to_jwk())
    public = only_key(ring)
    assert public.kid == key.kid
    assert not public.private
    assert public.verify(key.sign(b"data"), b"data")
    assert not public.verify(key.sign(b"data"), b"other data")
    with pytest.raises(InvalidRequest, match="cannot sign"):
        ring.active  # noqa: B018


def test_public_key_cannot_export_private_jwk(rings: dict[str, KeyRing]) -> None:
    public = rings["EdDSA"].active.public()
    with pytest.raises(InvalidRequest):
        public.to_jwk(private=True)


@pytest.mark.parametrize("alg", ASYMMETRIC)
def test_from_jwks_round_trip(alg: str, rings: dict[str, KeyRing]) -> None:
    ring = KeyRing.from_jwks(rings[alg].jwks())
    public = only_key(ring)
    assert public.kid == rings[alg].active.kid
    assert not public.private
    with pytest.raises(InvalidRequest):
        ring.active  # noqa: B018


def test_from_jwks_many_keys(rings: dict[str, KeyRing]) -> None:
    source = KeyRing([rings[alg].active for alg in ASYMMETRIC])
    ring = KeyRing.from_jwks(source.jwks())
    assert {k.kid for k in ring} == {k.kid for k in source}


@pytest.mark.parametrize("jwks", [{}, {"keys": {}}, {"keys": "x"}, []])
def test_from_jwks_needs_a_keys_list(jwks: Any) -> None:
    with pytest.raises(InvalidRequest, match="keys"):
        KeyRing.from_jwks(jwks)


def test_from_jwk_needs_an_object() -> None:
    with pytest.raises(InvalidRequest):
        KeyRing.from_jwk(["kty", "RSA"])  # type: ignore[arg-type]


# -- tokens across rings and verifiers --------------------------------------------
@pytest.mark.parametrize("alg", ASYMMETRIC)
def test_token_verifies_offline_from_broker_jwks(
    alg: str, rings: dict[str, KeyRing], jitbroker_clock: FakeClock
) -> None:
    broker = broker_on(rings[alg], jitbroker_clock)
    cred = broker.issue("svc:ci", "db:orders", ["orders:read"], ttl=60)
    verifier = Verifier(broker.jwks(), issuer=TEST_ISSUER, offline=True, clock=jitbroker_clock)
    claims = verifier.verify(cred.token, audience="db:orders", scopes=["orders:read"])
    assert claims.lease_id == cred.lease_id
    assert claims.key_id == rings[alg].active.kid
    assert claims.subject == "svc:ci"


@pytest.mark.parametrize("alg", ASYMMETRIC)
def test_token_verifies_with_pyjwt_and_the_jwk(
    alg: str, rings: dict[str, KeyRing], jitbroker_clock: FakeClock
) -> None:
    # An independent decoder accepts our signatures: they are standard JWS.
    broker = broker_on(rings[alg], jitbroker_clock)
    cred = broker.issue("svc:ci", "db:orders", ["orders:read"], ttl=60)
    (jwk,) = broker.jwks()["keys"]
    header = jwt.get_unverified_header(cred.token)
    assert header == {"alg": alg, "typ": "at+jwt", "kid": jwk["kid"]}
    payload = jwt.decode(
        cred.token,
        jwt.PyJWK(jwk).key,
        algorithms=[alg],
        audience="db:orders",
        issuer=TEST_ISSUER,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert payload["jti"] == cred.lease_id


def test_token_from_another_ring_is_unknown_key(
    rings: dict[str, KeyRing], jitbroker_clock: FakeClock
) -> None:
    broker = broker_on(rings["EdDSA"], jitbroker_clock)
    cred = broker.issue("svc:ci", "db:orders", ttl=60)
    other = KeyRing.generate("EdDSA").jwks()
    verifier = Verifier(other, issuer=TEST_ISSUER, offline=True, clock=jitbroker_clock)
    with pytest.raises(UnknownKey):
        verifier.verify(cred.token, audience="db:orders")


def test_hmac_token_verifies_with_the_issuers_ring(
    rings: dict[str, KeyRing], jitbroker_clock: FakeClock
) -> None:
    broker = broker_on(rings["HS256"], jitbroker_clock)
    cred = broker.issue("svc:ci", "db:orders", ttl=60)
    assert broker.verify(cred.token, audience="db:orders").lease_id == cred.lease_id
    verifier = Verifier(rings["HS256"], issuer=TEST_ISSUER, offline=True, clock=jitbroker_clock)
    assert verifier.verify(cred.token, audience="db:orders").lease_id == cred.lease_id


# -- weak or wrong key material ------------------------------------------------------
def test_short_hmac_secret_refused() -> None:
    with pytest.raises(InvalidRequest, match="at least 32 bytes"):
        KeyRing.from_jwk({"kty": "oct", "k": b64url(b"x" * 31)})


def test_32_byte_hmac_secret_accepted() -> None:
    ring = KeyRing.from_jwk({"kty": "oct", "k": b64url(b"x" * 32)})
    assert ring.active.alg == "HS256"


def test_rsa_1024_refused() -> None:
    weak = rsa.generate_private_key(65537, 1024)  # noqa: S505 - weak on purpose
    pem = weak.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(InvalidRequest, match="2048"):
        KeyRing.from_pem(pem)
    public_pem = weak.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(InvalidRequest, match="2048"):
        KeyRing.from_pem(public_pem)
    nums = weak.public_key().public_numbers()
    jwk = {
        "kty": "RSA",
        "n": b64url(nums.n.to_bytes(128, "big")),
        "e": b64url(nums.e.to_bytes(3, "big")),
    }
    with pytest.raises(InvalidRequest, match="2048"):
        KeyRing.from_jwk(jwk)


@pytest.mark.parametrize("curve", [ec.SECP384R1(), ec.SECP256K1()], ids=["P-384", "secp256k1"])
def test_ec_on_other_curves_refused(curve: ec.EllipticCurve) -> None:
    private = ec.generate_private_key(curve)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(InvalidRequest, match="P-256"):
        KeyRing.from_pem(pem)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(InvalidRequest, match="P-256"):
        KeyRing.from_pem(public_pem)


@pytest.mark.parametrize("crv", ["P-384", "secp256k1", "P-521", None])
def test_ec_jwk_on_other_curves_refused(crv: str | None, rings: dict[str, KeyRing]) -> None:
    jwk: dict[str, Any] = {**rings["ES256"].active.to_jwk(), "crv": crv}
    del jwk["kid"]
    with pytest.raises(InvalidRequest, match="P-256"):
        KeyRing.from_jwk(jwk)


@pytest.mark.parametrize("alg", ["ES256", "RS256", "HS256", "none", "EdDSA25519"])
def test_jwk_with_mismatching_alg_refused(alg: str, rings: dict[str, KeyRing]) -> None:
    jwk = {**rings["EdDSA"].active.to_jwk(), "alg": alg}
    with pytest.raises(InvalidRequest, match="alg"):
        KeyRing.from_jwk(jwk)


def test_jwk_with_mismatching_kid_refused(rings: dict[str, KeyRing]) -> None:
    other = rings["ES256"].active.kid
    for alg in ("EdDSA", "RS256", "HS256"):
        jwk = {**rings[alg].active.to_jwk(private=True), "kid": other}
        with pytest.raises(InvalidRequest, match="kid"):
            KeyRing.from_jwk(jwk)
    with pytest.raises(InvalidRequest, match="kid"):
        KeyRing.from_jwk({**rings["EdDSA"].active.to_jwk(), "kid": "my-key"})


@pytest.mark.parametrize("kty", ["EC2", "rsa", "oct2", "", None, 1])
def test_jwk_with_unknown_kty_refused(kty: object) -> None:
    with pytest.raises(InvalidRequest, match="kty"):
        KeyRing.from_jwk({"kty": kty, "n": RFC7638_JWK["n"], "e": "AQAB"})


def test_jwk_without_kty_refused() -> None:
    with pytest.raises(InvalidRequest, match="kty"):
        KeyRing.from_jwk({"n": RFC7638_JWK["n"], "e": "AQAB"})


@pytest.mark.parametrize("kty", [["RSA"], {"RSA": 1}])
def test_jwk_with_unhashable_kty_refused(kty: object) -> None:
    with pytest.raises(InvalidRequest, match="kty"):
        KeyRing.from_jwk({"kty": kty, "n": RFC7638_JWK["n"], "e": "AQAB"})


@pytest.mark.parametrize("crv", ["X25519", "Ed448", "P-256", None])
def test_okp_jwk_with_wrong_crv_refused(crv: str | None, rings: dict[str, KeyRing]) -> None:
    jwk: dict[str, Any] = {**rings["EdDSA"].active.to_jwk(), "crv": crv}
    del jwk["kid"]
    with pytest.raises(InvalidRequest, match="Ed25519"):
        KeyRing.from_jwk(jwk)


def test_okp_jwk_with_x_not_matching_d_refused() -> None:
    one = KeyRing.generate().active.to_jwk(private=True)
    two = KeyRing.generate().active.to_jwk(private=True)
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": one["x"], "d": two["d"]}
    with pytest.raises(InvalidRequest):
        KeyRing.from_jwk(jwk)


def test_ec_jwk_with_point_not_matching_d_refused() -> None:
    one = KeyRing.generate("ES256").active.to_jwk(private=True)
    two = KeyRing.generate("ES256").active.to_jwk(private=True)
    jwk = {"kty": "EC", "crv": "P-256", "x": one["x"], "y": one["y"], "d": two["d"]}
    with pytest.raises(InvalidRequest):
        KeyRing.from_jwk(jwk)


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "OKP", "crv": "Ed25519", "x": b64url(b"\x01" * 31)},  # wrong length
        {"kty": "EC", "crv": "P-256", "x": b64url(b"\x01" * 32), "y": b64url(b"\x02" * 32)},
        {"kty": "RSA", "n": 12345, "e": "AQAB"},
        {"kty": "oct", "k": ""},
        {"kty": "OKP", "crv": "Ed25519"},
    ],
    ids=["okp-short-x", "ec-off-curve", "rsa-int-n", "oct-empty-k", "okp-no-x"],
)
def test_jwk_with_bad_material_refused(jwk: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        KeyRing.from_jwk(jwk)


@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "RS256"])
def test_jwks_with_a_private_key_refused(alg: str, rings: dict[str, KeyRing]) -> None:
    public = KeyRing.generate("EdDSA").jwks()["keys"]
    private = rings[alg].active.to_jwk(private=True)
    with pytest.raises(InvalidRequest, match="private"):
        KeyRing.from_jwks({"keys": [*public, private]})


def test_jwks_with_an_hmac_secret_refused(rings: dict[str, KeyRing]) -> None:
    secret = rings["HS256"].active.to_jwk(private=True)
    try:
        ring = KeyRing.from_jwks({"keys": [secret]})
    except InvalidRequest:
        return
    with pytest.raises(InvalidRequest):
        ring.active  # noqa: B018


def test_duplicate_kid_in_one_ring_refused(rings: dict[str, KeyRing]) -> None:
    key = rings["EdDSA"].active
    with pytest.raises(InvalidRequest, match="already holds"):
        KeyRing([key, key])
    ring = KeyRing([key])
    with pytest.raises(InvalidRequest, match="already holds"):
        ring.add(key)
    # The same key in public form has the same kid: also a duplicate.
    with pytest.raises(InvalidRequest, match="already holds"):
        ring.add(key.public())
    assert len(ring) == 1


def test_hmac_and_asymmetric_keys_cannot_share_a_ring(rings: dict[str, KeyRing]) -> None:
    with pytest.raises(InvalidRequest, match="HMAC"):
        KeyRing([rings["EdDSA"].active, rings["HS256"].active])
    with pytest.raises(InvalidRequest, match="HMAC"):
        KeyRing([rings["HS256"].active, rings["RS256"].active])
    ring = KeyRing([rings["ES256"].active])
    with pytest.raises(InvalidRequest, match="HMAC"):
        ring.add(rings["HS256"].active)
    assert len(ring) == 1


def test_asymmetric_algorithms_can_share_a_ring(rings: dict[str, KeyRing]) -> None:
    ring = KeyRing([rings[alg].active for alg in ASYMMETRIC])
    assert len(ring) == 3
    assert ring.active.alg == "EdDSA"  # the first private key signs


# -- rotation and retirement ----------------------------------------------------------
@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "HS256"])
def test_rotate_keeps_old_tokens_verifying(alg: str, jitbroker_clock: FakeClock) -> None:
    broker = broker_on(KeyRing.generate(alg), jitbroker_clock)
    old_kid = broker.keys.active.kid
    old = broker.issue("svc:ci", "db:orders", ttl=60)
    new_key = broker.keys.rotate()
    assert new_key.alg == alg
    assert broker.keys.active is new_key
    assert new_key.kid != old_kid
    assert old_kid in broker.keys
    new = broker.issue("svc:ci", "db:orders", ttl=60)
    assert new.lease.key_id == new_key.kid
    assert broker.verify(old.token, audience="db:orders").key_id == old_kid
    assert broker.verify(new.token, audience="db:orders").key_id == new_key.kid


def test_rotate_publishes_both_keys(jitbroker_clock: FakeClock) -> None:
    broker = broker_on(KeyRing.generate(), jitbroker_clock)
    old = broker.issue("svc:ci", "db:orders", ttl=60)
    broker.keys.rotate()
    verifier = Verifier(broker.jwks(), issuer=TEST_ISSUER, offline=True, clock=jitbroker_clock)
    assert len(broker.jwks()["keys"]) == 2
    assert verifier.verify(old.token, audience="db:orders").lease_id == old.lease_id


def test_rotate_on_verify_only_ring_refused(rings: dict[str, KeyRing]) -> None:
    ring = KeyRing.from_jwks(rings["EdDSA"].jwks())
    with pytest.raises(InvalidRequest):
        ring.rotate()


def test_retire_makes_tokens_of_that_kid_unknown(jitbroker_clock: FakeClock) -> None:
    broker = broker_on(KeyRing.generate(), jitbroker_clock)
    old_kid = broker.keys.active.kid
    old = broker.issue("svc:ci", "db:orders", ttl=60)
    broker.keys.rotate()
    broker.keys.retire(old_kid)
    assert old_kid not in broker.keys
    assert all(jwk["kid"] != old_kid for jwk in broker.jwks()["keys"])
    with pytest.raises(UnknownKey):
        broker.verify(old.token, audience="db:orders")


def test_retire_also_defeats_the_verified_token_cache(jitbroker_clock: FakeClock) -> None:
    broker = broker_on(KeyRing.generate(), jitbroker_clock)
    old_kid = broker.keys.active.kid
    old = broker.issue("svc:ci", "db:orders", ttl=60)
    assert broker.verify(old.token, audience="db:orders").lease_id == old.lease_id  # cached
    broker.keys.rotate()
    assert broker.verify(old.token, audience="db:orders").lease_id == old.lease_id
    broker.keys.retire(old_kid)
    with pytest.raises(UnknownKey):
        broker.verify(old.token, audience="db:orders")
    with pytest.raises(UnknownKey):  # and stays refused
        broker.verify(old.token, audience="db:orders")


def test_retire_in_an_offline_verifier_defeats_its_cache(jitbroker_clock: FakeClock) -> None:
    broker = broker_on(KeyRing.generate(), jitbroker_clock)
    old_kid = broker.keys.active.kid
    old = broker.issue("svc:ci", "db:orders", ttl=60)
    broker.keys.rotate()
    verifier = Verifier(broker.jwks(), issuer=TEST_ISSUER, offline=True, clock=jitbroker_clock)
    verifier.verify(old.token, audience="db:orders")
    verifier.keys.retire(old_kid)
    with pytest.raises(UnknownKey):
        verifier.verify(old.token, audience="db:orders")


def test_retire_of_the_active_key_refused() -> None:
    ring = KeyRing.generate()
    kid = ring.active.kid
    with pytest.raises(InvalidRequest, match="active"):
        ring.retire(kid)
    assert kid in ring
    assert ring.active.kid == kid


def test_retire_unknown_kid_refused() -> None:
    with pytest.raises(InvalidRequest):
        KeyRing.generate().retire("no-such-kid")


def test_activate_a_public_key_refused(rings: dict[str, KeyRing]) -> None:
    public = rings["EdDSA"].active.public()
    ring = KeyRing([public])
    with pytest.raises(InvalidRequest, match="cannot sign"):
        ring.activate(public.kid)


# -- secrets stay secret --------------------------------------------------------------
@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "RS256", "HS256"])
def test_keys_and_rings_are_not_picklable(alg: str, rings: dict[str, KeyRing]) -> None:
    ring = rings[alg]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError):
            pickle.dumps(ring.active, protocol=protocol)
        with pytest.raises(TypeError):
            pickle.dumps(ring, protocol=protocol)
    with pytest.raises(TypeError):
        copy.deepcopy(ring.active)


@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "RS256", "HS256"])
def test_repr_shows_no_secret(alg: str, rings: dict[str, KeyRing]) -> None:
    ring = rings[alg]
    private = ring.active.to_jwk(private=True)
    secret = private.get("d") or private["k"]
    assert secret not in repr(ring.active)
    assert secret not in repr(ring)
    assert ring.active.kid in repr(ring)


@pytest.mark.parametrize("alg", ASYMMETRIC)
def test_public_key_cannot_sign(alg: str, rings: dict[str, KeyRing]) -> None:
    public = rings[alg].active.public()
    assert not public.private
    with pytest.raises(InvalidRequest, match="cannot sign"):
        public.sign(b"data")
    loaded = only_key(KeyRing.from_jwk(rings[alg].active.to_jwk()))
    with pytest.raises(InvalidRequest, match="cannot sign"):
        loaded.sign(b"data")


@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "RS256", "HS256"])
def test_sign_and_verify(alg: str, rings: dict[str, KeyRing]) -> None:
    key = rings[alg].active
    signature = key.sign(b"payload")
    assert key.verify(signature, b"payload")
    assert not key.verify(signature, b"payload!")
    assert not key.verify(b"\x00" * len(signature), b"payload")
    assert not key.verify(b"", b"payload")


def test_es256_rejects_zero_signature(rings: dict[str, KeyRing]) -> None:
    # CVE-2022-21449 ("psychic signatures"): r = s = 0 must never verify.
    assert not rings["ES256"].active.verify(b"\x00" * 64, b"anything")
