"""Policy and Rule: least-privilege checks on issue, renewal and attenuation."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jitbroker import Broker, KeyRing, Lease, MemoryStore, Policy, PolicyDenied, Rule
from jitbroker.errors import InvalidRequest, JitBrokerError
from jitbroker.policy import covers
from jitbroker.testing import TEST_ISSUER, FakeClock


def grant(
    subjects: str | list[str],
    audiences: str | list[str],
    scopes: Iterable[str] = (),
    **options: Any,
) -> Rule:
    """``Rule(...)`` with the grants first, for compact tables of rules."""
    return Rule(subjects=subjects, audiences=audiences, scopes=scopes, **options)


def policy(*rules: Rule) -> Policy:
    """``Policy(rules)`` from positional rules."""
    return Policy(rules)


CI = grant(
    subjects="svc:ci-*",
    audiences=["db:orders"],
    scopes=["orders:read", "orders:write"],
    name="ci",
)


def make_broker(
    clock: FakeClock, *rules: Rule, keys: KeyRing | None = None, store: MemoryStore | None = None
) -> Broker:
    return Broker(
        issuer=TEST_ISSUER,
        keys=keys if keys is not None else KeyRing.generate(),
        store=store,
        policy=policy(*rules),
        clock=clock,
    )


@pytest.fixture
def ci_broker(jitbroker_clock: FakeClock) -> Iterator[Broker]:
    broker = make_broker(jitbroker_clock, CI)
    yield broker
    broker.close()


PROPOSED = Lease(
    id="0" * 32,
    subject="svc:ci-deploy",
    audience="db:orders",
    scopes=("orders:read",),
    issued_at=1000.0,
    expires_at=1060.0,
    max_expires_at=1060.0,
    renewable=False,
)


def lease(**fields: Any) -> Lease:
    """A proposed lease for ``Policy.evaluate``: ``PROPOSED`` with ``fields`` changed."""
    return attrs.evolve(PROPOSED, **fields)


def denied(
    broker: Broker, subject: str, audience: str, scopes: list[str], **kw: Any
) -> tuple[str, ...]:
    """Issue; assert the policy refuses it; return the reasons."""
    with pytest.raises(PolicyDenied) as info:
        broker.issue(subject, audience, scopes, **kw)
    return info.value.reasons


# -- covers() ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pattern", "value"),
    [
        ("orders:read", "orders:read"),
        ("orders:*", "orders:read"),
        ("orders:*", "orders:read:all"),
        ("orders*", "orders:read"),
        ("*", "anything"),
        ("db:*", "db:orders"),
        ("a*b*", "a*bc"),
    ],
)
def test_covers(pattern: str, value: str) -> None:
    assert covers(pattern, value)


@pytest.mark.parametrize(
    ("pattern", "value"),
    [
        ("orders:read", "orders:write"),
        ("orders:read", "orders:readall"),
        ("orders:read", "orders:rea"),
        ("orders:*", "payments:read"),
        ("orders:*", "orders"),
        ("orders:*", "ORDERS:read"),
        ("Orders:*", "orders:read"),
        ("*:read", "orders:read"),  # only a trailing * is a wildcard
        ("a*b", "axb"),
        ("orders:read", "orders:*"),  # an exact grant does not cover a wildcard request
        ("", "orders:read"),
    ],
)
def test_does_not_cover(pattern: str, value: str) -> None:
    assert not covers(pattern, value)


def test_covers_star_in_the_middle_is_literal() -> None:
    assert covers("a*b", "a*b")


# -- Rule construction ---------------------------------------------------------------
def test_rule_accepts_single_strings() -> None:
    rule = Rule(subjects="svc:a", audiences="db")
    assert rule.subjects == ("svc:a",)
    assert rule.audiences == ("db",)
    assert rule.scopes == ()
    assert rule.max_ttl is None


def test_rule_max_ttl_accepts_timedelta() -> None:
    assert Rule(subjects="s", audiences="a", max_ttl=timedelta(minutes=2)).max_ttl == 120.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("subjects", []),
        ("subjects", ""),
        ("subjects", [""]),
        ("subjects", [1]),
        ("audiences", ()),
        ("audiences", [None]),
    ],
)
def test_rule_needs_subjects_and_audiences(field: str, value: object) -> None:
    kwargs: dict[str, object] = {"subjects": "svc:a", "audiences": "db", field: value}
    with pytest.raises(InvalidRequest, match=field):
        Rule(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("max_ttl", [0, -1, float("nan"), True, "60"])
def test_rule_bad_max_ttl(max_ttl: object) -> None:
    with pytest.raises(InvalidRequest, match="max_ttl"):
        Rule(subjects="s", audiences="a", max_ttl=max_ttl)


def test_rule_scopes_as_one_string_never_grants_everything(jitbroker_clock: FakeClock) -> None:
    try:
        rule = grant(subjects="svc:x", audiences="db", scopes="orders:*")
    except InvalidRequest:
        return  # refusing a bare str is fine too
    broker = make_broker(jitbroker_clock, rule)
    assert broker.issue("svc:x", "db", ["orders:read"]).lease.scopes == ("orders:read",)
    with pytest.raises(PolicyDenied):
        broker.issue("svc:x", "db", ["payments:write"])


# -- Policy.evaluate, without a broker ---------------------------------------------------
def test_evaluate_allowed_names_the_rule() -> None:
    decision = policy(CI).evaluate(lease())
    assert decision.allowed
    assert decision.rule is CI
    assert decision.reasons == ()


def test_evaluate_denied_has_reasons() -> None:
    decision = policy(CI).evaluate(lease(audience="db:payments"))
    assert not decision.allowed
    assert decision.rule is None
    assert decision.reasons == ("ci does not grant audience 'db:payments'",)


def test_evaluate_first_granting_rule_wins() -> None:
    narrow = grant(subjects="svc:ci-deploy", audiences="db:orders", scopes=["orders:read"])
    decision = policy(narrow, CI).evaluate(lease(scopes=("orders:write",)))
    assert decision.allowed
    assert decision.rule is CI


def test_empty_policy_denies_everything() -> None:
    decision = policy().evaluate(lease())
    assert not decision.allowed
    assert decision.reasons == ("no rule applies to subject 'svc:ci-deploy'",)


# -- through Broker.issue ------------------------------------------------------------------
def test_exact_rule_allows(jitbroker_clock: FakeClock) -> None:
    rule = grant(subjects="svc:report", audiences="api", scopes=["read"])
    broker = make_broker(jitbroker_clock, rule)
    cred = broker.issue("svc:report", "api", ["read"], ttl=60)
    assert broker.verify(cred.token, audience="api", scopes=["read"]).subject == "svc:report"
    assert denied(broker, "svc:report2", "api", ["read"]) == (
        "no rule applies to subject 'svc:report2'",
    )


def test_empty_scopes_need_no_scope_grant(jitbroker_clock: FakeClock) -> None:
    broker = make_broker(jitbroker_clock, grant(subjects="svc:a", audiences="api"))
    assert broker.issue("svc:a", "api").lease.scopes == ()
    assert denied(broker, "svc:a", "api", ["read"]) == (
        "rule for svc:a does not grant scopes 'read'",
    )


@pytest.mark.parametrize("subject", ["svc:ci-deploy", "svc:ci-", "svc:ci-build:nightly"])
def test_subject_glob_matches(ci_broker: Broker, subject: str) -> None:
    assert ci_broker.issue(subject, "db:orders", ["orders:read"]).lease.subject == subject


@pytest.mark.parametrize("subject", ["svc:cd-deploy", "svc:ci", "SVC:CI-deploy", "x-svc:ci-a"])
def test_subject_glob_does_not_match(ci_broker: Broker, subject: str) -> None:
    reasons = denied(ci_broker, subject, "db:orders", ["orders:read"])
    assert reasons == (f"no rule applies to subject {subject!r}",)


def test_scope_wildcard(jitbroker_clock: FakeClock) -> None:
    rule = grant(subjects="svc:a", audiences="db:orders", scopes=["orders:*"])
    broker = make_broker(jitbroker_clock, rule)
    cred = broker.issue("svc:a", "db:orders", ["orders:read", "orders:write"])
    assert cred.lease.scopes == ("orders:read", "orders:write")
    reasons = denied(broker, "svc:a", "db:orders", ["orders:read", "payments:read"])
    assert reasons == ("rule for svc:a does not grant scopes 'payments:read'",)


def test_audience_wildcard(jitbroker_clock: FakeClock) -> None:
    rule = grant(subjects="svc:a", audiences=["db:*"], scopes=["read"])
    broker = make_broker(jitbroker_clock, rule)
    assert broker.issue("svc:a", "db:orders", ["read"]).lease.audience == "db:orders"
    assert broker.issue("svc:a", "db:payments", ["read"]).lease.audience == "db:payments"
    reasons = denied(broker, "svc:a", "api:orders", ["read"])
    assert reasons == ("rule for svc:a does not grant audience 'api:orders'",)


def test_rule_max_ttl_bounds_the_whole_life_through_renewals(jitbroker_clock: FakeClock) -> None:
    rule = grant(subjects="svc:a", audiences="api", scopes=["read"], max_ttl=60, name="short")
    broker = make_broker(jitbroker_clock, rule)
    assert broker.issue("svc:a", "api", ["read"], ttl=60, renewable=False).lease.renewable is False
    assert denied(broker, "svc:a", "api", ["read"], ttl=61, renewable=False) == (
        "short allows at most 60s, asked for 61s",
    )
    # A renewable lease is judged on the life granted so far; each renewal is judged again.
    cred = broker.issue("svc:a", "api", ["read"], ttl=30)
    jitbroker_clock.advance(20)
    renewed = broker.renew(cred, ttl=40)  # life so far: 20 + 40 = 60 s, allowed
    assert renewed.lease.expires_at - renewed.lease.issued_at == pytest.approx(60)
    jitbroker_clock.advance(10)
    with pytest.raises(PolicyDenied) as info:
        broker.renew(renewed, ttl=40)  # would make 70 s
    assert info.value.reasons == ("short allows at most 60s, asked for 70s",)
    assert broker.lease(cred).expires_at == renewed.lease.expires_at  # nothing changed


def test_rule_max_ttl_boundary_is_exact(jitbroker_clock: FakeClock) -> None:
    rule = grant(subjects="svc:a", audiences="api", max_ttl=59.9)
    broker = make_broker(jitbroker_clock, rule)
    assert broker.issue("svc:a", "api", ttl=59.9, renewable=False).lease.renewable is False


def test_owner_required(jitbroker_clock: FakeClock) -> None:
    rule = grant(subjects="svc:a", audiences="api", owner_required=True, name="owned")
    broker = make_broker(jitbroker_clock, rule)
    assert denied(broker, "svc:a", "api", []) == ("owned requires an owner",)
    cred = broker.issue("svc:a", "api", owner="alice@example.com")
    assert cred.lease.owner == "alice@example.com"


def test_purpose_required(jitbroker_clock: FakeClock) -> None:
    rule = grant(subjects="svc:a", audiences="api", purpose_required=True, name="why")
    broker = make_broker(jitbroker_clock, rule)
    assert denied(broker, "svc:a", "api", [], owner="alice@example.com") == (
        "why requires a purpose",
    )
    assert broker.issue("svc:a", "api", purpose="nightly export").lease.purpose == "nightly export"


def test_non_renewable_rule(jitbroker_clock: FakeClock) -> None:
    rule = grant(subjects="svc:a", audiences="api", renewable=False, name="once")
    broker = make_broker(jitbroker_clock, rule)
    (reason,) = denied(broker, "svc:a", "api", [])
    assert reason.startswith("once does not allow renewable leases")
    assert "renewable=False" in reason
    assert broker.issue("svc:a", "api", renewable=False).lease.renewable is False


def test_no_rule_applies(jitbroker_clock: FakeClock) -> None:
    broker = make_broker(jitbroker_clock, CI)
    with pytest.raises(PolicyDenied) as info:
        broker.issue("user:mallory", "db:orders", ["orders:read"])
    assert info.value.reasons == ("no rule applies to subject 'user:mallory'",)
    assert isinstance(info.value, JitBrokerError)
    assert not isinstance(info.value, InvalidRequest)
    assert "user:mallory" in str(info.value)
    assert list(broker.leases(include_inactive=True)) == []


def test_every_reason_is_listed(jitbroker_clock: FakeClock) -> None:
    strict = grant(
        subjects="svc:a",
        audiences="db:orders",
        scopes=["orders:read"],
        max_ttl=60,
        owner_required=True,
        purpose_required=True,
        renewable=False,
        name="strict",
    )
    broker = make_broker(jitbroker_clock, strict)
    reasons = denied(broker, "svc:a", "db:payments", ["orders:read", "payments:write"], ttl=120)
    assert reasons == (
        "strict does not grant audience 'db:payments'",
        "strict does not grant scopes 'payments:write'",
        "strict allows at most 60s, asked for 120s",
        "strict requires an owner",
        "strict requires a purpose",
        "strict does not allow renewable leases (pass renewable=False)",
    )


def test_reasons_of_every_applying_rule_are_listed(jitbroker_clock: FakeClock) -> None:
    reader = grant(subjects="svc:*", audiences="db:orders", scopes=["orders:read"], name="reader")
    writer = grant(subjects="svc:a", audiences="db:orders", scopes=["orders:write"], name="writer")
    other = grant(subjects="user:*", audiences="db:orders", scopes=["orders:*"], name="users")
    broker = make_broker(jitbroker_clock, reader, other, writer)
    reasons = denied(broker, "svc:a", "db:orders", ["orders:read", "orders:write"])
    assert reasons == (
        "reader does not grant scopes 'orders:write'",
        "writer does not grant scopes 'orders:read'",
    )
    with pytest.raises(PolicyDenied) as info:
        broker.issue("svc:a", "db:orders", ["orders:read", "orders:write"])
    assert "reader" in str(info.value)
    assert "writer" in str(info.value)


def test_allowed_request_passes_through_issue(jitbroker_clock: FakeClock) -> None:
    rule = grant(
        subjects="svc:ci-*",
        audiences="db:orders",
        scopes=["orders:*"],
        max_ttl=600,
        owner_required=True,
        purpose_required=True,
    )
    broker = make_broker(jitbroker_clock, rule)
    cred = broker.issue(
        "svc:ci-deploy",
        "db:orders",
        "orders:read orders:write",
        ttl=60,
        max_ttl=600,
        task="job-42",
        owner="alice@example.com",
        purpose="nightly export",
    )
    claims = broker.verify(cred.token, audience="db:orders", scopes="orders:write")
    assert claims.owner == "alice@example.com"
    assert [lease.id for lease in broker.leases(owner="alice@example.com")] == [cred.lease_id]


# -- attenuation and renewal are checked too ---------------------------------------------
def two_brokers(clock: FakeClock, *rules: Rule) -> tuple[Broker, Broker]:
    """A permissive broker and a policed one sharing keys and store (like two processes)."""
    keys = KeyRing.generate()
    store = MemoryStore()
    open_broker = Broker(issuer=TEST_ISSUER, keys=keys, store=store, clock=clock)
    return open_broker, make_broker(clock, *rules, keys=keys, store=store)


def test_attenuate_within_grants(jitbroker_clock: FakeClock) -> None:
    rule = grant(subjects="svc:a", audiences="db:orders", scopes=["orders:*"], max_ttl=120)
    broker = make_broker(jitbroker_clock, rule)
    parent = broker.issue("svc:a", "db:orders", "orders:read orders:write", ttl=60, max_ttl=120)
    jitbroker_clock.advance(10)
    child = broker.attenuate(parent, scopes=["orders:read"], ttl=30)
    assert child.lease.parent == parent.lease_id
    assert child.lease.scopes == ("orders:read",)
    assert broker.verify(child.token, audience="db:orders", scopes="orders:read")


def test_attenuate_outside_grants_is_denied(jitbroker_clock: FakeClock) -> None:
    orders_only = grant(subjects="svc:a", audiences="db:orders", scopes=["orders:*"], name="o")
    open_broker, policed = two_brokers(jitbroker_clock, orders_only)
    parent = open_broker.issue("svc:a", "db:orders", ["orders:read", "payments:read"], ttl=60)
    with pytest.raises(PolicyDenied) as info:
        policed.attenuate(parent, scopes=["payments:read"], ttl=30)
    assert info.value.reasons == ("o does not grant scopes 'payments:read'",)
    child = policed.attenuate(parent, scopes=["orders:read"], ttl=30)
    assert child.lease.scopes == ("orders:read",)
    assert [lease.id for lease in policed.leases(parent=parent.lease_id)] == [child.lease_id]


def test_attenuate_cannot_widen_even_without_policy(jitbroker_broker: Broker) -> None:
    parent = jitbroker_broker.issue("svc:a", "db:orders", ["orders:read"], ttl=60)
    with pytest.raises(InvalidRequest, match="widen"):
        jitbroker_broker.attenuate(parent, scopes=["orders:write"])
    with pytest.raises(InvalidRequest, match="widen"):
        jitbroker_broker.attenuate(parent, audience="db:payments")


def test_renew_is_checked_by_the_policy(jitbroker_clock: FakeClock) -> None:
    owned = grant(subjects="svc:a", audiences="api", owner_required=True, name="owned")
    open_broker, policed = two_brokers(jitbroker_clock, owned)
    anonymous = open_broker.issue("svc:a", "api", ttl=60)
    with_owner = open_broker.issue("svc:a", "api", ttl=60, owner="alice@example.com")
    jitbroker_clock.advance(30)
    with pytest.raises(PolicyDenied) as info:
        policed.renew(anonymous, ttl=60)
    assert info.value.reasons == ("owned requires an owner",)
    assert policed.lease(anonymous).expires_at == anonymous.expires_at  # not extended
    renewed = policed.renew(with_owner, ttl=60)
    assert renewed.lease_id == with_owner.lease_id
    assert renewed.expires_at == jitbroker_clock() + 60


def test_renew_of_a_subject_no_rule_covers(jitbroker_clock: FakeClock) -> None:
    open_broker, policed = two_brokers(jitbroker_clock, CI)
    cred = open_broker.issue("svc:other", "db:orders", ["orders:read"], ttl=60)
    with pytest.raises(PolicyDenied) as info:
        policed.renew(cred)
    assert info.value.reasons == ("no rule applies to subject 'svc:other'",)


TYPED_USE = """
from jitbroker import Policy, Rule

rule = Rule(subjects="svc:a", audiences="api", scopes=["read"])
policy = Policy([rule])
"""


def test_rule_and_policy_type_check(tmp_path: Path) -> None:
    # The package ships py.typed: the documented usage must pass a strict type check.
    from mypy import api

    snippet = tmp_path / "use_policy.py"
    snippet.write_text(TYPED_USE)
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\n")
    out, err, status = api.run(
        [
            "--strict",
            "--no-incremental",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--config-file",
            str(config),
            str(snippet),
        ]
    )
    assert status == 0, out + err


# -- loading policies from data and TOML --------------------------------------------
POLICY_TOML = """
[[rule]]
name = "ci deploys"
subjects = ["svc:ci-*"]
audiences = ["db:orders"]
scopes = ["orders:read", "orders:write"]
max_ttl = 600
owner_required = true

[[rule]]
subjects = "svc:report"
audiences = ["api"]
scopes = "reports:*"
renewable = false
"""


def test_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY_TOML)
    policy = Policy.from_toml(path)
    assert [r.name for r in policy.rules] == ["ci deploys", None]
    first, second = policy.rules
    assert first.subjects == ("svc:ci-*",)
    assert first.max_ttl == 600
    assert first.owner_required is True
    assert second.scopes == ("reports:*",)
    assert second.renewable is False


def test_from_dict_equals_the_rules_written_by_hand() -> None:
    policy = Policy.from_dict(
        {"rules": [{"subjects": ["svc:a"], "audiences": ["api"], "scopes": ["read"]}]}
    )
    assert policy == Policy([Rule(subjects=["svc:a"], audiences=["api"], scopes=["read"])])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "one non-empty list of rules"),
        ({"rules": []}, "one non-empty list of rules"),
        ({"rules": [], "rule": []}, "one non-empty list of rules"),
        ({"rules": [{}], "extra": 1}, "unknown top-level keys \\['extra'\\]"),
        ({"rules": ["x"]}, "rule 1: a rule must be a table"),
        ({"rules": [{"audiences": ["a"]}]}, "rule 1: field 'subjects' is required"),
        ({"rules": [{"subjects": [], "audiences": ["a"]}]}, "rule 1: field 'subjects'"),
        ({"rules": [{"subjects": ["s"], "audiences": [1]}]}, "rule 1: field 'audiences'"),
        ({"rules": [{"subjects": ["s"], "audiences": ["a"], "scopes": [""]}]}, "'scopes'"),
        ({"rules": [{"subjects": ["s"], "audiences": ["a"], "max_ttl": True}]}, "'max_ttl'"),
        ({"rules": [{"subjects": ["s"], "audiences": ["a"], "max_ttl": -1}]}, "'max_ttl'"),
        ({"rules": [{"subjects": ["s"], "audiences": ["a"], "max_ttl": float("inf")}]}, "max_ttl"),
        (
            {"rules": [{"subjects": ["s"], "audiences": ["a"], "owner_required": "yes"}]},
            "'owner_required' must be true or false",
        ),
        (
            {"rules": [{"name": "x", "subjects": ["s"], "audiences": ["a"], "scope": ["r"]}]},
            "rule 1 \\(x\\): unknown fields \\['scope'\\]",
        ),
        (
            {"rules": [{"subjects": ["s"], "audiences": ["a"]}, {"subjects": ["s"]}]},
            "rule 2: field 'audiences' is required",
        ),
    ],
)
def test_from_dict_errors_name_the_rule_and_field(data: Any, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as raised:
        Policy.from_dict(data, source="policy.toml")
    assert str(raised.value).startswith("policy.toml")


def test_from_toml_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="cannot read"):
        Policy.from_toml(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[rule]\nsubjects = ")
    with pytest.raises(InvalidRequest, match=r"bad\.toml: not valid TOML"):
        Policy.from_toml(bad)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[[rule]]\nsubjects = ["s"]\naudiences = ["a"]\nmax_ttl = "1h"\n')
    with pytest.raises(InvalidRequest, match=r"wrong\.toml: rule 1: field 'max_ttl'"):
        Policy.from_toml(wrong)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
rule_like = st.dictionaries(
    st.sampled_from(
        [
            "subjects",
            "audiences",
            "scopes",
            "max_ttl",
            "owner_required",
            "purpose_required",
            "renewable",
            "name",
            "other",
        ]
    ),
    json_values,
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    st.fixed_dictionaries({"rules": st.lists(rule_like | json_values, max_size=3)})
    | st.dictionaries(st.text(max_size=6), json_values)
    | json_values
)
def test_from_dict_only_raises_invalid_request(data: Any) -> None:
    try:
        policy = Policy.from_dict(data)
    except InvalidRequest:
        return
    assert all(isinstance(rule, Rule) for rule in policy.rules)


# -- memos keyed by caller input stay small (issue 15) ----------------------------------
def test_the_quota_memo_keeps_only_small_keys() -> None:
    """A Lease built by hand is not length-checked: rule.quotas must not keep
    huge subjects or owners alive in its memo."""
    import gc
    import tracemalloc

    rule = grant("svc:*", "api", max_active=3, max_active_per_owner=2)
    base = Lease(
        id="0" * 32,
        subject="svc:a",
        audience="api",
        scopes=(),
        issued_at=0.0,
        expires_at=60.0,
        max_expires_at=60.0,
        key_id="k",
        owner="alice",
    )
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(50):
            big = attrs.evolve(base, subject=f"svc:{i}" + "s" * 20_000, owner="o" * 20_000)
            assert [q.limit for q in rule.quotas(big)] == [3, 2]
            del big
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert growth < 64 * 1024  # memoized, it would be 2 MB
    assert rule.quotas(base) is rule.quotas(base)  # the common case still is memoized
