"""From a verification failure to an HTTP answer: one pure function for every framework.

RFC 6750 section 3 (Bearer) and RFC 9449 section 7 (DPoP):

=====================================  ======  ==========================  =====================
failure                                status  ``error``                   extra
=====================================  ======  ==========================  =====================
``NoCredentials``                      401     (none: a bare challenge)
``MalformedRequest``                   400     ``invalid_request``
``InsufficientScope``                  403     ``insufficient_scope``      ``scope="..."``
``NonceRequired``                      401     ``use_dpop_nonce``          ``DPoP-Nonce`` header
``InvalidProof`` (``ProofReplayed``)   401     ``invalid_dpop_proof``
any other ``InvalidToken``             401     ``invalid_token``
``StoreError``, ``KeySourceError``     503     ``temporarily_unavailable``  ``Retry-After``
anything else                          500     ``server_error``
=====================================  ======  ==========================  =====================

The ``error_description`` is fixed per error class: it never carries a lease
id, a key id, an issuer, a scope the token holds or any other internal; the
exception's own message (which may) belongs in the audit log, not the response.
A 503 is never a 401: a client must not throw its token away because the
store is down.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import NamedTuple

from ..errors import (
    InsufficientScope,
    InvalidProof,
    InvalidRequest,
    InvalidToken,
    KeySourceError,
    ProofReplayed,
    StoreError,
    TokenExpired,
    TokenNotYetValid,
    TokenRevoked,
    WrongAudience,
)
from .errors import MalformedRequest, NoCredentials, NonceRequired

__all__ = ["DPOP_ALGS", "ErrorResponse", "challenge_param", "error_response"]

#: The proof algorithms ``ProofChecker`` accepts, advertised in the DPoP challenge.
DPOP_ALGS = ("EdDSA", "ES256", "RS256")
Headers = tuple[tuple[str, str], ...]
# A quoted-string that needs no escaping: printable ASCII but '"' and '\'.
_QUOTABLE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")


class ErrorResponse(NamedTuple):
    """What to send back: the status, the headers (in order) and the JSON body."""

    status: int
    headers: Headers
    body: bytes


# Fixed, client-safe descriptions, most specific class first. The signature,
# key, issuer and lease failures share one text on purpose: telling them apart
# helps whoever probes with forged tokens, not the legitimate client.
_DESCRIPTIONS: tuple[tuple[type[BaseException], str], ...] = (
    (TokenExpired, "the access token has expired"),
    (TokenNotYetValid, "the access token is not valid yet"),
    (TokenRevoked, "the access token has been revoked"),
    (WrongAudience, "the access token is not meant for this resource"),
    (ProofReplayed, "the DPoP proof was already used; send a new proof with each request"),
    (InvalidProof, "the DPoP proof is missing or invalid"),
    (InvalidToken, "the access token is invalid"),
)
_BOUND_AS_BEARER = "this access token is bound to a key: send it with the DPoP scheme and a proof"


def challenge_param(name: str, value: str) -> str:
    """``name="value"`` for a challenge; refuses values that would need escaping
    (every value we send is ours, so one that does is a bug, not an input)."""
    if not _QUOTABLE.fullmatch(value):
        raise InvalidRequest(f"a challenge's {name} must be printable ASCII, no quote or backslash")
    return f'{name}="{value}"'


def error_response(
    error: BaseException,
    *,
    realm: str | None = None,
    scheme: str | None = None,
    dpop: bool = True,
    scopes: Iterable[str] = (),
    retry_after: int = 5,
) -> ErrorResponse:
    """The status, headers and body that answer a request that failed with ``error``.

    Args:
        error: what verification raised (or a ``jitbroker.web.errors`` rejection).
        realm: the protection space named in every challenge (``realm="..."``).
        scheme: the scheme the request used, ``"Bearer"`` or ``"DPoP"`` (None if
            unknown): its challenge carries the error.
        dpop: whether DPoP is accepted here; adds the ``DPoP algs="..."`` challenge.
        scopes: the scopes the resource requires, for ``insufficient_scope``
            (default: the ones the token lacked).
        retry_after: seconds, for the ``Retry-After`` of a 503.
    """
    if isinstance(error, StoreError | KeySourceError):
        return _json(
            503,
            (("Retry-After", str(int(retry_after))),),
            "temporarily_unavailable",
            "the credentials cannot be checked right now; try again later",
        )
    dpop = dpop or scheme == "DPoP"
    if isinstance(error, NoCredentials):
        return _json(401, _challenges(realm, dpop, "", None), None, "an access token is required")
    if isinstance(error, MalformedRequest):
        return _challenged(400, realm, scheme, dpop, "invalid_request", _MALFORMED)
    if isinstance(error, InsufficientScope):
        scope = " ".join(sorted(set(scopes))) or " ".join(error.missing)
        extra = (", " + challenge_param("scope", scope)) if scope else ""
        return _challenged(403, realm, scheme, dpop, "insufficient_scope", _SCOPE, extra)
    if isinstance(error, NonceRequired):
        response = _challenged(401, realm, "DPoP", True, "use_dpop_nonce", _NONCE)
        return response._replace(headers=(*response.headers, ("DPoP-Nonce", error.nonce)))
    if isinstance(error, InvalidProof) and scheme == "DPoP":
        return _challenged(401, realm, scheme, dpop, "invalid_dpop_proof", _describe(error))
    if isinstance(error, InvalidProof):  # a key-bound token sent as a plain bearer token
        return _challenged(401, realm, scheme, dpop, "invalid_token", _BOUND_AS_BEARER)
    if isinstance(error, InvalidToken):
        return _challenged(401, realm, scheme, dpop, "invalid_token", _describe(error))
    return _json(500, (), "server_error", "the server could not check the credentials")


_MALFORMED = "the Authorization or DPoP header is malformed"
_SCOPE = "the access token lacks a scope this resource requires"
_NONCE = "the resource server requires a DPoP nonce: retry with the one in DPoP-Nonce"


def _describe(error: BaseException) -> str:
    for cls, text in _DESCRIPTIONS:
        if isinstance(error, cls):
            return text
    return "the access token is invalid"  # pragma: no cover - InvalidToken is last above


def _challenged(
    status: int,
    realm: str | None,
    scheme: str | None,
    dpop: bool,
    code: str,
    description: str,
    extra: str = "",
) -> ErrorResponse:
    params = (
        challenge_param("error", code) + ", " + challenge_param("error_description", description)
    )
    return _json(status, _challenges(realm, dpop, params + extra, scheme), code, description)


def _challenges(realm: str | None, dpop: bool, params: str, scheme: str | None) -> Headers:
    """One ``WWW-Authenticate`` per accepted scheme; ``params`` go on the one the
    request used (Bearer when it is not known)."""
    base = challenge_param("realm", realm) if realm else ""
    bearer, proof = base, ", ".join(p for p in (base, 'algs="' + " ".join(DPOP_ALGS) + '"') if p)
    if params and scheme == "DPoP":
        proof = f"{proof}, {params}"
    elif params:
        bearer = f"{bearer}, {params}" if bearer else params
    headers = [("WWW-Authenticate", f"Bearer {bearer}".rstrip())]
    if dpop:
        headers.append(("WWW-Authenticate", f"DPoP {proof}"))
    return tuple(headers)


def _json(status: int, headers: Headers, code: str | None, description: str) -> ErrorResponse:
    payload = (
        {"error": code, "error_description": description}
        if code
        else {"error_description": description}
    )
    body = json.dumps(payload, separators=(",", ":")).encode()
    return ErrorResponse(
        status,
        (*headers, ("Content-Type", "application/json"), ("Cache-Control", "no-store")),
        body,
    )
