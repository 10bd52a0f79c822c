"""Caller authentication (jitbroker.web.Trust) against a real OIDC issuer on
127.0.0.1: good GitHub- and Kubernetes-shaped tokens map to the right subject,
hostile ones are refused with the reason named, and no message ever quotes one."""

from __future__ import annotations

import base64
import hmac
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jitbroker.errors import InvalidRequest, KeySourceError
from jitbroker.jwk import b64url
from jitbroker.keys import generate_key
from jitbroker.testing import FakeClock
from jitbroker.web import (
    Caller,
    ClientKey,
    ClientSecret,
    InvalidClient,
    RequestRejected,
    Trust,
    TrustRule,
    hash_client_secret,
)
from jitbroker.web.claims import Template, lookup
from jitbroker.web.trust import JWT_BEARER
from jitbroker.web.trust_sources import WouldBlock, without_waiting
from oidc_issuer import AUDIENCE, DROP, Issuer, oidc_issuer

TOKEN_ENDPOINT = "https://broker.example/token"
SECRET = "s3cret-that-is-long-enough-" + "x" * 8


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())


@pytest.fixture
def issuer(clock: FakeClock) -> Iterator[Issuer]:
    with oidc_issuer(clock=clock) as running:
        yield running


def github_rule(issuer: Issuer, **overrides: Any) -> TrustRule:
    options: dict[str, Any] = {
        "issuer": issuer.url,
        "audience": AUDIENCE,
        "subject": "svc:ci:{repository}",
        "claims": {"repository": "acme/*", "ref": "refs/heads/main"},
        "owner": "{actor}",
        "name": "github",
        "allow_http": True,
        "max_ttl": 900,
    }
    return TrustRule(**{**options, **overrides})


def k8s_rule(issuer: Issuer, **overrides: Any) -> TrustRule:
    options: dict[str, Any] = {
        "issuer": issuer.url,
        "audience": AUDIENCE,
        "subject": "svc:k8s:{kubernetes.io.namespace}:{kubernetes.io.serviceaccount.name}",
        "claims": {"kubernetes.io.namespace": "ci"},
        "owner": "team-platform",
        "name": "cluster",
        "allow_http": True,
    }
    return TrustRule(**{**options, **overrides})


def make_trust(clock: FakeClock, *rules: Any, **options: Any) -> Trust:
    return Trust(rules, token_endpoint=TOKEN_ENDPOINT, clock=clock, **options)


def assertion_form(token: str, **extra: str) -> dict[str, str]:
    return {"client_assertion_type": JWT_BEARER, "client_assertion": token, **extra}


def refusal(call: Callable[[], object], reason: str, *secrets: str) -> InvalidClient:
    """The InvalidClient ``call`` raises: with ``reason``, quoting none of ``secrets``."""
    with pytest.raises(InvalidClient) as info:
        call()
    exc = info.value
    assert exc.reason == reason, (exc.reason, str(exc))
    assert isinstance(exc, RequestRejected)
    for secret in secrets:
        for part in (secret, *secret.split(".")):
            if len(part) >= 8:
                assert part not in str(exc)
                assert part not in repr(exc)
    return exc


# -- good tokens -------------------------------------------------------------------
def test_github_token_maps_to_subject_and_owner(clock: FakeClock, issuer: Issuer) -> None:
    trust = make_trust(clock, github_rule(issuer))
    token = issuer.mint(repository="acme/app", actor="alice")
    caller = trust.authenticate_client(assertion_form(token), None)
    assert caller == Caller(
        subject="svc:ci:acme/app",
        owner="alice",
        rule="github",
        method="jwt-bearer",
        issuer=issuer.url,
        assertion_subject="repo:acme/app:ref:refs/heads/main",
        max_ttl=900.0,
        expires_at=caller.expires_at,
        claims={"repository": "acme/app", "ref": "refs/heads/main", "actor": "alice"},
    )
    assert caller.expires_at == int(clock()) + 300
    assert caller.fields()["issuer"] == issuer.url
    assert caller.fields()["repository"] == "acme/app"
    for text in (repr(caller), str(caller), repr(trust)):
        assert token not in text
        assert token.split(".")[2] not in text
    assert issuer.discovery_requests == 1
    assert issuer.jwks_requests == 1
    trust.close()


def test_kubernetes_token_maps_nested_claims(clock: FakeClock, issuer: Issuer) -> None:
    trust = make_trust(clock, k8s_rule(issuer))
    caller = trust.authenticate_assertion(
        issuer.mint_k8s(namespace="ci", serviceaccount="deployer")
    )
    assert caller.subject == "svc:k8s:ci:deployer"
    assert caller.owner == "team-platform"
    assert caller.assertion_subject == "system:serviceaccount:ci:deployer"
    assert caller.claims == {
        "kubernetes.io.namespace": "ci",
        "kubernetes.io.serviceaccount.name": "deployer",
    }
    refusal(
        lambda: trust.authenticate_assertion(issuer.mint_k8s(namespace="prod")), "claim_mismatch"
    )


def test_es256_issuer_and_explicit_jwks_url(clock: FakeClock) -> None:
    with oidc_issuer("ES256", clock=clock) as issuer:
        trust = make_trust(clock, github_rule(issuer, jwks_url=issuer.url + "/jwks"))
        assert issuer.discovery_requests == 0  # jwks_url given: no discovery
        assert trust.authenticate_assertion(issuer.mint()).subject == "svc:ci:acme/app"


def test_first_matching_rule_of_an_issuer_wins(clock: FakeClock, issuer: Issuer) -> None:
    deploy = github_rule(
        issuer, subject="svc:deploy", claims={"repository": "acme/deploy"}, name="deploy"
    )
    trust = make_trust(clock, deploy, github_rule(issuer))
    assert trust.authenticate_assertion(issuer.mint(repository="acme/deploy")).rule == "deploy"
    assert trust.authenticate_assertion(issuer.mint(repository="acme/app")).rule == "github"
    assert issuer.jwks_requests == 1  # one source for one JWKS URL


def test_aud_list_and_glob_across_segments(clock: FakeClock, issuer: Issuer) -> None:
    rule = github_rule(issuer, claims={"job_workflow_ref": "acme/**@refs/heads/main"})
    trust = make_trust(clock, rule)
    token = issuer.mint(aud=["other", AUDIENCE])
    assert trust.authenticate_assertion(token).claims["job_workflow_ref"].startswith("acme/app/")


# -- hostile tokens ------------------------------------------------------------------
def _hs256_with_public_key(issuer: Issuer) -> str:
    secret = issuer.signer[1].to_pem()
    header = {"typ": "JWT", "alg": "HS256", "kid": issuer.signer[0]}
    payload = _claims(issuer)
    unsigned = b64url(_json(header)) + "." + b64url(_json(payload))
    return unsigned + "." + b64url(hmac.digest(secret, unsigned.encode(), "sha256"))


def _json(value: object) -> bytes:
    from jitbroker.tokens import json_text

    return json_text(value).encode()


def _claims(issuer: Issuer, **extra: Any) -> dict[str, Any]:
    now = int(issuer.clock())
    claims = {
        "iss": issuer.url,
        "aud": AUDIENCE,
        "sub": "repo:acme/app:ref:refs/heads/main",
        "repository": "acme/app",
        "ref": "refs/heads/main",
        "actor": "alice",
        "jti": os.urandom(8).hex(),
        "iat": now,
        "exp": now + 300,
    }
    return {**claims, **extra}


HOSTILE: list[tuple[str, Callable[[Issuer], str], str]] = [
    ("wrong-audience", lambda i: i.mint(aud="https://elsewhere.example"), "wrong_audience"),
    ("no-audience", lambda i: i.mint(aud=DROP), "wrong_audience"),
    ("aud-not-strings", lambda i: i.mint(aud=[1, 2]), "malformed"),
    ("expired", lambda i: i.mint(exp=int(i.clock()) - 60), "expired"),
    ("not-yet-valid", lambda i: i.mint(nbf=int(i.clock()) + 600), "not_yet_valid"),
    ("issued-in-future", lambda i: i.mint(iat=int(i.clock()) + 600), "not_yet_valid"),
    ("missing-exp", lambda i: i.mint(exp=DROP), "missing_exp"),
    ("exp-not-a-number", lambda i: i.mint(exp="soon"), "malformed"),
    ("lifetime-too-long", lambda i: i.mint(ttl=7200), "lifetime_too_long"),
    (
        "alg-none",
        lambda i: i.sign({"alg": "none", "typ": "JWT"}, _claims(i), signature=b""),
        "alg_not_allowed",
    ),
    (
        "alg-none-signed",
        lambda i: i.sign({"alg": "None", "typ": "JWT"}, _claims(i), signature=b"x"),
        "alg_not_allowed",
    ),
    ("hs256-public-key-as-secret", _hs256_with_public_key, "alg_not_allowed"),
    (
        "rs256-header-es256-rule",
        lambda i: i.mint(),
        "alg_not_allowed",
    ),
    ("rogue-key-unknown-kid", lambda i: i.mint(key=i.rogue), "unknown_key"),
    (
        "rogue-key-published-kid",
        lambda i: i.sign(i.header(kid=i.signer[0]), _claims(i), key=i.rogue),
        "bad_signature",
    ),
    ("untrusted-issuer", lambda i: i.mint(iss="https://token.evil.example"), "unknown_issuer"),
    ("issuer-with-slash", lambda i: i.mint(iss=i.url + "/"), "unknown_issuer"),
    ("glob-dotdot-injection", lambda i: i.mint(repository="acme/x/../y"), "claim_mismatch"),
    ("glob-encoded-injection", lambda i: i.mint(repository="acme/%2e%2e"), "claim_mismatch"),
    ("glob-control-char", lambda i: i.mint(repository="acme/x\ny"), "claim_mismatch"),
    ("claim-missing", lambda i: i.mint(ref=DROP), "claim_missing"),
    ("claim-not-a-string", lambda i: i.mint(repository=["acme/app"]), "claim_mismatch"),
    ("template-injection-space", lambda i: i.mint(actor="alice svc:admin"), "template_value"),
    ("template-injection-brace", lambda i: i.mint(actor="{repository}"), "template_value"),
    ("template-claim-not-string", lambda i: i.mint(actor={"name": "x"}), "template_value"),
    ("template-claim-missing", lambda i: i.mint(actor=DROP), "claim_missing"),
    ("crit-header", lambda i: i.sign(i.header(crit=["exp"]), _claims(i)), "crit_header"),
    (
        "key-in-header",
        lambda i: i.sign(i.header(jwk=i.rogue.public_jwk()), _claims(i), key=i.rogue),
        "key_in_header",
    ),
    ("access-token-typ", lambda i: i.sign(i.header(typ="at+jwt"), _claims(i)), "wrong_type"),
    (
        "duplicate-json-keys",
        lambda i: i.sign(i.header(), b'{"iss":"x","iss":"' + i.url.encode() + b'"}'),
        "malformed",
    ),
    ("not-a-jws", lambda i: "not.a.jws!", "malformed"),
    ("two-segments", lambda i: i.mint().rsplit(".", 1)[0], "malformed"),
    ("sub-missing", lambda i: i.mint(sub=DROP), "malformed"),
    ("jti-not-a-string", lambda i: i.mint(jti=12345), "malformed"),
]


@pytest.mark.parametrize(
    ("build", "reason"), [(b, r) for _, b, r in HOSTILE], ids=[n for n, _, _ in HOSTILE]
)
def test_hostile_assertions_are_refused_with_the_reason(
    clock: FakeClock, issuer: Issuer, build: Callable[[Issuer], str], reason: str
) -> None:
    algorithms = ("ES256",) if build is HOSTILE[12][1] else ("RS256",)
    trust = make_trust(clock, github_rule(issuer, algorithms=algorithms))
    token = build(issuer)
    refusal(lambda: trust.authenticate_client(assertion_form(token), None), reason, token)
    refusal(lambda: trust.authenticate_assertion(token), reason, token)


@pytest.mark.parametrize(
    ("issuer", "claims", "pinned"),
    [
        ("https://token.actions.githubusercontent.com", {}, False),
        ("https://token.actions.githubusercontent.com", {"ref": "refs/heads/main"}, False),
        ("https://token.actions.githubusercontent.com", {"repository": "*/app"}, False),
        ("https://token.actions.githubusercontent.com", {"repository": "ac*/x"}, False),
        ("https://token.actions.githubusercontent.com", {"repository": "acm?/x"}, False),
        ("https://token.actions.githubusercontent.com", {"sub": "repo:*"}, False),
        ("https://token.actions.githubusercontent.com", {"repository": "acme/*"}, True),
        ("https://token.actions.githubusercontent.com", {"repository_owner_id": "42"}, True),
        ("https://token.actions.githubusercontent.com", {"sub": "repo:acme/app:*"}, True),
        ("https://gitlab.com", {"ref_protected": "true"}, False),
        ("https://gitlab.com/", {"namespace_path": "acme"}, True),
        ("https://gitlab.com", {"project_path": "acme/**"}, True),
        ("https://k8s.example", {}, True),  # a cluster's own issuer: its tokens are its own
    ],
)
def test_a_rule_for_a_shared_issuer_must_pin_a_tenant(
    issuer: str, claims: dict[str, str], pinned: bool
) -> None:
    def rule() -> TrustRule:
        return TrustRule(issuer=issuer, audience="jitbroker", subject="svc:x", claims=claims)

    if pinned:
        assert rule().claims == claims
    else:
        with pytest.raises(InvalidRequest, match="pin the rule to yours"):
            rule()


def test_glob_injection_refused_for_double_star_too(clock: FakeClock, issuer: Issuer) -> None:
    trust = make_trust(clock, github_rule(issuer, claims={"repository": "acme/**"}))
    assert trust.authenticate_assertion(issuer.mint(repository="acme/x/y")).subject
    for value in ("acme/x/../y", "acme/./y", "acme//y", "acme/y/", "acme/x\x00"):
        token = issuer.mint(repository=value)
        refusal(lambda: trust.authenticate_assertion(token), "claim_mismatch", token)  # noqa: B023


def test_template_separator_cannot_be_forged(clock: FakeClock, issuer: Issuer) -> None:
    # With two placeholders, "acme:x" + "y" must not read as "acme" + "x:y".
    rule = github_rule(issuer, subject="svc:{repository_owner}:{workflow}", claims={})
    trust = make_trust(clock, rule)
    good = trust.authenticate_assertion(issuer.mint(repository_owner="acme", workflow="x:y"))
    assert good.subject == "svc:acme:x:y"
    token = issuer.mint(repository_owner="acme:x", workflow="y")
    refusal(lambda: trust.authenticate_assertion(token), "template_value")


def test_replayed_assertion_is_refused(clock: FakeClock, issuer: Issuer) -> None:
    trust = make_trust(clock, github_rule(issuer))
    token = issuer.mint()
    assert trust.authenticate_client(assertion_form(token), None).subject == "svc:ci:acme/app"
    refusal(lambda: trust.authenticate_client(assertion_form(token), None), "replayed", token)
    # Another token with the same jti is the same assertion to the cache.
    same_jti = issuer.mint(jti=token_claims(token)["jti"], run_id="other")
    refusal(lambda: trust.authenticate_client(assertion_form(same_jti), None), "replayed")
    # Remembered until it expires, and forgotten after that (it is refused as expired).
    clock.advance(300 + 10 + 1)
    refusal(lambda: trust.authenticate_client(assertion_form(token), None), "expired")
    assert len(trust._replay) == 0


def test_replayed_assertion_without_jti_is_refused(clock: FakeClock, issuer: Issuer) -> None:
    trust = make_trust(clock, k8s_rule(issuer))
    token = issuer.mint_k8s()
    assert "jti" not in token_claims(token)
    trust.authenticate_client(assertion_form(token), None)
    refusal(lambda: trust.authenticate_client(assertion_form(token), None), "replayed", token)
    # authenticate_assertion does not consume unless asked to.
    other = issuer.mint_k8s(serviceaccount="builder")
    trust.authenticate_assertion(other)
    trust.authenticate_assertion(other, single_use=True)
    refusal(lambda: trust.authenticate_assertion(other, single_use=True), "replayed")


def test_high_s_twin_of_a_jti_less_es256_token_is_a_replay(clock: FakeClock) -> None:
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    with oidc_issuer("ES256", clock=clock) as issuer:
        trust = make_trust(clock, k8s_rule(issuer))
        token = issuer.mint_k8s()
        head, body, sig = token.split(".")
        raw = base64.urlsafe_b64decode(sig + "==")
        s = int.from_bytes(raw[32:], "big")
        twin = f"{head}.{body}.{b64url(raw[:32] + (order - s).to_bytes(32, 'big'))}"
        assert twin != token
        trust.authenticate_client(assertion_form(twin), None)  # high S verifies
        refusal(lambda: trust.authenticate_client(assertion_form(token), None), "replayed")


def test_rule_may_allow_reuse(clock: FakeClock, issuer: Issuer) -> None:
    trust = make_trust(clock, k8s_rule(issuer, single_use=False))
    token = issuer.mint_k8s()
    for _ in range(3):
        assert trust.authenticate_client(assertion_form(token), None).subject


def test_full_replay_cache_refuses_rather_than_forgets(clock: FakeClock, issuer: Issuer) -> None:
    trust = make_trust(clock, github_rule(issuer), replay_cache_size=2)
    first = issuer.mint()
    trust.authenticate_client(assertion_form(first), None)
    trust.authenticate_client(assertion_form(issuer.mint()), None)
    refusal(
        lambda: trust.authenticate_client(assertion_form(issuer.mint()), None), "replay_cache_full"
    )
    refusal(lambda: trust.authenticate_client(assertion_form(first), None), "replayed")


def test_ten_megabyte_assertion_is_refused_before_decoding(
    clock: FakeClock, issuer: Issuer
) -> None:
    trust = make_trust(clock, github_rule(issuer))
    huge = "eyJ" + "A" * (10 * 1024 * 1024) + ".e30.AA"
    started = time.perf_counter()
    for _ in range(100):
        refusal(lambda: trust.authenticate_client(assertion_form(huge), None), "too_large")
    assert time.perf_counter() - started < 0.1  # a length check, not a decode
    at_limit = trust.max_assertion_bytes
    refusal(lambda: trust.authenticate_assertion("a" * (at_limit + 1)), "too_large")
    refusal(lambda: trust.authenticate_assertion("a" * at_limit), "malformed")


def test_new_key_is_fetched_once_on_unknown_kid(clock: FakeClock, issuer: Issuer) -> None:
    trust = make_trust(clock, github_rule(issuer))
    issuer.rotate()
    clock.advance(61)  # the fetch at construction counts against the rate limit
    assert trust.authenticate_assertion(issuer.mint()).subject == "svc:ci:acme/app"
    assert issuer.jwks_requests == 2
    # Unknown kids do not make the broker a fetch amplifier: one fetch a minute.
    for _ in range(5):
        refusal(lambda: trust.authenticate_assertion(issuer.mint(key=issuer.rogue)), "unknown_key")
    assert issuer.jwks_requests == 2
    clock.advance(61)
    refusal(lambda: trust.authenticate_assertion(issuer.mint(key=issuer.rogue)), "unknown_key")
    assert issuer.jwks_requests == 3


def test_dropped_key_stops_verifying_after_refresh(clock: FakeClock, issuer: Issuer) -> None:
    trust = make_trust(clock, github_rule(issuer))
    old = issuer.mint()
    issuer.rotate(drop_old=True)
    clock.advance(61)
    assert trust.authenticate_assertion(issuer.mint()).subject  # fetches the new set
    refusal(lambda: trust.authenticate_assertion(old), "unknown_key")


def test_token_without_kid_needs_a_single_key(clock: FakeClock, issuer: Issuer) -> None:
    issuer.kid_in_header = False
    trust = make_trust(clock, github_rule(issuer))
    assert trust.authenticate_assertion(issuer.mint()).subject
    issuer.rotate(drop_old=True)
    clock.advance(61)
    assert trust.authenticate_assertion(issuer.mint()).subject  # refreshed, one key again
    issuer.rotate()
    clock.advance(61)
    # Two keys and no kid: which one is not for us to guess.
    refusal(lambda: trust.authenticate_assertion(issuer.mint()), "unknown_key")


def test_keys_too_old_and_unreachable_fail_closed(clock: FakeClock) -> None:
    with oidc_issuer(clock=clock) as issuer:
        trust = make_trust(clock, github_rule(issuer))
        assert trust.authenticate_assertion(issuer.mint()).subject
    # The issuer is gone; the keys held are good until max_age + max_stale (2 h).
    clock.advance(3600 + 1)
    assert trust.authenticate_assertion(issuer.mint()).subject  # stale: refetch in background
    clock.advance(3600)
    with pytest.raises(KeySourceError, match="too old"):  # a 503 at the token endpoint
        trust.authenticate_assertion(issuer.mint())
    trust.close()


def test_jwks_with_foreign_keys_and_private_keys(clock: FakeClock, issuer: Issuer) -> None:
    # An ES384 key (not one we verify) and an encryption key are skipped, not fatal.
    p384 = {"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"}
    enc = {**(generate_key("RS256").public_jwk() or {}), "kid": "enc", "use": "enc"}
    issuer.extra_jwks = [p384, enc]
    trust = make_trust(clock, github_rule(issuer))
    assert trust.authenticate_assertion(issuer.mint()).subject
    # A JWKS that publishes a private key is refused whole.
    issuer.extra_jwks = [{**generate_key("ES256").to_jwk(private=True), "kid": "oops"}]
    refused_whole = make_trust(clock, github_rule(issuer))
    assert refused_whole.unavailable() == (issuer.url,)
    with pytest.raises(KeySourceError, match="private"):
        refused_whole.authenticate_assertion(issuer.mint())


# -- private_key_jwt -------------------------------------------------------------------
CLIENT = "svc-reports"


@pytest.fixture
def client_key() -> Any:
    return generate_key("ES256")


def client_rule(client_key: Any) -> ClientKey:
    return ClientKey(CLIENT, {"keys": [client_key.public_jwk()]}, "svc:reports", max_ttl=600)


def client_assertion(issuer: Issuer, client_key: Any, **claims: Any) -> str:
    now = int(issuer.clock())
    payload = {
        "iss": CLIENT,
        "sub": CLIENT,
        "aud": TOKEN_ENDPOINT,
        "jti": os.urandom(8).hex(),
        "iat": now,
        "exp": now + 60,
    }
    for name, value in claims.items():
        if value is DROP:
            payload.pop(name)
        else:
            payload[name] = value
    header = {"alg": "ES256", "kid": client_key.kid, "typ": "JWT"}
    return issuer.sign(header, payload, key=client_key)


def test_private_key_jwt(clock: FakeClock, issuer: Issuer, client_key: Any) -> None:
    trust = make_trust(clock, client_rule(client_key), github_rule(issuer))
    token = client_assertion(issuer, client_key)
    caller = trust.authenticate_client(assertion_form(token, client_id=CLIENT), None)
    assert (caller.subject, caller.owner, caller.method) == (
        "svc:reports",
        "svc:reports",
        "private_key_jwt",
    )
    assert (caller.issuer, caller.rule, caller.max_ttl) == (f"client:{CLIENT}", CLIENT, 600.0)
    refusal(lambda: trust.authenticate_client(assertion_form(token), None), "replayed", token)
    # A client assertion is not a workload token: authenticate_assertion refuses it.
    other = client_assertion(issuer, client_key)
    refusal(lambda: trust.authenticate_assertion(other), "unknown_issuer", other)


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"aud": "https://broker.example/other"}, "wrong_audience"),
        ({"aud": [TOKEN_ENDPOINT, "x"]}, None),
        ({"sub": "someone-else"}, "wrong_subject"),
        ({"jti": DROP}, "missing_jti"),
        ({"exp": DROP}, "missing_exp"),
        ({"exp": 2**40}, "lifetime_too_long"),
    ],
    ids=["wrong-aud", "aud-list", "iss-not-sub", "no-jti", "no-exp", "exp-far"],
)
def test_private_key_jwt_refusals(
    clock: FakeClock, issuer: Issuer, client_key: Any, claims: dict[str, Any], reason: str | None
) -> None:
    trust = make_trust(clock, client_rule(client_key))
    token = client_assertion(issuer, client_key, **claims)
    if reason is None:
        assert trust.authenticate_client(assertion_form(token), None).subject == "svc:reports"
    else:
        refusal(lambda: trust.authenticate_client(assertion_form(token), None), reason, token)


def test_private_key_jwt_other_key_and_client_id(
    clock: FakeClock, issuer: Issuer, client_key: Any
) -> None:
    trust = make_trust(clock, client_rule(client_key))
    intruder = generate_key("ES256")
    forged = issuer.sign(
        {"alg": "ES256", "kid": client_key.kid},
        {"iss": CLIENT, "sub": CLIENT, "aud": TOKEN_ENDPOINT, "jti": "j", "exp": clock() + 60},
        key=intruder,
    )
    refusal(lambda: trust.authenticate_client(assertion_form(forged), None), "bad_signature")
    good = client_assertion(issuer, client_key)
    refusal(
        lambda: trust.authenticate_client(assertion_form(good, client_id="other"), None),
        "wrong_client",
    )


def test_private_key_jwt_without_kid(clock: FakeClock, issuer: Issuer, client_key: Any) -> None:
    trust = make_trust(clock, client_rule(client_key))
    now = int(clock())
    claims = {"iss": CLIENT, "sub": CLIENT, "aud": TOKEN_ENDPOINT, "jti": "1", "exp": now + 60}
    token = issuer.sign({"alg": "ES256"}, claims, key=client_key)
    assert trust.authenticate_client(assertion_form(token), None).method == "private_key_jwt"


def test_client_key_from_jwks_file(tmp_path: Any, client_key: Any) -> None:
    path = tmp_path / "client.jwk"
    path.write_text(_json(client_key.public_jwk()).decode())
    rule = ClientKey.from_jwks_file(CLIENT, path, "svc:reports")
    assert rule.subject == "svc:reports"
    assert "keys" not in repr(rule)
    with pytest.raises(InvalidRequest, match="private"):
        ClientKey(CLIENT, {"keys": [client_key.to_jwk(private=True)]}, "svc:reports")
    with pytest.raises(InvalidRequest, match="could not read"):
        ClientKey.from_jwks_file(CLIENT, tmp_path / "missing.jwk", "svc:reports")


# -- client secrets --------------------------------------------------------------------
def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def test_without_waiting_stops_before_anything_is_spent(clock: FakeClock, issuer: Issuer) -> None:
    """On the event loop (``without_waiting``) authentication runs until it would
    wait: a scrypt, a JWKS refresh. It stops there with WouldBlock, before the
    replay cache has the assertion, so the worker thread's second call accepts it."""
    secret_rule = ClientSecret("legacy-cron", hash_client_secret(SECRET), "svc:cron")
    trust = make_trust(clock, github_rule(issuer), secret_rule)
    with without_waiting():
        assert trust.authenticate_assertion(issuer.mint(), single_use=True).subject  # keys held
        with pytest.raises(WouldBlock):
            trust.authenticate_client({}, basic("legacy-cron", SECRET))
    assert trust.authenticate_client({}, basic("legacy-cron", SECRET)).subject == "svc:cron"
    issuer.rotate()  # a key the broker has not fetched yet: a refresh is due
    clock.advance(61)
    token = issuer.mint()
    with without_waiting(), pytest.raises(WouldBlock):
        trust.authenticate_assertion(token, single_use=True)
    assert trust.authenticate_assertion(token, single_use=True).subject  # not spent above
    refusal(lambda: trust.authenticate_assertion(token, single_use=True), "replayed")


def test_client_secret_basic_and_post(clock: FakeClock) -> None:
    rule = ClientSecret("legacy-cron", hash_client_secret(SECRET), "svc:cron", owner="ops")
    trust = make_trust(clock, rule)
    caller = trust.authenticate_client({}, basic("legacy-cron", SECRET))
    assert (caller.subject, caller.owner, caller.method) == (
        "svc:cron",
        "ops",
        "client_secret_basic",
    )
    assert caller.expires_at is None
    caller = trust.authenticate_client({"client_id": "legacy-cron", "client_secret": SECRET}, None)
    assert caller.method == "client_secret_post"
    assert SECRET not in repr(rule)
    assert rule.secret_hash not in repr(rule)
    refusal(
        lambda: trust.authenticate_client({}, basic("legacy-cron", SECRET + "x")),
        "bad_secret",
        SECRET,
    )
    refusal(lambda: trust.authenticate_client({}, basic("nobody", SECRET)), "bad_secret", SECRET)
    refusal(
        lambda: trust.authenticate_client(
            {"client_id": "legacy-cron", "client_secret": "wrong"}, None
        ),
        "bad_secret",
    )
    refusal(
        lambda: trust.authenticate_client({"client_secret": SECRET}, basic("legacy-cron", SECRET)),
        "multiple_methods",
        SECRET,
    )
    refusal(lambda: trust.authenticate_client({}, "Basic !!!"), "malformed")
    refusal(lambda: trust.authenticate_client({}, None), "no_credentials")
    refusal(lambda: trust.authenticate_client({}, "Bearer abc"), "no_credentials")


def test_client_secrets_need_a_client_secret_rule(clock: FakeClock, client_key: Any) -> None:
    trust = make_trust(clock, client_rule(client_key))
    refusal(lambda: trust.authenticate_client({}, basic(CLIENT, SECRET)), "secrets_not_enabled")


def test_secret_hash_format_and_bounds() -> None:
    encoded = hash_client_secret(SECRET)
    assert encoded.startswith("scrypt$n=16384,r=8,p=1$")
    assert SECRET not in encoded
    assert encoded != hash_client_secret(SECRET)  # salted
    with pytest.raises(InvalidRequest, match="16"):
        hash_client_secret("short")
    costly = encoded.replace("n=16384", "n=1073741824")
    for bad in (costly, "plain-text-secret", encoded.replace("scrypt", "md5")):
        with pytest.raises(InvalidRequest, match="secret_hash"):
            ClientSecret("c", bad, "svc:c")


# -- construction ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"audience": ""}, "audience"),
        ({"issuer": "http://issuer.example", "allow_http": False}, "issuer"),
        ({"issuer": "https://u:p@issuer.example"}, "issuer"),
        ({"subject": "svc:{repository!r}"}, "subject"),
        ({"subject": "svc:{repository:>40}"}, "subject"),
        ({"subject": "svc:{repository[0]}"}, "subject"),
        ({"subject": "svc:{repository}{ref}"}, "subject"),
        ({"subject": "svc:{repository"}, "subject"),
        ({"subject": ""}, "subject"),
        ({"owner": "{a..b}"}, "owner"),
        ({"claims": {"": "x"}}, "claims"),
        ({"claims": {"repository": ""}}, "claims"),
        ({"algorithms": ("HS256",)}, "algorithms"),
        ({"algorithms": ()}, "algorithms"),
        ({"jwks_url": "ftp://issuer.example/jwks"}, "jwks_url"),
        ({"max_ttl": -1}, "max_ttl"),
        ({"max_assertion_ttl": 0}, "max_assertion_ttl"),
    ],
)
def test_bad_rules_are_refused_naming_the_field(overrides: dict[str, Any], field: str) -> None:
    options = {
        "issuer": "https://issuer.example",
        "audience": "jitbroker",
        "subject": "svc:ci:{repository}",
        **overrides,
    }
    with pytest.raises(InvalidRequest, match=field):
        TrustRule(**options)


def test_rule_defaults_and_repr() -> None:
    rule = TrustRule(issuer="https://issuer.example", audience="jb", subject="svc:{sub}")
    assert rule.name == "https://issuer.example"
    assert rule.algorithms == ("RS256", "ES256", "EdDSA")
    assert rule.max_ttl == 3600.0
    assert rule.claims == {}
    assert "Template" not in repr(rule)


def test_trust_construction_fails_closed(clock: FakeClock, issuer: Issuer, client_key: Any) -> None:
    with pytest.raises(InvalidRequest, match="at least one"):
        make_trust(clock)
    with pytest.raises(InvalidRequest, match="twice"):
        make_trust(clock, client_rule(client_key), client_rule(client_key))
    with pytest.raises(InvalidRequest, match="trusted issuer"):
        make_trust(
            clock,
            github_rule(issuer),
            ClientKey(issuer.url, {"keys": [client_key.public_jwk()]}, "svc:x"),
        )
    with pytest.raises(InvalidRequest, match="name github"):
        make_trust(
            clock, github_rule(issuer), ClientSecret("github", hash_client_secret(SECRET), "svc:x")
        )
    with pytest.raises(InvalidRequest, match="name github"):
        make_trust(clock, github_rule(issuer), github_rule(issuer, claims={}))
    with pytest.raises(InvalidRequest, match="list"):
        Trust(github_rule(issuer), token_endpoint=TOKEN_ENDPOINT)  # type: ignore[arg-type]


def test_an_issuer_unreachable_at_start_is_retried_on_use(
    clock: FakeClock, issuer: Issuer, client_key: Any
) -> None:
    """A broker started during one issuer's outage serves everyone else, refuses
    that issuer's tokens (KeySourceError: a 503, try again) and loads its keys on
    the first token after the issuer is back, at most one attempt per 10 s."""
    issuer.discovery_issuer = "https://impostor.example"
    trust = make_trust(clock, github_rule(issuer), client_rule(client_key))
    assert trust.unavailable() == (issuer.url,)
    token = issuer.mint()
    with pytest.raises(KeySourceError, match="another issuer"):
        trust.authenticate_assertion(token)
    issuer.discovery_issuer = None  # back
    with pytest.raises(KeySourceError, match="another issuer"):  # within 10 s: no new attempt
        trust.authenticate_assertion(token)
    clock.advance(10)
    assert trust.authenticate_assertion(issuer.mint()).subject == "svc:ci:acme/app"
    assert trust.unavailable() == ()
    missing = make_trust(clock, github_rule(issuer, jwks_url=issuer.url + "/missing"))
    with pytest.raises(KeySourceError, match="could not fetch"):
        missing.authenticate_assertion(issuer.mint())


def test_closed_trust_refuses(clock: FakeClock, issuer: Issuer) -> None:
    trust = make_trust(clock, github_rule(issuer))
    trust.close()
    refusal(lambda: trust.authenticate_assertion(issuer.mint()), "closed")


# -- templates and claim paths, as properties ------------------------------------------------
def token_claims(token: str) -> dict[str, Any]:
    from jitbroker.tokens import b64decode, strict_json_object

    return strict_json_object(b64decode(token.split(".")[1]), "payload")


def test_claim_paths_find_dotted_member_names() -> None:
    payload = {"kubernetes.io": {"namespace": "ci"}, "a": {"b": "nested"}, "a.b": "flat"}
    assert lookup(payload, "kubernetes.io.namespace") == "ci"
    assert lookup(payload, "a.b") == "flat"  # the longest name wins
    assert lookup(payload, "kubernetes.io.missing") is not lookup(payload, "kubernetes.io")


SAFE = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.:/@", min_size=1, max_size=20)


@settings(max_examples=200, deadline=None)
@given(a=SAFE, b=SAFE, c=SAFE, d=SAFE)
def test_two_placeholder_templates_are_injective(a: str, b: str, c: str, d: str) -> None:
    template = Template.parse("svc:{x}:{y}", "subject")

    def render(x: str, y: str) -> str | None:
        try:
            return template.render({"x": x, "y": y})
        except InvalidClient:
            return None

    first, second = render(a, b), render(c, d)
    if first is not None and first == second:
        assert (a, b) == (c, d)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["acme", "x", "..", ".", "", "%2e", "y"]), min_size=2, max_size=5))
def test_no_dot_segment_value_matches_a_glob(segments: list[str]) -> None:
    from jitbroker.policy import glob_match

    value = "/".join(segments)
    if any(s in ("..", ".", "") or "%" in s for s in segments):
        for pattern in ("acme/*", "acme/**", "**", "*/*/*", "acme/*/y"):
            assert not glob_match(pattern, value)


# -- docs/trust.md -----------------------------------------------------------------------
DOC = (Path(__file__).resolve().parent.parent / "docs" / "trust.md").read_text()
DOC_BLOCKS = re.findall(r"```python\n(.*?)```", DOC, re.S)


@pytest.mark.parametrize("block", DOC_BLOCKS, ids=[f"trust.md#{i}" for i in range(len(DOC_BLOCKS))])
def test_doc_examples_build_valid_rules(block: str) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(block, "docs/trust.md", "exec"), namespace)  # noqa: S102
    built = [v for v in namespace.values() if isinstance(v, TrustRule | ClientKey | ClientSecret)]
    built += [v for rules in namespace.values() if isinstance(rules, list) for v in rules]
    assert built


def test_doc_names_every_reason() -> None:
    source = (Path(__file__).resolve().parent.parent / "src/jitbroker/web").glob("*.py")
    code = "".join(p.read_text() for p in source if p.name in ("trust.py", "assertions.py"))
    reasons = set(re.findall(r'_?refused\(\s*"([a-z_]+)"', code))
    assert reasons
    assert {r for r in reasons if f"`{r}`" not in DOC} == set()
