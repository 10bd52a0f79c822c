"""Signing keys: one ``Key`` per key, loaded, generated or exported.

A ``Key`` pins exactly one algorithm: a token is verified with the algorithm of
the key its ``kid`` names, never with one read from the token. Key ids are RFC
7638 JWK thumbprints. Keys cannot be printed or pickled.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Mapping
from typing import Any, NoReturn

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from .errors import InvalidRequest
from .jwk import b64url, material_from_jwk, oct_jwk, private_jwk, public_jwk, thumbprint

__all__ = ["ALGORITHMS", "Key", "b64url", "thumbprint"]

ALGORITHMS = ("EdDSA", "ES256", "RS256", "HS256")
TOKEN_TYPE = "at+jwt"
MIN_RSA_BITS = 2048
MIN_HMAC_BYTES = 32
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_LOW_S_MAX = _P256_ORDER // 2  # the largest S jitbroker signs with (and accepts in tokens)


class Key:
    """One key with one algorithm. Signs if it holds private material; always verifies.

    ``header`` is the encoded JWS protected header, computed once because it is
    the same for every token this key signs.
    """

    __slots__ = ("_material", "_public_jwk", "_verifier", "alg", "header", "kid", "private")

    def __init__(self, alg: str, material: Any, public_jwk: dict[str, str] | None) -> None:
        self.alg = alg
        self._material = material
        self._public_jwk = public_jwk
        self.private = not isinstance(material, _PUBLIC_TYPES)
        # Derived once: verification must not rebuild the public key per token.
        self._verifier = material.public_key() if self.private and alg != "HS256" else material
        self.kid = thumbprint(public_jwk if public_jwk is not None else oct_jwk(material))
        header = {"alg": alg, "typ": TOKEN_TYPE, "kid": self.kid}
        self.header = b64url(json.dumps(header, separators=(",", ":")).encode("ascii"))

    def __repr__(self) -> str:
        kind = "private" if self.private else "public"
        return f"<Key kid={self.kid!r} alg={self.alg!r} {kind}>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("jitbroker keys cannot be pickled; export them with to_pem()/to_jwk()")

    @property
    def symmetric(self) -> bool:
        """True for HMAC keys, which must never be published."""
        return self.alg == "HS256"

    def public_jwk(self) -> dict[str, str] | None:
        """The public JWK (with ``kid``, ``alg``, ``use``), or None for an HMAC key."""
        if self._public_jwk is None:
            return None
        return {**self._public_jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def sign(self, data: bytes) -> bytes:
        """Sign ``data`` with this key's pinned algorithm."""
        if not self.private:
            raise InvalidRequest(f"key {self.kid} is a public key and cannot sign")
        m = self._material
        if self.alg == "EdDSA":
            return m.sign(data)  # type: ignore[no-any-return]
        if self.alg == "ES256":
            r, s = decode_dss_signature(m.sign(data, ec.ECDSA(hashes.SHA256())))
            s = min(s, _P256_ORDER - s)  # low-S: exactly one valid encoding per signature
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        if self.alg == "RS256":
            return m.sign(data, padding.PKCS1v15(), hashes.SHA256())  # type: ignore[no-any-return]
        return hmac.digest(m, data, "sha256")

    def verify(self, signature: bytes, data: bytes, *, allow_high_s: bool = False) -> bool:
        """True if ``signature`` over ``data`` verifies under this key and algorithm.

        An ES256 signature must have a low S (``s <= n/2``), the one encoding
        jitbroker signs with, unless ``allow_high_s``: then its high-S twin
        ``(r, n - s)`` verifies too. That is for signatures made by other
        libraries (DPoP proofs), where nothing is keyed on the signature bytes.
        """
        v = self._verifier
        try:
            if self.alg == "EdDSA":
                v.verify(signature, data)
            elif self.alg == "ES256":
                return self._verify_es256(
                    signature, data, _P256_ORDER - 1 if allow_high_s else _LOW_S_MAX
                )
            elif self.alg == "RS256":
                v.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
            else:
                return hmac.compare_digest(hmac.digest(v, data, "sha256"), signature)
        except InvalidSignature:
            return False
        return True

    def _verify_es256(self, signature: bytes, data: bytes, max_s: int) -> bool:
        # Raw r||s, each in [1, n-1]: r = s = 0 is the "psychic signature"
        # (CVE-2022-21449) that broken verifiers accepted.
        if len(signature) != 64:
            return False
        r = int.from_bytes(signature[:32], "big")
        s = int.from_bytes(signature[32:], "big")
        # For tokens max_s is n/2, refusing high S: (r, n - s) would be a second
        # valid encoding of the same signature (malleability), and we only ever
        # sign with low S. Proofs, signed by any library, pass max_s = n - 1.
        if not (0 < r < _P256_ORDER and 0 < s <= max_s):
            return False
        self._verifier.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
        return True

    def public(self) -> Key:
        """A verify-only copy of this key (the same key for a public or HMAC key)."""
        if not self.private or self.symmetric:
            return self
        return Key(self.alg, self._material.public_key(), self._public_jwk)

    def to_pem(self, password: bytes | str | None = None) -> bytes:
        """PEM export: PKCS#8 for private keys (encrypted with ``password``: bytes, or a
        str taken as UTF-8), SPKI for public."""
        password = password_bytes(password)
        if self.symmetric:
            raise InvalidRequest("HMAC keys have no PEM form; use to_jwk(private=True)")
        if not self.private:
            return self._material.public_bytes(  # type: ignore[no-any-return]
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        if password is not None and not password:
            raise InvalidRequest("an empty password would write an unencrypted key; pass None")
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        return self._material.private_bytes(  # type: ignore[no-any-return]
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
        )

    def to_jwk(self, *, private: bool = False) -> dict[str, str]:
        """JWK export; ``private=True`` includes the secret members. Handle with care."""
        if not private:
            jwk = self.public_jwk()
            if jwk is None:
                raise InvalidRequest("an HMAC key has no public form; use private=True")
            return jwk
        if not self.private:
            raise InvalidRequest(f"key {self.kid} holds no private material")
        jwk = private_jwk(self.alg, self._material)
        return {**jwk, "kid": self.kid, "alg": self.alg}


_PUBLIC_TYPES = (ed25519.Ed25519PublicKey, ec.EllipticCurvePublicKey, rsa.RSAPublicKey)


def key_from_material(material: object) -> Key:
    """Wrap a cryptography key object (or HMAC secret bytes), checking its strength."""
    if isinstance(material, bytes | bytearray):
        secret = bytes(material)
        if len(secret) < MIN_HMAC_BYTES:
            raise InvalidRequest(
                f"HMAC secrets must be at least {MIN_HMAC_BYTES} bytes, got {len(secret)}"
            )
        return Key("HS256", secret, None)
    if isinstance(material, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        alg = "EdDSA"
    elif isinstance(material, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if not isinstance(material.curve, ec.SECP256R1):
            raise InvalidRequest(f"ES256 needs a P-256 key, got curve {material.curve.name}")
        alg = "ES256"
    elif isinstance(material, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        if material.key_size < MIN_RSA_BITS:
            raise InvalidRequest(
                f"RSA keys must be at least {MIN_RSA_BITS} bits, got {material.key_size}"
            )
        alg = "RS256"
    else:
        raise InvalidRequest(f"unsupported key type {type(material).__name__}")
    pub = material if isinstance(material, _PUBLIC_TYPES) else material.public_key()
    return Key(alg, material, public_jwk(pub))


def generate_key(alg: str = "EdDSA") -> Key:
    """A fresh random key for ``alg``."""
    if alg == "EdDSA":
        return key_from_material(ed25519.Ed25519PrivateKey.generate())
    if alg == "ES256":
        return key_from_material(ec.generate_private_key(ec.SECP256R1()))
    if alg == "RS256":
        return key_from_material(rsa.generate_private_key(65537, MIN_RSA_BITS))
    if alg == "HS256":
        return key_from_material(secrets.token_bytes(MIN_HMAC_BYTES))
    raise InvalidRequest(f"unsupported algorithm {alg!r}; choose one of {', '.join(ALGORITHMS)}")


def password_bytes(password: bytes | str | None) -> bytes | None:
    """A key password as cryptography takes it: a str is encoded UTF-8 (what a
    password read from the environment or a prompt is), bytes pass as they are."""
    if password is None or isinstance(password, bytes):
        return password
    if isinstance(password, str):
        return password.encode("utf-8")
    raise InvalidRequest(f"a key password is bytes or str, not {type(password).__name__}")


def key_from_pem(pem: bytes | str, password: bytes | str | None = None) -> Key:
    """Load a PEM private key (PKCS#8 or traditional) or public key (SPKI);
    ``password`` is bytes, or a str taken as UTF-8."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    password = password_bytes(password)
    material: object
    try:
        if b"PRIVATE KEY" in data:
            material = serialization.load_pem_private_key(data, password=password)
        else:
            material = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # The message of cryptography's error can quote input; keep ours generic.
        raise InvalidRequest(
            "could not load the PEM key (wrong format, wrong or missing password?)"
        ) from exc
    return key_from_material(material)


def key_from_jwk(jwk: Mapping[str, Any]) -> Key:
    """Load a JWK: OKP/Ed25519, EC/P-256, RSA or oct; private if it has ``d`` (or ``k``)."""
    if not isinstance(jwk, Mapping):
        raise InvalidRequest("a JWK must be a JSON object")
    try:
        material = material_from_jwk(jwk)
    except ValueError as exc:
        if isinstance(exc, InvalidRequest):
            raise
        raise InvalidRequest(f"invalid {jwk['kty']} JWK: the key material is not valid") from exc
    key = key_from_material(material)
    if "alg" in jwk and jwk["alg"] != key.alg:
        raise InvalidRequest(f"JWK alg {jwk['alg']!r} does not match its key type ({key.alg})")
    if "kid" in jwk and jwk["kid"] != key.kid:
        raise InvalidRequest(
            f"JWK kid {jwk['kid']!r} is not the key's RFC 7638 thumbprint {key.kid!r}"
        )
    return key
