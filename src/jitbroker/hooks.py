"""Lifecycle hooks: tie external cleanup to a lease (drop a database role, delete
a cloud key) with ``on_issue``, ``on_revoke`` and ``on_expire``.

A hook is a callable taking the ``Lease`` (sync, or ``async def``). Each event
takes one hook, a list of them, or a mapping ``{name: hook}``.

Every hook has a name, its identity across processes and restarts: the
mapping's key, else ``module.qualname`` of the callable (of its class for a
callable object). Names are 1 to 128 printable characters without spaces;
``on_expire`` names must be unique within the broker. Two brokers treat
``on_expire`` hooks of the same name as the same hook, so give one name to one
job (all lambdas of a module share a qualname, and all instances of a class:
name them with a mapping).

``on_expire`` is decided when a lease is created: the lease records the names
of its broker's ``on_expire`` hooks (``Lease.expire_hooks``), and when it
expires only a broker that has a hook of each of those names claims it and runs
exactly those (not its other ``on_expire`` hooks). A lease that needs none is
claimed by any broker, and no hook runs for it. So a broker without hooks
sharing the store never takes another's expiries away; an expired lease whose
hooks no running broker has waits in the store, unclaimed and counted in
``broker.report()`` (``awaiting_hooks``), until one that has them sweeps. It is
not purged meanwhile: start a broker with those hooks (a hook that does
nothing, under the same name, drains them deliberately). ``on_issue`` hooks run
in the issuing broker; ``on_revoke`` hooks in the broker that revokes.

A hook runs after the operation succeeded, so a failing hook can never undo or
lose a revocation: the error is logged and audited, and the call is retried with
exponential backoff (``backoff``, ``2 * backoff``, ...) by later sweeps, up to
``retries`` times. Then it is parked: listed in ``broker.failed_hooks()`` and
the report, and run again by ``broker.retry_failed_hooks()``.

``on_expire`` fires exactly once per lease across every broker sharing a store,
because each expired lease is claimed by exactly one sweep, of a broker that
runs its hooks. Retries and parked hooks live in the broker's memory: a process
that dies loses its pending retries (the leases themselves are already dead).

No call is lost inside a process: every call taken off the queue ends completed,
back on the queue, or parked. A run that is interrupted (its task cancelled, or
a hook raising ``CancelledError``, ``KeyboardInterrupt``, ``SystemExit``) puts
the calls it had not reached back on the queue, due now; the call that raised
counts as a failed attempt, and the exception propagates once that is recorded.

Both lists are bounded. A call that fails while ``max_pending`` calls wait is
parked at once instead of scheduled for a retry (so an always-failing hook under
a high rate cannot grow the queue); the parked list keeps the newest
``max_parked`` calls, and each older one dropped is logged and counted in
``dropped`` (the report shows it as "hook calls dropped").

An ``async def`` hook on the sync ``Broker`` runs on its own event loop when
the calling thread runs none. Called from a thread whose loop is running, it is
not run (a sync ``Broker`` never blocks a running loop, and the hook could
deadlock waiting for that loop): the call fails with an error saying so, and a
later sweep from a thread without a running loop (the reaper thread, say)
retries it. Async code should use ``AsyncBroker``, which awaits its hooks.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from itertools import combinations
from typing import TYPE_CHECKING, Any

import attrs

from ._drive import Steps
from ._drive import arun as arun_steps
from ._drive import run as run_steps
from .audit import EventType
from .clock import Duration, seconds, system_clock
from .errors import InvalidRequest
from .lease import Lease

if TYPE_CHECKING:
    from .audit import Auditor
    from .clock import Clock

__all__ = ["FailedHook", "Hook", "HookSpec", "Hooks", "hook_name"]

log = logging.getLogger("jitbroker.hooks")
Hook = Callable[[Lease], object]
_MAX_ERROR = 200  # characters of a hook's error kept for the report
MAX_BACKOFF = 3600.0  # seconds: retries never wait longer than this
MAX_PARKED = 10_000  # parked calls kept; older ones are dropped (and counted)
MAX_PENDING = 10_000  # a call failing while this many wait is parked at once
_MAX_DOUBLINGS = 32  # backoff * 2**32 is far past MAX_BACKOFF, and never overflows
MAX_HOOK_NAME = 128  # characters
#: A broker claims expired leases needing any subset of its on_expire hooks, so
#: it names every subset to the store: 2**n - 1 of them. This bounds that list.
MAX_EXPIRE_HOOKS = 8
LOOP_RUNNING = (
    "async hook not run: this thread runs an event loop, which a sync Broker never "
    "blocks; use AsyncBroker (a sweep from a thread without a loop retries it)"
)


@attrs.frozen
class FailedHook:
    """A hook call that ran out of retries (or is waiting for its next one)."""

    event: str  # on_issue, on_revoke or on_expire
    hook: str  # the hook's qualname, or the name it was given
    lease: Lease
    attempts: int
    error: str  # the last error's class and message, shortened
    at: float  # when it last failed


@attrs.define
class _Call:
    event: str
    name: str
    hook: Hook
    lease: Lease
    due: float
    limit: int  # parked once attempts exceed this
    attempts: int = 0
    error: str = ""


HookSpec = Hook | Iterable[Hook] | Mapping[str, Hook] | None


def _hooks(value: HookSpec, event: str) -> tuple[tuple[str, Hook], ...]:
    """``(name, hook)`` pairs, in the order given."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        pairs = [(_check_name(name, event), hook) for name, hook in value.items()]
    else:
        items = (value,) if callable(value) else tuple(value)
        pairs = [(_derived_name(hook, event), hook) for hook in items]
    if not all(callable(hook) for _, hook in pairs):
        raise InvalidRequest(
            f"{event} must be a callable taking a Lease, a list of them, or a mapping"
            " {name: callable}"
        )
    names = [name for name, _ in pairs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice and event == "on_expire":  # elsewhere a name only labels the hook's failures
        raise InvalidRequest(
            f"{event} has several hooks named {', '.join(map(repr, twice))}: a name is a"
            " hook's identity across brokers; give each its own, e.g. {name: hook}"
        )
    return tuple(pairs)


def hook_name(hook: Hook) -> str:
    """``module.qualname`` of ``hook`` (of its class for a callable object)."""
    qualname = getattr(hook, "__qualname__", None)
    module = getattr(hook, "__module__", None)
    if not isinstance(qualname, str):
        qualname, module = type(hook).__qualname__, type(hook).__module__
    return qualname if not isinstance(module, str) else f"{module}.{qualname}"


def _derived_name(hook: Hook, event: str) -> str:
    name = hook_name(hook) if callable(hook) else ""
    if not callable(hook) or _valid_name(name):
        return name
    raise InvalidRequest(
        f"{event} hook {name[:MAX_HOOK_NAME]!r} has no usable name (1 to {MAX_HOOK_NAME}"
        " printable characters, no spaces): give it one, e.g. {name: hook}"
    )


def _check_name(name: object, event: str) -> str:
    if isinstance(name, str) and _valid_name(name):
        return name
    raise InvalidRequest(
        f"{event} hook names must be 1 to {MAX_HOOK_NAME} printable characters without spaces"
    )


def _valid_name(name: str) -> bool:
    return 0 < len(name) <= MAX_HOOK_NAME and name.isprintable() and " " not in name


def expire_profile(names: Iterable[str]) -> str | None:
    """The ``Lease.expire_hooks`` value for hooks of these names: sorted, each once,
    space-separated; None for no hooks."""
    return " ".join(sorted(set(names))) or None


def _plans(pairs: tuple[tuple[str, Hook], ...]) -> dict[str, tuple[tuple[str, Hook], ...]]:
    """Every profile a broker with these on_expire hooks can run -> the hooks to
    run for it, in the configured order."""
    if len(pairs) > MAX_EXPIRE_HOOKS:
        raise InvalidRequest(
            f"at most {MAX_EXPIRE_HOOKS} on_expire hooks (a broker names every subset of"
            " them to the store when it claims); combine some into one hook"
        )
    plans: dict[str, tuple[tuple[str, Hook], ...]] = {}
    for size in range(1, len(pairs) + 1):
        for subset in combinations(pairs, size):  # combinations keep the order
            profile = expire_profile(name for name, _ in subset)
            assert profile is not None
            plans[profile] = subset
    return plans


class Hooks:
    """The configured hooks, their pending retries and the parked failures."""

    def __init__(
        self,
        on_issue: HookSpec = None,
        on_revoke: HookSpec = None,
        on_expire: HookSpec = None,
        *,
        retries: int = 5,
        backoff: Duration = 1.0,
        clock: Clock | None = None,
        max_parked: int = MAX_PARKED,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.on_issue = _hooks(on_issue, "on_issue")
        self.on_revoke = _hooks(on_revoke, "on_revoke")
        self.on_expire = _hooks(on_expire, "on_expire")
        #: What every lease this broker creates records as ``expire_hooks``.
        self.expire_profile = expire_profile(name for name, _ in self.on_expire)
        self._expire_plans = _plans(self.on_expire)
        #: The ``expire_hooks`` values this broker can run, for ``claim_expired``.
        self.expire_profiles = tuple(self._expire_plans)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InvalidRequest("hook_retries must be a whole number, 0 or more")
        self.retries = retries
        for name, value in (("max_parked", max_parked), ("max_pending", max_pending)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequest(f"{name} must be a whole number, 1 or more")
        self.max_parked = max_parked
        self.max_pending = max_pending
        self.dropped = 0  # parked calls dropped to keep the list within max_parked
        self.backoff = seconds(backoff, "hook_backoff")
        self.clock: Clock = clock or system_clock
        self.audit: Auditor | None = None
        self._pending: list[_Call] = []
        self._parked: deque[_Call] = deque()
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.on_issue or self.on_revoke or self.on_expire)

    def enqueue(self, event: str, leases: Iterable[Lease]) -> None:
        """Schedule every ``event`` hook for each lease, due now (``on_expire``:
        see ``enqueue_expired``)."""
        now = self.clock()
        hooks = getattr(self, event)
        calls = [
            _Call(event, name, hook, lease, now, self.retries)
            for lease in leases
            for name, hook in hooks
        ]
        with self._lock:
            self._pending.extend(calls)

    def enqueue_expired(self, leases: Iterable[Lease]) -> list[Lease]:
        """Schedule, for each expired lease, the ``on_expire`` hooks it records
        (none for a lease that records none); the leases whose hooks this broker
        does not have (a store that ignored the claim filter: they are lost)."""
        now, plans, missing = self.clock(), self._expire_plans, []
        calls: list[_Call] = []
        for lease in leases:
            needed = lease.expire_hooks
            if needed is None:
                continue
            plan = plans.get(needed)
            if plan is None:
                missing.append(lease)
                continue
            calls += (_Call("on_expire", n, h, lease, now, self.retries) for n, h in plan)
        if calls:
            with self._lock:
                self._pending.extend(calls)
        return missing

    def _due(self) -> list[_Call]:
        now = self.clock()
        with self._lock:
            due = [c for c in self._pending if c.due <= now]
            self._pending = [c for c in self._pending if c.due > now]
        return due

    def run(self) -> int:
        """Run every call that is due, from sync code; returns how many failed.

        An async hook runs on its own loop, unless this thread runs one: then it
        fails (``LOOP_RUNNING``) rather than block that loop."""
        if not self._pending:  # nothing queued: no lock, no clock
            return 0
        return run_steps(self._attempts(), _run_coroutine)

    async def arun(self) -> int:
        """Run every call that is due, from async code; returns how many failed.

        If the task is cancelled, the call under way counts as a failed attempt
        and the calls not reached go back on the queue, due now."""
        if not self._pending:
            return 0
        return await arun_steps(self._attempts(), _as_is)

    def _attempts(self) -> Steps[int]:
        """One attempt at every due call, written once for ``run`` and ``arun``: an
        async hook's awaitable is yielded to the driver, which runs it on a loop
        of its own (``run``) or awaits it (``arun``) and throws its error back in."""
        calls = self._due()
        failed = done = 0
        try:
            for call in calls:
                try:
                    result = call.hook(call.lease)
                    if inspect.isawaitable(result):
                        yield _finishing(result)
                except Exception as exc:  # a hook's failure is recorded, never raised
                    failed += 1
                    self._failed(call, exc)
                except BaseException as exc:  # cancelled, or worse: recorded, then raised
                    self._failed(call, exc)
                    done += 1
                    raise
                done += 1
        finally:
            self._requeue(calls[done:])
        return failed

    def _requeue(self, calls: list[_Call]) -> None:
        """Put calls a run did not reach back at the head of the queue, still due."""
        if calls:
            with self._lock:
                self._pending[:0] = calls

    def _failed(self, call: _Call, exc: BaseException) -> None:
        now = self.clock()
        call.attempts += 1
        call.error = _describe(exc)
        parked = call.attempts > call.limit
        full = not parked and len(self._pending) >= self.max_pending
        log.warning(
            "hook %s %s failed for lease %s (attempt %d)%s",
            call.event,
            call.name,
            call.lease.id,
            call.attempts,
            "; parked" if parked else "; parked: retry queue full" if full else "; will retry",
            exc_info=True,
        )
        parked = parked or full
        if self.audit is not None:
            action = EventType.HOOK_PARKED if parked else EventType.HOOK_FAILED
            self.audit.emit(
                action, now, call.lease, error=type(exc).__name__, where=f"{call.event}"
            )
        dropped: _Call | None = None
        with self._lock:
            if parked:
                call.due = now
                if len(self._parked) >= self.max_parked:
                    dropped = self._parked.popleft()
                    self.dropped += 1
                self._parked.append(call)
            else:
                doublings = min(call.attempts - 1, _MAX_DOUBLINGS)
                call.due = now + min(self.backoff * 2**doublings, MAX_BACKOFF)
                self._pending.append(call)
        if dropped is not None:
            log.warning(
                "parked hook call dropped (more than %d parked): %s %s for lease %s, "
                "%d attempts, last error %s; %d dropped so far",
                self.max_parked,
                dropped.event,
                dropped.name,
                dropped.lease.id,
                dropped.attempts,
                dropped.error,
                self.dropped,
            )

    def failed(self) -> list[FailedHook]:
        """The parked calls, oldest first."""
        with self._lock:
            parked = list(self._parked)
        return [_failed_hook(c) for c in parked]

    def pending(self) -> list[FailedHook]:
        """Calls waiting for a retry (they failed at least once)."""
        with self._lock:
            waiting = [c for c in self._pending if c.attempts]
        return [_failed_hook(c) for c in waiting]

    def retry_parked(self) -> int:
        """Make every parked call due again, each with one more attempt; how many."""
        now = self.clock()
        with self._lock:
            parked, self._parked = list(self._parked), deque()
            for call in parked:
                call.due = now
                call.limit = call.attempts  # one try: another failure parks it again
            self._pending.extend(parked)
        return len(parked)


def _finishing(awaitable: Awaitable[Any]) -> Callable[[Callable[[Awaitable[Any]], Any]], Any]:
    """The step that hands an async hook's awaitable to the driver's finisher."""
    return lambda finish: finish(awaitable)


def _as_is(awaitable: Awaitable[Any]) -> Awaitable[Any]:
    """``arun``'s finisher: the driver awaits what the step returns."""
    return awaitable


def _describe(exc: BaseException) -> str:
    """``Class: message``, shortened; a hook's exception is foreign code, so even
    its ``str()`` may fail."""
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not turn into our error
        message = "<the error's message could not be read>"
    return f"{type(exc).__name__}: {message}"[:_MAX_ERROR]


def _failed_hook(call: _Call) -> FailedHook:
    # The qualname alone, as before hooks had names, unless the hook was named.
    label = call.name
    if label == hook_name(call.hook):
        label = getattr(call.hook, "__qualname__", None) or type(call.hook).__qualname__
    return FailedHook(call.event, label, call.lease, call.attempts, call.error, call.due)


def _run_coroutine(awaitable: Awaitable[Any]) -> None:
    """Run an async hook from sync code on a loop of its own, if this thread runs
    none. If it does, refuse: waiting here would block that loop (and deadlock a
    hook that needs it), so the call fails with ``LOOP_RUNNING`` and is retried."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        close = getattr(awaitable, "close", None)
        if callable(close):  # a coroutine never run: close it, no "never awaited" warning
            close()
        raise RuntimeError(LOOP_RUNNING)

    async def wrapped() -> None:
        await awaitable

    asyncio.run(wrapped())
