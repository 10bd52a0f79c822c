"""``render_html`` / ``jitbroker report --html``: one self-contained page.

The page is parsed with ``html.parser``: no script, no event handler, no
reference to anything outside it; every lease value escaped (hostile subjects,
owners, audiences, scopes, purposes and tasks render as text); one chart mark
per row of its data table, with the numbers the report holds. The timeline is
checked against hand-computed slices, the findings against their OWASP NHI
mapping. Then the page is rendered by a real headless Chromium (Debian's
``chromium``; skipped locally without it, a failure under ``CI=true``): its
DOM after rendering holds the same marks, the console stays silent (checked to
catch a CSP violation), and a screenshot is kept as test-artifacts/report.png.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

from jitbroker import Broker, KeyRing, Lease
from jitbroker.errors import InvalidRequest
from jitbroker.report import NHI_RISKS, NO_OWNER, Report
from jitbroker.report_html import (
    TTL_BUCKETS,
    blast_rows,
    nhi_rows,
    owner_rows,
    render_html,
    timeline,
    ttl_rows,
    write_html,
)
from jitbroker.stores import SQLiteStore
from jitbroker.testing import TEST_ISSUER, FakeClock
from test_governance_report import Estate, build_estate
from test_secrets import Secrets

ROOT = Path(__file__).resolve().parents[1]
DAY = 86_400.0
HOSTILE = {
    "subject": "<script>alert(1)</script>",
    "audience": "x' onmouseover='alert(2)",
    "scope": "<svg/onload=alert(3)>",
    "owner": '"onload=alert(4) x="',
    "purpose": "</title><svg onload=alert(5)>",
    "task": "&amp; <!-- -->",
}
# Attributes that make a browser fetch or navigate (src, href, ...) and CSS url().
URL_ATTRIBUTES = {"src", "href", "xlink:href", "action", "formaction", "srcset", "poster"}
URL_ATTRIBUTES |= {"data", "background", "cite", "ping", "manifest", "codebase"}
FETCHING_TAGS = {"script", "link", "img", "iframe", "object", "embed", "base", "form", "image"}
FETCHING_TAGS |= {"audio", "video", "source", "use", "frame", "track", "picture"}


class Page(HTMLParser):
    """What a test needs to know of a page: tags, attributes, text, style, marks."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: Counter[str] = Counter()
        self.attributes: list[tuple[str, str, str]] = []  # (tag, name, value)
        self.text: list[str] = []
        self.style: list[str] = []
        self.marks: dict[str, list[tuple[str, int]]] = {}
        self._in: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        self._in.append(tag)
        values = {name: value or "" for name, value in attrs}
        self.attributes += [(tag, name, value) for name, value in values.items()]
        if "mark" in values.get("class", "").split():
            chart = values["data-chart"]
            self.marks.setdefault(chart, []).append(
                (values["data-label"], int(values["data-value"]))
            )

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        self._in.pop()

    def handle_endtag(self, tag: str) -> None:
        while self._in and self._in.pop() != tag:
            pass

    def handle_data(self, data: str) -> None:
        (self.style if self._in and self._in[-1] == "style" else self.text).append(data)

    def values(self, chart: str) -> list[int]:
        return [value for _, value in self.marks.get(chart, [])]


def issue_hostile(broker: Broker) -> None:
    """A lease whose every free-text field tries to break out of the markup."""
    h = HOSTILE
    broker.issue(
        h["subject"], h["audience"], [h["scope"]], 60,
        owner=h["owner"], purpose=h["purpose"], task=h["task"],
    )  # fmt: skip


def hostile_broker(clock: FakeClock) -> Broker:
    broker = Broker(issuer=TEST_ISSUER, keys=KeyRing.generate(), clock=clock)
    issue_hostile(broker)
    return broker


def assert_self_contained(page: Page, text: str) -> None:
    fetching = set(page.tags) & FETCHING_TAGS
    assert not fetching, f"elements that fetch or run something: {fetching}"
    for tag, name, value in page.attributes:
        assert not name.startswith("on"), (tag, name)  # no event handler
        assert name not in URL_ATTRIBUTES, (tag, name, value)
        assert name != "xmlns" or value == "", (tag, name)
        if name == "style":
            assert "url(" not in value.lower(), (tag, value)
        if name == "http-equiv":
            assert value.lower() == "content-security-policy", value
    css = "".join(page.style).lower()
    assert "url(" not in css
    assert "@import" not in css
    assert "@font-face" not in css
    assert page.tags["style"] == 1
    assert page.tags["meta"] == 3
    csp = [v for _, n, v in page.attributes if n == "content" and "default-src" in v]
    assert csp == ["default-src 'none'; style-src 'unsafe-inline'; img-src data:"]
    assert "http://" not in text
    assert "https://" not in text


def expected_marks(report: Report, buckets: int = 28) -> dict[str, list[int]]:
    return {
        "timeline": [n for _, n in timeline(report.leases, report.generated_at, 7 * DAY, buckets)],
        "owners": [n for _, n in owner_rows(report.by_owner, 10)],
        "ttl": [n for _, n in ttl_rows(report.active)],
        "nhi": [n for _, n, _ in nhi_rows(report.findings())],
        "blast": [n for _, n in blast_rows(report.blast_radius)],
    }


@pytest.fixture
def estate() -> Estate:
    return build_estate()


# -- the findings and their OWASP NHI risks -----------------------------------------------
def test_findings_map_to_owasp_nhi_risks(estate: Estate) -> None:
    report = estate.broker.report(long_ttl=600)
    found = {f.kind: f for f in report.findings()}
    assert {kind: f.nhi for kind, f in found.items()} == {
        "unowned": "NHI1",
        "failed_hooks": "NHI1",
        "awaiting_hooks": "NHI1",
        "never_used": "NHI1",
        "unused": "NHI1",
        "broad": "NHI5",
        "overprivileged": "NHI5",
        "long_lived": "NHI7",
        "retired_key": "NHI7",
        "deep_delegation": "NHI9",
        "foreign_audience": "NHI9",
        "no_purpose": "NHI10",
    }
    assert found["unowned"].leases == tuple(estate.ids("stray"))
    assert found["retired_key"].leases == tuple(estate.ids("legacy"))
    assert found["deep_delegation"].leases == tuple(estate.ids("grandchild"))  # depth 2, not 1
    assert found["failed_hooks"].leases == (estate.revoked.lease_id,)
    assert (found["failed_hooks"].count, found["awaiting_hooks"].count) == (1, 0)
    assert found["long_lived"].title == "leases that may live longer than 600s"
    assert found["broad"].risk == "Overprivileged NHI"
    counts = {nhi: n for nhi, n, _ in nhi_rows(report.findings())}
    assert list(counts) == [f"NHI{i}" for i in range(1, 11)]
    assert counts == {
        **dict.fromkeys(NHI_RISKS, 0),
        "NHI1": 2,  # stray; the parked hook
        "NHI5": 4,  # leases stray, wide; subjects svc:stray, svc:ci-deploy (their blast radius)
        "NHI7": 6,  # 5 long-lived, legacy's retired key
        "NHI9": 1,
        "NHI10": 2,
    }


def test_json_report_carries_the_findings_and_keeps_its_keys(estate: Estate) -> None:
    data = json.loads(json.dumps(estate.broker.report().to_dict()))
    assert {"active", "by_owner", "unowned", "retired_key", "failed_hooks"} <= set(data)
    by_kind = {f["kind"]: f for f in data["findings"]}
    assert by_kind["unowned"] == {
        "kind": "unowned",
        "nhi": "NHI1",
        "risk": "Improper Offboarding",
        "title": "leases with no owner",
        "count": 1,
        "leases": estate.ids("stray"),
    }


def test_unknown_findings_say_so() -> None:
    from jitbroker.report import build_report

    report = build_report([], now=0.0)  # the CLI without --keys: no key ring, no hook counts
    unknown = {f.kind for f in report.findings() if f.count is None}
    usage = {"never_used", "unused", "foreign_audience"}  # and no usage
    assert unknown == {"retired_key", "failed_hooks", "awaiting_hooks", *usage}
    assert "not known here" in "".join(Page(render_html(report)).text)


# -- the numbers behind the charts -----------------------------------------------------
def lease(n: int, issued: float, expires: float, revoked: float | None = None) -> Lease:
    return Lease(
        f"{n:032x}", "svc:a", "api", ("read",), issued, expires, expires, revoked_at=revoked
    )


def test_timeline_counts_leases_active_at_some_moment_of_each_slice() -> None:
    now, window, buckets = 1000.0, 100.0, 10  # slices [900, 910), ..., [990, 1000)
    leases = [
        lease(1, 905, 925),  # slices 0, 1, 2
        lease(2, 910, 920),  # exactly slice 1: issued at its start, dead at its end
        lease(3, 950, 2000, revoked=955),  # revoked: slice 5 only
        lease(4, 800, 900),  # dead at the window's start: nowhere
        lease(5, 990, 5000),  # still active: the last slice
        lease(6, 960, 960),  # never active
        lease(7, 1000, 1100),  # issued at now: active now, so in the last slice
        lease(8, 850, 3000),  # before the window and through it: everywhere
    ]
    got = timeline(leases, now, window, buckets)
    assert [start for start, _ in got] == [900 + 10 * i for i in range(10)]
    assert [n for _, n in got] == [2, 3, 2, 1, 1, 2, 1, 1, 1, 3]


def test_owner_rows_top_n_then_other_then_no_owner() -> None:
    by_owner = {"a": 5, NO_OWNER: 4, "b": 3, "c": 2, "d": 1}
    assert owner_rows(by_owner, 2) == [("a", 5), ("b", 3), ("other (2 owners)", 3), (NO_OWNER, 4)]
    assert owner_rows(by_owner, 10) == [("a", 5), ("b", 3), ("c", 2), ("d", 1), (NO_OWNER, 4)]
    assert owner_rows({}, 10) == []


def test_ttl_buckets_have_inclusive_lower_bounds() -> None:
    ttls = [1, 59, 60, 299, 300, 900, 3599, 3600, 14_400, 86_399, 86_400, 10 * DAY]
    rows = ttl_rows(lease(i, 100, 100 + ttl) for i, ttl in enumerate(ttls))
    assert [label for label, _ in rows] == [label for label, _ in TTL_BUCKETS]
    assert [n for _, n in rows] == [2, 2, 1, 2, 1, 2, 2]


# -- the page ------------------------------------------------------------------------
def test_page_is_self_contained_and_holds_no_secret(estate: Estate) -> None:
    text = render_html(estate.broker.report())
    assert text.startswith('<!DOCTYPE html>\n<html lang="en">')
    page = Page(text)
    assert_self_contained(page, text)
    assert page.tags["svg"] == 5
    assert page.tags["figure"] == 5
    for tag, name, value in page.attributes:
        if tag == "svg" and name == "aria-label":
            assert value.startswith(("Active leases", "TTL", "Findings", "Blast radius"))
    assert page.tags["title"] >= 1 + 5  # the page's and one per chart, plus one per mark
    secrets = Secrets(estate.broker.keys)
    secrets.add(*estate.creds.values(), estate.revoked, estate.expired)
    secrets.check("render_html(report)", text)
    assert "could not drop the database role" not in text  # a hook's error text stays out


def test_every_lease_value_is_escaped() -> None:
    clock = FakeClock()
    text = render_html(hostile_broker(clock).report())
    page = Page(text)
    assert_self_contained(page, text)
    assert page.tags["script"] == 0
    assert page.tags["img"] == 0
    assert page.tags["svg"] == 5  # the scope's and the purpose's <svg ...> stayed text
    assert page.tags["title"] == 1 + 5 + sum(len(m) for m in page.marks.values())
    shown = "".join(page.text)
    for field, value in HOSTILE.items():
        assert value in shown, field  # rendered as text, exactly
        if field != "task":
            assert value not in text, field  # never raw in the source
    assert "&amp;amp; &lt;!-- --&gt;" in text
    assert ('"onload=alert(4) x="', 1) in page.marks["owners"]  # a data-label, escaped


def test_marks_equal_the_data(estate: Estate) -> None:
    report = estate.broker.report(long_ttl=600)
    page = Page(render_html(report))
    expected = expected_marks(report)
    assert {chart: page.values(chart) for chart in expected} == expected
    assert len(page.marks["timeline"]) == 28
    assert len(page.marks["ttl"]) == len(TTL_BUCKETS)
    assert len(page.marks["nhi"]) == 10
    assert sum(page.values("owners")) == sum(page.values("ttl")) == len(report.active) == 8
    assert next(label for label, _ in page.marks["nhi"]) == "NHI1 Improper Offboarding"
    # 1-5 min: report (60 s) and grandchild (200 s); 5-15 min: the rest (300 s to ~605 s).
    assert page.values("ttl") == [0, 2, 6, 0, 0, 0, 0]


def test_timeline_draws_the_history_the_store_still_holds() -> None:
    clock = FakeClock()
    broker = Broker(issuer=TEST_ISSUER, keys=KeyRing.generate(), clock=clock, retention=8 * DAY)
    start = clock()
    for _day in range(6):  # one lease a day, revoked after 30 min; one more that lives on
        cred = broker.issue("svc:nightly", "api", ["read"], 3600, owner="ops")
        clock.advance(1800)
        broker.revoke(cred)
        clock.advance(DAY - 1800)
    broker.issue("svc:nightly", "api", ["read"], 3600, owner="ops")
    broker.sweep()
    report = broker.report()
    assert len(report.leases) == 7
    assert len(report.active) == 1
    page = Page(render_html(report, window=7 * DAY, buckets=7))  # one slice a day
    # Day d of the window is [start - DAY + d*DAY, ...): the leases began on days 1..6.
    assert page.values("timeline") == [0, 1, 1, 1, 1, 1, 2]
    assert clock() == start + 6 * DAY
    # Without retention, a dead record is purged after exp + leeway: its history goes.
    short = Broker(issuer=TEST_ISSUER, keys=KeyRing.generate(), clock=clock)
    cred = short.issue("svc:nightly", "api", ["read"], 60)
    clock.advance(30)
    short.revoke(cred)
    assert Page(render_html(short.report())).values("timeline")[-1] == 1
    clock.advance(600)
    short.sweep()
    assert short.report().leases == ()
    assert Page(render_html(short.report())).values("timeline") == [0] * 28


def test_an_empty_store_renders() -> None:
    broker = Broker(issuer=TEST_ISSUER, keys=KeyRing.generate(), clock=FakeClock())
    page = Page(render_html(broker.report()))
    assert page.values("ttl") == [0] * 7
    assert page.values("timeline") == [0] * 28
    assert "owners" not in page.marks
    assert "(none)" in "".join(page.text)


@pytest.mark.parametrize(
    "options",
    [
        {"buckets": 0},
        {"buckets": 501},
        {"buckets": True},
        {"buckets": 2.5},
        {"top_owners": 0},
        {"max_rows": -1},
        {"window": 0},
        {"window": -DAY},
    ],
)
def test_bad_options(options: dict[str, object]) -> None:
    broker = Broker(issuer=TEST_ISSUER, keys=KeyRing.generate(), clock=FakeClock())
    with pytest.raises(InvalidRequest):
        render_html(broker.report(), **options)  # type: ignore[arg-type]


def test_max_rows_caps_the_lease_table(estate: Estate) -> None:
    page = Page(render_html(estate.broker.report(), max_rows=3))
    assert "5 more not shown" in "".join(page.text)
    assert page.tags["tr"] == Page(render_html(estate.broker.report())).tags["tr"] - 5


# -- writing the file ----------------------------------------------------------------
def test_write_html_is_atomic_and_readable(estate: Estate, tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    target.write_text("an older report")
    old = os.umask(0o077)
    try:
        assert write_html(estate.broker.report(), target) == target
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o644
    assert target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left


@pytest.mark.parametrize("where", ["missing/report.html", "file/report.html", "."])
def test_write_html_to_an_unwritable_path(where: str, tmp_path: Path, estate: Estate) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidRequest, match="cannot write the HTML report to ") as caught:
        write_html(estate.broker.report(), tmp_path / where)
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# -- the command ---------------------------------------------------------------------
def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jitbroker", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "JITBROKER_STORE": ""},
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "leases.db"
    broker = Broker(issuer=TEST_ISSUER, keys=KeyRing.generate(), store=SQLiteStore(path))
    broker.issue("svc:a", "db:orders", ["orders:read"], 600, owner="alice", purpose="export")
    broker.issue(HOSTILE["subject"], "db:orders", ["orders:*"], 600)
    broker.store.close()
    return path


def test_cli_writes_the_page(db: Path, tmp_path: Path) -> None:
    target = tmp_path / "out" / "report.html"
    target.parent.mkdir()
    done = cli("report", "--store", str(db), "--html", str(target), "--buckets", "7")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote {target}\n"
    assert target.stat().st_mode & 0o777 == 0o644
    page = Page(target.read_text(encoding="utf-8"))
    assert len(page.marks["timeline"]) == 7
    assert page.values("owners") == [1, 1]  # alice, (no owner)
    assert page.tags["script"] == 0
    done = cli("report", "--store", str(db), "--html", str(target), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["active"] == 2  # both: the page and the JSON


def test_cli_prints_the_page_to_stdout(db: Path) -> None:
    done = cli("report", "--store", str(db), "--html", "-", "--top-owners", "1")
    assert done.returncode == 0, done.stderr
    page = Page(done.stdout)
    assert [label for label, _ in page.marks["owners"]] == ["alice", NO_OWNER]
    done = cli("report", "--store", str(db), "--html", "-", "--json")
    assert done.returncode == 2
    assert done.stderr == (
        "jitbroker: error: --html - and --json both print to stdout: give --html a FILE\n"
    )


def test_cli_unwritable_path_is_exit_2_with_one_line(db: Path, tmp_path: Path) -> None:
    target = tmp_path / "no-such-dir" / "report.html"
    done = cli("report", "--store", str(db), "--html", str(target))
    assert done.returncode == 2
    assert done.stderr == (
        f"jitbroker: error: cannot write the HTML report to {target}: No such file or directory\n"
    )
    done = cli("report", "--store", str(db), "--html", "-", "--buckets", "0")
    assert (done.returncode, done.stdout) == (2, "")
    assert "buckets must be a whole number from 1 to 500" in done.stderr
    assert "Traceback" not in done.stderr


def test_every_report_option_has_help_with_an_example() -> None:
    import argparse

    from jitbroker.cli import build_parser

    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    report = sub.choices["report"]
    assert "e.g." in (report.description or "")
    for action in report._actions:
        if action.dest in ("help", "store"):
            continue  # --store is every governance command's, with its default
        assert "e.g." in (action.help or ""), action.option_strings


# -- a real browser ------------------------------------------------------------------
def _install_chromium() -> None:
    """Under CI only: Debian's package, as .ci/run does when it is missing."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        subprocess.run(argv, env=env, capture_output=True, timeout=900, check=False)


@pytest.fixture(scope="session")
def chromium() -> str:
    """The chromium binary; installed when missing under CI=true, else skipped."""
    found = shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )
    on_ci = os.environ.get("CI") == "true"
    if found is None and on_ci and shutil.which("apt-get"):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            _install_chromium()
        found = shutil.which("chromium")
    if found is None:
        message = "headless Chromium (Debian's chromium package) is not installed"
        if on_ci:
            pytest.fail(
                message + "; under CI=true the browser test must run (apt-get install chromium)"
            )
        pytest.skip(message)
    return found


class Browser:
    """One headless Chromium run per call: a fresh profile, no network, a timeout."""

    def __init__(self, binary: str, home: Path) -> None:
        self.binary, self.home, self.runs = binary, home, 0

    def run(self, page: Path, *mode: str) -> subprocess.CompletedProcess[str]:
        self.runs += 1
        argv = [
            self.binary,
            "--headless",
            "--disable-gpu",
            f"--user-data-dir={self.home / f'profile-{self.runs}'}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # the page needs no network: none at all
            "--enable-logging=stderr",
            "--v=0",
            "--hide-scrollbars",
            "--window-size=1200,2000",
            *(["--no-sandbox"] if os.geteuid() == 0 else []),  # Chromium's sandbox refuses root
            *mode,
            page.resolve().as_uri(),
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        return done

    def dom(self, page: Path) -> tuple[str, list[str]]:
        """The DOM after rendering, and the console's messages."""
        done = self.run(page, "--dump-dom")
        return done.stdout, console_messages(done.stderr)


def console_messages(stderr: str) -> list[str]:
    """The page's console lines in Chromium's log (``...:CONSOLE:...] "message"``).
    The page runs no script, so any is an error: a CSP refusal, a failed load."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.fixture
def browser(chromium: str, tmp_path: Path) -> Browser:
    return Browser(chromium, tmp_path)


@pytest.fixture
def rendered(estate: Estate, tmp_path: Path) -> tuple[Path, Report]:
    """The estate plus a hostile lease in one store, written as a page."""
    estate.clock.advance(1)
    broker = estate.broker
    issue_hostile(
        Broker(issuer=TEST_ISSUER, keys=broker.keys, store=broker.store, clock=estate.clock)
    )
    report = broker.report(long_ttl=600)
    path = tmp_path / "report.html"
    write_html(report, path)
    return path, report


def test_chromium_renders_the_page_with_every_mark(
    browser: Browser, rendered: tuple[Path, Report]
) -> None:
    path, report = rendered
    dom, console = browser.dom(path)
    assert console == [], console
    page = Page(dom)
    expected = expected_marks(report)
    assert {chart: page.values(chart) for chart in expected} == expected
    assert page.values("blast")[0] == max(r.size for r in report.blast_radius)  # widest first
    assert page.tags["svg"] == 5
    assert page.tags["script"] == 0
    assert page.tags["img"] == 0
    shown = "".join(page.text)
    assert HOSTILE["subject"] in shown
    assert HOSTILE["purpose"] in shown
    assert "Findings by OWASP NHI risk" in shown


def test_chromium_screenshot_is_kept(browser: Browser, rendered: tuple[Path, Report]) -> None:
    path, _ = rendered
    shot = path.parent / "report.png"
    done = browser.run(path, f"--screenshot={shot}")
    assert console_messages(done.stderr) == []
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1200, 2000)  # the IHDR's width and height
    assert len(data) > 50_000  # charts and tables, not a blank page
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copyfile(shot, artifacts / "report.png")


def test_chromium_console_check_catches_an_error(browser: Browser, tmp_path: Path) -> None:
    # The detector itself: a page whose CSP refuses an image logs a console error.
    text = render_html(Broker(keys=KeyRing.generate(), clock=FakeClock()).report())
    bad = tmp_path / "bad.html"
    bad.write_text(text.replace("<main>", '<main><img src="missing.png" alt="">'))
    _, console = browser.dom(bad)
    assert len(console) == 1, console
    assert "Content Security Policy" in console[0], console
