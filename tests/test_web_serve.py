"""``jitbroker serve`` as a real subprocess on a free port, and the service tables
of jitbroker.toml (``jitbroker.web.config``)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from jitbroker import KeyRing
from jitbroker.config import load_config
from jitbroker.errors import InvalidRequest
from jitbroker.keys import generate_key
from jitbroker.web import ClientKey, ClientSecret, TrustRule, hash_client_secret
from jitbroker.web.config import clients_from, serve_settings, trust_rules
from jitbroker.web.serve import build, check_binding, is_loopback, uvicorn_options
from oidc_issuer import AUDIENCE, Issuer, oidc_issuer
from web_servers import sign_proof

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(tmp_path: Path, serve: str, trust: str = "", clients: str = "") -> Path:
    keys = tmp_path / "keys"
    if not keys.exists():
        KeyRing.generate("EdDSA").save_dir(keys)
    path = tmp_path / "jitbroker.toml"
    path.write_text(
        f"""
[broker]
issuer = "urn:test:served"
keys = "keys"
store = "leases.db"
default_ttl = "5m"
max_ttl = "1h"

[serve]
{serve}
{"" if "allow_any_access" in serve else "allow_any_access = true"}
{trust}
{clients}
"""
    )
    path.chmod(0o600)
    return path


def trust_table(issuer: Issuer) -> str:
    return f"""
[[trust]]
issuer = "{issuer.url}"
audience = "{AUDIENCE}"
subject = "svc:ci:{{repository}}"
claims = {{ repository = "acme/*" }}
owner = "{{actor}}"
name = "ci"
allow_http = true
max_ttl = "10m"
"""


def jitbroker(*args: str) -> list[str]:
    return [sys.executable, "-m", "jitbroker.cli", *args]


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    with oidc_issuer() as running:
        yield running


def _wait_for(url: str, process: subprocess.Popen[bytes], **client: Any) -> httpx.Client:
    http = httpx.Client(base_url=url, timeout=5, **client)
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            _, err = process.communicate()
            pytest.fail(f"jitbroker serve exited {process.returncode}: {err.decode()}")
        try:
            if http.get("/.well-known/oauth-authorization-server").status_code == 200:
                return http
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("jitbroker serve did not answer within 30 s")
        time.sleep(0.1)


def _stop(process: subprocess.Popen[bytes]) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    try:
        _, err = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.returncode, err.decode()


def test_serve_start_issue_and_sigterm(tmp_path: Path, issuer: Issuer) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = write_config(
        tmp_path,
        f'base_url = "{base}"\nport = {port}\nresource_servers = ["ci"]',
        trust_table(issuer),
    )
    process = subprocess.Popen(
        jitbroker("serve", "--config", str(config)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        http = _wait_for(base, process)
        meta = http.get("/.well-known/oauth-authorization-server").json()
        assert meta["issuer"] == base
        assert meta["token_endpoint"] == base + "/token"
        response = http.post(
            "/token",
            data={
                "grant_type": "client_credentials",
                "client_assertion_type": JWT_BEARER,
                "client_assertion": issuer.mint(repository="acme/app"),
                "audience": "api:orders",
                "scope": "orders:read",
                "ttl": "60",
            },
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["token_type"] == "Bearer"
        assert body["expires_in"] == 60
        intro = http.post(
            "/introspect",
            data={
                "token": body["access_token"],
                "client_assertion_type": JWT_BEARER,
                "client_assertion": issuer.mint(repository="acme/app"),
            },
        ).json()
        assert intro["active"] is True
        assert intro["sub"] == "svc:ci:acme/app"
        assert http.get("/token").status_code == 405
        http.close()
    finally:
        code, err = _stop(process)
    assert code == 0, err
    assert body["access_token"] not in err
    # the lease is in the SQLite store the config names
    from jitbroker.stores.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "leases.db")
    lease = store.get(body["lease_id"])
    store.close()
    assert lease is not None
    assert lease.subject == "svc:ci:acme/app"
    assert lease.owner == "alice"


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def test_serve_over_tls(tmp_path: Path, issuer: Issuer) -> None:
    port = free_port()
    base = f"https://127.0.0.1:{port}"
    cert, key = _self_signed(tmp_path)
    config = write_config(
        tmp_path,
        f'base_url = "{base}"\nport = {port}\ntls_cert = "{cert.name}"\ntls_key = "{key.name}"',
        trust_table(issuer),
    )
    process = subprocess.Popen(
        jitbroker("serve", "--config", str(config)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        http = _wait_for(base, process, verify=ssl.create_default_context(cafile=str(cert)))
        assert http.get("/jwks.json").json()["keys"]
        http.close()
        with pytest.raises(httpx.ConnectError):  # an unknown CA is refused by the client
            httpx.get(base + "/jwks.json", timeout=5)
    finally:
        code, err = _stop(process)
    assert code == 0, err


@pytest.mark.parametrize(
    ("serve", "args", "message"),
    [
        ('host = "0.0.0.0"', [], "tls_cert"),
        ("", ["--host", "0.0.0.0"], "--insecure-http"),  # noqa: S104 - refused, the point
        ("", ["--host", "192.0.2.10"], "plain HTTP"),
        ('bind = "x"', [], "unknown key(s) bind"),
        ("port = true", [], "port must be a whole number"),
        ('tls_cert = "c.pem"', [], "tls_cert and tls_key go together"),
    ],
)
def test_serve_refusals_exit_2(
    tmp_path: Path, issuer: Issuer, serve: str, args: list[str], message: str
) -> None:
    config = write_config(
        tmp_path, f'base_url = "https://broker.example"\n{serve}', trust_table(issuer)
    )
    result = subprocess.run(
        jitbroker("serve", "--config", str(config), *args),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    err = result.stderr.decode()
    assert message in err
    assert err.count("\n") == 1  # one line, no traceback
    assert not (tmp_path / "leases.db").exists()  # refused before anything opened


def test_serve_without_base_url_or_config(tmp_path: Path) -> None:
    config = write_config(tmp_path, "")
    result = subprocess.run(
        jitbroker("serve", "--config", str(config)), capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert b"needs base_url" in result.stderr
    env = {k: v for k, v in os.environ.items() if k != "JITBROKER_CONFIG"}
    result = subprocess.run(
        jitbroker("serve"), capture_output=True, timeout=60, check=False, env=env
    )
    assert result.returncode == 2
    assert b"--config" in result.stderr


def test_serve_without_callers_exits_2(tmp_path: Path) -> None:
    config = write_config(tmp_path, 'base_url = "https://broker.example"')
    result = subprocess.run(
        jitbroker("serve", "--config", str(config)), capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert b"no [[trust]] or [[clients]]" in result.stderr
    assert not (tmp_path / "leases.db").exists()


def test_port_in_use_exits_2(tmp_path: Path, issuer: Issuer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(
            tmp_path, f'base_url = "http://127.0.0.1:{port}"\nport = {port}', trust_table(issuer)
        )
        result = subprocess.run(
            jitbroker("serve", "--config", str(config)),
            capture_output=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2
    assert b"did not start" in result.stderr


# -- jitbroker.web.config, in process -------------------------------------------------------
def test_config_tables(tmp_path: Path) -> None:
    jwks = tmp_path / "client.jwks.json"
    KeyRing.generate("ES256").public().jwks()
    import json

    jwks.write_text(json.dumps(KeyRing.generate("ES256").public().jwks()))
    secret_hash = hash_client_secret("a-long-enough-client-secret")
    path = write_config(
        tmp_path,
        'base_url = "https://broker.example"\nhost = "0.0.0.0"\nworkers = 2\n'
        'tls_cert = "c.pem"\ntls_key = "k.pem"\ntls_ca = "ca.pem"\n'
        'resource_servers = ["orders-api"]\ndefault_ttl = "2m"\ndpop = false',
        """
[[trust]]
issuer = "https://token.actions.githubusercontent.com"
audience = "https://broker.example"
subject = "svc:ci:{repository}"
claims = { repository = "acme/*" }
max_ttl = "30m"
""",
        f"""
[[clients]]
client_id = "orders-api"
subject = "svc:orders-api"
jwks_file = "client.jwks.json"

[[clients]]
client_id = "legacy"
subject = "svc:legacy"
secret_hash = "{secret_hash}"
max_ttl = 300
""",
    )
    config = load_config(path)
    settings = serve_settings(config)
    assert settings.base_url == "https://broker.example"
    assert settings.tls_cert == tmp_path / "c.pem"
    assert settings.default_ttl == 120
    assert settings.app_options()["dpop"] is False
    assert settings.dpop_nonces is False
    bad = write_config(
        tmp_path, 'base_url = "https://b.example"\ndpop = false\ndpop_nonces = true', ""
    )
    with pytest.raises(InvalidRequest, match="dpop_nonces needs dpop = true"):
        serve_settings(load_config(bad))
    check_binding(settings)  # TLS: any address is fine
    options = uvicorn_options(settings)
    assert options["ssl_certfile"] == str(tmp_path / "c.pem")
    assert options["ssl_ca_certs"] == str(tmp_path / "ca.pem")
    assert options["proxy_headers"] is False
    assert options["access_log"] is False
    (rule,) = trust_rules(config)
    assert isinstance(rule, TrustRule)
    assert rule.max_ttl == 1800
    key, secret = clients_from(config)
    assert isinstance(key, ClientKey)
    assert isinstance(secret, ClientSecret)
    assert secret.max_ttl == 300
    assert secret_hash not in repr(secret)


def _all_rules(config: Any) -> list[Any]:
    return [*trust_rules(config), *clients_from(config)]


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ('[[trust]]\nissuer = "https://x.example"\naudience = "a"', "needs subject"),
        ('[[trust]]\nissuer = "http://x.example"\naudience = "a"\nsubject = "s"', "https"),
        (
            '[[trust]]\nissuer = "https://x.example"\naudience = "a"\nsubject = "s"\nsecret = 1',
            "unknown key(s) secret",
        ),
        ('[trust]\nissuer = "https://x.example"', "array of tables"),
        ('[[clients]]\nclient_id = "c"\nsubject = "s"', "one of jwks_file or secret_hash"),
        (
            '[[clients]]\nclient_id = "c"\nsubject = "s"\nsecret_hash = "plain-secret"',
            "hash_client_secret",
        ),
        (
            '[[clients]]\nclient_id = "c"\nsubject = "s"\njwks_file = "missing.json"',
            "could not read",
        ),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, tables: str, message: str) -> None:
    path = write_config(tmp_path, 'base_url = "https://broker.example"', tables)
    config = load_config(path)
    with pytest.raises(InvalidRequest, match=re.escape(message)) as caught:
        _all_rules(config)
    assert "plain-secret" not in str(caught.value)


def test_serve_refuses_a_broker_without_a_policy(tmp_path: Path) -> None:
    clients = f"""
[[clients]]
client_id = "cron"
subject = "svc:cron"
secret_hash = "{hash_client_secret("a-client-secret-for-the-test")}"
"""
    path = write_config(
        tmp_path, 'base_url = "http://127.0.0.1:1"\nallow_any_access = false', "", clients
    )
    with pytest.raises(InvalidRequest, match="the broker has no policy"):
        build(path)
    done = subprocess.run(
        jitbroker("serve", "--config", str(path)), capture_output=True, timeout=60
    )
    assert done.returncode == 2
    assert b"the broker has no policy" in done.stderr
    assert b"Traceback" not in done.stderr


def test_loopback() -> None:
    assert is_loopback("127.0.0.1")
    assert is_loopback("127.1.2.3")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")  # noqa: S104
    assert not is_loopback("broker.example")


def test_serve_with_two_workers(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    secret = "a-client-secret-for-the-workers"
    clients = f"""
[[clients]]
client_id = "cron"
subject = "svc:cron"
secret_hash = "{hash_client_secret(secret)}"
"""
    settings = f'base_url = "{base}"\nport = {port}\nworkers = 2\ndpop_nonces = true'
    config = write_config(tmp_path, settings, "", clients)
    process = subprocess.Popen(
        jitbroker("serve", "--config", str(config)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        http = _wait_for(base, process)
        for _ in range(4):  # whichever worker answers, the lease is in the shared store
            form = {"grant_type": "client_credentials", "audience": "api:orders"}
            response = http.post("/token", data=form, auth=("cron", secret))
            assert response.status_code == 200, response.text
        http.close()
        # DPoP nonces: one worker's nonce is good at every worker (one shared secret);
        # a fresh connection each time, so the requests spread over the workers
        holder = generate_key("EdDSA")
        nonce = None
        for attempt in range(8):
            proof = sign_proof(holder, "POST", base + "/token", None, now=time.time(), nonce=nonce)
            with httpx.Client(base_url=base, timeout=5) as fresh:
                response = fresh.post(
                    "/token", data=form, auth=("cron", secret), headers={"DPoP": proof}
                )
            if attempt == 0:
                assert response.json()["error"] == "use_dpop_nonce", response.text
            else:
                assert response.status_code == 200, response.text
            nonce = response.headers["dpop-nonce"]
    finally:
        code, err = _stop(process)
    assert code == 0, err
    assert "replay caches (DPoP proofs, assertions) are per process" in err
    assert secret not in err


def test_the_config_in_docs_service_md_is_valid(tmp_path: Path) -> None:
    doc = (Path(__file__).parent.parent / "docs" / "service.md").read_text()
    block = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "jitbroker.toml"
    path.write_text(block)
    path.chmod(0o600)
    config = load_config(path)
    settings = serve_settings(config)
    assert settings.base_url == "https://jitbroker.acme.internal"
    assert settings.resource_servers == ("orders-api",)
    (rule,) = trust_rules(config)
    assert rule.rule_name == "github"
    assert [table["client_id"] for table in config.sections["clients"]] == [
        "orders-api",
        "legacy-cron",
    ]
