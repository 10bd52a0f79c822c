"""``jitbroker report|leases|revoke|policy``: operate on a shared lease store.

    jitbroker report  --store URL [--json] [--html FILE|-] [--long-ttl S] [--oldest N]
                      [--keys DIR] [--window S] [--buckets N] [--top-owners N]
    jitbroker leases  --store URL [--owner O] [--subject S] [--task T] [--key-id K]
                      [--parent ID] [--issuer ISS] [--task-run RUN] [--all] [--json]
    jitbroker revoke  --store URL (--lease ID | --owner O | --subject S | --task T
                      | --key-id K | --parent ID | --issuer ISS | --task-run RUN ...)
                      [--reason R] [--by WHO] [--audit-log FILE]
    jitbroker policy check FILE [--subject S --audience A [--scopes "a b"] [--ttl S]
                      [--owner O] [--purpose P] [--task T] [--label k=v ...]]

``--store`` takes a SQLite path, ``sqlite:``, ``redis://`` or ``postgresql://``
URL (see ``jitbroker.stores.open_store``), or the ``JITBROKER_STORE``
environment variable. ``revoke`` takes lease ids, never tokens: a token on a
command line would land in shell history and process listings.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import cli_shell
from .audit import JsonLinesSink, Sink
from .broker import Broker
from .errors import InvalidRequest
from .hooks import failed_hook
from .keyring import KeyRing
from .policy import Policy
from .report import Report, build_report, lease_summary
from .report_html import render_html, write_html
from .stores import open_store
from .stores.base import LeaseFilter, LeaseStore
from .validate import optional_text

__all__ = ["COMMANDS", "add_parsers", "run"]

Out = Callable[[str], object]
COMMANDS = ("report", "leases", "revoke", "policy", "outbox")
_FILTERS = ("owner", "subject", "task", "key_id", "parent", "issuer", "task_run")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the governance commands on the top-level parser."""
    report = sub.add_parser(
        "report",
        help="what is alive, who owns it, what looks wrong",
        description="A table, JSON (--json) or one self-contained HTML page with charts"
        " (--html FILE); e.g. jitbroker report --store leases.db --html report.html",
    )
    _store_arg(report)
    report.add_argument(
        "--json", action="store_true", help="print the report as JSON; e.g. --json | jq .findings"
    )
    report.add_argument(
        "--html",
        metavar="FILE",
        help="write one self-contained HTML page (charts and tables; no script, no external"
        " asset) to FILE, atomically, or - for stdout; e.g. --html report.html",
    )
    report.add_argument(
        "--long-ttl",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="flag leases that may live longer (default 3600); e.g. --long-ttl 900",
    )
    report.add_argument(
        "--oldest",
        type=int,
        default=10,
        metavar="N",
        help="how many of the oldest active leases to list (default 10); e.g. --oldest 20",
    )
    report.add_argument(
        "--keys",
        type=Path,
        metavar="DIR",
        help="the key directory, to flag leases of retired keys; e.g. --keys /etc/jitbroker/keys",
    )
    report.add_argument(
        "--window",
        type=float,
        default=7 * 86_400.0,
        metavar="SECONDS",
        help="how far back the HTML timeline reaches (default 604800, 7 days); e.g. --window 86400",
    )
    report.add_argument(
        "--buckets",
        type=int,
        default=28,
        metavar="N",
        help="slices of the HTML timeline (default 28: 6 h each over 7 days); e.g. --buckets 24",
    )
    report.add_argument(
        "--top-owners",
        type=int,
        default=10,
        metavar="N",
        help="owners the HTML chart names, the rest as one bar (default 10); e.g. --top-owners 5",
    )

    leases = sub.add_parser("leases", help="list leases (active ones unless --all)")
    _store_arg(leases)
    _filter_args(leases)
    leases.add_argument("--all", action="store_true", help="include revoked and expired")
    leases.add_argument("--json", action="store_true", help="one JSON object per line")

    revoke = sub.add_parser(
        "revoke",
        help="revoke leases (and their subtrees) by id, filter, or the token naming one",
        description="By lease id or filters on --store; or the lease a token names (read"
        " from - (stdin), --token-env or --token-file, never an argument) with --config or"
        " --broker. Exit 0 revoked, 1 nothing was active, 2 an error.",
    )
    _store_arg(revoke)
    _filter_args(revoke)
    revoke.add_argument(
        "--lease", metavar="ID", help="a lease id (never a token); e.g. --lease 3f2a...e1"
    )
    revoke.add_argument(
        "--reason",
        default="revoked-by-operator",
        help="recorded on the lease; e.g. --reason leaked",
    )
    revoke.add_argument("--by", help="who revokes, for the audit trail (default cli:$USER)")
    revoke.add_argument(
        "--audit-log", type=Path, metavar="FILE", help="append events here; e.g. audit.jsonl"
    )
    revoke.add_argument("--json", action="store_true", help="print the outcome as JSON")
    cli_shell.add_revoke_options(revoke)

    outbox = sub.add_parser(
        "outbox", help="parked work: hook calls and backend revokes that ran out of retries"
    )
    jobs = outbox.add_subparsers(dest="outbox_command", required=True)
    listed = jobs.add_parser("list", help="list parked jobs (with --all, every job waiting)")
    listed.add_argument("--all", action="store_true", help="also jobs waiting for a retry")
    listed.add_argument("--json", action="store_true", help="one JSON object per line")
    retry = jobs.add_parser(
        "retry", help="make parked jobs due again (every one without ID); brokers run them"
    )
    forget = jobs.add_parser("forget", help="drop parked jobs for good (needs --force; audited)")
    forget.add_argument("--force", action="store_true", help="yes: their side effect never runs")
    forget.add_argument("--by", help="who drops them, for the audit trail (default cli:$USER)")
    forget.add_argument("--audit-log", type=Path, metavar="FILE", help="append events here")
    for cmd in (listed, retry, forget):
        _store_arg(cmd)
    retry.add_argument("ids", nargs="*", metavar="ID", help="job ids (from `outbox list`)")
    forget.add_argument("ids", nargs="+", metavar="ID", help="job ids (from `outbox list`)")

    policy = sub.add_parser("policy", help="validate a policy file and explain a request")
    cmds = policy.add_subparsers(dest="policy_command", required=True)
    check = cmds.add_parser("check", help="validate FILE; with --subject/--audience, explain")
    check.add_argument("file", type=Path)
    check.add_argument("--subject")
    check.add_argument("--audience")
    check.add_argument("--scopes", default="", help="space-delimited")
    check.add_argument("--ttl", type=float)
    check.add_argument("--owner")
    check.add_argument("--purpose")
    check.add_argument("--task")
    check.add_argument("--label", action="append", default=[], metavar="NAME=VALUE")


def _store_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        default=os.environ.get("JITBROKER_STORE"),
        help="SQLite path or store URL (default: $JITBROKER_STORE)",
    )


def _filter_args(parser: argparse.ArgumentParser) -> None:
    for name in _FILTERS:
        parser.add_argument("--" + name.replace("_", "-"), dest=name)


def run(args: argparse.Namespace, out: Out = print) -> int:
    """Carry out a parsed governance command; the exit status."""
    if args.command == "policy":
        return _policy_check(args, out)
    if args.command == "revoke" and cli_shell.has_token(args):
        if args.lease is not None or not _where(args).is_empty():
            raise InvalidRequest("a token names its lease: give it without --lease or filters")
        return cli_shell.revoke_token(args, out)
    if args.command == "revoke" and (args.config or args.broker):
        raise InvalidRequest(
            "--config/--broker revoke the lease a token names: give the token as - (stdin),"
            " --token-env VAR or --token-file PATH (by lease id or filter: use --store)"
        )
    with _store(args.store) as store:
        if args.command == "report":
            return _report(args, store, out)
        if args.command == "leases":
            return _leases(args, store, out)
        if args.command == "outbox":
            return _outbox(args, store, out)
        return _revoke(args, store, out)


@contextmanager
def _store(url: str | None) -> Iterator[LeaseStore]:
    if not url:
        raise InvalidRequest("give --store (a SQLite path or store URL) or set JITBROKER_STORE")
    store = open_store(url, create=False)  # a typo must not become a new, empty store
    try:
        yield store
    finally:
        store.close()


def _where(args: argparse.Namespace) -> LeaseFilter:
    return LeaseFilter(**{name: optional_text(getattr(args, name), name) for name in _FILTERS})


def _report(args: argparse.Namespace, store: LeaseStore, out: Out) -> int:
    keys = None if args.keys is None else {key.kid for key in KeyRing.from_dir(args.keys)}
    now = time.time()
    counter = getattr(store, "awaiting_hooks", None)  # optional in the store protocol
    report = build_report(
        store.find(LeaseFilter()),
        now=now,
        keys=keys,
        awaiting_hooks=None if counter is None else counter(now),
        failed_hooks=[failed_hook(job, job.name) for job in store.jobs(parked=True)],
        long_ttl=args.long_ttl,
        oldest=args.oldest,
    )
    if args.html is None:
        out(json.dumps(report.to_dict(), indent=2) if args.json else str(report))
        return 0
    return _html(args, report, out)


def _html(args: argparse.Namespace, report: Report, out: Out) -> int:
    """``--html FILE``: the page, written atomically (with ``--json``, the JSON
    printed too); ``--html -``: the page on stdout."""
    chart = {"window": args.window, "buckets": args.buckets, "top_owners": args.top_owners}
    if args.html == "-":
        if args.json:
            raise InvalidRequest("--html - and --json both print to stdout: give --html a FILE")
        out(render_html(report, **chart).rstrip("\n"))
        return 0
    path = write_html(report, args.html, **chart)
    out(json.dumps(report.to_dict(), indent=2) if args.json else f"wrote {path}")
    return 0


def _leases(args: argparse.Namespace, store: LeaseStore, out: Out) -> int:
    now = time.time()
    found = sorted(store.find(_where(args)), key=lambda lease: (lease.issued_at, lease.id))
    shown = [lease for lease in found if args.all or lease.is_active(now)]
    for lease in shown:
        summary = lease_summary(lease, now)
        if args.json:
            out(json.dumps(summary, sort_keys=True))
        else:
            out("  ".join(f"{k}={v}" for k, v in summary.items()))
    if not args.json:
        out(f"{len(shown)} lease(s)")
    return 0


def _revoke(args: argparse.Namespace, store: LeaseStore, out: Out) -> int:
    where = _where(args)
    if args.lease is None and where.is_empty():
        raise InvalidRequest("say what to revoke: --lease ID or at least one filter")
    if args.lease is not None and not where.is_empty():
        raise InvalidRequest("--lease revokes one lease; do not combine it with filters")
    with contextlib.ExitStack() as stack:
        sinks: list[Sink] = []
        if args.audit_log is not None:
            sinks.append(stack.enter_context(JsonLinesSink(args.audit_log)))
        return _revoke_now(args, store, where, sinks, out)


def _revoke_now(
    args: argparse.Namespace, store: LeaseStore, where: LeaseFilter, sinks: list[Sink], out: Out
) -> int:
    by = args.by or _default_actor()
    # Revoking signs nothing: a throwaway key ring satisfies the broker.
    broker = Broker(keys=KeyRing.generate(), store=store, audit=sinks)
    if args.lease is not None:
        done = broker.revoke(_lease_id(args.lease), reason=args.reason, by=by)
        if args.json:
            out(json.dumps({"revoked": done, "lease_id": args.lease}))
        else:
            out(f"revoked lease {args.lease}" if done else f"lease {args.lease} was not active")
        return 0 if done else 1
    count = broker.revoke_where(**_filters(where), reason=args.reason, by=by)
    if args.json:
        out(json.dumps({"revoked": count, "where": where.describe()}))
    else:
        out(f"revoked {count} lease(s) matching {where.describe()} (subtrees included)")
    return 0 if count else 1  # 1: nothing to revoke (a typo in a filter, or already done)


def _outbox(args: argparse.Namespace, store: LeaseStore, out: Out) -> int:
    if args.outbox_command == "list":
        jobs = store.jobs(parked=None if args.all else True)
        for job in jobs:
            row = {
                "id": job.id,
                "event": job.event,
                "name": job.name,
                "lease": job.lease.id,
                "subject": job.lease.subject,
                "attempts": job.attempts,
                "parked": job.parked,
                "error": job.error,
            }
            out(
                json.dumps(row, sort_keys=True)
                if args.json
                else "  ".join(f"{k}={v}" for k, v in row.items())
            )
        if not args.json:
            out(f"{len(jobs)} job(s)")
        return 0
    if args.outbox_command == "retry":
        count = store.retry_jobs(args.ids or None, time.time())
        out(f"{count} parked job(s) due again; a broker that runs them will on its next sweep")
        return 0 if count else 1
    with contextlib.ExitStack() as stack:
        sinks: list[Sink] = []
        if args.audit_log is not None:
            sinks.append(stack.enter_context(JsonLinesSink(args.audit_log)))
        broker = Broker(keys=KeyRing.generate(), store=store, audit=sinks)
        count = broker.forget_failed_hook(
            *args.ids, force=args.force, by=args.by or _default_actor()
        )
    out(f"forgot {count} job(s)")
    return 0 if count else 1


def _default_actor() -> str:
    """``cli:<login name>``; ``cli:uid-<n>`` where there is none (a container's
    arbitrary UID has no passwd entry, and no $USER): the revocation still runs."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError, ImportError):
        getuid = getattr(os, "getuid", None)
        return f"cli:uid-{getuid()}" if getuid is not None else "cli:unknown"


def _filters(where: LeaseFilter) -> dict[str, str | None]:
    return {name: getattr(where, name) for name in _FILTERS}


def _lease_id(value: str) -> str:
    from .tokens import is_lease_id

    if not is_lease_id(value):
        # Never echo it: it may be a token pasted by mistake.
        raise InvalidRequest("--lease takes a lease id (32 hex characters), never a token")
    return value


def _policy_check(args: argparse.Namespace, out: Out) -> int:
    policy = Policy.from_toml(args.file)
    out(f"{args.file}: valid, {len(policy.rules)} rule(s)")
    if args.subject is None and args.audience is None:
        return 0
    if args.subject is None or args.audience is None:
        raise InvalidRequest("explaining a request needs both --subject and --audience")
    labels = dict(_label(text) for text in args.label)
    broker = Broker(keys=KeyRing.generate(), policy=policy, labels=labels, max_ttl=86_400 * 365)
    explanation = broker.explain(
        args.subject,
        args.audience,
        args.scopes,
        args.ttl,
        owner=args.owner,
        purpose=args.purpose,
        task=args.task,
    )
    out(str(explanation))
    return 0 if explanation.allowed else 1


def _label(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise InvalidRequest(f"--label takes NAME=VALUE, got {text!r}")
    return name, value
