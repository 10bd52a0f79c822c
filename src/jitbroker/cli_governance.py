"""``jitbroker report|leases|revoke|policy``: operate on a shared lease store.

    jitbroker report  --store URL [--json] [--html FILE|-] [--long-ttl S] [--oldest N]
                      [--keys DIR [--password-env VAR] | --jwks FILE|URL]
                      [--window S] [--buckets N] [--top-owners N] [--policy FILE] [--top N]
                      [--unused-days DAYS]
    jitbroker leases  --store URL [--owner O] [--subject S] [--task T] [--key-id K]
                      [--parent ID] [--issuer ISS] [--task-run RUN] [--all] [--json]
    jitbroker revoke  --store URL (--lease ID | --owner O | --subject S | --task T
                      | --key-id K | --parent ID | --issuer ISS | --task-run RUN ...)
                      [--reason R] [--by WHO] [--audit-log FILE]
    jitbroker policy check FILE [--json] [--subject S --audience A [--scopes "a b"]
                      [--ttl S] [--owner O] [--purpose P] [--task T] [--label k=v ...]]

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
from urllib.parse import urlsplit

from . import cli_shell
from .audit import JsonLinesSink, Sink
from .broker import Broker
from .core import Explanation
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
_FILTER_HELP = {
    "owner": "leases of this owner",
    "subject": "leases of this subject (workload)",
    "task": "leases of this task",
    "key_id": "leases signed by this key id",
    "parent": "children of this lease id",
    "issuer": "leases of this broker issuer",
    "task_run": "leases of this task run (one run of broker.task)",
}
_FILTER_EXAMPLE = {
    "owner": "alice@example.com",
    "subject": "svc:ci-deploy",
    "task": "job-42",
    "key_id": "Xy3...",
    "parent": "3f2a...e1",
    "issuer": "urn:example:broker",
    "task_run": "9c1d...",
}


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
        "--unused-days",
        type=float,
        default=30.0,
        metavar="DAYS",
        help="flag active leases whose last use is older (default 30; needs a store that"
        " records usage); e.g. --unused-days 7",
    )
    report.add_argument(
        "--oldest",
        type=int,
        default=10,
        metavar="N",
        help="how many of the oldest active leases to list (default 10); e.g. --oldest 20",
    )
    keys = report.add_mutually_exclusive_group()
    keys.add_argument(
        "--keys",
        type=Path,
        metavar="DIR",
        help="the key directory, to flag leases of retired keys; e.g. --keys /etc/jitbroker/keys",
    )
    keys.add_argument(
        "--jwks",
        metavar="FILE|URL",
        help="or the broker's public JWKS, a file or an https:// URL (http:// on loopback"
        " only), to the same end without the private keys; e.g. --jwks"
        " https://jitbroker.internal/jwks.json",
    )
    report.add_argument(
        "--password-env",
        metavar="VAR",
        help="with --keys: the environment variable holding the keys' passphrase;"
        " e.g. --password-env JITBROKER_KEY_PASSWORD",
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
    report.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help="a policy TOML file: the blast radius shows what it would grant each subject"
        " next to what it reaches; e.g. --policy /etc/jitbroker/policy.toml",
    )
    report.add_argument(
        "--top",
        type=int,
        default=10,
        metavar="N",
        help="subjects the blast radius lists, widest first (default 10; the totals count"
        " them all); e.g. --top 25",
    )

    leases = sub.add_parser(
        "leases",
        help="list leases (active ones unless --all)",
        description="One line per lease, oldest first, filters combined with AND;"
        " e.g. jitbroker leases --store leases.db --owner alice@example.com --json",
    )
    _store_arg(leases)
    _filter_args(leases)
    leases.add_argument(
        "--all", action="store_true", help="include revoked and expired; e.g. --all --json"
    )
    leases.add_argument(
        "--json", action="store_true", help="one JSON object per line; e.g. --json | jq .owner"
    )

    revoke = sub.add_parser(
        "revoke",
        help="revoke leases (and their subtrees) by id, filter, or the token naming one",
        description="By lease id or filters on --store; or the lease a token names (read"
        " from - (stdin), --token-env or --token-file, never an argument) with --config or"
        " --broker. Exit 0 revoked, 1 nothing was active, 2 an error."
        " E.g. jitbroker revoke --store leases.db --owner bob@example.com --reason offboarded",
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
    revoke.add_argument(
        "--by",
        help="who revokes, for the audit trail (default cli:$USER); e.g. --by oncall:carol",
    )
    revoke.add_argument(
        "--audit-log", type=Path, metavar="FILE", help="append events here; e.g. audit.jsonl"
    )
    revoke.add_argument(
        "--json", action="store_true", help="print the outcome as JSON; e.g. --json | jq .revoked"
    )
    cli_shell.add_revoke_options(revoke)

    _add_outbox(sub)
    _add_policy(sub)


def _add_outbox(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    outbox = sub.add_parser(
        "outbox",
        help="parked work: hook calls and backend revokes that ran out of retries",
        description="e.g. jitbroker outbox list --store leases.db",
    )
    jobs = outbox.add_subparsers(dest="outbox_command", required=True, metavar="COMMAND")
    listed = jobs.add_parser(
        "list",
        help="list parked jobs (with --all, every job waiting)",
        description="e.g. jitbroker outbox list --store leases.db --all --json",
    )
    listed.add_argument(
        "--all", action="store_true", help="also jobs waiting for a retry; e.g. --all"
    )
    listed.add_argument(
        "--json", action="store_true", help="one JSON object per line; e.g. --json | jq .error"
    )
    retry = jobs.add_parser(
        "retry",
        help="make parked jobs due again (every one without ID); brokers run them",
        description="e.g. jitbroker outbox retry --store leases.db 7f3c...",
    )
    forget = jobs.add_parser(
        "forget",
        help="drop parked jobs for good (needs --force; audited)",
        description="e.g. jitbroker outbox forget --store leases.db --force 7f3c...",
    )
    forget.add_argument(
        "--force", action="store_true", help="yes: their side effect never runs; e.g. --force"
    )
    forget.add_argument(
        "--by",
        help="who drops them, for the audit trail (default cli:$USER); e.g. --by oncall:carol",
    )
    forget.add_argument(
        "--audit-log",
        type=Path,
        metavar="FILE",
        help="append events here; e.g. --audit-log audit.jsonl",
    )
    for cmd in (listed, retry, forget):
        _store_arg(cmd)
    retry.add_argument(
        "ids", nargs="*", metavar="ID", help="job ids (from `outbox list`); e.g. 7f3c..."
    )
    forget.add_argument(
        "ids", nargs="+", metavar="ID", help="job ids (from `outbox list`); e.g. 7f3c..."
    )


def _add_policy(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policy = sub.add_parser(
        "policy",
        help="validate a policy file and explain a request",
        description="e.g. jitbroker policy check policy.toml --subject svc:ci --audience db:orders",
    )
    cmds = policy.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")
    check = cmds.add_parser(
        "check",
        help="validate FILE; with --subject/--audience, explain",
        description="Exit 0 valid (and, with a request, allowed), 1 denied, 2 an invalid"
        " file. E.g. jitbroker policy check policy.toml --subject svc:ci-deploy --audience"
        " db:orders --scopes orders:read --ttl 600 --owner alice@example.com --json",
    )
    check.add_argument("file", type=Path, help="a TOML file of [[rules]] tables; e.g. policy.toml")
    for name, example in (
        ("subject", "the workload asking; e.g. --subject svc:ci-deploy"),
        ("audience", "where it would be used; e.g. --audience db:orders"),
        ("owner", "the accountable owner; e.g. --owner alice@example.com"),
        ("purpose", "why; e.g. --purpose 'nightly export'"),
        ("task", "the task; e.g. --task job-42"),
    ):
        check.add_argument(f"--{name}", metavar=name.upper(), help=example)
    check.add_argument(
        "--scopes", default="", help="space-delimited; e.g. --scopes 'orders:read orders:write'"
    )
    check.add_argument(
        "--ttl", type=float, metavar="SECONDS", help="the lifetime asked for; e.g. --ttl 600"
    )
    check.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a broker label a rule's condition reads (repeatable); e.g. --label env=prod",
    )
    check.add_argument(
        "--json",
        action="store_true",
        help="print the verdict as one JSON object (valid, rules and, with a request,"
        " allowed, reasons, matched rules); e.g. --json | jq .allowed",
    )


def _store_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        default=os.environ.get("JITBROKER_STORE"),
        help="SQLite path or store URL (default: $JITBROKER_STORE); e.g. --store leases.db,"
        " --store 'redis://127.0.0.1:6379/0?prefix=jitbroker'",
    )


def _filter_args(parser: argparse.ArgumentParser) -> None:
    for name in _FILTERS:
        flag = "--" + name.replace("_", "-")
        parser.add_argument(
            flag,
            dest=name,
            metavar=name.upper(),
            help=f"{_FILTER_HELP[name]}; e.g. {flag} " + _FILTER_EXAMPLE[name],
        )


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


def _report_keys(args: argparse.Namespace) -> set[str] | None:
    """The key ids still held, from ``--keys DIR`` or ``--jwks FILE|URL``; None if neither."""
    if args.password_env is not None and args.keys is None:
        raise InvalidRequest("--password-env is for --keys DIR (a JWKS is public)")
    if args.keys is not None:
        password = None
        if args.password_env is not None:
            password = os.environ.get(args.password_env)
            if not password:
                raise InvalidRequest(
                    f"environment variable {args.password_env} is not set or empty"
                )
        return {key.kid for key in KeyRing.from_dir(args.keys, password)}
    if args.jwks is None:
        return None
    from .jwks import JWKSource, parse_jwks

    if "://" in args.jwks:
        host = urlsplit(args.jwks).hostname or ""
        source = JWKSource(args.jwks, allow_http=host in _LOOPBACK)
        return {key.kid for key in source.keys}
    with open(args.jwks, "rb") as fh:
        return {key.kid for key in parse_jwks(fh.read(1 << 20), args.jwks)}


_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def _report(args: argparse.Namespace, store: LeaseStore, out: Out) -> int:
    keys = _report_keys(args)
    now = time.time()
    counter = getattr(store, "awaiting_hooks", None)  # optional in the store protocol
    leases = store.find(LeaseFilter())
    usage_of = getattr(store, "lease_usage", None)  # optional too (UsageRecording)
    active = [lease.id for lease in leases if lease.is_active(now)]
    report = build_report(
        leases,
        now=now,
        keys=keys,
        awaiting_hooks=None if counter is None else counter(now),
        failed_hooks=[failed_hook(job, job.name) for job in store.jobs(parked=True)],
        long_ttl=args.long_ttl,
        oldest=args.oldest,
        policy=None if args.policy is None else Policy.from_toml(args.policy),
        top=args.top,
        usage=None if usage_of is None else usage_of(active),
        unused_days=args.unused_days,
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
    if (args.subject is None) != (args.audience is None):
        raise InvalidRequest("explaining a request needs both --subject and --audience")
    verdict: dict[str, object] = {"file": str(args.file)}
    try:
        policy = Policy.from_toml(args.file)
    except InvalidRequest as exc:
        if not args.json:
            raise
        out(json.dumps({**verdict, "valid": False, "error": str(exc)}))
        return 2
    verdict.update(valid=True, rules=len(policy.rules))
    if not args.json:
        out(f"{args.file}: valid, {len(policy.rules)} rule(s)")
    if args.subject is None:
        if args.json:
            out(json.dumps(verdict))
        return 0
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
    if args.json:
        verdict.update(explanation_dict(explanation))
        out(json.dumps(verdict))
    else:
        out(str(explanation))
    return 0 if explanation.allowed else 1


def explanation_dict(explanation: Explanation) -> dict[str, object]:
    """What ``policy check --json`` adds for a request: the verdict, the rules
    (by label), every reason and the quotas counted."""
    d, lease = explanation.decision, explanation.lease
    return {
        "allowed": d.allowed,
        "subject": lease.subject,
        "audience": lease.audience,
        "scope": lease.scope,
        "ttl": lease.expires_at - lease.issued_at,
        "granted_by": None if d.rule is None else d.rule.label(),
        "matched": [rule.label() for rule in d.matched],
        "reasons": list(d.reasons),
        "quotas": [
            {"rule": q.rule, "active": n, "limit": q.limit, "counts": q.describe()}
            for q, n in explanation.quotas
        ],
    }


def _label(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise InvalidRequest(f"--label takes NAME=VALUE, got {text!r}")
    return name, value
