"""Every error jitbroker raises, under one root.

::

    JitBrokerError
    ├── InvalidToken                 verify() rejected the token
    │   ├── MalformedToken           not a well-formed token of ours
    │   ├── BadSignature             signature does not verify
    │   ├── TokenExpired             past exp (+ leeway), or its lease expired
    │   ├── TokenNotYetValid         before nbf / iat (- leeway)
    │   ├── WrongIssuer
    │   ├── WrongAudience
    │   ├── InsufficientScope        .missing lists the scopes it lacks
    │   ├── TokenRevoked             its lease was revoked (.reason)
    │   ├── UnknownKey               kid not in the key ring
    │   ├── UnknownLease             online check: no such lease in the store
    │   └── InvalidProof             a key-bound token without a valid DPoP proof
    │       └── ProofReplayed        the proof was already used
    ├── PolicyDenied                 .reasons lists every reason
    │   └── QuotaExceeded            a max_active quota is full (.quota)
    ├── LeaseError
    │   ├── LeaseNotFound
    │   ├── LeaseNotActive           revoked or expired
    │   └── RenewalDenied            not renewable, or at its maximum lifetime
    ├── StoreError
    │   └── StoreUnavailable         the store could not be reached; nothing was issued
    ├── KeySourceError               a JWKS or key source could not be read, or was refused
    ├── ProviderError                a provider could not create, renew or revoke a backend
    │                                credential (.provider, .lease_id)
    └── InvalidRequest (ValueError)  a bad argument; the message says what to fix

Messages name the lease id, times and scopes involved, never a token or key.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "BadSignature",
    "InsufficientScope",
    "InvalidProof",
    "InvalidRequest",
    "InvalidToken",
    "JitBrokerError",
    "KeySourceError",
    "LeaseError",
    "LeaseNotActive",
    "LeaseNotFound",
    "MalformedToken",
    "PolicyDenied",
    "ProofReplayed",
    "ProviderError",
    "QuotaExceeded",
    "RenewalDenied",
    "StoreError",
    "StoreUnavailable",
    "TokenExpired",
    "TokenNotYetValid",
    "TokenRevoked",
    "UnknownKey",
    "UnknownLease",
    "WrongAudience",
    "WrongIssuer",
]


class JitBrokerError(Exception):
    """Root of every error raised by jitbroker."""


class InvalidToken(JitBrokerError):
    """The token was rejected. Catch this to reject a request; subclasses say why."""


class MalformedToken(InvalidToken):
    """The token is not a well-formed token this verifier accepts."""


class BadSignature(InvalidToken):
    """The signature does not verify under the key named by the token."""


class TokenExpired(InvalidToken):
    """The token (or its lease) is past its expiry."""

    def __init__(self, message: str, *, expired_at: float | None = None) -> None:
        super().__init__(message)
        self.expired_at = expired_at


class TokenNotYetValid(InvalidToken):
    """The token's ``nbf`` or ``iat`` lies in the future beyond the leeway."""


class WrongIssuer(InvalidToken):
    """The token was issued by someone else."""


class WrongAudience(InvalidToken):
    """The token was issued for another audience."""


class InsufficientScope(InvalidToken):
    """The token lacks scopes the caller requires; ``missing`` names them."""

    def __init__(self, message: str, *, missing: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.missing = tuple(sorted(missing))


class TokenRevoked(InvalidToken):
    """The token's lease was revoked; ``reason`` says why."""

    def __init__(self, message: str, *, lease_id: str, reason: str | None) -> None:
        super().__init__(message)
        self.lease_id = lease_id
        self.reason = reason


class UnknownKey(InvalidToken):
    """The token names a key id this verifier does not know."""


class UnknownLease(InvalidToken):
    """Online check: the store has no lease for this token. Never a pass."""

    def __init__(self, message: str, *, lease_id: str | None = None) -> None:
        super().__init__(message)
        self.lease_id = lease_id


class InvalidProof(InvalidToken):
    """The token is bound to a holder key and the DPoP proof is missing or wrong."""


class ProofReplayed(InvalidProof):
    """The DPoP proof was presented before: each proof is good for one request."""


class PolicyDenied(JitBrokerError):
    """The policy refused the request; ``reasons`` lists every reason."""

    def __init__(self, reasons: Iterable[str]) -> None:
        self.reasons = tuple(reasons)
        super().__init__("policy denied the request: " + "; ".join(self.reasons))


class QuotaExceeded(PolicyDenied):
    """A ``max_active`` quota is full: the subject (or owner) already holds as many
    active leases as its rule allows. Revoke one, or wait for one to expire."""

    def __init__(self, reason: str, *, quota: object) -> None:
        super().__init__([reason])
        self.quota = quota


class LeaseError(JitBrokerError):
    """A lease operation could not be carried out."""

    def __init__(self, message: str, *, lease_id: str | None = None) -> None:
        super().__init__(message)
        self.lease_id = lease_id


class LeaseNotFound(LeaseError):
    """No lease with this id exists (it may have been purged after it died)."""


class LeaseNotActive(LeaseError):
    """The lease is revoked or expired, so it cannot be renewed or attenuated."""


class RenewalDenied(LeaseError):
    """The lease is not renewable, or already at its maximum lifetime."""


class StoreError(JitBrokerError):
    """The lease store failed. The original error is chained as ``__cause__``."""


class StoreUnavailable(StoreError):
    """The lease store could not be reached; the operation did not happen."""


class KeySourceError(JitBrokerError):
    """A JWKS URL could not be fetched, or what it served is not a public JWKS; or a
    key directory or file could not be written, or is refused as unsafe (a symlink,
    another user's, or open to group or others: the message says what to run)."""


class ProviderError(JitBrokerError):
    """A provider (``jitbroker.providers``) failed to create, renew or revoke the
    backend credential of a lease. The message names the provider and lease,
    never a password; the backend's own error is the ``__cause__``."""

    def __init__(self, message: str, *, provider: str, lease_id: str | None = None) -> None:
        super().__init__(message)
        self.provider = provider
        self.lease_id = lease_id


class InvalidRequest(JitBrokerError, ValueError):
    """A bad argument (empty subject, negative TTL, ...). The message says what to fix."""
