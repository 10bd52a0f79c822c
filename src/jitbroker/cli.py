"""The ``jitbroker`` command.

``jitbroker demo`` walks through a credential's life; ``jitbroker keys ...``
manages a key directory (``cli_keys``); ``report``, ``leases``, ``revoke`` and
``policy check`` operate on a shared store and a policy file (``cli_governance``);
``issue``, ``renew``, ``verify``, ``inspect`` (``cli_shell``) and ``exec``
(``cli_exec``) give shell jobs their credentials; ``serve`` runs the broker
service (``cli_serve``). See docs/cli.md.
Exit status: 0 done, 1 a negative answer (denied, not valid, nothing to revoke), 2 an error.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import NoReturn

from . import __version__, cli_exec, cli_governance, cli_keys, cli_shell
from .broker import Broker
from .errors import InvalidToken, JitBrokerError, LeaseError, PolicyDenied, StoreError
from .keyring import KeyRing
from .lease import Credential, Lease
from .policy import Policy, Rule

__all__ = ["main"]

AUDIENCE = "db:orders"


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S")


def _lease_line(lease: Lease, now: float) -> str:
    parent = f", child of {lease.parent[:8]}…" if lease.parent else ""
    return (
        f"lease {lease.id[:8]}… {lease.status(now):7} subject={lease.subject} "
        f"scopes={lease.scope!r} expires {_when(lease.expires_at)}{parent}"
    )


class Demo:
    """A scripted walk-through on the embedded default store, with a simulated clock."""

    def __init__(self, out: Callable[[str], object] = print) -> None:
        from .testing import FakeClock  # pulls in pytest: only for the demo

        self.out = out
        self.clock = FakeClock()
        self.broker = Broker(
            issuer="urn:example:broker",
            keys=KeyRing.generate("EdDSA"),
            clock=self.clock,
            default_ttl=60,
            max_ttl=600,
        )
        self.step_no = 0

    def step(self, title: str) -> None:
        self.step_no += 1
        self.out(f"\n{self.step_no}. {title}")

    def say(self, text: str) -> None:
        self.out(f"   {text}")

    def check(self, cred: Credential, scopes: Sequence[str] = ()) -> None:
        """Verify online and print the outcome (never the token)."""
        try:
            claims = self.broker.verify(cred.token, audience=AUDIENCE, scopes=scopes)
        except InvalidToken as exc:
            self.say(f"verify -> REJECTED: {type(exc).__name__}: {exc}")
        else:
            self.say(
                f"verify -> ok: sub={claims.subject} aud={claims.audience} "
                f"scope={claims.scope!r} task={claims.task}"
            )

    def run(self) -> None:
        b = self.broker
        self.out("jitbroker demo: one task's credential, from birth to death")
        self.out(f"(in-memory store, EdDSA key {b.keys.active.kid[:12]}…, simulated clock)")

        self.step("A CI job asks for read/write access to the orders database for its task")
        with b.task(
            "nightly-export",
            subject="svc:ci-deploy",
            audience=AUDIENCE,
            scopes=["orders:read", "orders:write"],
            ttl=60,
            owner="alice@example.com",
            purpose="nightly export",
        ) as cred:
            self.say(_lease_line(cred.lease, self.clock()))
            self.say(f"the token never prints: token in repr(cred)? {cred.token in repr(cred)}")
            self.check(cred, ["orders:read"])

            self.step("The job runs long: 45 s later it renews (same lease, fresh token)")
            self.clock.advance(45)
            renewed = b.renew(cred, ttl=60)
            self.say(_lease_line(renewed.lease, self.clock()))
            self.check(renewed, ["orders:write"])

            self.step("It hands a read-only, 30 s credential to a helper (attenuation)")
            child = b.attenuate(renewed, scopes=["orders:read"], ttl=30)
            self.say(_lease_line(child.lease, self.clock()))
            self.check(child, ["orders:read"])
            self.say("asking the child for orders:write:")
            self.check(child, ["orders:write"])
            self.say(f"active leases of the task: {len(list(b.leases(task='nightly-export')))}")

        self.step("The task ends: every lease of the task is revoked, children included")
        self.check(renewed)
        self.check(child)

        self.step("A lease nobody revokes dies at its TTL: the reaper sweeps it")
        short = b.issue("svc:report", AUDIENCE, ["orders:read"], ttl=30, owner="bob@example.com")
        self.say(_lease_line(short.lease, self.clock()))
        self.clock.advance(31)
        self.say("31 s later...")
        for lease in b.sweep():
            self.say(f"swept: lease {lease.id[:8]}… of {lease.subject} expired")
        self.check(short)

        self.step("Inventory: what is still alive?")
        alive = list(b.leases())
        self.say(f"{len(alive)} active leases" + ("" if alive else " - nothing outlived its task"))
        for lease in b.leases(include_inactive=True):
            reason = f" ({lease.revoke_reason})" if lease.revoke_reason else ""
            self.say(_lease_line(lease, self.clock()) + reason)
        self.governance()
        self.out(
            "\nOffline verifiers can use the public JWKS: " + str(len(b.jwks()["keys"])) + " key"
        )

    def governance(self) -> None:
        """Least privilege at request time, and the operator's view."""
        self.step("A least-privilege policy refuses an over-broad request, with every reason")
        policy = Policy(
            [
                Rule(
                    "svc:ci-*",
                    AUDIENCE,
                    ["orders:read"],
                    max_ttl=300,
                    owner_required=True,
                    max_active=2,
                    name="ci",
                )
            ]
        )
        strict = Broker(
            issuer="urn:example:broker",
            keys=self.broker.keys,
            store=self.broker.store,
            clock=self.clock,
            policy=policy,
            max_ttl=600,
        )
        try:
            strict.issue("svc:ci-deploy", AUDIENCE, ["orders:write"], ttl=600)
        except PolicyDenied as denied:
            for reason in denied.reasons:
                self.say(f"denied: {reason}")
        strict.issue("svc:ci-deploy", AUDIENCE, ["orders:read"], 120, owner="alice@example.com")
        self.say("the same workload asking for orders:read, 120 s, with an owner: issued")

        self.step("The operator's report: what is alive, who owns it, what looks wrong")
        report = strict.report(long_ttl=60)
        self.say(f"{len(report.active)} active lease(s), by owner: {dict(report.by_owner)}")
        self.say(f"leases that may live longer than 60 s: {len(report.long_lived)}")
        self.say(f"offboarding alice: revoked {strict.revoke_where(owner='alice@example.com')}")


class _Parser(argparse.ArgumentParser):
    """No abbreviated options (``--aud`` is a typo, not ``--audience``), and a
    usage error is one line on stderr naming the option, exit status 2."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``jitbroker`` parser with every command registered."""
    parser = _Parser(
        prog="jitbroker",
        description="Just-in-time, task-scoped credentials. See docs/cli.md.",
        epilog="exit status: 0 done, 1 a negative answer (denied, not valid, nothing to"
        " revoke), 2 an error",
    )
    parser.add_argument("--version", action="version", version=f"jitbroker {__version__}")
    sub: argparse._SubParsersAction[argparse.ArgumentParser]
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")  # type: ignore[assignment]
    sub.add_parser(
        "demo",
        help="walk through issuing, verifying and killing a credential",
        description="In memory, on a simulated clock; nothing is written. E.g. jitbroker demo",
    )
    cli_keys.add_parser(sub)
    cli_governance.add_parsers(sub)
    cli_shell.add_parsers(sub)
    cli_exec.add_parser(sub)
    # `jitbroker serve` lives with the service (jitbroker.web); registered once it exists.
    if importlib.util.find_spec(f"{__package__}.cli_serve") is not None:
        from . import cli_serve  # type: ignore[attr-defined,unused-ignore]

        cli_serve.add_parser(sub)
    return parser


def _split_exec(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``exec``'s own arguments and CMD: everything after the first ``--``."""
    if not argv or argv[0] != "exec" or ("--" not in argv and {"-h", "--help"} & set(argv)):
        return argv, None
    if "--" not in argv:
        print(
            "jitbroker exec: error: put `--` before the command:"
            " jitbroker exec [options] -- CMD ARGS",
            file=sys.stderr,
        )
        sys.exit(2)
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def _refuse_unknown_options(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Name a mistyped ``--option`` first: argparse would rather report a
    required option as missing (``--aud x`` for ``--audience x``)."""
    commands = next(
        (a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {}
    )
    command = commands.get(argv[0]) if argv else None
    if command is None or any(isinstance(a, argparse._SubParsersAction) for a in command._actions):
        return  # nested commands (keys, policy, outbox): argparse reports them itself
    known = set(command._option_string_actions)
    for arg in argv[1:]:
        if arg == "--":
            return
        name = arg.split("=", 1)[0]
        if name.startswith("--") and name not in known:
            command.error(f"unrecognized option {name}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jitbroker`` command."""
    own, command = _split_exec(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    _refuse_unknown_options(parser, own)
    args = parser.parse_args(own)
    try:
        code = _dispatch(args, command)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`jitbroker inspect T | head -1`): not an error.
        # Point stdout at devnull so the interpreter's last flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (PolicyDenied, LeaseError) as exc:  # a negative answer, not a failure
        print(f"jitbroker: denied: {exc}", file=sys.stderr)
        return 1
    except StoreError as exc:
        print(f"jitbroker: store error: {exc}", file=sys.stderr)
        return 2
    except JitBrokerError as exc:
        print(f"jitbroker: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"jitbroker: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jitbroker: interrupted", file=sys.stderr)
        return 130
    return code


def _dispatch(args: argparse.Namespace, command: list[str] | None) -> int:
    if args.command == "demo":
        Demo().run()
        return 0
    if args.command == "keys":
        cli_keys.run(args)
        return 0
    if args.command == "exec":
        return cli_exec.run(args, command or [])
    if args.command in ("issue", "renew", "verify", "inspect"):
        return cli_shell.run(args)
    if args.command in cli_governance.COMMANDS:
        return cli_governance.run(args)
    # `serve` (cli_serve): its parser names the function that runs it, or its module's run().
    func = getattr(args, "func", None)
    if func is None:
        from . import cli_serve  # type: ignore[attr-defined,unused-ignore]

        func = cli_serve.run
    return int(func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
