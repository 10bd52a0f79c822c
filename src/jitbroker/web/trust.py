"""Who is calling the token endpoint, proven without a static secret by default.

A ``Trust`` holds the rules a broker service (``broker_app``) authenticates its
callers by, and turns a token request's client authentication into a
``Caller``: the jitbroker subject and owner it maps to, the rule that matched
and what the audit log needs, never the assertion itself.

- ``TrustRule``: a workload-identity issuer (GitHub Actions, GitLab CI, a
  Kubernetes cluster, SPIRE, any OIDC issuer). Its signed JWT, sent as a
  ``jwt-bearer`` client assertion (RFC 7523 section 2.2) or as an RFC 8693
  ``subject_token`` / ``actor_token``, is checked against the issuer's JWKS,
  the rule's audience and claim matchers, and mapped to a subject by a template.
- ``ClientKey``: a service with a registered public key (``private_key_jwt``,
  RFC 7523 section 3 as OpenID Connect Core section 9 profiles it).
- ``ClientSecret``: HTTP Basic or form client secrets (RFC 6749 section 2.3.1),
  stored scrypt-hashed; only enabled by configuring one.

Claim matching, templates and replay are described in ``docs/trust.md``. The
layers below, one module each: ``assertions`` (JWS/JWT checks, issuer keys,
replay cache), ``claims`` (claim paths, globs, templates), ``client_secrets``
(scrypt, HTTP Basic) and ``trust_rules`` (the rule values and ``Caller``); the
public names are all importable from here and from ``jitbroker.web``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from ..clock import Clock, Duration, seconds, system_clock
from ..errors import InvalidRequest, KeySourceError
from ..keyring import KeyRing
from . import assertions
from .assertions import Assertion, IssuerSource, ReplayCache, parse_assertion, refused
from .client_secrets import MAX_SECRET, basic_credentials, hash_client_secret, secret_matches
from .errors import InvalidClient
from .trust_rules import ALGORITHMS, Caller, ClientKey, ClientSecret, TrustRule, sort_rules
from .trust_sources import IssuerKeys, Sources, may_wait

__all__ = [
    "Caller",
    "ClientKey",
    "ClientSecret",
    "Trust",
    "TrustRule",
    "hash_client_secret",
]

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEFAULT_LEEWAY = 10.0
CLIENT_ASSERTION_TTL = 3600.0  # the longest private_key_jwt lifetime accepted


@attrs.frozen
class _Issuer:
    """A ``TrustRule`` with the key source of its JWKS (shared by the rules of one URL)."""

    rule: TrustRule
    keys: IssuerKeys


class Trust:
    """The rules callers authenticate by, with each issuer's keys and a replay cache.

    Args:
        rules: ``TrustRule``, ``ClientKey`` and ``ClientSecret`` entries. Several
            rules may name one issuer: the first (in order) whose audience and
            claims match is used. Client ids must be unique, and none may be a
            trusted issuer (an assertion's ``iss`` says which it is).
        token_endpoint: this broker's ``/token`` URL, the ``aud`` a
            ``private_key_jwt`` assertion must carry.
        clock: the time source (expiry, replay cache, JWKS ages).
        max_assertion_bytes: longer assertions are refused before any decoding.
        replay_cache_size: how many unexpired assertions to remember; when it is
            full of live entries new assertions are refused (never forgotten early).
        jwks_timeout: seconds for each JWKS or discovery fetch.
        leeway: clock skew allowed on ``exp``, ``nbf`` and ``iat`` (seconds).

    ``rules`` keeps the rules as given. Names (``TrustRule.name``, client ids)
    must be unique: the service authorizes callers by ``Caller.rule``.

    Building one fetches every issuer's discovery document and JWKS; an issuer
    that cannot be reached is logged and tried again when its tokens come, at
    most every 10 s (``trust_sources``): until then they get ``KeySourceError``,
    and ``unavailable()`` names the issuer. ``authenticate_*`` may wait up to
    ``jwks_timeout`` for a JWKS refresh when a token names a key not seen yet
    (at most one fetch per issuer a minute): call them off the event loop.
    """

    def __init__(
        self,
        rules: Iterable[TrustRule | ClientKey | ClientSecret],
        *,
        token_endpoint: str,
        clock: Clock = system_clock,
        max_assertion_bytes: int = 16384,
        replay_cache_size: int = 100_000,
        jwks_timeout: Duration = 5,
        leeway: Duration = DEFAULT_LEEWAY,
    ) -> None:
        if not isinstance(token_endpoint, str) or not token_endpoint:
            raise InvalidRequest("token_endpoint must be this broker's /token URL")
        if isinstance(max_assertion_bytes, bool) or not isinstance(max_assertion_bytes, int):
            raise InvalidRequest("max_assertion_bytes must be a whole number")
        if not 1024 <= max_assertion_bytes <= 1024 * 1024:
            raise InvalidRequest("max_assertion_bytes must be between 1024 and 1048576")
        self.token_endpoint = token_endpoint
        self.clock = clock
        self.max_assertion_bytes = max_assertion_bytes
        self.leeway = seconds(leeway, "leeway", allow_zero=True)
        self.jwks_timeout = seconds(jwks_timeout, "jwks_timeout")
        self._replay = ReplayCache(replay_cache_size, clock)
        self._closed = False
        if isinstance(rules, TrustRule | ClientKey | ClientSecret | str | bytes):
            raise InvalidRequest("rules must be a list of TrustRule, ClientKey or ClientSecret")
        self.rules: tuple[TrustRule | ClientKey | ClientSecret, ...] = tuple(rules)
        trust_rules, self._client_keys, self._secrets = sort_rules(self.rules)
        self._sources = Sources(timeout=self.jwks_timeout, clock=clock)
        found: dict[tuple[str, str | None, bool], IssuerKeys] = {}
        self._issuers: dict[str, list[_Issuer]] = {}
        for rule in trust_rules:
            where = (rule.issuer, rule.jwks_url, rule.allow_http)
            if where not in found:
                found[where] = IssuerKeys(
                    rule.issuer, rule.jwks_url, allow_http=rule.allow_http, sources=self._sources
                )
            self._issuers.setdefault(rule.issuer, []).append(_Issuer(rule, found[where]))
        self._keys = tuple(found.values())

    def __repr__(self) -> str:
        return (
            f"<Trust issuers={len(self._issuers)} client_keys={len(self._client_keys)} "
            f"client_secrets={len(self._secrets)}>"
        )

    # -- the two entry points ------------------------------------------------------
    def authenticate_client(self, form: Mapping[str, str], authorization: str | None) -> Caller:
        """The caller of a token, revoke or introspect request, from its parsed form
        fields and its ``Authorization`` header (None when absent).

        Exactly one method must be used (RFC 6749 section 2.3): a
        ``client_assertion`` of type ``jwt-bearer`` (a ``TrustRule`` issuer's
        token or a ``ClientKey``'s ``private_key_jwt``), HTTP Basic, or
        ``client_id`` + ``client_secret`` in the form. Assertions are single-use
        (unless their rule says otherwise). A ``client_id`` sent with a workload
        token is ignored: the token names the caller.
        Raises ``InvalidClient`` (``reason`` says what failed).
        """
        self._check_open()
        has_assertion = "client_assertion" in form or "client_assertion_type" in form
        basic = isinstance(authorization, str) and authorization[:6].lower() == "basic "
        post = "client_secret" in form
        used = int(has_assertion) + int(basic) + int(post)
        if used == 0:
            raise refused("no_credentials", "the request carries no client authentication")
        if used > 1:
            raise refused("multiple_methods", "use exactly one client authentication method")
        if has_assertion:
            return self._client_assertion(form)
        if basic:
            assert authorization is not None
            client_id, secret = basic_credentials(authorization)
            if form.get("client_id", client_id) != client_id:
                raise refused("wrong_client", "client_id does not match the Basic credentials")
            return self._secret(client_id, secret, "client_secret_basic")
        form_id, form_secret = form.get("client_id"), form["client_secret"]
        if not isinstance(form_id, str) or not isinstance(form_secret, str):
            raise refused("malformed", "client_secret_post needs client_id and client_secret")
        return self._secret(form_id, form_secret, "client_secret_post")

    def authenticate_assertion(self, assertion: str, *, single_use: bool = False) -> Caller:
        """The caller a workload-identity JWT on its own proves (an RFC 8693
        ``subject_token`` or ``actor_token``): the same checks, ``TrustRule``s only.

        Not single-use by default: in a token exchange it accompanies a client
        authentication, which is. Pass ``single_use=True`` when it is the only
        credential of the request. Raises ``InvalidClient``; answer it as RFC
        8693's ``invalid_request``.
        """
        self._check_open()
        parsed = parse_assertion(assertion, self.max_assertion_bytes)
        issuers = self._issuers.get(_issuer_of(parsed))
        if issuers is None:
            raise refused("unknown_issuer", "the assertion's issuer is not trusted")
        return self._workload(parsed, issuers, single_use=single_use)

    def unavailable(self) -> tuple[str, ...]:
        """The issuers whose keys could not be loaded yet (for health checks)."""
        return tuple(sorted({keys.issuer for keys in self._keys if not keys.ready}))

    def close(self) -> None:
        """Stop using the issuers' keys; waits (up to ``jwks_timeout``) for a running
        JWKS refresh to end. Later calls raise ``InvalidClient``."""
        self._closed = True
        for source in self._sources.loaded():
            fetch = source.fetching
            if fetch is not None:
                fetch.wait()

    def _check_open(self) -> None:
        if self._closed:
            raise refused("closed", "this Trust was closed")

    # -- assertions ------------------------------------------------------------------
    def _client_assertion(self, form: Mapping[str, str]) -> Caller:
        if form.get("client_assertion_type") != JWT_BEARER:
            raise refused(
                "unsupported_assertion_type", f"client_assertion_type must be {JWT_BEARER}"
            )
        parsed = parse_assertion(form.get("client_assertion"), self.max_assertion_bytes)
        iss = _issuer_of(parsed)
        issuers = self._issuers.get(iss)
        if issuers is not None:
            return self._workload(parsed, issuers, single_use=None)
        client = self._client_keys.get(iss)
        if client is not None:
            return self._private_key_jwt(parsed, client, form.get("client_id"))
        raise refused("unknown_issuer", "the assertion's issuer is not trusted")

    def _workload(
        self, parsed: Assertion, issuers: list[_Issuer], *, single_use: bool | None
    ) -> Caller:
        """The first rule of the issuer that accepts the token; else the first
        rule's refusal. ``single_use`` None: as the rule says."""
        first: InvalidClient | None = None
        for issuer in issuers:
            try:
                caller, exp = self._check_rule(parsed, issuer)
            except InvalidClient as exc:
                first = first or exc
                continue
            once = issuer.rule.single_use if single_use is None else single_use
            if once:
                jti = parsed.payload.get("jti")
                key = jti if isinstance(jti, str) else "sha256:" + parsed.digest
                self._replay.add((caller.issuer, key), exp + self.leeway)
            return caller
        assert first is not None
        raise first

    def _check_rule(self, parsed: Assertion, issuer: _Issuer) -> tuple[Caller, float]:
        rule, payload = issuer.rule, parsed.payload
        # Cheap checks first: a token for another audience or long expired must
        # not cost a signature check, let alone a JWKS refresh.
        exp = assertions.check_times(payload, self.clock(), self.leeway, rule.max_assertion_ttl)
        assertions.check_audience(payload, rule.audience)
        self._check_signature(parsed, issuer)
        sub = assertions.string_claim(payload, "sub")
        _check_jti(payload)
        values = rule.claim_values(payload)
        subject, owner = rule.subject_and_owner(values)
        caller = Caller(
            subject=subject,
            owner=owner,
            rule=rule.rule_name,
            method="jwt-bearer",
            issuer=rule.issuer,
            assertion_subject=sub,
            max_ttl=rule.max_ttl,
            expires_at=exp,
            claims=values,
        )
        return caller, exp

    def _check_signature(self, parsed: Assertion, issuer: _Issuer) -> None:
        source, algorithms = issuer.keys.source(), issuer.rule.algorithms
        try:
            if assertions.check_signature(parsed, self._fresh_keys(source), algorithms):
                return
        except InvalidClient as exc:
            # Without a kid, a signature that fails may be by a key published
            # since our fetch: refresh as for an unknown kid.
            if exc.reason != "bad_signature" or "kid" in parsed.header:
                raise
        # A key the issuer published since our last fetch? One refresh, rate
        # limited per source however many tokens name unknown keys.
        may_wait()
        source.refresh()
        if not assertions.check_signature(parsed, source.keys, algorithms):
            raise refused("unknown_key", "the assertion's key is not in its issuer's JWKS")

    def _fresh_keys(self, source: IssuerSource) -> KeyRing:
        """The source's keys, refreshed in the background once stale; past
        ``max_age + max_stale`` wait for a fetch, or refuse (fail closed)."""
        now = self.clock()
        keys: KeyRing = source.keys
        if source.stale(now):
            fetch = source.refresh_soon()
            if source.expired(now):
                may_wait()
                if fetch is not None:
                    fetch.wait()
                if source.expired(self.clock()):  # an outage, not the caller's fault: a 503
                    raise KeySourceError(
                        f"the keys of {source.where} are too old and cannot be fetched"
                    )
                keys = source.keys
        return keys

    def _private_key_jwt(self, parsed: Assertion, client: ClientKey, form_id: object) -> Caller:
        payload = parsed.payload
        if form_id is not None and form_id != client.client_id:
            raise refused("wrong_client", "client_id does not match the assertion's iss")
        if payload.get("sub") != client.client_id:
            raise refused("wrong_subject", "a private_key_jwt must have sub equal to iss")
        exp = assertions.check_times(payload, self.clock(), self.leeway, CLIENT_ASSERTION_TTL)
        assertions.check_audience(payload, self.token_endpoint)
        if not assertions.check_signature(parsed, client.keys, ALGORITHMS):
            raise refused("unknown_key", "the assertion's key is not registered for the client")
        jti = assertions.string_claim(payload, "jti", "missing_jti")
        _check_jti(payload)
        self._replay.add(("client:" + client.client_id, jti), exp + self.leeway)
        return Caller(
            subject=client.subject,
            owner=client.owner or client.subject,
            rule=client.client_id,
            method="private_key_jwt",
            issuer="client:" + client.client_id,
            assertion_subject=client.client_id,
            max_ttl=client.max_ttl,
            expires_at=exp,
        )

    # -- secrets ---------------------------------------------------------------------
    def _secret(self, client_id: str, secret: str, method: str) -> Caller:
        if not self._secrets:
            raise refused("secrets_not_enabled", "client secrets are not enabled on this broker")
        if not 0 < len(secret) <= MAX_SECRET or not client_id:
            raise refused("bad_secret", "unknown client or wrong client secret")
        may_wait()  # scrypt: tens of milliseconds of CPU
        client = self._secrets.get(client_id)
        # An unknown id costs one scrypt too (None: a dummy hash), so the answer
        # takes as long as for a known one: no client-id enumeration by timing.
        matches = secret_matches(secret, None if client is None else client.secret_hash)
        if client is None or not matches:
            raise refused("bad_secret", "unknown client or wrong client secret")
        return Caller(
            subject=client.subject,
            owner=client.owner or client.subject,
            rule=client.client_id,
            method=method,
            issuer="client:" + client.client_id,
            assertion_subject=client.client_id,
            max_ttl=client.max_ttl,
            expires_at=None,
        )


def _issuer_of(parsed: Assertion) -> str:
    return assertions.string_claim(parsed.payload, "iss", "unknown_issuer")


def _check_jti(payload: Mapping[str, Any]) -> None:
    jti = payload.get("jti")
    if jti is not None and (not isinstance(jti, str) or not 0 < len(jti) <= 256):
        raise refused("malformed", "the assertion's jti must be a string of 1 to 256 characters")
