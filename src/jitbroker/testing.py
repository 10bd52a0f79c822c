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

Example::

    def test_expiry(jitbroker_broker, jitbroker_clock):
        cred = jitbroker_broker.issue("svc:test", "api", ["read"], ttl=30)
        jitbroker_clock.advance(31)
        assert [l.id for l in jitbroker_broker.sweep()] == [cred.lease_id]

freezegun works too: a broker built without ``clock=`` reads ``time.time()``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest

from .broker import Broker
from .keyring import KeyRing
from .stores.memory import MemoryStore

__all__ = ["TEST_ISSUER", "FakeClock"]

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
