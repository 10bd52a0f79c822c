"""Token minting and parsing: compact JWS and opaque tokens (the hot path).

Parsing is strict and ordered so that nothing expensive or ambiguous happens
before the cheap checks pass: a length cap, then the compact format (three
base64url segments, canonical, unpadded), then the header (matched byte-exact
against the headers our own keys produce, or parsed strictly), then the
signature with the algorithm pinned by the key, and only then the payload.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

from .errors import BadSignature, InvalidRequest, MalformedToken, UnknownKey
from .keyring import KeyRing
from .keys import TOKEN_TYPE, Key, b64url
from .lease import Claims, Lease

__all__ = ["OPAQUE_PREFIX", "decode_jws", "encode_jws", "is_opaque", "new_identity"]

MAX_TOKEN_LENGTH = 8192
MAX_NUMERIC_DATE = 2**53  # time claims beyond this are refused, not overflowed
OPAQUE_PREFIX = "jbo_"
# Bound once: the identity of every lease is drawn on the issue hot path.
_urandom = os.urandom
# BLAKE2s (RFC 7693): a cryptographic hash, and the cheapest one to call here.
_hash = hashlib.blake2s
_LEASE_ID = re.compile(r"[0-9a-f]{32}")
_JKT = re.compile(r"[A-Za-z0-9_-]{43}")
_OPAQUE = re.compile(r"jbo_[0-9a-f]{64}")
_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
# Final base64url characters whose unused low bits are zero: for a segment of
# length 4k+2 the last character carries 4 spare bits, for 4k+3 it carries 2.
_CANONICAL_LAST = {
    2: frozenset("AQgw"),
    3: frozenset("AEIMQUYcgkosw048"),
}
_REQUIRED_STR = ("iss", "sub", "aud", "jti")
_REQUIRED_INT = ("iat", "nbf", "exp")
_OPTIONAL_STR = ("task", "owner", "purpose", "parent")
_FORBIDDEN_HEADERS = frozenset({"jwk", "jku", "x5u", "x5c", "x5t", "x5t#S256", "crit", "b64"})
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode
json_text = _dumps  # compact ASCII JSON, as every JOSE segment we write


# -- minting ----------------------------------------------------------------
def jws_payload(lease: Lease, issuer: str, iat: int) -> dict[str, Any]:
    """The JWT claims for ``lease``, signed at ``iat``. Times are whole seconds."""
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": lease.subject,
        "aud": lease.audience,
        "iat": iat,
        "nbf": iat,
        "exp": int(lease.expires_at),  # floor: the token never outlives its lease
        "jti": lease.id,
        "scope": " ".join(lease.scopes),
    }
    if lease.task is not None:
        claims["task"] = lease.task
    if lease.owner is not None:
        claims["owner"] = lease.owner
    if lease.purpose is not None:
        claims["purpose"] = lease.purpose
    if lease.parent is not None:
        claims["parent"] = lease.parent
    if lease.holder is not None:
        claims["cnf"] = {"jkt": lease.holder}  # RFC 9449 section 6.1
    return claims


def act_claim(lease: Lease, chain: Sequence[Lease]) -> dict[str, Any]:
    """The RFC 8693 (section 4.1) ``act`` claim of a delegated lease's token.

    ``chain`` is the lease's ancestors, nearest first, ending at the root whose
    subject is the token's ``sub`` (the principal). Each actor, the current one
    outermost and prior ones nested inside, is ``{"sub": <its subject>,
    "delegated_from": <the lease id it was delegated from>}``.
    """
    act: dict[str, Any] = {}
    for actor, source in reversed(list(zip((lease, *chain[:-1]), chain, strict=True))):
        act = {"sub": actor.subject, "delegated_from": source.id, **({"act": act} if act else {})}
    return act


def encode_jws(key: Key, claims: dict[str, Any]) -> str:
    """Sign ``claims`` with ``key``; the protected header was encoded once, with the key.

    Refuses (``InvalidRequest``) a token longer than verifiers accept: issuing
    one would store a lease whose token can never verify.
    """
    signing_input = key.header + "." + b64url(_dumps(claims).encode("ascii"))
    token = signing_input + "." + b64url(key.sign(signing_input.encode("ascii")))
    if len(token) > MAX_TOKEN_LENGTH:  # a length read on the built string: free on the hot path
        raise _too_long(len(token), claims)
    return token


# Claims of a fixed, small size: never the ones to shorten.
_FIXED = frozenset({"iat", "nbf", "exp", "jti", "cnf"})
# The claims a caller's inputs fill, as the caller named them (others by claim name).
_CLAIM_INPUTS = {
    "scope": "scopes",
    "sub": "subject",
    "aud": "audience",
    "act": "delegation chain",
    "task": "task",
    "owner": "owner",
    "purpose": "purpose",
}


def _too_long(length: int, claims: dict[str, Any]) -> InvalidRequest:
    """The error naming the largest variable-size claims, as the caller's inputs."""
    sizes = sorted(
        ((len(_dumps(v)), _CLAIM_INPUTS.get(k, k)) for k, v in claims.items() if k not in _FIXED),
        reverse=True,
    )
    largest = ", ".join(f"{name} ({n} characters encoded)" for n, name in sizes[:3])
    return InvalidRequest(
        f"the token would be {length} characters, more than the {MAX_TOKEN_LENGTH} a verifier "
        f"accepts; shorten the largest inputs: {largest}"
    )


def new_identity(opaque: bool) -> tuple[str, str | None]:
    """A new lease id, and for an opaque token the token as well.

    A JWS lease id (its ``jti``) is 128 random bits. An opaque token is 256
    random bits and its lease id is a hash of them (as ``opaque_lease_id``,
    inlined on this hot path), so the store never sees the token.
    """
    if not opaque:
        return _urandom(16).hex(), None
    secret = _urandom(32)
    return _hash(secret).hexdigest()[:32], OPAQUE_PREFIX + secret.hex()


def is_lease_id(value: str) -> bool:
    """True if ``value`` has the form of a lease id (32 lowercase hex characters)."""
    return _LEASE_ID.fullmatch(value) is not None


def opaque_lease_id(token: str) -> str:
    """The lease id of a well-formed opaque token: the first 128 bits, in hex, of
    the BLAKE2s-256 hash of its 32 random bytes."""
    return _hash(bytes.fromhex(token[len(OPAQUE_PREFIX) :])).hexdigest()[:32]


def is_opaque(token: str) -> bool:
    """True if ``token`` has the opaque prefix (it may still be malformed)."""
    return token.startswith(OPAQUE_PREFIX)


def check_opaque(token: str) -> str:
    """The lease id of a well-formed opaque token, or ``MalformedToken``."""
    if not _OPAQUE.fullmatch(token):
        raise MalformedToken("not a well-formed opaque token")
    return opaque_lease_id(token)


# -- parsing ----------------------------------------------------------------
def b64decode(segment: str) -> bytes:
    """Decode an unpadded base64url segment, refusing non-canonical encodings.

    The caller has already checked the alphabet with ``_COMPACT``.
    """
    rem = len(segment) % 4
    if rem == 1 or (rem and segment[-1] not in _CANONICAL_LAST[rem]):
        raise MalformedToken("token segment is not canonical base64url")
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-rem % 4))
    except binascii.Error as exc:  # pragma: no cover - excluded by the checks above
        raise MalformedToken("token segment is not valid base64url") from exc


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise MalformedToken("token JSON has duplicate member names")
    return obj


def _no_constants(name: str) -> Any:
    raise MalformedToken(f"token JSON contains {name}, which is not JSON")


_loads = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants).decode


MAX_JSON_DEPTH = 32  # nesting levels; our tokens, proofs and JWKS use at most 3
# A JSON string can only hold a lone surrogate through a \uD800-\uDFFF escape
# (strict UTF-8 refuses encoded ones), so text without one needs no walk.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# A string (skipped whole, so an unterminated one ends the scan in one step:
# linear time) or a bracket; the parser sees strings where this scan does.
_DEPTH_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.S)
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def strict_json_object(data: bytes, what: str) -> dict[str, Any]:
    """Parse UTF-8 JSON that must be an object: no duplicate members, no NaN,
    no nesting deeper than ``MAX_JSON_DEPTH``, no lone surrogates."""
    try:
        text = data.decode("utf-8")
        # Fewer brackets than the cap cannot nest past it: the common case is
        # two C-speed counts, and the scan runs only on suspicious input.
        if text.count("[") + text.count("{") > MAX_JSON_DEPTH:
            _check_depth(text, what)
        obj = _loads(text)
    except MalformedToken:
        raise
    except (ValueError, RecursionError) as exc:  # bad UTF-8/JSON, huge ints
        raise MalformedToken(f"token {what} is not valid JSON") from exc
    if not isinstance(obj, dict):
        raise MalformedToken(f"token {what} must be a JSON object")
    if "\\u" in text and _SURROGATE_ESCAPE.search(text) is not None:  # cheap test first
        _check_strings(obj, what)
    return obj


def _check_depth(text: str, what: str) -> None:
    """Refuse nesting deeper than the cap, before the recursive parser sees it."""
    depth = 0
    for token in _DEPTH_TOKEN.findall(text):
        depth += _DEPTH_STEP.get(token, 0)
        if depth > MAX_JSON_DEPTH:
            raise MalformedToken(f"token {what} nests deeper than {MAX_JSON_DEPTH} levels")


def _check_strings(obj: object, what: str) -> None:
    """Refuse lone surrogates in any member name or string value: they are not
    Unicode text, and other parsers replace or reject them differently."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and _SURROGATE.search(item) is not None:
            raise MalformedToken(f"token {what} has a string with a lone surrogate")


def decode_jws(token: object, keys: KeyRing) -> tuple[Key, dict[str, Any]]:
    """Check format, header and signature; return the key and the (untyped) payload."""
    if not isinstance(token, str):
        raise MalformedToken(f"a token must be a string, not {type(token).__name__}")
    if len(token) > MAX_TOKEN_LENGTH:
        raise MalformedToken(f"token longer than {MAX_TOKEN_LENGTH} characters")
    if not _COMPACT.fullmatch(token):
        raise MalformedToken("not a compact JWS (three base64url segments separated by dots)")
    header, payload, signature = token.split(".")
    key = keys.by_header(header) or _key_from_header(header, keys)
    sig = b64decode(signature)
    signing_input = token[: len(header) + len(payload) + 1].encode("ascii")
    if not key.verify(sig, signing_input):
        raise BadSignature(f"signature does not verify under key {key.kid}")
    return key, strict_json_object(b64decode(payload), "payload")


def _key_from_header(segment: str, keys: KeyRing) -> Key:
    """Slow path for headers our keys did not produce byte for byte: parse strictly."""
    header = strict_json_object(b64decode(segment), "header")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg.lower() == "none":
        raise MalformedToken("unsigned tokens (alg none) are never accepted")
    forbidden = _FORBIDDEN_HEADERS.intersection(header)
    if forbidden:
        raise MalformedToken(f"header parameters {sorted(forbidden)} are not accepted")
    typ = header.get("typ")
    if typ not in (TOKEN_TYPE, "application/" + TOKEN_TYPE):
        raise MalformedToken(f"token typ must be {TOKEN_TYPE!r}")
    kid = header.get("kid")
    if not isinstance(kid, str):
        raise MalformedToken("token header has no kid")
    key = keys.get(kid)
    if key is None:
        raise UnknownKey(f"no key with kid {kid[:64]!r}")
    if alg != key.alg:
        raise BadSignature(f"token alg {alg[:16]!r} does not match key {kid}'s alg {key.alg}")
    return key


def claims_from_payload(payload: dict[str, Any], key: Key) -> Claims:
    """Type-check the payload into ``Claims``; required claims are always required."""
    for name in _REQUIRED_STR:
        if not isinstance(payload.get(name), str) or not payload[name]:
            raise MalformedToken(f"claim {name!r} is required and must be a non-empty string")
    for name in _REQUIRED_INT:
        value = payload.get(name)
        if type(value) is not int:  # bool and float are refused on purpose
            raise MalformedToken(f"claim {name!r} is required and must be an integer")
        if not 0 <= value < MAX_NUMERIC_DATE:  # also keeps float arithmetic exact
            raise MalformedToken(f"claim {name!r} is out of range")
    for name in _OPTIONAL_STR:
        if name in payload and not isinstance(payload[name], str):
            raise MalformedToken(f"claim {name!r} must be a string")
    return Claims(
        lease_id=payload["jti"],
        issuer=payload["iss"],
        subject=payload["sub"],
        audience=payload["aud"],
        scopes=_scope_set(payload.get("scope", "")),
        issued_at=payload["iat"],
        not_before=payload["nbf"],
        expires_at=payload["exp"],
        key_id=key.kid,
        task=payload.get("task"),
        owner=payload.get("owner"),
        purpose=payload.get("purpose"),
        parent=payload.get("parent"),
        holder=_holder(payload),
        **_delegation(payload),
        raw=MappingProxyType(payload),
    )


def _delegation(payload: dict[str, Any]) -> dict[str, Any]:
    """``actor`` and ``delegated_by`` for ``Claims``, from the ``act`` claim."""
    if "act" not in payload:
        if "parent" in payload:
            raise MalformedToken("a token with a 'parent' claim must carry an 'act' claim")
        return {}
    actor, sources = _actors(payload["act"])
    if sources[0] != payload.get("parent"):
        raise MalformedToken("claim 'act' must name the token's 'parent' lease first")
    return {"actor": actor, "delegated_by": sources}


MAX_ACT_DEPTH = 16  # delegation chains are a few links; anything deeper is hostile


def _actors(act: object) -> tuple[str, tuple[str, ...]]:
    """The current actor's subject and the lease ids each actor was delegated
    from, nearest first; strictly typed, bounded."""
    current: str | None = None
    sources: list[str] = []
    while True:
        if (
            not isinstance(act, dict)
            or not isinstance(act.get("sub"), str)
            or not act["sub"]
            or not isinstance(act.get("delegated_from"), str)
            or not _LEASE_ID.fullmatch(act["delegated_from"])
            or not set(act) <= {"sub", "delegated_from", "act"}
            or len(sources) >= MAX_ACT_DEPTH
        ):
            raise MalformedToken(
                'claim \'act\' must nest {"sub", "delegated_from"[, "act"]} objects'
            )
        current = act["sub"] if current is None else current
        sources.append(act["delegated_from"])
        if "act" not in act:
            return current, tuple(sources)
        act = act["act"]


def _holder(payload: dict[str, Any]) -> str | None:
    if "cnf" not in payload:
        return None
    cnf = payload["cnf"]
    if not isinstance(cnf, dict) or set(cnf) != {"jkt"} or not _JKT.fullmatch(str(cnf["jkt"])):
        raise MalformedToken("claim 'cnf' must be {\"jkt\": <a SHA-256 JWK thumbprint>}")
    return str(cnf["jkt"])


def _scope_set(scope: object) -> frozenset[str]:
    if not isinstance(scope, str):
        raise MalformedToken("claim 'scope' must be a space-delimited string")
    if not scope:
        return frozenset()
    items = scope.split(" ")
    if "" in items:
        raise MalformedToken("claim 'scope' has empty entries")
    return frozenset(items)
