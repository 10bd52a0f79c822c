"""Running the outbox: the jobs lease events record in the store.

Each event (issue, revoke, expiry claim) is written with its jobs in one store
step (``jitbroker.stores.base``): a hook call per hook of the event, and a
provider's create or revoke. The broker that wrote them holds them (a claim
with a deadline) and runs them at once; whatever it does not finish, any
broker that can run it claims later. ``Runner`` is that work, written once as
steps (``jitbroker._drive``) for both brokers: ``Mode`` says how a step's
awaitable hook or blocking provider call is finished, the only difference.

Provider jobs follow one rule each way:

- ``create`` is run inline by the issuing broker, which hands out the secret.
  A create job found by a sweep means that broker died (or outlived the
  claim) before the credential went out, so it is undone: the lease is
  revoked, which records the provider's revoke.
- ``revoke`` waits while the lease's create job exists (a create still under
  way must not race its own undo); then it calls ``provider.revoke``, which
  treats "not found" as done.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import re
import secrets
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import partial
from operator import methodcaller
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from ._drive import Steps
from .audit import Auditor, EventType
from .errors import InvalidRequest, StoreError
from .hooks import FailedHook, Hooks, as_is, describe_error, failed_hook, run_coroutine
from .lease import Lease, Secret
from .stores.base import NO_OUTBOX, Job, LeaseFilter, Outbox, event_jobs, job_id, new_outbox

if TYPE_CHECKING:
    from .clock import Clock

__all__ = [
    "ASYNC",
    "SYNC",
    "Mode",
    "ProviderLike",
    "Reconciliation",
    "Runner",
    "check_provider_name",
    "check_providers",
]

log = logging.getLogger("jitbroker.outbox")
BATCH = 100  # jobs per claim_jobs call
#: Finished hook jobs are deleted in batches: when this many wait, or when the
#: oldest has waited FLUSH_AFTER seconds (never more than a quarter of
#: hook_timeout: they are deleted long before their claim could run out).
FLUSH_BATCH = 100
FLUSH_AFTER = 1.0
CREATE_INTERRUPTED = "provider-create-interrupted"
_PROVIDER_EVENTS = frozenset({"create", "revoke"})
#: Clock skew allowed between brokers when reconciling (see ``Runner._orphan``).
_SKEW = 1.0


class ProviderLike(Protocol):
    """What the core needs of a provider (``jitbroker.providers.Provider``)."""

    name: str

    def check(self, lease: Lease) -> None: ...
    def create(self, lease: Lease) -> Any: ...
    def revoke(self, lease: Lease) -> None: ...
    def renew(self, lease: Lease) -> None: ...
    def managed(self) -> Iterable[str]: ...


@attrs.frozen
class Mode:
    """How a driver finishes what a step hands it: an async hook's awaitable
    (run on a loop of its own, or awaited) and a blocking call (made here, or
    in a worker thread so the event loop never stalls)."""

    finish: Callable[[Awaitable[Any]], Any]
    blocking: Callable[..., Any]


def _direct(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


SYNC = Mode(run_coroutine, _direct)
ASYNC = Mode(as_is, asyncio.to_thread)


@attrs.frozen
class Reconciliation:
    """What ``broker.reconcile()`` found and did, per provider it ran for."""

    #: Lease ids whose backend principal had no live lease: revoked now.
    revoked: tuple[str, ...] = ()
    #: Active leases whose backend principal is missing (flagged, audited).
    missing: tuple[Lease, ...] = ()
    #: ``provider: error`` for each provider (or orphan) that could not be handled.
    failed: tuple[str, ...] = ()


class _Deferred(Exception):
    """A provider revoke that must wait for the lease's create job."""

    def __init__(self, until: float) -> None:
        super().__init__("the lease's create is still under way")
        self.until = until


#: A provider name: the exact audience that selects it, so never a glob.
_PROVIDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


def check_provider_name(name: object) -> str:
    """``name`` if it can name a provider (1 to 64 of ``A-Za-z0-9._:-``, starting
    with a letter or digit: no glob, no space, so it cannot match an audience
    pattern by accident); ``InvalidRequest`` otherwise."""
    if isinstance(name, str) and _PROVIDER_NAME.fullmatch(name):
        return name
    raise InvalidRequest(
        "a provider name is 1 to 64 letters, digits or '._:-', starting with a letter or digit"
    )


def check_providers(providers: Iterable[Any]) -> dict[str, Any]:
    """``{name: provider}``; refuses what is not a provider, a name that is not
    one (``check_provider_name``) and names used twice."""
    found: dict[str, Any] = {}
    for provider in providers:
        name = getattr(provider, "name", None)
        methods = ("check", "create", "revoke", "renew", "managed")
        if not isinstance(name, str) or not all(
            callable(getattr(provider, m, None)) for m in methods
        ):
            raise InvalidRequest(
                "providers must be Provider objects (jitbroker.providers): a name and"
                " check, create, revoke, renew and managed methods"
            )
        check_provider_name(name)
        if name in found:
            raise InvalidRequest(f"two providers are named {name!r}: a name selects one")
        found[name] = provider
    return found


class Runner:
    """A broker's side of the outbox: what its events record, and running jobs."""

    def __init__(
        self,
        hooks: Hooks,
        providers: Mapping[str, ProviderLike],
        clock: Clock,
        audit: Auditor,
        revoked: Callable[[list[Lease], float, str, str | None], None],
    ) -> None:
        self.hooks = hooks
        self.providers = dict(providers)
        self.clock = clock
        self.audit = audit
        self._revoked = revoked  # the core's bookkeeping after a revoke (audit, cache)
        self._provider_names = frozenset(self.providers)
        # The hooks an event's own broker holds (on_expire's come from each lease).
        self._names = {e: hooks.names(e) for e in ("on_issue", "on_revoke")} | {"on_expire": ()}
        kinds = list(hooks.by_kind)
        kinds += (f"{e}:{name}" for name in self.providers for e in ("create", "revoke"))
        #: The job kinds this broker can run: what its sweeps claim.
        self.kinds = tuple(kinds)
        self._claims = itertools.count()
        self._uid = secrets.token_hex(6)  # claims of this broker, told from any other's
        # Finished hook jobs not yet deleted, by claim. The events of one flush
        # period share a claim (``_shared``, new after each flush), so a flush
        # is one ``finish_jobs`` call, whatever the number of events.
        self._done: dict[str, list[str]] = {}
        self._done_count = 0
        self._done_since = 0.0
        self._done_lock = threading.Lock()
        self._flush_after = min(FLUSH_AFTER, hooks.timeout / 4)
        self._shared = self._claim_id()
        #: Whether issue and revoke record anything for this broker's own events.
        self.issues = bool(hooks.on_issue)
        self.revokes = bool(hooks.on_revoke or self.providers)

    # -- what an event records --------------------------------------------
    def plan(self, event: str, now: float) -> Outbox:
        """The ``Outbox`` for ``event`` now: this broker's hooks for it, held by a
        new claim until ``hook_timeout`` from now."""
        hooks = self._names[event]
        if not hooks and not self.providers and not (event == "on_expire" and self.hooks.on_expire):
            return NO_OUTBOX  # nothing for this broker to hold: write only what others run
        until = now + self.hooks.timeout
        return new_outbox(hooks, self._provider_names, self._shared, until, self.hooks.retries)

    def _claim_id(self) -> str:
        return f"{self._uid}.{next(self._claims)}"

    def _claim(self, now: float) -> tuple[str, float]:
        """A new claim id, and its deadline."""
        return self._claim_id(), now + self.hooks.timeout

    @staticmethod
    def held(event: str, leases: Iterable[Lease], outbox: Outbox, at: float) -> list[Job]:
        """The jobs the store recorded for ``event`` that ``outbox``'s claim holds
        (the same ``event_jobs`` the store wrote: nothing to read back)."""
        if outbox.claim is None:
            return []
        return [j for lease in leases for j in event_jobs(event, lease, outbox, at) if j.claim]

    # -- running ----------------------------------------------------------
    def run(self, jobs: list[Job], mode: Mode) -> Steps[int]:
        """Run ``jobs`` (all held by one claim); how many failed. Done jobs are
        deleted in one store call; each failure is retried later or parked.

        If interrupted (cancelled, ``KeyboardInterrupt``...), the job under way
        counts as a failed attempt, those not reached are handed back due now,
        and the exception propagates."""
        if not jobs:
            return 0
        claim = jobs[0].claim
        assert claim is not None
        done: list[Job] = []
        failed = reached = 0
        try:
            for job in jobs:
                reached += 1
                try:
                    if job.event in _PROVIDER_EVENTS:
                        yield from self._one(job, mode)
                    else:  # a hook: called here, the commonest job (no generator)
                        result = self.hooks.call(job)
                        if result is not None and inspect.isawaitable(result):
                            yield partial(_finish_awaitable, mode, result)
                except _Deferred as wait:
                    yield from self._release(job, claim, wait.until, "waiting for its create")
                    continue
                except Exception as exc:
                    failed += 1
                    yield from self._failed(job, claim, exc)
                    continue
                done.append(job)
        except GeneratorExit:  # closed by its driver: no more store calls
            raise
        except BaseException as exc:
            yield from self._failed(jobs[reached - 1], claim, exc)
            for job in jobs[reached:]:
                yield from self._release(job, claim, self.clock(), "interrupted")
            yield from self._finish(done, claim)
            raise
        now_ids, due = self._batch(done, claim)  # no generator when no store call is due
        if now_ids or due:
            yield from self._store_finish(now_ids, claim, due)
        return failed

    def _finish(self, done: list[Job], claim: str) -> Steps[None]:
        """Delete the done jobs: a provider's at once (a revoke that is done must
        not be seen as pending), hook jobs in batches (``flush``). A broker that
        dies before its flush leaves them to run again after their deadline, with
        the same idempotency key, as a crash mid-call would."""
        now_ids, due = self._batch(done, claim)
        yield from self._store_finish(now_ids, claim, due)

    def _store_finish(self, now_ids: list[str], claim: str, due: bool) -> Steps[None]:
        """Delete ``now_ids`` (provider jobs ``claim`` holds), and flush if ``due``."""
        if now_ids:
            yield from self._store_quietly(lambda store: store.finish_jobs(now_ids, claim))
        if due:
            yield from self.flush()

    def _batch(self, done: list[Job], claim: str) -> tuple[list[str], bool]:
        """Add the done hook jobs to the batch ``flush`` deletes: the provider jobs
        among ``done`` (deleted at once), and whether the batch is due."""
        later = [job.id for job in done if job.event not in _PROVIDER_EVENTS]
        now_ids = (
            [job.id for job in done if job.event in _PROVIDER_EVENTS]
            if len(later) < len(done)
            else []
        )
        if not later:
            return now_ids, False
        now = self.clock()
        with self._done_lock:
            if not self._done_count:
                self._done_since = now
            self._done.setdefault(claim, []).extend(later)
            self._done_count += len(later)
            due = self._done_count >= FLUSH_BATCH or now - self._done_since >= self._flush_after
        return now_ids, due

    def flush(self) -> Steps[int]:
        """Delete the finished hook jobs waiting to be deleted; how many."""
        with self._done_lock:
            if not self._done_count:
                return 0
            done, self._done, self._done_count = self._done, {}, 0
            self._shared = self._claim_id()
        for claim, ids in done.items():
            yield from self._store_quietly(methodcaller("finish_jobs", ids, claim))
        return sum(map(len, done.values()))

    def _one(self, job: Job, mode: Mode) -> Steps[None]:
        """A provider's job."""
        if job.event == "create":
            yield from self._undo_create(job, mode)
        else:
            yield from self._provider_revoke(job, mode)

    def _provider_revoke(self, job: Job, mode: Mode) -> Steps[None]:
        create: Job | None = yield lambda store: store.get_job(
            job_id(job.lease.id, "create", job.name)
        )
        if create is not None:
            now = self.clock()
            raise _Deferred(max(create.due, now) if create.claim is not None else now + 1.0)
        provider = self.providers[job.name]
        yield lambda store: mode.blocking(provider.revoke, job.lease)

    def _undo_create(self, job: Job, mode: Mode) -> Steps[None]:
        """A create its broker never finished: the secret never went out, so the
        lease dies, and its provider revoke cleans whatever the create made."""
        now = self.clock()
        lease = job.lease
        log.warning(
            "provider %s: the create of lease %s was not finished by its broker; revoking it",
            job.name,
            lease.id,
        )
        yield from self.revoke_now(lease.id, now, CREATE_INTERRUPTED, mode, finish=job)

    def revoke_now(
        self, lease_id: str, now: float, reason: str, mode: Mode, finish: Job | None = None
    ) -> Steps[list[Lease]]:
        """Revoke ``lease_id`` (and its subtree) recording this broker's jobs,
        delete the create job ``finish`` (whose undo this is), then run the jobs."""
        outbox = self.plan("on_revoke", now)
        revoked: list[Lease] = yield lambda store: store.revoke(
            lease_id, at=now, reason=reason, outbox=outbox
        )
        self._revoked(revoked, now, reason, None)
        if finish is not None and finish.claim is not None:
            claim = finish.claim
            yield lambda store: store.finish_jobs([finish.id], claim)
        yield from self.run(self.held("on_revoke", revoked, outbox, now), mode)
        return revoked

    def _failed(self, job: Job, claim: str, exc: BaseException) -> Steps[None]:
        attempts = job.attempts + 1
        park = attempts > job.limit
        now = self.clock()
        log.warning(
            "%s %s failed for lease %s (attempt %d)%s",
            job.event,
            job.name,
            job.lease.id,
            attempts,
            "; parked" if park else "; will retry",
            exc_info=exc,
        )
        action = EventType.HOOK_PARKED if park else EventType.HOOK_FAILED
        self.audit.emit(action, now, job.lease, error=type(exc).__name__, where=job.event)
        due = now if park else now + self.hooks.delay(attempts)
        error = describe_error(exc)
        yield from self._store_quietly(
            lambda store: store.fail_job(job.id, claim, due=due, error=error, park=park)
        )

    def _release(self, job: Job, claim: str, due: float, why: str) -> Steps[None]:
        yield from self._store_quietly(
            lambda store: store.fail_job(
                job.id, claim, due=due, error=why, park=False, attempt=False
            )
        )

    @staticmethod
    def _store_quietly(step: Callable[[Any], Any]) -> Steps[None]:
        """A bookkeeping call after the work was done: if the store fails now, the
        job stays claimed and runs again after its deadline (the same key), so
        the caller's operation, which succeeded, must not raise for it."""
        try:
            yield step
        except StoreError:
            log.warning(
                "could not record an outbox job's outcome; it will run again", exc_info=True
            )

    def sweep(self, mode: Mode) -> Steps[int]:
        """Claim and run every job due that this broker can run; how many failed."""
        if not self.kinds:
            return 0
        failed = 0
        while True:
            now = self.clock()
            claim, until = self._claim(now)
            kinds = self.kinds
            claiming = methodcaller("claim_jobs", now, kinds, claim=claim, until=until, limit=BATCH)
            jobs: list[Job] = yield claiming
            failed += yield from self.run(jobs, mode)
            if len(jobs) < BATCH:
                break
        yield from self.flush()  # what this sweep and the events since the last one finished
        return failed

    # -- parked work --------------------------------------------------------
    def parked(self) -> Steps[list[FailedHook]]:
        """Every parked job, oldest first."""
        yield from self.flush()
        jobs: list[Job] = yield lambda store: store.jobs(parked=True)
        return [failed_hook(job, self.hooks.label(job)) for job in jobs]

    def retry(self, mode: Mode) -> Steps[int]:
        """Make every parked job due once more and run those this broker can;
        how many still fail."""
        now = self.clock()
        yield lambda store: store.retry_jobs(None, now)
        return (yield from self.sweep(mode))

    def forget(self, ids: list[str], by: str | None) -> Steps[int]:
        """Delete these jobs (parked work given up on), each audited."""
        gone: list[Job] = yield lambda store: store.forget_jobs(ids)
        now = self.clock()
        for job in gone:
            self.audit.emit(
                EventType.HOOK_FORGOTTEN,
                now,
                job.lease,
                where=job.id,
                error=job.error[:80] or None,
                actor=by,
            )
        return len(gone)

    # -- providers ----------------------------------------------------------
    def provider_of(self, audience: str) -> ProviderLike | None:
        """The provider an audience names, or None."""
        return self.providers.get(audience) if self.providers else None

    def check(self, provider: ProviderLike, lease: Lease, mode: Mode) -> Steps[None]:
        """``provider.check(lease)`` before anything is stored: its refusal
        (a ``JitBrokerError``) as is, anything else (the backend unreachable
        while it looks its roles up) as ``ProviderError``, never echoed."""
        from .errors import JitBrokerError, ProviderError

        try:
            yield lambda store: mode.blocking(provider.check, lease)
        except JitBrokerError:
            raise
        except Exception as exc:
            raise ProviderError(
                f"provider {provider.name!r} could not check lease {lease.id}"
                f" ({type(exc).__name__}); nothing was stored",
                provider=provider.name,
                lease_id=lease.id,
            ) from exc

    def create(self, lease: Lease, outbox: Outbox, mode: Mode) -> Steps[Secret]:
        """Make the backend credential of a lease just stored with ``outbox``.
        On failure the lease is revoked (its provider revoke cleans what the
        create left) and ``ProviderError`` raised; no secret, no token."""
        from .errors import ProviderError

        provider = self.providers[lease.provider or ""]
        create = job_id(lease.id, "create", provider.name)
        claim = outbox.claim
        assert claim is not None
        try:
            made = yield lambda store: mode.blocking(provider.create, lease)
            secret = made if isinstance(made, Secret) else Secret(made)
        except Exception as exc:
            undo = Job(create, "create", provider.name, lease, 0.0, 0, claim=claim)
            yield from self.revoke_now(lease.id, self.clock(), "provider-failed", mode, finish=undo)
            raise ProviderError(
                f"provider {provider.name!r} could not create the backend credential of lease"
                f" {lease.id} ({type(exc).__name__}); the lease was revoked",
                provider=provider.name,
                lease_id=lease.id,
            ) from exc
        finished = yield lambda store: store.finish_jobs([create], claim)
        if not finished:  # slower than hook_timeout: a sweep took the job and undid it
            raise ProviderError(
                f"provider {provider.name!r} took longer than hook_timeout to create the"
                f" credential of lease {lease.id}; the lease was revoked meanwhile",
                provider=provider.name,
                lease_id=lease.id,
            )
        return secret

    # -- reconciliation -------------------------------------------------------
    def reconcile(self, mode: Mode) -> Steps[Reconciliation]:
        """Make each backend agree with the store: every principal a provider
        manages with no active or pending lease is revoked; every active lease
        whose principal is missing is flagged. After a store restored from an
        old backup, or a broker that died between steps, the backend converges."""
        revoked: list[str] = []
        missing: list[Lease] = []
        failed: list[str] = []
        for name, provider in self.providers.items():
            listed_at = self.clock()
            try:
                managed: set[str] = yield _blocking(mode, _listed, provider)
            except Exception as exc:
                failed.append(f"{name}: {type(exc).__name__}")
                log.warning(
                    "reconcile: provider %s could not list its principals", name, exc_info=True
                )
                continue
            for lease_id in sorted(managed):
                outcome = yield from self._orphan(name, provider, lease_id, listed_at, mode)
                if outcome == "revoked":
                    revoked.append(lease_id)
                elif outcome:
                    failed.append(f"{name}/{lease_id}: {outcome}")
            found: list[Lease] = yield methodcaller("find", LeaseFilter(provider=name))
            now = self.clock()
            for lease in found:
                if lease.is_active(now) and lease.id not in managed:
                    create = yield methodcaller("get_job", job_id(lease.id, "create", name))
                    if create is None:  # not a create still under way
                        missing.append(lease)
                        self.audit.emit(EventType.PRINCIPAL_MISSING, now, lease, where=name)
        return Reconciliation(tuple(revoked), tuple(missing), tuple(failed))

    def _orphan(
        self, name: str, provider: ProviderLike, lease_id: str, listed_at: float, mode: Mode
    ) -> Steps[str]:
        """Revoke the principal of ``lease_id`` if nothing in the store keeps it:
        ``"revoked"``, ``""`` (kept, or left to a job), or the error. A lease that
        died around the listing (``listed_at``, give or take ``_SKEW``) is left
        to its own revoke job, which may have finished since: the next
        reconcile sees whether anything is left."""
        lease: Lease | None = yield methodcaller("get", lease_id)
        now = self.clock()
        if lease is not None and lease.is_active(now):
            return ""
        if lease is not None:
            died = lease.revoked_at if lease.revoked_at is not None else lease.expires_at
            if died >= listed_at - _SKEW:
                return ""
        for event in ("create", "revoke"):  # a job under way or due settles it
            job = yield methodcaller("get_job", job_id(lease_id, event, name))
            if job is not None:
                return ""
        target = lease if lease is not None else orphan(lease_id, name)
        try:
            yield lambda store: mode.blocking(provider.revoke, target)
        except Exception as exc:
            log.warning(
                "reconcile: could not revoke orphan %s of %s", lease_id, name, exc_info=True
            )
            return type(exc).__name__
        self.audit.emit(EventType.PRINCIPAL_ORPHANED, now, target, where=name, actor="reconcile")
        return "revoked"


def _finish_awaitable(mode: Mode, result: Awaitable[Any], store: object) -> Any:
    """A step: what an async hook returned, run or awaited as ``mode`` does it."""
    return mode.finish(result)


def _blocking(mode: Mode, fn: Callable[..., Any], *args: Any) -> Callable[[Any], Any]:
    """The step making a blocking call ``fn(*args)`` the way ``mode`` does."""
    return lambda store: mode.blocking(fn, *args)


def _listed(provider: ProviderLike) -> set[str]:
    return {str(lease_id) for lease_id in provider.managed()}


def orphan(lease_id: str, provider: str) -> Lease:
    """The stand-in ``Lease`` a provider's ``revoke`` gets for a principal whose
    lease the store no longer has (purged, or a restored backup): only ``id``
    and ``audience`` mean anything."""
    return Lease(
        id=lease_id,
        subject="unknown",
        audience=provider,
        scopes=(),
        issued_at=0.0,
        expires_at=0.0,
        max_expires_at=0.0,
        revoked_at=0.0,
        revoke_reason="orphan",
        provider=provider,
    )
