"""The lease lifecycle through the synchronous ``Broker``.

Issue, verify, renew, revoke, attenuate, tasks, listing, expiry and purging,
on the plugin's fixtures (a ``FakeClock``, a ``MemoryStore`` and a broker on
them), plus the opaque token format and freezegun-driven time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from datetime import timedelta
from typing import Any

import attrs
import jwt
import pytest
from freezegun import freeze_time

from jitbroker import (
    Broker,
    Claims,
    Credential,
    InvalidRequest,
    KeyRing,
    Lease,
    LeaseFilter,
    MemoryStore,
)
from jitbroker.errors import (
    LeaseNotActive,
    LeaseNotFound,
    RenewalDenied,
    TokenExpired,
    TokenRevoked,
    UnknownLease,
)
from jitbroker.stores.base import Quota
from jitbroker.testing import TEST_ISSUER, FakeClock

SUBJECT = "svc:ci-deploy"
AUDIENCE = "db:orders"
SCOPES = ["orders:read", "orders:write"]
OWNER = "alice@example.com"
LEEWAY = 5  # the broker's default


# -- helpers ----------------------------------------------------------------
def payload(token: str) -> dict[str, Any]:
    """The token's claims, decoded by PyJWT without checking anything."""
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


def issue(broker: Broker, **kw: Any) -> Credential:
    kw.setdefault("subject", SUBJECT)
    kw.setdefault("audience", AUDIENCE)
    kw.setdefault("scopes", SCOPES)
    kw.setdefault("ttl", 60)
    return broker.issue(**kw)


def is_active(broker: Broker, cred: Credential) -> bool:
    return broker.lease(cred).is_active(broker.clock())


def stored(store: MemoryStore, cred: Credential) -> Lease:
    lease = store.get(cred.lease_id)
    assert lease is not None
    return lease


# -- issue ------------------------------------------------------------------
def test_issue_stores_the_lease_before_returning(
    jitbroker_broker: Broker, jitbroker_store: MemoryStore, jitbroker_clock: FakeClock
) -> None:
    cred = issue(jitbroker_broker, task="job-42", owner=OWNER, purpose="nightly export")
    assert isinstance(cred, Credential)
    assert jitbroker_store.get(cred.lease_id) == cred.lease
    assert cred.lease.id == cred.lease_id
    now = jitbroker_clock()
    assert cred.lease.issued_at == now
    assert cred.expires_at == now + 60
    assert cred.lease.subject == SUBJECT
    assert cred.lease.audience == AUDIENCE
    assert cred.lease.scopes == ("orders:read", "orders:write")
    assert cred.lease.key_id == jitbroker_broker.keys.active.kid


def test_issue_adds_the_lease_to_the_store_once(
    jitbroker_keys: KeyRing, jitbroker_clock: FakeClock
) -> None:
    seen: list[str] = []

    class Watching(MemoryStore):
        def add(self, lease: Lease, quotas: Sequence[Quota] = (), **kw: Any) -> bool:
            seen.append(lease.id)
            return super().add(lease, quotas, **kw)

    store = Watching()
    broker = Broker(issuer=TEST_ISSUER, keys=jitbroker_keys, store=store, clock=jitbroker_clock)
    cred = issue(broker)
    assert seen == [cred.lease_id]
    assert store.get(cred.lease_id) == cred.lease


def test_issue_fails_without_a_token_when_the_store_fails(
    jitbroker_keys: KeyRing, jitbroker_clock: FakeClock
) -> None:
    class Broken(MemoryStore):
        def add(self, lease: Lease, quotas: Sequence[Quota] = (), **kw: Any) -> bool:
            raise RuntimeError("disk on fire")

    store = Broken()
    broker = Broker(issuer=TEST_ISSUER, keys=jitbroker_keys, store=store, clock=jitbroker_clock)
    with pytest.raises(RuntimeError, match="disk on fire"):
        issue(broker)
    assert len(store) == 0


def test_token_header_and_jti(jitbroker_broker: Broker) -> None:
    cred = issue(jitbroker_broker)
    header = jwt.get_unverified_header(cred.token)
    assert header["typ"] == "at+jwt"
    assert header["kid"] == jitbroker_broker.keys.active.kid
    assert header["alg"] == "EdDSA"
    assert payload(cred.token)["jti"] == cred.lease_id


def test_token_claims_with_optional_fields(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock
) -> None:
    cred = issue(jitbroker_broker, task="job-42", owner=OWNER, purpose="nightly export")
    now = int(jitbroker_clock())
    assert payload(cred.token) == {
        "iss": TEST_ISSUER,
        "sub": SUBJECT,
        "aud": AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + 60,
        "jti": cred.lease_id,
        "scope": "orders:read orders:write",
        "task": "job-42",
        "owner": OWNER,
        "purpose": "nightly export",
    }


def test_token_claims_without_optional_fields(jitbroker_broker: Broker) -> None:
    claims = payload(issue(jitbroker_broker).token)
    assert set(claims) == {"iss", "sub", "aud", "iat", "nbf", "exp", "jti", "scope"}


def test_token_verifies_with_pyjwt_and_the_public_jwks(jitbroker_broker: Broker) -> None:
    cred = issue(jitbroker_broker)
    jwk = jwt.PyJWKSet.from_dict(jitbroker_broker.jwks())[jitbroker_broker.keys.active.kid]
    decoded = jwt.decode(
        cred.token,
        jwk.key,
        algorithms=["EdDSA"],
        audience=AUDIENCE,
        issuer=TEST_ISSUER,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert decoded["jti"] == cred.lease_id


def test_scopes_as_one_space_delimited_string(jitbroker_broker: Broker) -> None:
    cred = issue(jitbroker_broker, scopes="orders:write orders:read")
    assert cred.lease.scopes == ("orders:read", "orders:write")


# -- verify -----------------------------------------------------------------
def test_verify_returns_typed_claims(jitbroker_broker: Broker, jitbroker_clock: FakeClock) -> None:
    cred = issue(jitbroker_broker, task="job-42", owner=OWNER, purpose="export")
    claims = jitbroker_broker.verify(cred.token, audience=AUDIENCE, scopes=["orders:read"])
    now = int(jitbroker_clock())
    assert isinstance(claims, Claims)
    assert claims.lease_id == cred.lease_id
    assert claims.issuer == TEST_ISSUER
    assert claims.subject == SUBJECT
    assert claims.audience == AUDIENCE
    assert claims.scopes == frozenset(SCOPES)
    assert claims.scope == "orders:read orders:write"
    assert (claims.issued_at, claims.not_before, claims.expires_at) == (now, now, now + 60)
    assert all(type(t) is int for t in (claims.issued_at, claims.not_before, claims.expires_at))
    assert claims.key_id == jitbroker_broker.keys.active.kid
    assert (claims.task, claims.owner, claims.purpose, claims.parent) == (
        "job-42",
        OWNER,
        "export",
        None,
    )
    assert claims.raw["jti"] == cred.lease_id


def test_verify_without_required_scopes(jitbroker_broker: Broker) -> None:
    cred = issue(jitbroker_broker)
    assert jitbroker_broker.verify(cred.token, audience=AUDIENCE).lease_id == cred.lease_id


def test_verify_rejects_an_unknown_lease(
    jitbroker_broker: Broker, jitbroker_store: MemoryStore
) -> None:
    cred = issue(jitbroker_broker)
    # A second broker with the same keys but its own empty store: no lease, no pass.
    other = Broker(
        issuer=TEST_ISSUER, keys=jitbroker_broker.keys, store=MemoryStore(), clock=FakeClock()
    )
    with pytest.raises(UnknownLease):
        other.verify(cred.token, audience=AUDIENCE)


# -- renew ------------------------------------------------------------------
def test_renew_extends_the_lease_with_a_fresh_token(
    jitbroker_broker: Broker, jitbroker_store: MemoryStore, jitbroker_clock: FakeClock
) -> None:
    cred = issue(jitbroker_broker, ttl=60)
    jitbroker_clock.advance(30)
    renewed = jitbroker_broker.renew(cred, ttl=60)
    now = jitbroker_clock()
    assert renewed.lease_id == cred.lease_id
    assert renewed.expires_at == now + 60
    assert renewed.token != cred.token
    assert stored(jitbroker_store, cred).expires_at == now + 60
    claims = payload(renewed.token)
    assert claims["jti"] == cred.lease_id
    assert claims["iat"] == int(now)
    assert claims["exp"] == int(now) + 60
    # Past the first token's expiry, the renewed token still verifies.
    jitbroker_clock.advance(45)
    assert jitbroker_broker.verify(renewed.token, audience=AUDIENCE).lease_id == cred.lease_id


def test_renew_by_lease_id_and_by_token(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock
) -> None:
    cred = issue(jitbroker_broker, ttl=60)
    jitbroker_clock.advance(10)
    by_id = jitbroker_broker.renew(cred.lease_id, ttl=60)
    assert by_id.expires_at == jitbroker_clock() + 60
    jitbroker_clock.advance(10)
    by_token = jitbroker_broker.renew(by_id.token, ttl=60)
    assert by_token.expires_at == jitbroker_clock() + 60


def test_renew_never_shortens(jitbroker_broker: Broker, jitbroker_clock: FakeClock) -> None:
    cred = issue(jitbroker_broker, ttl=60)
    jitbroker_clock.advance(10)
    assert jitbroker_broker.renew(cred, ttl=5).expires_at == cred.expires_at


def test_renew_caps_at_max_ttl_then_denies(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock
) -> None:
    start = jitbroker_clock()
    cred = issue(jitbroker_broker, ttl=60, max_ttl=100)
    assert cred.lease.max_expires_at == start + 100
    jitbroker_clock.advance(30)
    assert jitbroker_broker.renew(cred, ttl=60).expires_at == start + 90
    jitbroker_clock.advance(30)
    capped = jitbroker_broker.renew(cred, ttl=60)
    assert capped.expires_at == start + 100
    assert payload(capped.token)["exp"] == int(start) + 100
    with pytest.raises(RenewalDenied) as info:
        jitbroker_broker.renew(capped, ttl=60)
    assert info.value.lease_id == cred.lease_id
    # a credential behind its lease gets a token at the lease's expiry, never later
    assert jitbroker_broker.renew(cred, ttl=60).expires_at == start + 100


def test_renew_caps_at_the_broker_max_ttl_by_default(jitbroker_clock: FakeClock) -> None:
    broker = Broker(issuer=TEST_ISSUER, clock=jitbroker_clock, default_ttl=60, max_ttl=120)
    start = jitbroker_clock()
    cred = broker.issue(SUBJECT, AUDIENCE, SCOPES, ttl=60)
    jitbroker_clock.advance(50)
    capped = broker.renew(cred, ttl=100)
    assert capped.expires_at == start + 120
    with pytest.raises(RenewalDenied):
        broker.renew(capped, ttl=100)


def test_max_ttl_shorter_than_ttl_is_refused(jitbroker_broker: Broker) -> None:
    with pytest.raises(InvalidRequest):
        issue(jitbroker_broker, ttl=60, max_ttl=30)


def test_renew_of_a_non_renewable_lease_is_denied(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock
) -> None:
    cred = issue(jitbroker_broker, renewable=False)
    assert cred.lease.max_expires_at == cred.expires_at
    jitbroker_clock.advance(10)
    with pytest.raises(RenewalDenied):
        jitbroker_broker.renew(cred, ttl=60)


def test_renew_of_a_revoked_lease(jitbroker_broker: Broker) -> None:
    cred = issue(jitbroker_broker)
    jitbroker_broker.revoke(cred)
    with pytest.raises(LeaseNotActive) as info:
        jitbroker_broker.renew(cred)
    assert info.value.lease_id == cred.lease_id


def test_renew_of_an_expired_lease(jitbroker_broker: Broker, jitbroker_clock: FakeClock) -> None:
    cred = issue(jitbroker_broker, ttl=60)
    jitbroker_clock.advance(60)
    with pytest.raises(LeaseNotActive):
        jitbroker_broker.renew(cred)


def test_renew_of_an_unknown_lease(jitbroker_broker: Broker) -> None:
    with pytest.raises(LeaseNotFound) as info:
        jitbroker_broker.renew("0" * 32)
    assert info.value.lease_id == "0" * 32


# -- revoke -----------------------------------------------------------------
@pytest.mark.parametrize("by", ["credential", "lease id", "token", "lease"])
def test_revoke_by_any_reference(
    jitbroker_broker: Broker, jitbroker_store: MemoryStore, jitbroker_clock: FakeClock, by: str
) -> None:
    cred = issue(jitbroker_broker)
    refs: dict[str, Credential | Lease | str] = {
        "credential": cred,
        "lease id": cred.lease_id,
        "token": cred.token,
        "lease": cred.lease,
    }
    ref = refs[by]
    assert jitbroker_broker.revoke(ref, reason="done") is True
    lease = stored(jitbroker_store, cred)
    assert lease.revoked_at == jitbroker_clock()
    assert lease.revoke_reason == "done"
    with pytest.raises(TokenRevoked) as info:
        jitbroker_broker.verify(cred.token, audience=AUDIENCE)
    assert info.value.reason == "done"
    assert info.value.lease_id == cred.lease_id


def test_revoke_is_idempotent(jitbroker_broker: Broker, jitbroker_store: MemoryStore) -> None:
    cred = issue(jitbroker_broker)
    assert jitbroker_broker.revoke(cred, reason="first") is True
    assert jitbroker_broker.revoke(cred, reason="second") is False
    assert jitbroker_broker.revoke(cred.token) is False
    assert stored(jitbroker_store, cred).revoke_reason == "first"


def test_revoke_returns_false_without_a_transition(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock
) -> None:
    assert jitbroker_broker.revoke("f" * 32) is False  # unknown
    expired = issue(jitbroker_broker, ttl=10)
    jitbroker_clock.advance(11)
    assert jitbroker_broker.revoke(expired) is False  # already dead


def test_revoke_default_reason(jitbroker_broker: Broker) -> None:
    cred = issue(jitbroker_broker)
    jitbroker_broker.revoke(cred)
    assert jitbroker_broker.lease(cred).revoke_reason == "revoked"


def test_revoking_one_lease_leaves_the_others(jitbroker_broker: Broker) -> None:
    a, b = issue(jitbroker_broker), issue(jitbroker_broker)
    jitbroker_broker.revoke(a)
    assert jitbroker_broker.verify(b.token, audience=AUDIENCE).lease_id == b.lease_id


# -- revoke_where -----------------------------------------------------------
@pytest.fixture
def population(jitbroker_broker: Broker) -> dict[str, Credential]:
    """Leases differing in task, owner and subject."""
    b = jitbroker_broker
    return {
        "a1": issue(b, task="a", owner="alice", subject="svc:one"),
        "a2": issue(b, task="a", owner="bob", subject="svc:two"),
        "b1": issue(b, task="b", owner="alice", subject="svc:two"),
        "n1": issue(b, owner="carol", subject="svc:one"),
    }


def active_names(broker: Broker, population: dict[str, Credential]) -> set[str]:
    return {name for name, cred in population.items() if is_active(broker, cred)}


@pytest.mark.parametrize(
    ("filters", "revoked"),
    [
        ({"task": "a"}, {"a1", "a2"}),
        ({"owner": "alice"}, {"a1", "b1"}),
        ({"subject": "svc:two"}, {"a2", "b1"}),
        ({"task": "a", "owner": "alice"}, {"a1"}),
        ({"owner": "alice", "subject": "svc:two"}, {"b1"}),
        ({"task": "b", "subject": "svc:one"}, set()),
        ({"owner": "nobody"}, set()),
    ],
)
def test_revoke_where_filters(
    jitbroker_broker: Broker,
    population: dict[str, Credential],
    filters: dict[str, str],
    revoked: set[str],
) -> None:
    count = jitbroker_broker.revoke_where(reason="offboarded", **filters)
    assert count == len(revoked)
    assert active_names(jitbroker_broker, population) == set(population) - revoked
    for name in revoked:
        assert jitbroker_broker.lease(population[name]).revoke_reason == "offboarded"


def test_revoke_where_by_key_id(jitbroker_clock: FakeClock) -> None:
    keys = KeyRing.generate("EdDSA")
    broker = Broker(issuer=TEST_ISSUER, keys=keys, clock=jitbroker_clock)
    old = broker.issue(SUBJECT, AUDIENCE, SCOPES, ttl=60)
    old_kid = keys.active.kid
    keys.rotate()
    new = broker.issue(SUBJECT, AUDIENCE, SCOPES, ttl=60)
    assert new.lease.key_id != old_kid
    assert broker.revoke_where(key_id=old_kid) == 1
    assert not is_active(broker, old)
    assert is_active(broker, new)


def test_revoke_where_by_parent(jitbroker_broker: Broker) -> None:
    root = issue(jitbroker_broker)
    c1 = jitbroker_broker.attenuate(root, scopes=["orders:read"])
    c2 = jitbroker_broker.attenuate(root, scopes=["orders:write"])
    grandchild = jitbroker_broker.attenuate(c1, scopes=["orders:read"])
    # The parent's children and their subtrees; not the parent itself.
    assert jitbroker_broker.revoke_where(parent=root.lease_id) == 3
    assert is_active(jitbroker_broker, root)
    assert not any(is_active(jitbroker_broker, c) for c in (c1, c2, grandchild))


def test_revoke_where_counts_only_transitions(
    jitbroker_broker: Broker, population: dict[str, Credential]
) -> None:
    assert jitbroker_broker.revoke_where(task="a") == 2
    assert jitbroker_broker.revoke_where(task="a") == 0
    assert jitbroker_broker.revoke_where(owner="alice") == 1  # a1 is already dead


def test_revoke_where_needs_a_filter(jitbroker_broker: Broker) -> None:
    cred = issue(jitbroker_broker)
    with pytest.raises(InvalidRequest):
        jitbroker_broker.revoke_where()
    with pytest.raises(InvalidRequest):
        jitbroker_broker.revoke_where(reason="everything")
    assert is_active(jitbroker_broker, cred)


# -- attenuate --------------------------------------------------------------
def test_attenuate_to_a_subset(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock, jitbroker_store: MemoryStore
) -> None:
    parent = issue(jitbroker_broker, ttl=60, task="job", owner=OWNER)
    jitbroker_clock.advance(10)
    child = jitbroker_broker.attenuate(parent, scopes=["orders:read"], ttl=30)
    now = jitbroker_clock()
    assert child.lease_id != parent.lease_id
    assert child.lease.parent == parent.lease_id
    assert child.lease.scopes == ("orders:read",)
    assert child.lease.audience == AUDIENCE
    assert child.lease.issued_at == now
    assert child.expires_at == now + 30
    assert (child.lease.task, child.lease.owner) == ("job", OWNER)
    assert jitbroker_store.get(child.lease_id) == child.lease
    claims = jitbroker_broker.verify(child.token, audience=AUDIENCE, scopes=["orders:read"])
    assert claims.parent == parent.lease_id
    assert payload(child.token)["parent"] == parent.lease_id


def test_attenuate_defaults_to_the_parent(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock
) -> None:
    parent = issue(jitbroker_broker, ttl=60)
    jitbroker_clock.advance(20)
    child = jitbroker_broker.attenuate(parent)
    assert child.lease.scopes == parent.lease.scopes
    assert child.lease.audience == parent.lease.audience
    assert child.expires_at == parent.expires_at


def test_attenuate_a_wildcard_audience(jitbroker_broker: Broker) -> None:
    parent = issue(jitbroker_broker, audience="db:*", scopes=["orders:*"])
    child = jitbroker_broker.attenuate(parent, audience="db:orders", scopes=["orders:read"])
    assert child.lease.audience == "db:orders"
    assert jitbroker_broker.verify(child.token, audience="db:orders", scopes="orders:read")
    with pytest.raises(InvalidRequest):
        jitbroker_broker.attenuate(child, audience="db:*")


def test_attenuate_ttl_may_use_the_whole_remaining_life(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock
) -> None:
    parent = issue(jitbroker_broker, ttl=60)
    jitbroker_clock.advance(20)
    assert jitbroker_broker.attenuate(parent, ttl=40).expires_at == parent.expires_at


def test_attenuate_max_ttl_lowers_the_childs_renewal_cap(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock
) -> None:
    parent = jitbroker_broker.issue("svc:a", "db:orders", ["orders:read"], ttl=600, max_ttl=3600)
    child = jitbroker_broker.attenuate(parent, ttl=60, max_ttl=120)
    assert child.lease.max_expires_at == jitbroker_clock() + 120
    jitbroker_clock.advance(30)
    assert jitbroker_broker.renew(child, ttl=500).expires_at == child.lease.max_expires_at
    roomy = jitbroker_broker.attenuate(parent, max_ttl=10**6)  # never above the parent's cap
    assert roomy.lease.max_expires_at == parent.lease.max_expires_at
    with pytest.raises(InvalidRequest, match="exceeds max_ttl"):
        jitbroker_broker.attenuate(parent, ttl=200, max_ttl=100)


@pytest.mark.parametrize(
    "change",
    [
        {"scopes": ["orders:delete"]},
        {"scopes": ["orders:read", "orders:delete"]},
        {"audience": "db:users"},
        {"audience": "db:*"},
        {"ttl": 41},
    ],
)
def test_attenuate_cannot_widen(
    jitbroker_broker: Broker,
    jitbroker_clock: FakeClock,
    jitbroker_store: MemoryStore,
    change: dict[str, Any],
) -> None:
    parent = issue(jitbroker_broker, ttl=60)
    jitbroker_clock.advance(20)
    with pytest.raises(InvalidRequest):
        jitbroker_broker.attenuate(parent, **change)
    assert jitbroker_store.find(LeaseFilter(parent=parent.lease_id)) == []


def test_attenuate_a_revoked_parent(jitbroker_broker: Broker) -> None:
    parent = issue(jitbroker_broker)
    jitbroker_broker.revoke(parent)
    with pytest.raises(LeaseNotActive):
        jitbroker_broker.attenuate(parent, scopes=["orders:read"])


def test_attenuate_an_expired_parent(jitbroker_broker: Broker, jitbroker_clock: FakeClock) -> None:
    parent = issue(jitbroker_broker, ttl=60)
    jitbroker_clock.advance(60)
    with pytest.raises(LeaseNotActive):
        jitbroker_broker.attenuate(parent)


def test_revoking_the_root_revokes_three_levels(
    jitbroker_broker: Broker, jitbroker_store: MemoryStore
) -> None:
    root = issue(jitbroker_broker, ttl=60)
    child = jitbroker_broker.attenuate(root, scopes=["orders:read", "orders:write"], ttl=50)
    grandchild = jitbroker_broker.attenuate(child, scopes=["orders:read"], ttl=40)
    sibling = jitbroker_broker.attenuate(root, scopes=["orders:write"])
    unrelated = issue(jitbroker_broker)
    assert jitbroker_broker.revoke(root, reason="compromised") is True
    for cred in (root, child, grandchild, sibling):
        assert stored(jitbroker_store, cred).revoke_reason == "compromised"
        with pytest.raises(TokenRevoked):
            jitbroker_broker.verify(cred.token, audience=AUDIENCE)
    assert jitbroker_broker.verify(unrelated.token, audience=AUDIENCE)
    # Children of the dead subtree cannot be made any more.
    with pytest.raises(LeaseNotActive):
        jitbroker_broker.attenuate(grandchild)


def test_revoking_a_middle_lease_spares_its_parent(jitbroker_broker: Broker) -> None:
    root = issue(jitbroker_broker)
    child = jitbroker_broker.attenuate(root)
    grandchild = jitbroker_broker.attenuate(child)
    assert jitbroker_broker.revoke(child) is True
    assert is_active(jitbroker_broker, root)
    assert not is_active(jitbroker_broker, grandchild)


def test_renewing_a_child_is_capped_by_its_parent(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock
) -> None:
    parent = issue(jitbroker_broker, ttl=60)
    child = jitbroker_broker.attenuate(parent, ttl=30)
    jitbroker_clock.advance(20)
    capped = jitbroker_broker.renew(child, ttl=300)
    assert capped.expires_at == parent.expires_at
    with pytest.raises(RenewalDenied):
        jitbroker_broker.renew(capped, ttl=300)


def test_renew_with_children_extends_the_subtree_within_each_cap(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock
) -> None:
    parent = issue(jitbroker_broker, ttl=60)
    child = jitbroker_broker.attenuate(parent, ttl=60)
    grandchild = jitbroker_broker.attenuate(child, ttl=60)
    fixed = jitbroker_broker.attenuate(parent, ttl=60)
    under_fixed = jitbroker_broker.attenuate(fixed, ttl=60)
    with jitbroker_broker.task("t", subject=SUBJECT, audience=AUDIENCE, ttl=60):
        pass  # a lease of another tree: untouched
    jitbroker_broker.revoke(fixed)  # a dead child is skipped, with its subtree

    def lease_of(broker: Broker, cred: Credential) -> Lease:
        found = broker.store.get(cred.lease_id)
        assert found is not None
        return found

    jitbroker_clock.advance(50)
    assert jitbroker_broker.renew(parent, ttl=100).expires_at == jitbroker_clock() + 100
    assert lease_of(jitbroker_broker, child).expires_at == child.expires_at  # not asked
    renewed = jitbroker_broker.renew(parent, ttl=100, children=True)
    now = jitbroker_clock()
    assert lease_of(jitbroker_broker, child).expires_at == now + 100
    assert lease_of(jitbroker_broker, grandchild).expires_at == now + 100
    assert lease_of(jitbroker_broker, under_fixed).expires_at == under_fixed.expires_at
    # a child's holder gets a token with the new expiry by renewing its own credential
    again = jitbroker_broker.renew(grandchild)
    assert again.expires_at == now + 100
    assert jitbroker_broker.verify(again.token, audience=AUDIENCE).lease_id == grandchild.lease_id
    jitbroker_clock.advance(20)
    shorter = jitbroker_broker.renew(renewed, ttl=10, children=True)
    assert shorter.expires_at == renewed.expires_at  # never shortens
    assert lease_of(jitbroker_broker, child).expires_at == now + 100
    with pytest.raises(InvalidRequest):
        jitbroker_broker.renew(parent, children="yes")  # type: ignore[arg-type]


# -- task() and ephemeral ---------------------------------------------------
def test_task_revokes_its_leases_on_exit(
    jitbroker_broker: Broker, jitbroker_store: MemoryStore
) -> None:
    with jitbroker_broker.task(
        "job-42", subject=SUBJECT, audience=AUDIENCE, scopes=SCOPES, ttl=60, owner=OWNER
    ) as cred:
        assert cred.lease.task == "job-42"
        assert cred.lease.owner == OWNER
        assert jitbroker_broker.verify(cred.token, audience=AUDIENCE)
        extra = issue(jitbroker_broker, task="job-42")
        child = jitbroker_broker.attenuate(cred, scopes=["orders:read"])
        other = issue(jitbroker_broker, task="job-43")
    for dead in (cred, extra, child):
        assert stored(jitbroker_store, dead).revoke_reason == "task-ended"
        with pytest.raises(TokenRevoked):
            jitbroker_broker.verify(dead.token, audience=AUDIENCE)
    assert is_active(jitbroker_broker, other)


def test_task_failure_revokes_with_task_failed(
    jitbroker_broker: Broker, jitbroker_store: MemoryStore
) -> None:
    leases: list[Credential] = []

    class Boom(Exception):
        pass

    def run() -> None:
        with jitbroker_broker.task("job-7", subject=SUBJECT, audience=AUDIENCE, ttl=60) as cred:
            leases.append(cred)
            leases.append(jitbroker_broker.attenuate(cred))
            raise Boom

    with pytest.raises(Boom):
        run()
    assert len(leases) == 2
    for cred in leases:
        assert stored(jitbroker_store, cred).revoke_reason == "task-failed"


def test_ephemeral_sync(jitbroker_broker: Broker) -> None:
    seen: list[Credential] = []

    @jitbroker_broker.ephemeral(subject="svc:report", audience="api", scopes=["read"], ttl=30)
    def job(cred: Credential, value: int, *, twice: bool = False) -> int:
        """Doubles."""
        assert jitbroker_broker.verify(cred.token, audience="api", scopes=["read"])
        seen.append(cred)
        return value * (2 if twice else 1)

    assert job(21, twice=True) == 42
    assert job(5) == 5
    assert job.__name__ == "job"
    assert job.__doc__ == "Doubles."
    assert len(seen) == 2
    first, second = seen
    # One task, named after the function; each call its own run of it.
    assert first.lease.task == second.lease.task == f"{__name__}.{job.__qualname__}"
    assert first.lease.task_run is not None
    assert second.lease.task_run is not None
    assert first.lease.task_run != second.lease.task_run
    for cred in seen:
        lease = jitbroker_broker.lease(cred)
        assert lease.revoke_reason == "task-ended"


def test_ephemeral_sync_failure(jitbroker_broker: Broker) -> None:
    seen: list[Credential] = []

    @jitbroker_broker.ephemeral(subject="svc:report", audience="api", ttl=30)
    def job(cred: Credential) -> None:
        seen.append(cred)
        raise KeyError("nope")

    with pytest.raises(KeyError):
        job()
    assert jitbroker_broker.lease(seen[0]).revoke_reason == "task-failed"


def test_ephemeral_async_def(jitbroker_broker: Broker) -> None:
    seen: list[Credential] = []

    @jitbroker_broker.ephemeral(subject="svc:report", audience="api", scopes=["read"], ttl=30)
    async def job(cred: Credential, value: int) -> int:
        await asyncio.sleep(0)
        assert is_active(jitbroker_broker, cred)
        seen.append(cred)
        return value + 1

    async def main() -> list[int]:
        return [await job(1), await job(2)]

    assert asyncio.run(main()) == [2, 3]
    assert len({cred.lease.task for cred in seen}) == 1
    assert len({cred.lease.task_run for cred in seen}) == 2
    for cred in seen:
        assert jitbroker_broker.lease(cred).revoke_reason == "task-ended"


def test_credential_as_context_manager(jitbroker_broker: Broker) -> None:
    with issue(jitbroker_broker) as cred:
        assert is_active(jitbroker_broker, cred)
    assert jitbroker_broker.lease(cred).revoke_reason == "done"
    with pytest.raises(TokenRevoked):
        jitbroker_broker.verify(cred.token, audience=AUDIENCE)


def test_credential_context_manager_on_error(jitbroker_broker: Broker) -> None:
    cred = issue(jitbroker_broker)
    with pytest.raises(ZeroDivisionError), cred:
        _ = 1 / 0
    assert jitbroker_broker.lease(cred).revoke_reason == "failed"


def test_credential_revoke(jitbroker_broker: Broker) -> None:
    cred = issue(jitbroker_broker)
    assert cred.revoke() is True
    assert cred.revoke() is False


def test_credential_repr_hides_the_token(jitbroker_broker: Broker) -> None:
    cred = issue(jitbroker_broker)
    assert cred.token not in repr(cred)
    assert cred.token not in str(cred)


# -- leases() ---------------------------------------------------------------
def test_leases_lists_active_ones_oldest_first(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock
) -> None:
    first = issue(jitbroker_broker, owner=OWNER, ttl=100)
    jitbroker_clock.advance(1)
    revoked = issue(jitbroker_broker, owner=OWNER, ttl=100)
    jitbroker_clock.advance(1)
    expiring = issue(jitbroker_broker, owner=OWNER, ttl=5)
    jitbroker_clock.advance(1)
    last = issue(jitbroker_broker, owner=OWNER, ttl=100)
    issue(jitbroker_broker, owner="bob@example.com", ttl=100)
    jitbroker_broker.revoke(revoked)
    jitbroker_clock.advance(10)  # `expiring` is now past its expiry

    active = list(jitbroker_broker.leases(owner=OWNER))
    assert [lease.id for lease in active] == [first.lease_id, last.lease_id]
    everything = list(jitbroker_broker.leases(owner=OWNER, include_inactive=True))
    assert [lease.id for lease in everything] == [
        first.lease_id,
        revoked.lease_id,
        expiring.lease_id,
        last.lease_id,
    ]
    now = jitbroker_clock()
    assert [lease.status(now) for lease in everything] == [
        "active",
        "revoked",
        "expired",
        "active",
    ]


def test_leases_by_task_subject_and_parent(jitbroker_broker: Broker) -> None:
    root = issue(jitbroker_broker, task="t1", subject="svc:a")
    child = jitbroker_broker.attenuate(root)
    other = issue(jitbroker_broker, task="t2", subject="svc:b")
    assert {lease.id for lease in jitbroker_broker.leases(task="t1")} == {
        root.lease_id,
        child.lease_id,
    }
    assert [lease.id for lease in jitbroker_broker.leases(subject="svc:b")] == [other.lease_id]
    assert [lease.id for lease in jitbroker_broker.leases(parent=root.lease_id)] == [child.lease_id]
    assert len(list(jitbroker_broker.leases())) == 3


# -- sweep and purge --------------------------------------------------------
def test_sweep_expires_each_lease_exactly_once(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock
) -> None:
    short = issue(jitbroker_broker, ttl=30)
    long = issue(jitbroker_broker, ttl=300)
    assert jitbroker_broker.sweep() == []
    jitbroker_clock.advance(31)
    expired = jitbroker_broker.sweep()
    assert [lease.id for lease in expired] == [short.lease_id]
    assert jitbroker_broker.sweep() == []
    with pytest.raises(TokenExpired):
        jitbroker_broker.verify(short.token, audience=AUDIENCE)
    assert jitbroker_broker.verify(long.token, audience=AUDIENCE)


def test_sweep_at_the_exact_expiry(jitbroker_broker: Broker, jitbroker_clock: FakeClock) -> None:
    cred = issue(jitbroker_broker, ttl=30)
    jitbroker_clock.advance(29.5)
    assert jitbroker_broker.sweep() == []
    jitbroker_clock.advance(0.5)
    assert [lease.id for lease in jitbroker_broker.sweep()] == [cred.lease_id]


def test_sweep_skips_revoked_and_renewed_leases(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock
) -> None:
    revoked = issue(jitbroker_broker, ttl=30)
    renewed = issue(jitbroker_broker, ttl=30)
    jitbroker_broker.revoke(revoked)
    jitbroker_clock.advance(20)
    jitbroker_broker.renew(renewed, ttl=60)
    jitbroker_clock.advance(20)
    assert jitbroker_broker.sweep() == []
    jitbroker_clock.advance(41)
    assert [lease.id for lease in jitbroker_broker.sweep()] == [renewed.lease_id]


def test_expired_lease_is_purged_after_the_leeway(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock, jitbroker_store: MemoryStore
) -> None:
    cred = issue(jitbroker_broker, ttl=30)
    jitbroker_clock.advance(31)
    assert [lease.id for lease in jitbroker_broker.sweep()] == [cred.lease_id]
    assert jitbroker_store.get(cred.lease_id) is not None  # still within the leeway
    jitbroker_clock.advance(LEEWAY)
    jitbroker_broker.sweep()
    assert jitbroker_store.get(cred.lease_id) is None
    assert len(jitbroker_store) == 0
    with pytest.raises(LeaseNotFound):
        jitbroker_broker.lease(cred)
    with pytest.raises(TokenExpired):
        jitbroker_broker.verify(cred.token, audience=AUDIENCE)


def test_one_sweep_long_after_expiry_claims_and_purges(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock, jitbroker_store: MemoryStore
) -> None:
    cred = issue(jitbroker_broker, ttl=30)
    jitbroker_clock.advance(30 + LEEWAY + 1)
    assert [lease.id for lease in jitbroker_broker.sweep()] == [cred.lease_id]
    assert jitbroker_store.get(cred.lease_id) is None


def test_revoked_lease_is_purged_once_its_token_is_dead(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock, jitbroker_store: MemoryStore
) -> None:
    cred = issue(jitbroker_broker, ttl=30)
    jitbroker_broker.revoke(cred)
    jitbroker_broker.sweep()
    assert jitbroker_store.get(cred.lease_id) is not None  # its token could still verify
    jitbroker_clock.advance(30 + LEEWAY + 1)
    assert jitbroker_broker.sweep() == []  # revoked leases never expire
    assert jitbroker_store.get(cred.lease_id) is None


def test_issue_sweeps_when_a_sweep_is_due(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock, jitbroker_store: MemoryStore
) -> None:
    # Memory stays bounded without a reaper: issue sweeps once per reap_interval.
    old = [issue(jitbroker_broker, ttl=10) for _ in range(20)]
    jitbroker_clock.advance(10 + LEEWAY + 1)
    issue(jitbroker_broker)
    assert all(jitbroker_store.get(cred.lease_id) is None for cred in old)
    assert len(jitbroker_store) == 1


def test_retention_keeps_dead_records(
    jitbroker_keys: KeyRing, jitbroker_clock: FakeClock, jitbroker_store: MemoryStore
) -> None:
    broker = Broker(
        issuer=TEST_ISSUER,
        keys=jitbroker_keys,
        store=jitbroker_store,
        clock=jitbroker_clock,
        retention=3600,
    )
    expired = broker.issue(SUBJECT, AUDIENCE, SCOPES, ttl=30)
    revoked = broker.issue(SUBJECT, AUDIENCE, SCOPES, ttl=30)
    broker.revoke(revoked)
    jitbroker_clock.advance(31)
    assert [lease.id for lease in broker.sweep()] == [expired.lease_id]
    jitbroker_clock.advance(3600 - 2)  # 30 + 3599 s after issue: within retention
    broker.sweep()
    assert jitbroker_store.get(expired.lease_id) is not None
    assert jitbroker_store.get(revoked.lease_id) is not None
    assert len(list(broker.leases(include_inactive=True))) == 2
    jitbroker_clock.advance(2)
    broker.sweep()
    assert jitbroker_store.get(expired.lease_id) is None
    assert jitbroker_store.get(revoked.lease_id) is None


def test_retention_as_timedelta(jitbroker_clock: FakeClock) -> None:
    store = MemoryStore()
    broker = Broker(
        issuer=TEST_ISSUER, store=store, clock=jitbroker_clock, retention=timedelta(minutes=2)
    )
    cred = broker.issue(SUBJECT, AUDIENCE, ttl=30)
    jitbroker_clock.advance(30 + 100)
    broker.sweep()
    assert store.get(cred.lease_id) is not None
    jitbroker_clock.advance(21)
    broker.sweep()
    assert store.get(cred.lease_id) is None


# -- opaque tokens ----------------------------------------------------------
@pytest.fixture
def opaque_broker(jitbroker_store: MemoryStore, jitbroker_clock: FakeClock) -> Broker:
    return Broker(
        issuer=TEST_ISSUER, store=jitbroker_store, clock=jitbroker_clock, token_format="opaque"
    )


def test_opaque_token_shape(opaque_broker: Broker) -> None:
    cred = issue(opaque_broker, task="job", owner=OWNER, purpose="export")
    assert cred.token.startswith("jbo_")
    assert cred.token.count(".") == 0
    assert cred.lease.key_id is None
    assert cred.token not in repr(cred)


def test_opaque_store_never_holds_the_token(
    opaque_broker: Broker, jitbroker_store: MemoryStore, jitbroker_clock: FakeClock
) -> None:
    cred = issue(opaque_broker, task="job", owner=OWNER, purpose="export")
    child = opaque_broker.attenuate(cred, scopes=["orders:read"])
    jitbroker_clock.advance(10)
    renewed = opaque_broker.renew(cred, ttl=60)
    opaque_broker.revoke(child)
    secrets = {cred.token, child.token, renewed.token, cred.token[4:], child.token[4:]}
    for lease in jitbroker_store.find(LeaseFilter(task="job")):
        for name, value in attrs.asdict(lease).items():
            for secret in secrets:
                assert secret not in repr(value), name
    assert cred.token not in repr(jitbroker_store)


def test_opaque_verify_online(opaque_broker: Broker, jitbroker_clock: FakeClock) -> None:
    cred = issue(opaque_broker, task="job", owner=OWNER)
    claims = opaque_broker.verify(cred.token, audience=AUDIENCE, scopes=["orders:read"])
    now = int(jitbroker_clock())
    assert claims.lease_id == cred.lease_id
    assert claims.issuer == TEST_ISSUER
    assert claims.subject == SUBJECT
    assert claims.scopes == frozenset(SCOPES)
    assert (claims.issued_at, claims.expires_at) == (now, now + 60)
    assert (claims.task, claims.owner) == ("job", OWNER)
    with pytest.raises(UnknownLease):
        opaque_broker.verify("jbo_" + "0" * 64, audience=AUDIENCE)


def test_opaque_renew_keeps_the_token(opaque_broker: Broker, jitbroker_clock: FakeClock) -> None:
    cred = issue(opaque_broker, ttl=60)
    jitbroker_clock.advance(50)
    renewed = opaque_broker.renew(cred, ttl=60)
    assert renewed.token == cred.token
    assert renewed.lease_id == cred.lease_id
    assert renewed.expires_at == jitbroker_clock() + 60 > cred.expires_at
    jitbroker_clock.advance(30)  # past the first expiry
    assert opaque_broker.verify(cred.token, audience=AUDIENCE).lease_id == cred.lease_id
    # The same token string works as the reference too.
    assert opaque_broker.renew(cred.token, ttl=60).token == cred.token
    # A bare lease id cannot mint the token again.
    with pytest.raises(InvalidRequest):
        opaque_broker.renew(cred.lease_id, ttl=60)


@pytest.mark.parametrize("by", ["credential", "token", "lease id"])
def test_opaque_revoke(opaque_broker: Broker, by: str) -> None:
    cred = issue(opaque_broker)
    refs: dict[str, Credential | str] = {
        "credential": cred,
        "token": cred.token,
        "lease id": cred.lease_id,
    }
    ref = refs[by]
    assert opaque_broker.revoke(ref) is True
    assert opaque_broker.revoke(ref) is False
    with pytest.raises(TokenRevoked):
        opaque_broker.verify(cred.token, audience=AUDIENCE)


def test_opaque_expiry(opaque_broker: Broker, jitbroker_clock: FakeClock) -> None:
    cred = issue(opaque_broker, ttl=30)
    jitbroker_clock.advance(30)
    with pytest.raises(TokenExpired):
        opaque_broker.verify(cred.token, audience=AUDIENCE)
    assert [lease.id for lease in opaque_broker.sweep()] == [cred.lease_id]


def test_sweep_takes_every_batch(jitbroker_clock: FakeClock, jitbroker_store: MemoryStore) -> None:
    # More expired leases than one store batch (SWEEP_BATCH = 1000): one sweep gets all.
    broker = Broker(
        issuer=TEST_ISSUER, store=jitbroker_store, clock=jitbroker_clock, token_format="opaque"
    )
    creds = [broker.issue(SUBJECT, AUDIENCE, ttl=10) for _ in range(2345)]
    jitbroker_clock.advance(11)
    swept = broker.sweep()
    assert len(swept) == len({lease.id for lease in swept}) == len(creds)
    assert broker.sweep() == []


# -- freezegun --------------------------------------------------------------
def test_freezegun_drives_a_broker_without_a_clock() -> None:
    with freeze_time("2026-03-01 12:00:00") as frozen:
        broker = Broker(issuer=TEST_ISSUER)
        cred = broker.issue(SUBJECT, AUDIENCE, SCOPES, ttl=60)
        start = cred.lease.issued_at
        assert start == pytest.approx(1_772_366_400.0)
        assert payload(cred.token)["iat"] == 1_772_366_400
        frozen.tick(59)
        assert broker.verify(cred.token, audience=AUDIENCE)
        frozen.tick(1)
        with pytest.raises(TokenExpired):
            broker.verify(cred.token, audience=AUDIENCE)
        assert [lease.id for lease in broker.sweep()] == [cred.lease_id]


def test_freezegun_drives_a_broker_built_before_freezing() -> None:
    store = MemoryStore()
    broker = Broker(issuer=TEST_ISSUER, store=store)
    with freeze_time("2026-03-01 12:00:00") as frozen:
        cred = broker.issue(SUBJECT, AUDIENCE, SCOPES, ttl=60)
        assert cred.lease.issued_at == pytest.approx(1_772_366_400.0)
        frozen.tick(timedelta(seconds=60))
        with pytest.raises(TokenExpired):
            broker.verify(cred.token, audience=AUDIENCE)


@freeze_time("2026-03-01 12:00:00")
def test_freezegun_as_a_decorator() -> None:
    broker = Broker(issuer=TEST_ISSUER)
    cred = broker.issue(SUBJECT, AUDIENCE, SCOPES, ttl=60)
    assert cred.expires_at == pytest.approx(1_772_366_460.0)
    assert payload(cred.token)["exp"] == 1_772_366_460


def test_freezegun_move_to() -> None:
    with freeze_time("2026-03-01 12:00:00") as frozen:
        store = MemoryStore()
        broker = Broker(issuer=TEST_ISSUER, store=store)
        cred = broker.issue(SUBJECT, AUDIENCE, SCOPES, ttl=60)
        frozen.move_to("2026-03-01 12:00:30")
        renewed = broker.renew(cred, ttl=60)
        assert renewed.expires_at == cred.lease.issued_at + 90
        frozen.move_to("2026-03-01 12:05:00")
        with pytest.raises(TokenExpired):
            broker.verify(renewed.token, audience=AUDIENCE)
        assert [lease.id for lease in broker.sweep()] == [cred.lease_id]
        assert store.get(cred.lease_id) is None  # long past exp + leeway: purged


# -- regressions found in review ------------------------------------------------


def test_failed_renewal_changes_nothing(
    jitbroker_broker: Broker, jitbroker_clock: FakeClock
) -> None:
    cred = jitbroker_broker.issue("svc:a", "api", ["read"], ttl=30)
    old_kid = jitbroker_broker.keys.active.kid
    jitbroker_broker.keys.rotate()
    jitbroker_broker.keys.retire(old_kid)
    jitbroker_clock.advance(10)
    with pytest.raises(RenewalDenied):
        jitbroker_broker.renew(cred, ttl=60)
    assert jitbroker_broker.lease(cred).expires_at == cred.lease.expires_at


def test_renewal_that_moves_nothing_writes_nothing(
    jitbroker_broker: Broker, jitbroker_store: MemoryStore
) -> None:
    cred = jitbroker_broker.issue("svc:a", "api", ["read"], ttl=60)
    heap_before = len(jitbroker_store._expiry)
    for _ in range(50):
        renewed = jitbroker_broker.renew(cred, ttl=10)  # shorter than what is left
    assert renewed.lease.expires_at == cred.lease.expires_at
    assert len(jitbroker_store._expiry) == heap_before


def test_ephemeral_on_callable_objects(jitbroker_broker: Broker) -> None:
    seen: list[str] = []

    class Job:
        def __call__(self, cred: Credential) -> str:
            seen.append(cred.lease_id)
            return "done"

    class AsyncJob:
        async def __call__(self, cred: Credential) -> str:
            jitbroker_broker.verify(cred.token, audience="api")  # alive during the call
            seen.append(cred.lease_id)
            return "done"

    decorate = jitbroker_broker.ephemeral(subject="svc:a", audience="api", ttl=30)
    assert decorate(Job())() == "done"
    assert asyncio.run(decorate(AsyncJob())()) == "done"
    assert len(seen) == 2
    assert list(jitbroker_broker.leases()) == []


def test_issue_returns_its_token_even_if_the_inline_sweep_breaks(
    jitbroker_keys: KeyRing, jitbroker_clock: FakeClock
) -> None:
    class BrokenSweepStore(MemoryStore):
        def claim_expired(
            self, now: float, limit: int = 1000, expire_hooks: Collection[str] = (), **kw: Any
        ) -> list[Lease]:
            raise RuntimeError("a store bug, not translated")

    store = BrokenSweepStore()
    broker = Broker(keys=jitbroker_keys, store=store, clock=jitbroker_clock)
    cred = broker.issue("svc:a", "api", ["read"])
    assert store.get(cred.lease_id) == cred.lease
    broker.verify(cred.token, audience="api", scopes=["read"])
