"""DPoP proofs sent to the token endpoint (RFC 9449 section 5): the key to bind to.

A proof sent with a token request proves that the client holds the private
key of the public key in its ``jwk`` header; the issued token is then bound to
that key (``cnf.jkt``). Unlike a proof sent to a resource server there is no
access token yet, so there is no ``ath`` (and one that is present is refused:
it can only belong to another request). Everything else is checked by
``jitbroker.dpop.ProofChecker.check_token_request``, as for any proof: ``typ``,
an asymmetric ``alg`` that matches the key, no private key members, the
signature (either ECDSA S form), ``htm``, ``htu``, a fresh ``iat`` and a ``jti``
never seen before (per key, bounded, never forgotten early).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from ..clock import Clock, system_clock
from ..dpop import ProofChecker

__all__ = ["Binding", "TokenProofs"]


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
        self._checker = ProofChecker(
            max_age=max_age,
            leeway=leeway,
            replay_cache_size=replay_cache_size,
            proofs_per_holder=proofs_per_key,
            clock=clock,
        )

    def check(self, proof: str, *, method: str, url: str) -> Binding:
        """The key ``proof`` binds the new token to, or ``InvalidProof``."""
        key, jkt = self._checker.check_token_request(proof, method=method, url=url)
        return Binding(key.public_jwk() or {}, jkt)
