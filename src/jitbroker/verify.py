"""``Verifier``: token verification on its own, for services that only check tokens.

Online (a lease store is given) a token passes only if its signature, issuer,
time window, audience and scopes check out AND its lease exists and is active.
Offline (``offline=True``, no store) revocation only takes effect at expiry.

A bounded cache maps a token to its signature-checked claims so a service that
sees the same token on every request pays for the signature once. A hit still
checks the key is held, the time window, audience, scopes and (online) the lease.

Verification is written once, as steps that yield the store calls it needs
(``jitbroker._drive``): ``verify`` makes them, ``averify`` awaits them, so the
two differ only in how they wait. A JWKS fetch a token has to wait for is one
more such step (see ``_after_fetch``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from operator import methodcaller
from typing import Any, NamedTuple

import attrs
from cachetools import LRUCache

from . import tokens, validate
from ._drive import Steps, arun, run
from .audit import Auditor, Sink, verify_failed
from .clock import Clock, Duration, seconds, system_clock
from .dpop import ProofChecker
from .errors import (
    InsufficientScope,
    InvalidProof,
    InvalidRequest,
    InvalidToken,
    KeySourceError,
    MalformedToken,
    TokenExpired,
    TokenNotYetValid,
    TokenRevoked,
    UnknownKey,
    UnknownLease,
    WrongAudience,
    WrongIssuer,
)
from .jwks import MAX_JWKS_BYTES, Fetch, JWKSource, parse_jwks
from .keyring import KeyRing
from .lease import Claims, Lease
from .revocations import RevocationCache
from .stores.base import AsyncLeaseStore, LeaseStore, as_async
from .usage import UsageLog

__all__ = ["DEFAULT_MAX_TTL", "MAX_LEEWAY", "Request", "Verifier"]

MAX_LEEWAY = 60.0
# The default lifetime cap: Broker's default max_ttl (3600 s) plus one second,
# as Broker allows its own verifier (token times are whole seconds).
DEFAULT_MAX_TTL = 3601.0
_NO_SCOPES: tuple[str, ...] = ()


class Request(NamedTuple):
    """What a request brings besides the token, for key-bound tokens (DPoP)."""

    proof: str | None = None
    method: str | None = None
    url: str | None = None


NO_REQUEST = Request()


class _NeedKeys(Exception):
    """Raised by ``Verifier._decode`` when a token can only be checked against
    the key set a background fetch is bringing (an unknown ``kid``, or keys
    past ``max_age + max_stale``). Never escapes the verifier.

    ``join``: whether a *thread* waits for the fetch. It always does for the
    fetch it started, never for another's on an unknown ``kid``
    (CVE-2026-48524: a flood of made-up kids must not park threads behind a
    slow endpoint). A coroutine always awaits it: that holds no thread.
    """

    def __init__(self, fetch: Fetch, *, join: bool) -> None:
        self.fetch = fetch
        self.join = join

    def step(self, store: object) -> Fetch:
        """The wait as a step: ``arun`` awaits the ``Fetch`` it returns."""
        return self.fetch


def _driven(store: LeaseStore | AsyncLeaseStore | None) -> tuple[Any, Any]:
    """What ``averify`` and ``verify`` make their store calls on: (async, sync).

    An async store is awaited, and refused by the sync ``verify``. A blocking
    sync store is called in a worker thread by ``averify`` (``as_async``); one
    that never blocks (``MemoryStore``) is called as it is by both: ``arun``
    awaits only what is awaitable, so that saves a coroutine per call.
    """
    if store is None:
        return None, None
    view = as_async(store)  # also refuses what is no store at all
    if view is store:
        return store, _AsyncStoreOnly(store)
    return (view if getattr(store, "blocking", True) else store), store


class _AsyncStoreOnly:
    """What the sync ``verify`` drives its steps against when the store is async:
    a coroutine cannot run there, so any store call says what to call instead."""

    def __init__(self, store: object) -> None:
        self.kind = type(store).__name__

    def __getattr__(self, name: str) -> Any:
        raise InvalidRequest(
            f"this Verifier's store ({self.kind}) is async: use `await verifier.averify(...)`"
        )


def check_leeway(value: Duration) -> float:
    """Leeway is explicit and small: 0 to 60 seconds."""
    leeway = seconds(value, "leeway", allow_zero=True)
    if leeway > MAX_LEEWAY:
        raise InvalidRequest(f"leeway is {leeway:g}s; at most {MAX_LEEWAY:g}s is allowed")
    return leeway


def check_max_ttl(value: object) -> float:
    """The lifetime cap is always finite: None is refused, not read as "no cap"."""
    if value is None:
        raise InvalidRequest(
            "max_ttl=None would accept tokens of any lifetime; pass the issuer's "
            "max_ttl plus one second (the default, 3601, matches Broker's default)"
        )
    return seconds(value, "max_ttl")


class Verifier:
    """Verifies tokens against a key ring or a JWKS, optionally online against a store.

    Args:
        keys: a ``KeyRing`` (an HMAC ring must be the issuer's own) or a JWKS dict.
        issuer: the exact ``iss`` to accept.
        audience: the default audience for ``verify`` calls.
        store: the lease store to check leases in (online verification): a
            ``LeaseStore``, or an async one (``AsyncRedisStore``), which only
            ``averify`` can use.
        offline: pass True, with no store, to verify signatures and claims only;
            then a revoked token keeps verifying until it expires.
        leeway: clock skew allowed on ``exp``/``nbf``/``iat`` (0..60 s, default 5).
        max_ttl: refuse tokens whose ``exp - iat`` exceeds this many seconds
            (default 3601: a ``Broker``'s default ``max_ttl`` plus one second).
            Pass the issuer's ``max_ttl`` + 1 if it issues longer tokens; there
            is no "unlimited", so a stolen signing key cannot mint a token that
            outlives every rotation.
        cache_size: how many verified tokens to remember (0 disables the cache).
        clock: the time source (default ``time.time``).
        revocations: with a store, a ``RevocationCache`` (``store.revocations()``)
            that answers for the store while its feed is live: JWS tokens issued
            after the store's epoch (plus ``leeway``) then verify with no store
            round trip. Keys retired through the store leave ``keys`` as the
            feed delivers them.
        audit: sinks (callables, a ``JsonLinesSink``) that receive a
            ``verify_failed`` event for every rejected token: the error class and
            the lease id when known, never the token. They also go to the
            ``jitbroker.audit`` logger at INFO, as a broker's events do.
    """

    revocations: RevocationCache | None

    def __init__(
        self,
        keys: KeyRing | Mapping[str, Any],
        *,
        issuer: str,
        audience: str | None = None,
        store: LeaseStore | AsyncLeaseStore | None = None,
        offline: bool = False,
        leeway: Duration = 5,
        max_ttl: Duration = DEFAULT_MAX_TTL,
        cache_size: int = 4096,
        clock: Clock = system_clock,
        revocations: RevocationCache | None = None,
        audit: Iterable[Sink] = (),
    ) -> None:
        if revocations is not None and store is None:
            raise InvalidRequest("a revocation cache stands in for a store: pass store= too")
        if store is None and not offline:
            raise InvalidRequest(
                "pass store=... for online verification, or offline=True to accept "
                "that revoked tokens verify until they expire"
            )
        if store is not None and offline:
            raise InvalidRequest("offline=True and a store contradict each other; pick one")
        self._init(keys, issuer, audience, leeway, max_ttl, cache_size, clock)
        self.store = store
        self._astore, self._sync_store = _driven(store)
        self.online = not offline
        self.revocations = revocations
        if revocations is not None:
            # A key retired through the store leaves this ring as the feed
            # delivers it (invariant 11): its tokens fail the kid check at once.
            revocations.on_retired(self.keys.exclude)
        self.audit: Auditor | None = Auditor(audit)

    @classmethod
    def from_jwks_url(
        cls,
        url: str,
        *,
        allow_http: bool = False,
        timeout: Duration = 5,
        max_age: Duration = 3600,
        max_stale: Duration | None = None,
        min_refresh_interval: Duration = 60,
        **options: Any,
    ) -> Verifier:
        """A verifier whose keys come from a JWKS URL (see ``JWKSource``): https
        only unless ``allow_http``, fetched now (a failure raises
        ``KeySourceError``), then refetched on an unknown ``kid`` at most once
        per ``min_refresh_interval``, and every ``max_age`` (cached tokens
        included); ``timeout`` bounds each whole fetch. ``options`` are the
        constructor's.

        Refreshes run in a background thread while verification goes on with
        the keys held, for up to ``max_stale`` past ``max_age`` (default: one
        more ``max_age``); past that a call waits for a fetch and raises
        ``KeySourceError`` if none succeeds. A token naming an unknown ``kid``
        waits for the refetch it triggers (``verify`` blocks, only for a fetch
        it started; ``averify`` awaits any, the event loop running on), at
        most ``timeout``."""
        source = JWKSource(
            url,
            allow_http=allow_http,
            timeout=timeout,
            max_age=max_age,
            max_stale=max_stale,
            min_refresh_interval=min_refresh_interval,
            clock=options.get("clock", system_clock),
        )
        self = cls(source.keys, **options)
        self.source = source
        return self

    @classmethod
    def from_jwks_file(cls, path: str | os.PathLike[str], **options: Any) -> Verifier:
        """A verifier whose keys are the public JWKS in the file at ``path``."""
        try:
            with open(path, "rb") as fh:
                body = fh.read(MAX_JWKS_BYTES + 1)
        except OSError as exc:
            raise KeySourceError(f"could not read the JWKS file {path}: {exc}") from exc
        if len(body) > MAX_JWKS_BYTES:
            raise KeySourceError(f"the JWKS file {path} is larger than {MAX_JWKS_BYTES} bytes")
        return cls(parse_jwks(body, str(path)), **options)

    def _init(
        self,
        keys: KeyRing | Mapping[str, Any],
        issuer: str,
        audience: str | None,
        leeway: Duration,
        max_ttl: Duration,
        cache_size: int,
        clock: Clock,
    ) -> None:
        self.keys = keys if isinstance(keys, KeyRing) else KeyRing.from_jwks(keys)
        self.issuer = validate.text(issuer, "issuer")
        self.audience = validate.optional_text(audience, "audience")
        self.leeway = check_leeway(leeway)
        self.max_ttl = check_max_ttl(max_ttl)
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise InvalidRequest("cache_size must be a whole number >= 0")
        self._cache: LRUCache[str, Claims] | None = LRUCache(cache_size) if cache_size else None
        self._cache_lock = threading.Lock()
        self.clock = clock
        self.source: JWKSource | None = None
        self.revocations = None
        self.proofs = ProofChecker(leeway=self.leeway, clock=clock)
        #: Where online verifies record their lease's use (a broker's, with
        #: ``track_usage``): in memory only, flushed to the store by the sweep.
        self.usage: UsageLog | None = None

    @classmethod
    def _online(cls, keys: KeyRing, **options: Any) -> Verifier:
        """A verifier whose lease checks are driven by the caller's store (Broker's)."""
        self = cls.__new__(cls)
        self._init(keys, **options)
        self.store = self._astore = self._sync_store = None
        self.online = True
        self.audit = None  # the broker audits its own verifications
        return self

    def __repr__(self) -> str:
        mode = "online" if self.online else "offline"
        return f"<Verifier issuer={self.issuer!r} {mode} keys={len(self.keys)}>"

    # -- public -----------------------------------------------------------
    def verify(
        self,
        token: str,
        *,
        audience: str | None = None,
        scopes: Iterable[str] | str = (),
        proof: str | None = None,
        method: str | None = None,
        url: str | None = None,
    ) -> Claims:
        """Verify ``token`` for ``audience`` and ``scopes``; raise an ``InvalidToken`` if not.

        A token bound to a holder key (``cnf.jkt``) also needs the request's DPoP
        ``proof`` (the ``DPoP`` header), its HTTP ``method`` and its ``url``.
        """
        request = Request(proof, method, url)
        try:
            return run(self.steps(token, audience, scopes, request), self._sync_store)
        except InvalidToken as exc:
            if self.audit is not None:
                verify_failed(self.audit, exc, self.clock())
            raise

    async def averify(
        self,
        token: str,
        *,
        audience: str | None = None,
        scopes: Iterable[str] | str = (),
        proof: str | None = None,
        method: str | None = None,
        url: str | None = None,
    ) -> Claims:
        """``verify`` for asyncio code (ASGI middleware): the same checks, errors
        and audit events, and it never blocks the event loop.

        The lease lookup is awaited: an async store (``AsyncRedisStore``)
        directly, a blocking one (``PostgresStore``, ``SQLiteStore``,
        ``RedisStore``) in a worker thread, ``MemoryStore`` inline. Offline,
        cached-key and revocation-cache verifications make no store call and
        run inline, with no thread hop. With keys from a JWKS URL, a token
        naming a ``kid`` we do not hold awaits the background refetch (at most
        the source's ``timeout``, rate-limited as for ``verify``).
        """
        request = Request(proof, method, url)
        try:
            return await arun(self.steps(token, audience, scopes, request), self._astore)
        except InvalidToken as exc:
            if self.audit is not None:
                verify_failed(self.audit, exc, self.clock())
            raise

    def decode(self, token: str) -> Claims:
        """Signature, format, issuer and lifetime checks only (cached); no time window.

        With keys from a JWKS URL this may wait (in this thread) for a refetch:
        on an unknown ``kid``, or once the keys are past ``max_age + max_stale``.
        """
        try:
            return self._decode(token)
        except _NeedKeys as exc:
            need = exc
        if need.join:
            need.fetch.wait()
        return self._decode(token, waited=True)

    def _decode(self, token: str, waited: bool = False) -> Claims:
        """``decode``, raising ``_NeedKeys`` where it would wait for a fetch
        (unless ``waited``: the fetch has been waited for already)."""
        if type(token) is not str:  # before the cache: it hashes the token
            raise MalformedToken(f"a token must be a string, not {type(token).__name__}")
        cache = self._cache
        if cache is not None:
            with self._cache_lock:
                claims = cache.get(token)
            if claims is not None:
                # A JWKS verifier refreshes on a hit too, or a key the issuer
                # dropped would verify cached tokens until an uncached one came.
                keys = self.keys if self.source is None else self._fresh_keys(self.source, waited)
                # Its key was retired since: by rotation's end, by ``retire``, or
                # (a broker's ring) through the store by another process.
                if claims.key_id not in keys:
                    raise UnknownKey(f"no key with kid {claims.key_id!r}")
                return claims
        source = self.source
        keys = self.keys if source is None else self._fresh_keys(source, waited)
        try:
            key, payload = tokens.decode_jws(token, keys)
        except UnknownKey:
            # A new key the issuer published since our fetch? Refetch, rate-limited,
            # and wait for it (or another thread's fetch may just have brought it).
            if source is None:
                raise
            # Another thread's fetch is waited for only while the keys held are
            # past max_age: time-driven, not attacker-driven (a flood of unknown
            # kids cannot make keys stale), and the very case two-phase rotation
            # relies on: a key published max_age before it signs is in that fetch.
            if not waited and (fetch := source.refresh_soon()) is not None:
                join = fetch.started or source.stale(self.clock())
                raise _NeedKeys(fetch, join=join) from None
            if source.keys is keys:
                raise
            self.keys = keys = source.keys
            key, payload = tokens.decode_jws(token, keys)
        claims = tokens.claims_from_payload(payload, key)
        if claims.issuer != self.issuer:
            raise WrongIssuer(f"token issued by {claims.issuer[:128]!r}, not {self.issuer!r}")
        if claims.expires_at - claims.issued_at > self.max_ttl:
            raise MalformedToken(f"token lifetime exceeds the maximum of {self.max_ttl:g}s")
        if cache is not None:
            with self._cache_lock:
                cache[token] = claims
        return claims

    def _fresh_keys(self, source: JWKSource, waited: bool) -> KeyRing:
        """The source's keys; once older than its ``max_age``, refreshed in the
        background (rate-limited) while they stay in use. Past ``max_age +
        max_stale`` they are not used: wait for the fetch (``_NeedKeys``), or
        fail closed if there is none, or it did not bring fresh keys.
        """
        now = self.clock()
        keys = source.keys  # first: a call that starts a refresh uses the set it found
        if source.stale(now):
            fetch = source.refresh_soon()
            if source.expired(now):
                if fetch is not None and not waited:
                    raise _NeedKeys(fetch, join=True)  # not attacker-driven: time is
                raise KeySourceError(
                    f"the keys from {source.where} are {source.age(now):.0f}s old, past "
                    f"max_age + max_stale ({source.max_age + source.max_stale:g}s), and "
                    "could not be refreshed: see the log for why"
                )
        self.keys = keys
        return keys

    def steps(
        self,
        token: str,
        audience: str | None,
        scopes: Iterable[str] | str,
        request: Request = NO_REQUEST,
    ) -> Steps[Claims]:
        """Verification as steps: yields the lease lookup when online (see ``_drive``),
        and the JWKS fetch a token must wait for (see ``_after_fetch``)."""
        if isinstance(token, str) and tokens.is_opaque(token):
            return self._opaque_steps(token, audience, scopes, request)
        return self._jws_steps(token, audience, scopes, request)

    # -- the two token formats --------------------------------------------
    def _jws_steps(
        self, token: str, audience: str | None, scopes: Iterable[str] | str, request: Request
    ) -> Steps[Claims]:
        try:
            claims = self._decode(token)
        except _NeedKeys as exc:
            need: _NeedKeys | None = exc
        else:
            need = None
        if need is not None:  # waited for outside the except: no error chained to it
            claims = yield from self._after_fetch(token, need)
        now = self.clock()
        self._check_window(claims, now)
        self._check_access(claims, audience, scopes)
        if self.online:
            cache = self.revocations
            if cache is not None and claims.key_id in cache.retired_keys:
                # Retired through the store: a ring of ours dropped it already
                # (on_retired); this covers keys that come from a JWKS source.
                raise UnknownKey(f"key {claims.key_id!r} was retired")
            if cache is not None and cache.vouches_for(claims.issued_at, self.leeway):
                # The feed is current: the signature proves the lease was stored
                # (invariant 1), after the store's epoch, so it was not lost with
                # older data; and the cache knows every revocation since.
                if cache.revoked(claims.lease_id):
                    raise TokenRevoked(
                        f"lease {claims.lease_id} was revoked",
                        lease_id=claims.lease_id,
                        reason=None,  # the feed carries ids only
                    )
            else:
                lease = yield lambda store: store.get(claims.lease_id)
                check_lease(claims, lease, self.clock())  # after the lookup: no stale "now"
        if claims.holder is not None:
            self._check_proof(claims.holder, token, request)
        usage = self.usage  # only a broker's (online) verifier has one
        if usage is not None:  # a dict update, never a store call
            usage.record(claims.lease_id, claims.audience, now)
        return claims

    def _after_fetch(self, token: str, need: _NeedKeys) -> Steps[Claims]:
        """Wait for the fetch ``need`` names, then decode with what it brought.

        ``arun`` awaits the step's ``Fetch`` (the event loop keeps running) and
        sends back its outcome; ``run`` sends back the ``Fetch`` itself,
        unawaited, so a sync caller waits for it here, in its own thread.
        """
        if (yield need.step) is need.fetch and need.join:
            need.fetch.wait()
        return self._decode(token, waited=True)

    def _opaque_steps(
        self, token: str, audience: str | None, scopes: Iterable[str] | str, request: Request
    ) -> Steps[Claims]:
        lease_id = tokens.check_opaque(token)
        if not self.online:
            raise UnknownLease("opaque tokens can only be verified online, against the store")
        lease = yield lambda store: store.get(lease_id)
        if lease is None:
            raise UnknownLease("no lease for this token", lease_id=lease_id)
        claims = claims_from_lease(lease, self.issuer)
        now = self.clock()
        check_lease(claims, lease, now)
        self._check_access(claims, audience, scopes)
        if lease.parent is not None:
            # An opaque token carries no act claim: the chain comes from the
            # store, one read per link (only delegated tokens pay for it).
            principal, chain = yield from _ancestors(lease.parent)
            claims = attrs.evolve(
                claims, subject=principal, actor=lease.subject, delegated_by=chain
            )
        if claims.holder is not None:  # last: a failed verify never spends a proof
            self._check_proof(claims.holder, token, request)
        usage = self.usage
        if usage is not None:  # a dict update, never a store call
            usage.record(lease_id, lease.audience, now)
        return claims

    def _check_proof(self, jkt: str, token: str, request: Request) -> None:
        # Last: a proof is only spent (remembered against replay) by a request
        # whose token passed every other check.
        if request.method is None or request.url is None:
            raise InvalidProof(
                "this token is bound to a key: verify it with proof=, method= and url="
            )
        self.proofs.check(
            request.proof, method=request.method, url=request.url, token=token, jkt=jkt
        )

    # -- claim checks -----------------------------------------------------
    def _check_window(self, claims: Claims, now: float) -> None:
        leeway = self.leeway
        if now >= claims.expires_at + leeway:
            raise TokenExpired(
                f"token for lease {claims.lease_id} expired at {claims.expires_at}",
                expired_at=claims.expires_at,
            )
        if claims.not_before > now + leeway or claims.issued_at > now + leeway:
            raise TokenNotYetValid(f"token for lease {claims.lease_id} is not valid yet")

    def _check_access(
        self, claims: Claims, audience: str | None, scopes: Iterable[str] | str
    ) -> None:
        want = audience if audience is not None else self.audience
        if want is None:
            raise InvalidRequest(
                "verify needs an audience: pass audience=... here or to the Verifier"
            )
        if claims.audience != want:
            raise WrongAudience(f"token is for audience {claims.audience[:128]!r}, not {want!r}")
        required = validate.scopes(scopes) if scopes else _NO_SCOPES
        if not claims.scopes.issuperset(required):
            missing = set(required) - claims.scopes
            raise InsufficientScope(
                f"token lacks scopes {' '.join(sorted(missing))!r}", missing=missing
            )


def check_lease(claims: Claims, lease: Lease | None, now: float) -> None:
    """The online check: the lease exists, is active, and is the token's."""
    if lease is None:
        raise UnknownLease(f"no lease {claims.lease_id} in the store", lease_id=claims.lease_id)
    if lease.revoked_at is not None:
        raise TokenRevoked(
            f"lease {lease.id} was revoked ({lease.revoke_reason})",
            lease_id=lease.id,
            reason=lease.revoke_reason,
        )
    if now >= lease.expires_at:
        raise TokenExpired(f"lease {lease.id} expired", expired_at=lease.expires_at)
    # The token must not claim more than its lease holds (defence in depth
    # against a signed token that disagrees with the authority record).
    if (
        lease.subject != (claims.subject if claims.actor is None else claims.actor)
        or lease.audience != claims.audience
        or lease.holder != claims.holder
        or lease.parent != claims.parent
        or not claims.scopes.issubset(lease.scopes)
    ):
        raise UnknownLease(f"lease {lease.id} does not match the token", lease_id=lease.id)


def _ancestors(parent: str) -> Steps[tuple[str, tuple[str, ...]]]:
    """The root's subject (the principal), and the ids of ``parent`` and its
    ancestors, nearest first (bounded)."""
    chain = [parent]
    while True:
        lease: Lease | None = yield methodcaller("get", chain[-1])
        if lease is None:  # purged: a dead ancestor, so this lease is dead too
            raise UnknownLease("the lease this token was delegated from is gone")
        if lease.parent is None or len(chain) >= tokens.MAX_ACT_DEPTH:
            return lease.subject, tuple(chain)
        chain.append(lease.parent)


def claims_from_lease(lease: Lease, issuer: str) -> Claims:
    """Claims for an opaque token: everything comes from its lease."""
    return Claims(
        lease_id=lease.id,
        issuer=issuer,
        subject=lease.subject,
        audience=lease.audience,
        scopes=frozenset(lease.scopes),
        issued_at=int(lease.issued_at),
        not_before=int(lease.issued_at),
        expires_at=int(lease.expires_at),
        task=lease.task,
        owner=lease.owner,
        purpose=lease.purpose,
        parent=lease.parent,
        holder=lease.holder,
    )
