"""The policy sees the caller: ``calling(...)`` and the ``caller(...)`` condition,
and the path-aware ``glob_match`` they (and trust rules) use."""

from __future__ import annotations

import asyncio
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jitbroker import Broker, KeyRing, MemoryStore, Policy, Rule
from jitbroker.errors import InvalidRequest, PolicyDenied
from jitbroker.policy import AccessRequest, caller, calling, glob_match
from jitbroker.testing import FakeClock

GITHUB = "https://token.actions.githubusercontent.com"


def broker(policy: Policy) -> Broker:
    return Broker("urn:test", KeyRing.generate(), MemoryStore(), policy, clock=FakeClock(1e6))


def ci_policy() -> Policy:
    return Policy([
        Rule(subjects=["svc:ci:*"], audiences=["orders"], scopes=["orders:read"],
             conditions=[caller(issuer=GITHUB, repository="acme/*")]),
    ])  # fmt: skip


def test_a_rule_with_a_caller_condition_judges_who_asks() -> None:
    b = broker(ci_policy())
    who = {"issuer": GITHUB, "repository": "acme/app", "rule": "github"}
    with calling(who):
        cred = b.issue("svc:ci:acme/app", "orders", ["orders:read"], ttl=60)
    assert cred.lease.subject == "svc:ci:acme/app"
    with calling({**who, "repository": "evil/app"}), pytest.raises(PolicyDenied) as denied:
        b.issue("svc:ci:acme/app", "orders", ["orders:read"], ttl=60)
    assert "caller" in str(denied.value)
    # A direct call (no caller at all) never matches a caller condition.
    with pytest.raises(PolicyDenied):
        b.issue("svc:ci:acme/app", "orders", ["orders:read"], ttl=60)


def test_the_caller_is_the_blocks_own_and_nests() -> None:
    seen: list[dict[str, str]] = []

    def remember(request: AccessRequest) -> bool:
        seen.append(dict(request.caller))
        return True

    b = broker(Policy([Rule(subjects=["*"], audiences=["*"], scopes=["*"], conditions=[remember])]))
    with calling({"subject": "outer"}):
        with calling({"subject": "inner"}):
            b.issue("s", "a", ttl=60)
        b.issue("s", "a", ttl=60)
    b.issue("s", "a", ttl=60)
    assert seen == [{"subject": "inner"}, {"subject": "outer"}, {}]

    # Another thread inside no block sees no caller, whatever this one does.
    with calling({"subject": "here"}):
        thread = threading.Thread(target=b.issue, args=("s", "a"), kwargs={"ttl": 60})
        thread.start()
        thread.join()
    assert seen[-1] == {}

    async def task(name: str) -> None:
        with calling({"subject": name}):
            await asyncio.sleep(0)
            b.issue("s", "a", ttl=60)

    async def both() -> None:
        await asyncio.gather(task("one"), task("two"))

    asyncio.run(both())
    assert sorted(s["subject"] for s in seen[-2:]) == ["one", "two"]


def test_calling_and_caller_refuse_what_is_not_text() -> None:
    with pytest.raises(InvalidRequest), calling({"subject": 1}):  # type: ignore[dict-item]
        pass
    with pytest.raises(InvalidRequest):
        caller()
    with pytest.raises(InvalidRequest):
        caller(issuer="")


def test_a_policy_file_spells_a_caller_condition(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "policy.toml"
    path.write_text(
        '[[rules]]\nname = "ci"\nsubjects = ["svc:ci:*"]\naudiences = ["orders"]\n'
        f'scopes = ["orders:read"]\ncaller = {{ issuer = "{GITHUB}", ref = "refs/heads/main" }}\n'
    )
    b = broker(Policy.from_toml(path))
    with calling({"issuer": GITHUB, "ref": "refs/heads/main"}):
        b.issue("svc:ci:x", "orders", ["orders:read"], ttl=60)
    with calling({"issuer": GITHUB, "ref": "refs/heads/dev"}), pytest.raises(PolicyDenied):
        b.issue("svc:ci:x", "orders", ["orders:read"], ttl=60)
    path.write_text('[[rules]]\nsubjects = ["*"]\naudiences = ["*"]\ncaller = "x"\n')
    with pytest.raises(InvalidRequest, match="caller"):
        Policy.from_toml(path)


@pytest.mark.parametrize(
    ("pattern", "value", "matches"),
    [
        ("acme/*", "acme/app", True),
        ("acme/*", "acme/x/y", False),
        ("acme/**", "acme/x/y", True),
        ("acme/*", "acme/x/../y", False),
        ("acme/**", "acme/x/../y", False),
        ("acme/**", "acme/./y", False),
        ("acme/*", "acme/", False),
        ("acme/**", "acme//y", False),
        ("acme/*", "acme/%2e%2e", False),
        ("acme/*", "acme/a\nb", False),
        ("acme/*", "acme/a\\b", False),
        ("refs/heads/*", "refs/heads/main", True),
        ("refs/heads/main", "refs/heads/main", True),
        ("refs/heads/main", "refs/heads/mai", False),
        ("a.b", "aXb", False),  # everything but the wildcards is literal
        ("[ab]", "a", False),
        ("v?", "v1", True),
    ],
)
def test_glob_match(pattern: str, value: str, matches: bool) -> None:
    assert glob_match(pattern, value) is matches


segment = st.text(alphabet="abcxyz-_.", min_size=1, max_size=6).filter(
    lambda s: s not in {".", ".."}
)


@given(st.lists(segment, min_size=1, max_size=4), st.lists(segment, min_size=1, max_size=4))
def test_a_single_star_never_crosses_a_segment(head: list[str], tail: list[str]) -> None:
    value = "/".join([*head, *tail])
    prefix = "/".join(head)
    assert glob_match(prefix + "/*", value) is (len(tail) == 1)
    assert glob_match(prefix + "/**", value)
