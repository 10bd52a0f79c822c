"""Client secrets (RFC 6749 section 2.3.1): scrypt hashes and HTTP Basic.

Only a hash is ever configured: scrypt (RFC 7914, ``hashlib.scrypt``) with a
random salt, its parameters encoded with it, compared in constant time. An
unknown client id costs the same scrypt as a known one, so response times do
not tell which client ids exist. A configured hash's parameters are bounded:
a hash must not make every request cost seconds or gigabytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from urllib.parse import unquote_plus

from ..errors import InvalidRequest
from ..jwk import b64url
from .assertions import refused

__all__ = [
    "MAX_AUTHORIZATION",
    "MAX_SECRET",
    "basic_credentials",
    "check_hash",
    "hash_client_secret",
    "secret_matches",
]

MAX_SECRET = 1024  # a longer secret is refused before any scrypt: no unbounded input
MAX_AUTHORIZATION = 4096
_SCRYPT = "scrypt"
_N, _R, _P = 2**14, 8, 1  # 16 MiB, ~20-50 ms: the secrets are random, not passwords
_MIN_SECRET = 16


def hash_client_secret(secret: str) -> str:
    """The hash to configure a ``ClientSecret`` with: scrypt (RFC 7914) with a
    random 16-byte salt, encoded with its parameters as
    ``scrypt$n=16384,r=8,p=1$<salt>$<hash>`` (base64url)."""
    if not isinstance(secret, str) or len(secret) < _MIN_SECRET:
        raise InvalidRequest(f"a client secret must be a string of {_MIN_SECRET}+ characters")
    salt = os.urandom(16)
    digest = _scrypt(secret, salt, _N, _R, _P)
    return f"{_SCRYPT}$n={_N},r={_R},p={_P}${b64url(salt)}${b64url(digest)}"


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        secret.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + 2**20, dklen=32
    )


def check_hash(value: object, field: str) -> tuple[int, int, int, bytes, bytes]:
    """The scrypt parameters, salt and digest of a hash from ``hash_client_secret``;
    ``InvalidRequest`` naming ``field`` for anything else, or costs out of bounds."""
    try:
        if not isinstance(value, str):
            raise ValueError
        scheme, params, salt, digest = value.split("$")
        numbers = dict(item.split("=") for item in params.split(","))
        n, r, p = int(numbers["n"]), int(numbers["r"]), int(numbers["p"])
        salt_bytes = base64.urlsafe_b64decode(salt + "=" * (-len(salt) % 4))
        digest_bytes = base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4))
    except (ValueError, KeyError, binascii.Error) as exc:
        raise InvalidRequest(f"{field} is not a hash made by hash_client_secret()") from exc
    if (
        scheme != _SCRYPT
        or set(numbers) != {"n", "r", "p"}
        or not (2**10 <= n <= 2**20 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16)
        or len(salt_bytes) < 8
        or len(digest_bytes) != 32
    ):
        raise InvalidRequest(f"{field} is not a hash made by hash_client_secret()")
    return n, r, p, salt_bytes, digest_bytes


# A hash nobody's secret matches, checked for unknown client ids so that the
# answer takes as long as for a known one (no client-id enumeration by timing).
_DUMMY_HASH = f"{_SCRYPT}$n={_N},r={_R},p={_P}${b64url(bytes(16))}${b64url(bytes(32))}"


def secret_matches(secret: str, encoded: str | None) -> bool:
    """Whether ``secret`` hashes to ``encoded``, compared in constant time. None
    (an unknown client) costs one scrypt too, and is False."""
    n, r, p, salt, digest = check_hash(_DUMMY_HASH if encoded is None else encoded, "secret_hash")
    return hmac.compare_digest(_scrypt(secret, salt, n, r, p), digest) and encoded is not None


def basic_credentials(authorization: str) -> tuple[str, str]:
    """(client_id, secret) from an ``Authorization: Basic`` header: base64 of the
    form-encoded id and secret joined by ``:`` (RFC 6749 section 2.3.1).
    ``InvalidClient`` (``too_large``, ``malformed``) otherwise."""
    if len(authorization) > MAX_AUTHORIZATION:
        raise refused("too_large", "the Authorization header is too long")
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError) as exc:
        raise refused("malformed", "the Basic credentials are not valid base64") from exc
    client_id, colon, secret = decoded.partition(":")
    if not colon:
        raise refused("malformed", "the Basic credentials have no ':'")
    return unquote_plus(client_id), unquote_plus(secret)
