"""The governance report: what is alive, who owns it, and what looks wrong.

One realistic estate is built on a ``FakeClock`` (a second between issues, so
"oldest" has one answer) and every section of ``broker.report()`` is checked
against it: counts by owner, subject and audience, the findings (no owner, no
purpose, long-lived counting the renewal cap, wildcards, retired keys), the
oldest leases, delegation depths, failed hooks and churn; then ``to_dict()``
(JSON-ready, no token) and ``str()`` (every section titled).
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import attrs
import pytest

from jitbroker import AsyncBroker, Broker, Credential, KeyRing, Lease, Policy, PolicyDenied, Rule
from jitbroker.errors import InvalidRequest
from jitbroker.report import NO_OWNER, build_report
from jitbroker.testing import TEST_ISSUER, FakeClock
from test_secrets import Secrets

ALICE = "alice@example.com"
BOB = "bob@example.com"


@attrs.define
class Estate:
    broker: Broker
    clock: FakeClock
    creds: dict[str, Credential]
    revoked: Credential
    expired: Credential
    old_kid: str

    def ids(self, *names: str) -> list[str]:
        return [self.creds[name].lease_id for name in names]


def failing_hook(lease: Lease) -> None:
    raise RuntimeError("could not drop the database role")


def build_estate(retention: float = 3600) -> Estate:
    clock = FakeClock()
    policy = Policy(
        [
            Rule(subjects="svc:*", audiences=["db:*", "api"], scopes=["orders:*", "read"]),
        ]
    )
    broker = Broker(
        issuer=TEST_ISSUER,
        keys=KeyRing.generate("EdDSA"),
        clock=clock,
        policy=policy,
        retention=retention,
        on_revoke=failing_hook,
        hook_retries=0,
    )

    def issue(subject: str, audience: str, scopes: str, **options: Any) -> Credential:
        clock.advance(1)
        request: dict[str, Any] = {"ttl": 600, "purpose": "nightly export", **options}
        return broker.issue(subject, audience, scopes, **request)

    creds: dict[str, Credential] = {}
    # Signed by a key that is then retired without revoking what it signed.
    creds["legacy"] = issue("svc:legacy", "api", "read", owner=BOB, renewable=False)
    old_kid = broker.keys.active.kid
    broker.rotate_keys()
    assert broker.retire_key(old_kid, revoke=False) == 0
    creds["deploy"] = issue("svc:ci-deploy", "db:orders", "orders:read", owner=ALICE)
    creds["report"] = issue(
        "svc:report", "api", "read", owner=BOB, renewable=False, ttl=60, purpose=None
    )
    creds["stray"] = issue("svc:stray", "db:orders", "orders:*", purpose=None)
    creds["wide"] = issue("svc:ci-deploy", "db:*", "orders:read", owner=ALICE, max_ttl=900)
    creds["capped"] = issue(
        "svc:ci-deploy", "db:orders", "orders:read", owner=ALICE, ttl=300, max_ttl=600
    )
    clock.advance(1)
    creds["child"] = broker.attenuate(creds["deploy"], ttl=300)
    creds["grandchild"] = broker.attenuate(creds["child"], subject="svc:helper", ttl=200)
    broker.renew(creds["deploy"], ttl=600)
    revoked = issue("svc:ci-deploy", "db:orders", "orders:read", owner=ALICE)
    broker.revoke(revoked, reason="done")  # the on_revoke hook fails and is parked
    expired = issue("svc:ci-deploy", "db:orders", "orders:read", owner=ALICE, ttl=5)
    with pytest.raises(PolicyDenied):
        issue("intruder", "db:orders", "orders:read")
    clock.advance(10)
    assert [lease.id for lease in broker.sweep()] == [expired.lease_id]
    return Estate(broker, clock, creds, revoked, expired, old_kid)


@pytest.fixture
def estate() -> Estate:
    return build_estate()


def ids(leases: tuple[Lease, ...]) -> list[str]:
    return [lease.id for lease in leases]


def test_counts_by_owner_subject_and_audience(estate: Estate) -> None:
    report = estate.broker.report()
    active = estate.ids("legacy", "deploy", "report", "stray", "wide", "capped")
    active += estate.ids("child", "grandchild")
    assert sorted(ids(report.active)) == sorted(active)
    assert dict(report.by_owner) == {ALICE: 5, BOB: 2, NO_OWNER: 1}
    assert list(report.by_owner) == [ALICE, BOB, NO_OWNER]  # most first
    assert dict(report.by_subject) == {
        "svc:ci-deploy": 4,
        "svc:legacy": 1,
        "svc:report": 1,
        "svc:stray": 1,
        "svc:helper": 1,
    }
    assert dict(report.by_audience) == {"db:orders": 5, "api": 2, "db:*": 1}
    assert sum(report.by_owner.values()) == len(report.active)


def test_findings(estate: Estate) -> None:
    report = estate.broker.report()
    assert ids(report.unowned) == estate.ids("stray")
    assert ids(report.no_purpose) == estate.ids("report", "stray")
    assert sorted(ids(report.broad)) == sorted(estate.ids("stray", "wide"))
    assert report.retired_key is not None  # a broker knows its key ring
    assert ids(report.retired_key) == estate.ids("legacy")
    assert estate.creds["legacy"].lease.key_id == estate.old_kid


def test_long_lived_counts_the_renewal_cap(estate: Estate) -> None:
    broker = estate.broker
    # Default threshold 3600: a renewable lease capped at the broker's max_ttl of
    # 3600 is not over it; nothing here may live longer.
    assert broker.report().long_lived == ()
    assert broker.report().long_ttl == 3600
    # At 600 s: every renewable lease whose cap passes 600 s counts, though its
    # current TTL is shorter; non-renewable ones count only their TTL.
    long_lived = ids(broker.report(long_ttl=600).long_lived)
    assert sorted(long_lived) == sorted(
        estate.ids("deploy", "stray", "wide", "child", "grandchild")
    )
    assert "capped" not in long_lived  # its cap is exactly 600 s
    assert estate.creds["capped"].lease_id not in long_lived
    at_599 = ids(broker.report(long_ttl=timedelta(seconds=599)).long_lived)
    assert estate.creds["capped"].lease_id in at_599
    assert estate.creds["legacy"].lease_id in at_599  # non-renewable, ttl 600
    assert estate.creds["report"].lease_id not in ids(broker.report(long_ttl=60).long_lived)
    assert estate.creds["report"].lease_id in ids(broker.report(long_ttl=59).long_lived)


def test_oldest_ordering_and_limit(estate: Estate) -> None:
    broker = estate.broker
    expected = estate.ids("legacy", "deploy", "report", "stray", "wide", "capped")
    assert ids(broker.report(oldest=3).oldest) == expected[:3]
    assert ids(broker.report().oldest)[:6] == expected
    assert len(broker.report().oldest) == 8  # all of them: fewer than 10
    assert broker.report(oldest=0).oldest == ()
    issued = [lease.issued_at for lease in broker.report().oldest]
    assert issued == sorted(issued)


def test_delegated_depths(estate: Estate) -> None:
    report = estate.broker.report()
    assert dict(report.delegated) == {
        estate.creds["child"].lease_id: 1,
        estate.creds["grandchild"].lease_id: 2,
    }
    estate.broker.revoke(estate.creds["child"])
    assert estate.broker.report().delegated == {}


def test_failed_hooks(estate: Estate) -> None:
    (failed,) = estate.broker.report().failed_hooks or ()
    assert failed.event == "on_revoke"
    assert failed.hook == "failing_hook"
    assert failed.lease.id == estate.revoked.lease_id
    assert failed.attempts == 1
    assert failed.error == "RuntimeError: could not drop the database role"


def test_churn(estate: Estate) -> None:
    churn = dict(estate.broker.report().churn)
    assert churn == {
        "active": 8,
        "revoked (retained)": 1,
        "expired (retained)": 1,
        "issued (this broker)": 8,
        "renewed (this broker)": 1,
        "attenuated (this broker)": 2,
        "revoked (this broker)": 1,
        "expired (this broker)": 1,
        "denied (this broker)": 1,
        "audit sink failures (this broker)": 0,
    }


def test_dead_leases_leave_the_churn_once_purged() -> None:
    estate = build_estate(retention=0)
    estate.clock.advance(600)  # every lease is past exp + leeway now
    estate.broker.sweep()
    churn = estate.broker.report().churn
    assert (churn["active"], churn["revoked (retained)"], churn["expired (retained)"]) == (0, 0, 0)
    assert churn["issued (this broker)"] == 8  # the broker's counters remain


def test_to_dict_is_json_ready_and_holds_no_token(estate: Estate) -> None:
    broker = estate.broker
    report = broker.report(long_ttl=600, oldest=3)
    data = report.to_dict()
    text = json.dumps(data)
    assert json.loads(text) == data
    assert data["active"] == 8
    assert data["generated_at"] == "2026-01-01T00:00:20Z"
    assert data["long_ttl_seconds"] == 600
    assert data["by_owner"] == {ALICE: 5, BOB: 2, NO_OWNER: 1}
    assert [x["id"] for x in data["oldest"]] == estate.ids("legacy", "deploy", "report")
    assert [x["id"] for x in data["unowned"]] == estate.ids("stray")
    assert [x["id"] for x in data["retired_key"]] == estate.ids("legacy")
    assert {x["id"] for x in data["broad_scopes"]} == set(estate.ids("stray", "wide"))
    assert data["delegated"] == {estate.ids("child")[0]: 1, estate.ids("grandchild")[0]: 2}
    (hook,) = data["failed_hooks"]
    assert hook["lease"] == estate.revoked.lease_id
    assert data["churn"]["denied (this broker)"] == 1
    summary = data["oldest"][0]
    assert summary["status"] == "active"
    assert summary["owner"] == BOB
    assert "token" not in summary
    secrets = Secrets(broker.keys)
    secrets.add(*estate.creds.values(), estate.revoked, estate.expired)
    secrets.check("report.to_dict()", text)
    secrets.check("str(report)", str(report))
    secrets.check_object("report", report)


def test_str_titles_every_section(estate: Estate) -> None:
    text = str(estate.broker.report(long_ttl=600))
    for title in (
        "jitbroker report at 2026-01-01T00:00:20Z: 8 active leases",
        "by owner:",
        "by subject:",
        "by audience:",
        "leases with no owner: 1",
        "leases with no purpose: 2",
        "leases that may live longer than 600s: 5",
        "leases with wildcard scopes or audience: 2",
        "leases signed by a retired key: 1",
        "oldest active leases: 8",
        "delegated leases: 2 (deepest chain: 2)",
        "failed hooks: 1",
        "churn: active 8",
    ):
        assert title in text, title
    assert NO_OWNER in text
    assert "could not drop the database role" in text


def test_an_empty_report() -> None:
    broker = Broker(issuer=TEST_ISSUER, clock=FakeClock())
    report = broker.report()
    assert report.active == report.oldest == report.unowned == ()
    assert dict(report.by_owner) == {}
    assert report.delegated == {}
    text = str(report)
    assert "0 active leases" in text
    assert "(none)" in text
    assert "delegated leases" not in text
    assert json.loads(json.dumps(report.to_dict()))["active"] == 0


@pytest.mark.parametrize(
    "options",
    [{"long_ttl": 0}, {"long_ttl": -5}, {"oldest": -1}, {"oldest": True}, {"oldest": 1.5}],
)
def test_bad_report_options(options: dict[str, Any]) -> None:
    broker = Broker(issuer=TEST_ISSUER, clock=FakeClock())
    with pytest.raises(InvalidRequest):
        broker.report(**options)


def test_build_report_without_keys_skips_the_retired_key_finding(estate: Estate) -> None:
    leases = list(estate.broker.leases(include_inactive=True))
    report = build_report(leases, now=estate.clock())
    assert report.retired_key is None  # unknown without the key ring, not "none"
    assert report.failed_hooks is None
    assert report.to_dict()["retired_key"] is None
    assert "leases signed by a retired key: not known (give the key ring: --keys DIR)" in str(
        report
    )
    assert "failed hooks: not known here" in str(report)
    assert len(report.active) == 8
    assert "issued (this broker)" not in report.churn


def test_the_async_broker_reports_the_same() -> None:
    clock = FakeClock()

    async def main() -> tuple[dict[str, Any], str, str]:
        broker = AsyncBroker(issuer=TEST_ISSUER, clock=clock)
        root = await broker.issue("svc:a", "api", "read", ttl=60, owner=ALICE)
        child = await broker.attenuate(root, ttl=30)
        await broker.issue("svc:b", "api", "*", ttl=60)
        report = await broker.report()
        return report.to_dict(), root.lease_id, child.lease_id

    data, root, child = asyncio.run(main())
    assert data["active"] == 3
    assert data["by_owner"] == {ALICE: 2, NO_OWNER: 1}
    assert data["delegated"] == {child: 1}
    assert len(data["broad_scopes"]) == 1
    assert data["churn"]["attenuated (this broker)"] == 1
    assert root in [x["id"] for x in data["oldest"]]
