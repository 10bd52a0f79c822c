"""Proof of possession for sender-constrained tokens (RFC 9449, DPoP).

A token issued with ``holder_key=...`` names the holder's public key by its
RFC 7638 thumbprint (``cnf.jkt``). Whoever presents it must also present a
fresh *proof*: a small JWT signed by that key, covering the request (method and
URI), the time, a unique ``jti`` and the token's hash (``ath``). A stolen token
is useless without the key; a captured proof is useless for another request,
another token, later, or a second time.

``make_proof`` builds proofs for clients; ``ProofChecker`` checks them. Unlike
an access token, a proof carries its key in the ``jwk`` header, by design: the
key is trusted only because its thumbprint equals the one the token was bound
to, and it must be an asymmetric public key (never ``oct``, never private).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from cachetools import TTLCache

from .clock import Clock, Duration, seconds, system_clock
from .errors import InvalidProof, InvalidRequest, MalformedToken, ProofReplayed
from .jwk import b64url, thumbprint
from .keys import Key, key_from_jwk, key_from_material
from .tokens import b64decode, json_text, strict_json_object

__all__ = ["PROOF_TYPE", "ProofChecker", "holder_thumbprint", "make_proof"]

PROOF_TYPE = "dpop+jwt"
MAX_PROOF_LENGTH = 4096
_ALGS = frozenset({"EdDSA", "ES256", "RS256"})  # asymmetric only: the verifier has no secret
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_DEFAULT_PORTS = {"https": 443, "http": 80}


def holder_thumbprint(holder_key: object) -> str:
    """The ``jkt`` a token is bound to: the RFC 7638 thumbprint of the holder's
    public key, given as a ``Key``, a ``cryptography`` key or a JWK dict."""
    if isinstance(holder_key, Mapping):
        if _PRIVATE_MEMBERS.intersection(holder_key):
            raise InvalidRequest("holder_key must be the holder's public key, not a private one")
        key = key_from_jwk(holder_key)
    elif isinstance(holder_key, Key):
        key = holder_key
    else:
        key = key_from_material(holder_key)
    if key.symmetric:
        raise InvalidRequest("holder_key must be an asymmetric key (EdDSA, ES256 or RS256)")
    return key.kid


def make_proof(
    key: Key, method: str, url: str, *, token: str | None = None, now: float | None = None
) -> str:
    """A DPoP proof for one request: ``key`` is the holder's private key, ``token``
    the access token it accompanies (its hash becomes ``ath``)."""
    if key.symmetric or not key.private:
        raise InvalidRequest("a proof is signed with the holder's private asymmetric key")
    public = {k: v for k, v in (key.public_jwk() or {}).items() if k not in ("kid", "use")}
    header = {"typ": PROOF_TYPE, "alg": key.alg, "jwk": public}
    payload: dict[str, Any] = {
        "jti": os.urandom(16).hex(),
        "htm": method,
        "htu": normalize_uri(url),
        "iat": int(system_clock() if now is None else now),
    }
    if token is not None:
        payload["ath"] = token_hash(token)
    signing_input = b64url(json_text(header).encode()) + "." + b64url(json_text(payload).encode())
    return signing_input + "." + b64url(key.sign(signing_input.encode("ascii")))


def token_hash(token: str) -> str:
    """``ath``: base64url of the SHA-256 of the access token."""
    return b64url(hashlib.sha256(token.encode("ascii")).digest())


def normalize_uri(url: str) -> str:
    """The ``htu`` form of a request URI: scheme and host lowercased, default
    port dropped, no query or fragment (RFC 9449 section 4.3)."""
    if not isinstance(url, str):
        raise InvalidRequest("the request URI must be a string")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise InvalidRequest("the request URI must be an absolute http(s) URI")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    port = "" if parts.port in (None, _DEFAULT_PORTS[scheme]) else f":{parts.port}"
    return f"{scheme}://{host}{port}{parts.path or '/'}"


class ProofChecker:
    """Checks DPoP proofs; remembers each proof's ``jti`` to refuse replays.

    Args:
        max_age: how old a proof's ``iat`` may be (seconds, default 60).
        leeway: clock skew allowed in either direction (default 5).
        replay_cache_size: how many fresh proofs to remember (per holder key
            and ``jti``). It bounds memory, never security: a ``jti`` is kept
            for as long as its proof could be accepted, and when the cache is
            full of such entries new proofs are refused (``InvalidProof``)
            until some age out, rather than forgetting one that could be
            replayed. Only holders of a bound token's key can fill it.
        clock: the time source.
    """

    def __init__(
        self,
        *,
        max_age: Duration = 60,
        leeway: Duration = 5,
        replay_cache_size: int = 100_000,
        clock: Clock = system_clock,
    ) -> None:
        self.max_age = seconds(max_age, "max_age")
        self.leeway = seconds(leeway, "leeway", allow_zero=True)
        if (
            isinstance(replay_cache_size, bool)
            or not isinstance(replay_cache_size, int)
            or replay_cache_size < 1
        ):
            raise InvalidRequest("replay_cache_size must be a whole number >= 1")
        self.clock = clock
        window = self.max_age + 2 * self.leeway  # a jti is kept as long as its proof is fresh
        self._seen: TTLCache[tuple[str, str], bool] = TTLCache(
            replay_cache_size, window, timer=clock
        )
        self._lock = threading.Lock()

    def check(self, proof: object, *, method: str, url: str, token: str, jkt: str) -> None:
        """Accept ``proof`` for this request and token bound to ``jkt``, or raise
        ``InvalidProof`` (``ProofReplayed`` for a proof seen before)."""
        if not isinstance(proof, str) or not proof:
            raise InvalidProof("this token is bound to a key: a DPoP proof is required")
        if len(proof) > MAX_PROOF_LENGTH or not _COMPACT.fullmatch(proof):
            raise InvalidProof("the DPoP proof is not a compact JWS")
        head, body, signature = proof.split(".")
        try:
            key = self._holder_key(head, jkt)
            if not key.verify(b64decode(signature), f"{head}.{body}".encode("ascii")):
                raise InvalidProof("the DPoP proof signature does not verify")
            claims = strict_json_object(b64decode(body), "DPoP proof")
        except MalformedToken as exc:
            raise InvalidProof(f"the DPoP proof is malformed: {exc}") from exc
        self._check_claims(claims, method, url, token)
        self._remember((jkt, claims["jti"]))

    def _remember(self, entry: tuple[str, str]) -> None:
        # Keyed by holder too: one holder's jti values never shadow another's.
        seen = self._seen
        with self._lock:
            seen.expire()
            if entry in seen:
                raise ProofReplayed("this DPoP proof was already used")
            # Full of proofs still inside their window: inserting would evict
            # one that could then be replayed. Fail closed instead.
            if len(seen) >= seen.maxsize:
                raise InvalidProof("the DPoP replay cache is full; try again")
            seen[entry] = True

    def _holder_key(self, segment: str, jkt: str) -> Key:
        header = strict_json_object(b64decode(segment), "DPoP proof header")
        if header.get("typ") != PROOF_TYPE:
            raise InvalidProof(f"the DPoP proof typ must be {PROOF_TYPE!r}")
        alg, jwk = header.get("alg"), header.get("jwk")
        if alg not in _ALGS:
            raise InvalidProof("the DPoP proof alg must be EdDSA, ES256 or RS256")
        if set(header) - {"typ", "alg", "jwk"}:
            raise InvalidProof("the DPoP proof header has parameters that are not accepted")
        if not isinstance(jwk, Mapping) or _PRIVATE_MEMBERS.intersection(jwk):
            raise InvalidProof("the DPoP proof must carry the holder's public key as jwk")
        try:
            key = key_from_jwk(jwk)
        except InvalidRequest as exc:
            raise InvalidProof("the DPoP proof's jwk is not an acceptable public key") from exc
        if key.alg != alg:
            raise InvalidProof("the DPoP proof alg does not match its key")
        if not hmac.compare_digest(thumbprint(key.public_jwk() or {}), jkt):
            raise InvalidProof("the DPoP proof is signed by another key than the token's holder")
        return key

    def _check_claims(self, claims: dict[str, Any], method: str, url: str, token: str) -> None:
        jti, iat = claims.get("jti"), claims.get("iat")
        if not isinstance(jti, str) or not 0 < len(jti) <= 128:
            raise InvalidProof("the DPoP proof needs a jti of 1 to 128 characters")
        if claims.get("htm") != method:
            raise InvalidProof("the DPoP proof was made for another HTTP method")
        if claims.get("htu") != normalize_uri(url):
            raise InvalidProof("the DPoP proof was made for another URI")
        if not isinstance(claims.get("ath"), str) or not hmac.compare_digest(
            claims["ath"], token_hash(token)
        ):
            raise InvalidProof("the DPoP proof was made for another access token")
        if isinstance(iat, bool) or not isinstance(iat, int | float) or not math.isfinite(iat):
            raise InvalidProof("the DPoP proof needs a numeric iat")
        now = self.clock()
        if iat > now + self.leeway or iat < now - self.max_age - self.leeway:
            raise InvalidProof("the DPoP proof is too old or from the future")
