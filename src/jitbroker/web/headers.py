"""Reading the credentials a request presents: ``Authorization`` and ``DPoP`` (no I/O).

The header values arrive as ``str`` (ASGI bytes decoded as latin-1, as WSGI
does), so nothing here can fail to decode: a NUL, a tab or a non-ASCII byte is
just a character the grammar refuses. Schemes are case-insensitive (RFC 7235
section 2.1); the token must be an RFC 6750 ``b64token``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import NamedTuple

from ..errors import InvalidProof
from ..tokens import MAX_TOKEN_LENGTH
from .errors import MalformedRequest, NoCredentials

__all__ = ["MAX_AUTHORIZATION", "Presented", "presented"]

# A token of ours is at most MAX_TOKEN_LENGTH characters: a longer header can
# only be refused, so it is, before any regular expression reads it.
MAX_AUTHORIZATION = MAX_TOKEN_LENGTH + 64
# RFC 7235: auth-scheme = token, then 1*SP, then the credentials; RFC 6750
# section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_SCHEME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# bytes.translate deletes these in one C pass: 4x quicker than a regex over a
# 400-character token, and this runs on every request.
_B64TOKEN = (string.ascii_letters + string.digits + "-._~+/").encode()
_OWS = " \t"  # a field value's surrounding whitespace is not part of it (RFC 9110 5.5)


class Presented(NamedTuple):
    """What the request presents: the scheme (``"Bearer"`` or ``"DPoP"``), the
    access token, and for DPoP the proof (None when there is no DPoP header)."""

    scheme: str
    token: str
    proof: str | None


def presented(
    authorization: Sequence[str], dpop_headers: Sequence[str], *, dpop: bool = True
) -> Presented:
    """The credentials in the request's ``Authorization`` and ``DPoP`` header values.

    Raises ``NoCredentials`` when there are none of an accepted scheme (no
    header, or e.g. ``Basic``), ``MalformedRequest`` when the header is there
    but broken (two of them, too long, no token, bad characters), and
    ``InvalidProof`` for a DPoP request with more than one ``DPoP`` header.
    """
    if not authorization:
        raise NoCredentials("the request has no Authorization header")
    if len(authorization) > 1:
        raise MalformedRequest("the request has more than one Authorization header")
    value = authorization[0]
    if len(value) > MAX_AUTHORIZATION:
        raise MalformedRequest(f"the Authorization header is longer than {MAX_AUTHORIZATION}")
    scheme, _, token = value.strip(_OWS).partition(" ")
    folded = scheme.lower()
    if folded == "bearer":
        scheme = "Bearer"
    elif folded == "dpop" and dpop:
        scheme = "DPoP"
    elif _SCHEME.fullmatch(scheme):  # RFC 6750 3.1: an unsupported scheme is no credentials
        raise NoCredentials("the Authorization header uses a scheme this resource does not take")
    else:
        raise MalformedRequest("the Authorization header is not 'scheme token'")
    token = token.lstrip(" ")
    if not _is_b64token(token):
        raise MalformedRequest(f"the {scheme} credentials are not one b64token")
    if scheme == "Bearer":
        return Presented(scheme, token, None)
    if len(dpop_headers) > 1:  # RFC 9449 section 4.3, check 1
        raise InvalidProof("the request has more than one DPoP header")
    proof = dpop_headers[0].strip(_OWS) if dpop_headers else None
    return Presented(scheme, token, proof)


def _is_b64token(token: str) -> bool:
    body = token.rstrip("=")
    return bool(body) and body.isascii() and not body.encode("ascii").translate(None, _B64TOKEN)
