"""Rejections found by the HTTP layer itself, before or around verification.

::

    JitBrokerError
    ├── RequestRejected              the HTTP layer refused the request
    │   ├── NoCredentials            no Authorization header (or an unsupported scheme)
    │   └── MalformedRequest         the Authorization or DPoP header is malformed
    └── InvalidToken
        └── InvalidProof
            └── NonceRequired        the proof lacks a current server nonce (.nonce)

Messages are ours and fixed: they never echo a header, a token or a proof.
"""

from __future__ import annotations

from ..errors import InvalidProof, JitBrokerError

__all__ = ["MalformedRequest", "NoCredentials", "NonceRequired", "RequestRejected"]


class RequestRejected(JitBrokerError):
    """The HTTP layer refused the request before any token was verified."""


class NoCredentials(RequestRejected):
    """The request carries no credentials this resource accepts (RFC 6750 section
    3.1: answered with a bare challenge and no error code)."""


class MalformedRequest(RequestRejected):
    """The Authorization (or DPoP) header is malformed: ``invalid_request``, a 400."""


class NonceRequired(InvalidProof):
    """The DPoP proof does not carry a current server nonce (RFC 9449 section 8);
    ``nonce`` is the one to use, sent back in the ``DPoP-Nonce`` header."""

    def __init__(self, message: str, *, nonce: str) -> None:
        super().__init__(message)
        self.nonce = nonce
