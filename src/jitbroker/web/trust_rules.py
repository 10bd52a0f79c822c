"""The values a ``Trust`` is built from, and the ``Caller`` it proves.

- ``TrustRule``: a workload-identity issuer (GitHub Actions, GitLab CI, a
  Kubernetes cluster, SPIRE, any OIDC issuer) and how its tokens map to a
  jitbroker subject and owner (claim matchers and templates, ``claims``).
- ``ClientKey``: a service with a registered public key (``private_key_jwt``).
- ``ClientSecret``: a service with a scrypt-hashed secret (``client_secrets``).
- ``Caller``: who called, proven; safe to audit and print.

Each checks itself at construction (``InvalidRequest`` naming the field), so
a ``Trust`` is never built from a rule it would misread.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import attrs

from ..clock import Duration, seconds
from ..errors import InvalidRequest, KeySourceError, MalformedToken
from ..tokens import strict_json_object
from .assertions import IssuerKeys, issuer_keys
from .claims import Template, check_matchers, claim_values
from .client_secrets import check_hash

__all__ = ["ALGORITHMS", "Caller", "ClientKey", "ClientSecret", "TrustRule", "sort_rules"]

ALGORITHMS = ("RS256", "ES256", "EdDSA")  # asymmetric only: we hold no issuer's secret
_CLIENT_ID = re.compile(r"[\x21-\x7e]{1,256}")  # RFC 6749 appendix A.1: VSCHAR, bounded


def _max_ttl(value: object) -> float:
    return seconds(value, "max_ttl")


def _max_assertion_ttl(value: object) -> float:
    return seconds(value, "max_assertion_ttl")


def _frozen_strings(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


def _frozen_claims(value: object) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise InvalidRequest("claims must be a mapping of claim name to value or glob")
    return MappingProxyType(dict(value))


def _check_https(url: object, field: str, allow_http: bool) -> None:
    if not isinstance(url, str) or not url:
        raise InvalidRequest(f"{field} must be a non-empty URL")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError unless a number in 0..65535
    except ValueError as exc:
        raise InvalidRequest(f"{field} is not a valid URL") from exc
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes or not parts.hostname:
        hint = "" if allow_http else " (http only with allow_http=True, for tests)"
        raise InvalidRequest(f"{field} must be an https URL with a host{hint}")
    if "@" in parts.netloc or parts.query or parts.fragment or not url.isprintable() or " " in url:
        raise InvalidRequest(f"{field} must have no credentials, query, fragment or whitespace")


@attrs.frozen
class TrustRule:
    """A workload-identity issuer (OIDC) whose tokens authenticate callers.

    Args:
        issuer: the exact ``iss`` of its tokens, an https URL (http only with
            ``allow_http``).
        audience: the ``aud`` its tokens must carry (a string, or one of a list).
        subject: the jitbroker subject a caller gets, a template of ``{claim}``
            placeholders, e.g. ``"svc:ci:{repository}"``. A nested claim is a
            dotted path: ``{kubernetes.io.serviceaccount.name}`` (member names
            that hold dots themselves, like ``kubernetes.io``, are found by the
            longest name that exists at each level).
        claims: claim path -> exact value, or a glob (``*``/``?`` within one
            ``/`` segment, ``**`` across segments; see ``policy.glob_match``).
            Every claim named must be present, a string, and match.
        jwks_url: the issuer's JWKS; by default ``jwks_uri`` from
            ``{issuer}/.well-known/openid-configuration``, read once when the
            ``Trust`` is built (its ``issuer`` must be this one).
        max_ttl: the longest lease (seconds) a caller of this rule may get.
        owner: the owner template for its leases; None: the subject.
        name: the rule's name in audit events; default: the issuer.
        algorithms: the signature algorithms accepted (asymmetric only).
        allow_http: accept an ``http`` issuer and JWKS URL (tests, loopback).
        max_assertion_ttl: refuse tokens whose lifetime (``exp - iat``, and
            ``exp - now``) is longer than this (seconds).
        single_use: refuse a token presented a second time (its ``jti``, or a
            hash of a token without one), as client authentication. Turn off only
            for issuers whose tokens are reused by design, such as a Kubernetes
            token file read by several processes of one pod (see docs/trust.md).
    """

    issuer: str
    audience: str
    subject: str
    claims: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_claims)
    jwks_url: str | None = None
    max_ttl: float = attrs.field(default=3600, converter=_max_ttl)
    owner: str | None = None
    name: str | None = None
    algorithms: tuple[str, ...] = attrs.field(default=ALGORITHMS, converter=tuple)
    allow_http: bool = False
    max_assertion_ttl: float = attrs.field(default=3600, converter=_max_assertion_ttl)
    single_use: bool = True
    _subject: Template = attrs.field(init=False, repr=False, eq=False)
    _owner: Template | None = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.allow_http, bool):
            raise InvalidRequest("trust rule: allow_http must be True or False")
        _check_https(self.issuer, "trust rule issuer", self.allow_http)
        where = f"trust rule for {self.issuer}"
        if not isinstance(self.audience, str) or not self.audience:
            raise InvalidRequest(f"{where}: audience must be a non-empty string")
        object.__setattr__(self, "_subject", Template.parse(self.subject, f"{where}: subject"))
        owner = None if self.owner is None else Template.parse(self.owner, f"{where}: owner")
        object.__setattr__(self, "_owner", owner)
        check_matchers(self.claims, where)
        _check_tenant(self.issuer, self.claims, where)
        if self.jwks_url is not None:
            _check_https(self.jwks_url, f"{where}: jwks_url", self.allow_http)
        bad = [a for a in self.algorithms if a not in ALGORITHMS]
        if not self.algorithms or bad:
            raise InvalidRequest(f"{where}: algorithms must be among {', '.join(ALGORITHMS)}")
        if self.name is None:
            object.__setattr__(self, "name", self.issuer)
        elif not isinstance(self.name, str) or not self.name:
            raise InvalidRequest(f"{where}: name must be a non-empty string")
        if not isinstance(self.single_use, bool):
            raise InvalidRequest(f"{where}: single_use must be True or False")

    @property
    def rule_name(self) -> str:
        """The name audit events use (``name``, or the issuer)."""
        return self.name or self.issuer

    def claim_values(self, payload: Mapping[str, Any]) -> dict[str, str]:
        """From a verified token's payload, the values of the claims this rule
        matches and its templates use; ``InvalidClient`` if one is missing, not
        a string, or does not match."""
        templates = (self._subject,) if self._owner is None else (self._subject, self._owner)
        return claim_values(self.claims, templates, payload)

    def subject_and_owner(self, values: Mapping[str, str]) -> tuple[str, str]:
        """The caller's subject and owner, the templates rendered with ``values``
        (from ``claim_values``); ``InvalidClient`` for a value not plain text."""
        subject = self._subject.render(values)
        return subject, subject if self._owner is None else self._owner.render(values)


#: Issuers any account on the service can get tokens from (any repository on
#: GitHub, any project on gitlab.com), and the claims that pin a rule to one
#: tenant: without one, every workflow in the world would match.
_SHARED_ISSUERS: Mapping[str, frozenset[str]] = {
    "https://token.actions.githubusercontent.com": frozenset(
        {
            "repository",
            "repository_owner",
            "repository_owner_id",
            "repository_id",
            "sub",
            "job_workflow_ref",
            "enterprise",
            "enterprise_id",
        }
    ),
    "https://gitlab.com": frozenset(
        {"namespace_path", "namespace_id", "project_path", "project_id", "sub"}
    ),
}


def _pins(pattern: str) -> bool:
    """True if ``pattern`` names one tenant: no wildcard at all, or a literal
    ``owner/`` before the first one (``acme/*``, ``repo:acme/app:*``)."""
    wild = [at for at in (pattern.find("*"), pattern.find("?")) if at >= 0]
    return not wild or "/" in pattern[: min(wild)]


def _check_tenant(issuer: str, claims: Mapping[str, str], where: str) -> None:
    tenant = _SHARED_ISSUERS.get(issuer.rstrip("/"))
    if tenant is None:
        return
    if not any(name in tenant and _pins(pattern) for name, pattern in claims.items()):
        raise InvalidRequest(
            f"{where}: every account on this issuer can get its tokens; pin the rule to yours"
            f" with one of {', '.join(sorted(tenant))} (an exact value, or a literal owner/"
            ' before any wildcard: e.g. repository = "acme/*")'
        )


def _frozen_jwks(value: object) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidRequest('a client\'s jwks must be a JWKS object {"keys": [...]}')
    return MappingProxyType(dict(value))


def _check_client(client_id: object, subject: object, owner: object) -> None:
    if not isinstance(client_id, str) or not _CLIENT_ID.fullmatch(client_id):
        raise InvalidRequest("client_id must be 1 to 256 printable ASCII characters, no spaces")
    where = f"client {client_id}"
    if not isinstance(subject, str) or not subject or "{" in subject or "}" in subject:
        raise InvalidRequest(f"{where}: subject must be a non-empty string (no placeholders)")
    if owner is not None and (not isinstance(owner, str) or not owner):
        raise InvalidRequest(f"{where}: owner must be a non-empty string or None")


@attrs.frozen
class ClientKey:
    """A client that authenticates with ``private_key_jwt``: a JWT it signs with
    its private key, whose public half is registered here.

    The assertion must have ``iss`` and ``sub`` equal to ``client_id``, an
    ``aud`` holding the token endpoint URL, an ``exp`` at most an hour ahead,
    and a ``jti``, which is good for one use.
    """

    client_id: str
    jwks: Mapping[str, Any] = attrs.field(converter=_frozen_jwks, repr=False)
    subject: str
    max_ttl: float = attrs.field(default=3600, converter=_max_ttl)
    owner: str | None = None
    _keys: IssuerKeys = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        _check_client(self.client_id, self.subject, self.owner)
        try:
            keys = issuer_keys(self.jwks, f"the jwks of client {self.client_id}")
        except KeySourceError as exc:
            raise InvalidRequest(str(exc)) from exc
        if not len(keys):
            raise InvalidRequest(f"client {self.client_id}: jwks holds no signature key")
        object.__setattr__(self, "_keys", keys)

    @property
    def keys(self) -> IssuerKeys:
        """The client's public keys, by their ``kid``, for ``private_key_jwt``."""
        return self._keys

    @classmethod
    def from_jwks_file(
        cls,
        client_id: str,
        path: str | os.PathLike[str],
        subject: str,
        *,
        max_ttl: Duration = 3600,
        owner: str | None = None,
    ) -> ClientKey:
        """A client whose public keys are in a JWKS (or single JWK) JSON file."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise InvalidRequest(f"could not read the JWKS file {path}: {exc.strerror}") from exc
        try:
            document = strict_json_object(data, "JWKS file")
        except MalformedToken as exc:
            raise InvalidRequest(f"{path} is not a JSON object: {exc}") from exc
        if "keys" not in document:
            document = {"keys": [document]}
        return cls(client_id, document, subject, max_ttl=max_ttl, owner=owner)


@attrs.frozen
class ClientSecret:
    """A client that authenticates with a shared secret (HTTP Basic or form
    ``client_secret``). ``secret_hash`` comes from ``hash_client_secret``; the
    secret itself is never configured, stored or logged."""

    client_id: str
    secret_hash: str = attrs.field(repr=False)
    subject: str
    max_ttl: float = attrs.field(default=3600, converter=_max_ttl)
    owner: str | None = None

    def __attrs_post_init__(self) -> None:
        _check_client(self.client_id, self.subject, self.owner)
        check_hash(self.secret_hash, f"client {self.client_id}: secret_hash")


@attrs.frozen
class Caller:
    """Who called, proven. Safe to audit and to print: no assertion or secret inside.

    Attributes:
        subject: the jitbroker subject it maps to.
        owner: the owner of the leases it gets.
        rule: the matched rule's name (a ``TrustRule`` name, or the client id).
        method: ``"jwt-bearer"``, ``"private_key_jwt"``, ``"client_secret_basic"``
            or ``"client_secret_post"``.
        issuer: the assertion's ``iss``, or ``"client:<client_id>"``.
        assertion_subject: the assertion's ``sub``, or the client id.
        max_ttl: the rule's lease ceiling (seconds).
        expires_at: the assertion's ``exp`` (None for a client secret).
        claims: the claim values the rule matched or its templates used.
    """

    subject: str
    owner: str
    rule: str
    method: str
    issuer: str
    assertion_subject: str
    max_ttl: float
    expires_at: float | None
    claims: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_strings)

    def fields(self) -> dict[str, str]:
        """The caller as flat strings, for ``policy.calling(...)`` and audit
        events: the matched claims, then ``issuer``, ``subject`` (the assertion's),
        ``rule`` and ``method``, which win over claims of the same name."""
        return {
            **self.claims,
            "issuer": self.issuer,
            "subject": self.assertion_subject,
            "rule": self.rule,
            "method": self.method,
        }


def sort_rules(
    rules: Iterable[TrustRule | ClientKey | ClientSecret],
) -> tuple[list[TrustRule], dict[str, ClientKey], dict[str, ClientSecret]]:
    """A ``Trust``'s rules, sorted by kind: trust rules in order, clients by id.
    ``InvalidRequest`` for anything else, a client id used twice or also a
    trusted issuer, two rules or clients of one name, or no rule at all."""
    trust: list[TrustRule] = []
    keys: dict[str, ClientKey] = {}
    secrets: dict[str, ClientSecret] = {}
    for rule in rules:
        if isinstance(rule, TrustRule):
            trust.append(rule)
        elif isinstance(rule, ClientKey | ClientSecret):
            if rule.client_id in keys or rule.client_id in secrets:
                raise InvalidRequest(f"client {rule.client_id} is configured twice")
            if isinstance(rule, ClientKey):
                keys[rule.client_id] = rule
            else:
                secrets[rule.client_id] = rule
        else:
            raise InvalidRequest(
                f"a trust rule must be a TrustRule, ClientKey or ClientSecret, "
                f"not {type(rule).__name__}"
            )
    issuers = {rule.issuer for rule in trust}
    clash = sorted(issuers.intersection(keys))
    if clash:
        raise InvalidRequest(f"client id {clash[0]} is also a trusted issuer; rename the client")
    # Callers are authorized by name (Caller.rule: resource servers, offboarders),
    # so one name must mean one rule or client.
    names = [rule.rule_name for rule in trust] + [*keys, *secrets]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise InvalidRequest(
            f"the name {twice[0]} is used by two rules or clients; give each rule its own name"
        )
    if not (trust or keys or secrets):
        raise InvalidRequest("a Trust needs at least one rule")
    return trust, keys, secrets
