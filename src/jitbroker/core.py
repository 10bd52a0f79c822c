"""The broker's decisions, written once for ``Broker`` and ``AsyncBroker``.

Each operation is a generator: it validates, plans the lease, consults the
policy and signs without any I/O, and ``yield``s each store call it needs (see
``_drive``). The sync and async brokers only differ in how they wait.

Order matters for the invariants: a token is signed before its lease is
stored (so a store failure leaves nothing behind) but only leaves ``issue``
after the store accepted the lease.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from operator import methodcaller
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import attrs

from . import tokens, validate
from ._drive import Steps
from .audit import Auditor, EventType, Sink
from .audit import verify_failed as audit_verify_failed
from .clock import Clock, Duration, seconds, system_clock
from .dpop import holder_thumbprint
from .errors import (
    InvalidRequest,
    InvalidToken,
    LeaseNotActive,
    LeaseNotFound,
    PolicyDenied,
    ProviderError,
    QuotaExceeded,
    RenewalDenied,
)
from .hooks import Hooks
from .keyring import KeyRing
from .keys import Key
from .lease import Credential, Lease, Secret, new_credential, new_lease
from .outbox import SYNC, Mode, ProviderLike, Runner, check_providers
from .policy import AccessRequest, Decision, Policy, covers
from .stores.base import NO_OUTBOX, Job, LeaseFilter, Outbox, Quota
from .usage import Usage
from .validate import MAX_PURPOSE
from .verify import Verifier, check_leeway

if TYPE_CHECKING:
    from .broker import AsyncBroker, Broker

log = logging.getLogger("jitbroker")
LeaseRef = Credential | Lease | str
TokenFormat = Literal["jws", "opaque"]
SWEEP_BATCH = 1000
_ISSUED = EventType.ISSUED  # a module constant: an enum attribute costs 50 ns on 3.11
#: Attenuated leases may nest this deep by default (a root lease is depth 0).
MAX_DELEGATION_DEPTH = 4
#: The ``task()`` blocks the current context is inside, innermost last, as
#: (core, task name, run id). A context variable, so each thread and asyncio
#: task sees its own (``asyncio.create_task`` and ``asyncio.to_thread`` copy the
#: context, so work they start inside the block belongs to the task).
_TASK_RUNS: ContextVar[tuple[tuple[Core, str, str], ...]] = ContextVar(
    "jitbroker_task_runs", default=()
)


class Core:
    """Configuration plus the operations as generators of store calls."""

    def __init__(
        self,
        *,
        issuer: str,
        keys: KeyRing | None,
        policy: Policy | None,
        default_ttl: Duration,
        max_ttl: Duration,
        leeway: Duration,
        clock: Clock | None,
        token_format: TokenFormat,
        retention: Duration | None,
        reap_interval: Duration,
        cache_size: int,
        audit: Iterable[Sink],
        labels: Mapping[str, str] | None = None,
        max_delegation_depth: int = MAX_DELEGATION_DEPTH,
        hooks: Hooks | None = None,
        task_revoke_tries: int = 3,
        task_revoke_backoff: Duration = 0.1,
        providers: Iterable[ProviderLike] = (),
        reconcile_interval: Duration = 300.0,
    ) -> None:
        self.issuer = validate.text(issuer, "issuer")
        self.keys = keys if keys is not None else KeyRing.generate()
        if not isinstance(self.keys, KeyRing):
            raise InvalidRequest("keys must be a KeyRing (for example KeyRing.generate())")
        self.keys.active  # noqa: B018 - fail now, not at the first issue, if it cannot sign
        if policy is not None and not isinstance(policy, Policy):
            raise InvalidRequest("policy must be a Policy or None")
        if token_format not in ("jws", "opaque"):
            raise InvalidRequest(f"token_format must be 'jws' or 'opaque', not {token_format!r}")
        self.policy = policy
        self.max_ttl = seconds(max_ttl, "max_ttl")
        self.default_ttl = self._bounded(default_ttl, "default_ttl")
        self.leeway = check_leeway(leeway)
        self.clock: Clock = clock if clock is not None else system_clock
        self.opaque = token_format == "opaque"
        # Dead leases are kept until their tokens cannot verify any more.
        kept = 0.0 if retention is None else seconds(retention, "retention", allow_zero=True)
        self.retention = max(self.leeway, kept)
        self.reap_interval = seconds(reap_interval, "reap_interval")
        self.next_sweep = 0.0
        self.audit = Auditor(audit)
        self.labels = MappingProxyType(_labels(labels))
        self.max_depth = _depth(max_delegation_depth)
        self.hooks = hooks if hooks is not None else Hooks()
        self.outbox = Runner(
            self.hooks, check_providers(providers), self.clock, self.audit, self._revoked
        )
        #: How the shell finishes async hooks and blocking provider calls.
        self.mode: Mode = SYNC
        self.issue_hooks = self.outbox.issues  # checked on every issue
        # The audiences that name a provider (their leases get a backend credential).
        self.provider_names = frozenset(self.outbox.providers)
        self.reconcile_interval = seconds(reconcile_interval, "reconcile_interval")
        self.next_reconcile = 0.0
        # Recorded on every lease this broker creates (see Lease.expire_hooks),
        # and the values its sweeps may claim.
        self.expire_hooks = self.hooks.expire_profile
        self.expire_profiles = self.hooks.expire_profiles
        self._runnable = frozenset((None, *self.expire_profiles))
        self.verifier = Verifier._online(
            self.keys,
            issuer=self.issuer,
            audience=None,
            leeway=self.leeway,
            max_ttl=self.max_ttl + 1,  # token times are whole seconds
            cache_size=cache_size,
            clock=self.clock,
        )
        self.task_revoke_delays = revoke_delays(task_revoke_tries, task_revoke_backoff)
        self.shell: Broker | AsyncBroker | None = None
        #: The store (set by the shell), asked for ``KeyRetirements`` by name:
        #: a store without them retires keys in this ring only.
        self.store_retirements: object = None

    # -- helpers without I/O ----------------------------------------------
    def _bounded(self, ttl: object, name: str) -> float:
        value = seconds(ttl, name)
        if value > self.max_ttl:
            raise InvalidRequest(
                f"{name} {value:g}s exceeds the broker's max_ttl of {self.max_ttl:g}s"
            )
        return value

    def decide(self, lease: Lease, action: str, now: float) -> Decision:
        """The policy's decision on ``lease`` (allowed when there is no policy)."""
        if self.policy is None:
            return Decision(True)
        return self.policy.evaluate(AccessRequest(lease, action, now, self.labels))

    def _check_policy(self, lease: Lease, action: str, now: float) -> tuple[Quota, ...]:
        """Raise ``PolicyDenied`` (audited) unless allowed; the quotas to count on add."""
        decision = self.decide(lease, action, now)
        if not decision.allowed:
            self.denied(lease, PolicyDenied(decision.reasons), now)
        return decision.quotas

    def denied(self, lease: Lease, error: PolicyDenied, now: float) -> NoReturn:
        """Audit a denial, then raise it."""
        self.audit.emit(EventType.DENIED, now, lease, reasons=error.reasons)
        raise error

    def verify_failed(self, error: InvalidToken) -> None:
        """Audit a rejected token: the error class and lease id if known, never the token."""
        audit_verify_failed(self.audit, error, self.clock())

    def _token(
        self, lease: Lease, opaque: str | None, now: float, chain: tuple[Lease, ...] = ()
    ) -> str:
        if opaque is not None:
            return opaque
        payload = tokens.jws_payload(lease, self.issuer, int(now))
        if chain:  # RFC 8693: the principal is the subject, the holder the actor
            payload["sub"] = chain[-1].subject
            payload["act"] = tokens.act_claim(lease, chain)
        return tokens.encode_jws(self._signer(lease), payload)

    def _signer(self, lease: Lease) -> Key:
        """The key that signs ``lease``'s tokens: the one recorded on the lease, so
        ``revoke_where(key_id=...)`` stays truthful across rotations."""
        key = self.keys.get(lease.key_id) if lease.key_id else None
        if key is None or not key.private:
            raise RenewalDenied(
                f"lease {lease.id} was signed by key {lease.key_id}, which can no longer sign",
                lease_id=lease.id,
            )
        return key

    def lease_id(self, ref: LeaseRef) -> str:
        """The lease id from a Credential, a Lease, a token or an id."""
        if isinstance(ref, Credential | Lease):
            return ref.lease_id if isinstance(ref, Credential) else ref.id
        if not isinstance(ref, str) or not ref:
            raise InvalidRequest("expected a Credential, a Lease, a token or a lease id")
        if tokens.is_opaque(ref):
            return tokens.check_opaque(ref)
        if ref.count(".") == 2:
            return self.verifier.decode(ref).lease_id  # signature checked: no forged jti
        if not tokens.is_lease_id(ref):
            # Never echo the value: it may be a token with a prefix ("Bearer ...").
            raise InvalidRequest("expected a Credential, a Lease, a token or a lease id")
        return ref

    # -- operations ---------------------------------------------------------
    def plan_issue(
        self,
        subject: str,
        audience: str,
        scopes: Iterable[str] | str = (),
        ttl: Duration | None = None,
        task: str | None = None,
        owner: str | None = None,
        purpose: str | None = None,
        renewable: bool = True,
        max_ttl: Duration | None = None,
        holder_key: object = None,
        dry_run: bool = False,
    ) -> tuple[Lease, str, bool, tuple[Quota, ...]]:
        """Validate, check policy and sign: the lease to store, its token, whether
        a sweep is due (no sweep ran for ``reap_interval``; ``issue`` then sweeps
        inline, which keeps memory bounded even when no reaper runs), and the
        quotas the store must check as it adds the lease.

        ``issue`` is the hottest path, so unlike the other operations it is not
        a generator: each shell stores the lease itself and then calls
        ``issued`` (the step driver would cost ~7% of an opaque issue).
        """
        now = self.clock()
        life = self.default_ttl if ttl is None else self._bounded(ttl, "ttl")
        cap = (
            self.max_ttl
            if renewable is True and max_ttl is None
            else self._cap(life, renewable, max_ttl)
        )
        lease_id, opaque = tokens.new_identity(self.opaque)
        run = None
        if task is not None:
            task = validate.text(task, "task")
            run = self._run_of(task) if _TASK_RUNS.get() else None
        audience = validate.text(audience, "audience")
        # Positional, through the fast builder: this path is what issue costs.
        lease = new_lease(
            lease_id,
            validate.text(subject, "subject"),
            audience,
            validate.scopes(scopes),
            now,  # issued_at
            now + life,  # expires_at
            now + cap,  # max_expires_at
            None if opaque is not None else self.keys.signer(now).kid,
            task,
            None if owner is None else validate.text(owner, "owner"),
            None if purpose is None else validate.text(purpose, "purpose", limit=MAX_PURPOSE),
            None,  # parent
            renewable,
            None,  # revoked_at
            None,  # revoke_reason
            None if holder_key is None else holder_thumbprint(holder_key),
            self.issuer,
            run,  # task_run
            self.expire_hooks,
            audience if self.provider_names and audience in self.provider_names else None,
        )
        quotas: tuple[Quota, ...] = ()
        if dry_run:  # for explain: the lease as issue would build it, nothing more
            return lease, "", False, quotas
        if self.policy is not None:  # inline: a call is a measurable cost here
            quotas = self._check_policy(lease, "issue", now)
        token = opaque if opaque is not None else self._token(lease, None, now)
        return lease, token, now >= self.next_sweep, quotas

    def issued(self, lease: Lease, token: str, secret: Secret | None = None) -> Credential:
        """After the store accepted ``lease``: audit, and hand out the credential."""
        self.audit.emit(_ISSUED, lease.issued_at, lease)
        return new_credential(token, lease, self.shell, secret)

    def store_issue(self, lease: Lease, token: str, quotas: tuple[Quota, ...]) -> Steps[Credential]:
        """``issue`` for a lease with jobs (``on_issue`` hooks, a provider): the
        lease and its jobs in one store step, the backend credential made, then
        the hooks run. Without jobs the shells store the lease themselves."""
        _, secret, hooks = yield from self._store_new(lease, quotas)
        cred = self.issued(lease, token, secret)
        yield from self.outbox.run(hooks, self.mode)
        return cred

    def run_issue_hooks(self, lease: Lease, outbox: Outbox) -> Steps[int]:
        """Run the ``on_issue`` hook jobs ``outbox`` held when ``lease`` was added
        (the sync shell's path for a lease without a provider); how many failed."""
        return self.outbox.run(
            self.outbox.held("on_issue", [lease], outbox, lease.issued_at), self.mode
        )

    def _store_new(
        self, lease: Lease, quotas: tuple[Quota, ...]
    ) -> Steps[tuple[bool, Secret | None, list[Job]]]:
        """Store a new lease with its jobs and make its backend credential: whether
        it was added, the secret, and the ``on_issue`` jobs to run once it is out."""
        runner, mode, now = self.outbox, self.mode, lease.issued_at
        provider = runner.provider_of(lease.provider) if lease.provider else None
        if provider is not None:  # refuse what it cannot grant before anything is stored
            yield from runner.check(provider, lease, mode)
        outbox = runner.plan("on_issue", now) if self.issue_hooks or provider else NO_OUTBOX
        added = yield from self._add(lease, quotas, now, outbox)
        if not added:
            return False, None, []
        secret = None
        if provider is not None:
            secret = yield from runner.create(lease, outbox, mode)
        held = runner.held("on_issue", [lease], outbox, now)
        return True, secret, [job for job in held if job.event == "on_issue"]

    def _cap(self, life: float, renewable: object, max_ttl: Duration | None) -> float:
        """The lease's total lifetime, renewals included."""
        if not isinstance(renewable, bool):
            raise InvalidRequest("renewable must be True or False")
        if not renewable:
            return life
        if max_ttl is None:
            return self.max_ttl
        cap = self._bounded(max_ttl, "max_ttl")
        if cap < life:
            raise InvalidRequest(f"max_ttl {cap:g}s is shorter than ttl {life:g}s")
        return cap

    def renew(
        self, ref: LeaseRef, ttl: Duration | None, children: bool = False
    ) -> Steps[Credential]:
        """Extend an active, renewable lease (never past its cap) and re-sign its
        token; with ``children``, its active descendants too (``_renew_children``)."""
        lease_id = self.lease_id(ref)
        # An opaque token cannot be re-derived from its hash: renewal hands the same one back.
        token = ref.token if isinstance(ref, Credential) else ref
        opaque = token if isinstance(token, str) and tokens.is_opaque(token) else None
        extra = self.default_ttl if ttl is None else self._bounded(ttl, "ttl")
        lease = yield from self._active(lease_id)
        if not lease.renewable:
            raise RenewalDenied(f"lease {lease_id} is not renewable", lease_id=lease_id)
        now = self.clock()
        cap = lease.max_expires_at
        chain: tuple[Lease, ...] = ()
        if lease.parent is not None:
            parent = yield from self._active(lease.parent)
            cap = min(cap, parent.expires_at)
            chain = yield from self._chain(parent)
        # At its cap, a lease renewed elsewhere (``children=True``) still gives a
        # holder whose credential is behind it a token with its current expiry.
        behind = isinstance(ref, Credential) and ref.expires_at < lease.expires_at
        if lease.expires_at >= cap and not behind:
            raise RenewalDenied(
                f"lease {lease_id} already expires at its maximum lifetime", lease_id=lease_id
            )
        if lease.key_id is None and opaque is None:
            raise InvalidRequest("renewing an opaque lease needs its Credential or token")
        expires_at = max(lease.expires_at, min(now + extra, cap))
        self._check_policy(attrs.evolve(lease, expires_at=expires_at), "renew", now)
        if opaque is None:
            self._signer(lease)  # before extending: a failed renewal changes nothing
        renewed = lease
        if expires_at > lease.expires_at:  # a no-op renewal writes nothing
            renewed = yield lambda store: store.extend(lease_id, expires_at=expires_at, at=now)
        if renewed is None:
            raise LeaseNotActive(f"lease {lease_id} died while renewing", lease_id=lease_id)
        if renewed is not lease and renewed.provider is not None:
            yield from self._provider_renew(renewed)
        self.audit.emit(EventType.RENEWED, now, renewed)
        if not isinstance(children, bool):
            raise InvalidRequest("children must be True or False")
        if children:
            yield from self._renew_children(renewed, extra, now)
        # The backend credential outlives a renewal (its expiry moved): keep it.
        secret = ref.secret if isinstance(ref, Credential) else None
        return new_credential(self._token(renewed, opaque, now, chain), renewed, self.shell, secret)

    def _renew_children(self, parent: Lease, extra: float, now: float) -> Steps[None]:
        """Extend every active, renewable descendant of ``parent`` by ``extra`` as
        ``renew`` would (never past its own cap nor its parent's new expiry),
        breadth first, with its provider's backend expiry. A child the policy
        refuses, at its cap or not renewable keeps its expiry, and so does its
        subtree. The children's holders get tokens with the new expiry by
        renewing their own credential (an opaque token needs nothing: the
        store's expiry is the token's)."""
        level = [parent]
        depth = 0
        while level and depth <= tokens.MAX_ACT_DEPTH:
            depth += 1
            below: list[Lease] = []
            for above in level:
                found: list[Lease] = yield methodcaller("find", LeaseFilter(parent=above.id))
                for child in sorted(found, key=lambda lease: (lease.issued_at, lease.id)):
                    if not child.renewable or not child.is_active(now):
                        continue
                    expires_at = min(now + extra, child.max_expires_at, above.expires_at)
                    if expires_at <= child.expires_at:
                        continue
                    wanted = attrs.evolve(child, expires_at=expires_at)
                    if not self.decide(wanted, "renew", now).allowed:
                        continue
                    renewed: Lease | None = yield methodcaller(
                        "extend", child.id, expires_at=expires_at, at=now
                    )
                    if renewed is None:  # died meanwhile: so did its subtree
                        continue
                    if renewed.provider is not None:
                        yield from self._provider_renew(renewed)
                    self.audit.emit(EventType.RENEWED, now, renewed)
                    below.append(renewed)
            level = below

    def _provider_renew(self, lease: Lease) -> Steps[None]:
        provider = self.outbox.provider_of(lease.provider or "")
        if provider is None:
            raise ProviderError(
                f"lease {lease.id} holds a credential of provider {lease.provider!r}, which"
                " this broker does not have: renew it through a broker that does",
                provider=lease.provider or "",
                lease_id=lease.id,
            )
        mode = self.mode
        try:
            yield lambda store: mode.blocking(provider.renew, lease)
        except Exception as exc:
            raise ProviderError(
                f"lease {lease.id} was renewed, but provider {provider.name!r} could not move"
                f" its backend expiry ({type(exc).__name__}): the backend may cut it off at"
                " the old expiry; renew again",
                provider=provider.name,
                lease_id=lease.id,
            ) from exc

    def attenuate(
        self,
        ref: LeaseRef,
        scopes: Iterable[str] | str | None,
        audience: str | None,
        ttl: Duration | None,
        purpose: str | None,
        subject: str | None = None,
        holder_key: object = None,
        max_ttl: Duration | None = None,
    ) -> Steps[Credential]:
        """A child lease (RFC 8693 delegation): never wider scopes or audience, never
        outliving its parent, at most ``max_delegation_depth`` deep; its token's
        ``act`` claim names the delegating leases, nearest first. It keeps the
        parent's key binding unless ``holder_key`` binds it to that key, and its
        parent's renewal cap, lowered to ``max_ttl`` from now if that is sooner."""
        parent = yield from self._active(self.lease_id(ref))
        chain = yield from self._chain(parent)
        if len(chain) > self.max_depth:
            deep = len(chain) - 1
            at_least = "at least " if len(chain) > tokens.MAX_ACT_DEPTH else ""
            raise InvalidRequest(
                f"lease {parent.id} is {at_least}{deep} delegations deep; "
                f"the limit is {self.max_depth}"
            )
        now = self.clock()
        child_scopes = parent.scopes if scopes is None else validate.scopes(scopes)
        wider = [s for s in child_scopes if not any(covers(p, s) for p in parent.scopes)]
        if wider:
            raise InvalidRequest(
                f"attenuation cannot widen: the parent lease lacks scopes {' '.join(wider)!r}"
            )
        child_audience = (
            parent.audience if audience is None else validate.text(audience, "audience")
        )
        if not covers(parent.audience, child_audience):
            raise InvalidRequest(
                f"attenuation cannot widen: audience {child_audience!r} is outside "
                f"the parent's {parent.audience!r}"
            )
        holder = parent.holder if holder_key is None else holder_thumbprint(holder_key)
        remaining = parent.expires_at - now
        life = remaining if ttl is None else seconds(ttl, "ttl")
        if life > remaining:
            raise InvalidRequest(f"ttl {life:g}s exceeds the parent's remaining {remaining:.0f}s")
        cap = parent.max_expires_at
        if max_ttl is not None:
            ceiling = seconds(max_ttl, "max_ttl")
            if life > ceiling:
                raise InvalidRequest(f"ttl {life:g}s exceeds max_ttl {ceiling:g}s")
            cap = min(cap, now + ceiling)
        lease_id, opaque = tokens.new_identity(self.opaque)
        child = attrs.evolve(
            parent,
            id=lease_id,
            subject=parent.subject if subject is None else validate.text(subject, "subject"),
            audience=child_audience,
            scopes=child_scopes,
            issued_at=now,
            expires_at=now + life,
            max_expires_at=cap,
            key_id=None if opaque is not None else self.keys.signer(now).kid,
            parent=parent.id,
            holder=holder,
            # The child's own: who minted it, and what its expiry needs here
            # (its task run is the parent's: it belongs to the same task).
            issuer=self.issuer,
            expire_hooks=self.expire_hooks,
            # A child whose audience names a provider gets a principal of its own.
            provider=child_audience if child_audience in self.provider_names else None,
            purpose=parent.purpose
            if purpose is None
            else validate.text(purpose, "purpose", limit=validate.MAX_PURPOSE),
        )
        quotas = self._check_policy(child, "attenuate", now)
        token = self._token(child, opaque, now, chain)
        # A child is a new lease: whoever sets up per lease hears of it.
        added, secret, hooks = yield from self._store_new(child, quotas)
        if not added:  # the parent died between our read and the add
            raise LeaseNotActive(
                f"parent lease {parent.id} is no longer active", lease_id=parent.id
            )
        self.audit.emit(EventType.ATTENUATED, now, child)
        yield from self.outbox.run(hooks, self.mode)
        return new_credential(token, child, self.shell, secret)

    def _add(
        self, lease: Lease, quotas: tuple[Quota, ...], now: float, outbox: Outbox = NO_OUTBOX
    ) -> Steps[bool]:
        # Optional arguments only when set: a store written before quotas or the
        # outbox works until a broker needs them.
        def add(store: Any) -> Any:
            if outbox is not NO_OUTBOX:
                return store.add(lease, quotas, outbox=outbox)
            return store.add(lease, quotas) if quotas else store.add(lease)

        try:
            added: bool = yield add
        except QuotaExceeded as exc:
            self.denied(lease, exc, now)
        return added

    def _chain(self, lease: Lease) -> Steps[tuple[Lease, ...]]:
        """``lease`` and its ancestors, nearest first: one store read per link, at
        most one link past the deepest chain a verifier accepts."""
        chain = [lease]
        while chain[-1].parent is not None and len(chain) <= tokens.MAX_ACT_DEPTH:
            ancestor: Lease | None = yield methodcaller("get", chain[-1].parent)
            if ancestor is None:  # purged: the chain is as long as we can know
                break
            chain.append(ancestor)
        return tuple(chain)

    def revoke(self, ref: LeaseRef, reason: str, by: str | None = None) -> Steps[bool]:
        """Revoke a lease and its subtree; True if this call revoked it."""
        lease_id = self.lease_id(ref)
        reason = validate.text(reason, "reason")
        by = validate.optional_text(by, "by")
        now = self.clock()
        outbox = self.outbox.plan("on_revoke", now) if self.outbox.revokes else NO_OUTBOX
        revoked = yield _revoking("revoke", lease_id, outbox, at=now, reason=reason)
        self._revoked(revoked, now, reason, by)
        yield from self.outbox.run(self.outbox.held("on_revoke", revoked, outbox, now), self.mode)
        return any(lease.id == lease_id for lease in revoked)

    def _revoked(self, revoked: list[Lease], now: float, reason: str, by: str | None) -> None:
        cache = self.verifier.revocations
        if cache is not None and revoked:
            # This broker knows what it just took: its own verifications must
            # not wait for the feed to bring it back (even with strict
            # revocations off, or a cache that is not the store's own).
            cache.add(lease.id for lease in revoked)
        for lease in revoked:
            self.audit.emit(EventType.REVOKED, now, lease, reason=reason, actor=by)

    def revoke_where(self, where: LeaseFilter, reason: str, by: str | None = None) -> Steps[int]:
        """Revoke every active lease matching ``where`` (and subtrees); the count."""
        if where.is_empty():
            raise InvalidRequest(
                "revoke_where needs at least one of owner, subject, task, key_id, parent,"
                " issuer, task_run"
            )
        for name, value in attrs.asdict(where).items():
            validate.optional_text(value, name)
        reason = validate.text(reason, "reason")
        by = validate.optional_text(by, "by")
        now = self.clock()
        outbox = self.outbox.plan("on_revoke", now) if self.outbox.revokes else NO_OUTBOX
        revoked = yield _revoking("revoke_where", where, outbox, at=now, reason=reason)
        self._revoked(revoked, now, reason, by)
        self.audit.emit(
            EventType.REVOKED_WHERE,
            now,
            reason=reason,
            count=len(revoked),
            where=where.describe(),
            actor=by,
        )
        yield from self.outbox.run(self.outbox.held("on_revoke", revoked, outbox, now), self.mode)
        return len(revoked)

    def rotate_keys(self, publish_ahead: Duration = 0) -> Key:
        """A new signing key (signing ``publish_ahead`` seconds from now, published
        at once); the old one is dropped once no token it signed can verify any
        more (max TTL plus leeway from when it stops signing: renewals never pass that)."""
        key = self.keys.rotate(
            grace=self.max_ttl + self.leeway, now=self.clock(), publish_ahead=publish_ahead
        )
        self.audit.emit(EventType.KEY_ROTATED, self.clock(), where=f"key_id={key.kid!r}")
        return key

    def retire_key(self, kid: str, revoke: bool, reason: str, by: str | None = None) -> Steps[int]:
        """Drop ``kid`` now (its tokens stop verifying), record it as retired in
        the store (so every broker sharing it retires it too: by the revocation
        feed, ``feed_retired``, else at its sweep, ``sync_retired``)
        and, if ``revoke``, revoke the leases it signed. The key goes first: if
        the store then fails, its tokens are already dead here and the call can
        be retried (a kid already gone from this ring is then accepted)."""
        kid = validate.text(kid, "kid")
        self.keys.promote(self.clock())  # the key signing now is the one refused
        recorded = getattr(self.store_retirements, "retire_key", None)
        if kid not in self.keys and recorded is not None:
            # Gone here: retired by another broker, or a retry after a store error.
            known = yield lambda store: store.retired_keys()
            if kid in known:
                self.keys.exclude([kid])
        if kid in self.keys or recorded is None or kid not in self.keys.excluded:
            self.keys.retire(kid)  # refuses the active key and a kid never held
        now = self.clock()
        self.audit.emit(
            EventType.KEY_RETIRED, now, reason=reason, where=f"key_id={kid!r}", actor=by
        )
        if recorded is not None:
            yield lambda store: store.retire_key(kid, now)
        if not revoke:
            return 0
        return (yield from self.revoke_where(LeaseFilter(key_id=kid), reason, by))

    def sync_retired(self) -> Steps[list[str]]:
        """Read the keys retired through the store and drop them from the ring
        (each broker does at every sweep); the kids this ring still held."""
        if getattr(self.store_retirements, "retired_keys", None) is None:
            return []
        retired = yield lambda store: store.retired_keys()
        return self._retired_elsewhere(retired, actor="store")

    def feed_retired(self, kids: list[str]) -> None:
        """The revocation feed's listener (``RevocationCache.on_retired``): drop
        the keys retired through the store now, in the feed's thread."""
        self._retired_elsewhere(kids, actor="revocation-feed")

    def _retired_elsewhere(self, kids: Iterable[str], actor: str) -> list[str]:
        """Drop ``kids`` from the ring for good (``KeyRing.exclude``), with a
        KEY_RETIRED event for each the ring held; those kids."""
        dropped = self.keys.exclude(kids)
        for kid in dropped:
            self.audit.emit(
                EventType.KEY_RETIRED,
                self.clock(),
                reason="retired-elsewhere",
                where=f"key_id={kid!r}",
                actor=actor,
            )
        return dropped

    def leases(self, where: LeaseFilter, include_inactive: bool) -> Steps[list[Lease]]:
        """Leases matching ``where``, oldest first; only active ones unless asked."""
        found: list[Lease] = yield lambda store: store.find(where)
        now = self.clock()
        if not include_inactive:
            found = [lease for lease in found if lease.is_active(now)]
        return sorted(found, key=lambda lease: (lease.issued_at, lease.id))

    def get(self, ref: LeaseRef) -> Steps[Lease]:
        """The stored lease, or ``LeaseNotFound``."""
        lease_id = self.lease_id(ref)
        lease = yield lambda store: store.get(lease_id)
        if lease is None:
            raise LeaseNotFound(f"no lease {lease_id}", lease_id=lease_id)
        return lease  # type: ignore[no-any-return]

    def sweep(self) -> Steps[list[Lease]]:
        """Claim every lease due by now (each exactly once), purge the long dead,
        then run the jobs: the claim's, retries, and those other brokers left."""
        expired, held = yield from self.claim_sweep()
        yield from self.finish_sweep(held)
        return expired

    def claim_sweep(self) -> Steps[tuple[list[Lease], list[Job]]]:
        """A sweep's store work: claim what expired (with its jobs, held by this
        broker) and purge; the leases claimed and the jobs to run."""
        now = self.clock()
        self.next_sweep = now + self.reap_interval
        self.keys.poll()  # a ring following its directory (no-op otherwise)
        yield from self.sync_retired()  # keys another broker retired through the store
        for kid in self.keys.prune(now):  # rotated-out keys whose grace period ended
            self.audit.emit(EventType.KEY_DROPPED, now, where=f"key_id={kid!r}")
        expired: list[Lease] = []
        held: list[Job] = []
        runner = self.outbox
        while True:
            outbox = runner.plan("on_expire", now)
            batch = yield self._claim(now, outbox)
            for lease in batch:
                self.audit.emit(EventType.EXPIRED, now, lease, actor="reaper")
            lost = [x for x in batch if x.expire_hooks not in self._runnable]
            if lost:
                log.error(
                    "the store handed out %d expired leases whose on_expire hooks this "
                    "broker does not have (first: lease %s needs %r); their hooks will "
                    "not run: the store must honour claim_expired(expire_hooks=...)",
                    len(lost),
                    lost[0].id,
                    lost[0].expire_hooks,
                )
            expired.extend(batch)
            jobs = runner.held("on_expire", batch, outbox, now)
            held += (job for job in jobs if job.lease not in lost)
            if len(batch) < SWEEP_BATCH:
                break
        yield from self.flush_usage(now)
        yield lambda store: store.purge(now - self.retention)
        return expired, held

    def flush_usage(self, now: float, force: bool = False) -> Steps[int]:
        """Hand the uses verify recorded to the store, one batch write, at most
        every ``usage_interval`` (any time with ``force``); how many leases.
        A failed write puts the batch back for the next flush: the sweep goes on."""
        usage = self.verifier.usage
        if usage is None or not (usage.due(now) or (force and len(usage))):
            return 0
        batch = usage.drain(now)
        try:
            yield lambda store: store.record_usage(batch)
        except Exception:  # a store error: usage is telemetry, never worth a failed sweep
            usage.restore(batch)
            log.warning("could not record lease usage; retrying next interval", exc_info=True)
            return 0
        return len(batch)

    def finish_sweep(self, held: list[Job]) -> Steps[None]:
        """A sweep's jobs: those its claim holds (one claim per batch), then the
        retries and jobs others left, then (every ``reconcile_interval``) the
        reconciliation. Interrupted, the jobs not run are handed back."""
        runner = self.outbox
        for claim in dict.fromkeys(job.claim for job in held):
            yield from runner.run([job for job in held if job.claim == claim], self.mode)
        yield from runner.sweep(self.mode)
        now = self.clock()
        if runner.providers and now >= self.next_reconcile:
            self.next_reconcile = now + self.reconcile_interval
            try:
                yield from runner.reconcile(self.mode)
            except Exception:  # the sweep's own work is done; the next interval retries
                log.warning("reconcile failed; retrying next interval", exc_info=True)

    def lease_usage(self, leases: Iterable[Lease]) -> Steps[dict[str, Usage] | None]:
        """The store's usage of the active ``leases`` (None: it records none)."""
        now = self.clock()
        ids = [lease.id for lease in leases if lease.is_active(now)]
        if self.verifier.usage is None:
            return None  # tracking off, or a store without record_usage
        found: dict[str, Usage] = yield lambda store: store.lease_usage(ids)
        return found

    def _active(self, lease_id: str) -> Steps[Lease]:
        lease: Lease | None = yield lambda store: store.get(lease_id)
        if lease is None:
            raise LeaseNotFound(f"no lease {lease_id}", lease_id=lease_id)
        if not lease.is_active(self.clock()):
            raise LeaseNotActive(
                f"lease {lease_id} is {lease.status(self.clock())}", lease_id=lease_id
            )
        return lease

    def explain(self, lease: Lease) -> Steps[Explanation]:
        """The policy's decision on ``lease`` and how full its quotas are, without
        issuing anything (quota counts are a snapshot: ``issue`` counts atomically)."""
        decision = self.decide(lease, "issue", lease.issued_at)
        usage: list[tuple[Quota, int]] = []
        for quota in decision.quotas:
            where = LeaseFilter(subject=quota.subject, owner=quota.owner)
            found: list[Lease] = yield methodcaller("find", where)
            usage.append((quota, sum(1 for x in found if x.is_active(lease.issued_at))))
        full = [q.exceeded().reasons[0] for q, n in usage if n >= q.limit]
        if full:
            decision = attrs.evolve(decision, allowed=False, reasons=tuple(full))
        return Explanation(decision, lease, tuple(usage))

    def _claim(self, now: float, outbox: Outbox) -> Callable[[Any], Any]:
        """The store call claiming what this broker may expire: leases needing no
        hook, and those needing only hooks it has (any subset of them)."""
        profiles = self.expire_profiles
        if not profiles and outbox is NO_OUTBOX:  # the protocol's defaults
            return lambda store: store.claim_expired(now, SWEEP_BATCH)
        return lambda store: store.claim_expired(
            now, SWEEP_BATCH, expire_hooks=profiles, outbox=outbox
        )

    def awaiting_hooks(self) -> Steps[dict[str, int] | None]:
        """Expired leases no broker has claimed yet because they need ``on_expire``
        hooks, per ``expire_hooks`` value; None if the store cannot count them."""
        now = self.clock()

        def count(store: Any) -> Any:
            counter = getattr(store, "awaiting_hooks", None)  # optional in the protocol
            return None if counter is None else counter(now)

        counts: dict[str, int] | None = yield count
        return counts

    def _run_of(self, task: str) -> str | None:
        """The run id of this broker's innermost ``task(task)`` block around the
        caller, if any: a lease issued there belongs to that run."""
        for core, name, run in reversed(_TASK_RUNS.get()):
            if core is self and name == task:
                return run
        return None

    @contextlib.contextmanager
    def task_run(self, task: str) -> Iterator[str]:
        """A new run of ``task``: within the block, leases this broker issues for
        ``task`` record the run id (``Lease.task_run``), which the block yields."""
        run = secrets.token_hex(12)  # 96 random bits: unique across every broker
        token = _TASK_RUNS.set((*_TASK_RUNS.get(), (self, task, run)))
        try:
            yield run
        finally:
            try:
                _TASK_RUNS.reset(token)
            except ValueError:  # left in another context (a generator closed elsewhere)
                _TASK_RUNS.set(tuple(f for f in _TASK_RUNS.get() if f[2] != run))

    def task_revoke_failed(
        self, task: str, run: str, error: BaseException, job_error: BaseException | None
    ) -> bool:
        """A task's exit revoke failed for good: audit it, attach it to the job's
        own exception (which is what propagates), and say whether ``error`` must
        be raised instead: only when the job succeeded, since the caller then has
        no other way to learn that its leases outlive the task (until their TTL)."""
        where = f"task={task!r} task_run={run!r}"
        self.audit.emit(
            EventType.TASK_REVOKE_FAILED, self.clock(), where=where, error=type(error).__name__
        )
        if job_error is None:
            return True
        job_error.add_note(
            f"jitbroker: revoking the leases of {where} at exit failed"
            f" ({type(error).__name__}: {error}); they stay active until their TTL"
        )
        log.warning("task exit revoke failed; leases left to their TTL: %s", where)
        return False


def _revoking(method: str, target: object, outbox: Outbox, **kwargs: Any) -> Callable[[Any], Any]:
    """The store call of a revoke: with this broker's outbox only when it has one
    (a store written before the outbox works until a broker needs it)."""
    if outbox is not NO_OUTBOX:
        kwargs["outbox"] = outbox
    return methodcaller(method, target, **kwargs)


def revoke_delays(tries: object, backoff: object) -> tuple[float, ...]:
    """The waits between the ``tries`` of a task's exit revoke, doubling from
    ``backoff``: (0.1, 0.2) by default, so a store blip costs at most a third of
    a second before the leases are left to their TTL."""
    if isinstance(tries, bool) or not isinstance(tries, int) or not 1 <= tries <= 10:
        raise InvalidRequest(f"task_revoke_tries must be an int from 1 to 10, got {tries!r}")
    first = seconds(backoff, "task_revoke_backoff", allow_zero=True)
    return tuple(first * 2**i for i in range(tries - 1))


@attrs.frozen
class Explanation:
    """What ``explain`` found: the decision (every rule that matched, the granting
    one, every reason), the lease that would be issued, and each quota with the
    number of leases it counts now."""

    decision: Decision
    lease: Lease
    quotas: tuple[tuple[Quota, int], ...] = ()

    @property
    def allowed(self) -> bool:
        """True if an ``issue`` with these arguments would be allowed now."""
        return self.decision.allowed

    def __str__(self) -> str:
        d = self.decision
        lines = [
            f"{'ALLOWED' if d.allowed else 'DENIED'}: {self.lease.subject} -> "
            f"{self.lease.audience} [{self.lease.scope}]"
        ]
        if d.rule is not None:
            granted = "granted by" if d.allowed else "granted by (but a quota is full)"
            lines.append(f"  {granted}: {d.rule.label()}")
        lines += [f"  rule matched: {rule.label()}" for rule in d.matched]
        lines += [
            f"  quota of {q.rule}: {n} of {q.limit} active for {q.describe()}"
            for q, n in self.quotas
        ]
        lines += [f"  reason: {reason}" for reason in d.reasons]
        return "\n".join(lines)


def _labels(value: Mapping[str, str] | None) -> Mapping[str, str]:
    labels = dict(value or {})
    for name, label in labels.items():
        validate.text(name, "label name")
        validate.text(label, f"label {name!r}")
    return labels


def _depth(value: object) -> int:
    # Verifiers refuse deeper ``act`` nesting than MAX_ACT_DEPTH: never mint it.
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 0 <= value <= tokens.MAX_ACT_DEPTH
    ):
        raise InvalidRequest(
            f"max_delegation_depth must be a whole number from 0 to {tokens.MAX_ACT_DEPTH}"
        )
    return value
