"""The governance policy: a matrix of grants and denials (every kind of refusal,
conditions included), all reasons at once, rule order, policy files with the
new fields, ``explain``, denials in the audit trail, and re-evaluation of
renewals and attenuations (the action is visible to conditions).

Time comes from a ``FakeClock``, which starts on Thursday 2026-01-01 00:00 UTC.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest

from jitbroker import (
    AsyncBroker,
    Broker,
    KeyRing,
    Lease,
    LeaseFilter,
    MemoryStore,
    Policy,
    PolicyDenied,
    Rule,
)
from jitbroker.audit import AuditEvent, EventType
from jitbroker.cli import main
from jitbroker.errors import InvalidRequest, QuotaExceeded
from jitbroker.policy import AccessRequest, Condition, hours, labels, weekdays
from jitbroker.stores.base import Quota
from jitbroker.testing import TEST_ISSUER, FakeClock

SUBJECT = "svc:ci-deploy"
AUDIENCE = "db:orders"
OWNER = "alice@example.com"
BASE: dict[str, Any] = {
    "subjects": "svc:ci-*",
    "audiences": [AUDIENCE],
    "scopes": ["orders:read", "orders:write"],
    "name": "ci",
}
REQUEST: dict[str, Any] = {
    "subject": SUBJECT,
    "audience": AUDIENCE,
    "scopes": ["orders:read"],
    "ttl": 60,
    "owner": OWNER,
    "purpose": "nightly export",
}


def rule(**changes: Any) -> Rule:
    """The ``ci`` rule with ``changes``."""
    return Rule(**{**BASE, **changes})


def epoch(iso: str) -> float:
    """POSIX seconds of an ISO 8601 time (UTC unless it says otherwise)."""
    when = datetime.fromisoformat(iso)
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def proposed(now: float, **changes: Any) -> Lease:
    """A lease as ``issue`` would propose it at ``now``."""
    fields: dict[str, Any] = {
        "id": "0" * 32,
        "subject": SUBJECT,
        "audience": AUDIENCE,
        "scopes": ("orders:read",),
        "issued_at": now,
        "expires_at": now + 60,
        "max_expires_at": now + 3600,
        "owner": OWNER,
        "purpose": "nightly export",
    }
    return Lease(**{**fields, **changes})


def request_at(iso: str, *, action: str = "issue", **broker_labels: str) -> AccessRequest:
    now = epoch(iso)
    return AccessRequest(proposed(now), action, now, broker_labels)


class Env:
    """A broker with ``rules`` on a FakeClock and a MemoryStore, recording audit events."""

    def __init__(self, *rules: Rule, labels: dict[str, str] | None = None) -> None:
        self.clock = FakeClock()
        self.store = MemoryStore()
        self.events: list[AuditEvent] = []
        self.broker = Broker(
            issuer=TEST_ISSUER,
            keys=KeyRing.generate("EdDSA"),
            store=self.store,
            policy=Policy(rules),
            clock=self.clock,
            labels=labels,
            audit=[self.events.append],
        )

    def stored(self) -> list[Lease]:
        return self.store.find(LeaseFilter())

    def actions(self) -> list[str]:
        return [str(event.action) for event in self.events]

    def refused(self, **changes: Any) -> PolicyDenied:
        """Issue ``REQUEST`` with ``changes``; it must be denied with nothing stored."""
        before = self.stored()
        with pytest.raises(PolicyDenied) as info:
            self.broker.issue(**{**REQUEST, **changes})
        assert self.stored() == before
        return info.value


# -- the matrix ---------------------------------------------------------------
def never(request: AccessRequest) -> bool:
    return False


def broken_condition(request: AccessRequest) -> bool:
    raise RuntimeError("the approval service is down")


class CallableCheck:
    """A condition object without ``__name__``: reasons name its class."""

    def __call__(self, request: AccessRequest) -> object:
        return None  # falsy: denies


DENIALS: list[Any] = [
    pytest.param(
        {}, {"subject": "svc:other"}, "no rule applies to subject 'svc:other'", id="no-rule"
    ),
    pytest.param(
        {}, {"audience": "db:payments"}, "ci does not grant audience 'db:payments'", id="audience"
    ),
    pytest.param(
        {},
        {"scopes": ["orders:read", "orders:admin"]},
        "ci does not grant scopes 'orders:admin'",
        id="scope",
    ),
    pytest.param({"max_ttl": 30}, {}, "ci allows at most 30s, asked for 60s", id="max-ttl"),
    pytest.param({"owner_required": True}, {"owner": None}, "ci requires an owner", id="owner"),
    pytest.param(
        {"purpose_required": True}, {"purpose": None}, "ci requires a purpose", id="purpose"
    ),
    pytest.param(
        {"renewable": False},
        {},
        "ci does not allow renewable leases (pass renewable=False)",
        id="renewable",
    ),
    pytest.param(
        {"conditions": [hours("08:00-18:00")]},
        {},
        "ci: condition hours 08:00-18:00 (UTC) is not met",
        id="hours",
    ),
    pytest.param(
        {"conditions": [hours("01:00-06:00", tz="America/New_York")]},
        {},
        "ci: condition hours 01:00-06:00 (America/New_York) is not met",
        id="hours-tz",
    ),
    pytest.param(
        {"conditions": [weekdays("mon", "tue")]},
        {},
        "ci: condition weekdays mon tue is not met",
        id="weekdays",
    ),
    pytest.param(
        {"conditions": [labels(env="prod")]},
        {},
        "ci: condition labels env=prod is not met",
        id="labels",
    ),
    pytest.param(
        {"conditions": [never]}, {}, "ci: condition never is not met", id="callable-false"
    ),
    pytest.param(
        {"conditions": [CallableCheck()]},
        {},
        "ci: condition CallableCheck is not met",
        id="callable-object",
    ),
    pytest.param(
        {"conditions": [broken_condition]},
        {},
        "ci: condition broken_condition failed (RuntimeError)",
        id="callable-raises",
    ),
]


def test_the_base_request_is_allowed() -> None:
    env = Env(rule())
    cred = env.broker.issue(**REQUEST)
    assert env.stored() == [cred.lease]
    assert env.actions() == ["issued"]


@pytest.mark.parametrize(("rule_changes", "request_changes", "reason"), DENIALS)
def test_each_kind_of_denial(
    rule_changes: dict[str, Any], request_changes: dict[str, Any], reason: str
) -> None:
    env = Env(rule(**rule_changes), labels={"env": "staging"})
    error = env.refused(**request_changes)
    assert error.reasons == (reason,)
    assert reason in str(error)
    # Audited as one "denied" event carrying the reasons and the refused lease.
    (event,) = env.events
    assert event.action == EventType.DENIED
    assert event.reasons == (reason,)
    assert event.lease is not None
    assert event.lease.subject == request_changes.get("subject", SUBJECT)
    assert list(env.broker.leases()) == []


@pytest.mark.parametrize(("rule_changes", "request_changes", "reason"), DENIALS)
def test_each_denial_goes_away_when_its_cause_does(
    rule_changes: dict[str, Any], request_changes: dict[str, Any], reason: str
) -> None:
    # The same rule grants the plain request (or the rule fixed): each denial has one cause.
    if request_changes:
        env = Env(rule(**rule_changes))
        env.broker.issue(**REQUEST)
    else:
        env = Env(rule())
        env.broker.issue(**REQUEST)
    assert env.actions() == ["issued"]


def test_a_condition_sees_the_request() -> None:
    seen: list[AccessRequest] = []

    def record(request: AccessRequest) -> bool:
        seen.append(request)
        return True

    env = Env(rule(conditions=[record]), labels={"env": "prod", "region": "eu"})
    env.clock.advance(42)
    cred = env.broker.issue(**REQUEST)
    (request,) = seen
    assert request.action == "issue"
    assert request.now == env.clock()
    assert dict(request.labels) == {"env": "prod", "region": "eu"}
    assert request.lease == cred.lease


def test_a_labels_condition_allows_a_broker_with_those_labels() -> None:
    env = Env(rule(conditions=[labels(env="prod")]), labels={"env": "prod", "team": "a"})
    env.broker.issue(**REQUEST)
    both = Env(rule(conditions=[labels(env="prod", team="b")]), labels={"env": "prod", "team": "a"})
    assert both.refused().reasons == ("ci: condition labels env=prod, team=b is not met",)


def test_conditions_must_all_hold() -> None:
    env = Env(rule(conditions=[hours("00:00-12:00"), never, weekdays("thu")]))
    assert env.refused().reasons == ("ci: condition never is not met",)


# -- hours and weekdays ------------------------------------------------------------
@pytest.mark.parametrize(
    ("window", "iso", "allowed"),
    [
        ("08:00-18:00", "2026-01-05T07:59:59", False),
        ("08:00-18:00", "2026-01-05T08:00:00", True),
        ("08:00-18:00", "2026-01-05T17:59:59", True),
        ("08:00-18:00", "2026-01-05T18:00:00", False),
        # Wrapping midnight: the night shift.
        ("22:00-06:00", "2026-01-05T21:59:00", False),
        ("22:00-06:00", "2026-01-05T22:00:00", True),
        ("22:00-06:00", "2026-01-05T23:59:59", True),
        ("22:00-06:00", "2026-01-06T00:00:00", True),
        ("22:00-06:00", "2026-01-06T05:59:00", True),
        ("22:00-06:00", "2026-01-06T06:00:00", False),
        ("22:00-06:00", "2026-01-06T12:00:00", False),
        ("00:00-24:00", "2026-01-06T23:59:00", True),
    ],
)
def test_hours_window(window: str, iso: str, allowed: bool) -> None:
    assert bool(hours(window)(request_at(iso))) is allowed


@pytest.mark.parametrize(
    ("tz", "iso", "allowed"),
    [
        # 09:00-17:00 in Tokyo (UTC+9, no DST) is 00:00-08:00 UTC.
        ("Asia/Tokyo", "2026-01-05T00:00:00", True),
        ("Asia/Tokyo", "2026-01-05T07:59:00", True),
        ("Asia/Tokyo", "2026-01-05T08:00:00", False),
        ("Asia/Tokyo", "2026-01-05T12:00:00", False),
        # New York is UTC-5 in January, UTC-4 in July (DST is the zone's business).
        ("America/New_York", "2026-01-05T14:00:00", True),
        ("America/New_York", "2026-01-05T22:00:00", False),
        ("America/New_York", "2026-07-06T13:00:00", True),
        ("America/New_York", "2026-07-06T21:00:00", False),
        ("America/New_York", "2026-07-06T12:59:00", False),
    ],
)
def test_hours_in_a_time_zone(tz: str, iso: str, allowed: bool) -> None:
    assert bool(hours("09:00-17:00", tz=tz)(request_at(iso))) is allowed


def test_hours_accepts_a_tzinfo() -> None:
    plus9 = timezone(timedelta(hours=9))
    assert hours("09:00-10:00", tz=plus9)(request_at("2026-01-05T00:30:00"))
    assert not hours("09:00-10:00", tz=plus9)(request_at("2026-01-05T09:30:00"))


def test_weekdays_in_a_time_zone() -> None:
    # Thursday 00:00 UTC is still Wednesday evening in New York, and Thursday in Tokyo.
    thursday_midnight = request_at("2026-01-01T00:00:00")
    assert weekdays("thu")(thursday_midnight)
    assert not weekdays("wed")(thursday_midnight)
    assert weekdays("wed", tz="America/New_York")(thursday_midnight)
    assert not weekdays("thu", tz="America/New_York")(thursday_midnight)
    assert weekdays("thu", tz="Asia/Tokyo")(thursday_midnight)
    saturday = request_at("2026-01-03T12:00:00")
    assert weekdays("sat", "sun")(saturday)
    assert not weekdays("mon", "tue", "wed", "thu", "fri")(saturday)


def test_a_time_condition_through_the_broker() -> None:
    env = Env(rule(conditions=[hours("08:00-18:00"), weekdays("mon", "tue", "wed", "thu", "fri")]))
    env.clock.set(epoch("2026-01-05T09:00:00"))  # a Monday morning
    env.broker.issue(**REQUEST)
    env.clock.set(epoch("2026-01-10T09:00:00"))  # a Saturday morning
    assert env.refused().reasons == ("ci: condition weekdays mon tue wed thu fri is not met",)


@pytest.mark.parametrize(
    "build",
    [
        lambda: hours("8-18"),
        lambda: hours("08:00-25:00"),
        lambda: hours("08:60-09:00"),
        lambda: hours(""),
        lambda: hours("08:00-18:00", tz="Mars/Olympus_Mons"),
        lambda: weekdays(),
        lambda: weekdays("funday"),
        lambda: weekdays("Mon"),
        lambda: weekdays("mon", tz="Nowhere/At_All"),
        lambda: labels(),
    ],
)
def test_bad_conditions_are_refused_at_construction(build: Any) -> None:
    with pytest.raises(InvalidRequest):
        build()


def test_rule_conditions_must_be_callables() -> None:
    with pytest.raises(InvalidRequest, match="conditions"):
        rule(conditions=["08:00-18:00"])
    single = rule(conditions=never)  # one callable is accepted as a one-item list
    assert single.conditions == (never,)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_active", 0),
        ("max_active", -1),
        ("max_active", True),
        ("max_active", 2.5),
        ("max_active", "3"),
        ("max_active_per_owner", 0),
        ("max_active_per_owner", False),
    ],
)
def test_rule_quota_fields_are_checked(field: str, value: object) -> None:
    with pytest.raises(InvalidRequest, match=field):
        rule(**{field: value})


# -- every reason at once ---------------------------------------------------------
def test_every_reason_is_reported_at_once() -> None:
    strict = rule(
        max_ttl=30,
        owner_required=True,
        purpose_required=True,
        renewable=False,
        conditions=[hours("08:00-18:00"), broken_condition, never],
    )
    env = Env(strict)
    error = env.refused(
        audience="db:payments", scopes=["orders:read", "orders:drop"], owner=None, purpose=None
    )
    assert error.reasons == (
        "ci does not grant audience 'db:payments'",
        "ci does not grant scopes 'orders:drop'",
        "ci allows at most 30s, asked for 60s",
        "ci requires an owner",
        "ci requires a purpose",
        "ci does not allow renewable leases (pass renewable=False)",
        "ci: condition hours 08:00-18:00 (UTC) is not met",
        "ci: condition broken_condition failed (RuntimeError)",
        "ci: condition never is not met",
    )
    (event,) = env.events
    assert event.reasons == error.reasons


def test_every_matched_rule_gives_its_reasons() -> None:
    first = rule(name="reader", scopes=["orders:read"])
    second = rule(name="office", scopes=["orders:write"], conditions=[hours("08:00-18:00")])
    unrelated = Rule(subjects="svc:other", audiences="x", name="other")
    env = Env(first, unrelated, second)
    error = env.refused(scopes=["orders:write"])
    assert error.reasons == (
        "reader does not grant scopes 'orders:write'",
        "office: condition hours 08:00-18:00 (UTC) is not met",
    )


def test_a_failing_condition_does_not_stop_the_other_checks() -> None:
    calls: list[str] = []

    def counted(request: AccessRequest) -> bool:
        calls.append(request.action)
        return True

    env = Env(rule(conditions=[broken_condition, counted]))
    assert env.refused().reasons == ("ci: condition broken_condition failed (RuntimeError)",)
    assert calls == ["issue"]


# -- rule order: the first granting rule wins, rules are never merged ------------
def test_rules_are_not_merged() -> None:
    reads = rule(name="reads", scopes=["orders:read"])
    writes = rule(name="writes", scopes=["orders:write"])
    env = Env(reads, writes)
    error = env.refused(scopes=["orders:read", "orders:write"])
    assert error.reasons == (
        "reads does not grant scopes 'orders:write'",
        "writes does not grant scopes 'orders:read'",
    )
    env.broker.issue(**{**REQUEST, "scopes": ["orders:read"]})
    env.broker.issue(**{**REQUEST, "scopes": ["orders:write"]})


def test_the_first_granting_rule_wins_and_sets_the_quotas() -> None:
    tight = rule(name="tight", max_active=1)
    loose = rule(name="loose", max_active=10)
    policy = Policy([rule(name="office", conditions=[never]), tight, loose])
    decision = policy.evaluate(AccessRequest(proposed(0.0), "issue", 0.0))
    assert decision.allowed
    assert decision.rule is tight
    assert [r.label() for r in decision.matched] == ["office", "tight", "loose"]
    assert decision.reasons == ()
    assert decision.quotas == (Quota(SUBJECT, None, 1, "tight"),)
    # Through the broker: the first granting rule's quota holds, the looser one never adds up.
    env = Env(*policy.rules)
    env.broker.issue(**REQUEST)
    error = env.refused()
    assert isinstance(error, QuotaExceeded)
    assert error.quota == Quota(SUBJECT, None, 1, "tight")


def test_evaluate_accepts_a_lease_and_judges_it_as_an_issue() -> None:
    policy = Policy([rule()])
    assert policy.evaluate(proposed(0.0)).allowed
    denied = policy.evaluate(proposed(0.0, audience="elsewhere"))
    assert not denied.allowed
    assert denied.rule is None
    assert denied.quotas == ()
    assert denied.reasons == ("ci does not grant audience 'elsewhere'",)


def test_per_owner_quota_applies_only_to_owned_leases() -> None:
    per_owner = rule(max_active=5, max_active_per_owner=2)
    assert per_owner.quotas(proposed(0.0)) == (
        Quota(SUBJECT, None, 5, "ci"),
        Quota(SUBJECT, OWNER, 2, "ci"),
    )
    assert per_owner.quotas(proposed(0.0, owner=None)) == (Quota(SUBJECT, None, 5, "ci"),)
    assert rule().quotas(proposed(0.0)) == ()


# -- policy files --------------------------------------------------------------
GOVERNED = """
[[rule]]
name = "ci"
subjects = ["svc:ci-*"]
audiences = ["db:orders"]
scopes = ["orders:read"]
max_active = 3
max_active_per_owner = 1
hours = "08:00-18:00"
weekdays = ["mon", "tue", "wed", "thu", "fri"]
timezone = "Europe/Berlin"
labels = { env = "prod" }

[[rule]]
subjects = "svc:night-*"
audiences = "db:orders"
hours = "22:00-06:00"
weekdays = "sat"
"""


def test_from_toml_reads_the_governance_fields(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(GOVERNED, encoding="utf-8")
    ci, night = Policy.from_toml(path).rules
    assert ci.name == "ci"
    assert (ci.max_active, ci.max_active_per_owner) == (3, 1)
    expected: tuple[Condition, ...] = (
        hours("08:00-18:00", tz="Europe/Berlin"),
        weekdays("mon", "tue", "wed", "thu", "fri", tz="Europe/Berlin"),
        labels(env="prod"),
    )
    assert ci.conditions == expected
    assert [str(c) for c in ci.conditions] == [
        "hours 08:00-18:00 (Europe/Berlin)",
        "weekdays mon tue wed thu fri",
        "labels env=prod",
    ]
    assert night.conditions == (hours("22:00-06:00", tz="UTC"), weekdays("sat", tz="UTC"))
    assert (night.max_active, night.max_active_per_owner) == (None, None)


def test_a_policy_file_judges_like_the_rules_it_spells(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(GOVERNED, encoding="utf-8")
    policy = Policy.from_toml(path)
    monday_10_berlin = epoch("2026-01-05T10:00:00+01:00")
    ok = AccessRequest(proposed(monday_10_berlin), "issue", monday_10_berlin, {"env": "prod"})
    assert policy.evaluate(ok).allowed
    assert policy.evaluate(ok).quotas == (
        Quota(SUBJECT, None, 3, "ci"),
        Quota(SUBJECT, OWNER, 1, "ci"),
    )
    # 18:30 in Berlin is 17:30 UTC: the zone is the rule's, not UTC.
    late = epoch("2026-01-05T17:30:00")
    decision = policy.evaluate(AccessRequest(proposed(late), "issue", late, {"env": "prod"}))
    assert decision.reasons == ("ci: condition hours 08:00-18:00 (Europe/Berlin) is not met",)
    staging = attrs.evolve(ok, labels={"env": "staging"})
    assert policy.evaluate(staging).reasons == ("ci: condition labels env=prod is not met",)
    # Saturday 23:00 UTC for the night rule.
    night_time = epoch("2026-01-10T23:00:00")
    night = proposed(night_time, subject="svc:night-batch", scopes=())
    assert policy.evaluate(AccessRequest(night, "issue", night_time)).allowed


def test_from_dict_equals_rules_written_by_hand() -> None:
    data = {
        "rules": [
            {
                "name": "ci",
                "subjects": ["svc:ci-*"],
                "audiences": ["db:orders"],
                "scopes": "orders:read orders:write",
                "max_ttl": 600,
                "max_active": 4,
                "max_active_per_owner": 2,
                "hours": "22:00-06:00",
                "weekdays": ["sat", "sun"],
                "timezone": "Asia/Tokyo",
                "labels": {"env": "prod", "region": "ap"},
            }
        ]
    }
    assert Policy.from_dict(data) == Policy(
        [
            Rule(
                subjects=["svc:ci-*"],
                audiences=["db:orders"],
                scopes=["orders:read", "orders:write"],
                max_ttl=600,
                name="ci",
                max_active=4,
                max_active_per_owner=2,
                conditions=[
                    hours("22:00-06:00", tz="Asia/Tokyo"),
                    weekdays("sat", "sun", tz="Asia/Tokyo"),
                    labels(env="prod", region="ap"),
                ],
            )
        ]
    )


def named(**fields: Any) -> dict[str, Any]:
    """A one-rule policy named ``ci`` with ``fields`` added."""
    return {"rules": [{"name": "ci", "subjects": ["svc:a"], "audiences": ["api"], **fields}]}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"max_active": 0}, "max_active"),
        ({"max_active": -2}, "max_active"),
        ({"max_active": "3"}, "max_active"),
        ({"max_active": True}, "max_active"),
        ({"max_active": 1.5}, "max_active"),
        ({"max_active_per_owner": 0}, "max_active_per_owner"),
        ({"max_active_per_owner": [1]}, "max_active_per_owner"),
        ({"hours": "8-18"}, "hours"),
        ({"hours": "18:00-08:61"}, "hours"),
        ({"hours": 8}, "hours"),
        ({"hours": ["08:00-18:00"]}, "hours"),
        ({"weekdays": ["funday"]}, "weekdays"),
        ({"weekdays": []}, "weekdays"),
        ({"weekdays": 5}, "weekdays"),
        ({"weekdays": ["mon", ""]}, "weekdays"),
        ({"labels": {"env": 1}}, "labels"),
        ({"labels": "env=prod"}, "labels"),
        ({"labels": {}}, "labels"),
        ({"labels": {"env": {"nested": "x"}}}, "labels"),
        ({"timezone": 5, "hours": "08:00-18:00"}, "timezone"),
        ({"timezone": ["UTC"], "weekdays": ["mon"]}, "timezone"),
        ({"hourz": "08:00-18:00"}, "hourz"),
    ],
)
def test_from_dict_errors_name_the_rule_and_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        Policy.from_dict(named(**fields), source="gov.toml")
    message = str(info.value)
    assert message.startswith("gov.toml: rule 1 (ci): "), message
    assert field in message


def test_from_dict_errors_name_an_unnamed_rule_by_number() -> None:
    data = named()
    data["rules"].append({"subjects": ["svc:b"], "audiences": ["api"], "max_active": 0})
    with pytest.raises(InvalidRequest, match=r"^policy: rule 2: .*max_active"):
        Policy.from_dict(data)


def test_from_dict_refuses_an_unknown_time_zone() -> None:
    with pytest.raises(InvalidRequest) as info:
        Policy.from_dict(named(hours="08:00-18:00", timezone="Mars/Olympus_Mons"))
    assert str(info.value).startswith("policy: rule 1 (ci): ")
    assert "Mars/Olympus_Mons" in str(info.value)


def test_from_dict_refuses_an_unknown_time_zone_even_without_time_conditions() -> None:
    with pytest.raises(InvalidRequest, match="timezone"):
        Policy.from_dict(named(timezone="Europe/Berln"))


@pytest.mark.parametrize("ttl", [10**400, -(10**400)])
def test_a_max_ttl_too_big_for_a_float_is_refused(tmp_path: Path, ttl: int) -> None:
    # Not an OverflowError: `jitbroker policy check` would exit 1 (denied), not 2.
    with pytest.raises(InvalidRequest, match=r"rule 1 \(ci\): field 'max_ttl'"):
        Policy.from_dict(named(max_ttl=ttl))
    path = tmp_path / "big.toml"
    path.write_text(f'[[rule]]\nsubjects = ["svc:*"]\naudiences = ["api"]\nmax_ttl = {ttl}\n')
    with pytest.raises(InvalidRequest, match="max_ttl"):
        Policy.from_toml(path)
    assert main(["policy", "check", str(path)]) == 2


@pytest.fixture
def tzdata_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A ``tzdata`` package (zoneinfo's fallback database) with an area directory,
    as pip installs it: ``ZoneInfo("Europe")`` then opens a directory."""
    root = tmp_path / "site"
    area = root / "tzdata" / "zoneinfo" / "Europe"
    area.mkdir(parents=True)
    for package in (root / "tzdata", root / "tzdata" / "zoneinfo", area):
        (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    yield
    for name in [m for m in sys.modules if m == "tzdata" or m.startswith("tzdata.")]:
        del sys.modules[name]


@pytest.mark.usefixtures("tzdata_package")
def test_the_tzdata_fixture_reproduces_the_directory_error() -> None:
    import zoneinfo

    with pytest.raises(IsADirectoryError):
        zoneinfo.ZoneInfo("Europe")


BAD_ZONES = [
    "Europe",  # a directory of the database
    "Etc",
    "a" * 300,  # longer than a file name may be
    "Europe/" + "b" * 300,
    "../../etc/passwd",  # path-like
    "Europe/../../../etc/passwd",
    "/etc/localtime",
    "./UTC",
    "UTC/",
    "Europe//Berlin",
    "UTC\x00",  # NUL and other control characters
    "Europe/Ber\x00lin",
    "UTC\n",
    "",
    " UTC",
    "zone.tab",  # a file of the database that is not a zone
    "Europe\\Berlin",
    "Eur\u00f6pe/Berlin",
    "Europe/Berlin\ud800",
]


@pytest.mark.usefixtures("tzdata_package")
@pytest.mark.parametrize("zone", BAD_ZONES, ids=lambda z: repr(z[:40]))
def test_every_zoneinfo_failure_is_a_policy_file_error(tmp_path: Path, zone: str) -> None:
    """Not IsADirectoryError or OSError: the file, the rule and the field are named,
    and `jitbroker policy check` exits 2 (invalid file), never 1 (denied)."""
    with pytest.raises(InvalidRequest) as info:
        Policy.from_dict(named(hours="08:00-18:00", timezone=zone), source="gov.toml")
    assert str(info.value).startswith("gov.toml: rule 1 (ci): field 'timezone': "), info.value
    assert len(str(info.value)) < 300  # a 300-character name is not echoed whole
    path = tmp_path / "gov.toml"
    path.write_text(
        '[[rule]]\nname = "ci"\nsubjects = ["svc:*"]\naudiences = ["api"]\n'
        f"timezone = {json.dumps(zone)}\n",
        encoding="utf-8",
        errors="surrogatepass",
    )
    with pytest.raises(InvalidRequest, match=rf"^{re.escape(str(path))}: "):
        Policy.from_toml(path)
    assert main(["policy", "check", str(path)]) == 2


@pytest.mark.parametrize(
    "error",
    [
        IsADirectoryError(21, "Is a directory"),
        OSError(36, "File name too long"),
        PermissionError(13, "Permission denied"),
        ValueError("Invalid TZif file: magic not found"),
        EOFError(),
        KeyError("Europe/Berlin"),
    ],
    ids=type,
)
def test_whatever_zoneinfo_raises_becomes_invalid_request(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    import zoneinfo

    def broken(key: str) -> zoneinfo.ZoneInfo:
        raise error

    monkeypatch.setattr(zoneinfo, "ZoneInfo", broken)
    with pytest.raises(InvalidRequest, match=r"rule 1 \(ci\): field 'timezone'") as info:
        Policy.from_dict(named(timezone="Europe/Berlin"))
    assert info.value.__cause__ is not None
    assert info.value.__cause__.__cause__ is error  # the original, chained
    with pytest.raises(InvalidRequest, match="unknown time zone"):
        hours("08:00-18:00", "Europe/Berlin")


@pytest.mark.parametrize("tz", [5, b"UTC", None, ["UTC"]], ids=repr)
def test_conditions_refuse_a_zone_that_is_neither_tzinfo_nor_name(tz: Any) -> None:
    with pytest.raises(InvalidRequest, match="tzinfo or an IANA name"):
        hours("08:00-18:00", tz)
    with pytest.raises(InvalidRequest, match="tzinfo or an IANA name"):
        weekdays("mon", tz=tz)


@pytest.mark.parametrize(
    "zone",
    [
        "UTC",
        "Europe/Berlin",
        "America/Argentina/ComodRivadavia",
        "Etc/GMT+5",
        "Etc/GMT-14",
        "America/Port-au-Prince",
    ],
)
def test_real_zone_names_still_load(zone: str) -> None:
    assert Policy.from_dict(named(hours="08:00-18:00", timezone=zone)).rules


@pytest.mark.parametrize("path", [None, 3.5, 0, ["gov.toml"], "gov\x00.toml"])
def test_from_toml_refuses_what_is_not_a_file_path(path: Any) -> None:
    with pytest.raises(InvalidRequest):
        Policy.from_toml(path)


def test_from_toml_errors_name_the_file_the_rule_and_the_field(tmp_path: Path) -> None:
    path = tmp_path / "gov.toml"
    path.write_text(
        GOVERNED + '\n[[rule]]\nname = "bad"\nsubjects = ["a"]\naudiences = ["b"]\n'
        'weekdays = ["mon", "someday"]\n',
        encoding="utf-8",
    )
    with pytest.raises(InvalidRequest) as info:
        Policy.from_toml(path)
    message = str(info.value)
    assert message.startswith(f"{path}: rule 3 (bad): "), message
    assert "weekdays" in message
    path.write_text('[[rule]]\nname = "q"\nsubjects = "a"\naudiences = "b"\nmax_active = 0\n')
    with pytest.raises(InvalidRequest, match=r"rule 1 \(q\): .*max_active"):
        Policy.from_toml(path)


# -- explain -----------------------------------------------------------------------
def test_explain_allowed() -> None:
    env = Env(rule(name="office", conditions=[never]), rule())
    explanation = env.broker.explain(**REQUEST)
    assert explanation.allowed
    assert explanation.decision.rule is not None
    assert explanation.decision.rule.label() == "ci"
    assert [r.label() for r in explanation.decision.matched] == ["office", "ci"]
    assert explanation.lease.subject == SUBJECT
    assert explanation.lease.expires_at - explanation.lease.issued_at == 60
    assert explanation.quotas == ()
    text = str(explanation)
    assert text.startswith(f"ALLOWED: {SUBJECT} -> {AUDIENCE} [orders:read]")
    assert "granted by: ci" in text
    assert "rule matched: office" in text
    assert env.stored() == []


def test_explain_denied_lists_the_reasons_and_the_matched_rules() -> None:
    env = Env(rule(owner_required=True), rule(name="night", conditions=[hours("22:00-23:00")]))
    explanation = env.broker.explain(**{**REQUEST, "owner": None, "scopes": ["orders:drop"]})
    assert not explanation.allowed
    assert explanation.decision.rule is None
    assert [r.label() for r in explanation.decision.matched] == ["ci", "night"]
    assert explanation.decision.reasons == (
        "ci does not grant scopes 'orders:drop'",
        "ci requires an owner",
        "night does not grant scopes 'orders:drop'",
        "night: condition hours 22:00-23:00 (UTC) is not met",
    )
    text = str(explanation)
    assert text.startswith("DENIED: ")
    for reason in explanation.decision.reasons:
        assert f"reason: {reason}" in text
    assert "rule matched: ci" in text
    assert "rule matched: night" in text
    # explain judged, but did not deny anything: no event, no stored lease.
    assert env.events == []
    assert env.stored() == []


def test_explain_no_rule() -> None:
    explanation = Env(rule()).broker.explain("svc:nobody", AUDIENCE, ["orders:read"])
    assert not explanation.allowed
    assert explanation.decision.matched == ()
    assert explanation.decision.reasons == ("no rule applies to subject 'svc:nobody'",)


def test_explain_counts_quota_usage() -> None:
    env = Env(rule(max_active=3, max_active_per_owner=2))
    broker = env.broker
    broker.issue(**REQUEST)
    broker.issue(**REQUEST)
    revoked = broker.issue(**{**REQUEST, "owner": "bob@example.com"})
    broker.revoke(revoked)
    broker.issue(**{**REQUEST, "owner": "bob@example.com", "ttl": 10})
    env.clock.advance(11)  # bob's second lease expired (not swept): it no longer counts
    subject_quota = Quota(SUBJECT, None, 3, "ci")
    for_bob = broker.explain(**{**REQUEST, "owner": "bob@example.com"})
    assert for_bob.allowed
    assert for_bob.quotas == ((subject_quota, 2), (Quota(SUBJECT, "bob@example.com", 2, "ci"), 0))
    assert "ci: 2 of 3 active" in str(for_bob).replace("quota of ci", "ci")
    assert "ci: 0 of 2 active" in str(for_bob).replace("quota of ci", "ci")
    for_alice = broker.explain(**REQUEST)
    assert not for_alice.allowed
    alice_quota = Quota(SUBJECT, OWNER, 2, "ci")
    assert for_alice.quotas == ((subject_quota, 2), (alice_quota, 2))
    assert for_alice.decision.reasons == (alice_quota.exceeded().reasons[0],)
    assert "granted by (but a quota is full): ci" in str(for_alice)
    # And issue agrees with explain.
    with pytest.raises(QuotaExceeded):
        broker.issue(**REQUEST)
    broker.issue(**{**REQUEST, "owner": "bob@example.com"})
    assert not broker.explain(**{**REQUEST, "owner": "carol@example.com"}).allowed


def test_explain_never_issues() -> None:
    env = Env(rule(max_active=1))
    before_counts = dict(env.broker.report().churn)
    for _ in range(3):
        assert env.broker.explain(**REQUEST).allowed
    assert env.stored() == []
    assert env.events == []
    assert dict(env.broker.report().churn) == before_counts
    env.broker.issue(**REQUEST)  # the quota of 1 was never used by explain


def test_explain_validates_like_issue() -> None:
    env = Env(rule())
    with pytest.raises(InvalidRequest):
        env.broker.explain(**{**REQUEST, "ttl": -1})
    with pytest.raises(InvalidRequest):
        env.broker.explain(**{**REQUEST, "subject": ""})
    with pytest.raises(InvalidRequest, match="unknown: 'colour'"):
        env.broker.explain(**REQUEST, colour="blue")


@pytest.mark.parametrize("extra", [{"foo": 1}, {"dry_run": True}, {"foo": 1, "bar": 2}])
def test_explain_refuses_what_issue_does_not_take(extra: dict[str, Any]) -> None:
    # A jitbroker error naming each unknown argument, never a TypeError from inside.
    env = Env(rule())
    with pytest.raises(InvalidRequest) as info:
        env.broker.explain(**REQUEST, **extra)
    for name in extra:
        assert repr(name) in str(info.value)
    async_broker = AsyncBroker(issuer=TEST_ISSUER, policy=Policy([rule()]), clock=FakeClock())
    with pytest.raises(InvalidRequest, match="unknown"):
        asyncio.run(async_broker.explain(**REQUEST, **extra))


def test_explain_takes_every_keyword_issue_takes() -> None:
    options = {
        name
        for name, param in inspect.signature(Broker.issue).parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert options == Broker._ISSUE_OPTIONS
    request = {**REQUEST, "task": "t", "renewable": False, "max_ttl": 120, "holder_key": None}
    explanation = Env(rule()).broker.explain(**request)
    assert explanation.allowed


def test_explain_without_a_policy_allows() -> None:
    broker = Broker(issuer=TEST_ISSUER, clock=FakeClock())
    explanation = broker.explain(**REQUEST)
    assert explanation.allowed
    assert explanation.decision.rule is None
    assert str(explanation).startswith("ALLOWED")


# -- renew and attenuate are judged again ------------------------------------------
def test_the_action_is_visible_to_conditions() -> None:
    seen: list[tuple[str, float, str]] = []

    def record(request: AccessRequest) -> bool:
        seen.append((request.action, request.now, request.lease.subject))
        return True

    helper = Rule(subjects="svc:helper", audiences=AUDIENCE, scopes="orders:*")
    env = Env(rule(conditions=[record]), helper)
    t0 = env.clock()
    cred = env.broker.issue(**REQUEST)
    env.clock.advance(10)
    env.broker.renew(cred, ttl=60)
    env.clock.advance(10)
    env.broker.attenuate(cred, scopes=["orders:read"], ttl=20)
    env.broker.attenuate(cred, ttl=20, subject="svc:helper")  # judged by the helper's rule
    assert seen == [
        ("issue", t0, SUBJECT),
        ("renew", t0 + 10, SUBJECT),
        ("attenuate", t0 + 20, SUBJECT),
    ]


def only(action: str) -> Condition:
    def refuse(request: AccessRequest) -> bool:
        return request.action != action

    refuse.__name__ = f"no_{action}"
    return refuse


def test_renew_is_judged_again() -> None:
    env = Env(rule(conditions=[only("renew")]))
    cred = env.broker.issue(**REQUEST)
    env.clock.advance(30)
    with pytest.raises(PolicyDenied) as info:
        env.broker.renew(cred, ttl=60)
    assert info.value.reasons == ("ci: condition no_renew is not met",)
    assert env.broker.lease(cred).expires_at == cred.lease.expires_at  # unchanged
    assert env.actions() == ["issued", "denied"]
    assert env.events[-1].reasons == info.value.reasons


def test_renew_outside_office_hours_is_denied() -> None:
    env = Env(rule(conditions=[hours("08:00-18:00")]))
    env.clock.set(epoch("2026-01-05T17:59:00"))
    cred = env.broker.issue(**{**REQUEST, "ttl": 120})
    env.clock.advance(60)
    with pytest.raises(PolicyDenied, match="hours 08:00-18:00"):
        env.broker.renew(cred)


def test_attenuate_is_judged_again() -> None:
    env = Env(rule(conditions=[only("attenuate")]))
    cred = env.broker.issue(**REQUEST)
    with pytest.raises(PolicyDenied) as info:
        env.broker.attenuate(cred, scopes=["orders:read"])
    assert info.value.reasons == ("ci: condition no_attenuate is not met",)
    assert list(env.broker.leases(parent=cred.lease_id)) == []
    assert env.actions() == ["issued", "denied"]
    assert env.events[-1].lease is not None
    assert env.events[-1].lease.parent == cred.lease_id


def test_delegation_to_another_subject_is_judged_for_that_subject() -> None:
    env = Env(rule(), Rule(subjects="svc:reader", audiences=AUDIENCE, scopes="orders:read"))
    cred = env.broker.issue(**{**REQUEST, "scopes": ["orders:read", "orders:write"]})
    env.broker.attenuate(cred, scopes=["orders:read"], subject="svc:reader")
    with pytest.raises(PolicyDenied) as info:
        env.broker.attenuate(cred, scopes=["orders:write"], subject="svc:reader")
    assert info.value.reasons == ("rule for svc:reader does not grant scopes 'orders:write'",)
    with pytest.raises(PolicyDenied, match="no rule applies to subject 'svc:stranger'"):
        env.broker.attenuate(cred, subject="svc:stranger")


# -- denials in the audit trail ---------------------------------------------------
def test_a_denial_is_audited_with_the_refused_lease() -> None:
    env = Env(rule(owner_required=True))
    error = env.refused(owner=None, task="job-7")
    (event,) = env.events
    assert event.action == "denied"
    assert event.reasons == error.reasons == ("ci requires an owner",)
    assert event.lease is not None
    assert (event.lease.subject, event.lease.task, event.lease.owner) == (SUBJECT, "job-7", None)
    assert env.store.get(event.lease.id) is None
    data = event.to_dict()
    assert data["action"] == "denied"
    assert list(data["reasons"]) == ["ci requires an owner"]
    assert json.loads(json.dumps(data))["reasons"] == ["ci requires an owner"]
    assert data["lease"]["subject"] == SUBJECT
    assert env.broker.report().churn["denied (this broker)"] == 1


def test_a_quota_denial_is_audited_too() -> None:
    env = Env(rule(max_active=1))
    env.broker.issue(**REQUEST)
    error = env.refused()
    assert isinstance(error, QuotaExceeded)
    assert env.actions() == ["issued", "denied"]
    assert env.events[-1].reasons == error.reasons
    assert "at most 1 active leases" in error.reasons[0]


@pytest.fixture
def berlin_policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(GOVERNED, encoding="utf-8")
    return path


def test_a_policy_file_through_the_broker(berlin_policy: Path) -> None:
    env = Env(*Policy.from_toml(berlin_policy).rules, labels={"env": "prod"})
    env.clock.set(epoch("2026-01-06T09:00:00+01:00"))  # Tuesday 09:00 in Berlin
    env.broker.issue(**REQUEST)
    error = env.refused()  # max_active_per_owner = 1
    assert isinstance(error, QuotaExceeded)
    assert error.quota == Quota(SUBJECT, OWNER, 1, "ci")
    env.broker.issue(**{**REQUEST, "owner": "bob@example.com"})
