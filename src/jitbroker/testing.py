"""Testing helpers: a fake clock and a pytest plugin (loaded automatically).

Fixtures (all function-scoped):

``jitbroker_clock``
    A ``FakeClock`` starting at a fixed time; move it with ``advance()``.
``jitbroker_keys``
    A fresh EdDSA ``KeyRing``.
``jitbroker_store``
    A fresh ``MemoryStore``.
``jitbroker_broker``
    A ``Broker`` on those three (issuer ``urn:jitbroker:test``).

Leak detection: a test marked ``@pytest.mark.jitbroker_no_leaks`` (or every
test, with ``jitbroker_no_leaks = true`` in the pytest ini options) fails if
its ``jitbroker_broker`` still holds active leases when that fixture is torn
down, and the failure lists them. That is after the test body and after every
fixture that uses the broker (or was set up after it) has been torn down, so a
yield fixture that wraps the test in ``broker.task(...)`` is not a leak; the
failure is reported as an error at the test's teardown. The check also covers
a ``jitbroker_broker`` fixture you override, and runs before its teardown
closes the broker. ``assert_no_leaks(broker)`` does the same check for a
broker you built yourself.

Example::

    def test_expiry(jitbroker_broker, jitbroker_clock):
        cred = jitbroker_broker.issue("svc:test", "api", ["read"], ttl=30)
        jitbroker_clock.advance(31)
        assert [l.id for l in jitbroker_broker.sweep()] == [cred.lease_id]

freezegun works too: a broker built without ``clock=`` reads ``time.time()``.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from .broker import Broker
from .keyring import KeyRing
from .lease import Lease
from .stores.memory import MemoryStore

__all__ = ["TEST_ISSUER", "FakeClock", "assert_no_leaks"]

LEAK_MARKER = "jitbroker_no_leaks"

TEST_ISSUER = "urn:jitbroker:test"
#: 2026-01-01T00:00:00Z: a fixed, realistic starting point.
DEFAULT_START = 1_767_225_600.0


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


@pytest.fixture
def jitbroker_clock() -> FakeClock:
    """A FakeClock at 2026-01-01T00:00:00Z."""
    return FakeClock()


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
    """A Broker on the fake clock, fresh keys and a MemoryStore; closed after the test."""
    broker = Broker(
        issuer=TEST_ISSUER, keys=jitbroker_keys, store=jitbroker_store, clock=jitbroker_clock
    )
    yield broker
    broker.close()


def _describe(lease: Lease) -> str:
    expires = datetime.fromtimestamp(lease.expires_at, UTC).isoformat(timespec="seconds")
    where = ", ".join(
        f"{name}={value!r}"
        for name, value in (("task", lease.task), ("owner", lease.owner), ("parent", lease.parent))
        if value is not None
    )
    return f"lease {lease.id} of {lease.subject} for {lease.audience} ({where}) expires {expires}"


def assert_no_leaks(broker: Broker) -> None:
    """Fail (``AssertionError``) if ``broker`` holds active leases, listing each one:
    a credential that outlived the code that asked for it is a leak."""
    leaked = list(broker.leases())
    if leaked:
        lines = "\n  ".join(_describe(lease) for lease in leaked)
        raise AssertionError(
            f"{len(leaked)} lease(s) still active at the end of the test "
            f"(revoke them, or issue inside broker.task(...)):\n  {lines}"
        )


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "jitbroker_no_leaks",
        "fail every test whose jitbroker_broker holds active leases at its end",
        type="bool",
        default=False,
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{LEAK_MARKER}: fail the test if its jitbroker_broker holds active leases at its end",
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
    node = request.node
    if (
        fixturedef.argname == "jitbroker_broker"
        and isinstance(broker, Broker)
        and (
            node.get_closest_marker(LEAK_MARKER) is not None
            or node.config.getini("jitbroker_no_leaks")
        )
    ):
        request.addfinalizer(lambda: assert_no_leaks(broker))
    return broker
