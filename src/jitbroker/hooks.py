"""Lifecycle hooks: tie external cleanup to a lease (drop a database role, delete
a cloud key) with ``on_issue``, ``on_revoke`` and ``on_expire``.

A hook is a callable taking the ``Lease`` (sync, or ``async def``); one that
also accepts an ``idempotency_key`` keyword receives its call's key. Each event
takes one hook, a list of them, or a mapping ``{name: hook}``.

Every hook has a name, its identity across processes and restarts: the
mapping's key, else ``module.qualname`` of the callable (of its class for a
callable object). Names are 1 to 128 printable characters without spaces, and
unique per event within a broker. Brokers treat hooks of the same event and
name as the same hook, so give one name to one job (all lambdas of a module
share a qualname, and all instances of a class: name them with a mapping).

Every call is a job in the store's outbox (``jitbroker.stores.base``),
recorded in the same atomic step as the event that needs it: the issue, the
revoke (of every lease of the subtree), the expiry claim. The broker that
recorded the event runs the jobs at once; if it dies first, or a call fails,
any broker that has a hook of that event and name runs it later, after the
claim's deadline (``hook_timeout``) or the retry's backoff (``backoff``,
``2 * backoff``, ...), up to ``retries`` times. Then the job is parked
(irrevocable work, listed in ``broker.failed_hooks()`` and the report) until
``broker.retry_failed_hooks()`` runs it again or ``forget_failed_hook(...,
force=True)`` drops it (audited). Nothing is lost to a crash: a hook runs at
least once, and exactly once when nothing fails midway. A broker killed during
a call, or one slower than ``hook_timeout``, may see its job run again
elsewhere: hooks must be idempotent, keyed by the idempotency key, which is the
same on every attempt in every process (``<lease id>/<event>/<name>``).

``on_expire`` is decided when a lease is created: the lease records the names
of its broker's ``on_expire`` hooks (``Lease.expire_hooks``), and when it
expires only a broker that has a hook of each of those names claims it and runs
exactly those (not its other ``on_expire`` hooks). A lease that needs none is
claimed by any broker. So a broker without hooks sharing the store never takes
another's expiries away; an expired lease whose hooks no running broker has
waits in the store, unclaimed and counted in ``broker.report()``
(``awaiting_hooks``), until one that has them sweeps. ``on_issue`` and
``on_revoke`` are the hooks of the broker that issues or revokes.

A hook runs after the operation succeeded, so a failing hook can never undo or
lose a revocation: the error is logged and audited, and the job retried. A run
that is interrupted (its task cancelled, or a hook raising ``CancelledError``,
``KeyboardInterrupt``, ``SystemExit``) hands the jobs it had not reached back
to the outbox, due now; the call that raised counts as a failed attempt, and
the exception propagates once that is recorded.

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
from collections.abc import Awaitable, Callable, Iterable, Mapping
from itertools import combinations
from typing import Any

import attrs

from .clock import Duration, seconds
from .errors import InvalidRequest
from .lease import Lease
from .stores.base import Job

__all__ = ["FailedHook", "Hook", "HookSpec", "Hooks", "failed_hook", "hook_name"]

Hook = Callable[[Lease], object]
_MAX_ERROR = 200  # characters of a hook's error kept for the report
MAX_BACKOFF = 3600.0  # seconds: retries never wait longer than this
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
    at: float  # when it is due again (parked: when it was parked)
    #: The outbox job's id: the idempotency key its hook receives.
    id: str = ""


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
    if twice:  # a name is the identity of the hook's jobs in the outbox
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
    """The configured hooks: each callable under its name and the job kind it
    runs (``event:name``), the retry schedule, and how long a claim lasts."""

    def __init__(
        self,
        on_issue: HookSpec = None,
        on_revoke: HookSpec = None,
        on_expire: HookSpec = None,
        *,
        retries: int = 5,
        backoff: Duration = 1.0,
        timeout: Duration = 60.0,
    ) -> None:
        self.on_issue = _hooks(on_issue, "on_issue")
        self.on_revoke = _hooks(on_revoke, "on_revoke")
        self.on_expire = _hooks(on_expire, "on_expire")
        #: What every lease this broker creates records as ``expire_hooks``.
        self.expire_profile = expire_profile(name for name, _ in self.on_expire)
        #: The ``expire_hooks`` values this broker can run, for ``claim_expired``.
        self.expire_profiles = tuple(_plans(self.on_expire))
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InvalidRequest("hook_retries must be a whole number, 0 or more")
        self.retries = retries
        self.backoff = seconds(backoff, "hook_backoff")
        #: How long a claim on a job lasts: a broker that dies mid-call leaves
        #: the job to another once this has passed (so a hook that runs longer
        #: may run twice; it gets the same idempotency key both times).
        self.timeout = seconds(timeout, "hook_timeout")
        self.by_kind: dict[str, tuple[Hook, bool]] = {
            f"{event}:{name}": (hook, _takes_key(hook))
            for event in ("on_issue", "on_revoke", "on_expire")
            for name, hook in getattr(self, event)
        }

    def __bool__(self) -> bool:
        return bool(self.on_issue or self.on_revoke or self.on_expire)

    def names(self, event: str) -> tuple[str, ...]:
        """The names of ``event``'s hooks, in the configured order."""
        pairs: tuple[tuple[str, Hook], ...] = getattr(self, event)
        return tuple(name for name, _ in pairs)

    def delay(self, attempts: int) -> float:
        """How long after its ``attempts``-th failure a job is due again."""
        doublings = min(attempts - 1, _MAX_DOUBLINGS)
        return min(self.backoff * float(2**doublings), MAX_BACKOFF)

    def label(self, job: Job) -> str:
        """How a job's hook is shown: its qualname, as before hooks had names,
        unless the hook was given a name."""
        found = self.by_kind.get(job.kind)
        if found is not None and job.name == hook_name(found[0]):
            hook = found[0]
            return getattr(hook, "__qualname__", None) or type(hook).__qualname__
        return job.name

    def call(self, job: Job) -> object:
        """Call the hook of ``job`` with its lease (and its idempotency key, for a
        hook that takes ``idempotency_key``); what it returned."""
        hook, keyed = self.by_kind[job.kind]
        if keyed:
            keyed_hook: Callable[..., object] = hook
            return keyed_hook(job.lease, idempotency_key=job.id)
        return hook(job.lease)


def _takes_key(hook: Hook) -> bool:
    """True if ``hook`` accepts an ``idempotency_key`` keyword."""
    try:
        parameters = inspect.signature(hook).parameters
    except (TypeError, ValueError):  # a builtin without a signature: called with the lease
        return False
    found = parameters.get("idempotency_key")
    return found is not None and found.kind in (found.POSITIONAL_OR_KEYWORD, found.KEYWORD_ONLY)


def failed_hook(job: Job, label: str) -> FailedHook:
    """The ``FailedHook`` listing of an outbox job."""
    return FailedHook(job.event, label, job.lease, job.attempts, job.error, job.due, job.id)


def as_is(awaitable: Awaitable[Any]) -> Awaitable[Any]:
    """The async driver's finisher: it awaits what the step returns."""
    return awaitable


def describe_error(exc: BaseException) -> str:
    """``Class: message``, shortened; a hook's exception is foreign code, so even
    its ``str()`` may fail."""
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not turn into our error
        message = "<the error's message could not be read>"
    return f"{type(exc).__name__}: {message}"[:_MAX_ERROR]


def run_coroutine(awaitable: Awaitable[Any]) -> None:
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
