"""A real OIDC issuer on 127.0.0.1 for the tests: a discovery document and a
JWKS served by uvicorn, and tokens shaped like GitHub Actions' and Kubernetes'.

    with oidc_issuer() as issuer:
        token = issuer.mint(repository="acme/app")          # GitHub Actions shape
        token = issuer.mint_k8s(namespace="ci", serviceaccount="deployer")
        issuer.rotate()                                     # a new signing key
        token = issuer.mint(key=issuer.rogue)               # a key not in the JWKS
        token = issuer.sign({"alg": "none"}, {...}, signature=b"")  # any raw header

Keys have the issuer's own ``kid`` (``"key-1"``, ...), not RFC 7638
thumbprints, as real issuers' do. ``jwks_requests`` counts JWKS fetches.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from jitbroker.jwk import b64url
from jitbroker.keys import Key, generate_key
from jitbroker.tokens import json_text
from web_servers import uvicorn_server

AUDIENCE = "https://jitbroker.example"
DROP = object()  # a claim value meaning "leave this claim out"


class Issuer:
    """The issuer's state; served live, so changes show in the next fetch."""

    def __init__(self, alg: str = "RS256", *, clock: Callable[[], float] = time.time) -> None:
        self.url = ""  # set once the server runs
        self.alg = alg
        self.clock = clock
        self.keys: list[tuple[str, Key]] = []
        self._serial = 0
        self.signer = self.add_key(alg)
        self.rogue = generate_key(alg)  # signs, but is never published
        self.jwks_requests = 0
        self.discovery_requests = 0
        self.discovery_issuer: str | None = None  # set to serve another "issuer"
        self.kid_in_header = True
        self.extra_jwks: list[dict[str, Any]] = []  # raw JWKs served too

    # -- keys -----------------------------------------------------------------
    def add_key(self, alg: str | None = None) -> tuple[str, Key]:
        """A new published key (not yet the signer); its (kid, key)."""
        self._serial += 1
        entry = (f"key-{self._serial}", generate_key(alg or self.alg))
        self.keys.append(entry)
        return entry

    def rotate(self, *, drop_old: bool = False) -> None:
        """Publish a new key and sign with it; optionally unpublish the others."""
        entry = self.add_key()
        if drop_old:
            self.keys = [entry]
        self.signer = entry

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid, key in self.keys:
            jwk = {k: v for k, v in (key.public_jwk() or {}).items() if k != "kid"}
            keys.append({**jwk, "kid": kid})
        return {"keys": keys + self.extra_jwks}

    # -- tokens ---------------------------------------------------------------
    def sign(
        self,
        header: dict[str, Any],
        payload: dict[str, Any] | bytes,
        *,
        key: Key | None = None,
        signature: bytes | None = None,
    ) -> str:
        """A compact JWS of exactly this header and payload (JSON, or raw bytes),
        signed with ``key`` (default: the signer) unless ``signature`` is given."""
        body = payload if isinstance(payload, bytes) else json_text(payload).encode()
        signing_input = b64url(json_text(header).encode()) + "." + b64url(body)
        if signature is None:
            signature = (key or self.signer[1]).sign(signing_input.encode("ascii"))
        return signing_input + "." + b64url(signature)

    def header(self, key: Key | None = None, **extra: Any) -> dict[str, Any]:
        """The header a real issuer writes: typ, alg and its kid for the key."""
        key = key or self.signer[1]
        kid = next((k for k, v in self.keys if v is key), "not-published")
        header: dict[str, Any] = {"typ": "JWT", "alg": key.alg}
        if self.kid_in_header:
            header["kid"] = kid
        header.update(extra)
        return header

    def mint(self, *, key: Key | None = None, ttl: int = 300, **claims: Any) -> str:
        """A token shaped like a GitHub Actions OIDC token; ``claims`` override
        (``DROP`` removes one)."""
        now = int(self.clock())
        payload: dict[str, Any] = {
            "jti": os.urandom(16).hex(),
            "sub": "repo:acme/app:ref:refs/heads/main",
            "aud": AUDIENCE,
            "ref": "refs/heads/main",
            "sha": "a" * 40,
            "repository": "acme/app",
            "repository_owner": "acme",
            "repository_id": "1234",
            "run_id": "5678",
            "run_attempt": "1",
            "actor": "alice",
            "event_name": "push",
            "workflow": "deploy",
            "job_workflow_ref": "acme/app/.github/workflows/deploy.yml@refs/heads/main",
            "iss": self.url,
            "nbf": now - 5,
            "iat": now - 5,
            "exp": now + ttl,
        }
        return self.sign(self.header(key), _merge(payload, claims), key=key)

    def mint_k8s(
        self,
        *,
        namespace: str = "ci",
        serviceaccount: str = "deployer",
        key: Key | None = None,
        ttl: int = 600,
        **claims: Any,
    ) -> str:
        """A token shaped like a Kubernetes projected service-account token: no
        typ and no jti in some clusters (pass ``jti=...`` to add one)."""
        now = int(self.clock())
        payload: dict[str, Any] = {
            "aud": [AUDIENCE],
            "exp": now + ttl,
            "iat": now,
            "nbf": now,
            "iss": self.url,
            "kubernetes.io": {
                "namespace": namespace,
                "pod": {"name": "runner-7d9f", "uid": "9f0e7c1a"},
                "serviceaccount": {"name": serviceaccount, "uid": "1c2d3e4f"},
            },
            "sub": f"system:serviceaccount:{namespace}:{serviceaccount}",
        }
        header = {k: v for k, v in self.header(key).items() if k != "typ"}
        return self.sign(header, _merge(payload, claims), key=key)

    # -- the server -----------------------------------------------------------
    def app(self) -> Starlette:
        async def discovery(request: Request) -> Response:
            self.discovery_requests += 1
            return JSONResponse(
                {
                    "issuer": self.discovery_issuer or self.url,
                    "jwks_uri": self.url + "/jwks",
                    "response_types_supported": ["id_token"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": [self.alg],
                }
            )

        async def jwks(request: Request) -> Response:
            self.jwks_requests += 1
            return JSONResponse(self.jwks())

        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", discovery),
                Route("/jwks", jwks),
            ]
        )


def _merge(payload: dict[str, Any], claims: dict[str, Any]) -> dict[str, Any]:
    for name, value in claims.items():
        if value is DROP:
            payload.pop(name, None)
        else:
            payload[name] = value
    return payload


@contextmanager
def oidc_issuer(alg: str = "RS256", *, clock: Callable[[], float] = time.time) -> Iterator[Issuer]:
    """A running issuer on a free 127.0.0.1 port; ``.url`` is its ``iss``."""
    issuer = Issuer(alg, clock=clock)
    with uvicorn_server(issuer.app()) as url:
        issuer.url = url
        yield issuer
