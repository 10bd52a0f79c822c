"""``Broker`` and ``AsyncBroker``: thin shells over ``core.Core``.

Every decision lives in ``Core`` as a generator of store calls; ``Broker``
runs them with plain calls and ``AsyncBroker`` awaits them. What is left here
is only what differs: the context managers, the decorator and the reaper.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import inspect
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

from . import validate
from ._drive import Steps, arun, run
from ._sigterm import GUARD
from .audit import Auditor, Sink
from .clock import Clock, Duration, seconds
from .core import MAX_DELEGATION_DEPTH, Core, Explanation, LeaseRef, TokenFormat
from .errors import InvalidRequest, InvalidToken, QuotaExceeded, StoreError
from .hooks import FailedHook, Hooks, HookSpec
from .keyring import KeyRing
from .keys import Key
from .lease import Claims, Credential, Lease
from .metrics import DEFAULT_LEASE_WARNING, Health, HealthState, Metrics, arun_probe, run_probe
from .outbox import ASYNC, Reconciliation
from .policy import Policy
from .report import Report, build_report
from .revocations import RevocationCache
from .stores.base import NO_OUTBOX, AsyncLeaseStore, Job, LeaseFilter, LeaseStore, as_async
from .stores.memory import MemoryStore
from .usage import UsageLog
from .verify import Request

__all__ = ["AsyncBroker", "Broker"]

log = logging.getLogger("jitbroker")

#: Brokers whose finished hook jobs may wait for their batch (``outbox.flush``):
#: deleted when the interpreter exits, so a script that never closes its broker
#: does not leave them to run again.
_AT_EXIT: weakref.WeakSet[Broker] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    for broker in list(_AT_EXIT):
        broker._flush()


R = TypeVar("R")


def _name(fn: Callable[..., object]) -> str:
    """The task name of an ephemeral function (or callable object)."""
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', None) or type(fn).__module__}.{qualname}"


def _is_async(fn: Callable[..., object]) -> bool:
    """True for ``async def`` functions and objects with an ``async def __call__``."""
    call = getattr(fn, "__call__", None)  # noqa: B004 - we want the method itself
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)


def _exit_reason(failure: BaseException | None, guarded: bool) -> str:
    """Why a task block's leases are revoked: it ended, it raised, or a SIGTERM
    unwound it (or arrived while it was failing)."""
    if failure is None:
        return "task-ended"
    return "task-terminated" if guarded and GUARD.signalled else "task-failed"


class _Base:
    """Construction and the I/O-free methods both brokers share."""

    def __init__(
        self,
        issuer: str = "urn:jitbroker",
        keys: KeyRing | None = None,
        store: Any = None,
        policy: Policy | None = None,
        default_ttl: Duration = 300,
        max_ttl: Duration = 3600,
        *,
        leeway: Duration = 5,
        clock: Clock | None = None,
        token_format: TokenFormat = "jws",
        retention: Duration | None = None,
        reap_interval: Duration = 1.0,
        cache_size: int = 4096,
        audit: Iterable[Sink] = (),
        revocations: RevocationCache | None = None,
        labels: Mapping[str, str] | None = None,
        max_delegation_depth: int = MAX_DELEGATION_DEPTH,
        on_issue: HookSpec = None,
        on_revoke: HookSpec = None,
        on_expire: HookSpec = None,
        hook_retries: int = 5,
        hook_backoff: Duration = 1.0,
        hook_timeout: Duration = 60.0,
        providers: Iterable[Any] = (),
        reconcile_interval: Duration = 300.0,
        revoke_on_sigterm: bool = True,
        task_revoke_tries: int = 3,
        task_revoke_backoff: Duration = 0.1,
        metrics: Metrics | None = None,
        lease_warning_threshold: int = DEFAULT_LEASE_WARNING,
        track_usage: bool = True,
        usage_interval: Duration = 60.0,
    ) -> None:
        if revocations is not None and not isinstance(revocations, RevocationCache):
            raise InvalidRequest("revocations must be a RevocationCache (store.revocations())")
        self._core = Core(
            issuer=issuer,
            keys=keys,
            policy=policy,
            default_ttl=default_ttl,
            max_ttl=max_ttl,
            leeway=leeway,
            clock=clock,
            token_format=token_format,
            retention=retention,
            reap_interval=reap_interval,
            cache_size=cache_size,
            audit=audit,
            labels=labels,
            max_delegation_depth=max_delegation_depth,
            hooks=Hooks(
                on_issue,
                on_revoke,
                on_expire,
                retries=hook_retries,
                backoff=hook_backoff,
                timeout=hook_timeout,
            ),
            task_revoke_tries=task_revoke_tries,
            task_revoke_backoff=task_revoke_backoff,
            providers=providers,
            reconcile_interval=reconcile_interval,
        )
        if not isinstance(revoke_on_sigterm, bool):
            raise InvalidRequest("revoke_on_sigterm must be True or False")
        #: Whether a SIGTERM ends ``task()`` blocks of the main thread (see ``task``).
        self.revoke_on_sigterm = revoke_on_sigterm
        self._core.shell = self  # type: ignore[assignment]
        # With a shared store's revocation feed, verify skips the store while it is live.
        self._core.verifier.revocations = revocations
        self.store = MemoryStore() if store is None else store
        self._core.store_retirements = self.store  # keys retired through the store
        if revocations is not None:
            # Keys retired through the store reach this ring with the feed
            # (invariant 11), before the cache acknowledges them; the sweep
            # (``sync_retired``) remains the path when the feed is down.
            revocations.on_retired(self._core.feed_retired)
        self._track_usage(track_usage, usage_interval)
        self._health = HealthState(lease_warning_threshold)
        self._metrics: Metrics | None = None
        self._setup()
        if metrics is not None:
            self._instrument(metrics)

    def _track_usage(self, track: object, interval: Duration) -> None:
        """Record online verifies in memory for the sweep to flush (docs/stores.md),
        when the store can keep them (``record_usage``); else record nothing."""
        if not isinstance(track, bool):
            raise InvalidRequest("track_usage must be True or False")
        every = seconds(interval, "usage_interval")
        if track and callable(getattr(self.store, "record_usage", None)):
            self._core.verifier.usage = UsageLog(every)

    def _instrument(self, metrics: Metrics) -> None:
        """Count this broker's events and store errors in ``metrics``: its audit
        events feed the counters, its store calls go through a counter."""
        if not isinstance(metrics, Metrics):
            raise InvalidRequest("metrics must be a jitbroker.metrics.Metrics")
        self._metrics = metrics
        audit = self._core.audit
        audit.observer = metrics.observer()
        self._count_store(metrics)

    def _count_store(self, metrics: Metrics) -> None:
        """Route the shell's store calls through ``metrics.counted``."""

    def _health_of(self, probe: Any) -> Health:
        core = self._core
        try:
            kid: str | None = core.keys.active.kid
        except InvalidRequest:  # a ring that cannot sign
            kid = None
        return self._health.judge(
            probe, core.verifier.revocations, kid, self._metrics, core.clock()
        )

    def _setup(self) -> None:
        """Per-shell state, set up once the core and store exist."""

    @property
    def issuer(self) -> str:
        """The ``iss`` of every token this broker mints."""
        return self._core.issuer

    @property
    def keys(self) -> KeyRing:
        """The signing key ring."""
        return self._core.keys

    @property
    def clock(self) -> Clock:
        """The broker's one clock."""
        return self._core.clock

    @property
    def max_ttl(self) -> float:
        """The longest lifetime of any lease this broker issues, renewals included (seconds)."""
        return self._core.max_ttl

    @property
    def blocking(self) -> bool:
        """Whether a call may wait on I/O or foreign code (its store does I/O, or
        hooks or providers run): ``broker_app`` then calls it in worker threads."""
        core = self._core
        store_waits = getattr(self.store, "blocking", True)  # an async store: not inline
        return store_waits or bool(core.hooks) or bool(core.provider_names)

    @property
    def policy(self) -> Policy | None:
        """The policy every issue, renewal and attenuation is judged by (None: all allowed)."""
        return self._core.policy

    @property
    def leeway(self) -> float:
        """Clock skew its verification allows on ``exp``, ``nbf`` and ``iat`` (seconds)."""
        return self._core.leeway

    @property
    def auditor(self) -> Auditor:
        """Where this broker's audit events go: ``auditor.emit(...)`` adds one of
        a layer above the broker (``broker_app``'s ``token_endpoint`` events)."""
        return self._core.audit

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """Public keys for offline verifiers (never an HMAC key or a private member),
        a key published ahead of its activation included (two-phase rotation)."""
        self._core.keys.poll()  # a ring following its directory: its current keys
        return self._core.keys.jwks()

    def _report(self, long_ttl: Duration, oldest: int, unused_days: float) -> Steps[Report]:
        core = self._core
        yield from core.flush_usage(core.clock(), force=True)  # this broker's uses count too
        leases = yield from core.leases(LeaseFilter(), True)
        usage = yield from core.lease_usage(leases)
        awaiting = yield from core.awaiting_hooks()
        failed = yield from core.outbox.parked()
        return build_report(
            leases,
            now=core.clock(),
            keys={key.kid for key in core.keys},
            failed_hooks=failed,
            counts=core.audit.counts,
            sink_failures=core.audit.sink_failures,
            awaiting_hooks=awaiting,
            long_ttl=long_ttl,
            oldest=oldest,
            usage=usage,
            unused_days=unused_days,
        )

    def _forget(self, hooks: Iterable[FailedHook | str], force: bool, by: str | None) -> Steps[int]:
        if force is not True:
            raise InvalidRequest(
                "forgetting parked work means its side effect never happens (a backend"
                " credential left behind, say): pass force=True to do it anyway"
            )
        ids = [h.id if isinstance(h, FailedHook) else validate.text(h, "hook id") for h in hooks]
        return (yield from self._core.outbox.forget(ids, validate.optional_text(by, "by")))

    #: ``issue``'s keyword arguments: what ``explain(**issue)`` may pass on.
    _ISSUE_OPTIONS = frozenset({"task", "owner", "purpose", "renewable", "max_ttl", "holder_key"})

    def _explain_lease(
        self,
        subject: str,
        audience: str,
        scopes: Iterable[str] | str,
        ttl: Duration | None,
        issue: dict[str, Any],
    ) -> Steps[Explanation]:
        # Validated exactly as issue validates, but neither judged nor signed here.
        unknown = sorted(set(issue) - self._ISSUE_OPTIONS)
        if unknown:
            raise InvalidRequest(
                f"explain takes issue's arguments; unknown: {', '.join(map(repr, unknown))}"
                f" (issue's options are {', '.join(sorted(self._ISSUE_OPTIONS))})"
            )
        core = self._core
        lease = core.plan_issue(subject, audience, scopes, ttl, **issue, dry_run=True)[0]
        return core.explain(lease)

    def rotate_keys(self, *, publish_ahead: Duration = 0) -> Key:
        """Make a new signing key. The previous one stops signing new leases,
        still verifies (and re-signs renewals of its leases), and is dropped by
        the sweep once max TTL plus leeway have passed: no token outlives it.

        ``publish_ahead`` (seconds) makes the rotation two-phase: the new key is
        in ``jwks()`` at once and signs only that long from now, so verifiers
        caching the JWKS at most that long have it first (``keyring.DEFAULT_PUBLISH_AHEAD``
        is what ``jitbroker keys rotate`` uses: a JWKSource's default max_age)."""
        return self._core.rotate_keys(publish_ahead)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} issuer={self.issuer!r} store={self.store!r}>"


class Broker(_Base):
    """Issues, verifies, renews and revokes task-scoped credentials (synchronous API).

    ``with broker:`` runs a background reaper thread that expires leases on
    time; without it, expired leases are swept when ``issue`` notices a sweep
    is due, or when you call ``sweep()``.
    """

    store: LeaseStore

    def _setup(self) -> None:
        if not isinstance(self.store, LeaseStore):
            raise InvalidRequest("store must implement the LeaseStore protocol")
        self._stop = threading.Event()
        self._driven: LeaseStore = self.store  # counted when metrics are on
        self._reaper: threading.Thread | None = None
        if self._core.outbox.kinds:  # finished hook jobs are deleted in batches
            _AT_EXIT.add(self)

    def issue(
        self,
        subject: str,
        audience: str,
        scopes: Iterable[str] | str = (),
        ttl: Duration | None = None,
        *,
        task: str | None = None,
        owner: str | None = None,
        purpose: str | None = None,
        renewable: bool = True,
        max_ttl: Duration | None = None,
        holder_key: object = None,
    ) -> Credential:
        """Mint a credential; its lease is stored before the token is returned.

        ``holder_key`` (a public key, ``Key`` or JWK) binds the token to that key:
        it then verifies only with a DPoP proof signed by the key.
        """
        core = self._core
        lease, token, sweep_due, quotas = core.plan_issue(
            subject, audience, scopes, ttl, task, owner, purpose, renewable, max_ttl, holder_key
        )
        if lease.provider is not None:  # a backend credential: the outbox's steps
            cred = run(core.store_issue(lease, token, quotas), self._driven)
            if sweep_due:
                self._sweep_quietly()
            return cred
        # The store raises if it fails: the token never leaves. Quotas are passed
        # only when the policy sets one, so a store without quota support works
        # until one is configured; the outbox likewise, until a hook needs it.
        # Hook jobs go in with the lease, held by this broker, run once it is out.
        outbox = core.outbox.plan("on_issue", lease.issued_at) if core.issue_hooks else NO_OUTBOX
        store = self.store  # bare, even with metrics: its errors are counted below
        try:
            if outbox is not NO_OUTBOX:
                store.add(lease, quotas, outbox=outbox)
            else:
                store.add(lease, quotas) if quotas else store.add(lease)
        except QuotaExceeded as exc:
            core.denied(lease, exc, lease.issued_at)
        except StoreError as exc:
            if self._metrics is not None:
                self._metrics.store_error(self._metrics.kind_of(store), "add", exc)
            raise
        cred = core.issued(lease, token)
        if outbox is not NO_OUTBOX:
            run(core.run_issue_hooks(lease, outbox), self._driven)
        if sweep_due:
            self._sweep_quietly()
        return cred

    def verify(
        self,
        token: str,
        *,
        audience: str,
        scopes: Iterable[str] | str = (),
        proof: str | None = None,
        method: str | None = None,
        url: str | None = None,
    ) -> Claims:
        """Verify online: signature, issuer, time, audience, scopes and an active
        lease; for a key-bound token also the request's DPoP ``proof``."""
        steps = self._core.verifier.steps(token, audience, scopes, Request(proof, method, url))
        try:
            if self._metrics is not None:  # the one metrics branch: timing
                return self._metrics.verify(run, steps, self.store)
            return run(steps, self._driven)
        except InvalidToken as exc:
            self._core.verify_failed(exc)
            raise

    def renew(
        self, cred: LeaseRef, ttl: Duration | None = None, *, children: bool = False
    ) -> Credential:
        """Extend the lease (capped at its max lifetime) and return a fresh token.
        With ``children``, every active renewable descendant is extended too (by
        ``ttl``, never past its own cap or its parent); its holder gets a token
        with the new expiry by renewing its own credential."""
        return run(self._core.renew(cred, ttl, children), self._driven)

    def revoke(self, cred: LeaseRef, reason: str = "revoked", *, by: str | None = None) -> bool:
        """Revoke a lease (by Credential, lease id or token) and its subtree; idempotent.
        ``by`` names who revoked it, for the audit trail."""
        return run(self._core.revoke(cred, reason, by), self._driven)

    def revoke_where(
        self,
        *,
        owner: str | None = None,
        subject: str | None = None,
        task: str | None = None,
        key_id: str | None = None,
        parent: str | None = None,
        issuer: str | None = None,
        task_run: str | None = None,
        reason: str = "revoked",
        by: str | None = None,
    ) -> int:
        """Revoke every active lease matching all given fields (and their subtrees);
        returns how many. Audited as one ``revoked_where`` event with the count.
        ``issuer`` matches the ``iss`` of the broker that issued a lease, ``task_run``
        one run of ``task()`` (``Lease.task_run``)."""
        where = LeaseFilter(
            owner=owner,
            subject=subject,
            task=task,
            key_id=key_id,
            parent=parent,
            issuer=issuer,
            task_run=task_run,
        )
        return run(self._core.revoke_where(where, reason, by), self._driven)

    def attenuate(
        self,
        cred: LeaseRef,
        *,
        scopes: Iterable[str] | str | None = None,
        audience: str | None = None,
        ttl: Duration | None = None,
        purpose: str | None = None,
        subject: str | None = None,
        holder_key: object = None,
        max_ttl: Duration | None = None,
    ) -> Credential:
        """A narrower child credential that dies with its parent: delegation as in
        RFC 8693 (``subject`` hands it to another workload; the token's ``act``
        claim names the delegating leases). The child keeps the parent's key
        binding; ``holder_key`` (a public key, ``Key`` or JWK) binds it to that
        key instead, as the token endpoint does for an exchange with a DPoP proof.
        ``max_ttl`` lowers the child's renewal cap to that many seconds from now
        (it never rises above the parent's)."""
        steps = self._core.attenuate(
            cred, scopes, audience, ttl, purpose, subject, holder_key, max_ttl
        )
        return run(steps, self._driven)

    def lease(self, ref: LeaseRef) -> Lease:
        """The current stored lease (``LeaseNotFound`` if unknown or purged)."""
        return run(self._core.get(ref), self._driven)

    def leases(
        self,
        *,
        owner: str | None = None,
        subject: str | None = None,
        task: str | None = None,
        key_id: str | None = None,
        parent: str | None = None,
        issuer: str | None = None,
        task_run: str | None = None,
        include_inactive: bool = False,
    ) -> Iterator[Lease]:
        """Iterate leases matching the filters, oldest first (active ones by default)."""
        where = LeaseFilter(
            owner=owner,
            subject=subject,
            task=task,
            key_id=key_id,
            parent=parent,
            issuer=issuer,
            task_run=task_run,
        )
        return iter(run(self._core.leases(where, include_inactive), self._driven))

    def sweep(self) -> list[Lease]:
        """Expire every lease due now (each exactly once), purge long-dead records,
        and run the hook calls that are due (``on_expire`` and retries)."""
        return run(self._core.sweep(), self._driven)

    def retire_key(self, kid: str, *, revoke: bool = True, reason: str = "key-retired") -> int:
        """Drop signing key ``kid`` at once and (by default) revoke every lease it
        signed; returns how many were revoked."""
        return run(self._core.retire_key(kid, revoke, reason), self._driven)

    def explain(
        self,
        subject: str,
        audience: str,
        scopes: Iterable[str] | str = (),
        ttl: Duration | None = None,
        **issue: Any,
    ) -> Explanation:
        """What ``issue`` with these arguments would decide now, and why: every rule
        that matched, every reason, and how full the quotas are. Issues nothing."""
        return run(self._explain_lease(subject, audience, scopes, ttl, issue), self._driven)

    def report(
        self, *, long_ttl: Duration = 3600, oldest: int = 10, unused_days: float = 30
    ) -> Report:
        """The governance report: what is alive, who owns it, and what looks wrong
        (no owner or purpose, TTL over ``long_ttl``, wildcards, retired keys,
        failed hooks; with usage tracking, leases never used, unused for
        ``unused_days``, or used by an audience they were not issued for), with
        churn counts."""
        return run(self._report(long_ttl, oldest, unused_days), self._driven)

    def failed_hooks(self) -> list[FailedHook]:
        """Parked work, in the store's outbox: hook calls and provider revokes that
        ran out of retries, oldest first (see ``retry_failed_hooks``)."""
        return run(self._core.outbox.parked(), self._driven)

    def retry_failed_hooks(self) -> int:
        """Give every parked job one more attempt, and run those this broker can;
        returns how many still fail."""
        return run(self._core.outbox.retry(self._core.mode), self._driven)

    def forget_failed_hook(
        self, *hooks: FailedHook | str, force: bool = False, by: str | None = None
    ) -> int:
        """Drop parked jobs (``FailedHook`` or its ``id``) for good: their side
        effect will never happen. Needs ``force=True``; each one is audited
        (``hook_forgotten``, with ``by``). Returns how many were dropped."""
        return run(self._forget(hooks, force, by), self._driven)

    def reconcile(self) -> Reconciliation:
        """Make every provider's backend agree with the store (see
        ``jitbroker.outbox``): principals with no live lease are revoked, live
        leases without their principal flagged. The reaper runs it every
        ``reconcile_interval`` seconds."""
        return run(self._core.outbox.reconcile(self._core.mode), self._driven)

    def _sweep_quietly(self) -> None:
        # The opportunistic sweep inside issue: the lease is already stored, so
        # a failure here must not cost the caller its token.
        try:
            self.sweep()
        except Exception:  # any failure: the lease is stored, the token must go out
            log.warning("opportunistic sweep failed; the reaper will retry", exc_info=True)

    def task(self, task: str, **issue: Any) -> contextlib.AbstractContextManager[Credential]:
        """Issue for ``task``; on exit revoke every lease of this run of the task,
        and their subtrees.

        Each call is a new run (``Lease.task_run``, unique): the task's own lease
        and every lease this broker issues with ``task=task`` inside the block
        (in this thread or asyncio task, or one that copied its context) belong
        to it. Other runs of a task of the same name, concurrent or not, from
        this broker or another sharing the store, are left alone. The reason is
        ``task-ended``, or ``task-failed`` if the block raised (the exception
        propagates).

        In the main thread, unless the broker has ``revoke_on_sigterm=False``, a
        SIGTERM unwinds the block (as ``SystemExit``), which revokes with reason
        ``task-terminated``; then the previous handler runs, or, if there was
        none, the process dies of SIGTERM. The exit revoke is tried
        ``task_revoke_tries`` times; if it still fails the leases are left to
        their TTL, a ``task_revoke_failed`` event is audited, and the job's own
        exception propagates with a note, or, if the job succeeded,
        ``StoreUnavailable`` (the caller's credential outlives the task).
        """
        return self._task(task, None, issue)

    @contextlib.contextmanager
    def _task(
        self, task: str, current: asyncio.Task[Any] | None, issue: dict[str, Any]
    ) -> Iterator[Credential]:
        # ``current``: the asyncio task an ``ephemeral`` async def runs in, which
        # a SIGTERM cancels (raising from the handler could land in the loop).
        task = validate.text(task, "task")
        with self._core.task_run(task) as task_run:
            guarded = self.revoke_on_sigterm and GUARD.enter(current)
            ended = False
            try:
                cred = self.issue(task=task, **issue)
                failure: BaseException | None = None
                try:
                    if guarded:
                        GUARD.body()
                    yield cred
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    if guarded:
                        GUARD.ending()
                    self._end_task(task, task_run, _exit_reason(failure, guarded), failure)
                ended = True
            finally:
                if guarded:
                    GUARD.leave(current, failing=not ended)

    def _end_task(self, task: str, run: str, reason: str, failure: BaseException | None) -> None:
        """Revoke a run at its exit, retrying a store failure (see ``task``)."""
        delays = iter(self._core.task_revoke_delays)
        while True:
            try:
                self.revoke_where(task=task, task_run=run, reason=reason)
                return
            except StoreError as exc:
                delay = next(delays, None)
                if delay is None:
                    if self._core.task_revoke_failed(task, run, exc, failure):
                        raise
                    return
                time.sleep(delay)

    def ephemeral(self, **issue: Any) -> Callable[[Callable[..., R]], Callable[..., R]]:
        """Decorate ``fn(cred, ...)``: each call is its own run of the task named
        ``module.qualname`` of ``fn`` (sync or async def), revoked when it returns."""

        def decorate(fn: Callable[..., R]) -> Callable[..., R]:
            name = _name(fn)
            if _is_async(fn):

                @functools.wraps(fn)
                async def acall(*args: Any, **kwargs: Any) -> Any:
                    with self._task(name, asyncio.current_task(), issue) as cred:
                        return await fn(cred, *args, **kwargs)  # type: ignore[misc]

                return acall  # type: ignore[return-value]

            @functools.wraps(fn)
            def call(*args: Any, **kwargs: Any) -> R:
                with self.task(name, **issue) as cred:
                    return fn(cred, *args, **kwargs)

            return call

        return decorate

    def health(self, *, timeout: Duration = 2.0) -> Health:
        """For readiness probes: the store reachable (one cheap call, at most
        ``timeout`` seconds), the revocation feed live and its lag, the active
        key and its age, parked work, active leases against
        ``lease_warning_threshold``; ``status`` ok, degraded or down, with
        reasons. Never raises for a store failure: that is ``down``. Active
        leases are the store's ``count_active`` (a slow count reused for a
        while, see docs/metrics.md), else this process's metrics."""
        limit, count = seconds(timeout, "timeout"), self._health.wants_count()
        probe = run_probe(self._driven, self._core.clock(), limit, count)
        return self._health_of(probe)

    def _count_store(self, metrics: Metrics) -> None:
        self._driven = metrics.counted(self.store)

    # -- the reaper -------------------------------------------------------
    def start(self) -> None:
        """Start the background reaper thread (idempotent)."""
        if self._reaper is not None and self._reaper.is_alive():
            return
        self._stop.clear()
        self._reaper = threading.Thread(target=self._reap, name="jitbroker-reaper", daemon=True)
        self._reaper.start()

    def stop(self) -> None:
        """Stop the reaper and wait for it to finish its current sweep; then
        delete the finished hook jobs still waiting for their batch."""
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join()
            self._reaper = None
        self._flush()

    def flush_usage(self) -> int:
        """Write the lease usage recorded since the last flush now (the sweep does
        it every ``usage_interval``; ``stop`` and ``close`` too); how many leases."""
        core = self._core
        return run(core.flush_usage(core.clock(), force=True), self._driven)

    def _flush(self) -> None:
        self.flush_usage()
        try:
            run(self._core.outbox.flush(), self._driven)
        except Exception:  # a closed or broken store: the jobs run again, same key
            log.warning("could not delete finished outbox jobs", exc_info=True)

    def close(self) -> None:
        """Stop the reaper and close the store."""
        self.stop()
        self.store.close()

    def _reap(self) -> None:
        while not self._stop.wait(self._core.reap_interval):
            try:
                self.sweep()
            except Exception:  # the reaper must outlive a bad sweep; it retries
                log.warning("reaper sweep failed; retrying next interval", exc_info=True)

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class AsyncBroker(_Base):
    """The same broker for asyncio code: every method is a coroutine.

    Accepts a sync store (called inline if it never blocks, else in a thread)
    or an async store. ``async with broker:`` runs the reaper as a task.
    """

    def _setup(self) -> None:
        self._core.mode = ASYNC
        self._astore: AsyncLeaseStore = as_async(self.store)
        self._reaper: asyncio.Task[None] | None = None
        self._claims: set[asyncio.Future[tuple[list[Lease], list[Job]]]] = set()

    def _claim_done(self, claim: asyncio.Future[tuple[list[Lease], list[Job]]]) -> None:
        self._claims.discard(claim)
        if not claim.cancelled() and claim.exception() is not None:  # retrieved: no warning
            log.debug("a sweep's claim failed", exc_info=claim.exception())

    async def issue(
        self,
        subject: str,
        audience: str,
        scopes: Iterable[str] | str = (),
        ttl: Duration | None = None,
        *,
        task: str | None = None,
        owner: str | None = None,
        purpose: str | None = None,
        renewable: bool = True,
        max_ttl: Duration | None = None,
        holder_key: object = None,
    ) -> Credential:
        """Mint a credential; its lease is stored before the token is returned.

        ``holder_key`` (a public key, ``Key`` or JWK) binds the token to that key:
        it then verifies only with a DPoP proof signed by the key.
        """
        core = self._core
        lease, token, sweep_due, quotas = core.plan_issue(
            subject, audience, scopes, ttl, task, owner, purpose, renewable, max_ttl, holder_key
        )
        if core.issue_hooks or lease.provider is not None:  # jobs go with the lease
            cred = await arun(core.store_issue(lease, token, quotas), self._astore)
            if sweep_due:
                await self._sweep_quietly()
            return cred
        try:  # raises if the store fails: the token never leaves
            await (self._astore.add(lease, quotas) if quotas else self._astore.add(lease))
        except QuotaExceeded as exc:
            core.denied(lease, exc, lease.issued_at)
        if sweep_due:
            await self._sweep_quietly()
        return core.issued(lease, token)

    async def verify(
        self,
        token: str,
        *,
        audience: str,
        scopes: Iterable[str] | str = (),
        proof: str | None = None,
        method: str | None = None,
        url: str | None = None,
    ) -> Claims:
        """Verify online: signature, issuer, time, audience, scopes and an active
        lease; for a key-bound token also the request's DPoP ``proof``."""
        steps = self._core.verifier.steps(token, audience, scopes, Request(proof, method, url))
        try:
            if self._metrics is not None:  # the one metrics branch: timing
                return await self._metrics.averify(arun(steps, self._astore))  # type: ignore[no-any-return]
            return await arun(steps, self._astore)
        except InvalidToken as exc:
            self._core.verify_failed(exc)
            raise

    async def renew(
        self, cred: LeaseRef, ttl: Duration | None = None, *, children: bool = False
    ) -> Credential:
        """Extend the lease (capped at its max lifetime) and return a fresh token;
        ``children`` as ``Broker.renew``."""
        return await arun(self._core.renew(cred, ttl, children), self._astore)

    async def revoke(
        self, cred: LeaseRef, reason: str = "revoked", *, by: str | None = None
    ) -> bool:
        """Revoke a lease (by Credential, lease id or token) and its subtree; idempotent.
        ``by`` names who revoked it, for the audit trail."""
        return await arun(self._core.revoke(cred, reason, by), self._astore)

    async def revoke_where(
        self,
        *,
        owner: str | None = None,
        subject: str | None = None,
        task: str | None = None,
        key_id: str | None = None,
        parent: str | None = None,
        issuer: str | None = None,
        task_run: str | None = None,
        reason: str = "revoked",
        by: str | None = None,
    ) -> int:
        """Revoke every active lease matching all given fields (and their subtrees);
        returns how many. Audited as one ``revoked_where`` event with the count.
        ``issuer`` matches the ``iss`` of the broker that issued a lease, ``task_run``
        one run of ``task()`` (``Lease.task_run``)."""
        where = LeaseFilter(
            owner=owner,
            subject=subject,
            task=task,
            key_id=key_id,
            parent=parent,
            issuer=issuer,
            task_run=task_run,
        )
        return await arun(self._core.revoke_where(where, reason, by), self._astore)

    async def attenuate(
        self,
        cred: LeaseRef,
        *,
        scopes: Iterable[str] | str | None = None,
        audience: str | None = None,
        ttl: Duration | None = None,
        purpose: str | None = None,
        subject: str | None = None,
        holder_key: object = None,
        max_ttl: Duration | None = None,
    ) -> Credential:
        """A narrower child credential that dies with its parent (see ``Broker.attenuate``)."""
        steps = self._core.attenuate(
            cred, scopes, audience, ttl, purpose, subject, holder_key, max_ttl
        )
        return await arun(steps, self._astore)

    async def lease(self, ref: LeaseRef) -> Lease:
        """The current stored lease (``LeaseNotFound`` if unknown or purged)."""
        return await arun(self._core.get(ref), self._astore)

    async def leases(
        self,
        *,
        owner: str | None = None,
        subject: str | None = None,
        task: str | None = None,
        key_id: str | None = None,
        parent: str | None = None,
        issuer: str | None = None,
        task_run: str | None = None,
        include_inactive: bool = False,
    ) -> list[Lease]:
        """Leases matching the filters, oldest first (active ones by default)."""
        where = LeaseFilter(
            owner=owner,
            subject=subject,
            task=task,
            key_id=key_id,
            parent=parent,
            issuer=issuer,
            task_run=task_run,
        )
        return await arun(self._core.leases(where, include_inactive), self._astore)

    async def sweep(self) -> list[Lease]:
        """Expire every lease due now (each exactly once), purge long-dead records,
        and run the hook calls that are due (``on_expire`` and retries)."""
        # Only the claim is shielded: once the store has claimed expired leases
        # (their jobs held by this broker), it finishes even if the caller is
        # cancelled, so close() never closes the store under it. The jobs run
        # unshielded: cancelled, the run hands back what it did not reach, and
        # jobs left held are taken again once their claim runs out.
        claiming = asyncio.ensure_future(arun(self._core.claim_sweep(), self._astore))
        self._claims.add(claiming)  # close() waits for it before closing the store
        claiming.add_done_callback(self._claim_done)
        expired, held = await asyncio.shield(claiming)
        await arun(self._core.finish_sweep(held), self._astore)
        return expired

    async def retire_key(
        self, kid: str, *, revoke: bool = True, reason: str = "key-retired"
    ) -> int:
        """Drop signing key ``kid`` at once and (by default) revoke every lease it
        signed; returns how many were revoked."""
        return await arun(self._core.retire_key(kid, revoke, reason), self._astore)

    async def explain(
        self,
        subject: str,
        audience: str,
        scopes: Iterable[str] | str = (),
        ttl: Duration | None = None,
        **issue: Any,
    ) -> Explanation:
        """What ``issue`` would decide now, and why (see ``Broker.explain``)."""
        return await arun(self._explain_lease(subject, audience, scopes, ttl, issue), self._astore)

    async def report(
        self, *, long_ttl: Duration = 3600, oldest: int = 10, unused_days: float = 30
    ) -> Report:
        """The governance report (see ``Broker.report``)."""
        return await arun(self._report(long_ttl, oldest, unused_days), self._astore)

    async def failed_hooks(self) -> list[FailedHook]:
        """Parked work, oldest first (see ``Broker.failed_hooks``)."""
        return await arun(self._core.outbox.parked(), self._astore)

    async def retry_failed_hooks(self) -> int:
        """Give every parked job one more attempt (see ``Broker.retry_failed_hooks``)."""
        return await arun(self._core.outbox.retry(self._core.mode), self._astore)

    async def forget_failed_hook(
        self, *hooks: FailedHook | str, force: bool = False, by: str | None = None
    ) -> int:
        """Drop parked jobs for good (see ``Broker.forget_failed_hook``)."""
        return await arun(self._forget(hooks, force, by), self._astore)

    async def reconcile(self) -> Reconciliation:
        """Make every provider's backend agree with the store (see ``Broker.reconcile``)."""
        return await arun(self._core.outbox.reconcile(self._core.mode), self._astore)

    async def _sweep_quietly(self) -> None:
        try:
            await self.sweep()
        except Exception:  # any failure: the lease is stored, the token must go out
            log.warning("opportunistic sweep failed; the reaper will retry", exc_info=True)

    @contextlib.asynccontextmanager
    async def task(self, task: str, **issue: Any) -> AsyncIterator[Credential]:
        """Issue for ``task``; on exit revoke every lease of this run of the task,
        and their subtrees (see ``Broker.task``). On SIGTERM the asyncio task
        running the block is cancelled."""
        task = validate.text(task, "task")
        with self._core.task_run(task) as task_run:
            current = asyncio.current_task()
            guarded = self.revoke_on_sigterm and GUARD.enter(current)
            ended = False
            try:
                cred = await self.issue(task=task, **issue)
                failure: BaseException | None = None
                try:
                    if guarded:
                        GUARD.body()
                    yield cred
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    if guarded:
                        GUARD.ending()
                    await self._end_task(task, task_run, _exit_reason(failure, guarded), failure)
                ended = True
            finally:
                if guarded:
                    GUARD.leave(current, failing=not ended)

    async def _end_task(
        self, task: str, run: str, reason: str, failure: BaseException | None
    ) -> None:
        """Revoke a run at its exit, retrying a store failure (see ``Broker.task``)."""
        delays = iter(self._core.task_revoke_delays)
        while True:
            try:
                await self.revoke_where(task=task, task_run=run, reason=reason)
                return
            except StoreError as exc:
                delay = next(delays, None)
                if delay is None:
                    if self._core.task_revoke_failed(task, run, exc, failure):
                        raise
                    return
                await asyncio.sleep(delay)

    def ephemeral(
        self, **issue: Any
    ) -> Callable[[Callable[..., Awaitable[R]]], Callable[..., Awaitable[R]]]:
        """Decorate ``async def fn(cred, ...)``: each call runs in its own task."""

        def decorate(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
            if not _is_async(fn):
                raise InvalidRequest("AsyncBroker.ephemeral decorates async def functions")
            name = _name(fn)

            @functools.wraps(fn)
            async def call(*args: Any, **kwargs: Any) -> R:
                async with self.task(name, **issue) as cred:
                    return await fn(cred, *args, **kwargs)

            return call

        return decorate

    async def health(self, *, timeout: Duration = 2.0) -> Health:
        """For readiness probes (see ``Broker.health``)."""
        limit, count = seconds(timeout, "timeout"), self._health.wants_count()
        probe = await arun_probe(self._astore, self._core.clock(), limit, count)
        return self._health_of(probe)

    def _count_store(self, metrics: Metrics) -> None:
        self._astore = metrics.counted(self._astore)

    # -- the reaper -------------------------------------------------------
    async def start(self) -> None:
        """Start the reaper task on the running loop (idempotent)."""
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap(), name="jitbroker-reaper")

    async def stop(self) -> None:
        """Stop the reaper and wait for it to finish its current sweep, hook calls
        included (as ``Broker.stop`` does). Cancelling ``stop`` cuts that sweep
        short: the hook calls it did not run stay queued for the next sweep."""
        reaper = self._reaper
        if reaper is None:
            return
        task = asyncio.current_task()
        # Cleanup code of a task being cancelled may call stop(): only a cancel
        # that arrives while stop() waits means "stop waiting".
        before = 0 if task is None else task.cancelling()
        reaper.cancel()
        try:
            await reaper
        except asyncio.CancelledError:
            if task is not None and task.cancelling() > before:  # stop itself was cancelled
                raise
        finally:
            if reaper.done():
                self._reaper = None

    async def close(self) -> None:
        """Stop the reaper, delete the finished hook jobs still waiting for their
        batch, and close the store (the store is closed even if stopping is
        cancelled)."""
        try:
            await self.stop()
        finally:
            try:
                if self._claims:  # a cancelled sweep's claim still running: its leases
                    await asyncio.wait(set(self._claims))  # are claimed, queue their hooks
                await self.flush_usage()
                await arun(self._core.outbox.flush(), self._astore)
            except Exception:  # a broken store: the jobs run again, same key
                log.warning("could not delete finished outbox jobs", exc_info=True)
            finally:
                await self._astore.close()

    async def flush_usage(self) -> int:
        """Write the lease usage recorded since the last flush now (see
        ``Broker.flush_usage``); ``close`` does it too."""
        core = self._core
        return await arun(core.flush_usage(core.clock(), force=True), self._astore)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(self._core.reap_interval)
            # Shielded: stop() cancels the reaper, but a sweep under way has claimed
            # its expired leases, so it finishes and runs their on_expire hooks.
            sweep = asyncio.ensure_future(self.sweep())
            try:
                await asyncio.shield(sweep)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                cancels = 0 if task is None else task.cancelling()
                if not cancels:  # a hook raised CancelledError: not a stop
                    log.warning("reaper sweep cancelled; retrying next interval")
                    continue
                if cancels > 1:  # cancelled again (stop itself was): cut the sweep short
                    sweep.cancel()
                try:  # stopping: let the sweep finish (its unrun hook calls are requeued)
                    await sweep
                except Exception:
                    log.warning("reaper sweep failed while stopping", exc_info=True)
                raise
            except Exception:  # the reaper must outlive a bad sweep; it retries
                log.warning("reaper sweep failed; retrying next interval", exc_info=True)

    async def __aenter__(self) -> AsyncBroker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
