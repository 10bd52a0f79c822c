"""Testing helpers: fake clocks, leak checks and a pytest plugin (loaded automatically).

Fixtures (all function-scoped):

``jitbroker_clock``
    A ``FreezegunClock`` at 2026-01-01T00:00:00Z: a ``FakeClock`` you move with
    ``advance()``, which follows freezegun whenever freezegun is active.
``jitbroker_keys``
    A fresh EdDSA ``KeyRing``.
``jitbroker_store``
    A fresh ``MemoryStore``.
``jitbroker_broker``
    A ``Broker`` on those three (issuer ``urn:jitbroker:test``); closed after the test.
``jitbroker_async_broker``
    An ``AsyncBroker`` on the same three. A plain (sync) fixture: it needs no
    async plugin and no running loop to be built, works in a plain test that
    drives its own loop (``asyncio.run(...)``), and in ``async def`` tests of
    pytest-asyncio or anyio (asyncio backend). It is closed at teardown on a
    private event loop, never the thread's current one.

freezegun: the clock reads freezegun's time on every call while freezegun is
active (``freeze_time`` as a decorator or a context manager, pytest-freezer's
``freezer`` fixture), so ``frozen.tick(31)`` expires a 30-second token of
``jitbroker_broker`` even under a ``@freeze_time`` decorator, which is entered
only after the fixtures were set up. When freezegun stops, the clock stays
where freezegun left it, so the leak check at teardown judges leases at the
time the test ended. While freezegun is active, ``jitbroker_clock.advance()``
and ``set()`` raise ``InvalidRequest``: move freezegun's clock instead.

Leak detection: a test marked ``@pytest.mark.jitbroker_no_leaks`` (or every
test, with ``jitbroker_no_leaks = true`` in the pytest ini options) fails if
its ``jitbroker_broker`` or ``jitbroker_async_broker`` still holds active
leases when that fixture is torn down, and the failure lists them, each with
the file:line of the test code that issued it. That is after the test body and
after every fixture that uses the broker (or was set up after it) has been
torn down, so a yield fixture that wraps the test in ``broker.task(...)`` is not
a leak; the failure is reported as an error at the test's teardown. The check
also covers a broker fixture you override, and runs before its teardown closes
the broker. A marked test that uses neither fixture is an error at setup (the
marker would check nothing); the ini option leaves such tests alone.

``assert_no_leaks(broker)`` does the same check for a broker you built
yourself, a ``Broker`` or (outside a running event loop) an ``AsyncBroker``;
in ``async`` code, ``await assert_no_leaks_async(broker)`` takes either.

Example::

    def test_expiry(jitbroker_broker, jitbroker_clock):
        cred = jitbroker_broker.issue("svc:test", "api", ["read"], ttl=30)
        jitbroker_clock.advance(31)
        assert [l.id for l in jitbroker_broker.sweep()] == [cred.lease_id]
"""

from __future__ import annotations

import asyncio
import calendar
import sys
import threading
import weakref
from collections.abc import Callable, Coroutine, Generator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import pytest

from .audit import AuditEvent, EventType
from .broker import AsyncBroker, Broker
from .errors import InvalidRequest
from .keyring import KeyRing
from .lease import Lease
from .stores.memory import MemoryStore

__all__ = [
    "TEST_ISSUER",
    "FakeClock",
    "FreezegunClock",
    "assert_no_leaks",
    "assert_no_leaks_async",
]

LEAK_MARKER = "jitbroker_no_leaks"
BROKER_FIXTURES = ("jitbroker_broker", "jitbroker_async_broker")

TEST_ISSUER = "urn:jitbroker:test"
#: 2026-01-01T00:00:00Z: a fixed, realistic starting point.
DEFAULT_START = 1_767_225_600.0

T = TypeVar("T")


class FakeClock:
    """A clock that only moves when told to. Thread-safe; pass it as ``clock=``."""

    def __init__(self, start: float = DEFAULT_START) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._now

    def advance(self, delta: float | timedelta) -> float:
        """Move forward by ``delta`` seconds (or a timedelta); returns the new time."""
        step = delta.total_seconds() if isinstance(delta, timedelta) else float(delta)
        if step < 0:
            raise ValueError("a clock does not go backwards; use set() for that")
        with self._lock:
            self._now += step
            return self._now

    def set(self, when: float) -> None:
        """Jump to ``when`` (POSIX seconds), backwards included: for skew tests."""
        with self._lock:
            self._now = float(when)

    def __repr__(self) -> str:
        return f"<FakeClock {self._now}>"


# -- freezegun ---------------------------------------------------------------------
def _freezegun_time() -> Callable[[], datetime] | None:
    """freezegun's current time source while a ``freeze_time`` is active, else None.

    Read from ``freezegun.api`` only if something imported it: freezegun is no
    dependency, and a freeze that nobody imported cannot be active.
    """
    factories = getattr(sys.modules.get("freezegun.api"), "freeze_factories", None)
    return factories[-1] if factories else None


def _posix(when: datetime) -> float:
    # freezegun's own formula for time.time() (naive UTC), so both agree exactly.
    return calendar.timegm(when.timetuple()) + when.microsecond / 1_000_000


class FreezegunClock(FakeClock):
    """A ``FakeClock`` that follows freezegun while it is active: the ``jitbroker_clock``.

    Each call asks whether a ``freeze_time`` is active (decorator, context
    manager or pytest-freezer's ``freezer``) and then returns freezegun's time,
    for every caller and thread alike (freezegun's ignore list does not apply:
    a broker has one clock). Otherwise it is a ``FakeClock``; after freezegun
    stops it continues from where freezegun left it, so time does not jump
    back under leases issued while frozen. ``advance()`` and ``set()`` while
    freezegun is active raise ``InvalidRequest``: two clocks moved separately
    would disagree, so move freezegun's (``frozen.tick()``, ``freezer.move_to()``).
    """

    def __init__(self, start: float = DEFAULT_START) -> None:
        super().__init__(start)
        self._followed: Callable[[], datetime] | None = None  # the freeze last read

    def __call__(self) -> float:
        frozen = _freezegun_time()
        if frozen is None:
            return self._own_time()
        self._followed = frozen
        return _posix(frozen())

    def _own_time(self) -> float:
        if self._followed is not None:  # freezegun stopped: take over where it left off
            with self._lock:
                followed, self._followed = self._followed, None
                if followed is not None:
                    self._now = _posix(followed())
        return self._now

    def _refuse_while_frozen(self, method: str) -> None:
        if _freezegun_time() is not None:
            raise InvalidRequest(
                f"jitbroker_clock follows freezegun while it is active, so {method}() "
                "cannot move it: move freezegun's clock instead (frozen.tick(seconds) or "
                "frozen.move_to(when) on what freeze_time returns, or freezer.tick() / "
                "freezer.move_to() with pytest-freezer)"
            )

    def advance(self, delta: float | timedelta) -> float:
        """Move forward by ``delta`` seconds (refused while freezegun is active)."""
        self._refuse_while_frozen("advance")
        self._own_time()
        return super().advance(delta)

    def set(self, when: float) -> None:
        """Jump to ``when`` (refused while freezegun is active)."""
        self._refuse_while_frozen("set")
        with self._lock:
            self._followed = None
        super().set(when)

    def __repr__(self) -> str:
        if _freezegun_time() is not None:
            return "<FreezegunClock following freezegun>"
        return f"<FreezegunClock {self._now}>"


# -- fixtures ------------------------------------------------------------------------
@pytest.fixture
def jitbroker_clock() -> FreezegunClock:
    """A FakeClock at 2026-01-01T00:00:00Z that follows freezegun while it is active."""
    return FreezegunClock()


@pytest.fixture
def jitbroker_keys() -> KeyRing:
    """A fresh EdDSA key ring."""
    return KeyRing.generate("EdDSA")


@pytest.fixture
def jitbroker_store() -> MemoryStore:
    """A fresh MemoryStore."""
    return MemoryStore()


@pytest.fixture
def jitbroker_broker(
    jitbroker_keys: KeyRing, jitbroker_store: MemoryStore, jitbroker_clock: FakeClock
) -> Iterator[Broker]:
    """A Broker on the test clock, fresh keys and a MemoryStore; closed after the test."""
    broker = Broker(
        issuer=TEST_ISSUER, keys=jitbroker_keys, store=jitbroker_store, clock=jitbroker_clock
    )
    yield broker
    broker.close()


@pytest.fixture
def jitbroker_async_broker(
    jitbroker_keys: KeyRing, jitbroker_store: MemoryStore, jitbroker_clock: FakeClock
) -> Iterator[AsyncBroker]:
    """An AsyncBroker on the same clock, keys and store; closed after the test."""
    broker = AsyncBroker(
        issuer=TEST_ISSUER, keys=jitbroker_keys, store=jitbroker_store, clock=jitbroker_clock
    )
    yield broker
    _close(broker)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _close(broker: AsyncBroker) -> None:
    """Close a fixture AsyncBroker from sync teardown, on the loop its reaper runs
    on if the test left it running there (a loop shared by tests, as pytest-asyncio's
    or anyio's can be), else on a private loop."""
    reaper: asyncio.Task[None] | None = getattr(broker, "_reaper", None)
    loop = None if reaper is None or reaper.done() else reaper.get_loop()
    if loop is None or loop.is_closed():
        _run_private(broker.close)
    elif loop.is_running():  # in another thread
        asyncio.run_coroutine_threadsafe(broker.close(), loop).result()
    else:
        loop.run_until_complete(broker.close())


def _run_private(start: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to its end on a new event loop, never set as the thread's
    current one: the loop of pytest-asyncio or anyio is left as it was."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(start())
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


# -- leak checks ---------------------------------------------------------------------
#: Where each lease of a fixture broker was issued, by lease id (see ``_Origins``).
_ORIGINS: weakref.WeakKeyDictionary[Broker | AsyncBroker, dict[str, str]] = (
    weakref.WeakKeyDictionary()
)


def _describe(lease: Lease, origin: str | None) -> str:
    expires = datetime.fromtimestamp(lease.expires_at, UTC).isoformat(timespec="seconds")
    where = ", ".join(
        f"{name}={value!r}"
        for name, value in (("task", lease.task), ("owner", lease.owner), ("parent", lease.parent))
        if value is not None
    )
    where = f" ({where})" if where else ""
    issued = f", issued at {origin}" if origin is not None else ""
    return (
        f"lease {lease.id} of {lease.subject} for {lease.audience}{where} expires {expires}{issued}"
    )


def _leak_report(broker: Broker | AsyncBroker, leaked: list[Lease]) -> str | None:
    """The failure message for ``leaked`` (None if nothing leaked)."""
    if not leaked:
        return None
    origins = _ORIGINS.get(broker, {})
    lines = "\n  ".join(_describe(lease, origins.get(lease.id)) for lease in leaked)
    return (
        f"{len(leaked)} lease(s) still active at the end of the test "
        f"(revoke them, or issue inside broker.task(...)):\n  {lines}"
    )


def _require_broker(broker: object, caller: str) -> None:
    if not isinstance(broker, Broker | AsyncBroker):
        # The type only: the argument could be a token or a credential.
        raise InvalidRequest(
            f"{caller}() checks a jitbroker Broker or AsyncBroker, not a {type(broker).__name__}"
        )


def _active_leases(broker: Broker | AsyncBroker, caller: str) -> list[Lease]:
    _require_broker(broker, caller)
    if isinstance(broker, Broker):
        return list(broker.leases())
    if _loop_running():  # checked before a coroutine exists: none is left un-awaited
        raise InvalidRequest(
            f"{caller}(AsyncBroker) cannot block inside a running event loop: "
            "use `await assert_no_leaks_async(broker)` there"
        )
    return _run_private(broker.leases)


def assert_no_leaks(broker: Broker | AsyncBroker) -> None:
    """Fail (``AssertionError``) if ``broker`` holds active leases, listing each one:
    a credential that outlived the code that asked for it is a leak.

    Takes a ``Broker``, or an ``AsyncBroker`` when no event loop runs in this
    thread (it then runs the check on a private loop); inside a running loop it
    raises ``InvalidRequest``: ``await assert_no_leaks_async(broker)`` instead.
    """
    report = _leak_report(broker, _active_leases(broker, "assert_no_leaks"))
    if report is not None:
        raise AssertionError(report)


async def assert_no_leaks_async(broker: Broker | AsyncBroker) -> None:
    """``assert_no_leaks`` for async code: awaits an ``AsyncBroker``, takes a ``Broker`` too."""
    _require_broker(broker, "assert_no_leaks_async")
    leaked = await broker.leases() if isinstance(broker, AsyncBroker) else list(broker.leases())
    report = _leak_report(broker, leaked)
    if report is not None:
        raise AssertionError(report)


#: Frames of these top-level packages are never "the code that issued": the
#: broker itself, the test runner, and the stdlib wrappers between them.
_MACHINERY = frozenset(
    {"jitbroker", "_pytest", "pytest", "pluggy", "asyncio", "contextlib", "functools"}
    | {"threading", "concurrent", "anyio", "freezegun", "importlib", "runpy"}
)


class _Origins:
    """An audit sink on a fixture broker recording ``lease id -> file:line`` of the
    test code that issued each lease: the innermost frame in the test's file,
    else the innermost outside jitbroker, pytest and the stdlib wrappers.
    Only fixture brokers get one: nothing is added to any other broker."""

    def __init__(self, test_file: Path, root: Path) -> None:
        self._test_file = str(test_file)
        self._root = root
        self.where: dict[str, str] = {}

    def __call__(self, event: AuditEvent) -> None:
        if event.lease is not None and event.action in (EventType.ISSUED, EventType.ATTENUATED):
            self.where[event.lease.id] = self._caller()

    def _caller(self) -> str:
        frame: FrameType | None = sys._getframe()
        outside: FrameType | None = None
        while frame is not None:
            if frame.f_code.co_filename == self._test_file:
                return self._show(frame)
            module = str(frame.f_globals.get("__name__", "")).partition(".")[0]
            if outside is None and module not in _MACHINERY:
                outside = frame
            frame = frame.f_back
        return "an unknown place" if outside is None else self._show(outside)

    def _show(self, frame: FrameType) -> str:
        path = Path(frame.f_code.co_filename)
        shown = path.relative_to(self._root) if path.is_relative_to(self._root) else path
        return f"{shown.as_posix()}:{frame.f_lineno} in {frame.f_code.co_name}"


def _record_origins(broker: Broker | AsyncBroker, request: pytest.FixtureRequest) -> None:
    if broker in _ORIGINS:  # a wider-scoped override seen again
        return
    origins = _Origins(request.node.path, request.config.rootpath)
    broker.auditor.sinks = (*broker.auditor.sinks, origins)
    _ORIGINS[broker] = origins.where


def _check_at_teardown(broker: Broker | AsyncBroker) -> None:
    report = _leak_report(broker, _active_leases(broker, "assert_no_leaks"))
    if report is not None:
        pytest.fail(report, pytrace=False)  # the plugin's frames would only hide the list


# -- the plugin hooks ----------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "jitbroker_no_leaks",
        "fail every test whose jitbroker_broker or jitbroker_async_broker holds active "
        "leases at its end",
        type="bool",
        default=False,
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{LEAK_MARKER}: fail the test if its jitbroker_broker or jitbroker_async_broker "
        "holds active leases at its end",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # The marker checks the fixture brokers only: on a test without one it
    # would pass whatever the test leaked, so it is an error, not a no-op.
    if item.get_closest_marker(LEAK_MARKER) is None:
        return
    used = getattr(item, "fixturenames", ())
    if not any(name in used for name in BROKER_FIXTURES):
        pytest.fail(
            f"{item.nodeid} is marked {LEAK_MARKER} but uses neither the jitbroker_broker "
            "nor the jitbroker_async_broker fixture, so the marker would check nothing: "
            "use one of those fixtures, or drop the marker and call "
            "jitbroker.testing.assert_no_leaks(broker) on the broker the test builds",
            pytrace=False,
        )


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[object], request: pytest.FixtureRequest
) -> Generator[None, object, object]:
    # Check when the broker fixture is torn down, not when the test body ends:
    # fixtures that use the broker are torn down first (a yield fixture around
    # ``broker.task(...)`` has revoked its leases by then). Registered after the
    # fixture ran, so the check runs before the fixture's own teardown closes it.
    broker = yield
    if fixturedef.argname in BROKER_FIXTURES and isinstance(broker, Broker | AsyncBroker):
        _record_origins(broker, request)
        node = request.node
        if node.get_closest_marker(LEAK_MARKER) is not None or node.config.getini(
            "jitbroker_no_leaks"
        ):
            request.addfinalizer(lambda: _check_at_teardown(broker))
    return broker
