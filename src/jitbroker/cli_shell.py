"""``jitbroker issue|renew|verify|inspect`` and ``revoke`` of a token: credentials
for shell jobs (``jitbroker exec`` is in ``cli_exec``).

    TOKEN=$(jitbroker issue --config jitbroker.toml --subject svc:ci --audience db:orders \\
            --scope orders:read --ttl 10m)
    printf %s "$TOKEN" | jitbroker verify - --config jitbroker.toml --audience db:orders
    printf %s "$TOKEN" | jitbroker renew - --config jitbroker.toml --ttl 10m
    printf %s "$TOKEN" | jitbroker revoke - --config jitbroker.toml
    jitbroker inspect --token-file token.jwt

Local mode reads keys and store from ``--config`` (``jitbroker.toml``, see
``jitbroker.config``); ``--broker https://...`` talks to the broker service
instead (``jitbroker.web.remote``), proving the caller with a workload
identity token. ``renew`` and ``revoke`` never take a token as an argument (a
command line lands in shell history and ``ps``): only ``--token-file``,
``--token-env VAR`` or ``-`` (stdin). ``verify`` and ``inspect`` accept one as
an argument, as the issue asks, and ``-``/``--token-file`` for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import attrs

from . import validate
from .config import CONFIG_ENV, load_config, parse_duration
from .errors import (
    InsufficientScope,
    InvalidProof,
    InvalidRequest,
    InvalidToken,
    MalformedToken,
    WrongAudience,
)

if TYPE_CHECKING:
    from .broker import Broker
    from .web.remote import RemoteBroker

__all__ = ["add_parsers", "add_token_source", "has_token", "revoke_token", "run"]

Out = Callable[[str], object]
_MAX_TOKEN_INPUT = 64 * 1024  # far above MAX_TOKEN_LENGTH; stops a runaway stdin
UNVERIFIED = "NOT VERIFIED: decoded without checking signature, issuer, expiry or lease"
VERIFY_DESCRIPTION = (
    "Online verification: by the broker's store (local, --config) or by the broker's"
    " /introspect (remote, --broker; the caller must be one of its resource_servers)."
    " Exit 0 valid, 1 not valid (the reason is printed), 2 error."
    ' E.g. printf %s "$TOKEN" | jitbroker verify - --config jitbroker.toml --audience db:orders'
)


# -- arguments ----------------------------------------------------------------------
def duration(text: str) -> float:
    """argparse type for ``--ttl``: ``600``, ``10m``, ``1h30m``."""
    try:
        return parse_duration(text, "the duration")
    except InvalidRequest as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_config(parser: argparse.ArgumentParser) -> None:
    """``--config``."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"jitbroker.toml with the keys and store (default: ${CONFIG_ENV});"
        " e.g. --config /etc/jitbroker/jitbroker.toml",
    )


def add_remote(parser: argparse.ArgumentParser) -> None:
    """``--broker`` and where the caller's identity token comes from."""
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="use the broker service at URL instead of a local config;"
        " e.g. --broker https://jitbroker.internal",
    )
    parser.add_argument(
        "--identity-token-file",
        metavar="FILE",
        help="with --broker: a file holding your workload identity token (OIDC JWT), re-read"
        " on every request; default: GitHub Actions' $ACTIONS_ID_TOKEN_REQUEST_URL;"
        " e.g. --identity-token-file /var/run/secrets/tokens/jitbroker",
    )
    parser.add_argument(
        "--identity-audience",
        default=None,
        metavar="AUD",
        help="with --broker on GitHub Actions: the audience of the OIDC token to fetch,"
        " what the broker's trust rule expects (default: the --broker URL);"
        " e.g. --identity-audience https://jitbroker.acme.internal",
    )


def add_json(parser: argparse.ArgumentParser, what: str) -> None:
    """``--json``."""
    parser.add_argument(
        "--json",
        action="store_true",
        help=f"print {what} as one JSON object; e.g. --json | jq .",
    )


def add_issue_options(parser: argparse.ArgumentParser, default_ttl: str) -> None:
    """What ``issue`` and ``exec`` ask for."""
    parser.add_argument(
        "--subject",
        metavar="S",
        help="the workload the credential is for (local mode; the service takes it from"
        " your identity); e.g. --subject svc:ci-deploy",
    )
    parser.add_argument(
        "--audience", required=True, metavar="A", help="where it is used; e.g. --audience db:orders"
    )
    parser.add_argument(
        "--scope",
        action="append",
        default=[],
        metavar="X",
        help="a scope to ask for (repeat it, or give several space-separated);"
        " e.g. --scope orders:read --scope orders:write",
    )
    parser.add_argument(
        "--ttl",
        type=duration,
        metavar="DURATION",
        help=f"lifetime: seconds or 10m, 1h30m (default: {default_ttl}); e.g. --ttl 10m",
    )
    parser.add_argument(
        "--owner", metavar="O", help="the accountable person or team; e.g. --owner alice@acme.io"
    )
    parser.add_argument(
        "--purpose",
        metavar="P",
        help="why it exists, for the report; e.g. --purpose 'nightly export'",
    )
    parser.add_argument("--task", metavar="T", help="the task it belongs to; e.g. --task job-42")


def add_token_source(
    parser: argparse.ArgumentParser, *, positional: bool, required: bool = True
) -> None:
    """Where the token is read from. ``positional``: a TOKEN argument is allowed
    (``verify``/``inspect``); otherwise only ``-`` (stdin) may stand there."""
    if positional:
        parser.add_argument(
            "token",
            nargs="?",
            metavar="TOKEN",
            help="the token, or - to read it from stdin (an argument is visible in"
            " `ps` and shell history: prefer - or --token-file); e.g. - ",
        )
    else:
        parser.add_argument(
            "token",
            nargs="?",
            metavar="-",
            help='read the token from stdin; e.g. printf %%s "$TOKEN" | jitbroker renew -',
        )
        parser.add_argument(
            "--token-env",
            metavar="VAR",
            help="read the token from environment variable VAR; e.g. --token-env JITBROKER_TOKEN",
        )
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        help='read the token from a file; e.g. --token-file "$JITBROKER_TOKEN_FILE"',
    )
    parser.set_defaults(token_required=required, token_positional=positional)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``issue``, ``renew``, ``verify`` and ``inspect``."""
    issue = sub.add_parser(
        "issue",
        help="issue a credential and print its token",
        description="Print the token alone on stdout: TOKEN=$(jitbroker issue ...) works;"
        " e.g. TOKEN=$(jitbroker issue --config jitbroker.toml --subject svc:ci --audience"
        " db:orders --scope orders:read --ttl 10m)",
    )
    add_config(issue)
    add_remote(issue)
    add_issue_options(issue, "the config's default_ttl")
    add_json(issue, "the token, lease id, expiry and scope")

    renew = sub.add_parser(
        "renew",
        help="renew a credential's lease; print the fresh token",
        description='e.g. printf %%s "$TOKEN" | jitbroker renew - --config jitbroker.toml'
        " --ttl 10m",
    )
    add_config(renew)
    add_remote(renew)
    add_token_source(renew, positional=False)
    renew.add_argument(
        "--ttl", type=duration, metavar="DURATION", help="extend by this much; e.g. --ttl 10m"
    )
    add_json(renew, "the fresh token, lease id and expiry")

    verify = sub.add_parser(
        "verify",
        help="verify a token online (the broker's store, or its /introspect):"
        " exit 0 valid, 1 not valid, 2 error",
        description=VERIFY_DESCRIPTION,
    )
    add_token_source(verify, positional=True)
    add_config(verify)
    add_remote(verify)
    verify.add_argument(
        "--audience",
        required=True,
        metavar="A",
        help="the audience to check; e.g. --audience db:orders",
    )
    verify.add_argument(
        "--scope",
        action="append",
        default=[],
        metavar="X",
        help="a scope the token must carry (repeatable); e.g. --scope orders:read",
    )
    add_json(verify, "the verdict and the claims")

    inspect = sub.add_parser(
        "inspect",
        help="decode a token WITHOUT verifying it: header and claims, times readable",
        description="e.g. jitbroker inspect --token-file token.jwt",
    )
    add_token_source(inspect, positional=True)
    add_json(inspect, "the unverified header and claims")


def add_revoke_options(parser: argparse.ArgumentParser) -> None:
    """What ``revoke`` gains: the lease a token names, locally or at a service."""
    add_token_source(parser, positional=False, required=False)
    add_config(parser)
    add_remote(parser)


# -- running ----------------------------------------------------------------------
def run(args: argparse.Namespace, out: Out = print) -> int:
    """Carry out ``issue``, ``renew``, ``verify`` or ``inspect``; the exit status."""
    if args.command == "inspect":
        return _inspect(args, out)
    if args.command == "verify":
        return _verify(args, out)
    if args.command == "issue":
        return _issue(args, out)
    return _renew(args, out)


def has_token(args: argparse.Namespace) -> bool:
    """Whether a ``revoke`` names a token (rather than a lease id or filters)."""
    return bool(args.token or args.token_file or args.token_env)


def revoke_token(args: argparse.Namespace, out: Out = print) -> int:
    """``revoke`` of the lease a token names (and its subtree)."""
    token = read_token(args)
    if args.broker:
        _remote(args).revoke(token)
        text = "revocation sent (RFC 7009 answers alike whether or not the token was active)"
        _say(args, out, {"revoked": None}, text)
        return 0
    from .cli_governance import _default_actor

    with local_broker(args, create=False) as broker:
        # revoke() checks the token's signature before it trusts the jti in it.
        done = broker.revoke(token, reason=args.reason, by=args.by or _default_actor())
    lease_id = _lease_id(token)
    text = f"revoked lease {lease_id}" if done else f"lease {lease_id} was not active"
    _say(args, out, {"revoked": done, "lease_id": lease_id}, text)
    return 0 if done else 1


@attrs.frozen(slots=True, weakref_slot=False)
class Issued:
    """A credential as the CLI handles it, local or remote; ``ref`` is what
    renewing it needs (a ``Credential`` locally, the token remotely)."""

    token: str = attrs.field(repr=False)
    lease_id: str | None
    expires_at: float
    scope: str
    token_type: str = "Bearer"
    ref: Any = attrs.field(default=None, repr=False, eq=False)

    @classmethod
    def of(cls, cred: Any) -> Issued:
        """From a ``Credential`` or a ``RemoteCredential``."""
        lease = getattr(cred, "lease", None)
        if lease is not None:
            return cls(cred.token, lease.id, lease.expires_at, lease.scope, "Bearer", cred)
        return cls(
            cred.token, cred.lease_id, cred.expires_at, cred.scope, cred.token_type, cred.token
        )

    def to_dict(self) -> dict[str, Any]:
        """What ``--json`` prints (the token included: it is what was asked for)."""
        return {
            "access_token": self.token,
            "token_type": self.token_type,
            "lease_id": self.lease_id,
            "expires_at": int(self.expires_at),
            "expires_at_iso": iso(self.expires_at),
            "expires_in": max(0, round(self.expires_at - time.time())),
            "scope": self.scope,
        }


class Session:
    """``issue``, ``renew`` and ``revoke`` against a local broker or a service."""

    def __init__(self, broker: Broker | None = None, remote: RemoteBroker | None = None) -> None:
        self.broker = broker
        self.remote = remote

    def issue(self, args: argparse.Namespace, default_ttl: float | None = None) -> Issued:
        """Issue what ``add_issue_options`` asked for."""
        scopes = [s for text in args.scope for s in text.split()]
        ttl = args.ttl if args.ttl is not None else default_ttl
        extra = {"task": args.task, "owner": args.owner, "purpose": args.purpose}
        if self.remote is not None:
            if args.subject is not None:
                raise InvalidRequest(
                    "--subject is local only: the broker service takes your subject from your"
                    " identity token"
                )
            return Issued.of(self.remote.issue(args.audience, scopes, ttl, **extra))
        assert self.broker is not None
        if not args.subject:
            raise InvalidRequest("give --subject (the workload the credential is for)")
        return Issued.of(self.broker.issue(args.subject, args.audience, scopes, ttl, **extra))

    def renew(self, current: Issued, ttl: float | None) -> Issued:
        """A fresh token for the same lease."""
        if self.remote is not None:
            return Issued.of(self.remote.renew(current.token, ttl))
        assert self.broker is not None
        return Issued.of(self.broker.renew(current.ref, ttl))

    def revoke(self, current: Issued, reason: str) -> bool | None:
        """Revoke its lease; None when a service cannot say whether it was active."""
        if self.remote is not None:
            self.remote.revoke(current.token)
            return None
        assert self.broker is not None
        return self.broker.revoke(current.ref, reason=reason)


@contextmanager
def session(args: argparse.Namespace, *, create: bool) -> Iterator[Session]:
    """A ``Session`` for ``--broker`` or ``--config``."""
    if args.broker:
        if args.config:
            raise InvalidRequest("give --broker or --config, not both")
        yield Session(remote=_remote(args))
        return
    with local_broker(args, create=create) as broker:
        yield Session(broker=broker)


@contextmanager
def local_broker(args: argparse.Namespace, *, create: bool) -> Iterator[Broker]:
    """The broker of ``--config`` (or ``$JITBROKER_CONFIG``), closed afterwards."""
    broker = load_config(args.config).open_broker(create_store=create)
    try:
        yield broker
    finally:
        broker.close()


def _remote(args: argparse.Namespace) -> RemoteBroker:
    from .web.remote import IdentityToken, RemoteBroker

    # Default: the broker's own URL, as the docs' rules say. A fixed word would be
    # shared by every deployment: a token minted for another broker would work here.
    audience = args.identity_audience or args.broker.rstrip("/")
    identity = IdentityToken.discover(args.identity_token_file, audience)
    return RemoteBroker(args.broker, identity)


def _issue(args: argparse.Namespace, out: Out) -> int:
    with session(args, create=True) as shell:
        issued = shell.issue(args)
    out(json.dumps(issued.to_dict()) if args.json else issued.token)
    return 0


def _renew(args: argparse.Namespace, out: Out) -> int:
    token = read_token(args)
    with session(args, create=False) as shell:
        current = Issued(token, None, 0.0, "", ref=token)
        issued = shell.renew(current, args.ttl)
    out(json.dumps(issued.to_dict()) if args.json else issued.token)
    return 0


def _verify(args: argparse.Namespace, out: Out) -> int:
    token = read_token(args)
    scopes = validate.scopes([s for text in args.scope for s in text.split()])
    with session(args, create=False) as shell:
        try:
            if shell.remote is not None:
                data = introspected(shell.remote.introspect(token), args.audience, scopes)
            else:
                assert shell.broker is not None
                claims = shell.broker.verify(token, audience=args.audience, scopes=scopes)
                data = _verdict(
                    claims.subject, claims.audience, claims.scope, claims.lease_id,
                    claims.expires_at, claims.task, claims.owner,
                )  # fmt: skip
        except InvalidToken as exc:
            error, label = _why(exc, remote=shell.remote is not None)
            why = {"valid": False, "error": error, "reason": str(exc)}
            _say(args, out, why, _printable(f"not valid: {label}: {exc}"))
            return 1
    expires = data["expires_at"]
    text = (
        f"valid: subject={data['subject']} audience={data['audience']} scope={data['scope']!r}"
        f" lease={data['lease_id']} expires "
        + (f"{data['expires_at_iso']} ({relative(expires)})" if expires is not None else "(unsaid)")
    )
    _say(args, out, data, _printable(text))
    return 0


# The reasons of remote verification, as its text says them (``not valid:
# audience: ...``); a bare InvalidToken is the RFC 7662 ``{"active": false}``.
_LABELS: dict[type[InvalidToken], str] = {
    WrongAudience: "audience",
    InsufficientScope: "scope",
    InvalidProof: "key-bound",
}


def _why(exc: InvalidToken, *, remote: bool) -> tuple[str, str]:
    """``--json``'s ``error`` and the text's label: the class name locally; remotely
    the class name too (``"inactive"`` for an inactive token), labelled shorter."""
    name = type(exc).__name__
    if not remote:
        return name, name
    label = _LABELS.get(type(exc), "inactive")
    return ("inactive" if label == "inactive" else name), label


def introspected(answer: dict[str, Any], audience: str, scopes: tuple[str, ...]) -> dict[str, Any]:
    """The verdict ``--json`` prints for an RFC 7662 ``answer`` (from
    ``RemoteBroker.introspect``), checked as local verification checks claims:
    the audience equal to the asked one (one of them, for a list), every asked
    scope held, no key binding; an ``InvalidToken`` if not (a bare one when the
    token is not active)."""
    if not answer.get("active"):
        raise InvalidToken(
            "the broker's /introspect says the token is not active (expired, revoked,"
            " unknown, or not one of its tokens)"
        )
    aud = answer.get("aud")
    if audience not in ([aud] if isinstance(aud, str) else aud or []):
        shown = repr(aud)[:128] if aud is not None else "none"
        raise WrongAudience(f"token is for audience {shown}, not {audience!r}")
    missing = set(scopes) - set(str(answer.get("scope") or "").split())
    if missing:
        raise InsufficientScope(
            f"token lacks scopes {' '.join(sorted(missing))!r}", missing=missing
        )
    if answer.get("cnf") is not None:  # as Verifier refuses a bound token without a proof
        raise InvalidProof(
            "this token is bound to a key (DPoP): only a request with a proof by that key"
            " can use it, and a command line has none"
        )
    return _verdict(
        answer.get("sub"), aud, answer.get("scope") or "", answer.get("jti"),
        answer.get("exp"), answer.get("task"), answer.get("owner"),
    )  # fmt: skip


def _verdict(
    subject: object,
    audience: object,
    scope: object,
    lease_id: object,
    expires_at: float | None,
    task: object,
    owner: object,
) -> dict[str, Any]:
    """What ``verify --json`` prints for a valid token, local or remote."""
    return {
        "valid": True,
        "subject": subject,
        "audience": audience,
        "scope": scope,
        "lease_id": lease_id,
        "expires_at": None if expires_at is None else int(expires_at),
        "expires_at_iso": None if expires_at is None else iso(expires_at),
        "task": task,
        "owner": owner,
    }


def _printable(text: str) -> str:
    # A remote answer's strings reach a terminal: no escape sequences from it.
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _inspect(args: argparse.Namespace, out: Out) -> int:
    token = read_token(args)
    from . import tokens

    if tokens.is_opaque(token):
        lease_id = tokens.check_opaque(token)
        data = {"verified": False, "opaque": True, "lease_id": lease_id}
        text = f"an opaque token: it carries no claims; lease {lease_id} (verify it online)"
        if args.json:
            out(json.dumps(data))
        else:
            out(UNVERIFIED)
            out(text)
        return 0
    header, claims = decode_unverified(token)
    if args.json:
        out(json.dumps({"verified": False, "header": header, "claims": claims}))
        return 0
    out(UNVERIFIED)
    out("header:")
    for name, value in header.items():
        out(f"  {name}: {json.dumps(value)}")
    out("claims:")
    for name, value in claims.items():
        shown = json.dumps(value)
        if name in ("iat", "nbf", "exp") and isinstance(value, int) and not isinstance(value, bool):
            shown = f"{value} = {iso(value)} ({relative(value)})"
        out(f"  {name}: {shown}")
    return 0


def decode_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and payload of a compact JWS, parsed strictly, NOT verified."""
    from . import tokens

    parts = token.split(".")
    if len(token) > tokens.MAX_TOKEN_LENGTH or len(parts) != 3 or not all(parts):
        raise MalformedToken("not a token: a JWS has three base64url parts separated by dots")
    if not tokens._COMPACT.fullmatch(token):
        raise MalformedToken("not a token: characters outside base64url")
    header = tokens.strict_json_object(tokens.b64decode(parts[0]), "header")
    claims = tokens.strict_json_object(tokens.b64decode(parts[1]), "payload")
    return header, claims


def _lease_id(token: str) -> str:
    """The lease id a token names (after ``revoke`` has checked its signature)."""
    from . import tokens

    if tokens.is_opaque(token):
        return tokens.check_opaque(token)
    return str(decode_unverified(token)[1].get("jti"))


def read_token(args: argparse.Namespace) -> str:
    """The token from ``-`` (stdin), ``--token-file``, ``--token-env`` or, where
    allowed, the argument; exactly one of them."""
    env = getattr(args, "token_env", None)
    given = [x for x in (args.token, args.token_file, env) if x]
    if len(given) != 1:
        where = "TOKEN, - (stdin)" if args.token_positional else "- (stdin), --token-env VAR"
        raise InvalidRequest(f"give the token exactly once: {where} or --token-file PATH")
    if args.token == "-":
        text = sys.stdin.read(_MAX_TOKEN_INPUT + 1)
        source = "stdin"
    elif args.token is not None:
        if not args.token_positional:
            # Never echo it: it is probably a token, which must not be an argument.
            raise InvalidRequest(
                "the token is not taken as an argument here (it would land in shell history"
                " and `ps`): give - (stdin), --token-env VAR or --token-file PATH"
            )
        text, source = args.token, "the argument"
    elif args.token_file is not None:
        with open(args.token_file, encoding="ascii", errors="replace") as fh:
            text = fh.read(_MAX_TOKEN_INPUT + 1)
        source = args.token_file
    else:
        text = os.environ.get(str(env), "")
        source = f"${env}"
    text = text.strip()
    if not text:
        raise InvalidRequest(f"no token in {source}")
    if len(text) > _MAX_TOKEN_INPUT:
        raise InvalidRequest(f"{source} holds more than a token")
    return text


def _say(args: argparse.Namespace, out: Out, data: dict[str, Any], text: str) -> None:
    out(json.dumps(data) if getattr(args, "json", False) else text)


def iso(ts: float) -> str:
    """ISO 8601 UTC, to the second."""
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return "(out of range)"


def relative(ts: float, now: float | None = None) -> str:
    """``in 4m 10s`` / ``3m 2s ago``."""
    delta = ts - (time.time() if now is None else now)
    if abs(delta) > 10 * 365 * 86400:
        return "in the far future" if delta > 0 else "long ago"
    text = _span(abs(delta))
    return f"in {text}" if delta >= 0 else f"{text} ago"


def _span(seconds: float) -> str:
    left = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if left >= size:
            parts.append(f"{left // size}{unit}")
            left %= size
    if left or not parts:
        parts.append(f"{left}s")
    return " ".join(parts[:2])
