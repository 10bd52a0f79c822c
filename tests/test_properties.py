"""Property tests: whatever the input, verification and loaders fail cleanly.

``verify`` on any text, or on any one-edit mutation of a valid token, raises an
``InvalidToken`` subclass and nothing else; ``KeyRing.from_jwks`` on any
JSON-like value, and ``Policy.from_toml`` on any file, raise ``InvalidRequest``
and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from jitbroker import Broker, InvalidRequest, KeyRing, Policy, Verifier
from jitbroker.errors import InvalidToken, KeySourceError
from jitbroker.jwks import parse_jwks
from jitbroker.keys import b64url
from jitbroker.testing import TEST_ISSUER, FakeClock

AUDIENCE = "api"
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# Derandomized and without the example database: the same examples on every run.
FAST = settings(max_examples=200, deadline=None, derandomize=True, database=None)


class Target:
    """A broker with one valid token, and an offline verifier of the same keys."""

    def __init__(self, alg: str) -> None:
        self.clock = FakeClock()
        self.broker = Broker(issuer=TEST_ISSUER, keys=KeyRing.generate(alg), clock=self.clock)
        self.token = self.broker.issue("svc:prop", AUDIENCE, ["read"], ttl=300).token
        self.offline = Verifier(
            self.broker.keys, issuer=TEST_ISSUER, offline=True, clock=self.clock
        )

    def rejects(self, token: object) -> None:
        """Both verifiers raise an InvalidToken (a subclass); nothing else escapes."""
        for verifier in (self.broker, self.offline):
            with pytest.raises(InvalidToken):
                verifier.verify(token, audience=AUDIENCE)  # type: ignore[arg-type]


# Module scope: hypothesis runs every example in one test function call, and the
# verifiers only read the broker's state (their caches aside).
@pytest.fixture(scope="module", params=["EdDSA", "ES256", "RS256", "HS256"])
def target(request: pytest.FixtureRequest) -> Target:
    return Target(request.param)


@pytest.fixture(scope="module")
def eddsa() -> Target:
    return Target("EdDSA")


def test_the_valid_token_verifies(target: Target) -> None:
    # The control for the mutation properties: the unmutated token passes.
    assert target.broker.verify(target.token, audience=AUDIENCE).subject == "svc:prop"
    assert target.offline.verify(target.token, audience=AUDIENCE).subject == "svc:prop"


# -- (a) arbitrary text ----------------------------------------------------------
b64_text = st.text(alphabet=B64URL, max_size=120)
compact_like = st.lists(b64_text, min_size=1, max_size=5).map(".".join)
near_opaque = st.text(alphabet="0123456789abcdefABCDEF\n ", min_size=60, max_size=70).map(
    lambda tail: "jbo_" + tail
)


@FAST
@given(st.text())
def test_verify_arbitrary_text(eddsa: Target, text: str) -> None:
    eddsa.rejects(text)


@FAST
@given(st.text(alphabet=B64URL + ".", max_size=300) | compact_like | near_opaque)
def test_verify_base64url_text(eddsa: Target, text: str) -> None:
    eddsa.rejects(text)


@FAST
@given(payload=b64_text, signature=b64_text)
def test_verify_our_header_with_arbitrary_payload_and_signature(
    target: Target, payload: str, signature: str
) -> None:
    # Past the fast header lookup: every example reaches signature verification.
    header = target.broker.keys.active.header
    target.rejects(f"{header}.{payload}.{signature}")


@FAST
@given(payload=st.binary(max_size=300))
def test_verify_arbitrary_payload_bytes_with_a_forged_signature(
    target: Target, payload: bytes
) -> None:
    header, _, signature = target.token.split(".")
    target.rejects(f"{header}.{b64url(payload)}.{signature}")


@FAST
@given(st.binary() | st.integers() | st.floats() | st.none() | st.booleans() | st.tuples())
def test_verify_non_str_hashable_values(eddsa: Target, value: Hashable) -> None:
    # Unhashable values (list, dict) are a known bug: see test_hostile.test_unhashable_token.
    eddsa.rejects(value)


# -- (b) one edit away from a valid token ------------------------------------------
@st.composite
def mutations(draw: st.DrawFn, token: str) -> str:
    """``token`` with one character flipped, replaced, inserted or deleted, or its
    segments permuted or duplicated; never ``token`` itself."""
    kind = draw(st.sampled_from(["flip", "replace", "insert", "delete", "segments"]))
    chars = st.sampled_from(B64URL + ".=+/ ") | st.characters()
    if kind == "segments":
        parts = token.split(".")
        order = draw(st.lists(st.sampled_from([0, 1, 2]), min_size=1, max_size=4))
        mutated = ".".join(parts[i] for i in order)
    elif kind == "insert":
        at = draw(st.integers(0, len(token)))
        mutated = token[:at] + draw(chars) + token[at:]
    else:
        at = draw(st.integers(0, len(token) - 1))
        if kind == "flip":
            bit = draw(st.integers(0, 6))
            new = chr(ord(token[at]) ^ (1 << bit))
        elif kind == "replace":
            new = draw(chars)
        else:
            new = ""
        mutated = token[:at] + new + token[at + 1 :]
    if mutated == token:
        return token + "."  # still a mutation, and a malformed one
    return mutated


@FAST
@given(data=st.data())
def test_mutated_token_never_verifies(target: Target, data: st.DataObject) -> None:
    mutated = data.draw(mutations(target.token))
    assert mutated != target.token
    target.rejects(mutated)


@FAST
@given(data=st.data())
def test_mutated_token_never_verifies_even_after_the_original_was_cached(
    eddsa: Target, data: st.DataObject
) -> None:
    eddsa.broker.verify(eddsa.token, audience=AUDIENCE)  # the original is in the cache
    eddsa.rejects(data.draw(mutations(eddsa.token)))


# -- (c) JWKS documents -------------------------------------------------------------
MEMBERS = ["kty", "crv", "x", "y", "d", "n", "e", "k", "p", "q", "dp", "dq", "qi", "alg", "kid"]
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["OKP", "EC", "RSA", "oct", "Ed25519", "P-256", "EdDSA", "HS256"])
    | st.text(alphabet=B64URL + "=+/!", max_size=64)
    | st.binary(min_size=1, max_size=64).map(b64url)
)
json_like = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(MEMBERS) | st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=16,
)
jwk_like = st.fixed_dictionaries(
    {},
    optional={
        "kty": st.sampled_from(["OKP", "EC", "RSA", "oct", "okp", ""]) | json_like,
        **{m: json_like for m in MEMBERS if m != "kty"},
        "k": st.binary(min_size=1, max_size=48).map(b64url) | json_like,
    },
)
jwks_like = (
    st.fixed_dictionaries({"keys": st.lists(jwk_like | json_like, max_size=3)})
    | st.dictionaries(st.sampled_from(["keys", *MEMBERS]) | st.text(max_size=6), json_like)
    | json_like
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(jwks_like)
@example({"keys": [{"kty": "oct", "k": b64url(bytes(16))}]})  # a too short HMAC key
@example({"keys": [{"kty": "RSA", "n": "AQ", "e": "AQAB"}]})
@example({"keys": [{"kty": "EC", "crv": "P-256", "x": "AQ", "y": "AQ"}]})
@example({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "é"}]})
@example({"keys": [{"kty": "oct", "k": b64url(bytes(32))}, {"kty": "OKP"}]})
@example({"keys": [{"kty": []}]})
@example({"keys": [{"kty": "oct", "k": b64url(bytes(32))}]})  # an HMAC secret in a JWKS
@example({"keys": "not a list"})
@example([{"kty": "oct"}])
def test_from_jwks_only_raises_invalid_request(doc: Any) -> None:
    try:
        ring = KeyRing.from_jwks(doc)
    except InvalidRequest:
        return
    assert isinstance(ring, KeyRing)
    assert all(not key.private for key in ring)  # a JWKS never yields a secret


def test_from_jwks_refuses_private_keys_but_loads_public_ones() -> None:
    # The control for the property above: real JWKS documents do load.
    ring = KeyRing.generate("EdDSA")
    ring.add(KeyRing.generate("ES256").active)
    assert len(KeyRing.from_jwks(ring.jwks())) == 2
    private = {"keys": [ring.active.to_jwk(private=True)]}
    with pytest.raises(InvalidRequest):
        KeyRing.from_jwks(private)


@pytest.mark.parametrize("kty", [[], ["RSA"], {}, {"kty": "oct"}], ids=repr)
def test_from_jwks_unhashable_kty(kty: object) -> None:
    # Once a TypeError from the loader table lookup; the property above found it.
    with pytest.raises(InvalidRequest):
        KeyRing.from_jwks({"keys": [{"kty": kty}]})


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    st.binary(max_size=400)
    | jwks_like.map(lambda doc: json.dumps(doc).encode())
    | st.text(max_size=200).map(str.encode)
)
@example(b'{"keys": [], "keys": []}')
@example(b'{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": NaN}]}')
@example(b"\xff\xfe{}")
@example(b"[" * 5000)
def test_jwks_bytes_only_raise_key_source_error(body: bytes) -> None:
    """What a JWKS URL or file serves: anything but a public JWKS is a KeySourceError."""
    try:
        ring = parse_jwks(body, "https://issuer.example/jwks.json")
    except KeySourceError:
        return
    assert all(not key.private for key in ring)


# -- policy files ---------------------------------------------------------------------
TOML_PIECES = [
    "[[rule]]\n",
    "[rule]\n",
    "rules = ",
    'subjects = ["svc:*"]\n',
    'audiences = ["api"]\n',
    'scopes = ["read"]\n',
    "max_ttl = ",
    "renewable = ",
    "[",
    "]",
    "{",
    "}",
    ",",
    "=",
    "\n",
    '"x"',
    "'x'",
    '"""x"""',
    "1",
    "-1",
    "1e400",
    "nan",
    "inf",
    "true",
    "1979-05-27",
    "1979-05-27T07:32:00Z",
    "07:32:00",
    "0x10",
    '"\\ud800"',
    "\u00e9",
    "#",
]
toml_like = st.lists(st.sampled_from(TOML_PIECES), max_size=24).map("".join)


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("policy") / "policy.toml"


# Regression: tomllib's UnicodeDecodeError (bytes that are not UTF-8) and
# RecursionError (deeply nested arrays) once escaped as they were.
@settings(
    max_examples=300, deadline=None, derandomize=True, database=None, report_multiple_bugs=False
)
@given(st.binary(max_size=400) | toml_like.map(str.encode) | st.text(max_size=200).map(str.encode))
@example(b'[[rule]]\nsubjects = ["*"]\naudiences = ["api"]\n')  # a valid policy
@example(b"\xff\xfe[[rule]]")
@example(b"a = " + b"[" * 1000 + b"]" * 1000)
def test_from_toml_only_raises_invalid_request(policy_file: Path, body: bytes) -> None:
    """Whatever a policy file holds, loading it raises InvalidRequest or succeeds."""
    policy_file.write_bytes(body)
    try:
        policy = Policy.from_toml(policy_file)
    except InvalidRequest:
        return
    assert isinstance(policy, Policy)
