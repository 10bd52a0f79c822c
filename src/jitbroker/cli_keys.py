"""``jitbroker keys ...``: manage a key directory (see ``KeyRing.save_dir``).

    jitbroker keys generate DIR [--alg EdDSA] [--password-env VAR]
    jitbroker keys rotate DIR [--grace SECONDS] [--publish-ahead SECONDS] [--password-env VAR]
    jitbroker keys retire DIR KID [--store URL [--revoke]] [--password-env VAR]
    jitbroker keys show-public DIR_OR_FILE [--password-env VAR]

Private keys never reach the terminal: they are written to the directory with
mode 0600, PEM-encrypted when ``--password-env`` names a variable holding a
passphrase (a passphrase on the command line would land in shell history).
HMAC (HS256) keys are JWK files that cannot be encrypted, so ``--password-env``
is refused for them: protect their directory instead.

A key directory is trusted as OpenSSH trusts ``~/.ssh`` (see ``KeyRing.from_dir``):
one that is a symbolic link, belongs to another user, or that group or others
can write is refused with a one-line error saying what to run (``chmod 700
DIR``), and the command exits with status 2.

Running brokers see these changes when they follow the directory
(``KeyRing.from_dir(DIR, follow=True)``: within their poll interval, 1 s by
default). ``rotate`` is two-phase: the new key is published at once and signs
only ``--publish-ahead`` seconds later. ``retire --store URL`` also records the
retirement in the lease store, so every broker sharing it stops signing with
and verifying the key whether or not it follows the directory: a broker with a
live revocation feed (Redis, PostgreSQL) within one feed round trip (with
strict revocations, the default, the command returns once every live feed has
it), the others at their next sweep (their reap interval, 1 s by default);
``--revoke`` also revokes the leases the key signed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from .errors import InvalidRequest
from .keyring import DEFAULT_PUBLISH_AHEAD, MANIFEST, KeyRing
from .keys import ALGORITHMS

__all__ = ["add_parser"]

Out = Callable[[str], object]
# The default grace of `keys rotate`: Broker's default max_ttl (3600 s) plus the
# largest leeway a verifier may allow (60 s), so no token of a broker with
# default settings outlives the key that signed it.
DEFAULT_GRACE = 3600.0 + 60.0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``keys`` and its subcommands on the top-level parser."""
    keys = sub.add_parser(
        "keys",
        help="generate, rotate, retire and publish signing keys",
        epilog="e.g. jitbroker keys rotate /etc/jitbroker/keys --publish-ahead 3600",
    )
    cmds = keys.add_subparsers(dest="keys_command", required=True)

    gen = cmds.add_parser(
        "generate",
        help="create a key directory with one signing key",
        epilog="e.g. jitbroker keys generate /etc/jitbroker/keys --alg ES256",
    )
    gen.add_argument("dir", type=Path, help="the key directory to create; e.g. /etc/jitbroker/keys")
    gen.add_argument(
        "--alg",
        choices=ALGORITHMS,
        default="EdDSA",
        help="the signing algorithm (default EdDSA); e.g. --alg ES256",
    )

    rot = cmds.add_parser(
        "rotate",
        help="add a new signing key; the old one retires later",
        epilog="e.g. jitbroker keys rotate /etc/jitbroker/keys --publish-ahead 3600",
    )
    rot.add_argument("dir", type=Path, help="the key directory; e.g. /etc/jitbroker/keys")
    rot.add_argument(
        "--grace",
        type=_grace,
        default=DEFAULT_GRACE,
        help="seconds the old key keeps verifying once it stops signing, at least your "
        "max TTL + leeway (default 3660: the default max TTL 3600 + the maximum leeway 60);"
        " e.g. --grace 7260",
    )
    rot.add_argument(
        "--publish-ahead",
        type=_grace,
        default=DEFAULT_PUBLISH_AHEAD,
        metavar="SECONDS",
        help="seconds the new key is published (JWKS, brokers following DIR) before it "
        "signs, at least the longest JWKS cache age of your verifiers (default 3600: a "
        "JWKSource's default max_age); 0 signs at once (an emergency rotation);"
        " e.g. --publish-ahead 0",
    )

    ret = cmds.add_parser(
        "retire",
        help="drop a key now from DIR (and, with --store, from every broker sharing the store)",
        epilog="e.g. jitbroker keys retire /etc/jitbroker/keys KID "
        "--store redis://localhost:6379/0 --revoke",
    )
    ret.add_argument("dir", type=Path, help="the key directory; e.g. /etc/jitbroker/keys")
    ret.add_argument(
        "kid",
        help="the key id to retire (see show-public); one that starts with - goes after --,"
        " e.g. keys retire DIR -- -3Qf1oH2cC9zT",
    )
    ret.add_argument(
        "--store",
        metavar="URL",
        help="the lease store the brokers share (sqlite:PATH, redis://..., postgresql://...): "
        "the retirement is recorded there and every broker sharing it drops the key: "
        "within one feed round trip with a live revocation feed, else at its next sweep; "
        "e.g. --store postgresql://jitbroker@db/jitbroker",
    )
    ret.add_argument(
        "--revoke",
        action="store_true",
        help="also revoke every lease the key signed (needs --store); e.g. --revoke",
    )

    pub = cmds.add_parser(
        "show-public",
        help="print the public JWKS of a key directory or file",
        epilog="e.g. jitbroker keys show-public /etc/jitbroker/keys > jwks.json",
    )
    pub.add_argument(
        "source", type=Path, help="a key directory or a PEM file; e.g. /etc/jitbroker/keys"
    )

    for cmd in (gen, rot, ret, pub):
        cmd.add_argument(
            "--password-env",
            metavar="VAR",
            help="environment variable holding the passphrase that encrypts the keys "
            "(not for HS256: HMAC keys cannot be encrypted);"
            " e.g. --password-env JITBROKER_KEY_PASS",
        )


def run(args: argparse.Namespace, out: Out = print) -> None:
    """Carry out a parsed ``keys`` command.

    ``InvalidRequest`` for a bad request, ``KeySourceError`` for a key directory
    or file that is refused as unsafe or cannot be written.
    """
    password = _password(args.password_env)
    command = args.keys_command
    if command == "generate":
        if (args.dir / MANIFEST).exists():
            raise InvalidRequest(f"{args.dir} already holds a key ring; use `keys rotate`")
        ring = KeyRing.generate(args.alg)
        ring.save_dir(args.dir, password)
        out(f"generated {args.alg} key {ring.active.kid} in {args.dir}")
    elif command == "rotate":
        ring = KeyRing.from_dir(args.dir, password)
        ring.promote(time.time())  # a key published by an earlier rotation may sign by now
        dropped = ring.prune(time.time())
        old = ring.active.kid
        new = ring.rotate(grace=args.grace, publish_ahead=args.publish_ahead)
        ring.save_dir(args.dir, password)
        signs = ring.activates_at(new.kid)
        if signs is None:
            out(f"new signing key {new.kid}, signing now")
        else:
            out(f"new key {new.kid} published now, signing from {_when(signs)}")
            out(f"{old} signs until then")
        out(f"{old} verifies until {_when(ring.drops_at(old) or 0)}")
        for kid in dropped:
            out(f"dropped {kid} (grace period over)")
    elif command == "retire":
        _retire(args, password, out)
    else:
        out(json.dumps(_load(args.source, password).jwks(), indent=2))


def _retire(args: argparse.Namespace, password: bytes | None, out: Out) -> None:
    """``keys retire``: the store first (if given), then the directory, so a
    failure leaves a retirement that a second run completes."""
    if args.revoke and args.store is None:
        raise InvalidRequest("--revoke needs --store: the leases a key signed live in the store")
    ring = KeyRing.from_dir(args.dir, password)
    ring.promote(time.time())  # the key signing now is the one that cannot be retired
    revoked = None
    if args.store is None:
        ring.retire(args.kid)
    else:
        from .broker import Broker  # here: the broker is only needed with a store
        from .stores import open_store

        store = open_store(args.store, create=False)
        try:
            broker = Broker(keys=ring, store=store)  # the ring only checks the kid
            revoked = broker.retire_key(args.kid, revoke=args.revoke)
        finally:
            store.close()
    ring.save_dir(args.dir, password)
    out(f"retired {args.kid}: removed from {args.dir}")
    if args.store is None:
        out(
            "  brokers and verifiers following that directory drop it within their poll "
            "interval; other processes keep it until restarted (use --store to reach "
            "every broker sharing a store)"
        )
        return
    out(
        "  recorded in the store: every broker sharing it with a live revocation feed "
        "stops signing with it and rejects its tokens within one feed round trip, the "
        "others at their next sweep (their reap interval); offline verifiers once they "
        "refetch the JWKS"
    )
    if revoked is not None and args.revoke:
        out(f"  revoked {revoked} leases it signed")


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


def _load(source: Path, password: bytes | None) -> KeyRing:
    if source.is_dir():
        return KeyRing.from_dir(source, password)
    return KeyRing.from_file(source, password)


def _grace(text: str) -> float:
    """``--grace``: a finite number of seconds, zero or more."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def _password(variable: str | None) -> bytes | None:
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise InvalidRequest(f"environment variable {variable} is not set or empty")
    return value.encode()
