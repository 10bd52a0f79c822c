"""Revocation (RFC 7009), introspection (RFC 7662) and the metadata (RFC 8414).

- ``/revoke``: an authenticated caller revokes a token it holds (one issued to
  its subject), or any token if it is one of the ``offboarders``; the token's
  holder may also revoke it with the token itself as the credential
  (``BrokerService._revoke_held``). A token that is unknown, malformed,
  expired or already revoked answers 200, as RFC 7009 section 2.2 says (there
  is nothing left to revoke, and the answer tells a prober nothing). Another
  caller's active token is refused (``unauthorized_client``). The extension
  ``owner=`` (instead of ``token``) revokes every active lease of that owner:
  for the ``offboarders`` only. A shared owner (``owner = "{actor}"``, the
  person who ran a workflow) does not let one workload revoke another's.
- ``/introspect``: for the callers named in ``resource_servers``; anything not
  active is ``{"active": false}`` and nothing else (section 2.2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from .. import tokens
from ..errors import InvalidRequest, InvalidToken, LeaseError
from .responses import DPOP_ALGS
from .service_forms import OAuthError, json_body
from .service_grants import (
    ACTOR_TYPES,
    CLIENT_CREDENTIALS,
    ISSUED_TYPES,
    SUBJECT_TYPES,
    TOKEN_EXCHANGE,
)
from .service_tokens import DEFERRED, introspection
from .trust import Caller

if TYPE_CHECKING:
    from .service import BrokerService

__all__ = ["NO_STORE", "introspect", "metadata", "offboard", "revoke_token"]

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_ALGS = ["RS256", "ES256", "EdDSA"]


def json_response(payload: dict[str, Any]) -> Response:
    """A 200 JSON answer that no cache keeps."""
    return Response(json_body(payload), 200, NO_STORE, media_type="application/json")


def _by(caller: Caller) -> str:
    """Who revoked, for the lease's audit events."""
    return f"{caller.method}:{caller.rule}:{caller.subject}"


async def offboard(service: BrokerService, caller: Caller, owner: str) -> Response:
    """``owner=``: revoke every active lease of ``owner``."""
    if caller.rule not in service.offboarders:
        raise OAuthError("unauthorized_client", "this caller may not revoke that owner's leases")
    count = await service.calls.revoke_where(owner=owner, by=_by(caller))
    service.audit.decided("/revoke", "offboarded", caller, count=count, reason=f"owner={owner!r}")
    return json_response({"revoked": count})


def _token_shaped(token: str) -> bool:
    """A token of ours has one form or the other: anything else (a lease id, say)
    is not a token, so it is unknown (a 200), never looked up."""
    return tokens.is_opaque(token) or token.count(".") == 2


async def revoke_token(service: BrokerService, caller: Caller, token: str) -> Response:
    """RFC 7009: revoke the lease of ``token`` (and its descendants)."""
    try:
        # The lease of a signature-checked JWS (or of an opaque token's hash),
        # expired token or not: a renewed lease outlives its first token.
        lease = await service.calls.lease(token) if _token_shaped(token) else None
    except (InvalidToken, LeaseError, InvalidRequest):  # section 2.2: still a 200
        lease = None
    if lease is None or not lease.is_active(service.clock()):
        service.audit.decided("/revoke", "revoked", caller, reason="not an active token")
        return Response(b"", 200, NO_STORE)
    if lease.subject != caller.subject and caller.rule not in service.offboarders:
        raise OAuthError("unauthorized_client", "this token was not issued to this caller")
    await service.calls.revoke(lease.id, by=_by(caller))
    service.audit.decided("/revoke", "revoked", caller, lease=lease)
    return Response(b"", 200, NO_STORE)


async def introspect(service: BrokerService, caller: Caller, token: str) -> Response:
    """RFC 7662: the claims of an active token, for a resource server."""
    if caller.rule not in service.resource_servers:
        raise OAuthError("unauthorized_client", "this caller is not a resource server", status=403)
    try:
        claims = await service.presented.check(token, proof=DEFERRED)
    except (InvalidToken, LeaseError, InvalidRequest) as exc:  # 2.2: nothing but active
        reason = f"inactive: {type(exc).__name__}"
        service.audit.decided("/introspect", "introspected", caller, reason=reason)
        return json_response({"active": False})
    reason = f"active lease_id={claims.lease_id}"
    service.audit.decided("/introspect", "introspected", caller, reason=reason)
    return json_response(introspection(claims, issuer=service.issuer))


def metadata(service: BrokerService) -> dict[str, Any]:
    """RFC 8414 section 2, plus ``renewal_endpoint`` and the RFC 8693 token
    types (``*_token_types_supported``) as extensions."""
    base, methods = service.base_url, service.auth_methods
    document: dict[str, Any] = {
        "issuer": base,
        "token_endpoint": base + "/token",
        "revocation_endpoint": base + "/revoke",
        "introspection_endpoint": base + "/introspect",
        "jwks_uri": base + "/jwks.json",
        "response_types_supported": [],  # no authorization endpoint
        "grant_types_supported": [CLIENT_CREDENTIALS, TOKEN_EXCHANGE],
        "token_endpoint_auth_methods_supported": methods,
        "token_endpoint_auth_signing_alg_values_supported": _ALGS,
        "revocation_endpoint_auth_methods_supported": methods,
        "revocation_endpoint_auth_signing_alg_values_supported": _ALGS,
        "introspection_endpoint_auth_methods_supported": methods,
        "introspection_endpoint_auth_signing_alg_values_supported": _ALGS,
        "renewal_endpoint": base + "/renew",
        "subject_token_types_supported": list(SUBJECT_TYPES),
        "actor_token_types_supported": list(ACTOR_TYPES),
        "issued_token_types_supported": list(ISSUED_TYPES),
    }
    if service.dpop:
        document["dpop_signing_alg_values_supported"] = list(DPOP_ALGS)
    return document
