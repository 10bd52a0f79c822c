"""Request validation: bad arguments raise InvalidRequest naming the field to fix."""

from __future__ import annotations

import gc
import itertools
import math
import tracemalloc
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jitbroker import Broker, KeyRing, MemoryStore, Verifier, validate
from jitbroker.errors import InvalidRequest, JitBrokerError, MalformedToken
from jitbroker.testing import TEST_ISSUER, FakeClock
from jitbroker.tokens import MAX_TOKEN_LENGTH, encode_jws
from jitbroker.verify import DEFAULT_MAX_TTL

ISSUE: dict[str, Any] = {
    "subject": "svc:ci-deploy",
    "audience": "db:orders",
    "scopes": ["orders:read"],
    "ttl": 60,
}


def refused(broker: Broker, field: str, **overrides: Any) -> InvalidRequest:
    """Issue with ``overrides``; assert it is refused and the message names ``field``."""
    stored = len(list(broker.leases(include_inactive=True)))
    with pytest.raises(InvalidRequest) as info:
        broker.issue(**{**ISSUE, **overrides})
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, JitBrokerError)
    assert field in str(info.value), str(info.value)
    assert len(list(broker.leases(include_inactive=True))) == stored, "nothing may be stored"
    return info.value


def test_valid_request_is_issued(jitbroker_broker: Broker) -> None:
    cred = jitbroker_broker.issue(**ISSUE)
    assert cred.lease.subject == "svc:ci-deploy"
    assert cred.lease.scopes == ("orders:read",)


# -- text fields ------------------------------------------------------------------
@pytest.mark.parametrize("subject", ["", " ", "   ", "\t", "\u3000"])
def test_empty_or_blank_subject(jitbroker_broker: Broker, subject: str) -> None:
    refused(jitbroker_broker, "subject", subject=subject)


@pytest.mark.parametrize("subject", [None, 42, b"svc:ci", ["svc:ci"], 1.5])
def test_non_str_subject(jitbroker_broker: Broker, subject: object) -> None:
    error = refused(jitbroker_broker, "subject", subject=subject)
    assert "must be a string" in str(error)


@pytest.mark.parametrize("field", ["subject", "audience", "owner", "task", "purpose"])
@pytest.mark.parametrize("char", ["\x00", "\n", "\x1b", "\r", "\x7f", "\u202e"], ids=repr)
def test_control_characters(jitbroker_broker: Broker, field: str, char: str) -> None:
    error = refused(jitbroker_broker, field, **{field: f"abc{char}def"})
    assert "control" in str(error)


@pytest.mark.parametrize("field", ["owner", "task", "purpose"])
@pytest.mark.parametrize("value", ["", "  ", 7])
def test_optional_text_must_be_text_when_given(
    jitbroker_broker: Broker, field: str, value: object
) -> None:
    refused(jitbroker_broker, field, **{field: value})


def test_optional_text_may_be_none(jitbroker_broker: Broker) -> None:
    lease = jitbroker_broker.issue(**ISSUE, owner=None, task=None, purpose=None).lease
    assert (lease.owner, lease.task, lease.purpose) == (None, None, None)


def test_subject_too_long(jitbroker_broker: Broker) -> None:
    error = refused(jitbroker_broker, "subject", subject="s" * 257)
    assert "256" in str(error)
    assert jitbroker_broker.issue(**{**ISSUE, "subject": "s" * 256}).lease.subject == "s" * 256


@pytest.mark.parametrize("field", ["audience", "owner", "task"])
def test_other_text_too_long(jitbroker_broker: Broker, field: str) -> None:
    refused(jitbroker_broker, field, **{field: "x" * 257})


def test_purpose_allows_longer_text(jitbroker_broker: Broker) -> None:
    assert jitbroker_broker.issue(**ISSUE, purpose="p" * 1024).lease.purpose == "p" * 1024
    refused(jitbroker_broker, "purpose", purpose="p" * 1025)


def test_unicode_text_is_fine(jitbroker_broker: Broker) -> None:
    lease = jitbroker_broker.issue(**ISSUE, owner="zoë@example.com", purpose="nächtlich").lease
    assert lease.owner == "zoë@example.com"


# -- ttl ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ttl",
    [
        0,
        -1,
        0.0,
        -0.0,
        -0.5,
        timedelta(0),
        timedelta(seconds=-5),
        math.nan,
        math.inf,
        -math.inf,
        True,
        False,
        "60",
        b"60",
        [60],
    ],
    ids=repr,
)
def test_bad_ttl(jitbroker_broker: Broker, ttl: object) -> None:
    refused(jitbroker_broker, "ttl", ttl=ttl)


def test_ttl_over_max_ttl(jitbroker_broker: Broker) -> None:
    error = refused(jitbroker_broker, "ttl", ttl=3601)
    assert "3600" in str(error)
    refused(jitbroker_broker, "ttl", ttl=timedelta(hours=2))


def test_huge_int_ttl(jitbroker_broker: Broker) -> None:
    refused(jitbroker_broker, "ttl", ttl=10**400)


def test_max_ttl_shorter_than_ttl(jitbroker_broker: Broker) -> None:
    error = refused(jitbroker_broker, "max_ttl", ttl=60, max_ttl=30)
    assert "ttl" in str(error)


def test_max_ttl_over_broker_max(jitbroker_broker: Broker) -> None:
    refused(jitbroker_broker, "max_ttl", ttl=60, max_ttl=7200)


@pytest.mark.parametrize("max_ttl", [0, -1, math.nan, True, "90"], ids=repr)
def test_bad_max_ttl(jitbroker_broker: Broker, max_ttl: object) -> None:
    refused(jitbroker_broker, "max_ttl", max_ttl=max_ttl)


@pytest.mark.parametrize("renewable", [1, 0, "yes", None, "False"], ids=repr)
def test_renewable_not_a_bool(jitbroker_broker: Broker, renewable: object) -> None:
    refused(jitbroker_broker, "renewable", renewable=renewable)


def test_timedelta_ttl(jitbroker_broker: Broker, jitbroker_clock: FakeClock) -> None:
    lease = jitbroker_broker.issue(**{**ISSUE, "ttl": timedelta(minutes=1, seconds=30)}).lease
    assert lease.issued_at == jitbroker_clock()
    assert lease.expires_at - lease.issued_at == 90


def test_float_ttl(jitbroker_broker: Broker, jitbroker_clock: FakeClock) -> None:
    lease = jitbroker_broker.issue(**{**ISSUE, "ttl": 12.5}).lease
    assert lease.expires_at == jitbroker_clock() + 12.5


def test_default_ttl(jitbroker_broker: Broker, jitbroker_clock: FakeClock) -> None:
    lease = jitbroker_broker.issue(**{**ISSUE, "ttl": None}).lease
    assert lease.expires_at == jitbroker_clock() + 300


def test_ttl_equal_to_max_ttl(jitbroker_broker: Broker, jitbroker_clock: FakeClock) -> None:
    lease = jitbroker_broker.issue(**{**ISSUE, "ttl": 3600}).lease
    assert lease.expires_at == jitbroker_clock() + 3600


def test_max_ttl_caps_lifetime(jitbroker_broker: Broker, jitbroker_clock: FakeClock) -> None:
    lease = jitbroker_broker.issue(**ISSUE, max_ttl=timedelta(minutes=2)).lease
    assert lease.max_expires_at == jitbroker_clock() + 120
    fixed = jitbroker_broker.issue(**ISSUE, renewable=False).lease
    assert fixed.max_expires_at == fixed.expires_at


# -- scopes -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "scopes",
    [["orders read"], ["orders:read", "a\tb"], ["x\ny"], ("orders:read ",), [" orders"]],
    ids=repr,
)
def test_whitespace_inside_a_scope(jitbroker_broker: Broker, scopes: list[str]) -> None:
    refused(jitbroker_broker, "scope", scopes=scopes)


@pytest.mark.parametrize(
    "scopes", [[1], ["orders:read", None], [b"orders:read"], [["orders:read"]]], ids=repr
)
def test_non_string_scopes(jitbroker_broker: Broker, scopes: list[object]) -> None:
    error = refused(jitbroker_broker, "scope", scopes=scopes)
    assert "must be a string" in str(error)


@pytest.mark.parametrize(
    "scopes",
    [b"orders:read", bytearray(b"orders:read"), {"orders:read": True}, 42, None],
    ids=repr,
)
def test_scopes_of_the_wrong_type(jitbroker_broker: Broker, scopes: object) -> None:
    refused(jitbroker_broker, "scopes", scopes=scopes)


@pytest.mark.parametrize(
    "scopes", ["orders:read  orders:write", "orders:read ", " orders:read", " "], ids=repr
)
def test_empty_scope_in_string_form(jitbroker_broker: Broker, scopes: str) -> None:
    error = refused(jitbroker_broker, "scope", scopes=scopes)
    assert "empty scope" in str(error)


def test_empty_scope_in_list_form(jitbroker_broker: Broker) -> None:
    refused(jitbroker_broker, "scope", scopes=["orders:read", ""])


@pytest.mark.parametrize(
    "scope", ['orders:"read"', "orders\\read", "ordérs", "orders\x00"], ids=repr
)
def test_scope_with_forbidden_characters(jitbroker_broker: Broker, scope: str) -> None:
    refused(jitbroker_broker, "scope", scopes=[scope])
    refused(jitbroker_broker, "scope", scopes=f"orders:write {scope}")


def test_too_many_scopes(jitbroker_broker: Broker) -> None:
    error = refused(jitbroker_broker, "scopes", scopes=[f"s{i}" for i in range(65)])
    assert "64" in str(error)
    cred = jitbroker_broker.issue(**{**ISSUE, "scopes": [f"s{i}" for i in range(64)]})
    assert len(cred.lease.scopes) == 64


def test_scope_too_long(jitbroker_broker: Broker) -> None:
    error = refused(jitbroker_broker, "scope", scopes=["s" * 129])
    assert "128" in str(error)
    assert jitbroker_broker.issue(**{**ISSUE, "scopes": ["s" * 128]}).lease.scopes == ("s" * 128,)


def test_scopes_string_equals_list(jitbroker_broker: Broker) -> None:
    as_list = jitbroker_broker.issue(**{**ISSUE, "scopes": ["orders:write", "orders:read"]})
    as_str = jitbroker_broker.issue(**{**ISSUE, "scopes": "orders:write orders:read"})
    assert as_list.lease.scopes == as_str.lease.scopes == ("orders:read", "orders:write")


def test_scopes_deduplicated_and_sorted(jitbroker_broker: Broker) -> None:
    cred = jitbroker_broker.issue(**{**ISSUE, "scopes": ["b", "a", "c", "a", "b"]})
    assert cred.lease.scopes == ("a", "b", "c")
    claims = jitbroker_broker.verify(cred.token, audience="db:orders")
    assert claims.raw["scope"] == "a b c"
    dup = jitbroker_broker.issue(**{**ISSUE, "scopes": "z y z"})
    assert dup.lease.scopes == ("y", "z")


@pytest.mark.parametrize(
    "scopes", [(), [], "", iter(["orders:read"]), {"orders:read"}, frozenset({"a", "b"})]
)
def test_other_scope_iterables(jitbroker_broker: Broker, scopes: Any) -> None:
    expected = tuple(sorted(scopes)) if isinstance(scopes, set | frozenset) else None
    lease = jitbroker_broker.issue(**{**ISSUE, "scopes": scopes}).lease
    if expected is not None:
        assert lease.scopes == expected
    assert all(isinstance(s, str) for s in lease.scopes)


def test_refused_scope_is_not_remembered(jitbroker_broker: Broker) -> None:
    # The normalization memo must never turn a refusal into an acceptance.
    for _ in range(2):
        refused(jitbroker_broker, "scope", scopes=["orders read"])
        refused(jitbroker_broker, "scopes", scopes=[f"s{i}" for i in range(65)])


# -- bounded raw input (issue 15) ----------------------------------------------------
def traced_growth(action: Callable[[], object], times: int) -> int:
    """Bytes still allocated after ``action`` ran ``times`` (its results dropped)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(times):
            action()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("form", ["list", "str", "iterator"])
def test_repeated_scopes_are_refused_and_never_kept(form: str) -> None:
    """One scope repeated 100,000 times is not "one scope": the raw count is
    bounded before de-duplication, and nothing of the input stays in a memo."""
    counter = iter(range(10**6))

    def request() -> None:
        scope = f"orders:read{next(counter)}"  # a new one each time: no memo hit hides a leak
        raw: object = {
            "list": [scope] * 100_000,
            "str": " ".join([scope] * 100_000),
            "iterator": itertools.repeat(scope),  # endless: must not be drained
        }[form]
        with pytest.raises(InvalidRequest, match="limit is") as info:
            validate.scopes(raw)
        assert "64" in str(info.value) or str(validate.MAX_SCOPE_CHARS) in str(info.value)

    assert traced_growth(request, 20) < 64 * 1024


def test_an_over_long_scope_string_is_refused_before_it_is_split() -> None:
    huge = "a " * 5_000_000  # split, this would be a list of 5 million strings (~300 MB)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        with pytest.raises(InvalidRequest, match=r"scopes is 10000000 characters; the limit is"):
            validate.scopes(huge)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    longest = " ".join(["s" * validate.MAX_SCOPE_LEN] * validate.MAX_SCOPES)
    assert len(longest) == validate.MAX_SCOPE_CHARS
    assert len(validate.scopes(longest)) == 1
    with pytest.raises(InvalidRequest, match="characters; the limit is"):
        validate.scopes(longest + " ")


def test_sixty_four_repeats_still_count_as_one_scope() -> None:
    assert validate.scopes(["a"] * validate.MAX_SCOPES) == ("a",)
    with pytest.raises(InvalidRequest, match="65 scopes given"):
        validate.scopes(["a"] * (validate.MAX_SCOPES + 1))
    with pytest.raises(InvalidRequest, match="65 scopes given"):
        validate.scopes(" ".join(["a"] * (validate.MAX_SCOPES + 1)))


def test_large_valid_scope_lists_are_not_memoized() -> None:
    """The memo is for the hot path's few short scopes: a large valid list (64
    scopes of 128 characters, 8 KiB) is validated every time, never kept."""
    counter = iter(range(10**6))

    def request() -> None:
        n = next(counter)
        validate.scopes([f"{n:08d}{i:02d}".ljust(validate.MAX_SCOPE_LEN, "x") for i in range(64)])

    assert traced_growth(request, 300) < 64 * 1024  # memoized, it would be ~3 MiB
    assert validate.scopes(["orders:read"]) == ("orders:read",)
    assert ("orders:read",) in validate._scope_memo  # the common case still is


def test_text_memo_keeps_only_short_strings() -> None:
    counter = iter(range(10**6))

    def request() -> None:
        validate.text(f"svc:{next(counter):08d}".ljust(validate.MAX_TEXT, "x"), "subject")

    assert traced_growth(request, 500) < 64 * 1024  # memoized, it would be ~160 KiB
    assert validate.text("svc:ci-deploy", "subject") == "svc:ci-deploy"
    assert "svc:ci-deploy" in validate._text_memo


def test_scope_memo_keeps_only_plain_str() -> None:
    """A str subclass that lies about equality must not poison another caller's
    scopes through the memo."""

    class Liar(str):
        def __eq__(self, other: object) -> bool:
            return True

        def __hash__(self) -> int:
            return hash("orders:read")

    validate._scope_memo.clear()
    assert "".join(validate.scopes([Liar("admin:all")])) == "admin:all"
    honest = validate.scopes(["orders:read"])
    assert [type(s) for s in honest] == [str]
    assert "".join(honest) == "orders:read"


MAX_SCOPES_OF_MAX_LENGTH = [f"{i:02d}".ljust(validate.MAX_SCOPE_LEN, "s") for i in range(64)]


def test_issue_refuses_a_token_no_verifier_accepts(jitbroker_broker: Broker) -> None:
    """Every input within its own limit, together too large for a token: refused
    at issue (nothing stored), naming the inputs to shorten, not minted to fail
    every verification."""
    error = refused(
        jitbroker_broker,
        "scopes",
        scopes=MAX_SCOPES_OF_MAX_LENGTH,
        subject="svc:" + "s" * 250,
        owner="o" * 256,
        purpose="p" * 1024,
    )
    assert f"more than the {MAX_TOKEN_LENGTH}" in str(error)
    assert "purpose" in str(error)
    # The same scopes fit when the rest is short, and that token verifies.
    fits = [s[:84] for s in MAX_SCOPES_OF_MAX_LENGTH]
    cred = jitbroker_broker.issue(**{**ISSUE, "scopes": fits})
    assert len(cred.token) <= MAX_TOKEN_LENGTH
    assert jitbroker_broker.verify(cred.token, audience="db:orders", scopes=fits)


def test_opaque_tokens_carry_any_valid_request(jitbroker_clock: FakeClock) -> None:
    """An opaque token is 68 characters whatever the lease holds: nothing to refuse."""
    broker = Broker(
        issuer=TEST_ISSUER, keys=KeyRing.generate(), clock=jitbroker_clock, token_format="opaque"
    )
    cred = broker.issue(
        **{**ISSUE, "scopes": MAX_SCOPES_OF_MAX_LENGTH}, owner="o" * 256, purpose="p" * 1024
    )
    assert broker.verify(cred.token, audience="db:orders", scopes=MAX_SCOPES_OF_MAX_LENGTH)


def test_attenuation_refuses_a_token_no_verifier_accepts(jitbroker_broker: Broker) -> None:
    """A delegated token adds an act claim: the same refusal, before the child is stored."""
    scopes = [s[:84] for s in MAX_SCOPES_OF_MAX_LENGTH]
    parent = jitbroker_broker.issue(**{**ISSUE, "scopes": scopes, "subject": "s" * 200})
    assert MAX_TOKEN_LENGTH - 400 < len(parent.token) <= MAX_TOKEN_LENGTH  # a near-full token
    with pytest.raises(InvalidRequest, match=r"shorten the largest inputs: scopes .*delegation"):
        jitbroker_broker.attenuate(parent, subject="c" * 256)  # its act claim tips it over
    assert [lease.id for lease in jitbroker_broker.leases()] == [parent.lease_id]
    child = jitbroker_broker.attenuate(parent, subject="c")
    assert jitbroker_broker.verify(child.token, audience="db:orders").actor == "c"


_TEXT = st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "S"]), min_size=1)
_SCOPE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters='"\\'))


@settings(max_examples=150, deadline=None)
@given(
    subject=_TEXT.map(lambda t: t[: validate.MAX_TEXT]),
    subject_repeat=st.integers(1, 256),
    owner=st.none() | _TEXT.map(lambda t: (t * 256)[: validate.MAX_TEXT]),
    purpose=st.none() | st.integers(1, validate.MAX_PURPOSE).map(lambda n: "p" * n),
    scope_count=st.integers(0, validate.MAX_SCOPES),
    scope_len=st.integers(1, validate.MAX_SCOPE_LEN),
    seed=_SCOPE.filter(bool),
)
def test_every_token_issue_accepts_verifies(
    subject: str,
    subject_repeat: int,
    owner: str | None,
    purpose: str | None,
    scope_count: int,
    scope_len: int,
    seed: str,
) -> None:
    """Property: for inputs each within its own limit, issue either refuses with
    InvalidRequest naming the token size, or hands out a token that verifies."""
    broker = _PROPERTY_BROKER
    scopes = [(f"{i:02d}{seed}" * scope_len)[:scope_len] for i in range(scope_count)]
    scopes = [s for s in scopes if s] or ["s"]
    subject = (subject * subject_repeat)[: validate.MAX_TEXT]
    refusal: str | None
    try:
        cred = broker.issue(subject, "db:orders", scopes, 60, owner=owner, purpose=purpose)
    except InvalidRequest as exc:
        refusal = str(exc)
    else:
        refusal = None
    if refusal is not None:  # refused for its size, and for nothing else
        assert f"more than the {MAX_TOKEN_LENGTH}" in refusal
        return
    claims = broker.verify(cred.token, audience="db:orders", scopes=cred.lease.scopes)
    assert claims.lease_id == cred.lease_id
    assert claims.subject == subject


_PROPERTY_BROKER = Broker(issuer=TEST_ISSUER, keys=KeyRing.generate(), max_ttl=3600)


# -- Broker construction -------------------------------------------------------------
def make_broker(**options: Any) -> Broker:
    return Broker(**{"issuer": TEST_ISSUER, "keys": KeyRing.generate(), **options})


@pytest.mark.parametrize("leeway", [61, 60.5, timedelta(minutes=2), -1, math.nan, math.inf])
def test_broker_bad_leeway(leeway: object) -> None:
    with pytest.raises(InvalidRequest, match="leeway"):
        make_broker(leeway=leeway)


@pytest.mark.parametrize("leeway", [0, 60, timedelta(seconds=30), 2.5])
def test_broker_good_leeway(leeway: object) -> None:
    make_broker(leeway=leeway).close()


def test_broker_default_ttl_over_max_ttl() -> None:
    with pytest.raises(InvalidRequest, match="default_ttl"):
        make_broker(default_ttl=600, max_ttl=300)


@pytest.mark.parametrize(("name", "value"), [("default_ttl", 0), ("max_ttl", -5)])
def test_broker_bad_ttls(name: str, value: object) -> None:
    with pytest.raises(InvalidRequest, match=name):
        make_broker(**{name: value})


@pytest.mark.parametrize("token_format", ["jwt", "JWS", "", None, "opaque "])
def test_broker_bad_token_format(token_format: object) -> None:
    with pytest.raises(InvalidRequest, match="token_format"):
        make_broker(token_format=token_format)


@pytest.mark.parametrize(
    "keys", ["secret", b"0" * 32, {"keys": []}, object()], ids=["str", "bytes", "jwks", "object"]
)
def test_broker_keys_not_a_keyring(keys: object) -> None:
    with pytest.raises(InvalidRequest, match="KeyRing"):
        make_broker(keys=keys)


def test_broker_verify_only_keyring() -> None:
    verify_only = KeyRing.from_jwks(KeyRing.generate().jwks())
    with pytest.raises(InvalidRequest, match="cannot sign"):
        make_broker(keys=verify_only)
    with pytest.raises(InvalidRequest, match="cannot sign"):
        make_broker(keys=KeyRing())


@pytest.mark.parametrize("issuer", ["", " ", "urn:\nx", 5])
def test_broker_bad_issuer(issuer: object) -> None:
    with pytest.raises(InvalidRequest, match="issuer"):
        make_broker(issuer=issuer)


def test_broker_policy_must_be_a_policy() -> None:
    with pytest.raises(InvalidRequest, match="policy"):
        make_broker(policy=[])


# -- Verifier construction and audience ------------------------------------------------
def test_verifier_needs_store_or_offline() -> None:
    with pytest.raises(InvalidRequest, match="offline=True"):
        Verifier(KeyRing.generate().jwks(), issuer=TEST_ISSUER)


def test_verifier_store_and_offline_contradict() -> None:
    with pytest.raises(InvalidRequest, match="offline"):
        Verifier(KeyRing.generate().jwks(), issuer=TEST_ISSUER, store=MemoryStore(), offline=True)


@pytest.mark.parametrize("leeway", [120, 60.5, -1, math.nan, math.inf, timedelta(minutes=2)])
def test_verifier_bad_leeway(leeway: object) -> None:
    with pytest.raises(InvalidRequest, match="leeway"):
        Verifier(KeyRing.generate().jwks(), issuer=TEST_ISSUER, offline=True, leeway=leeway)  # type: ignore[arg-type]


# -- the lifetime cap of a standalone Verifier ------------------------------------------
def long_lived_token(ring: KeyRing, clock: FakeClock, lifetime: int) -> str:
    """A token signed with the ring directly, as a leaked key could sign one."""
    now = int(clock())
    claims = {
        "iss": TEST_ISSUER,
        "sub": "svc:a",
        "aud": "api",
        "jti": "0" * 32,
        "iat": now,
        "nbf": now,
        "exp": now + lifetime,
        "scope": "",
    }
    return encode_jws(ring.active, claims)


def test_offline_verifier_caps_token_lifetime_by_default(jitbroker_clock: FakeClock) -> None:
    ring = KeyRing.generate()
    verifier = Verifier(
        ring.jwks(), issuer=TEST_ISSUER, audience="api", offline=True, clock=jitbroker_clock
    )
    assert verifier.max_ttl == DEFAULT_MAX_TTL == 3601
    with pytest.raises(MalformedToken, match="lifetime"):
        verifier.verify(long_lived_token(ring, jitbroker_clock, 10**8))
    with pytest.raises(MalformedToken, match="lifetime"):
        verifier.verify(long_lived_token(ring, jitbroker_clock, 3602))
    assert verifier.verify(long_lived_token(ring, jitbroker_clock, 3601)).subject == "svc:a"


def test_default_verifier_accepts_a_default_broker_token(jitbroker_clock: FakeClock) -> None:
    broker = Broker(issuer=TEST_ISSUER, clock=jitbroker_clock)
    cred = broker.issue("svc:a", "api", ttl=3600)
    verifier = Verifier(broker.jwks(), issuer=TEST_ISSUER, offline=True, clock=jitbroker_clock)
    assert verifier.verify(cred.token, audience="api").lease_id == cred.lease_id


def test_a_larger_max_ttl_is_an_explicit_choice(jitbroker_clock: FakeClock) -> None:
    ring = KeyRing.generate()
    verifier = Verifier(
        ring.jwks(),
        issuer=TEST_ISSUER,
        audience="api",
        offline=True,
        max_ttl=timedelta(days=2),
        clock=jitbroker_clock,
    )
    assert verifier.verify(long_lived_token(ring, jitbroker_clock, 86_400)).subject == "svc:a"
    with pytest.raises(MalformedToken, match="lifetime"):
        verifier.verify(long_lived_token(ring, jitbroker_clock, 10**8))


@pytest.mark.parametrize("max_ttl", [None, 0, -1, math.nan, math.inf, "3600"])
def test_verifier_refuses_an_unbounded_or_bad_max_ttl(max_ttl: object) -> None:
    with pytest.raises(InvalidRequest, match="max_ttl"):
        Verifier(KeyRing.generate().jwks(), issuer=TEST_ISSUER, offline=True, max_ttl=max_ttl)  # type: ignore[arg-type]


def test_verify_without_any_audience(jitbroker_broker: Broker, jitbroker_clock: FakeClock) -> None:
    cred = jitbroker_broker.issue(**ISSUE)
    verifier = Verifier(
        jitbroker_broker.jwks(), issuer=TEST_ISSUER, offline=True, clock=jitbroker_clock
    )
    with pytest.raises(InvalidRequest, match="audience"):
        verifier.verify(cred.token)
    online = Verifier(
        jitbroker_broker.keys, issuer=TEST_ISSUER, store=MemoryStore(), clock=jitbroker_clock
    )
    with pytest.raises(InvalidRequest, match="audience"):
        online.verify(cred.token)
    with pytest.raises(InvalidRequest, match="audience"):
        jitbroker_broker.verify(cred.token, audience=None)  # type: ignore[arg-type]


def test_verifier_default_audience(jitbroker_broker: Broker, jitbroker_clock: FakeClock) -> None:
    cred = jitbroker_broker.issue(**ISSUE)
    verifier = Verifier(
        jitbroker_broker.jwks(),
        issuer=TEST_ISSUER,
        audience="db:orders",
        offline=True,
        clock=jitbroker_clock,
    )
    assert verifier.verify(cred.token).lease_id == cred.lease_id


# -- the memo of validated text, and the fast value builders --------------------
def test_text_memo_never_widens_a_smaller_limit() -> None:
    from jitbroker import validate

    value = "x" * 120  # short enough to be memoized
    assert validate.text(value, "subject") == value  # now memoized
    assert value in validate._text_memo
    with pytest.raises(InvalidRequest, match="limit is 100"):
        validate.text(value, "field", limit=100)


def test_text_memo_hands_back_a_plain_str() -> None:
    from jitbroker import validate

    class Sneaky(str):
        def __eq__(self, other: object) -> bool:
            return True

        def __hash__(self) -> int:
            return hash("svc:memo")

    validate.text("svc:memo", "subject")
    got = validate.text(Sneaky("\x00 not printable"), "subject")
    assert type(got) is str  # the validated value, not the caller's
    assert got == "svc:memo"
    fresh = type("Plain", (str,), {})("svc:other-subclass")
    assert validate.text(fresh, "subject") is fresh  # validated, but never memoized
    assert all(type(v) is str for v in validate._text_memo.values())


def test_text_memo_is_bounded() -> None:
    from jitbroker import validate

    for i in range(validate._MEMO_MAX + 10):
        validate.text(f"task-{i}", "task")
    assert len(validate._text_memo) <= validate._MEMO_MAX


def test_fast_builders_make_the_real_values() -> None:
    import pickle

    import attrs

    from jitbroker.lease import Credential, Lease, new_credential, new_lease

    args = ("0" * 32, "svc:a", "api", ("read",), 1.0, 2.0, 3.0, "kid", "t", "o", "p", None, True)
    built = new_lease(*args)
    assert type(built) is Lease
    assert built == Lease(*args)
    assert hash(built) == hash(Lease(*args))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        built.subject = "svc:other"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(built)) == built  # noqa: S301 - our own bytes
    cred = new_credential("secret-token", built, None)
    assert type(cred) is Credential
    assert cred == Credential("secret-token", built, None)
    assert "secret-token" not in repr(cred)
