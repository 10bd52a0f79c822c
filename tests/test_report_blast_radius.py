"""The report's blast radius: per subject, the (audience, scope) pairs its
active leases reach (its own and those delegated to it), the deepest
delegation chain it is in, and, with a policy, what the policy would grant it.

Built on a real broker over a MemoryStore with a fake clock (and the CLI on a
SQLite file): several leases of one subject, a delegated child and grandchild,
a revoked and an expired lease (not counted), wildcards (flagged, and an NHI5
finding), the ordering, the top-N bound with its totals, the JSON shape, the
text section, the HTML table and chart marks, and ``jitbroker report --json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from jitbroker import Broker, KeyRing, Policy, Rule
from jitbroker.cli import main
from jitbroker.errors import InvalidRequest
from jitbroker.report import BlastRadius, Report, build_report
from jitbroker.report_html import blast_rows, render_html
from jitbroker.stores import SQLiteStore
from jitbroker.testing import TEST_ISSUER, FakeClock
from test_report_html import Page

DEPLOY, HELPER, SUB = "svc:ci-deploy", "svc:helper", "svc:sub-helper"


def make_broker(clock: FakeClock, store: Any = None) -> Broker:
    options: dict[str, Any] = {} if store is None else {"store": store}
    return Broker(issuer=TEST_ISSUER, keys=KeyRing.generate(), clock=clock, **options)


def estate(broker: Broker, clock: FakeClock) -> dict[str, str]:
    """Lease ids by name: three leases of DEPLOY, one delegated to HELPER and on
    to SUB, a wildcard subject, a small one, and a revoked and an expired lease."""
    ids: dict[str, str] = {}

    def issue(name: str, subject: str, audience: str, scopes: str, ttl: float = 600) -> None:
        clock.advance(1)
        ids[name] = broker.issue(subject, audience, scopes, ttl, owner="alice").lease_id

    issue("orders", DEPLOY, "db:orders", "orders:read orders:write")
    issue("orders-again", DEPLOY, "db:orders", "orders:read", ttl=900)
    issue("api", DEPLOY, "api", "read")
    clock.advance(1)
    child = broker.attenuate(ids["orders"], subject=HELPER, scopes=["orders:read"], ttl=300)
    grandchild = broker.attenuate(child, subject=SUB, ttl=200)
    ids["child"], ids["grandchild"] = child.lease_id, grandchild.lease_id
    issue("wild", "svc:wild", "db:*", "orders:* read")
    issue("small", "svc:small", "api", "read")
    issue("revoked", "svc:small", "db:orders", "orders:write")
    broker.revoke(ids["revoked"], reason="done")
    issue("expired", "svc:small", "db:billing", "billing:read", ttl=5)
    issue("gone", "svc:gone", "db:billing", "billing:read", ttl=5)
    clock.advance(10)
    return ids


def report(broker: Broker, clock: FakeClock, **options: Any) -> Report:
    leases = broker.leases(include_inactive=True)
    return build_report(leases, now=clock(), **options)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def built(clock: FakeClock) -> tuple[Broker, dict[str, str]]:
    broker = make_broker(clock)
    return broker, estate(broker, clock)


def by_subject(rep: Report) -> dict[str, BlastRadius]:
    return {radius.subject: radius for radius in rep.blast_radius}


def test_a_subject_reaches_the_union_of_its_active_leases(
    built: tuple[Broker, dict[str, str]], clock: FakeClock
) -> None:
    broker, ids = built
    deploy = by_subject(report(broker, clock))[DEPLOY]
    assert deploy.pairs == (
        ("api", "read"),
        ("db:orders", "orders:read"),
        ("db:orders", "orders:write"),
    )
    assert (deploy.audiences, deploy.scopes) == (
        ("api", "db:orders"),
        ("orders:read", "orders:write", "read"),
    )
    assert (deploy.size, deploy.wildcards) == (3, ())
    assert deploy.leases == (ids["orders"], ids["orders-again"], ids["api"])
    lease = broker.lease(ids["orders-again"])  # the longest: 900 s
    assert deploy.remaining == pytest.approx(lease.expires_at - clock())


def test_the_actor_reaches_what_was_delegated_to_it_and_depth_covers_the_chain(
    built: tuple[Broker, dict[str, str]], clock: FakeClock
) -> None:
    broker, ids = built
    radii = by_subject(report(broker, clock))
    assert radii[HELPER].pairs == (("db:orders", "orders:read"),)
    assert radii[HELPER].leases == (ids["child"],)
    assert radii[SUB].pairs == (("db:orders", "orders:read"),)
    # The chain DEPLOY -> HELPER -> SUB is two links deep, for principal and actors.
    assert {s: radii[s].depth for s in (DEPLOY, HELPER, SUB)} == dict.fromkeys(
        (DEPLOY, HELPER, SUB), 2
    )
    assert radii["svc:small"].depth == radii["svc:wild"].depth == 0
    broker.revoke(ids["child"], reason="done")  # and the grandchild with it
    radii = by_subject(report(broker, clock))
    assert HELPER not in radii
    assert SUB not in radii
    assert radii[DEPLOY].depth == 0


def test_revoked_and_expired_leases_are_not_counted(
    built: tuple[Broker, dict[str, str]], clock: FakeClock
) -> None:
    broker, ids = built
    rep = report(broker, clock)
    small = by_subject(rep)["svc:small"]
    assert small.pairs == (("api", "read"),)  # not db:orders (revoked), not billing (expired)
    assert small.leases == (ids["small"],)
    assert "svc:gone" not in by_subject(rep)  # only an expired lease
    assert all(pair[0] != "db:billing" for r in rep.blast_radius for pair in r.pairs)


def test_wildcards_are_kept_as_written_flagged_and_a_finding(
    built: tuple[Broker, dict[str, str]], clock: FakeClock
) -> None:
    broker, ids = built
    rep = report(broker, clock)
    wild = by_subject(rep)["svc:wild"]
    assert wild.pairs == (("db:*", "orders:*"), ("db:*", "read"))
    assert wild.wildcards == ("db:*", "orders:*")
    found = {f.kind: f for f in rep.findings()}["overprivileged"]
    assert (found.nhi, found.risk, found.count) == ("NHI5", "Overprivileged NHI", 1)
    assert found.leases == (ids["wild"],)
    assert found.title == "subjects reaching a wildcard or more than 5 audiences (blast radius)"
    # More audiences than the threshold is overprivileged too, wildcard or not.
    wide = report(broker, clock, wide_audiences=1)
    assert list(wide.overprivileged) == [DEPLOY, "svc:wild"]
    assert {f.kind: f for f in wide.findings()}["overprivileged"].count == 2


def test_widest_first_bounded_to_top_n_with_the_totals(
    built: tuple[Broker, dict[str, str]], clock: FakeClock
) -> None:
    broker, _ = built
    rep = report(broker, clock)
    order = [(r.subject, r.size, len(r.leases)) for r in rep.blast_radius]
    assert order == [
        (DEPLOY, 3, 3),
        ("svc:wild", 2, 1),
        (HELPER, 1, 1),  # ties on pairs and leases: by name
        ("svc:small", 1, 1),
        (SUB, 1, 1),
    ]
    top = report(broker, clock, top=2)
    assert [r.subject for r in top.blast_radius] == [DEPLOY, "svc:wild"]
    assert dict(top.blast_totals) == {
        "subjects": 5,
        "shown": 2,
        "pairs": 5,  # distinct across subjects: api/read, 2 x db:orders, 2 x db:*
        "wildcard_subjects": 1,
        "overprivileged": 1,
    }
    assert report(broker, clock, top=0).blast_radius == ()
    for bad in (-1, True, 1.5):
        with pytest.raises(InvalidRequest, match="top must be a whole number"):
            report(broker, clock, top=bad)


def test_a_policy_shows_what_it_would_grant_next_to_what_is_reached(
    built: tuple[Broker, dict[str, str]], clock: FakeClock
) -> None:
    broker, _ = built
    policy = Policy(
        [
            Rule(["svc:ci-*"], ["db:orders"], ["orders:read", "orders:write"]),
            Rule(["svc:ci-deploy"], ["api", "api:admin"], ["read"]),
            Rule(["svc:wild"], ["db:*"], ["orders:read"]),
        ]
    )
    radii = by_subject(report(broker, clock, policy=policy))
    deploy = radii[DEPLOY]
    assert deploy.grantable == (
        ("api", "read"),
        ("api:admin", "read"),
        ("db:orders", "orders:read"),
        ("db:orders", "orders:write"),
    )
    assert deploy.grantable_audiences == ("api", "api:admin", "db:orders")
    assert deploy.outside_policy == ()
    # orders:* is wider than the rule's orders:read; read on db:* no rule grants.
    assert radii["svc:wild"].outside_policy == (("db:*", "orders:*"), ("db:*", "read"))
    assert radii["svc:small"].grantable == ()  # no rule applies: nothing is grantable
    assert radii["svc:small"].outside_policy == (("api", "read"),)
    assert by_subject(report(broker, clock))[DEPLOY].grantable is None
    with pytest.raises(InvalidRequest, match="policy must be a Policy"):
        report(broker, clock, policy="policy.toml")


def test_json_shape(built: tuple[Broker, dict[str, str]], clock: FakeClock) -> None:
    broker, ids = built
    data = json.loads(json.dumps(report(broker, clock, top=2).to_dict()))
    first = data["blast_radius"][0]
    assert set(first) == {
        "subject", "size", "audience_count", "scope_count", "pairs", "audiences", "scopes",
        "wildcards", "delegation_depth", "active_leases", "lease_ids",
        "longest_remaining_seconds", "expires_at", "grantable", "outside_policy",
    }  # fmt: skip
    assert first["subject"] == DEPLOY
    assert first["pairs"] == [
        ["api", "read"],
        ["db:orders", "orders:read"],
        ["db:orders", "orders:write"],
    ]
    assert (first["size"], first["audience_count"], first["scope_count"]) == (3, 2, 3)
    assert (first["delegation_depth"], first["active_leases"]) == (2, 3)
    assert first["lease_ids"] == [ids["orders"], ids["orders-again"], ids["api"]]
    assert first["expires_at"].endswith("Z")
    assert first["grantable"] is None
    assert first["outside_policy"] is None
    assert data["blast_radius"][1]["wildcards"] == ["db:*", "orders:*"]
    assert data["blast_radius_totals"] == {
        "subjects": 5,
        "shown": 2,
        "pairs": 5,
        "wildcard_subjects": 1,
        "overprivileged": 1,
        "wide_audiences": 5,
        "overprivileged_subjects": ["svc:wild"],
    }
    policy = Policy([Rule(["svc:*"], ["db:orders"], ["orders:read"])])
    granted = report(broker, clock, policy=policy).to_dict()["blast_radius"][0]
    assert granted["grantable"] == {
        "audiences": ["db:orders"],
        "scopes": ["orders:read"],
        "pairs": [["db:orders", "orders:read"]],
    }
    assert granted["outside_policy"] == [["api", "read"], ["db:orders", "orders:write"]]


def test_text_section(built: tuple[Broker, dict[str, str]], clock: FakeClock) -> None:
    broker, _ = built
    text = str(report(broker, clock, top=2))
    section = text.split("\nblast radius ", 1)[1].split("\n\n", 1)[0].splitlines()
    assert section[0] == ("(top 2 of 5 subjects; 5 distinct audience x scope pairs reachable):")
    assert section[1].startswith(
        f"  {DEPLOY}  3 pairs (2 audiences x 3 scopes)  3 leases  depth 2  longest "
    )
    assert section[2:4] == ["    api: read", "    db:orders: orders:read orders:write"]
    assert section[4].startswith("  svc:wild  2 pairs")
    assert "WILDCARD db:* orders:*  OVERPRIVILEGED" in section[4]
    assert len(section) == 6  # two subjects, and wild's one audience
    assert "(none)" in str(build_report([], now=0.0)).split("\nblast radius ", 1)[1]


def test_html_table_and_chart_marks(built: tuple[Broker, dict[str, str]], clock: FakeClock) -> None:
    broker, _ = built
    rep = report(broker, clock, top=3)
    page = Page(render_html(rep))
    assert page.marks["blast"] == [(DEPLOY, 3), ("svc:wild", 2), (HELPER, 1)]
    assert page.marks["blast"] == blast_rows(rep.blast_radius)
    shown = "".join(page.text)
    assert "Blast radius" in shown
    assert "db:orders: orders:read orders:write" in shown  # the pairs in the table
    assert "5 distinct pairs reachable across 5 subjects, 1 overprivileged" in shown
    assert "policy grants" not in shown
    policy = Policy([Rule(["svc:*"], ["db:orders"], ["orders:read"])])
    shown = "".join(Page(render_html(report(broker, clock, policy=policy))).text)
    assert "reached outside the policy" in shown
    assert "api:read db:orders:orders:write" in shown
    assert Page(render_html(build_report([], now=0.0))).marks.get("blast") is None


def test_cli_json_has_the_blast_radius_with_policy_and_top(
    tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "leases.db"
    store = SQLiteStore(db)
    clock.set(time.time() - 100)  # the CLI reads the wall clock: the 5 s leases are past
    estate(make_broker(clock, store), clock)
    store.close()
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[[rule]]\nsubjects = ["svc:*"]\naudiences = ["db:orders"]\nscopes = ["orders:read"]\n'
    )
    argv = ["report", "--store", str(db), "--json", "--top", "1", "--policy", str(policy)]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["subject"] for r in data["blast_radius"]] == [DEPLOY]
    assert data["blast_radius"][0]["grantable"]["pairs"] == [["db:orders", "orders:read"]]
    assert data["blast_radius_totals"]["subjects"] == 5
    assert "overprivileged" in {f["kind"] for f in data["findings"]}
    assert main(["report", "--store", str(db)]) == 0
    assert "\nblast radius (top 5 of 5 subjects" in capsys.readouterr().out
    assert main(["report", "--store", str(db), "--policy", str(tmp_path / "none.toml")]) == 2
    assert "cannot read the policy file" in capsys.readouterr().err
