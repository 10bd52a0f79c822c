"""JWT assertions from other issuers: parsing, signature, time and replay checks.

The layer under ``trust``: it knows JWS and JWT (RFC 7515, 7519), not rules.
Parsing is ordered cheapest first, as in ``jitbroker.tokens``: a length cap on
the raw string (a 10 MB assertion costs one ``len``), the compact form, then
the header and payload through the same strict JSON parser as our own tokens
(duplicate members, NaN, deep nesting and lone surrogates refused), then the
signature with an algorithm the rule allows and a key the issuer's JWKS holds.

Other issuers' JWKS name keys by their own ``kid`` (GitHub's, Kubernetes')
rather than by RFC 7638 thumbprint as jitbroker's do, so ``IssuerKeys`` maps
their ``kid`` to our ``Key``, and ``IssuerSource`` is a ``JWKSource`` (the
same hardened fetch: scheme, redirects, deadline, size cap, rate-limited
refresh) whose ``parse`` hook builds one. ``discover`` reads an issuer's OpenID
discovery document through the same fetch (``jitbroker.jwks.fetch_bytes``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections.abc import Mapping
from typing import Any

import attrs
from cachetools import TLRUCache

from ..clock import Clock
from ..errors import InvalidRequest, KeySourceError, MalformedToken
from ..jwk import signature_jwks
from ..jwks import JWKSource, build_opener, fetch_bytes
from ..keyring import KeyRing
from ..keys import Key, key_from_jwk
from ..tokens import MAX_NUMERIC_DATE, b64decode, strict_json_object
from .errors import InvalidClient

__all__ = ["Assertion", "IssuerKeys", "IssuerSource", "ReplayCache", "discover", "parse_assertion"]

log = logging.getLogger("jitbroker")

MAX_DISCOVERY_BYTES = 64 * 1024
MAX_JTI_LENGTH = 256
_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
# Header parameters that carry or point to a key: keys come from the issuer's
# JWKS only. crit (RFC 7515 4.1.11) names extensions we do not implement, and
# b64 is one of them; refusing both is what the RFC requires of us.
_KEY_HEADERS = frozenset({"jwk", "jku", "x5u", "x5c"})
# typ values of a JWT used as an assertion; anything else (at+jwt, dpop+jwt,
# logout+jwt, ...) is another kind of token and must not authenticate.
_TYPES = frozenset({None, "jwt", "application/jwt", "client-authentication+jwt"})


def refused(reason: str, message: str) -> InvalidClient:
    """The ``InvalidClient`` for ``reason``; the message is fixed text of ours."""
    return InvalidClient(message, reason=reason)


# -- parsing -----------------------------------------------------------------------
@attrs.frozen(repr=False)
class Assertion:
    """A parsed, not yet verified, compact JWS. Never printed: no repr of its parts."""

    header: Mapping[str, Any]
    payload: Mapping[str, Any]
    signing_input: bytes
    signature: bytes

    def __repr__(self) -> str:
        return "<Assertion>"

    @property
    def digest(self) -> str:
        """SHA-256 of the signed part: the replay key of a token without ``jti``.
        Not of the whole string: an ECDSA signature has two valid encodings."""
        return hashlib.sha256(self.signing_input).hexdigest()


def parse_assertion(assertion: object, max_bytes: int) -> Assertion:
    """Split and decode ``assertion`` (refusing what ``jitbroker.tokens`` refuses),
    and check its header; raises ``InvalidClient``. The payload is unverified."""
    if not isinstance(assertion, str) or not assertion:
        raise refused("malformed", "the assertion must be a non-empty string")
    if len(assertion) > max_bytes:  # first: nothing else may look at a huge input
        raise refused("too_large", f"the assertion is longer than {max_bytes} bytes")
    if assertion.count(".") != 2 or not _ALPHABET.issuperset(assertion):
        raise refused("malformed", "the assertion is not a compact JWS")
    head, body, signature = assertion.split(".")
    if not (head and body):
        raise refused("malformed", "the assertion is not a compact JWS")
    try:
        header = strict_json_object(b64decode(head), "header")
    except MalformedToken as exc:
        raise refused("malformed", f"the assertion is malformed: {exc}") from exc
    _check_header(header)  # before the signature: "alg none" is named as such
    if not signature:
        raise refused("malformed", "the assertion has no signature")
    try:
        payload = strict_json_object(b64decode(body), "payload")
        sig = b64decode(signature)
    except MalformedToken as exc:
        raise refused("malformed", f"the assertion is malformed: {exc}") from exc
    return Assertion(header, payload, f"{head}.{body}".encode("ascii"), sig)


def _check_header(header: Mapping[str, Any]) -> None:
    alg = header.get("alg")
    if not isinstance(alg, str) or alg.lower() == "none":
        raise refused("alg_not_allowed", "unsigned assertions (alg none) are never accepted")
    if "crit" in header or "b64" in header:
        raise refused("crit_header", "the assertion has a crit header, which is not supported")
    if _KEY_HEADERS.intersection(header):
        raise refused("key_in_header", "the assertion carries a key; keys come from the JWKS")
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.lower() not in _TYPES):
        raise refused("wrong_type", "the assertion's typ is not one of a JWT")
    kid = header.get("kid")
    if kid is not None and (not isinstance(kid, str) or not 0 < len(kid) <= 256):
        raise refused("malformed", "the assertion's kid must be a string")


def check_signature(assertion: Assertion, keys: KeyRing, algorithms: tuple[str, ...]) -> bool:
    """Whether ``keys`` holds the key the header names and it verifies; False if
    no such key (refresh, then ask again). Raises for a bad alg or signature."""
    alg = assertion.header["alg"]
    if alg not in algorithms:
        raise refused("alg_not_allowed", "the assertion's alg is not allowed for its issuer")
    key = _find_key(keys, assertion.header.get("kid"), alg)
    if key is None:
        return False
    if key.alg != alg:
        raise refused("alg_not_allowed", "the assertion's alg does not match its key")
    # Either S for ES256: other issuers' libraries do not normalize to low S,
    # and nothing is keyed on the signature bytes (replay uses jti or the digest).
    if not key.verify(assertion.signature, assertion.signing_input, allow_high_s=True):
        raise refused("bad_signature", "the assertion's signature does not verify")
    return True


def _find_key(keys: KeyRing, kid: object, alg: str) -> Key | None:
    if isinstance(kid, str):
        return keys.get(kid)
    # No kid: only unambiguous when the issuer has one key for this alg.
    candidates = [k for k in keys if k.alg == alg]
    return candidates[0] if len(candidates) == 1 else None


# -- claims ----------------------------------------------------------------------
def _numeric_date(payload: Mapping[str, Any], name: str) -> float | None:
    if name not in payload:
        return None
    value = payload[name]
    # bool is an int; inf and nan are floats; huge ints would overflow float.
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (0 <= value < MAX_NUMERIC_DATE)
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise refused("malformed", f"the assertion's {name} must be a NumericDate")
    return float(value)


def check_times(
    payload: Mapping[str, Any], now: float, leeway: float, max_lifetime: float
) -> float:
    """Check ``exp`` (required), ``nbf``, ``iat`` and the lifetime; return ``exp``."""
    exp = _numeric_date(payload, "exp")
    if exp is None:
        raise refused("missing_exp", "the assertion has no exp")
    if exp + leeway <= now:
        raise refused("expired", "the assertion has expired")
    nbf, iat = _numeric_date(payload, "nbf"), _numeric_date(payload, "iat")
    if nbf is not None and nbf > now + leeway:
        raise refused("not_yet_valid", "the assertion is not valid yet (nbf)")
    if iat is not None and iat > now + leeway:
        raise refused("not_yet_valid", "the assertion was issued in the future (iat)")
    if exp - now > max_lifetime or (iat is not None and exp - iat > max_lifetime):
        raise refused("lifetime_too_long", f"the assertion lives longer than {max_lifetime:g}s")
    return exp


def check_audience(payload: Mapping[str, Any], audience: str) -> None:
    """``aud`` (a string or a list of strings) must hold ``audience``."""
    aud = payload.get("aud")
    if isinstance(aud, str):
        ok = aud == audience
    elif isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
        ok = audience in aud
    elif aud is None:
        raise refused("wrong_audience", "the assertion has no aud")
    else:
        raise refused("malformed", "the assertion's aud must be a string or list of strings")
    if not ok:
        raise refused("wrong_audience", "the assertion is meant for another audience")


def string_claim(payload: Mapping[str, Any], name: str, reason: str = "malformed") -> str:
    """A required non-empty string claim (``iss``, ``sub``, ``jti``)."""
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise refused(reason, f"the assertion's {name} must be a non-empty string")
    return value


# -- replay --------------------------------------------------------------------------
def _until(_key: object, expires: float, _now: float) -> float:
    return expires


class ReplayCache:
    """Every accepted single-use assertion, by ``(issuer, jti)`` or, without a
    ``jti``, by ``(issuer, digest)``, kept until it expires (``exp`` + leeway).

    Bounded, and never forgets an entry early (that would let its assertion be
    replayed): when full of live entries it refuses new assertions instead.
    """

    def __init__(self, size: int, clock: Clock) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidRequest("replay_cache_size must be a whole number >= 1")
        self._seen: TLRUCache[tuple[str, str], float] = TLRUCache(size + 1, _until, timer=clock)
        self.size = size
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, key: tuple[str, str], expires: float) -> None:
        """Remember ``key`` until ``expires``; ``InvalidClient`` if seen already or full."""
        with self._lock:
            seen = self._seen
            seen.expire()
            if key in seen:
                raise refused("replayed", "the assertion was used before; each is good once")
            if len(seen) >= self.size:
                raise refused("replay_cache_full", "too many recent assertions; try again")
            seen[key] = expires


# -- keys --------------------------------------------------------------------------
class IssuerKeys(KeyRing):
    """A verify-only key ring that also finds keys by the issuer's own ``kid``."""

    __slots__ = ("_aliases",)

    def __init__(self, named: Mapping[str, Key], unnamed: tuple[Key, ...] = ()) -> None:
        # One Key per key: an issuer may publish one key under two kids.
        distinct = {k.kid: k for k in (*named.values(), *unnamed)}
        super().__init__(distinct.values())
        self._aliases = dict(named)

    def get(self, kid: str) -> Key | None:
        """The key the issuer calls ``kid``."""
        return self._aliases.get(kid)


def issuer_keys(document: Mapping[str, Any], origin: str) -> IssuerKeys:
    """An ``IssuerKeys`` from a JWKS document: keys for signatures only (``use``,
    ``key_ops``), of the types we verify; other keys are skipped, private ones
    refuse the whole document (``KeySourceError``)."""
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise KeySourceError(f'{origin} is not a JWKS: it has no "keys" list')
    try:
        usable = signature_jwks(entries)
    except InvalidRequest as exc:
        raise KeySourceError(f"{origin} was refused: {exc}") from exc
    named: dict[str, Key] = {}
    unnamed: list[Key] = []
    for jwk in usable:
        key = _load(jwk, origin)
        if key is None:
            continue
        kid = jwk.get("kid")
        if isinstance(kid, str) and kid:
            if kid in named:
                raise KeySourceError(f"{origin} has two keys with the same kid")
            named[kid] = key
        else:
            unnamed.append(key)
    return IssuerKeys(named, tuple(unnamed))


def _load(jwk: object, origin: str) -> Key | None:
    if not isinstance(jwk, Mapping):
        raise KeySourceError(f"{origin} has a key that is not a JSON object")
    try:
        key = key_from_jwk({k: v for k, v in jwk.items() if k != "kid"})
    except InvalidRequest as exc:  # an ES384 key, a 1024-bit RSA key, ...: not for us
        log.debug("skipping a key of %s: %s", origin, exc)
        return None
    if key.private:
        raise KeySourceError(f"{origin} holds private keys or secrets; it must be public")
    return key


class IssuerSource(JWKSource):
    """A ``JWKSource`` for another issuer's JWKS: the same fetch, parsed into
    ``IssuerKeys`` (keys found by the issuer's ``kid``)."""

    keys: IssuerKeys

    def parse(self, body: bytes) -> IssuerKeys:
        """The issuer's keys, by its own ``kid`` (``issuer_keys``)."""
        where = f"the JWKS at {self.where}"
        try:
            document = strict_json_object(body, "JWKS")
        except MalformedToken as exc:
            raise KeySourceError(f"{where} is not a strict JSON object") from exc
        return issuer_keys(document, where)


def discover(issuer: str, *, allow_http: bool, timeout: float) -> str:
    """The ``jwks_uri`` of ``issuer``'s OpenID Provider metadata (OIDC Discovery
    section 4), whose ``issuer`` must be exactly ``issuer``."""
    # issuer is a TrustRule's: https (or allowed http), no credentials or query.
    opener = build_opener(frozenset({"https", "http"} if allow_http else {"https"}))
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    body = fetch_bytes(
        opener,
        url,
        name="the discovery document",
        where=url,
        timeout=timeout,
        limit=MAX_DISCOVERY_BYTES,
    )
    where = f"the discovery document of {issuer}"
    try:
        document = strict_json_object(body, "discovery document")
    except MalformedToken as exc:
        raise KeySourceError(f"{where} is not a strict JSON object") from exc
    if document.get("issuer") != issuer:
        raise KeySourceError(f"{where} names another issuer; it must be exactly {issuer}")
    jwks_uri = document.get("jwks_uri")
    if not isinstance(jwks_uri, str) or not jwks_uri:
        raise KeySourceError(f"{where} has no jwks_uri")
    return jwks_uri
