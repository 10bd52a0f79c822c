"""The governance report as a page to look at: ``render_html(report)``,
``write_html(report, path)`` and ``jitbroker report --html FILE``.

One self-contained HTML5 document: inline CSS and inline SVG, no script and
no reference to anything outside it (no font, image, stylesheet or link; a
Content-Security-Policy meta refuses whatever might slip in), so it reads the
same offline, without JavaScript and on paper. Every value that comes from a
lease is HTML-escaped; the report holds no token or key, so neither does the
page (nor the error text of parked hooks: foreign code wrote it).

Five charts, each with a ``<title>``, an ``aria-label`` and its numbers in a
table below it: active leases over time, active leases by owner, the TTL
distribution of active leases, findings by OWASP NHI risk, and the top
subjects by blast radius (audience x scope pairs reachable). Each mark is an
SVG element of class ``mark`` with ``data-chart``, ``data-label`` and
``data-value``, one per row of its chart's table (a zero is a mark of size 0).
"""

from __future__ import annotations

import math
import os
import tempfile
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from pathlib import Path

from .clock import Duration, seconds
from .errors import InvalidRequest
from .lease import Lease
from .report import NHI_RISKS, NO_OWNER, BlastRadius, Finding, Report

__all__ = [
    "TTL_BUCKETS",
    "blast_rows",
    "nhi_rows",
    "owner_rows",
    "render_html",
    "timeline",
    "ttl_rows",
    "write_html",
]

Rows = Sequence[tuple[str, int]]

#: The TTL histogram's buckets: label and lower bound in seconds (inclusive).
TTL_BUCKETS: tuple[tuple[str, float], ...] = (
    ("< 1 min", 0),
    ("1-5 min", 60),
    ("5-15 min", 300),
    ("15-60 min", 900),
    ("1-4 h", 3600),
    ("4-24 h", 14_400),
    ("> 24 h", 86_400),
)
_BOUNDS = [bound for _, bound in TTL_BUCKETS]
#: Bounds that keep a page a browser opens at once, whatever the store holds.
MAX_BUCKETS = 500

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
CSS = """
:root { --ink: #1d232b; --muted: #5c6773; --line: #d5dbe1; --mark: #3567a5; --bad: #b8432f; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
  margin: 0 auto; max-width: 1160px; padding: 16px 24px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.meta { color: var(--muted); margin: 0; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 20px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 12px; }
figcaption { font-weight: 600; margin-bottom: 6px; } figcaption small { font-weight: 400; }
svg { width: 100%; height: auto; display: block; }
svg text { font-size: 12px; fill: var(--ink); } svg .axis { fill: var(--muted); }
svg line { stroke: var(--line); } .mark { fill: var(--mark); } .nhi .mark { fill: var(--bad); }
table { border-collapse: collapse; width: 100%; margin-top: 8px; font-size: 13px; }
caption { text-align: left; color: var(--muted); padding-bottom: 4px; }
th, td { border-bottom: 1px solid var(--line); padding: 3px 6px; text-align: left;
  vertical-align: top; overflow-wrap: anywhere; }
th { background: #f3f5f7; overflow-wrap: normal; }
td.num { text-align: right; white-space: nowrap; }
@media print { body { max-width: none; padding: 0; font-size: 10pt; }
  .charts { display: block; } figure { break-inside: avoid; margin-bottom: 12px; }
  tr { break-inside: avoid; } }
"""


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _span(window: float) -> str:
    for unit, size in (("days", 86_400), ("h", 3600), ("min", 60)):
        if window >= size and window % size == 0:
            return f"{window / size:g} {unit}"
    return f"{window:g} s"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _whole(value: int, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return value


# -- the numbers behind each chart (plain functions over values) ------------------------
def timeline(
    leases: Iterable[Lease], now: float, window: float, buckets: int
) -> list[tuple[float, int]]:
    """``(start, count)`` for ``buckets`` equal slices of the ``window`` seconds
    before ``now``, oldest first: how many leases were active at some moment of
    each slice (issued before its end, neither expired nor revoked before its start)."""
    start, step = now - window, window / buckets
    delta = [0] * (buckets + 1)  # a difference array: O(leases + buckets), not their product
    for lease in leases:
        end = (
            lease.expires_at
            if lease.revoked_at is None
            else min(lease.expires_at, lease.revoked_at)
        )
        if end <= lease.issued_at or end <= start or lease.issued_at > now:
            continue  # never active, or not within the window
        # The last slice ends at ``now`` included: a lease issued this instant is active.
        first = min(buckets - 1, max(0, math.floor((lease.issued_at - start) / step)))
        last = min(buckets - 1, math.ceil((end - start) / step) - 1)
        delta[first] += 1
        delta[last + 1] -= 1
    out, running = [], 0
    for i in range(buckets):
        running += delta[i]
        out.append((start + i * step, running))
    return out


def owner_rows(by_owner: Mapping[str, int], top: int) -> list[tuple[str, int]]:
    """The ``top`` owners with the most active leases, then the rest summed as
    one "other" row, then the unowned ones (always their own row)."""
    named = [(owner, n) for owner, n in by_owner.items() if owner != NO_OWNER]
    rows, rest = named[:top], named[top:]
    if rest:
        rows.append((f"other ({len(rest)} owners)", sum(n for _, n in rest)))
    if by_owner.get(NO_OWNER):
        rows.append((NO_OWNER, by_owner[NO_OWNER]))
    return rows


def ttl_rows(active: Iterable[Lease]) -> list[tuple[str, int]]:
    """Active leases per ``TTL_BUCKETS`` bucket, by the lifetime granted so far
    (``expires_at - issued_at``, renewals included)."""
    counts = [0] * len(TTL_BUCKETS)
    for lease in active:
        counts[max(0, bisect_right(_BOUNDS, lease.expires_at - lease.issued_at) - 1)] += 1
    return [(label, n) for (label, _), n in zip(TTL_BUCKETS, counts, strict=True)]


def nhi_rows(findings: Iterable[Finding]) -> list[tuple[str, int, list[Finding]]]:
    """Each of the ten OWASP NHI risks: its id, how many findings it has (a
    finding not known here counts 0), and the report's findings mapped to it."""
    by_risk: dict[str, list[Finding]] = {nhi: [] for nhi in NHI_RISKS}
    for finding in findings:
        by_risk[finding.nhi].append(finding)
    return [(nhi, sum(f.count or 0 for f in found), found) for nhi, found in by_risk.items()]


def blast_rows(radii: Iterable[BlastRadius]) -> list[tuple[str, int]]:
    """Each subject the report shows, widest first, and how many (audience,
    scope) pairs its active leases reach."""
    return [(radius.subject, radius.size) for radius in radii]


# -- SVG ------------------------------------------------------------------------------
def _mark(chart: str, label: str, value: int, x: float, y: float, w: float, h: float) -> str:
    return (
        f'<rect class="mark" data-chart="{chart}" data-label="{_e(label)}" data-value="{value}"'
        f' x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}">'
        f"<title>{_e(label)}: {value}</title></rect>"
    )


def _svg(chart: str, title: str, width: int, height: int, body: Iterable[str]) -> str:
    return (
        f'<svg class="{chart}" role="img" aria-label="{_e(title)}" viewBox="0 0 {width} {height}"'
        f' width="{width}" height="{height}"><title>{_e(title)}</title>{"".join(body)}</svg>'
    )


def _short(label: str, size: int = 30) -> str:
    return label if len(label) <= size else label[: size - 1] + "\u2026"


def _bars(chart: str, title: str, rows: Rows) -> str:
    """Horizontal bars, one row per datum, labels on the left."""
    top = max((n for _, n in rows), default=0) or 1
    width, left, area, pitch = 640, 230, 360, 24
    parts = []
    for i, (label, n) in enumerate(rows):
        y = 6 + i * pitch
        w = area * n / top
        parts.append(
            f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{_e(_short(label))}</text>'
        )
        parts.append(_mark(chart, label, n, left, y + 3, w, pitch - 8))
        parts.append(f'<text class="axis" x="{left + w + 6:.1f}" y="{y + 15}">{n}</text>')
    if not rows:
        parts.append('<text class="axis" x="10" y="22">(none)</text>')
    return _svg(chart, title, width, 12 + max(len(rows), 1) * pitch, parts)


def _columns(chart: str, title: str, rows: Rows, ticks: Sequence[int] = ()) -> str:
    """Vertical columns left to right; ``ticks``: which rows get an axis label
    (every one when empty)."""
    top = max((n for _, n in rows), default=0) or 1
    width, left, base, area = 640, 40, 190, 170
    pitch = (width - left - 10) / max(len(rows), 1)
    parts = [
        f'<line x1="{left}" y1="{base}" x2="{width - 10}" y2="{base}"/>',
        f'<text class="axis" x="{left - 6}" y="{base - area + 4}" text-anchor="end">{top}</text>',
        f'<text class="axis" x="{left - 6}" y="{base + 4}" text-anchor="end">0</text>',
    ]
    for i, (label, n) in enumerate(rows):
        h, x = area * n / top, left + i * pitch
        parts.append(_mark(chart, label, n, x + pitch * 0.1, base - h, pitch * 0.8, h))
        if not ticks or i in ticks:
            # The outermost labels of a sparse axis line up with the plot's edges.
            anchor, at = "middle", x + pitch / 2
            if ticks and i == 0:
                anchor, at = "start", x
            elif ticks and i == len(rows) - 1:
                anchor, at = "end", x + pitch
            parts.append(
                f'<text class="axis" x="{at:.1f}" y="{base + 18}"'
                f' text-anchor="{anchor}">{_e(label)}</text>'
            )
    return _svg(chart, title, width, base + 28, parts)


# -- HTML -----------------------------------------------------------------------------
def _table(caption: str, head: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return ('<td class="num">' if number else "<td>") + f"{_e(value)}</td>"

    header = "".join(f"<th>{_e(name)}</th>" for name in head)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><caption>{_e(caption)}</caption><tr>{header}</tr>{body}</table>"


def _figure(chart: str, title: str, note: str, svg: str, table: str) -> str:
    return (
        f'<figure id="chart-{chart}" class="{chart}"><figcaption>{_e(title)}'
        f"<br><small>{_e(note)}</small></figcaption>{svg}{table}</figure>"
    )


def _charts(report: Report, window: float, buckets: int, top_owners: int) -> Iterable[str]:
    now = report.generated_at
    spans = timeline(report.leases, now, window, buckets)
    held = min((x.issued_at for x in report.leases), default=None)
    since = "no records held" if held is None else f"oldest record held: issued {_iso(held)}"
    steps = [(_iso(t)[5:16], n) for t, n in spans]  # "MM-DD HH:MM"
    yield _figure(
        "timeline",
        f"Active leases over the last {_span(window)} ({buckets} slices)",
        "Leases active at some moment of each slice. Only as far back as the store"
        " keeps dead records (purged after exp + leeway, unless retention is set); " + since,
        _columns(
            "timeline", "Active leases over time", steps, sorted({0, buckets // 2, buckets - 1})
        ),
        _table(
            f"active leases per slice of {_span(window / buckets)}",
            ["from", "active"],
            [(_iso(t), n) for t, n in spans],
        ),
    )
    owners = owner_rows(report.by_owner, top_owners)
    yield _figure(
        "owners",
        "Active leases by owner",
        f"top {top_owners}, then the rest as one row",
        _bars("owners", "Active leases by owner", owners),
        _table("active leases per owner", ["owner", "active"], owners),
    )
    ttls = ttl_rows(report.active)
    yield _figure(
        "ttl",
        "TTL distribution of active leases",
        "lifetime granted so far, renewals included",
        _columns("ttl", "TTL distribution of active leases", ttls),
        _table("active leases per TTL bucket", ["TTL", "active"], ttls),
    )
    risks = nhi_rows(report.findings())
    yield _figure(
        "nhi",
        "Findings by OWASP NHI risk (Top 10, 2025)",
        "see the findings table below",
        _bars(
            "nhi",
            "Findings by OWASP NHI risk",
            [(f"{nhi} {NHI_RISKS[nhi]}", n) for nhi, n, _ in risks],
        ),
        _table(
            "findings per risk",
            ["risk", "findings", "kinds"],
            [
                (f"{nhi} {NHI_RISKS[nhi]}", n, ", ".join(f.kind for f in found) or "-")
                for nhi, n, found in risks
            ],
        ),
    )
    yield _blast_figure(report)


def _blast_figure(report: Report) -> str:
    rows = blast_rows(report.blast_radius)
    totals = report.blast_totals
    return _figure(
        "blast",
        "Blast radius: top subjects by audience x scope pairs reachable",
        f"top {totals.get('shown', 0)} of {totals.get('subjects', 0)} subjects with active"
        " leases, their own and those delegated to them; the table below has the pairs",
        _bars("blast", "Blast radius by subject", rows),
        _table(
            "audience x scope pairs reachable per subject",
            ["subject", "pairs", "audiences", "scopes", "leases"],
            [
                (r.subject, r.size, len(r.audiences), len(r.scopes), len(r.leases))
                for r in report.blast_radius
            ],
        ),
    )


def _reach(radius: BlastRadius, limit: int = 10) -> str:
    shown = [
        f"{aud}: {' '.join(s for a, s in radius.pairs if a == aud) or '(no scope)'}"
        for aud in radius.audiences[:limit]
    ]
    more = len(radius.audiences) - limit
    return "; ".join(shown) + (f"; and {more} more audiences" if more > 0 else "")


def _blast_row(radius: BlastRadius, flagged: Mapping[str, object]) -> tuple[object, ...]:
    policy: tuple[object, ...] = ()
    if radius.grantable is not None and radius.outside_policy is not None:
        outside = " ".join(f"{a}:{s}" for a, s in radius.outside_policy[:10]) or "-"
        policy = (len(radius.grantable), outside)
    return (
        radius.subject,
        radius.size,
        len(radius.audiences),
        len(radius.scopes),
        " ".join(radius.wildcards) or "-",
        "yes" if radius.subject in flagged else "",
        radius.depth,
        len(radius.leases),
        f"{radius.remaining:.0f} s",
        _reach(radius),
        *policy,
    )


def _blast_table(report: Report) -> str:
    head = ["subject", "pairs", "audiences", "scopes", "wildcards", "overprivileged"]
    head += ["delegation depth", "leases", "longest left", "reaches (audience: scopes)"]
    if any(r.grantable is not None for r in report.blast_radius):
        head += ["policy grants (pairs)", "reached outside the policy"]
    totals = report.blast_totals
    return _table(
        f"widest first; {totals.get('pairs', 0)} distinct pairs reachable across"
        f" {totals.get('subjects', 0)} subjects, {totals.get('overprivileged', 0)}"
        f" overprivileged (a wildcard, or more than {report.wide_audiences} audiences)",
        head,
        (_blast_row(r, report.overprivileged) for r in report.blast_radius),
    )


def _ids(ids: Sequence[str], limit: int = 10) -> str:
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return " ".join(ids[:limit]) + more


_LEASE_COLUMNS = "lease subject audience scope owner purpose task parent key issued expires"


def _lease_row(lease: Lease) -> tuple[object, ...]:
    optional = (lease.purpose, lease.task, lease.parent, lease.key_id)
    head = (lease.id, lease.subject, lease.audience, lease.scope, lease.owner or NO_OWNER)
    return (
        *head,
        *(value or "" for value in optional),
        _iso(lease.issued_at),
        _iso(lease.expires_at),
    )


def _tables(report: Report, max_rows: int) -> Iterable[str]:
    yield "<h2>Findings</h2>"
    yield _table(
        "what looks wrong, by OWASP NHI risk",
        ["risk", "finding", "count", "leases"],
        [
            (
                f"{f.nhi} {f.risk}",
                f.title,
                "not known here" if f.count is None else f.count,
                _ids(f.leases),
            )
            for f in report.findings()
        ],
    )
    yield "<h2>Blast radius</h2>"
    yield _blast_table(report)
    shown = report.active[:max_rows]
    more = len(report.active) - len(shown)
    yield "<h2>Active leases</h2>"
    note = (
        f"oldest first; {more} more not shown (jitbroker leases --json lists them)"
        if more
        else "oldest first"
    )
    yield _table(
        note,
        _LEASE_COLUMNS.split(),
        (_lease_row(x) for x in shown),
    )
    if report.failed_hooks:
        yield "<h2>Parked work</h2>"
        yield _table(
            "the errors: jitbroker outbox list",
            ["job", "event", "hook", "lease", "attempts"],
            [(h.id, h.event, h.hook, h.lease.id, h.attempts) for h in report.failed_hooks],
        )
    yield "<h2>Churn</h2>"
    yield _table("lease records and this broker's counts", ["", "count"], report.churn.items())


def render_html(
    report: Report,
    *,
    window: Duration = 7 * 86_400,
    buckets: int = 28,
    top_owners: int = 10,
    max_rows: int = 1000,
) -> str:
    """The report as one self-contained HTML document: charts over the last
    ``window`` (``buckets`` slices), the ``top_owners`` owners, and at most
    ``max_rows`` active leases in the table (oldest first)."""
    span = seconds(window, "window")
    _whole(buckets, "buckets", 1, MAX_BUCKETS)
    _whole(top_owners, "top_owners", 1, 1000)
    _whole(max_rows, "max_rows", 0, 1_000_000)
    when = _iso(report.generated_at)
    held = len(report.leases)
    return "".join(
        [
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>jitbroker report at {when}</title><style>{CSS}</style></head><body>",
            f'<header><h1>jitbroker report</h1><p class="meta">at {when}: {len(report.active)}'
            f" active leases, {held} lease records held by the store</p></header><main>",
            '<h2>Charts</h2><section class="charts">',
            *_charts(report, span, buckets, top_owners),
            "</section>",
            *_tables(report, max_rows),
            "</main></body></html>\n",
        ]
    )


def write_html(
    report: Report,
    path: str | os.PathLike[str],
    *,
    window: Duration = 7 * 86_400,
    buckets: int = 28,
    top_owners: int = 10,
    max_rows: int = 1000,
) -> Path:
    """Write ``render_html(report, ...)`` to ``path`` atomically (a temporary file
    in the same folder, then a rename: no reader sees half a page), mode 0644;
    returns the path. An unwritable path is an ``InvalidRequest`` naming it."""
    text = render_html(
        report, window=window, buckets=buckets, top_owners=top_owners, max_rows=max_rows
    )
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise _unwritable(target, exc) from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report is for reading
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _unwritable(target, exc) from exc
    return target


def _unwritable(target: Path, exc: OSError) -> InvalidRequest:
    return InvalidRequest(f"cannot write the HTML report to {target}: {exc.strerror or exc}")
