"""Server-provided DPoP nonces (RFC 9449 section 8): rotating, stateless, cheap.

A nonce is an HMAC of the current time window under a random secret, so a
proof that carries one was made recently, whatever its ``iat`` says, and the
server keeps no list of nonces. The current and the previous window's nonces
are accepted, so a nonce handed out just before a rotation still works for one
more window. Processes that serve the same clients (workers, replicas) must
share the ``secret``; with the default random secret each process has its own
nonces and a client answered by another process has to redo the nonce dance.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading

from ..clock import Clock, Duration, seconds, system_clock
from ..errors import InvalidRequest, MalformedToken
from ..jwk import b64url
from ..tokens import b64decode, strict_json_object
from .errors import NonceRequired

__all__ = ["DPoPNonces"]


class DPoPNonces:
    """Issues and checks DPoP nonces; pass one as ``BearerAuth(dpop_nonces=...)``.

    Args:
        secret: at least 16 random bytes, shared by every process that serves
            the same clients (default: 32 random bytes of this process's own).
        window: how long one nonce is current (seconds, default 300); a nonce
            is accepted for up to two windows.
        clock: the time source.
    """

    def __init__(
        self, *, secret: bytes | None = None, window: Duration = 300, clock: Clock = system_clock
    ) -> None:
        if secret is None:
            secret = os.urandom(32)
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise InvalidRequest("a DPoP nonce secret must be at least 16 random bytes")
        self._secret = secret
        self.window = seconds(window, "window")
        self.clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[int, str, str] = (-1, "", "")

    def __repr__(self) -> str:  # never the secret
        return f"<DPoPNonces window={self.window:g}s>"

    def current(self) -> str:
        """The nonce to hand out now (the ``DPoP-Nonce`` header)."""
        return self._pair()[0]

    def check_proof(self, proof: str) -> str | None:
        """Judge the ``nonce`` of a DPoP proof before the proof itself is checked:
        ``NonceRequired`` (carrying the nonce to use) without a current one; the
        nonce to hand out in a ``DPoP-Nonce`` header when the proof carries the
        previous window's; None when it carries this window's.

        Reading the claim unverified is sound because the proof's check then
        verifies the signature over these very bytes: a proof whose nonce
        passes here but was not signed fails there. An unreadable proof passes
        here for the same reason: that check refuses it with its own error.
        """
        nonce = _unverified_nonce(proof)
        if nonce is _UNREADABLE:
            return None
        if not self.accepts(nonce):
            raise NonceRequired("the DPoP proof has no current nonce", nonce=self.current())
        current = self.current()
        return current if nonce != current else None

    def accepts(self, nonce: object) -> bool:
        """True if ``nonce`` is this window's or the previous one's."""
        if not isinstance(nonce, str) or len(nonce) > 64:
            return False
        current, previous = self._pair()
        given = nonce.encode("utf-8", "surrogatepass")  # any str, never an error
        # compare_digest on both, always: no early exit that times which one matched
        ok_current = hmac.compare_digest(given, current.encode())
        ok_previous = hmac.compare_digest(given, previous.encode())
        return ok_current or ok_previous

    def _pair(self) -> tuple[str, str]:
        index = int(self.clock() // self.window)
        cached = self._cached  # one read: a tuple swapped whole, never torn
        if cached[0] == index:
            return cached[1], cached[2]
        with self._lock:
            pair = (self._nonce(index), self._nonce(index - 1))
            self._cached = (index, *pair)
        return pair

    def _nonce(self, index: int) -> str:
        digest = hmac.new(self._secret, index.to_bytes(8, "big", signed=True), hashlib.sha256)
        return b64url(digest.digest()[:18])


_UNREADABLE = object()


def _unverified_nonce(proof: str) -> object:
    """The ``nonce`` claim of a proof, read before its signature is checked."""
    parts = proof.split(".")
    if len(parts) != 3 or len(proof) > 4096:
        return _UNREADABLE
    try:
        return strict_json_object(b64decode(parts[1]), "DPoP proof").get("nonce")
    except (MalformedToken, ValueError):  # b64decode's alphabet is the verifier's to check
        return _UNREADABLE
