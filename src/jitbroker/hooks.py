"""Lifecycle hooks: tie external cleanup to a lease (drop a database role, delete
a cloud key) with ``on_issue``, ``on_revoke`` and ``on_expire``.

A hook is a callable taking the ``Lease`` (sync, or ``async def``). It runs
after the operation succeeded, so a failing hook can never undo or lose a
revocation: the error is logged and audited, and the call is retried with
exponential backoff (``backoff``, ``2 * backoff``, ...) by later sweeps, up to
``retries`` times. Then it is parked: listed in ``broker.failed_hooks()`` and
the report, and run again by ``broker.retry_failed_hooks()``.

``on_expire`` fires exactly once per lease across every broker sharing a store,
because each expired lease is claimed by exactly one sweep. Retries and parked
hooks live in the broker's memory: a process that dies loses its pending
retries (the leases themselves are already dead).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs

from .audit import EventType
from .clock import Duration, seconds, system_clock
from .errors import InvalidRequest
from .lease import Lease

if TYPE_CHECKING:
    from .audit import Auditor
    from .clock import Clock

__all__ = ["FailedHook", "Hook", "Hooks"]

log = logging.getLogger("jitbroker.hooks")
Hook = Callable[[Lease], object]
EVENTS = ("on_issue", "on_revoke", "on_expire")
_MAX_ERROR = 200  # characters of a hook's error kept for the report
MAX_BACKOFF = 3600.0  # seconds: retries never wait longer than this


@attrs.frozen
class FailedHook:
    """A hook call that ran out of retries (or is waiting for its next one)."""

    event: str  # on_issue, on_revoke or on_expire
    hook: str  # the callable's name
    lease: Lease
    attempts: int
    error: str  # the last error's class and message, shortened
    at: float  # when it last failed


@attrs.define
class _Call:
    event: str
    hook: Hook
    lease: Lease
    due: float
    limit: int  # parked once attempts exceed this
    attempts: int = 0
    error: str = ""


def _hooks(value: Hook | Iterable[Hook] | None, event: str) -> tuple[Hook, ...]:
    if value is None:
        return ()
    items = (value,) if callable(value) else tuple(value)
    if not all(callable(h) for h in items):
        raise InvalidRequest(f"{event} must be a callable taking a Lease, or a list of them")
    return items


def _name(hook: Hook) -> str:
    return getattr(hook, "__qualname__", None) or type(hook).__qualname__


class Hooks:
    """The configured hooks, their pending retries and the parked failures."""

    def __init__(
        self,
        on_issue: Hook | Iterable[Hook] | None = None,
        on_revoke: Hook | Iterable[Hook] | None = None,
        on_expire: Hook | Iterable[Hook] | None = None,
        *,
        retries: int = 5,
        backoff: Duration = 1.0,
        clock: Clock | None = None,
    ) -> None:
        self.on_issue = _hooks(on_issue, "on_issue")
        self.on_revoke = _hooks(on_revoke, "on_revoke")
        self.on_expire = _hooks(on_expire, "on_expire")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InvalidRequest("hook_retries must be a whole number, 0 or more")
        self.retries = retries
        self.backoff = seconds(backoff, "hook_backoff")
        self.clock: Clock = clock or system_clock
        self.audit: Auditor | None = None
        self._pending: list[_Call] = []
        self._parked: list[_Call] = []
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.on_issue or self.on_revoke or self.on_expire)

    def enqueue(self, event: str, leases: Iterable[Lease]) -> None:
        """Schedule every ``event`` hook for each lease, due now."""
        now = self.clock()
        hooks = getattr(self, event)
        calls = [_Call(event, h, lease, now, self.retries) for lease in leases for h in hooks]
        with self._lock:
            self._pending.extend(calls)

    def _due(self) -> list[_Call]:
        now = self.clock()
        with self._lock:
            due = [c for c in self._pending if c.due <= now]
            self._pending = [c for c in self._pending if c.due > now]
        return due

    def run(self) -> int:
        """Run every call that is due, from sync code; returns how many failed."""
        failed = 0
        for call in self._due():
            try:
                result = call.hook(call.lease)
                if inspect.isawaitable(result):
                    _run_coroutine(result)
            except Exception as exc:  # a hook's failure is recorded, never raised
                failed += 1
                self._failed(call, exc)
        return failed

    async def arun(self) -> int:
        """Run every call that is due, from async code; returns how many failed."""
        failed = 0
        for call in self._due():
            try:
                result = call.hook(call.lease)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:  # a hook's failure is recorded, never raised
                failed += 1
                self._failed(call, exc)
        return failed

    def _failed(self, call: _Call, exc: Exception) -> None:
        now = self.clock()
        call.attempts += 1
        call.error = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR]
        parked = call.attempts > call.limit
        log.warning(
            "hook %s %s failed for lease %s (attempt %d)%s",
            call.event,
            _name(call.hook),
            call.lease.id,
            call.attempts,
            "; parked" if parked else "; will retry",
            exc_info=True,
        )
        if self.audit is not None:
            action = EventType.HOOK_PARKED if parked else EventType.HOOK_FAILED
            self.audit.emit(
                action, now, call.lease, error=type(exc).__name__, where=f"{call.event}"
            )
        with self._lock:
            if parked:
                call.due = now
                self._parked.append(call)
            else:
                call.due = now + min(self.backoff * 2 ** (call.attempts - 1), MAX_BACKOFF)
                self._pending.append(call)

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
            parked, self._parked = self._parked, []
            for call in parked:
                call.due = now
                call.limit = call.attempts  # one try: another failure parks it again
            self._pending.extend(parked)
        return len(parked)


def _failed_hook(call: _Call) -> FailedHook:
    return FailedHook(call.event, _name(call.hook), call.lease, call.attempts, call.error, call.due)


def _run_coroutine(awaitable: Awaitable[Any]) -> None:
    """Run an async hook from sync code: on this thread if no loop runs here,
    else on a short-lived thread with its own loop (never block a running loop)."""

    async def wrapped() -> None:
        await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(wrapped())
        return
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(wrapped())
        except BaseException as exc:  # re-raised on the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=target, name="jitbroker-hook")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
