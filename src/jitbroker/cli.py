"""The ``jitbroker`` command.

``jitbroker demo`` walks through a credential's life; ``jitbroker keys ...``
manages a key directory (``cli_keys``); ``report``, ``leases``, ``revoke`` and
``policy check`` operate on a shared store and a policy file (``cli_governance``).
Exit status: 0 done, 1 a negative answer (denied, nothing to revoke), 2 an error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from . import __version__, cli_governance, cli_keys
from .broker import Broker
from .errors import InvalidRequest, InvalidToken, JitBrokerError, PolicyDenied, StoreError
from .keyring import KeyRing
from .lease import Credential, Lease
from .policy import Policy, Rule
from .testing import FakeClock

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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jitbroker`` command."""
    parser = argparse.ArgumentParser(prog="jitbroker", description=__doc__)
    parser.add_argument("--version", action="version", version=f"jitbroker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="walk through issuing, verifying and killing a credential")
    cli_keys.add_parser(sub)
    cli_governance.add_parsers(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            Demo().run()
        elif args.command == "keys":
            cli_keys.run(args)
        else:
            return cli_governance.run(args)
    except StoreError as exc:
        print(f"jitbroker: store error: {exc}", file=sys.stderr)
        return 2
    except (InvalidRequest, JitBrokerError) as exc:
        print(f"jitbroker: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
