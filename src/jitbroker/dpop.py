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
import heapq
import hmac
import math
import os
import re
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

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
# A URI has no spaces or control characters (RFC 3986); urlsplit would silently
# drop tabs and newlines, so "/a\nb" and "/ab" would be one URI to it.
_NOT_IN_URI = re.compile(r"[\x00-\x20\x7f]")
# host [":" port] and nothing else: no userinfo ("user@"), which RFC 9110 section
# 4.2.4 forbids in http(s) URIs and which would otherwise be dropped unseen. The
# host is an IP literal in brackets or an RFC 3986 reg-name / IPv4 address.
_AUTHORITY = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::([0-9]*))?")
# RFC 9110 section 5.6.2: method = token.
_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


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
    if not isinstance(method, str) or not _METHOD.fullmatch(method):
        raise InvalidRequest("the request method must be an HTTP method such as 'GET'")
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
    port dropped, no query or fragment (RFC 9449 section 4.3).

    Anything else than an absolute http(s) URI with a host and a valid port
    (1-65535) raises ``InvalidRequest``, never another error.
    """
    if not isinstance(url, str):
        raise InvalidRequest("the request URI must be a string")
    # Bounded before parsing: no proof (MAX_PROOF_LENGTH) can carry a longer htu.
    if len(url) > MAX_PROOF_LENGTH:
        raise InvalidRequest(f"the request URI is longer than {MAX_PROOF_LENGTH} characters")
    if _NOT_IN_URI.search(url) is not None:
        raise InvalidRequest("the request URI must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unbalanced or invalid [IPv6] literal
        raise InvalidRequest("the request URI is not a valid URI") from exc
    scheme = parts.scheme.lower()
    authority = _AUTHORITY.fullmatch(parts.netloc)
    if scheme not in _DEFAULT_PORTS or authority is None:
        raise InvalidRequest(
            "the request URI must be an absolute http(s) URI with a host (and no user info)"
        )
    host, port = authority.groups()
    number = int(port) if port else _DEFAULT_PORTS[scheme]  # "h:" is "h" (RFC 3986 6.2.3)
    if not 0 < number <= 65535:
        raise InvalidRequest("the request URI's port must be 1 to 65535")
    suffix = "" if number == _DEFAULT_PORTS[scheme] else f":{number}"
    return f"{scheme}://{host.lower()}{suffix}{parts.path or '/'}"


def _request_htu(method: object, url: object) -> str:
    """The ``htu`` a proof for this request must carry, checked before any proof is.

    Who answers for what: ``method`` and ``url`` are the server's arguments, so
    one of the wrong type is the server's bug (``InvalidRequest``: fix the call).
    But their text comes from the client (request line, ``Host`` header), so a
    malformed one is a hostile or broken request that no proof can cover: it is
    rejected like any bad proof (``InvalidProof``, an ``InvalidToken``: audited,
    a 401), never an exception that escapes the verifier. The proof's own
    ``htm`` and ``htu`` are the client's claims: they are only compared with
    these, never parsed, so nothing in them can raise.
    """
    if not isinstance(method, str) or not isinstance(url, str):
        raise InvalidRequest("verify a DPoP proof with the request's method and URL, as strings")
    if not _METHOD.fullmatch(method):
        raise InvalidProof("the request method is not an HTTP method; no proof can cover it")
    try:
        return normalize_uri(url)
    except InvalidRequest as exc:  # the message never echoes the URL: it may carry secrets
        raise InvalidProof(f"no proof can cover this request: {exc}") from exc


class ProofChecker:
    """Checks DPoP proofs; remembers each proof's ``jti`` to refuse replays.

    Args:
        max_age: how old a proof's ``iat`` may be (seconds, default 60).
        leeway: clock skew allowed in either direction (default 5).
        replay_cache_size: how many fresh proofs to remember, in all. It bounds
            memory, never security: a ``jti`` is kept for as long as its proof
            could be accepted, and when the cache is full of such entries new
            proofs are refused (``InvalidProof``) until some age out, rather
            than forgetting one that could be replayed. Only a proof signed by
            a bound token's holder key is remembered, so only holders fill it.
        proofs_per_holder: how many of those one holder key (``jkt``) may fill
            (default 10,000, about 150 requests a second; at most
            ``replay_cache_size``). A holder past it has its own new proofs
            refused until its old ones age out; other holders are unaffected,
            so one flooding client locks out only itself.
        clock: the time source.
    """

    def __init__(
        self,
        *,
        max_age: Duration = 60,
        leeway: Duration = 5,
        replay_cache_size: int = 100_000,
        proofs_per_holder: int = 10_000,
        clock: Clock = system_clock,
    ) -> None:
        self.max_age = seconds(max_age, "max_age")
        self.leeway = seconds(leeway, "leeway", allow_zero=True)
        self.clock = clock
        self._seen = _ReplayCache(
            _whole(replay_cache_size, "replay_cache_size"),
            _whole(proofs_per_holder, "proofs_per_holder"),
        )
        self._lock = threading.Lock()

    def check(self, proof: object, *, method: str, url: str, token: str, jkt: str) -> None:
        """Accept ``proof`` for this request and token bound to ``jkt``, or raise
        ``InvalidProof`` (``ProofReplayed`` for a proof seen before)."""
        self._check(proof, method, url, token, jkt)

    def check_token_request(self, proof: object, *, method: str, url: str) -> tuple[Key, str]:
        """Accept ``proof`` sent with a token request (RFC 9449 section 5): there
        is no access token yet, so it carries no ``ath`` (one that does belongs to
        another request), and any key may sign it. The key it proves possession
        of, to bind the new token to, and that key's thumbprint (``jkt``)."""
        key = self._check(proof, method, url, None, None)
        return key, thumbprint(key.public_jwk() or {})

    def _check(
        self, proof: object, method: str, url: str, token: str | None, jkt: str | None
    ) -> Key:
        """``check``; with ``token`` None a proof without ``ath``, with ``jkt``
        None a proof by any key. The key that signed it."""
        if not isinstance(proof, str) or not proof:
            raise InvalidProof("this token is bound to a key: a DPoP proof is required")
        if len(proof) > MAX_PROOF_LENGTH or not _COMPACT.fullmatch(proof):
            raise InvalidProof("the DPoP proof is not a compact JWS")
        htu = _request_htu(method, url)  # cheap, and before any signature check
        head, body, signature = proof.split(".")
        try:
            key = self._holder_key(head, jkt)
            # Either S: the client's library signed this, and most (PyJWT,
            # joserfc, ...) do not normalize to low S. The high-S twin gains an
            # attacker nothing: replays are caught by (jkt, jti), never by bytes.
            signing_input = f"{head}.{body}".encode("ascii")
            if not key.verify(b64decode(signature), signing_input, allow_high_s=True):
                raise InvalidProof("the DPoP proof signature does not verify")
            claims = strict_json_object(b64decode(body), "DPoP proof")
        except MalformedToken as exc:
            raise InvalidProof(f"the DPoP proof is malformed: {exc}") from exc
        # One clock reading for both: the freshness check and the replay cache
        # must agree on whether the proof can still pass, or a replay could
        # arrive just as its first use is forgotten.
        now = self.clock()
        last_good = self._check_claims(claims, method, htu, token, now)
        holder = thumbprint(key.public_jwk() or {}) if jkt is None else jkt
        with self._lock:
            self._seen.add(holder, claims["jti"], last_good, now)
        return key

    def _holder_key(self, segment: str, jkt: str | None) -> Key:
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
        if jkt is not None and not hmac.compare_digest(thumbprint(key.public_jwk() or {}), jkt):
            raise InvalidProof("the DPoP proof is signed by another key than the token's holder")
        return key

    def _check_claims(
        self, claims: dict[str, Any], method: str, htu: str, token: str | None, now: float
    ) -> float:
        """Check the proof's claims at ``now``; the last moment the proof passes."""
        jti, iat = claims.get("jti"), claims.get("iat")
        if not isinstance(jti, str) or not 0 < len(jti) <= 128:
            raise InvalidProof("the DPoP proof needs a jti of 1 to 128 characters")
        if claims.get("htm") != method:
            raise InvalidProof("the DPoP proof was made for another HTTP method")
        if claims.get("htu") != htu:
            raise InvalidProof("the DPoP proof was made for another URI")
        if token is None:  # a token request: there is no access token to hash yet
            if "ath" in claims:
                raise InvalidProof("a DPoP proof for the token endpoint carries no ath")
        elif not isinstance(claims.get("ath"), str) or not hmac.compare_digest(
            claims["ath"], token_hash(token)
        ):
            raise InvalidProof("the DPoP proof was made for another access token")
        if isinstance(iat, bool) or not isinstance(iat, int | float):
            raise InvalidProof("the DPoP proof needs a numeric iat")
        # isfinite on a float only: an int too large for a float raises OverflowError.
        if isinstance(iat, float) and not math.isfinite(iat):
            raise InvalidProof("the DPoP proof needs a numeric iat")
        # Compared before any arithmetic: an int iat too large for a float
        # must be refused, not raise OverflowError.
        if iat > now + self.leeway or iat < now - self.max_age - self.leeway:
            raise InvalidProof("the DPoP proof is too old or from the future")
        last_good: float = iat + self.max_age + self.leeway
        if last_good < now:  # the replay cache's own reading: they must agree to the last bit
            raise InvalidProof("the DPoP proof is too old or from the future")
        return last_good


def _whole(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"{name} must be a whole number >= 1")
    return value


class _ReplayCache:
    """The ``(jkt, jti)`` of every accepted proof, each kept until the proof's
    last acceptable moment; bounded in all and per holder key.

    Never evicts an entry early (that would let its proof be replayed): when a
    bound is reached, new proofs are refused instead. Entries leave in order of
    that moment, through a heap; nothing else removes one, so no lazy deletion.
    The number of holders tracked is bounded too: each has at least one entry.
    Not thread-safe: ``ProofChecker`` holds its lock around ``add``.
    """

    def __init__(self, size: int, per_holder: int) -> None:
        self.size = size
        self.per_holder = min(per_holder, size)
        self._expiry: list[tuple[float, str, str]] = []
        self._by_holder: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def add(self, jkt: str, jti: str, last_good: float, now: float) -> None:
        """Remember ``jti`` for holder ``jkt`` until ``last_good``, or raise
        ``ProofReplayed`` if it is remembered already, ``InvalidProof`` if full."""
        self._expire(now)
        seen = self._by_holder.get(jkt)
        if seen is not None and jti in seen:  # first: a replay is named as one, even when full
            raise ProofReplayed("this DPoP proof was already used")
        if seen is not None and len(seen) >= self.per_holder:
            raise InvalidProof(
                f"this holder key has {len(seen)} recent DPoP proofs, its limit; "
                f"try again once older ones expire"
            )
        if len(self._expiry) >= self.size:
            raise InvalidProof("the DPoP replay cache is full; try again")
        if seen is None:
            seen = self._by_holder[jkt] = set()
        seen.add(jti)
        heapq.heappush(self._expiry, (last_good, jkt, jti))

    def _expire(self, now: float) -> None:
        # Strictly past last_good only: at that very moment the proof still passes.
        expiry, by_holder = self._expiry, self._by_holder
        while expiry and expiry[0][0] < now:
            _, jkt, jti = heapq.heappop(expiry)
            seen = by_holder[jkt]
            seen.discard(jti)
            if not seen:
                del by_holder[jkt]
