"""The two grants of ``POST /token``: client credentials and token exchange.

- ``client_credentials`` (RFC 6749 section 4.4): the authenticated caller gets
  a lease for **its own** subject (``Caller.subject``), owned by
  ``Caller.owner``, for one ``audience`` (or RFC 8707 ``resource``), with the
  ``scope`` it asks for, for ``ttl`` seconds capped at the caller's
  ``max_ttl`` (renewals included). The policy judges it as the caller.
- token exchange (RFC 8693): ``subject_token`` is a jitbroker token; the new
  token is an attenuated child of its lease (``broker.attenuate``): scopes and
  audience only narrow, it never outlives its parent, and with an
  ``actor_token`` it is delegated to the actor (``subject=`` the actor, the
  ``act`` chain in the token). The caller must hold the subject token (it was
  issued to the caller's subject) or be the actor.

Errors are RFC 6749 section 5.2 / RFC 8693 section 2.2.2 / RFC 8707 codes
(``OAuthError``): their descriptions are fixed texts; what went wrong in
detail is the ``reason``, for the audit log.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

from .. import tokens, validate
from ..errors import InvalidRequest, InvalidToken, LeaseError, PolicyDenied
from ..lease import Claims, Credential
from ..policy import covers
from .errors import InvalidClient
from .service_dpop import Binding
from .service_forms import Form, OAuthError
from .service_tokens import DEFERRED
from .trust import Caller

if TYPE_CHECKING:
    from .service import BrokerService

__all__ = [
    "ACCESS_TOKEN",
    "CLIENT_CREDENTIALS",
    "JWT",
    "TOKEN_EXCHANGE",
    "Grant",
    "client_credentials",
    "token_exchange",
]

CLIENT_CREDENTIALS = "client_credentials"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
JWT = "urn:ietf:params:oauth:token-type:jwt"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
#: What a subject_token may be: a jitbroker token (a JWS is also a JWT).
SUBJECT_TYPES = (ACCESS_TOKEN, JWT)
#: What an actor_token may be: a jitbroker token, or a workload identity JWT.
ACTOR_TYPES = (ACCESS_TOKEN, JWT, ID_TOKEN)
ISSUED_TYPES = (ACCESS_TOKEN, JWT)
_TRUE = {"true": True, "false": False}


#: Authenticates the request's caller (blocking: run it in a worker thread);
#: raises the ``invalid_client`` ``OAuthError``.
Authenticate = Callable[[], Caller]
#: Checks the request's DPoP proof (after authentication): the key to bind the
#: new token to, None without a proof; raises ``invalid_dpop_proof``.
Bind = Callable[[], Binding | None]


class Grant(NamedTuple):
    """A granted request: the credential, its RFC 8693 ``issued_token_type``,
    the audit decision (``issued`` / ``exchanged``) and the caller."""

    cred: Credential
    issued_token_type: str
    decision: str
    caller: Caller


def _invalid(description: str, reason: str | None = None) -> OAuthError:
    return OAuthError("invalid_request", description, reason=reason)


# -- parameters --------------------------------------------------------------
def audience_of(form: Form, *, required: bool) -> str | None:
    """The one audience named by ``audience`` and/or ``resource`` (RFC 8707)."""
    resources = form.all("resource")
    for resource in resources:
        parts = urlsplit(resource)
        if not parts.scheme or parts.fragment or not resource.isprintable():
            raise OAuthError(
                "invalid_target", "resource must be an absolute URI without a fragment"
            )
    named = {*form.all("audience"), *resources}
    if len(named) > 1:
        raise OAuthError("invalid_target", "a token is issued for one audience at a time")
    if not named:
        if required:
            raise OAuthError("invalid_target", "name the audience (audience= or resource=)")
        return None
    (audience,) = named
    try:
        return validate.text(audience, "audience")
    except InvalidRequest as exc:
        raise OAuthError(
            "invalid_target", "the audience is not acceptable", reason=str(exc)
        ) from None


def scopes_of(form: Form) -> tuple[str, ...] | None:
    """The ``scope`` parameter's scopes (None when absent)."""
    scope = form.get("scope")
    if scope is None:
        return None
    try:
        return validate.scopes(scope)
    except InvalidRequest as exc:
        raise OAuthError(
            "invalid_scope", "the scope parameter is malformed", reason=str(exc)
        ) from None


def ttl_of(form: Form) -> int | None:
    """The ``ttl`` extension: whole seconds, more than zero."""
    ttl = form.get("ttl")
    if ttl is None:
        return None
    if not (ttl.isascii() and ttl.isdigit()) or len(ttl) > 9 or int(ttl) < 1:
        raise _invalid("ttl must be a whole number of seconds, more than zero")
    return int(ttl)


def text_of(form: Form, name: str, limit: int = validate.MAX_TEXT) -> str | None:
    """An optional free-text extension parameter (``task``, ``purpose``)."""
    value = form.get(name)
    if value is None:
        return None
    try:
        return validate.text(value, name, limit=limit)
    except InvalidRequest:
        raise _invalid(f"{name} must be printable text of at most {limit} characters") from None


def renewable_of(form: Form) -> bool:
    """The ``renewable`` extension: ``true`` (the default) or ``false``."""
    value = form.get("renewable", "true")
    if value not in _TRUE:
        raise _invalid("renewable must be true or false")
    return _TRUE[value]


def granted(error: BaseException) -> OAuthError:
    """The answer for what the broker refused while granting (not a store failure)."""
    if isinstance(error, PolicyDenied):
        return OAuthError(
            "invalid_scope",
            "the policy does not grant this access to this caller",
            reason="; ".join(error.reasons),
        )
    if isinstance(error, LeaseError):
        return OAuthError("invalid_grant", "the lease cannot be extended", reason=str(error))
    return _invalid("the request cannot be granted as made", reason=str(error))


# -- client credentials ---------------------------------------------------------
async def client_credentials(
    service: BrokerService, form: Form, authenticate: Authenticate, bind: Bind
) -> Grant:
    """RFC 6749 section 4.4: a lease for the caller's own subject. The form is
    checked first (a malformed request does not spend a single-use assertion),
    then the caller is authenticated and the lease issued in one worker-thread
    hop (``BrokerCalls.issue_for``)."""
    audience = audience_of(form, required=True)
    asked = float(ttl_of(form) or service.default_ttl)
    renewable = renewable_of(form)
    fixed: dict[str, Any] = {
        "audience": audience,
        "scopes": scopes_of(form) or (),
        "task": text_of(form, "task"),
        "purpose": text_of(form, "purpose", validate.MAX_PURPOSE),
        "renewable": renewable,
    }
    broker_cap = service.calls.max_ttl

    def plan(caller: Caller) -> dict[str, Any]:
        ceiling = min(caller.max_ttl, broker_cap)
        binding = bind()
        return {
            **fixed,
            "holder_key": None if binding is None else dict(binding.jwk),
            "subject": caller.subject,
            "owner": caller.owner,
            "ttl": min(asked, ceiling),
            "max_ttl": ceiling if renewable else None,
        }

    try:
        caller, cred = await service.calls.issue_for(authenticate, plan)
    except (PolicyDenied, InvalidRequest) as exc:
        raise granted(exc) from None
    return Grant(cred, ACCESS_TOKEN, "issued", caller)


# -- token exchange ---------------------------------------------------------------
async def token_exchange(
    service: BrokerService, form: Form, authenticate: Authenticate, bind: Bind
) -> Grant:
    """RFC 8693: an attenuated (or delegated) child of the subject token's lease."""
    subject_token, subject_type = form.get("subject_token"), form.get("subject_token_type")
    if subject_token is None or subject_type is None:
        raise _invalid("subject_token and subject_token_type are required")
    if subject_type not in SUBJECT_TYPES:
        raise _invalid("subject_token_type must be access_token or jwt (a jitbroker token)")
    wanted = form.get("requested_token_type", ACCESS_TOKEN)
    if wanted not in ISSUED_TYPES:
        raise _invalid("requested_token_type must be access_token or jwt")
    if wanted == JWT and tokens.is_opaque(subject_token):
        raise _invalid("this broker issues opaque tokens: request an access_token")
    scopes = scopes_of(form)  # the form first: a malformed one spends no assertion
    audience = audience_of(form, required=False)
    asked = ttl_of(form)
    purpose = text_of(form, "purpose", validate.MAX_PURPOSE)
    caller: Caller = await service.calls.authenticate(authenticate)
    binding = bind()
    parent = await _subject(service, subject_token, binding)
    actor = await _actor(service, form, caller)
    holder = parent.actor if parent.actor is not None else parent.subject
    if caller.subject != holder and (actor is None or actor != caller.subject):
        raise _invalid(
            "the caller may exchange only a token issued to it, or one delegated to it",
            reason=f"subject_token held by {holder!r}, caller is {caller.subject!r}",
        )
    if scopes is not None:
        wider = [s for s in scopes if not any(covers(p, s) for p in parent.scopes)]
        if wider:
            raise OAuthError(
                "invalid_scope",
                "an exchanged token's scopes can only narrow the subject_token's",
                reason=f"not in the subject_token: {' '.join(wider)}",
            )
    if audience is not None and not covers(parent.audience, audience):
        raise OAuthError(
            "invalid_target",
            "an exchanged token's audience must be the subject_token's (or within it)",
        )
    ttl = await _exchange_ttl(service, asked, caller, parent)
    try:
        cred = await service.calls.attenuate(
            caller.fields(),
            parent.lease_id,
            scopes=scopes,
            audience=audience,
            ttl=ttl,
            purpose=purpose,
            subject=actor,
            # A proof binds the new token to its key (a bound parent's is the same key).
            holder_key=None if binding is None else dict(binding.jwk),
            max_ttl=min(caller.max_ttl, service.calls.max_ttl),  # renewals stay under it
        )
    except LeaseError as exc:  # the parent died since it was checked
        raise _invalid("the subject_token is no longer active", str(exc)) from None
    except (PolicyDenied, InvalidRequest) as exc:
        raise granted(exc) from None
    return Grant(cred, wanted, "exchanged", caller)


async def _subject(service: BrokerService, token: str, binding: Binding | None) -> Claims:
    """The active subject token's claims; a key-bound one needs a proof by its key."""
    try:
        claims = await service.presented.check(token, proof=DEFERRED)
    except (InvalidToken, LeaseError, InvalidRequest) as exc:  # RFC 8693 2.2.2
        reason = type(exc).__name__
        raise _invalid("the subject_token is not an active token of this broker", reason) from None
    if claims.holder is not None and (binding is None or binding.jkt != claims.holder):
        raise _invalid("the subject_token is bound to a key: send a DPoP proof signed by that key")
    return claims


async def _actor(service: BrokerService, form: Form, caller: Caller) -> str | None:
    """The jitbroker subject of the ``actor_token``, if any. A jitbroker token
    names its subject as the actor only when that subject is the caller: such
    tokens reach every resource server they were issued for, so holding one
    proves nothing about its workload's consent. Another workload is named by
    its own identity token, which is spent (single-use) here."""
    actor_token, actor_type = form.get("actor_token"), form.get("actor_token_type")
    if actor_token is None:
        if actor_type is not None:  # RFC 8693 section 2.1: only with an actor_token
            raise _invalid("actor_token_type is sent only with an actor_token")
        return None
    if actor_type not in ACTOR_TYPES:
        raise _invalid("actor_token_type must be access_token, jwt or id_token")
    if actor_type == ACCESS_TOKEN:  # a jitbroker token: its lease's subject acts
        try:
            claims = await service.presented.check(actor_token, proof=DEFERRED)
        except (InvalidToken, LeaseError, InvalidRequest) as exc:
            raise _invalid("the actor_token is not valid", type(exc).__name__) from None
        if claims.holder is not None:  # its one proof binds the new token: none is left for it
            raise _invalid(
                "a key-bound actor_token cannot be used: send the actor's identity token"
            )
        acting = claims.actor if claims.actor is not None else claims.subject
        if acting != caller.subject:
            raise _invalid(
                "an access_token names the actor only when the actor itself asks:"
                " send the actor's identity token (id_token or jwt) instead",
                reason=f"actor_token held by {acting!r}, caller is {caller.subject!r}",
            )
        return acting
    try:
        who: Caller = await service.calls.in_thread(
            lambda: service.trust.authenticate_assertion(actor_token, single_use=True)
        )
    except InvalidClient as exc:
        raise _invalid("the actor_token is not valid", exc.reason) from None
    return who.subject


async def _exchange_ttl(
    service: BrokerService, asked: int | None, caller: Caller, parent: Claims
) -> float | None:
    """The child's life: what was asked (or the parent's remaining life), capped
    at the caller's ceiling and at the parent lease's remaining life."""
    try:
        lease = await service.calls.lease(parent.lease_id)
    except LeaseError as exc:
        raise _invalid("the subject_token is no longer active", str(exc)) from None
    remaining = lease.expires_at - service.clock()
    life = min(remaining, caller.max_ttl, float(asked) if asked is not None else math.inf)
    if life <= 0:
        raise _invalid("the subject_token is no longer active")
    return None if life == remaining else life
