"""``jitbroker serve --config jitbroker.toml``: run the broker as an HTTP service.

Imports ``jitbroker.web`` (the ``[web]`` extra: Starlette, uvicorn) only when
the command runs, so ``jitbroker --help`` works without it. Exit status: 0
after a clean shutdown (SIGTERM / SIGINT), 2 for an error (a bad config, a
refused binding, a port in use), with one line on stderr naming the problem.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .errors import JitBrokerError

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``serve`` on the ``jitbroker`` subparsers ``sub``."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="run the broker as an OAuth 2.0 token service (needs jitbroker[web])",
        description=(
            "Serve POST /token, /revoke, /introspect, /renew, GET /jwks.json and the "
            "RFC 8414 metadata, from the [broker], [serve], [[trust]] and [[clients]] "
            "tables of a config file. Loopback only unless told otherwise. "
            "Example: jitbroker serve --config /etc/jitbroker/jitbroker.toml"
        ),
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="the config file (default: $JITBROKER_CONFIG), e.g. --config jitbroker.toml",
    )
    parser.add_argument(
        "--host",
        help="address to bind, overriding [serve] host (default 127.0.0.1), e.g. --host 0.0.0.0",
    )
    parser.add_argument(
        "--port",
        type=int,
        help="port to bind, overriding [serve] port (default 8471), e.g. --port 8443",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="worker processes, overriding [serve] workers (default 1), e.g. --workers 4",
    )
    parser.add_argument(
        "--insecure-http",
        action="store_true",
        help=(
            "allow plain HTTP on a non-loopback address (only behind a proxy that "
            "terminates TLS), e.g. --host 0.0.0.0 --insecure-http"
        ),
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Serve until stopped; the exit status."""
    try:
        from .config import CONFIG_ENV
        from .web.serve import serve
    except ImportError as exc:  # the [web] extra is not installed
        print(
            f"jitbroker serve needs the web extra: pip install 'jitbroker[web]' ({exc.name})",
            file=sys.stderr,
        )
        return 2
    import os

    config = args.config or os.environ.get(CONFIG_ENV)
    if not config:
        print(f"jitbroker serve: give --config FILE or set {CONFIG_ENV}", file=sys.stderr)
        return 2
    try:
        started = serve(
            config,
            host=args.host,
            port=args.port,
            workers=args.workers,
            insecure_http=args.insecure_http,
        )
    except (JitBrokerError, OSError) as exc:
        print(f"jitbroker serve: {exc}", file=sys.stderr)
        return 2
    if not started:
        print("jitbroker serve: the server did not start (see the log above)", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m jitbroker.cli_serve``: the command on its own."""
    parser = argparse.ArgumentParser(prog="jitbroker", allow_abbrev=False)
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
