"""``jitbroker issue|renew|revoke|verify|inspect`` run as an operator runs them: real
subprocesses on a SQLite store file, and ``--broker`` against the broker service
under a real uvicorn, callers proven by tokens of a real OIDC issuer."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from jitbroker import KeyRing
from jitbroker.cli import build_parser
from jitbroker.stores import SQLiteStore

ISSUER = "urn:test:cli-shell"
AUD = "db:orders"


class Home:
    """A key directory, a store path and a jitbroker.toml in one folder, and
    ``run(...)``: the command in a subprocess."""

    def __init__(self, folder: Path, extra: str = "") -> None:
        self.folder = folder
        KeyRing.generate("EdDSA").save_dir(folder / "keys")
        self.db = folder / "leases.db"
        self.config = folder / "jitbroker.toml"
        self.config.write_text(
            f'[broker]\nissuer = "{ISSUER}"\nkeys = "keys"\nstore = "leases.db"\n'
            f'max_ttl = "2h"\n{extra}'
        )
        self.config.chmod(0o600)

    def run(
        self,
        *argv: str,
        input: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("JITBROKER_")}
        return subprocess.run(
            [sys.executable, "-m", "jitbroker.cli", *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**base, **(env or {})},
        )

    def issue(self, *extra: str) -> str:
        done = self.run(
            "issue", "--config", str(self.config), "--subject", "svc:ci", "--audience", AUD,
            "--scope", "orders:read", *extra,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    def lease(self, lease_id: str) -> Any:
        store = SQLiteStore(self.db)
        try:
            return store.get(lease_id)
        finally:
            store.close()


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def test_issue_verify_renew_revoke_verify(home: Home) -> None:
    out = home.issue("--ttl", "10m")
    token = out.strip()
    assert out == token + "\n"
    assert token.count(".") == 2
    cfg = ("--config", str(home.config))
    ok = home.run("verify", "-", *cfg, "--audience", AUD, "--scope", "orders:read", input=token)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("valid: subject=svc:ci")

    renewed = home.run("renew", "-", *cfg, "--ttl", "1h", "--json", input=token)
    assert renewed.returncode == 0, renewed.stderr
    data = json.loads(renewed.stdout)
    assert data["expires_in"] > 3000
    lease = home.lease(data["lease_id"])
    assert int(lease.expires_at) == data["expires_at"]

    (home.folder / "t").write_text(data["access_token"] + "\n")
    gone = home.run("revoke", "--token-file", str(home.folder / "t"), *cfg)
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout.strip() == f"revoked lease {data['lease_id']}"
    assert home.lease(data["lease_id"]).revoked_at is not None

    for t in (token, data["access_token"]):
        no = home.run("verify", t, *cfg, "--audience", AUD)
        assert no.returncode == 1
        assert no.stdout.startswith("not valid: TokenRevoked")
    again = home.run("revoke", "-", *cfg, "--json", input=token)
    assert again.returncode == 1  # nothing was active: a negative answer
    assert json.loads(again.stdout) == {"revoked": False, "lease_id": data["lease_id"]}


def test_issue_json_and_the_token_sources_of_renew(home: Home) -> None:
    data = json.loads(home.issue("--ttl", "90", "--owner", "alice", "--json"))
    assert set(data) >= {"access_token", "lease_id", "expires_at", "scope", "token_type"}
    assert data["scope"] == "orders:read"
    assert data["token_type"] == "Bearer"
    assert 80 <= data["expires_in"] <= 90
    assert home.lease(data["lease_id"]).owner == "alice"
    cfg = ("--config", str(home.config))
    by_env = home.run(
        "renew", "--token-env", "MY_TOKEN", *cfg, env={"MY_TOKEN": data["access_token"]}
    )
    assert by_env.returncode == 0, by_env.stderr
    # The config can come from $JITBROKER_CONFIG too.
    env = {"JITBROKER_CONFIG": str(home.config)}
    by_stdin = home.run("renew", "-", input=data["access_token"], env=env)
    assert by_stdin.returncode == 0, by_stdin.stderr


def test_renew_and_revoke_never_take_a_token_as_an_argument(home: Home) -> None:
    token = home.issue().strip()
    for command in ("renew", "revoke"):
        done = home.run(command, token, "--config", str(home.config))
        assert done.returncode == 2
        line = one_line(done.stderr)
        assert token not in done.stderr
        assert "shell history" in line
    both = home.run("renew", "-", "--token-env", "X", "--config", str(home.config), input=token)
    assert both.returncode == 2
    assert "exactly once" in one_line(both.stderr)


def test_verify_says_why_not(home: Home) -> None:
    token = home.issue().strip()
    cfg = ("--config", str(home.config))
    wrong = home.run("verify", token, *cfg, "--audience", "db:other", "--json")
    assert wrong.returncode == 1
    assert json.loads(wrong.stdout)["error"] == "WrongAudience"
    scope = home.run("verify", token, *cfg, "--audience", AUD, "--scope", "orders:write")
    assert scope.returncode == 1
    assert "InsufficientScope" in scope.stdout
    garbled = home.run("verify", "not-a-token", *cfg, "--audience", AUD)
    assert garbled.returncode == 1
    assert "MalformedToken" in garbled.stdout
    # An error is not a negative answer: exit 2.
    home.db.unlink()
    down = home.run("verify", token, *cfg, "--audience", AUD)
    assert down.returncode == 2
    assert "no SQLite store" in one_line(down.stderr)


def test_issue_denied_by_policy_is_a_negative_answer(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[[rule]]\nsubjects = ["svc:ci"]\naudiences = ["db:orders"]\nscopes = ["x"]\n'
    )
    policy.chmod(0o600)
    home = Home(tmp_path, 'policy = "policy.toml"\n')
    done = home.run(
        "issue", "--config", str(home.config), "--subject", "svc:ci", "--audience", AUD,
        "--scope", "orders:read",
    )  # fmt: skip
    assert done.returncode == 1
    assert one_line(done.stderr).startswith("jitbroker: denied: policy denied the request")
    assert done.stdout == ""


def test_inspect_decodes_without_verifying_and_says_so_first(home: Home) -> None:
    token = home.issue("--ttl", "10m", "--task", "job-42").strip()
    done = home.run("inspect", token)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("NOT VERIFIED")
    exp = next(line for line in lines if line.strip().startswith("exp:"))
    assert "Z (in 9m" in exp or "Z (in 10m" in exp  # ISO 8601 and relative
    assert any('task: "job-42"' in line for line in lines)
    (home.folder / "t").write_text(token)
    data = json.loads(home.run("inspect", "--token-file", str(home.folder / "t"), "--json").stdout)
    assert data["verified"] is False
    assert data["claims"]["task"] == "job-42"
    assert data["header"]["typ"] == "at+jwt"
    assert home.run("inspect", "-", input=token).stdout.startswith("NOT VERIFIED")


@pytest.mark.parametrize(
    "garbage",
    ["hello", "a.b.c", "eyJhbGciOiJFZERTQSJ9.bm90IGpzb24.c2ln", "x" * 100_000, "e30.e30.e30."],
)
def test_inspect_of_garbage_is_exit_2_with_one_clear_line(home: Home, garbage: str) -> None:
    done = home.run("inspect", "-", input=garbage)
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert line.startswith("jitbroker: error:")
    assert garbage[:50] not in line or (garbage == "hello" and "hello" not in line)


def test_a_closed_pipe_is_not_an_error(home: Home) -> None:
    token = home.issue().strip()
    # The reader is gone before jitbroker writes a byte: every write fails with EPIPE.
    proc = subprocess.Popen(
        [sys.executable, "-m", "jitbroker.cli", "inspect", token],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(60) == 0
    assert err == b""
    bash = shutil.which("bash")
    if bash is not None:  # as typed: `jitbroker inspect T | head -1`
        line = f'set -o pipefail; "{sys.executable}" -m jitbroker.cli inspect "$T" | head -1'
        shell = subprocess.run(
            [bash, "-c", line], env={**os.environ, "T": token}, capture_output=True, text=True
        )
        assert shell.returncode == 0, shell.stderr
        assert shell.stdout.startswith("NOT VERIFIED")
        assert shell.stderr == ""


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["issue", "--subject", "s", "--audience", "a", "--ttll", "5"], "--ttll"),
        (["issue", "--subject", "s", "--audience", "a", "--aud", "a"], "--aud"),
        (["issue", "--subject", "s", "--aud", "a"], "--aud"),  # not "--audience is required"
        (["revoke", "--store", "x", "--leas", "a"], "--leas"),
        (["verify", "-", "--audience", "a", "--scopes", "x"], "--scopes"),
        (["inspect", "-", "--jsn"], "--jsn"),
        (["renew", "-", "--tll", "5"], "--tll"),
        (["exec", "--audienc", "a", "--", "true"], "--audienc"),
        (["issue", "--subject", "s", "--audience", "a", "--ttl", "soon"], "--ttl"),
    ],
)
def test_a_typod_option_is_exit_2_naming_it(home: Home, argv: list[str], named: str) -> None:
    done = home.run(*argv)
    assert done.returncode == 2
    assert named in one_line(done.stderr)


def test_a_missing_or_bad_config_is_one_line(home: Home, tmp_path: Path) -> None:
    missing = home.run("issue", "--config", str(tmp_path / "nope.toml"), "--audience", AUD)
    assert missing.returncode == 2
    assert "cannot read the config file" in one_line(missing.stderr)
    unset = home.run("issue", "--subject", "s", "--audience", AUD)
    assert unset.returncode == 2
    assert "JITBROKER_CONFIG" in one_line(unset.stderr)
    home.config.chmod(0o666)
    loose = home.run("issue", "--config", str(home.config), "--subject", "s", "--audience", AUD)
    assert loose.returncode == 2
    assert "chmod go-w" in one_line(loose.stderr)


def test_revoke_by_lease_id_and_filters_still_works(home: Home) -> None:
    data = json.loads(home.issue("--json"))
    done = home.run("revoke", "--store", str(home.db), "--lease", data["lease_id"], "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"revoked": True, "lease_id": data["lease_id"]}
    mixed = home.run("revoke", "--config", str(home.config), "--lease", data["lease_id"])
    assert mixed.returncode == 2
    assert "token" in one_line(mixed.stderr)


def test_the_console_script_runs(home: Home) -> None:
    script = shutil.which("jitbroker")
    if script is None:
        pytest.skip("the jitbroker console script is not installed")
    done = subprocess.run([script, "inspect", "-"], input="x", capture_output=True, text=True)
    assert done.returncode == 2
    assert "not a token" in one_line(done.stderr)


# Every option of the shell commands says what it does, with an example.
SHELL_COMMANDS = ("issue", "renew", "verify", "inspect", "exec", "revoke")


def _subparsers(parser: Any) -> dict[str, Any]:
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@pytest.mark.parametrize("command", SHELL_COMMANDS)
def test_every_option_has_help_with_an_example(command: str) -> None:
    parser = _subparsers(build_parser())[command]
    assert parser.allow_abbrev is False
    for action in parser._actions:
        if action.dest in ("help",) or (action.help is None and command == "revoke"):
            continue  # revoke's older filter options predate this rule
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
        takes_value = action.nargs != 0 and action.option_strings
        if takes_value and command != "revoke":
            assert "e.g." in action.help or "default" in action.help, (command, action.dest)


def test_no_parser_accepts_abbreviations() -> None:
    stack = [build_parser()]
    while stack:
        parser = stack.pop()
        assert parser.allow_abbrev is False, parser.prog
        stack.extend(_subparsers(parser).values())


# -- remote mode: the broker service under a real uvicorn ------------------------------
@contextmanager
def serving(build: Any) -> Iterator[str]:
    """Bind a free loopback port (the app needs its own URL), serve ``build(url)``."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(build(base), log_level="warning", lifespan="off", proxy_headers=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "uvicorn did not start"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class Remote:
    """The broker service on a SQLite store, an OIDC issuer its callers come from,
    and a GitHub-Actions-like endpoint handing out that issuer's tokens."""

    def __init__(self, base: str, issuer: Any, store: Path, github: str) -> None:
        self.base = base
        self.issuer = issuer
        self.store = store
        self.github = github

    def lease(self, lease_id: str) -> Any:
        store = SQLiteStore(self.store)
        try:
            return store.get(lease_id)
        finally:
            store.close()


GITHUB_BEARER = "gh-request-token"


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[Remote]:
    pytest.importorskip("jitbroker.web.service")
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from jitbroker import Broker
    from jitbroker.web.service import broker_app
    from jitbroker.web.trust import TrustRule
    from oidc_issuer import AUDIENCE, oidc_issuer
    from web_servers import uvicorn_server

    store = tmp_path / "remote.db"
    broker = Broker(issuer=ISSUER, keys=KeyRing.generate(), store=SQLiteStore(store), max_ttl=3600)
    with oidc_issuer() as issuer:

        async def github(request: Request) -> JSONResponse:
            if request.headers.get("authorization") != f"bearer {GITHUB_BEARER}":
                return JSONResponse({"message": "bad credentials"}, status_code=401)
            aud = request.query_params.get("audience")
            return JSONResponse({"value": issuer.mint(aud=aud)})

        rule = TrustRule(
            issuer=issuer.url,
            audience=AUDIENCE,
            subject="svc:ci:{repository}",
            claims={"repository": "acme/*"},
            owner="{actor}",
            name="ci",
            allow_http=True,
            max_ttl=600,
            single_use=False,  # a token file is read for each request
        )
        # A second kind of caller, trusted for tokens but not a resource server.
        app_rule = TrustRule(
            issuer=issuer.url,
            audience=AUDIENCE,
            subject="svc:app:{repository}",
            claims={"repository": "other/*"},
            name="app",
            allow_http=True,
            single_use=False,
        )
        rules = [rule, app_rule]
        with (
            uvicorn_server(Starlette(routes=[Route("/oidc", github)])) as gh,
            serving(
                lambda base: broker_app(
                    broker, rules, base_url=base, resource_servers=["ci"], allow_any_access=True
                )
            ) as base,
        ):
            yield Remote(base, issuer, store, f"{gh}/oidc?api-version=2.0")
    broker.close()


def test_remote_issue_renew_revoke_with_an_identity_token_file(
    remote: Remote, tmp_path: Path, home: Home
) -> None:
    from oidc_issuer import AUDIENCE

    identity = tmp_path / "identity.jwt"
    identity.write_text(remote.issuer.mint(aud=AUDIENCE))
    where = ("--broker", remote.base, "--identity-token-file", str(identity))
    issued = home.run("issue", *where, "--audience", AUD, "--scope", "orders:read", "--json")
    assert issued.returncode == 0, issued.stderr
    data = json.loads(issued.stdout)
    lease = remote.lease(data["lease_id"])
    assert lease.subject == "svc:ci:acme/app"
    assert lease.owner == "alice"
    renewed = home.run("renew", "-", *where, "--ttl", "10m", input=data["access_token"])
    assert renewed.returncode == 0, renewed.stderr
    assert remote.lease(data["lease_id"]).expires_at > lease.expires_at
    gone = home.run("revoke", "-", *where, input=renewed.stdout.strip())
    assert gone.returncode == 0, gone.stderr
    assert remote.lease(data["lease_id"]).revoked_at is not None
    for output in (issued.stderr, renewed.stderr, gone.stderr, gone.stdout):
        assert identity.read_text() not in output


def test_remote_issue_with_github_actions_oidc(remote: Remote, home: Home) -> None:
    from oidc_issuer import AUDIENCE

    env = {
        "ACTIONS_ID_TOKEN_REQUEST_URL": remote.github,
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": GITHUB_BEARER,
    }
    where = ("--broker", remote.base, "--identity-audience", AUDIENCE)
    issued = home.run("issue", *where, "--audience", AUD, "--json", env=env)
    assert issued.returncode == 0, issued.stderr
    assert remote.lease(json.loads(issued.stdout)["lease_id"]).subject == "svc:ci:acme/app"
    no_identity = home.run("issue", *where, "--audience", AUD)
    assert no_identity.returncode == 2
    assert "id-token: write" in one_line(no_identity.stderr)


def test_remote_refusals_are_clear(remote: Remote, tmp_path: Path, home: Home) -> None:
    identity = tmp_path / "identity.jwt"
    identity.write_text(remote.issuer.mint(aud="someone-else"))
    where = ("--broker", remote.base, "--identity-token-file", str(identity))
    refused = home.run("issue", *where, "--audience", AUD)
    assert refused.returncode == 2
    assert "invalid_client" in one_line(refused.stderr)
    subject = home.run("issue", *where, "--audience", AUD, "--subject", "svc:x")
    assert subject.returncode == 2
    assert "--subject is local only" in one_line(subject.stderr)
    plain = home.run("issue", "--broker", "http://broker.example", "--audience", AUD)
    assert plain.returncode == 2
    assert "https" in one_line(plain.stderr)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    down = home.run("issue", "--broker", f"http://127.0.0.1:{port}", "--identity-token-file",
                    str(identity), "--audience", AUD)  # fmt: skip
    assert down.returncode == 2
    assert "could not reach" in one_line(down.stderr)


def _doc_command_lines() -> list[str]:
    import re

    text = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    lines = []
    for block in re.findall(r"```(?:sh|yaml)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for found in re.findall(r"jitbroker (?:[a-z]+)[^|)<\n]*", line):
                lines.append(found.strip())
    return lines


@pytest.mark.parametrize("line", _doc_command_lines())
def test_every_command_line_in_the_docs_parses(line: str) -> None:
    import shlex

    from jitbroker.cli import _split_exec

    own, command = _split_exec(shlex.split(line)[1:])
    build_parser().parse_args(own)  # a usage error raises SystemExit: the doc is wrong
    assert command is None or command


def test_no_repr_shows_a_token_or_an_assertion(tmp_path: Path) -> None:
    from jitbroker.cli_shell import Issued
    from jitbroker.web.remote import IdentityToken, RemoteBroker, RemoteCredential

    secret = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2VjcmV0"
    assert secret not in repr(Issued(secret, "a" * 32, 0.0, "s", ref=secret))
    assert secret not in repr(RemoteCredential(secret, None, 0.0, ""))
    (tmp_path / "id").write_text(secret)
    identity = IdentityToken.from_file(tmp_path / "id")
    assert identity() == secret
    assert secret not in repr(identity)
    assert secret not in repr(RemoteBroker("https://broker.example", identity))


@pytest.mark.parametrize(
    "url", ["http://broker.example", "ftp://x", "https://b.example/?a=1", "https://u@b.example"]
)
def test_the_broker_url_must_be_https_and_bare(url: str) -> None:
    from jitbroker.errors import InvalidRequest
    from jitbroker.web.remote import IdentityToken, RemoteBroker

    with pytest.raises(InvalidRequest, match="--broker"):
        RemoteBroker(url, IdentityToken(lambda: "a.b.c", "test"))


def test_a_hostile_or_broken_service_gives_clear_errors(tmp_path: Path) -> None:
    """A real server answering what a broker service never should."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
    from starlette.routing import Route

    from jitbroker.errors import PolicyDenied, StoreUnavailable
    from jitbroker.web.remote import BrokerUnavailable, IdentityToken, RemoteBroker
    from web_servers import uvicorn_server

    answers: dict[str, Response] = {
        "denied": JSONResponse(
            {"error": "access_denied", "error_description": "no\x1b[31m rule"}, status_code=400
        ),
        "down": JSONResponse({"error": "temporarily_unavailable"}, status_code=503),
        "html": PlainTextResponse("<html>", status_code=200),
        "redirect": RedirectResponse("https://evil.example/token", status_code=307),
        "huge": PlainTextResponse("x" * (2 << 20)),
        "no-token": JSONResponse({"token_type": "Bearer"}),
    }

    async def token(request: Request) -> Response:
        return answers[request.path_params["case"]]

    app = Starlette(routes=[Route("/{case}/token", token, methods=["POST"])])
    identity = IdentityToken(lambda: "a.b.c", "test")
    with uvicorn_server(app) as base:

        def issue(case: str) -> None:
            RemoteBroker(f"{base}/{case}", identity).issue("db:orders")

        with pytest.raises(PolicyDenied) as denied:
            issue("denied")
        assert "access_denied" in str(denied.value)
        assert "\x1b" not in str(denied.value)  # no terminal escapes from a server
        for case in ("down", "html", "redirect", "huge", "no-token"):
            with pytest.raises(BrokerUnavailable):
                issue(case)
        assert issubclass(BrokerUnavailable, StoreUnavailable)  # exit 2 in the CLI


# -- remote verify: RFC 7662 introspection at the broker service -----------------------
def _where(remote: Remote, tmp_path: Path, repository: str = "acme/app") -> tuple[str, ...]:
    """``--broker`` and an identity token file of a caller from ``repository``."""
    from oidc_issuer import AUDIENCE

    identity = tmp_path / f"identity-{repository.replace('/', '-')}.jwt"
    identity.write_text(remote.issuer.mint(aud=AUDIENCE, repository=repository))
    return ("--broker", remote.base, "--identity-token-file", str(identity))


def _remote_token(remote: Remote, home: Home, where: tuple[str, ...]) -> dict[str, Any]:
    issued = home.run(
        "issue", *where, "--audience", AUD, "--scope", "orders:read orders:list",
        "--task", "job-42", "--json",
    )  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    data: dict[str, Any] = json.loads(issued.stdout)
    return data


def test_remote_verify_of_an_active_token(remote: Remote, tmp_path: Path, home: Home) -> None:
    where = _where(remote, tmp_path)
    issued = _remote_token(remote, home, where)
    token = issued["access_token"]
    lease = remote.lease(issued["lease_id"])
    ok = home.run("verify", "-", *where, "--audience", AUD, "--scope", "orders:read",
                  "--json", input=token)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data == {
        "valid": True,
        "subject": "svc:ci:acme/app",
        "audience": AUD,
        "scope": "orders:list orders:read",
        "lease_id": issued["lease_id"],
        "expires_at": int(lease.expires_at),
        "expires_at_iso": data["expires_at_iso"],
        "task": "job-42",
        "owner": "alice",
    }
    assert data["expires_at_iso"].endswith("Z")
    # The same shape as local mode's.
    local = home.run("verify", home.issue().strip(), "--config", str(home.config),
                     "--audience", AUD, "--json")  # fmt: skip
    assert set(json.loads(local.stdout)) == set(data)
    text = home.run(
        "verify", token, *where, "--audience", AUD, "--scope", "orders:read orders:list"
    )
    assert text.returncode == 0, text.stderr
    line = one_line(text.stdout)
    assert line.startswith("valid: subject=svc:ci:acme/app audience=db:orders")
    assert f"lease={issued['lease_id']}" in line
    assert token not in text.stdout + text.stderr


def test_remote_verify_says_why_not(remote: Remote, tmp_path: Path, home: Home) -> None:
    where = _where(remote, tmp_path)
    token = _remote_token(remote, home, where)["access_token"]
    wrong = home.run("verify", token, *where, "--audience", "db:other", "--json")
    assert wrong.returncode == 1, wrong.stderr
    assert json.loads(wrong.stdout)["error"] == "WrongAudience"
    text = home.run("verify", token, *where, "--audience", "db:other")
    assert text.returncode == 1
    assert one_line(text.stdout).startswith(
        "not valid: audience: token is for audience 'db:orders'"
    )
    scope = home.run("verify", token, *where, "--audience", AUD, "--scope", "orders:write")
    assert scope.returncode == 1
    assert one_line(scope.stdout).startswith("not valid: scope: token lacks scopes 'orders:write'")
    gone = home.run("revoke", "-", *where, input=token)
    assert gone.returncode == 0, gone.stderr
    revoked = home.run("verify", "-", *where, "--audience", AUD, "--json", input=token)
    assert revoked.returncode == 1, revoked.stderr
    why = json.loads(revoked.stdout)
    assert why["valid"] is False
    assert why["error"] == "inactive"
    again = home.run("verify", "-", *where, "--audience", AUD, input=token)
    assert one_line(again.stdout).startswith("not valid: inactive")
    for output in (wrong, text, scope, revoked, again):
        assert token not in output.stdout + output.stderr


@pytest.mark.parametrize("garbage", ["not-a-token", "a.b.c", "jbo_" + "x" * 40, "x" * 60_000])
def test_remote_verify_of_garbage_is_inactive(
    remote: Remote, tmp_path: Path, home: Home, garbage: str
) -> None:
    where = _where(remote, tmp_path)
    done = home.run("verify", "-", *where, "--audience", AUD, input=garbage)
    assert done.returncode == 1, done.stderr
    assert one_line(done.stdout).startswith("not valid: inactive")
    assert done.stderr == ""


def test_remote_verify_by_a_caller_that_is_no_resource_server(
    remote: Remote, tmp_path: Path, home: Home
) -> None:
    token = _remote_token(remote, home, _where(remote, tmp_path))["access_token"]
    # Trusted by the service (rule "app") for tokens of its own, not for /introspect.
    other = _where(remote, tmp_path, "other/app")
    assert home.run("issue", *other, "--audience", AUD).returncode == 0
    refused = home.run("verify", token, *other, "--audience", AUD)
    assert refused.returncode == 2
    line = one_line(refused.stderr)
    assert line.startswith("jitbroker: error: 127.0.0.1 refused: unauthorized_client")
    assert "resource_servers" in line
    assert token not in refused.stdout + refused.stderr
    assert refused.stdout == ""
    # A caller the service does not trust at all: exit 2 as well.
    stranger = tmp_path / "stranger.jwt"
    stranger.write_text(remote.issuer.mint(aud="someone-else"))
    where = ("--broker", remote.base, "--identity-token-file", str(stranger))
    untrusted = home.run("verify", token, *where, "--audience", AUD)
    assert untrusted.returncode == 2
    assert "invalid_client" in one_line(untrusted.stderr)


def test_remote_verify_usage_errors(remote: Remote, tmp_path: Path, home: Home) -> None:
    where = _where(remote, tmp_path)
    both = home.run("verify", "x", *where, "--config", str(home.config), "--audience", AUD)
    assert both.returncode == 2
    line = one_line(both.stderr)
    assert "--broker" in line
    assert "--config" in line
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    down = home.run("verify", "x", "--broker", f"http://127.0.0.1:{port}", *where[2:],
                    "--audience", AUD)  # fmt: skip
    assert down.returncode == 2
    assert "could not reach" in one_line(down.stderr)


def test_verify_help_says_both_ways_first() -> None:
    parser = _subparsers(build_parser())["verify"]
    first = (parser.description or "").split(". ")[0]
    assert "the broker's store (local" in first
    assert "the broker's /introspect (remote" in first
    assert "/introspect" in (_subparsers(build_parser())["verify"].format_help())


def test_introspect_checks_the_answer_and_maps_refusals() -> None:
    """A real server answering /introspect as no broker service should."""
    from urllib.parse import parse_qsl

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    from jitbroker.web.errors import InvalidClient
    from jitbroker.web.remote import BrokerUnavailable, IdentityToken, RemoteBroker
    from web_servers import uvicorn_server

    secret = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2VjcmV0"
    answers: dict[str, Response] = {
        "inactive": JSONResponse({"active": False, "sub": "leaked?"}),
        "active": JSONResponse({"active": True, "aud": ["a", "b"], "exp": 10, "scope": "s"}),
        "no-active": JSONResponse({"sub": "x"}),
        "active-text": JSONResponse({"active": "true"}),
        "bad-exp": JSONResponse({"active": True, "exp": "soon"}),
        "bool-exp": JSONResponse({"active": True, "exp": True}),
        "bad-aud": JSONResponse({"active": True, "aud": [1]}),
        "bad-scope": JSONResponse({"active": True, "scope": ["s"]}),
        "bad-owner": JSONResponse({"active": True, "owner": {}}),
        "html": PlainTextResponse("<html>"),
        "down": JSONResponse({"error": "temporarily_unavailable"}, status_code=503),
        "forbidden": JSONResponse(
            {"error": "unauthorized_client", "error_description": "not\x1b[2J a resource server"},
            status_code=403,
        ),
        "unauthorized": JSONResponse({"error": "invalid_client"}, status_code=401),
        "bare-403": PlainTextResponse("no", status_code=403),
    }
    seen: list[dict[str, str]] = []

    async def introspect(request: Request) -> Response:
        seen.append(dict(parse_qsl((await request.body()).decode())))
        return answers[request.path_params["case"]]

    app = Starlette(routes=[Route("/{case}/introspect", introspect, methods=["POST"])])
    identity = IdentityToken(lambda: "a.b.c", "test")
    with uvicorn_server(app) as base:

        def ask(case: str) -> dict[str, Any]:
            return RemoteBroker(f"{base}/{case}", identity).introspect(secret)

        assert ask("inactive") == {"active": False}
        assert seen[-1]["token"] == secret
        assert seen[-1]["client_assertion"] == "a.b.c"
        assert seen[-1]["client_assertion_type"].endswith(":jwt-bearer")
        assert ask("active")["aud"] == ["a", "b"]
        for case in ("no-active", "active-text", "bad-exp", "bool-exp", "bad-aud", "bad-scope",
                     "bad-owner", "html", "down"):  # fmt: skip
            with pytest.raises(BrokerUnavailable) as unavailable:
                ask(case)
            assert secret not in str(unavailable.value), case
        for case in ("forbidden", "unauthorized", "bare-403"):
            with pytest.raises(InvalidClient) as refused:
                ask(case)
            assert secret not in str(refused.value)
            assert "\x1b" not in str(refused.value)
        with pytest.raises(InvalidClient, match="resource_servers"):
            ask("forbidden")


def test_introspected_checks_as_local_verification_does() -> None:
    from jitbroker.cli_shell import introspected
    from jitbroker.errors import InsufficientScope, InvalidProof, InvalidToken, WrongAudience

    answer = {"active": True, "aud": "db:orders", "scope": "a b", "sub": "s", "jti": "l"}
    assert introspected(answer, "db:orders", ("a",))["valid"] is True
    assert introspected({**answer, "aud": ["x", "db:orders"]}, "db:orders", ())["valid"]
    # Equality, as Verifier checks it: no prefix or glob matching.
    wrong: list[object] = ["db:*", "db:order", None, [], ["db:orders-2"]]
    for aud in wrong:
        with pytest.raises(WrongAudience):
            introspected({**answer, "aud": aud}, "db:orders", ())
    with pytest.raises(InsufficientScope) as missing:
        introspected(answer, "db:orders", ("a", "c"))
    assert missing.value.missing == ("c",)
    with pytest.raises(InsufficientScope):
        introspected({**answer, "scope": "a*"}, "db:orders", ("ab",))
    with pytest.raises(InvalidProof):  # local verify refuses a bound token without a proof
        introspected({**answer, "cnf": {"jkt": "k"}}, "db:orders", ())
    with pytest.raises(InvalidToken) as inactive:
        introspected({"active": False}, "db:orders", ())
    assert type(inactive.value) is InvalidToken
