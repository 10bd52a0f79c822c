"""Rejections found by the HTTP layer itself, before or around verification.

::

    JitBrokerError
    ├── RequestRejected              the HTTP layer refused the request
    │   ├── NoCredentials            no Authorization header (or an unsupported scheme)
    │   ├── MalformedRequest         the Authorization or DPoP header is malformed
    │   └── InvalidClient            caller authentication failed (.reason): RFC 6749 invalid_client
    └── InvalidToken
        └── InvalidProof
            └── NonceRequired        the proof lacks a current server nonce (.nonce)

Messages are ours and fixed: they never echo a header, a token or a proof.
"""

from __future__ import annotations

from ..errors import InvalidProof, JitBrokerError

__all__ = [
    "InvalidClient",
    "MalformedRequest",
    "NoCredentials",
    "NonceRequired",
    "RequestRejected",
]


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


class InvalidClient(RequestRejected):
    """Caller authentication at the token endpoint failed (``jitbroker.web.Trust``):
    the assertion, client key or client secret was refused. RFC 6749 section 5.2
    ``invalid_client`` (a 401), or ``invalid_request`` when the refused assertion
    was an RFC 8693 ``subject_token`` / ``actor_token``.

    ``reason`` is a fixed short code naming what failed (``"wrong_audience"``,
    ``"expired"``, ``"replayed"``, ...: see ``docs/trust.md``), for the audit
    log; the message is fixed text too. Neither ever quotes the assertion,
    the secret or a claim value.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
