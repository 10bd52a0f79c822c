"""``jitbroker keys ...``: manage a key directory (see ``KeyRing.save_dir``).

    jitbroker keys generate DIR [--alg EdDSA] [--password-env VAR]
    jitbroker keys rotate DIR [--grace SECONDS] [--password-env VAR]
    jitbroker keys retire DIR KID [--password-env VAR]
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
from .keyring import MANIFEST, KeyRing
from .keys import ALGORITHMS

__all__ = ["add_parser"]

Out = Callable[[str], object]
# The default grace of `keys rotate`: Broker's default max_ttl (3600 s) plus the
# largest leeway a verifier may allow (60 s), so no token of a broker with
# default settings outlives the key that signed it.
DEFAULT_GRACE = 3600.0 + 60.0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``keys`` and its subcommands on the top-level parser."""
    keys = sub.add_parser("keys", help="generate, rotate, retire and publish signing keys")
    cmds = keys.add_subparsers(dest="keys_command", required=True)

    gen = cmds.add_parser("generate", help="create a key directory with one signing key")
    gen.add_argument("dir", type=Path)
    gen.add_argument("--alg", choices=ALGORITHMS, default="EdDSA")

    rot = cmds.add_parser("rotate", help="add a new signing key; the old one retires later")
    rot.add_argument("dir", type=Path)
    rot.add_argument(
        "--grace",
        type=_grace,
        default=DEFAULT_GRACE,
        help="seconds the old key keeps verifying, at least your max TTL + leeway "
        "(default 3660: the default max TTL 3600 + the maximum leeway 60)",
    )

    ret = cmds.add_parser("retire", help="drop a key now: tokens it signed stop verifying")
    ret.add_argument("dir", type=Path)
    ret.add_argument("kid")

    pub = cmds.add_parser("show-public", help="print the public JWKS of a key directory or file")
    pub.add_argument("source", type=Path)

    for cmd in (gen, rot, ret, pub):
        cmd.add_argument(
            "--password-env",
            metavar="VAR",
            help="environment variable holding the passphrase that encrypts the keys "
            "(not for HS256: HMAC keys cannot be encrypted)",
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
        dropped = ring.prune(time.time())
        old = ring.active.kid
        new = ring.rotate(grace=args.grace)
        ring.save_dir(args.dir, password)
        when = datetime.fromtimestamp(ring.drops_at(old) or 0, UTC).isoformat(timespec="seconds")
        out(f"new signing key {new.kid}; {old} verifies until {when}")
        for kid in dropped:
            out(f"dropped {kid} (grace period over)")
    elif command == "retire":
        ring = KeyRing.from_dir(args.dir, password)
        ring.retire(args.kid)
        ring.save_dir(args.dir, password)
        out(f"retired {args.kid}: tokens it signed no longer verify")
    else:
        out(json.dumps(_load(args.source, password).jwks(), indent=2))


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
