"""DPoP proofs sent to the token endpoint (RFC 9449 section 5): the key to bind to.

A proof sent with a token request proves that the client holds the private
key of the public key in its ``jwk`` header; the issued token is then bound to
that key (``cnf.jkt``). Unlike a proof sent to a resource server there is no
access token yet, so there is no ``ath`` (and one that is present is refused:
it can only belong to another request). Everything else is checked as
``jitbroker.dpop.ProofChecker`` checks it: ``typ``, an asymmetric ``alg`` that
matches the key, no private key members, the signature (either ECDSA S
form), ``htm``, ``htu``, a fresh ``iat`` and a ``jti`` never seen before (per
key, bounded, never forgotten early).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from typing import Any, NamedTuple

from ..clock import Clock, system_clock
from ..dpop import MAX_PROOF_LENGTH, PROOF_TYPE, _ReplayCache, normalize_uri
from ..errors import InvalidProof, MalformedToken
from ..jwk import thumbprint
from ..keys import key_from_jwk
from ..tokens import b64decode, strict_json_object

__all__ = ["Binding", "TokenProofs"]

_ALGS = frozenset({"EdDSA", "ES256", "RS256"})
_PRIVATE = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class Binding(NamedTuple):
    """The key a proof was signed with: its public JWK and RFC 7638 thumbprint."""

    jwk: Mapping[str, Any]
    jkt: str


class TokenProofs:
    """Checks the DPoP proofs of token requests; remembers each ``jti`` (per key).

    ``max_age`` and ``leeway`` as in ``ProofChecker``; the replay cache is
    bounded in all (``replay_cache_size``) and per key (``proofs_per_key``):
    when full, new proofs are refused, never an old one forgotten.
    """

    def __init__(
        self,
        *,
        clock: Clock = system_clock,
        max_age: float = 60,
        leeway: float = 5,
        replay_cache_size: int = 100_000,
        proofs_per_key: int = 1_000,
    ) -> None:
        self.clock = clock
        self.max_age = max_age
        self.leeway = leeway
        self._seen = _ReplayCache(replay_cache_size, proofs_per_key)
        self._lock = threading.Lock()

    def check(self, proof: str, *, method: str, url: str) -> Binding:
        """The key ``proof`` binds the new token to, or ``InvalidProof``."""
        if len(proof) > MAX_PROOF_LENGTH or proof.count(".") != 2:
            raise InvalidProof("the DPoP proof is not a compact JWS")
        head, body, signature = proof.split(".")
        try:
            header = strict_json_object(b64decode(head), "DPoP proof header")
            jwk = _public_jwk(header)
            key = key_from_jwk(jwk)
            if key.symmetric or key.alg != header["alg"]:
                raise InvalidProof("the DPoP proof alg does not match its key")
            if not key.verify(
                b64decode(signature), f"{head}.{body}".encode("ascii"), allow_high_s=True
            ):
                raise InvalidProof("the DPoP proof signature does not verify")
            claims = strict_json_object(b64decode(body), "DPoP proof")
        except (MalformedToken, ValueError, KeyError, TypeError) as exc:  # UnicodeError too
            raise InvalidProof("the DPoP proof is malformed") from exc
        jkt = thumbprint(key.public_jwk() or {})
        now = self.clock()
        last_good = self._check_claims(claims, method, normalize_uri(url), now)
        with self._lock:
            self._seen.add(jkt, claims["jti"], last_good, now)
        return Binding(jwk, jkt)

    def _check_claims(self, claims: dict[str, Any], method: str, htu: str, now: float) -> float:
        jti, iat = claims.get("jti"), claims.get("iat")
        if not isinstance(jti, str) or not 0 < len(jti) <= 128:
            raise InvalidProof("the DPoP proof needs a jti of 1 to 128 characters")
        if claims.get("htm") != method:
            raise InvalidProof("the DPoP proof was made for another HTTP method")
        if claims.get("htu") != htu:
            raise InvalidProof("the DPoP proof was made for another URI")
        if "ath" in claims:  # RFC 9449 section 5: there is no access token to hash yet
            raise InvalidProof("a DPoP proof for the token endpoint carries no ath")
        if isinstance(iat, bool) or not isinstance(iat, int | float):
            raise InvalidProof("the DPoP proof needs a numeric iat")
        if isinstance(iat, float) and not math.isfinite(iat):
            raise InvalidProof("the DPoP proof needs a numeric iat")
        if iat > now + self.leeway or iat < now - self.max_age - self.leeway:
            raise InvalidProof("the DPoP proof is too old or from the future")
        return float(iat) + self.max_age + self.leeway


def _public_jwk(header: dict[str, Any]) -> dict[str, Any]:
    if header.get("typ") != PROOF_TYPE:
        raise InvalidProof(f"the DPoP proof typ must be {PROOF_TYPE!r}")
    if header.get("alg") not in _ALGS:
        raise InvalidProof("the DPoP proof alg must be EdDSA, ES256 or RS256")
    if set(header) - {"typ", "alg", "jwk"}:
        raise InvalidProof("the DPoP proof header has parameters that are not accepted")
    jwk = header.get("jwk")
    if not isinstance(jwk, dict) or _PRIVATE.intersection(jwk):
        raise InvalidProof("the DPoP proof must carry the holder's public key as jwk")
    return {k: v for k, v in jwk.items() if k not in ("kid", "use", "key_ops", "alg")}
