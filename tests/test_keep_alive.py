"""``cred.keep_alive()``: a short TTL kept alive while the block runs, sync and async."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from jitbroker import AsyncBroker, Broker
from jitbroker.errors import InvalidRequest, LeaseNotActive, RenewalDenied
from jitbroker.keepalive import KeepAlive
from jitbroker.testing import FakeClock


def until(condition: object, timeout: float = 5.0) -> None:
    """Wait (briefly, polling) for a background renewal to happen."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out waiting for a renewal"
        time.sleep(0.002)


def test_a_kept_alive_credential_outlives_its_ttl() -> None:
    clock = FakeClock()
    broker = Broker(clock=clock)
    cred = broker.issue("svc:job", "api", ttl=30)
    with cred.keep_alive(every=0.005) as live:
        assert isinstance(live, KeepAlive)
        for step in range(1, 4):
            clock.advance(20)  # past the first expiry: only the renewals keep it
            until(lambda step=step: live.lease.expires_at >= clock() + 29)
            broker.verify(live.token, audience="api")
    assert live.renewals >= 3
    assert "token" not in repr(live)
    assert live.token not in repr(live)


def test_renewal_stops_quietly_at_the_cap_or_when_revoked() -> None:
    clock = FakeClock()
    broker = Broker(clock=clock)
    capped = broker.issue("svc:job", "api", ttl=30, max_ttl=40)
    with capped.keep_alive(every=0.005) as live:
        clock.advance(15)
        until(lambda: live.stopped is not None)
    assert isinstance(live.stopped, RenewalDenied)
    revoked = broker.issue("svc:job", "api", ttl=30)
    with revoked.keep_alive(every=0.005) as live:
        broker.revoke(revoked)
        until(lambda: live.stopped is not None)
    assert isinstance(live.stopped, LeaseNotActive)


def test_renewal_stops_when_the_policy_refuses_it() -> None:
    from jitbroker import Policy, Rule
    from jitbroker.errors import PolicyDenied

    clock = FakeClock()
    broker = Broker(clock=clock, policy=Policy([Rule(["svc:*"], ["api"], ["read"], max_ttl=60)]))
    cred = broker.issue("svc:job", "api", ["read"], ttl=30)
    with cred.keep_alive(every=0.005, ttl=120) as live:  # more than the rule's max_ttl
        until(lambda: live.stopped is not None)
    assert isinstance(live.stopped, PolicyDenied)


def test_a_store_blip_is_retried_at_the_next_tick() -> None:
    clock = FakeClock()
    broker = Broker(clock=clock)
    cred = broker.issue("svc:job", "api", ttl=30)
    real = broker.renew
    failures = threading.Event()

    def flaky(*args: object, **kwargs: object) -> object:
        if not failures.is_set():
            failures.set()
            raise ConnectionError("blip")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    broker.renew = flaky  # type: ignore[assignment,method-assign]
    with cred.keep_alive(every=0.005) as live:
        until(lambda: live.renewals >= 1)
    assert failures.is_set()
    assert live.stopped is None


def test_bad_intervals_and_brokers_are_refused() -> None:
    async_cred = asyncio.run(AsyncBroker().issue("svc:a", "api", ttl=30))
    with pytest.raises(InvalidRequest, match="async with"), async_cred.keep_alive():
        pass
    cred = Broker().issue("svc:a", "api", ttl=30)
    with pytest.raises(InvalidRequest, match="shorter than the ttl"):
        cred.keep_alive(every=30)


def test_async_keep_alive() -> None:
    clock = FakeClock()

    async def main() -> int:
        broker = AsyncBroker(clock=clock)
        cred = await broker.issue("svc:job", "api", ttl=30)
        async with cred.keep_alive(every=0.005) as live:
            for _ in range(3):
                clock.advance(20)
                while live.lease.expires_at < clock() + 29:
                    await asyncio.sleep(0.002)
                await broker.verify(live.token, audience="api")
        return live.renewals

    assert asyncio.run(main()) >= 3
