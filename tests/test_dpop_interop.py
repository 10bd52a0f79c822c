"""DPoP proofs signed by other libraries verify (issue 10).

A proof is signed by the client's JOSE library, not by jitbroker, so the
verifier must accept every valid encoding those libraries produce. The one
that bit: an ES256 signature has two valid S values, s and n - s. jitbroker
signs its own tokens with the low one and refuses the high one in tokens;
PyJWT and joserfc emit either, at random, so half their proofs were refused.
Proofs now take both, and the replay cache, keyed on the proof's ``jti``,
still refuses the twin of a used proof.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey, OKPKey, RSAKey

from jitbroker import Broker, KeyRing
from jitbroker.dpop import _ALGS, ProofChecker, make_proof, token_hash
from jitbroker.errors import BadSignature, ProofReplayed
from jitbroker.jwk import b64url
from jitbroker.keys import Key, key_from_material
from jitbroker.testing import TEST_ISSUER, FakeClock
from jitbroker.tokens import b64decode

URL = "https://api.example.com/orders"
COUNT = 1_000  # proofs per library and algorithm
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
ALGS = ("EdDSA", "ES256", "RS256")

# joserfc warns on every EdDSA signature (RFC 9864 deprecates the name in favour
# of "Ed25519"); clients still send "EdDSA", the one name jitbroker accepts.
pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated:joserfc.errors.SecurityWarning")

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class Holder(NamedTuple):
    """A client's key, as each library holds it."""

    alg: str
    private: PrivateKey  # for PyJWT
    jose: ECKey | OKPKey | RSAKey  # for joserfc
    key: Key  # the public key, for jitbroker to bind tokens to
    jwk: dict[str, str]  # the public JWK a client puts in the proof header


def _holder(alg: str) -> Holder:
    private: PrivateKey
    jose: ECKey | OKPKey | RSAKey
    if alg == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
        jose = OKPKey.import_key(private)
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
        jose = ECKey.import_key(private)
    else:
        private = rsa.generate_private_key(65537, 2048)
        jose = RSAKey.import_key(private)
    key = key_from_material(private.public_key())
    jwk = {k: v for k, v in (key.public_jwk() or {}).items() if k not in ("kid", "alg", "use")}
    return Holder(alg, private, jose, key, jwk)


@pytest.fixture(scope="module")
def holders() -> dict[str, Holder]:
    return {alg: _holder(alg) for alg in ALGS}  # an RSA key takes a while: once per module


def pyjwt_proof(holder: Holder, claims: dict[str, Any]) -> str:
    headers = {"typ": "dpop+jwt", "jwk": holder.jwk}
    return jwt.encode(claims, holder.private, algorithm=holder.alg, headers=headers)


def joserfc_proof(holder: Holder, claims: dict[str, Any]) -> str:
    header = {"typ": "dpop+jwt", "alg": holder.alg, "jwk": holder.jwk}
    # EdDSA must be allowed by name: joserfc no longer recommends it (RFC 9864).
    return jose_jwt.encode(header, claims, holder.jose, algorithms=[holder.alg])


SIGNERS: dict[str, Callable[[Holder, dict[str, Any]], str]] = {
    "pyjwt": pyjwt_proof,
    "joserfc": joserfc_proof,
}


def proof_claims(jti: str, token: str, iat: int) -> dict[str, Any]:
    return {"jti": jti, "htm": "GET", "htu": URL, "iat": iat, "ath": token_hash(token)}


def high_s(proof: str) -> bool:
    return int.from_bytes(b64decode(proof.rsplit(".", 1)[1])[32:], "big") > P256_N // 2


def other_s(signature: bytes) -> bytes:
    """The other valid encoding of an ES256 signature: (r, n - s) for (r, s)."""
    s = int.from_bytes(signature[32:], "big")
    return signature[:32] + (P256_N - s).to_bytes(32, "big")


def s_twin(jws: str) -> str:
    """The same ES256 proof or token with the other valid S: same bytes signed."""
    signing_input, signature = jws.rsplit(".", 1)
    return f"{signing_input}.{b64url(other_s(b64decode(signature)))}"


def test_every_proof_algorithm_is_covered_here() -> None:
    # A new proof algorithm needs its interop proofs below before it ships.
    assert set(ALGS) == _ALGS


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("library", sorted(SIGNERS))
def test_proofs_from_standard_signers_all_verify(
    jitbroker_broker: Broker,
    jitbroker_clock: FakeClock,
    holders: dict[str, Holder],
    library: str,
    alg: str,
) -> None:
    holder, sign = holders[alg], SIGNERS[library]
    cred = jitbroker_broker.issue("svc:a", "api", ttl=600, holder_key=holder.key)
    jkt = cred.lease.holder
    assert jkt is not None
    checker = ProofChecker(clock=jitbroker_clock)
    now = int(jitbroker_clock())
    high = 0
    for i in range(COUNT):
        # One token, many requests: a fresh jti each, iat anywhere in the last minute.
        proof = sign(holder, proof_claims(f"{library}-{i}", cred.token, now - i % 60))
        checker.check(proof, method="GET", url=URL, token=cred.token, jkt=jkt)
        high += alg == "ES256" and high_s(proof)
    if alg == "ES256":  # both encodings came up, so both were accepted
        assert 0 < high < COUNT


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("library", sorted(SIGNERS))
def test_a_bound_token_verifies_with_their_proofs(
    jitbroker_broker: Broker,
    jitbroker_clock: FakeClock,
    holders: dict[str, Holder],
    library: str,
    alg: str,
) -> None:
    holder, sign = holders[alg], SIGNERS[library]
    cred = jitbroker_broker.issue("svc:a", "api", ttl=600, holder_key=holder.key)
    now = int(jitbroker_clock())
    for i in range(20):  # the whole path: token checks, then the proof
        proof = sign(holder, proof_claims(f"{library}-{i}", cred.token, now))
        claims = jitbroker_broker.verify(
            cred.token, audience="api", proof=proof, method="GET", url=URL
        )
        assert claims.holder == holder.key.kid


def es256_proof(jitbroker_broker: Broker, jitbroker_clock: FakeClock) -> tuple[str, str, str]:
    """A bound token, its jkt, and a low-S proof for it (jitbroker signs with low S)."""
    client = key_from_material(ec.generate_private_key(ec.SECP256R1()))
    cred = jitbroker_broker.issue("svc:a", "api", ttl=600, holder_key=client.public())
    proof = make_proof(client, "GET", URL, token=cred.token, now=jitbroker_clock())
    assert not high_s(proof)
    return cred.token, client.kid, proof


def test_the_high_s_twin_of_a_proof_verifies_once(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock
) -> None:
    token, jkt, proof = es256_proof(jitbroker_broker, jitbroker_clock)
    checker = ProofChecker(clock=jitbroker_clock)
    twin = s_twin(proof)
    assert high_s(twin)
    checker.check(twin, method="GET", url=URL, token=token, jkt=jkt)
    for again in (twin, proof):  # the jti is spent, whatever the S
        with pytest.raises(ProofReplayed):
            checker.check(again, method="GET", url=URL, token=token, jkt=jkt)


def test_the_twin_of_a_used_proof_is_a_replay(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock
) -> None:
    token, _, proof = es256_proof(jitbroker_broker, jitbroker_clock)
    request = {"audience": "api", "method": "GET", "url": URL}
    jitbroker_broker.verify(token, proof=proof, **request)
    with pytest.raises(ProofReplayed):
        jitbroker_broker.verify(token, proof=s_twin(proof), **request)


def test_tokens_still_refuse_the_high_s_twin(jitbroker_clock: FakeClock) -> None:
    # Unchanged for what jitbroker signs: a token has one encoding, since its
    # bytes are keyed on (the verify cache, a proof's ath, a service's logs).
    broker = Broker(issuer=TEST_ISSUER, keys=KeyRing.generate("ES256"), clock=jitbroker_clock)
    token = broker.issue("svc:a", "api", ttl=60).token
    with pytest.raises(BadSignature):
        broker.verify(s_twin(token), audience="api")
    assert broker.verify(token, audience="api").subject == "svc:a"


@pytest.mark.parametrize(
    ("r", "s"),
    [(0, 0), (0, 1), (1, 0), (P256_N, 1), (1, P256_N), (P256_N, P256_N)],
    ids=["zero", "r=0", "s=0", "r=n", "s=n", "r=s=n"],
)
def test_allowing_high_s_still_refuses_out_of_range_signatures(r: int, s: int) -> None:
    # CVE-2022-21449 ("psychic signatures"): r and s stay within [1, n - 1].
    key = key_from_material(ec.generate_private_key(ec.SECP256R1()))
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert not key.verify(signature, b"data", allow_high_s=True)


def test_allow_high_s_accepts_exactly_the_twin() -> None:
    key = key_from_material(ec.generate_private_key(ec.SECP256R1()))
    low = key.sign(b"data")
    high = other_s(low)
    assert key.verify(low, b"data")
    assert key.verify(low, b"data", allow_high_s=True)
    assert not key.verify(high, b"data")  # the default, for tokens
    assert key.verify(high, b"data", allow_high_s=True)
    assert not key.verify(high, b"other", allow_high_s=True)
