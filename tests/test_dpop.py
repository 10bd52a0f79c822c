"""Sender-constrained tokens: issue(holder_key=...) and DPoP proofs (RFC 9449)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import example, given, settings
from hypothesis import strategies as st

from jitbroker import Broker, KeyRing, Verifier
from jitbroker.audit import AuditEvent, EventType
from jitbroker.dpop import (
    ProofChecker,
    holder_thumbprint,
    make_proof,
    normalize_uri,
    token_hash,
)
from jitbroker.errors import (
    InvalidProof,
    InvalidRequest,
    InvalidToken,
    MalformedToken,
    ProofReplayed,
    TokenRevoked,
)
from jitbroker.jwk import b64url
from jitbroker.keys import Key, generate_key
from jitbroker.testing import TEST_ISSUER, FakeClock

URL = "https://api.example.com/orders"


@pytest.fixture
def holder() -> Key:
    return generate_key("ES256")


def payload(token: str) -> dict[str, Any]:
    segment = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))))


def proof_for(key: Key, token: str, clock: FakeClock, method: str = "GET", url: str = URL) -> str:
    return make_proof(key, method, url, token=token, now=clock())


def forge(key: Key, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A proof with any header and claims, signed by ``key``."""
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    return signing_input + "." + b64url(key.sign(signing_input.encode()))


def good_claims(token: str, clock: FakeClock) -> dict[str, Any]:
    return {"jti": "j1", "htm": "GET", "htu": URL, "iat": int(clock()), "ath": token_hash(token)}


def public_header(key: Key) -> dict[str, Any]:
    jwk = {k: v for k, v in (key.public_jwk() or {}).items() if k not in ("kid", "use")}
    return {"typ": "dpop+jwt", "alg": key.alg, "jwk": jwk}


# -- binding at issue ------------------------------------------------------------
@pytest.mark.parametrize("form", ["key", "public-key", "jwk", "cryptography"])
def test_issue_binds_the_token_to_the_holder_key(
    jitbroker_broker: Broker, holder: Key, form: str
) -> None:
    given: object = {
        "key": holder,
        "public-key": holder.public(),
        "jwk": holder.public_jwk(),
        "cryptography": holder._verifier,
    }[form]
    cred = jitbroker_broker.issue("svc:a", "api", ["read"], ttl=60, holder_key=given)
    assert cred.lease.holder == holder.kid
    assert payload(cred.token)["cnf"] == {"jkt": holder.kid}


@pytest.mark.parametrize(
    "bad",
    [
        b"0" * 32,
        {"kty": "oct", "k": "A" * 43},
        "a string",
        42,
    ],
    ids=["hmac-bytes", "oct-jwk", "string", "int"],
)
def test_holder_key_must_be_an_asymmetric_public_key(jitbroker_broker: Broker, bad: object) -> None:
    with pytest.raises(InvalidRequest):
        jitbroker_broker.issue("svc:a", "api", ttl=60, holder_key=bad)
    assert list(jitbroker_broker.leases()) == []


def test_holder_key_given_as_a_private_jwk_is_refused(jitbroker_broker: Broker) -> None:
    private = generate_key("EdDSA").to_jwk(private=True)
    with pytest.raises(InvalidRequest, match="public key"):
        jitbroker_broker.issue("svc:a", "api", ttl=60, holder_key=private)


# -- verification ---------------------------------------------------------------
def test_a_bound_token_verifies_with_a_fresh_proof(
    jitbroker_broker: Broker, holder: Key, jitbroker_clock: FakeClock
) -> None:
    cred = jitbroker_broker.issue("svc:a", "api", ttl=60, holder_key=holder.public())
    claims = jitbroker_broker.verify(
        cred.token,
        audience="api",
        proof=proof_for(holder, cred.token, jitbroker_clock),
        method="GET",
        url=URL + "?page=2",  # the query is not part of htu
    )
    assert claims.holder == holder.kid


def test_a_stolen_token_without_the_key_is_rejected(
    jitbroker_broker: Broker, holder: Key, jitbroker_clock: FakeClock
) -> None:
    cred = jitbroker_broker.issue("svc:a", "api", ttl=60, holder_key=holder.public())
    with pytest.raises(InvalidProof, match="proof"):
        jitbroker_broker.verify(cred.token, audience="api")
    with pytest.raises(InvalidProof):
        jitbroker_broker.verify(cred.token, audience="api", method="GET", url=URL)
    thief = generate_key("ES256")  # a valid proof, by the wrong key
    with pytest.raises(InvalidProof, match="another key"):
        jitbroker_broker.verify(
            cred.token,
            audience="api",
            proof=proof_for(thief, cred.token, jitbroker_clock),
            method="GET",
            url=URL,
        )


def test_a_replayed_proof_is_rejected(
    jitbroker_broker: Broker, holder: Key, jitbroker_clock: FakeClock
) -> None:
    cred = jitbroker_broker.issue("svc:a", "api", ttl=60, holder_key=holder.public())
    proof = proof_for(holder, cred.token, jitbroker_clock)
    jitbroker_broker.verify(cred.token, audience="api", proof=proof, method="GET", url=URL)
    with pytest.raises(ProofReplayed):
        jitbroker_broker.verify(cred.token, audience="api", proof=proof, method="GET", url=URL)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "POST"}, "method"),
        ({"url": "https://api.example.com/admin"}, "URI"),
        ({"url": "https://evil.example.com/orders"}, "URI"),
        ({"url": "http://api.example.com/orders"}, "URI"),
    ],
)
def test_a_proof_covers_one_request(
    jitbroker_broker: Broker,
    holder: Key,
    jitbroker_clock: FakeClock,
    change: dict[str, str],
    message: str,
) -> None:
    cred = jitbroker_broker.issue("svc:a", "api", ttl=60, holder_key=holder.public())
    request = {"method": "GET", "url": URL, **change}
    with pytest.raises(InvalidProof, match=message):
        jitbroker_broker.verify(
            cred.token,
            audience="api",
            proof=proof_for(holder, cred.token, jitbroker_clock),
            **request,
        )


def test_a_proof_covers_one_token(
    jitbroker_broker: Broker, holder: Key, jitbroker_clock: FakeClock
) -> None:
    first = jitbroker_broker.issue("svc:a", "api", ttl=60, holder_key=holder.public())
    second = jitbroker_broker.issue("svc:a", "api", ttl=60, holder_key=holder.public())
    proof = proof_for(holder, first.token, jitbroker_clock)
    with pytest.raises(InvalidProof, match="access token"):
        jitbroker_broker.verify(second.token, audience="api", proof=proof, method="GET", url=URL)


@pytest.mark.parametrize(("age", "ok"), [(-6, False), (-4, True), (64, True), (66, False)])
def test_a_proof_is_fresh_for_a_minute(
    jitbroker_broker: Broker, holder: Key, jitbroker_clock: FakeClock, age: int, ok: bool
) -> None:
    cred = jitbroker_broker.issue("svc:a", "api", ttl=600, holder_key=holder.public())
    proof = make_proof(holder, "GET", URL, token=cred.token, now=jitbroker_clock() - age)
    if ok:
        jitbroker_broker.verify(cred.token, audience="api", proof=proof, method="GET", url=URL)
    else:
        with pytest.raises(InvalidProof, match="too old or from the future"):
            jitbroker_broker.verify(cred.token, audience="api", proof=proof, method="GET", url=URL)


def test_revocation_is_reported_before_the_proof_is_spent(
    jitbroker_broker: Broker, holder: Key, jitbroker_clock: FakeClock
) -> None:
    cred = jitbroker_broker.issue("svc:a", "api", ttl=60, holder_key=holder.public())
    proof = proof_for(holder, cred.token, jitbroker_clock)
    jitbroker_broker.revoke(cred)
    with pytest.raises(TokenRevoked):
        jitbroker_broker.verify(cred.token, audience="api", proof=proof, method="GET", url=URL)


def test_a_bearer_token_ignores_a_proof(
    jitbroker_broker: Broker, holder: Key, jitbroker_clock: FakeClock
) -> None:
    cred = jitbroker_broker.issue("svc:a", "api", ttl=60)
    claims = jitbroker_broker.verify(
        cred.token, audience="api", proof="whatever", method="GET", url=URL
    )
    assert claims.holder is None


def test_binding_survives_renewal_and_attenuation(
    jitbroker_broker: Broker, holder: Key, jitbroker_clock: FakeClock
) -> None:
    cred = jitbroker_broker.issue("svc:a", "api", ["read", "write"], ttl=60, holder_key=holder)
    renewed = jitbroker_broker.renew(cred, ttl=60)
    child = jitbroker_broker.attenuate(cred, scopes=["read"])
    for token in (renewed.token, child.token):
        assert payload(token)["cnf"] == {"jkt": holder.kid}
        with pytest.raises(InvalidProof):
            jitbroker_broker.verify(token, audience="api")
        jitbroker_broker.verify(
            token,
            audience="api",
            proof=proof_for(holder, token, jitbroker_clock),
            method="GET",
            url=URL,
        )


def test_attenuate_binds_a_child_to_a_new_key(
    jitbroker_broker: Broker, holder: Key, jitbroker_clock: FakeClock
) -> None:
    cred = jitbroker_broker.issue("svc:a", "api", ["read", "write"], ttl=60)
    child = jitbroker_broker.attenuate(cred, scopes=["read"], holder_key=holder.public())
    assert child.lease.holder == holder.kid
    assert payload(child.token)["cnf"] == {"jkt": holder.kid}
    with pytest.raises(InvalidProof):
        jitbroker_broker.verify(child.token, audience="api")
    proof = proof_for(holder, child.token, jitbroker_clock)
    claims = jitbroker_broker.verify(
        child.token, audience="api", proof=proof, method="GET", url=URL
    )
    assert claims.holder == holder.kid
    assert "cnf" not in payload(cred.token)  # the parent is as it was
    jitbroker_broker.verify(cred.token, audience="api")
    # a grandchild keeps its parent's binding
    grandchild = jitbroker_broker.attenuate(child, ttl=10)
    assert grandchild.lease.holder == holder.kid
    with pytest.raises(InvalidRequest, match="unsupported key type"):
        jitbroker_broker.attenuate(cred, holder_key="not a key")


def test_opaque_tokens_can_be_bound(jitbroker_clock: FakeClock, holder: Key) -> None:
    broker = Broker(issuer=TEST_ISSUER, token_format="opaque", clock=jitbroker_clock)
    cred = broker.issue("svc:a", "api", ttl=60, holder_key=holder.public())
    with pytest.raises(InvalidProof):
        broker.verify(cred.token, audience="api")
    claims = broker.verify(
        cred.token,
        audience="api",
        proof=proof_for(holder, cred.token, jitbroker_clock),
        method="GET",
        url=URL,
    )
    assert claims.holder == holder.kid


def test_an_offline_verifier_checks_proofs_too(jitbroker_clock: FakeClock, holder: Key) -> None:
    broker = Broker(issuer=TEST_ISSUER, clock=jitbroker_clock)
    verifier = Verifier(
        broker.jwks(), issuer=TEST_ISSUER, audience="api", offline=True, clock=jitbroker_clock
    )
    cred = broker.issue("svc:a", "api", ttl=60, holder_key=holder.public())
    with pytest.raises(InvalidProof):
        verifier.verify(cred.token)
    proof = proof_for(holder, cred.token, jitbroker_clock)
    verifier.verify(cred.token, proof=proof, method="GET", url=URL)
    with pytest.raises(ProofReplayed):
        verifier.verify(cred.token, proof=proof, method="GET", url=URL)


def test_a_token_whose_cnf_disagrees_with_its_lease_is_rejected(
    jitbroker_broker: Broker, holder: Key
) -> None:
    """A bound lease's token minted without cnf (or the reverse) is not the lease's."""
    cred = jitbroker_broker.issue("svc:a", "api", ttl=60, holder_key=holder.public())
    claims = payload(cred.token)
    del claims["cnf"]
    key = jitbroker_broker.keys.active
    from jitbroker.tokens import encode_jws

    unbound = encode_jws(key, claims)
    from jitbroker.errors import UnknownLease

    with pytest.raises(UnknownLease, match="does not match"):
        jitbroker_broker.verify(unbound, audience="api")


@pytest.mark.parametrize(
    "cnf",
    [{"jkt": 1}, {"jkt": "short"}, {"jkt": "A" * 43, "x5t#S256": "B" * 43}, "A" * 43, []],
)
def test_a_malformed_cnf_claim_is_refused(jitbroker_broker: Broker, cnf: object) -> None:
    cred = jitbroker_broker.issue("svc:a", "api", ttl=60)
    from jitbroker.tokens import encode_jws

    claims = {**payload(cred.token), "cnf": cnf}
    with pytest.raises(MalformedToken, match="cnf"):
        jitbroker_broker.verify(encode_jws(jitbroker_broker.keys.active, claims), audience="api")


# -- hostile proofs ---------------------------------------------------------------
def hostile_cases(holder: Key, token: str, clock: FakeClock) -> dict[str, str]:
    good = good_claims(token, clock)
    header = public_header(holder)
    private_jwk = {k: v for k, v in holder.to_jwk(private=True).items() if k != "kid"}
    hmac_key = KeyRing.generate("HS256").active
    return {
        "not-a-jws": "x.y",
        "huge": "a" * 5000 + ".b.c",
        "alg-none": b64url(json.dumps({**header, "alg": "none"}).encode())
        + "."
        + b64url(json.dumps(good).encode())
        + ".",
        "alg-hs256": forge(hmac_key, {**header, "alg": "HS256"}, good),
        "typ-jwt": forge(holder, {**header, "typ": "JWT"}, good),
        "no-jwk": forge(holder, {"typ": "dpop+jwt", "alg": holder.alg}, good),
        "private-jwk": forge(holder, {**header, "jwk": private_jwk}, good),
        "jku": forge(holder, {**header, "jku": "https://evil/jwks"}, good),
        "crit": forge(holder, {**header, "crit": ["exp"]}, good),
        "alg-mismatch": forge(holder, {**header, "alg": "EdDSA"}, good),
        "no-jti": forge(holder, header, {k: v for k, v in good.items() if k != "jti"}),
        "long-jti": forge(holder, header, {**good, "jti": "j" * 200}),
        "no-ath": forge(holder, header, {k: v for k, v in good.items() if k != "ath"}),
        "iat-string": forge(holder, header, {**good, "iat": str(good["iat"])}),
        "iat-bool": forge(holder, header, {**good, "iat": True}),
        "iat-huge": forge(holder, header, {**good, "iat": 10**400}),  # no float holds it
        "iat-huge-negative": forge(holder, header, {**good, "iat": -(10**400)}),
        "bad-signature": proof_for(holder, token, clock)[:-4] + "AAAA",
        "duplicate-member": b64url(b'{"typ":"dpop+jwt","typ":"dpop+jwt","alg":"ES256"}')
        + "."
        + b64url(json.dumps(good).encode())
        + ".AAAA",
    }


HOSTILE = [
    "not-a-jws",
    "huge",
    "alg-none",
    "alg-hs256",
    "typ-jwt",
    "no-jwk",
    "private-jwk",
    "jku",
    "crit",
    "alg-mismatch",
    "no-jti",
    "long-jti",
    "no-ath",
    "iat-string",
    "iat-bool",
    "iat-huge",
    "iat-huge-negative",
    "bad-signature",
    "duplicate-member",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_proofs_are_rejected(
    jitbroker_broker: Broker, holder: Key, jitbroker_clock: FakeClock, name: str
) -> None:
    cred = jitbroker_broker.issue("svc:a", "api", ttl=60, holder_key=holder.public())
    cases = hostile_cases(holder, cred.token, jitbroker_clock)
    assert set(cases) == set(HOSTILE)
    with pytest.raises(InvalidProof):
        jitbroker_broker.verify(
            cred.token, audience="api", proof=cases[name], method="GET", url=URL
        )
    # ...and the genuine article still passes afterwards
    jitbroker_broker.verify(
        cred.token,
        audience="api",
        proof=proof_for(holder, cred.token, jitbroker_clock),
        method="GET",
        url=URL,
    )


# -- helpers -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "htu"),
    [
        ("HTTPS://API.Example.com:443/a?b=c#d", "https://api.example.com/a"),
        ("http://h:80", "http://h/"),
        ("https://h:8443/x", "https://h:8443/x"),
        ("https://[::1]/x", "https://[::1]/x"),
    ],
)
def test_normalize_uri(url: str, htu: str) -> None:
    assert normalize_uri(url) == htu


@pytest.mark.parametrize("url", ["ftp://h/x", "/relative", "https://", 7])
def test_normalize_uri_refuses(url: object) -> None:
    with pytest.raises(InvalidRequest):
        normalize_uri(url)  # type: ignore[arg-type]


def test_holder_thumbprint_matches_the_key_id() -> None:
    ed = ed25519.Ed25519PrivateKey.generate()
    assert holder_thumbprint(ed.public_key()) == holder_thumbprint(ed)
    p256 = generate_key("ES256")
    assert holder_thumbprint(p256.public_jwk()) == p256.kid
    with pytest.raises(InvalidRequest):
        holder_thumbprint(ec.generate_private_key(ec.SECP384R1()).public_key())


def test_make_proof_needs_a_private_asymmetric_key(holder: Key) -> None:
    with pytest.raises(InvalidRequest):
        make_proof(holder.public(), "GET", URL)
    with pytest.raises(InvalidRequest):
        make_proof(KeyRing.generate("HS256").active, "GET", URL)


# -- the replay cache -------------------------------------------------------------
def test_a_full_replay_cache_refuses_new_proofs_instead_of_forgetting_old_ones(
    jitbroker_clock: FakeClock,
) -> None:
    """Flooding the cache must not evict a jti that is still inside its window:
    the replay of the first proof stays refused, and new proofs fail closed."""
    checker = ProofChecker(replay_cache_size=4, clock=jitbroker_clock)
    victim, flooder = generate_key("ES256"), generate_key("EdDSA")
    token = "header.payload.signature"  # a proof only hashes the token it covers

    def check(key: Key, proof: str) -> None:
        checker.check(proof, method="GET", url=URL, token=token, jkt=key.kid)

    first = proof_for(victim, token, jitbroker_clock)
    check(victim, first)
    for _ in range(3):
        check(flooder, proof_for(flooder, token, jitbroker_clock))
    with pytest.raises(InvalidProof, match="replay cache is full; try again"):
        check(flooder, proof_for(flooder, token, jitbroker_clock))
    with pytest.raises(ProofReplayed):
        check(victim, first)
    jitbroker_clock.advance(60 + 2 * 5)  # max_age + twice the leeway: every entry ages out
    check(victim, proof_for(victim, token, jitbroker_clock))
    check(flooder, proof_for(flooder, token, jitbroker_clock))
    with pytest.raises(InvalidProof, match="too old"):
        check(victim, first)  # gone from the cache only once it can no longer pass


def test_the_replay_cache_is_keyed_by_holder(jitbroker_clock: FakeClock) -> None:
    checker = ProofChecker(clock=jitbroker_clock)
    token = "header.payload.signature"
    for key in (generate_key("ES256"), generate_key("ES256")):
        claims = {**good_claims(token, jitbroker_clock), "jti": "same-jti"}
        checker.check(
            forge(key, public_header(key), claims), method="GET", url=URL, token=token, jkt=key.kid
        )


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "10"])
def test_replay_cache_size_must_be_a_positive_whole_number(size: object) -> None:
    with pytest.raises(InvalidRequest, match="replay_cache_size"):
        ProofChecker(replay_cache_size=size)  # type: ignore[arg-type]


# -- hostile request URLs and methods (issue 15) ----------------------------------------
MALFORMED_URLS = [
    "https://api.example.com:99999/orders",  # port out of range
    "https://api.example.com:65536/orders",
    "https://api.example.com:0/orders",
    "https://api.example.com:-1/orders",
    "https://api.example.com:https/orders",  # non-numeric port
    "https://api.example.com:\uff18\uff10/orders",  # non-ASCII digits
    "https://api.example.com:80:80/orders",
    "https://[::1/orders",  # unbalanced IPv6 bracket
    "https://::1]/orders",
    "https://[::1]]/orders",
    "https://[zz::1]/orders",  # not an IPv6 address
    "https://[v1.x]/orders",
    "https://[::1]:99999/orders",
    "https://user@api.example.com/orders",  # userinfo
    "https://user:secret@api.example.com/orders",
    "https://@api.example.com/orders",
    "https://evil.example.com@api.example.com/orders",
    "https://api.example.com/or ders",  # space and control characters
    "https://api.example.com/or\nders",
    "https://api.example.com/or\tders",
    "https://api.example.com\x00/orders",
    "https://api.example.com/orders\x7f",
    "ftp://api.example.com/orders",  # not http(s), or not absolute
    "/orders",
    "api.example.com/orders",
    "https://",
    "https:///orders",
    "https://:443/orders",
    "https:api.example.com/orders",
    "",
    "https://api.example.com/" + "a" * 5000,  # longer than any proof
]


@pytest.mark.parametrize("url", MALFORMED_URLS, ids=repr)
def test_normalize_uri_refuses_malformed_urls_with_invalid_request(url: str) -> None:
    with pytest.raises(InvalidRequest):
        normalize_uri(url)
    with pytest.raises(InvalidRequest):  # the client's own URL: a bad argument
        make_proof(generate_key("EdDSA"), "GET", url)


@pytest.mark.parametrize("url", MALFORMED_URLS, ids=repr)
def test_a_malformed_request_url_is_an_audited_invalid_proof(
    jitbroker_keys: KeyRing, jitbroker_clock: FakeClock, holder: Key, url: str
) -> None:
    """The request URL's text comes from the client (request line, Host header):
    malformed, it is a rejected request (InvalidProof, audited), never a
    ValueError escaping the verifier."""
    events: list[AuditEvent] = []
    broker = Broker(
        issuer=TEST_ISSUER, keys=jitbroker_keys, clock=jitbroker_clock, audit=[events.append]
    )
    cred = broker.issue("svc:a", "api", ttl=60, holder_key=holder.public())
    proof = proof_for(holder, cred.token, jitbroker_clock)
    with pytest.raises(InvalidProof) as info:
        broker.verify(cred.token, audience="api", proof=proof, method="GET", url=url)
    assert isinstance(info.value, InvalidToken)
    assert "secret" not in str(info.value)  # the URL is never echoed
    failed = [e for e in events if e.action is EventType.VERIFY_FAILED]
    assert [e.error for e in failed] == ["InvalidProof"]
    # The proof was not spent: the same one passes for the genuine URL.
    broker.verify(cred.token, audience="api", proof=proof, method="GET", url=URL)


@pytest.mark.parametrize("method", ["", "G ET", "GET\r\n", "GET\x00", "G(E)T", "GÉT"], ids=repr)
def test_a_malformed_request_method_is_an_invalid_proof(
    jitbroker_clock: FakeClock, holder: Key, method: str
) -> None:
    checker = ProofChecker(clock=jitbroker_clock)
    token = "header.payload.signature"
    claims = {**good_claims(token, jitbroker_clock), "htm": method}
    with pytest.raises(InvalidProof, match="method"):
        checker.check(
            forge(holder, public_header(holder), claims),
            method=method,
            url=URL,
            token=token,
            jkt=holder.kid,
        )
    with pytest.raises(InvalidRequest, match="method"):
        make_proof(holder, method, URL)


@pytest.mark.parametrize(
    ("method", "url"),
    [(None, URL), ("GET", None), (b"GET", URL), ("GET", URL.encode()), ("GET", 7)],
)
def test_request_arguments_of_the_wrong_type_are_the_callers_bug(
    jitbroker_clock: FakeClock, holder: Key, method: object, url: object
) -> None:
    """Only server code can pass a non-string: InvalidRequest (fix the call)."""
    token = "header.payload.signature"
    with pytest.raises(InvalidRequest, match="as strings"):
        ProofChecker(clock=jitbroker_clock).check(
            proof_for(holder, token, jitbroker_clock),
            method=method,  # type: ignore[arg-type]
            url=url,  # type: ignore[arg-type]
            token=token,
            jkt=holder.kid,
        )


_HOSTILE_URL = st.one_of(
    st.text(max_size=60),
    st.builds(
        "{}://{}{}{}".format,
        st.sampled_from(["http", "https", "HTTPS", "ftp", ""]),
        st.text(st.characters(codec="utf-8"), max_size=30),
        st.sampled_from(["", ":", ":443", ":99999", ":x", "]", "@h"]),
        st.text(max_size=20),
    ),
)


@settings(max_examples=300, deadline=None)
@given(url=_HOSTILE_URL, method=st.text(max_size=10) | st.just("GET"))
@example(url="https://h:99999/", method="GET")
@example(url="https://[::1/", method="GET")
def test_any_request_url_or_method_is_a_proof_error_never_a_crash(url: str, method: str) -> None:
    """Property: over arbitrary URL and method strings, check() raises only
    InvalidProof (for a bad request or proof) and normalize_uri only InvalidRequest."""
    try:
        htu = normalize_uri(url)
    except InvalidRequest:
        pass
    else:
        assert htu == normalize_uri(htu)  # normal forms are fixed points
    with pytest.raises(InvalidProof):  # the proof's htu is no normal form: it covers nothing
        _PROPERTY_CHECKER.check(
            _PROPERTY_PROOF, method=method, url=url, token=_TOKEN, jkt=_HOLDER.kid
        )


_TOKEN = "header.payload.signature"
_HOLDER = generate_key("EdDSA")
_PROPERTY_CHECKER = ProofChecker(clock=lambda: 1_767_225_600.0)
_PROPERTY_PROOF = forge(
    _HOLDER,
    public_header(_HOLDER),
    {
        "jti": "j",
        "htm": "GET",
        "htu": "never a normal form",
        "iat": 1_767_225_600,
        "ath": token_hash(_TOKEN),
    },
)


# -- the replay budget, per holder key (issue 15) ------------------------------------------
def fresh(checker: ProofChecker, key: Key, clock: FakeClock, token: str = _TOKEN) -> str:
    """A new proof by ``key``, checked: it passes, or the error propagates."""
    proof = proof_for(key, token, clock)
    checker.check(proof, method="GET", url=URL, token=token, jkt=key.kid)
    return proof


def test_one_holder_flooding_proofs_exhausts_only_its_own_budget(
    jitbroker_clock: FakeClock,
) -> None:
    checker = ProofChecker(replay_cache_size=100, proofs_per_holder=5, clock=jitbroker_clock)
    flooder, others = generate_key("EdDSA"), [generate_key("EdDSA") for _ in range(3)]
    first = fresh(checker, flooder, jitbroker_clock)
    for _ in range(4):
        fresh(checker, flooder, jitbroker_clock)
    for _ in range(3):  # past its budget: its own new proofs fail closed
        with pytest.raises(InvalidProof, match="this holder key has 5 recent DPoP proofs"):
            fresh(checker, flooder, jitbroker_clock)
    with pytest.raises(ProofReplayed):  # and its replays are still replays
        checker.check(first, method="GET", url=URL, token=_TOKEN, jkt=flooder.kid)
    for key in others:  # everyone else is unaffected
        for _ in range(5):
            fresh(checker, key, jitbroker_clock)
    jitbroker_clock.advance(60 + 5 + 1)  # past max_age + leeway: the flooder's proofs expire
    fresh(checker, flooder, jitbroker_clock)
    with pytest.raises(InvalidProof, match="too old"):
        checker.check(first, method="GET", url=URL, token=_TOKEN, jkt=flooder.kid)


def test_the_replay_cache_bounds_holders_and_entries_in_all(jitbroker_clock: FakeClock) -> None:
    """The total stays bounded (it bounds the number of holders tracked too), and
    a full cache still fails closed rather than forgetting a live entry."""
    checker = ProofChecker(replay_cache_size=6, proofs_per_holder=2, clock=jitbroker_clock)
    keys = [generate_key("EdDSA") for _ in range(4)]
    proofs = [fresh(checker, key, jitbroker_clock) for key in keys[:3] for _ in range(2)]
    with pytest.raises(InvalidProof, match="replay cache is full"):
        fresh(checker, keys[3], jitbroker_clock)
    for key, proof in zip([k for k in keys[:3] for _ in range(2)], proofs, strict=True):
        with pytest.raises(ProofReplayed):
            checker.check(proof, method="GET", url=URL, token=_TOKEN, jkt=key.kid)
    assert len(checker._seen) == 6
    jitbroker_clock.advance(66)
    fresh(checker, keys[3], jitbroker_clock)
    assert len(checker._seen) == 1
    assert list(checker._seen._by_holder) == [keys[3].kid]  # expired holders are dropped


def test_a_proof_is_remembered_until_its_last_acceptable_moment(
    jitbroker_clock: FakeClock, holder: Key
) -> None:
    """A proof dated ``leeway`` into the future stays acceptable until its iat is
    max_age + leeway old: remembered by insertion time plus a fixed window, it
    would be forgotten (and replayable) a moment before that."""
    checker = ProofChecker(clock=jitbroker_clock)  # max_age 60, leeway 5
    token = "header.payload.signature"
    start = jitbroker_clock()
    proof = make_proof(holder, "GET", URL, token=token, now=start + 5)
    checker.check(proof, method="GET", url=URL, token=token, jkt=holder.kid)
    jitbroker_clock.advance(5 + 60 + 5)  # iat + max_age + leeway: the proof is still fresh
    with pytest.raises(ProofReplayed):
        checker.check(proof, method="GET", url=URL, token=token, jkt=holder.kid)
    jitbroker_clock.advance(0.001)
    with pytest.raises(InvalidProof, match="too old"):
        checker.check(proof, method="GET", url=URL, token=token, jkt=holder.kid)


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "10"])
def test_proofs_per_holder_must_be_a_positive_whole_number(size: object) -> None:
    with pytest.raises(InvalidRequest, match="proofs_per_holder"):
        ProofChecker(proofs_per_holder=size)  # type: ignore[arg-type]


def test_a_token_request_proof_names_its_key_and_carries_no_ath(holder: Key) -> None:
    clock = FakeClock()
    checker = ProofChecker(clock=clock)
    proof = make_proof(holder, "POST", "https://broker.example/token", now=clock())
    key, jkt = checker.check_token_request(proof, method="POST", url="https://broker.example/token")
    assert jkt == holder_thumbprint(holder)
    assert key.public_jwk() == holder.public_jwk()
    with pytest.raises(ProofReplayed):
        checker.check_token_request(proof, method="POST", url="https://broker.example/token")
    with_ath = make_proof(holder, "POST", "https://broker.example/token", token="t", now=clock())
    with pytest.raises(InvalidProof, match="carries no ath"):
        checker.check_token_request(with_ath, method="POST", url="https://broker.example/token")
    other = make_proof(holder, "POST", "https://broker.example/renew", now=clock())
    with pytest.raises(InvalidProof, match="another URI"):
        checker.check_token_request(other, method="POST", url="https://broker.example/token")
