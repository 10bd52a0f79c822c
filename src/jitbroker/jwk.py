"""JWK encoding of key material (RFC 7517, 7518) and thumbprints (RFC 7638).

Pure conversions between ``cryptography`` key objects (or HMAC secret bytes)
and JWK dicts; ``keys.Key`` wraps the result and checks its strength.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .errors import InvalidRequest

__all__ = [
    "b64url",
    "material_from_jwk",
    "oct_jwk",
    "private_jwk",
    "public_jwk",
    "signature_jwks",
    "thumbprint",
    "verifies_signatures",
]

PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JOSE wants it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(value: object, member: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"JWK member {member!r} must be a non-empty base64url string")
    try:  # validate=True: a stray character is an error, not silently dropped
        return base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_", validate=True)
    except ValueError as exc:
        raise InvalidRequest(f"JWK member {member!r} is not valid base64url") from exc


def _int_member(jwk: Mapping[str, Any], member: str) -> int:
    return int.from_bytes(_b64url_decode(jwk.get(member), member), "big")


def _uint(value: int, length: int | None = None) -> str:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return b64url(value.to_bytes(size, "big"))


def thumbprint(public_jwk: Mapping[str, str]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256) of the required members."""
    required = {
        "OKP": ("crv", "kty", "x"),
        "EC": ("crv", "kty", "x", "y"),
        "RSA": ("e", "kty", "n"),
        "oct": ("k", "kty"),
    }[public_jwk["kty"]]
    canonical = json.dumps({m: public_jwk[m] for m in required}, separators=(",", ":"))
    return b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def oct_jwk(secret: bytes) -> dict[str, str]:
    """The JWK of an HMAC secret (a secret itself: never published)."""
    return {"kty": "oct", "k": b64url(secret)}


def public_jwk(pub: PublicKey) -> dict[str, str]:
    """The required members of a public key's JWK (what the thumbprint covers)."""
    if isinstance(pub, ed25519.Ed25519PublicKey):
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}
    if isinstance(pub, ec.EllipticCurvePublicKey):
        nums = pub.public_numbers()
        return {"kty": "EC", "crv": "P-256", "x": _uint(nums.x, 32), "y": _uint(nums.y, 32)}
    nums_rsa = pub.public_numbers()
    return {"kty": "RSA", "n": _uint(nums_rsa.n), "e": _uint(nums_rsa.e)}


def private_jwk(alg: str, material: Any) -> dict[str, str]:
    """The JWK of private material, secret members included. Handle with care."""
    if alg == "HS256":
        return oct_jwk(material)
    jwk = public_jwk(material.public_key())
    if alg == "EdDSA":
        raw = material.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return {**jwk, "d": b64url(raw)}
    if alg == "ES256":
        return {**jwk, "d": _uint(material.private_numbers().private_value, 32)}
    n = material.private_numbers()
    extra = {"d": n.d, "p": n.p, "q": n.q, "dp": n.dmp1, "dq": n.dmq1, "qi": n.iqmp}
    return {**jwk, **{k: _uint(v) for k, v in extra.items()}}


# Members only a private JWK has (RFC 7518 6.2.2, 6.3.2); an oct key is all secret.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth"})


def verifies_signatures(jwk: Mapping[str, Any]) -> bool:
    """True unless the JWK's ``use`` or ``key_ops`` (RFC 7517 4.2, 4.3) rule out
    verifying signatures with it.

    Both members are optional. When present, ``use`` must be exactly ``"sig"``
    (values are case-sensitive: ``"enc"`` and values we do not know are not a
    signature use) and ``key_ops`` must be a list holding ``"verify"``. A
    malformed member rules the key out too: a key nobody declared fit for
    signatures does not vouch for tokens.
    """
    if jwk.get("use", "sig") != "sig":
        return False
    if "key_ops" not in jwk:
        return True
    ops = jwk["key_ops"]
    return isinstance(ops, list) and "verify" in ops


def signature_jwks(keys: Iterable[Any]) -> list[Any]:
    """The entries of a JWKS ``keys`` list that may verify signatures, in order.

    Keys ``verifies_signatures`` rules out are skipped, not refused: a JWKS that
    mixes signature and encryption keys is normal, and an encryption key may be
    of a type we cannot load. A skipped key holding private material is still
    refused (``InvalidRequest``): a published JWKS with a secret in it is a leak
    to fix, whatever the key is for. Entries that are not objects are kept, for
    the JWK loader to refuse.
    """
    kept: list[Any] = []
    for jwk in keys:
        if not isinstance(jwk, Mapping) or verifies_signatures(jwk):
            kept.append(jwk)
        elif jwk.get("kty") == "oct" or not _PRIVATE_MEMBERS.isdisjoint(jwk):
            raise InvalidRequest(
                "a JWKS for verification must not contain private keys or HMAC secrets"
            )
    return kept


def material_from_jwk(jwk: Mapping[str, Any]) -> object:
    """The key object (or HMAC secret bytes) a JWK describes; private if it has ``d``/``k``.

    Raises ``InvalidRequest`` for an unsupported ``kty`` or malformed members;
    ``cryptography`` may raise ``ValueError`` for inconsistent numbers.
    """
    kty = jwk.get("kty")
    loader = _KTY_LOADERS.get(kty) if isinstance(kty, str) else None
    if loader is None:
        raise InvalidRequest(f"unsupported JWK kty {str(kty)[:32]!r}")
    return loader(jwk)


def _okp_from_jwk(jwk: Mapping[str, Any]) -> object:
    if jwk.get("crv") != "Ed25519":
        raise InvalidRequest(f"OKP JWKs must use crv Ed25519, got {jwk.get('crv')!r}")
    if "d" in jwk:
        priv = ed25519.Ed25519PrivateKey.from_private_bytes(_b64url_decode(jwk["d"], "d"))
        if "x" in jwk and public_jwk(priv.public_key()) != _okp_public(jwk):
            raise InvalidRequest("OKP JWK: x does not match d")
        return priv
    return ed25519.Ed25519PublicKey.from_public_bytes(_b64url_decode(jwk.get("x"), "x"))


def _okp_public(jwk: Mapping[str, Any]) -> dict[str, str]:
    return {"kty": "OKP", "crv": "Ed25519", "x": jwk["x"]}


def _ec_from_jwk(jwk: Mapping[str, Any]) -> object:
    if jwk.get("crv") != "P-256":
        raise InvalidRequest(f"EC JWKs must use crv P-256, got {jwk.get('crv')!r}")
    pub = ec.EllipticCurvePublicNumbers(
        _int_member(jwk, "x"), _int_member(jwk, "y"), ec.SECP256R1()
    )
    if "d" in jwk:
        return ec.EllipticCurvePrivateNumbers(_int_member(jwk, "d"), pub).private_key()
    return pub.public_key()


def _rsa_from_jwk(jwk: Mapping[str, Any]) -> object:
    pub = rsa.RSAPublicNumbers(_int_member(jwk, "e"), _int_member(jwk, "n"))
    if "d" not in jwk:
        return pub.public_key()
    nums = rsa.RSAPrivateNumbers(
        p=_int_member(jwk, "p"),
        q=_int_member(jwk, "q"),
        d=_int_member(jwk, "d"),
        dmp1=_int_member(jwk, "dp"),
        dmq1=_int_member(jwk, "dq"),
        iqmp=_int_member(jwk, "qi"),
        public_numbers=pub,
    )
    return nums.private_key()


def _oct_from_jwk(jwk: Mapping[str, Any]) -> object:
    return _b64url_decode(jwk.get("k"), "k")


_KTY_LOADERS: dict[str, Callable[[Mapping[str, Any]], object]] = {
    "OKP": _okp_from_jwk,
    "EC": _ec_from_jwk,
    "RSA": _rsa_from_jwk,
    "oct": _oct_from_jwk,
}
