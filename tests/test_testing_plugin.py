"""The pytest plugin and helpers of ``jitbroker.testing`` (issue 13, test helpers).

The plugin is exercised as users get it: ``pytester`` writes small test files
and runs them in a subprocess, with the plugin loaded from its ``pytest11``
entry point, next to real freezegun (and anyio's plugin, which is installed
with the web extra). The helpers themselves are also tested in-process.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import timedelta

import pytest
from freezegun import freeze_time

from jitbroker import AsyncBroker, Broker, KeyRing
from jitbroker.errors import InvalidRequest
from jitbroker.testing import (
    DEFAULT_START,
    TEST_ISSUER,
    FakeClock,
    FreezegunClock,
    assert_no_leaks,
    assert_no_leaks_async,
)

#: 2026-03-01T12:00:00Z, the instant the freezegun scenarios freeze at.
MARCH = 1_772_366_400.0


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # -W error: an un-awaited coroutine or a task destroyed pending fails the run.
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error", *args)


def line_of(code: str, tag: str) -> int:
    """The line of ``code`` that carries the comment ``# <tag>``, counted as in the
    file ``pytester.makepyfile(code)`` writes (without the leading blank lines)."""
    lines = code.lstrip("\n").splitlines()
    [number] = [i for i, line in enumerate(lines, 1) if line.endswith(f"# {tag}")]
    return number


# -- freezegun: the fixtures follow it -------------------------------------------------
FROZEN = """
import asyncio

import pytest
from freezegun import freeze_time

from jitbroker.errors import InvalidRequest, TokenExpired

MARCH = 1_772_366_400.0


@pytest.fixture
def freezer():
    # What pytest-freezer's fixture is: a freeze_time active around the test.
    with freeze_time("2026-03-01 12:00:00") as frozen:
        yield frozen


@freeze_time("2026-03-01 12:00:00", as_kwarg="frozen")
def test_decorator(jitbroker_broker, frozen=None):
    # The decorator is entered after the fixtures were set up.
    cred = jitbroker_broker.issue("svc:a", "api", ["read"], ttl=30)
    assert cred.lease.issued_at == MARCH
    frozen.tick(29)
    assert jitbroker_broker.verify(cred.token, audience="api")
    frozen.tick(2)
    with pytest.raises(TokenExpired):
        jitbroker_broker.verify(cred.token, audience="api")


def test_context_manager(jitbroker_broker, jitbroker_clock):
    with freeze_time("2026-03-01 12:00:00") as frozen:
        cred = jitbroker_broker.issue("svc:a", "api", ["read"], ttl=30)
        assert cred.lease.issued_at == MARCH
        frozen.tick(31)
        with pytest.raises(TokenExpired):
            jitbroker_broker.verify(cred.token, audience="api")
        with pytest.raises(InvalidRequest, match="move freezegun's clock instead"):
            jitbroker_clock.advance(1)
    assert jitbroker_clock() == MARCH + 31  # where freezegun left it
    assert jitbroker_clock.advance(9) == MARCH + 40


def test_freezer_fixture_set_up_after_the_broker(jitbroker_broker, freezer):
    cred = jitbroker_broker.issue("svc:a", "api", ["read"], ttl=30)
    freezer.tick(31)
    with pytest.raises(TokenExpired):
        jitbroker_broker.verify(cred.token, audience="api")


def test_freezer_fixture_set_up_first(freezer, jitbroker_broker):
    cred = jitbroker_broker.issue("svc:a", "api", ["read"], ttl=30)
    assert cred.lease.issued_at == MARCH
    freezer.move_to("2026-03-01 12:00:31")
    with pytest.raises(TokenExpired):
        jitbroker_broker.verify(cred.token, audience="api")


@freeze_time("2026-03-01 12:00:00", as_kwarg="frozen")
def test_async_broker_follows_too(jitbroker_async_broker, frozen=None):
    async def main():
        cred = await jitbroker_async_broker.issue("svc:a", "api", ["read"], ttl=30)
        assert cred.lease.issued_at == MARCH
        frozen.tick(31)
        with pytest.raises(TokenExpired):
            await jitbroker_async_broker.verify(cred.token, audience="api")

    asyncio.run(main())


def test_without_freezegun_the_clock_is_the_fake_one(jitbroker_broker, jitbroker_clock):
    cred = jitbroker_broker.issue("svc:a", "api", ["read"], ttl=30)
    assert cred.lease.issued_at == 1_767_225_600.0
    jitbroker_clock.advance(31)
    with pytest.raises(TokenExpired):
        jitbroker_broker.verify(cred.token, audience="api")
"""


def test_fixtures_follow_freezegun_decorator_context_and_freezer(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_frozen=FROZEN)
    result = run(pytester)
    result.assert_outcomes(passed=6)


FROZEN_LEAKS = """
import pytest
from freezegun import freeze_time


@pytest.mark.jitbroker_no_leaks
@freeze_time("2020-01-01 00:00:00")
def test_leak_while_frozen_in_the_past(jitbroker_broker):
    # Before the fake clock's start: were the check to jump back to its own
    # time, the lease would look expired in 2026 and the leak would be missed.
    jitbroker_broker.issue("svc:a", "api", ["read"], ttl=60, task="t-frozen-leak")


@pytest.mark.jitbroker_no_leaks
@freeze_time("2030-01-01 00:00:00", as_kwarg="frozen")
def test_expired_while_frozen_is_no_leak(jitbroker_broker, frozen=None):
    jitbroker_broker.issue("svc:a", "api", ["read"], ttl=60)
    frozen.tick(61)
"""


def test_the_leak_check_judges_at_the_time_freezegun_left(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_frozen_leaks=FROZEN_LEAKS)
    result = run(pytester)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leak_while_frozen_in_the_past*",
            "*t-frozen-leak*expires 2020-01-01T00:01:00+00:00*",
        ]
    )


def test_freezegun_clock_in_process() -> None:
    clock = FreezegunClock()
    assert clock() == DEFAULT_START
    assert clock.advance(timedelta(seconds=10)) == DEFAULT_START + 10
    with freeze_time("2026-03-01 12:00:00") as frozen:
        assert clock() == MARCH
        assert repr(clock) == "<FreezegunClock following freezegun>"
        frozen.tick(1.5)
        assert clock() == MARCH + 1.5
        for move in (lambda: clock.advance(1), lambda: clock.set(0)):
            with pytest.raises(InvalidRequest, match=r"frozen\.tick"):
                move()
        with freeze_time("2026-03-02 00:00:00"):  # nested: the innermost wins
            assert clock() == MARCH + 12 * 3600
        assert clock() == MARCH + 1.5
    assert clock() == MARCH + 1.5
    clock.set(DEFAULT_START)
    assert clock() == DEFAULT_START
    assert repr(clock) == f"<FreezegunClock {DEFAULT_START}>"


def test_a_plain_fake_clock_ignores_freezegun() -> None:
    clock = FakeClock()
    with freeze_time("2026-03-01 12:00:00"):
        assert clock() == DEFAULT_START
        assert clock.advance(1) == DEFAULT_START + 1


# -- the async fixture and async leak checks ----------------------------------------
ASYNC = """
import asyncio

import pytest

from jitbroker.errors import InvalidRequest
from jitbroker.testing import assert_no_leaks, assert_no_leaks_async


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"  # AsyncBroker is asyncio code


@pytest.fixture
def open_loop():
    # A loop that outlives the test, as pytest-asyncio's session-scoped one does.
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.mark.jitbroker_no_leaks
def test_plain_pytest_drives_its_own_loop(jitbroker_async_broker):
    async def main():
        broker = jitbroker_async_broker
        async with broker.task("t", subject="svc:a", audience="api", ttl=60) as cred:
            assert await broker.verify(cred.token, audience="api")

    asyncio.run(main())
    assert_no_leaks(jitbroker_async_broker)


@pytest.mark.jitbroker_no_leaks
def test_plain_leak(jitbroker_async_broker):
    broker = jitbroker_async_broker
    asyncio.run(broker.issue("svc:a", "api", ttl=60, task="t-plain-leak"))  # plain-leak


@pytest.mark.anyio
@pytest.mark.jitbroker_no_leaks
async def test_anyio_cleans_up(jitbroker_async_broker):
    async with jitbroker_async_broker.task("t", subject="svc:a", audience="api", ttl=60):
        pass
    await assert_no_leaks_async(jitbroker_async_broker)
    with pytest.raises(InvalidRequest, match="await assert_no_leaks_async"):
        assert_no_leaks(jitbroker_async_broker)


@pytest.mark.anyio
@pytest.mark.jitbroker_no_leaks
async def test_anyio_leak(jitbroker_async_broker):
    await jitbroker_async_broker.issue("svc:a", "api", ttl=60, task="t-anyio-leak")  # anyio-leak


@pytest.mark.anyio
async def test_anyio_reaper_left_running(jitbroker_async_broker):
    # Closed at teardown on the loop the reaper runs on: anyio keeps it open.
    await jitbroker_async_broker.start()


def test_plain_reaper_started_in_a_loop_that_ended(jitbroker_async_broker):
    async def main():
        await jitbroker_async_broker.start()

    asyncio.run(main())


def test_reaper_left_running_on_a_loop_still_open(open_loop, jitbroker_async_broker):
    # Closed at teardown on that loop: from any other, awaiting the reaper fails.
    open_loop.run_until_complete(jitbroker_async_broker.start())


def test_both_brokers_share_the_store(jitbroker_broker, jitbroker_async_broker):
    cred = jitbroker_broker.issue("svc:a", "api", ttl=60)
    assert asyncio.run(jitbroker_async_broker.verify(cred.token, audience="api"))
    jitbroker_broker.revoke(cred)
    assert_no_leaks(jitbroker_async_broker)
"""


def test_async_fixture_with_plain_pytest_and_anyio(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_async=ASYNC)
    result = run(pytester)
    result.assert_outcomes(passed=8, errors=2)
    result.stdout.fnmatch_lines_random(
        [
            "*ERROR at teardown of test_plain_leak*",
            "*ERROR at teardown of test_anyio_leak*",
            f"*t-plain-leak*issued at test_async.py:{line_of(ASYNC, 'plain-leak')} in "
            "test_plain_leak*",
            f"*t-anyio-leak*issued at test_async.py:{line_of(ASYNC, 'anyio-leak')} in "
            "test_anyio_leak*",
        ]
    )
    result.stdout.no_fnmatch_line("*Traceback*")


def async_broker() -> AsyncBroker:
    return AsyncBroker(issuer=TEST_ISSUER, keys=KeyRing.generate(), clock=FakeClock())


def test_assert_no_leaks_drives_an_async_broker_outside_a_loop() -> None:
    broker = async_broker()
    assert_no_leaks(broker)
    cred = asyncio.run(broker.issue("svc:a", "api", ["read"], 60, task="job-1"))
    with pytest.raises(AssertionError, match=r"1 lease\(s\) still active") as info:
        assert_no_leaks(broker)
    assert cred.lease_id in str(info.value)
    assert cred.token not in str(info.value)
    asyncio.run(broker.revoke(cred))
    assert_no_leaks(broker)


def test_inside_a_running_loop_assert_no_leaks_says_to_await_the_async_one() -> None:
    broker = async_broker()

    async def main() -> None:
        with pytest.raises(InvalidRequest, match=r"await assert_no_leaks_async\(broker\)"):
            assert_no_leaks(broker)
        await assert_no_leaks_async(broker)
        cred = await broker.issue("svc:a", "api", ["read"], 60)
        with pytest.raises(AssertionError, match=cred.lease_id):
            await assert_no_leaks_async(broker)

    asyncio.run(main())


def test_assert_no_leaks_async_takes_a_sync_broker_too() -> None:
    broker = Broker(issuer=TEST_ISSUER, keys=KeyRing.generate(), clock=FakeClock())
    cred = broker.issue("svc:a", "api", ["read"], 60)
    with pytest.raises(AssertionError, match=cred.lease_id):
        asyncio.run(assert_no_leaks_async(broker))
    broker.revoke(cred)
    asyncio.run(assert_no_leaks_async(broker))


@pytest.mark.parametrize("wrong", [None, "eyJhbGciOiJFZERTQSJ9.e30.c2ln", KeyRing])
def test_a_wrong_argument_is_a_clear_error_naming_its_type(wrong: object) -> None:
    given = type(wrong).__name__
    with pytest.raises(InvalidRequest, match=f"Broker or AsyncBroker, not a {given}$") as info:
        assert_no_leaks(wrong)  # type: ignore[arg-type]
    assert "eyJ" not in str(info.value)
    with pytest.raises(InvalidRequest, match=f"not a {given}$"):
        asyncio.run(assert_no_leaks_async(wrong))  # type: ignore[arg-type]


# -- the marker needs a fixture broker -----------------------------------------------
MARKED = """
import pytest

from jitbroker import Broker
from jitbroker.testing import assert_no_leaks


@pytest.mark.jitbroker_no_leaks
def test_builds_its_own_broker():
    broker = Broker()
    broker.issue("svc:a", "api", ttl=60)


@pytest.fixture
def cred(jitbroker_broker):
    with jitbroker_broker.task("t", subject="svc:a", audience="api", ttl=60) as c:
        yield c


@pytest.mark.jitbroker_no_leaks
def test_uses_the_broker_through_a_fixture(cred):
    assert cred.lease.task == "t"


def test_checks_its_own_broker_by_hand():
    broker = Broker()
    with broker.task("t", subject="svc:a", audience="api", ttl=60):
        pass
    assert_no_leaks(broker)
"""


def test_the_marker_without_a_fixture_broker_is_an_error_at_setup(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_marked=MARKED)
    result = run(pytester)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_builds_its_own_broker*",
            "*test_marked.py::test_builds_its_own_broker is marked jitbroker_no_leaks but "
            "uses neither the jitbroker_broker nor the jitbroker_async_broker fixture*",
        ]
    )
    result.stdout.fnmatch_lines(["*call jitbroker.testing.assert_no_leaks(broker)*"])
    result.stdout.no_fnmatch_line("*Traceback*")


def test_the_ini_option_leaves_tests_without_a_fixture_broker_alone(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_unmarked="""
        from jitbroker import Broker

        def test_builds_its_own_broker():
            Broker().issue("svc:a", "api", ttl=60)
        """
    )
    pytester.makeini("[pytest]\njitbroker_no_leaks = true\n")
    run(pytester).assert_outcomes(passed=1)


# -- a leak report says where each lease was issued ------------------------------------
ORIGINS = """
import pytest


def helper(broker):
    return broker.issue("svc:helper", "api", ["read"], ttl=60)  # helper


@pytest.mark.jitbroker_no_leaks
def test_leaks(jitbroker_broker, from_conftest):
    parent = jitbroker_broker.issue("svc:parent", "api", ["read"], ttl=60)  # parent
    jitbroker_broker.attenuate(parent, scopes=["read"], ttl=30)  # child
    helper(jitbroker_broker)
"""

CONFTEST = """
import pytest


@pytest.fixture
def from_conftest(jitbroker_broker):
    return jitbroker_broker.issue("svc:conftest", "api", ttl=60)  # conftest
"""


def test_a_leak_report_names_the_line_that_issued_each_lease(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_origins=ORIGINS)
    result = run(pytester)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines_random(
        [
            "*4 lease(s) still active*",
            f"*svc:conftest*issued at conftest.py:{line_of(CONFTEST, 'conftest')} in from_conftest",
            f"*svc:parent*issued at test_origins.py:{line_of(ORIGINS, 'parent')} in test_leaks",
            f"*svc:parent*parent=*issued at test_origins.py:{line_of(ORIGINS, 'child')} in "
            "test_leaks",
            f"*svc:helper*issued at test_origins.py:{line_of(ORIGINS, 'helper')} in helper",
        ]
    )


def test_a_broker_of_its_own_reports_leaks_without_a_place() -> None:
    broker = Broker(issuer=TEST_ISSUER, keys=KeyRing.generate(), clock=FakeClock())
    broker.issue("svc:a", "api", ["read"], 60)
    with pytest.raises(AssertionError) as info:
        assert_no_leaks(broker)
    assert "issued at" not in str(info.value)
    assert broker.auditor.sinks == ()  # nothing is added to a broker the plugin did not build


def test_the_fixture_broker_records_places_for_a_check_by_hand(jitbroker_broker: Broker) -> None:
    jitbroker_broker.issue("svc:a", "api", ["read"], 60)  # by-hand
    with pytest.raises(AssertionError) as info:
        assert_no_leaks(jitbroker_broker)
    where = f"issued at tests/test_testing_plugin.py:{_line_of_this_file('by-hand')} in "
    assert where + "test_the_fixture_broker_records_places_for_a_check_by_hand" in str(info.value)
    jitbroker_broker.revoke_where(subject="svc:a")


def _line_of_this_file(tag: str) -> int:
    with open(__file__, encoding="utf-8") as source:
        return line_of(source.read(), tag)


# -- packaging ---------------------------------------------------------------------------
def test_import_jitbroker_does_not_import_pytest_or_freezegun() -> None:
    probe = "import sys, jitbroker; print(sorted({'pytest', 'freezegun'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"
