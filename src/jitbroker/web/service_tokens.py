"""Checking a jitbroker token that a caller presents to the broker service.

The token endpoint, ``/revoke``, ``/introspect`` and ``/renew`` take tokens of
any audience, so they cannot use one fixed-audience ``Verifier`` call. A
``Presented`` check reads the token's audience first (the signature-checked
claims of a JWS, or the lease of an opaque token), then runs the full online
verification for that audience: signature, issuer, time window, an active
lease that matches the token, and (``/renew`` only) the DPoP proof.

Introspection and token exchange get no proof for a key-bound token: a
resource server introspects a token it received with its own proof (RFC 9449
section 6.2), and an exchange proves the key with its own request's proof
(RFC 9449 section 5, no ``ath``). For those,
``check(..., proof=DEFERRED)`` verifies everything but the proof and returns
the claims with ``holder`` set, for the caller to handle (token exchange
compares it with the request's own proof key).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .. import tokens
from ..clock import Clock
from ..dpop import ProofChecker
from ..errors import LeaseError, MalformedToken, UnknownLease
from ..keyring import KeyRing
from ..lease import Claims, Lease
from ..verify import Verifier

__all__ = ["DEFERRED", "Presented", "introspection"]

#: ``check(proof=DEFERRED)``: verify all but the DPoP proof of a key-bound token.
DEFERRED = "deferred"


class _Deferred(ProofChecker):
    """Accepts any proof: used only with ``DEFERRED``, whose caller handles the
    token's ``holder`` itself (see the module docstring)."""

    def check(self, proof: object, *, method: str, url: str, token: str, jkt: str) -> None:
        return None


class Presented:
    """Verifies presented tokens against the broker's keys and store (no cache of
    revocations: every check reads the lease, so a revoked token fails at once)."""

    def __init__(
        self,
        keys: KeyRing,
        *,
        issuer: str,
        store: Any,
        lookup: Callable[[str], Awaitable[Lease]],
        clock: Clock,
        leeway: float,
        max_ttl: float,
    ) -> None:
        options: dict[str, Any] = {
            "issuer": issuer,
            "store": store,
            "clock": clock,
            "leeway": leeway,
            "max_ttl": max_ttl + 1,  # as the broker's own verifier: times are whole seconds
        }
        self.full = Verifier(keys, **options)
        self.deferred = Verifier(keys, **options)
        self.deferred.proofs = _Deferred(clock=clock)
        for verifier in (self.full, self.deferred):
            verifier.audit = None  # the service audits each decision itself, once
        self._lookup = lookup  # the broker's lease(): LeaseNotFound when unknown

    async def audience(self, token: str) -> str:
        """The audience ``token`` claims (its signature checked), or ``InvalidToken``."""
        if tokens.is_opaque(token):
            lease = await self._lease(tokens.check_opaque(token))
            return lease.audience
        return self.full.decode(token).audience

    async def check(
        self, token: str, *, proof: str | None = None, method: str = "POST", url: str = ""
    ) -> Claims:
        """The claims of an active ``token``, or an ``InvalidToken`` saying why not
        (a ``StoreError`` when the store cannot say)."""
        if len(token) > tokens.MAX_TOKEN_LENGTH:
            raise MalformedToken("the token is longer than any this broker issues")
        audience = await self.audience(token)
        if proof == DEFERRED:
            return await self.deferred.averify(
                token, audience=audience, proof="", method=method, url=url or "https://x/"
            )
        return await self.full.averify(
            token, audience=audience, proof=proof, method=method, url=url
        )

    async def _lease(self, lease_id: str) -> Lease:
        try:
            return await self._lookup(lease_id)
        except LeaseError as exc:  # LeaseNotFound: never a pass
            raise UnknownLease("no lease for this token", lease_id=lease_id) from exc


def introspection(claims: Claims, *, issuer: str) -> dict[str, Any]:
    """The RFC 7662 section 2.2 answer for an active token's ``claims``."""
    holder = claims.actor if claims.actor is not None else claims.subject
    out: dict[str, Any] = {
        "active": True,
        "scope": claims.scope,
        "client_id": holder,
        "sub": claims.subject,
        "aud": claims.audience,
        "iss": issuer,
        "exp": claims.expires_at,
        "iat": claims.issued_at,
        "nbf": claims.not_before,
        "jti": claims.lease_id,
        "token_type": "DPoP" if claims.holder is not None else "Bearer",
    }
    if claims.holder is not None:  # RFC 9449 section 6.2
        out["cnf"] = {"jkt": claims.holder}
    if claims.actor is not None:  # RFC 8693 section 4.1
        act = claims.raw.get("act")
        if not isinstance(act, dict):  # an opaque token: the nearest actor is known
            act = {"sub": claims.actor, "delegated_from": claims.delegated_by[0]}
        out["act"] = act
    for name, value in (("owner", claims.owner), ("task", claims.task)):
        if value is not None:
            out[name] = value
    if claims.purpose is not None:
        out["purpose"] = claims.purpose
    return out
