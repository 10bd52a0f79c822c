"""Delegation (RFC 8693): ``attenuate`` mints a child whose token carries a nested
``act`` claim naming the delegating leases, nearest first.

Children are never wider or longer-lived than their parents, chains are bounded
by ``max_delegation_depth``, delegating to another subject is judged by the
policy for that subject, revoking a link revokes everything below it, and a
token whose ``act`` disagrees with its ``parent`` is rejected even when it
carries the broker's own signature.
"""

from __future__ import annotations

import asyncio
from typing import Any

import jwt
import pytest

from jitbroker import AsyncBroker, Broker, Credential, KeyRing, MemoryStore, Policy, Rule, Verifier
from jitbroker.errors import (
    InvalidRequest,
    LeaseNotActive,
    MalformedToken,
    PolicyDenied,
    TokenRevoked,
    UnknownLease,
)
from jitbroker.testing import TEST_ISSUER, FakeClock
from jitbroker.tokens import MAX_ACT_DEPTH, encode_jws

SUBJECT = "svc:ci-deploy"
AUDIENCE = "db:orders"
SCOPES = ["orders:read", "orders:write"]


def make_broker(clock: FakeClock | None = None, **options: Any) -> Broker:
    return Broker(
        issuer=TEST_ISSUER,
        keys=options.pop("keys", None) or KeyRing.generate("EdDSA"),
        clock=clock or FakeClock(),
        **options,
    )


def root(broker: Broker, **changes: Any) -> Credential:
    request: dict[str, Any] = {
        "subject": SUBJECT,
        "audience": AUDIENCE,
        "scopes": SCOPES,
        "ttl": 600,
        "owner": "alice@example.com",
        "task": "job-1",
    }
    return broker.issue(**{**request, **changes})


def payload(cred: Credential) -> dict[str, Any]:
    """The token's claims, read with PyJWT without checking anything."""
    claims: dict[str, Any] = jwt.decode(cred.token, options={"verify_signature": False})
    return claims


def chain(broker: Broker, depth: int, **first: Any) -> list[Credential]:
    """A root and ``depth`` delegations below it, each from the previous one."""
    creds = [root(broker, **first)]
    for _ in range(depth):
        creds.append(broker.attenuate(creds[-1]))
    return creds


def resign(broker: Broker, claims: dict[str, Any]) -> str:
    """A token carrying ``claims`` that the broker's own active key signed."""
    return encode_jws(broker.keys.active, claims)


@pytest.fixture
def broker() -> Broker:
    return make_broker()


# -- the act claim ----------------------------------------------------------------
def test_a_root_token_has_no_act_claim(broker: Broker) -> None:
    cred = root(broker)
    claims = payload(cred)
    assert "act" not in claims
    assert "parent" not in claims
    assert broker.verify(cred.token, audience=AUDIENCE).delegated_by == ()


def test_act_claims_follow_rfc_8693(broker: Broker) -> None:
    """RFC 8693 section 4.1: ``sub`` is the principal, the outermost ``act`` the
    current actor, nested ``act`` claims the prior actors; each actor names the
    lease it was delegated from."""
    top = root(broker)
    first = broker.attenuate(top, scopes=["orders:read", "orders:write"])
    handed = broker.attenuate(first, scopes=["orders:read"], subject="svc:report")
    below = broker.attenuate(handed, ttl=30)
    assert payload(first)["sub"] == SUBJECT
    assert payload(first)["act"] == {"sub": SUBJECT, "delegated_from": top.lease_id}
    assert payload(handed)["sub"] == SUBJECT  # the principal stays the subject
    assert payload(handed)["act"] == {
        "sub": "svc:report",  # the current actor, outermost
        "delegated_from": first.lease_id,
        "act": {"sub": SUBJECT, "delegated_from": top.lease_id},  # a prior actor
    }
    claims = payload(below)
    assert claims["sub"] == SUBJECT
    assert claims["parent"] == handed.lease_id
    assert claims["act"] == {
        "sub": "svc:report",
        "delegated_from": handed.lease_id,
        "act": {
            "sub": "svc:report",
            "delegated_from": first.lease_id,
            "act": {"sub": SUBJECT, "delegated_from": top.lease_id},
        },
    }
    assert claims["jti"] == below.lease_id
    verified = broker.verify(below.token, audience=AUDIENCE)
    assert (verified.subject, verified.actor) == (SUBJECT, "svc:report")


def test_claims_delegated_by_lists_the_chain_nearest_first(broker: Broker) -> None:
    creds = chain(broker, 3)
    ids = [cred.lease_id for cred in creds]
    claims = broker.verify(creds[3].token, audience=AUDIENCE)
    assert claims.delegated_by == (ids[2], ids[1], ids[0])
    assert claims.parent == ids[2]
    assert broker.verify(creds[1].token, audience=AUDIENCE).delegated_by == (ids[0],)
    # An offline verifier reads the same chain from the token alone.
    offline = Verifier(broker.jwks(), issuer=TEST_ISSUER, offline=True, clock=broker.clock)
    assert offline.verify(creds[3].token, audience=AUDIENCE).delegated_by == (
        ids[2],
        ids[1],
        ids[0],
    )


def test_async_broker_mints_the_same_act_claim() -> None:
    async def main() -> tuple[Credential, Credential, Credential, tuple[str, ...]]:
        broker = AsyncBroker(issuer=TEST_ISSUER, clock=FakeClock())
        top = await broker.issue(SUBJECT, AUDIENCE, SCOPES, ttl=600)
        mid = await broker.attenuate(top, scopes=["orders:read"])
        low = await broker.attenuate(mid, subject="svc:report")
        claims = await broker.verify(low.token, audience=AUDIENCE)
        return top, mid, low, claims.delegated_by

    top, mid, low, delegated_by = asyncio.run(main())
    assert delegated_by == (mid.lease_id, top.lease_id)
    assert payload(low)["sub"] == SUBJECT
    assert payload(low)["act"] == {
        "sub": "svc:report",
        "delegated_from": mid.lease_id,
        "act": {"sub": SUBJECT, "delegated_from": top.lease_id},
    }


def test_opaque_children_know_their_parent_from_the_store() -> None:
    broker = make_broker(token_format="opaque")
    top = root(broker)
    child = broker.attenuate(top)
    claims = broker.verify(child.token, audience=AUDIENCE)
    assert claims.parent == top.lease_id
    assert list(broker.leases(parent=top.lease_id)) == [child.lease]


def test_opaque_children_report_their_delegation_chain() -> None:
    broker = make_broker(token_format="opaque")
    top = root(broker)
    mid = broker.attenuate(top)
    low = broker.attenuate(mid)
    claims = broker.verify(low.token, audience=AUDIENCE)
    assert claims.delegated_by == (mid.lease_id, top.lease_id)


def test_opaque_delegated_claims_name_the_principal_and_the_actor() -> None:
    broker = make_broker(token_format="opaque")
    top = root(broker)
    handed = broker.attenuate(top, scopes=["orders:read"], subject="svc:report")
    claims = broker.verify(handed.token, audience=AUDIENCE)
    assert (claims.subject, claims.actor) == (SUBJECT, "svc:report")
    assert claims.delegated_by == (top.lease_id,)
    plain = broker.verify(top.token, audience=AUDIENCE)
    assert (plain.subject, plain.actor, plain.delegated_by) == (SUBJECT, None, ())


# -- the depth limit --------------------------------------------------------------
def test_the_default_depth_limit_is_four(broker: Broker) -> None:
    creds = chain(broker, 4)
    assert len(payload(creds[4])["act"]) == 3  # sub, jti, act
    with pytest.raises(InvalidRequest, match="4 delegations deep; the limit is 4"):
        broker.attenuate(creds[4])
    assert len(list(broker.leases(parent=creds[4].lease_id))) == 0
    broker.attenuate(creds[3])  # a sibling at depth 4 is fine


@pytest.mark.parametrize("limit", [1, 2, 7])
def test_a_custom_depth_limit(limit: int) -> None:
    broker = make_broker(max_delegation_depth=limit)
    creds = chain(broker, limit)
    with pytest.raises(InvalidRequest, match=f"the limit is {limit}"):
        broker.attenuate(creds[-1])
    assert len(broker.verify(creds[-1].token, audience=AUDIENCE).delegated_by) == limit


def test_depth_zero_forbids_attenuation() -> None:
    broker = make_broker(max_delegation_depth=0)
    cred = root(broker)
    with pytest.raises(InvalidRequest, match="the limit is 0"):
        broker.attenuate(cred, scopes=["orders:read"])
    with pytest.raises(InvalidRequest):
        broker.attenuate(cred, subject="svc:other")


def test_the_deepest_allowed_chain_verifies() -> None:
    broker = make_broker(max_delegation_depth=MAX_ACT_DEPTH)
    creds = chain(broker, MAX_ACT_DEPTH)
    claims = broker.verify(creds[-1].token, audience=AUDIENCE)
    assert len(claims.delegated_by) == MAX_ACT_DEPTH
    with pytest.raises(InvalidRequest):
        broker.attenuate(creds[-1])


@pytest.mark.parametrize("depth", [MAX_ACT_DEPTH + 1, 17, 100, -1, True, 2.0, "4", None])
def test_bad_depth_limits_are_refused_at_construction(depth: Any) -> None:
    with pytest.raises(InvalidRequest, match="max_delegation_depth"):
        make_broker(max_delegation_depth=depth)
    with pytest.raises(InvalidRequest, match="max_delegation_depth"):
        AsyncBroker(issuer=TEST_ISSUER, max_delegation_depth=depth)


def test_a_stricter_broker_on_the_same_store_refuses_a_deep_chain() -> None:
    store, clock, keys = MemoryStore(), FakeClock(), KeyRing.generate("EdDSA")
    loose = make_broker(clock, store=store, keys=keys)
    strict = make_broker(clock, store=store, keys=keys, max_delegation_depth=2)
    creds = chain(loose, 3)
    with pytest.raises(InvalidRequest, match="the limit is 2"):
        strict.attenuate(creds[3])
    with pytest.raises(InvalidRequest, match="the limit is 2"):
        strict.attenuate(creds[2])
    strict.attenuate(creds[1])


def test_the_depth_error_tells_the_true_depth() -> None:
    store, clock, keys = MemoryStore(), FakeClock(), KeyRing.generate("EdDSA")
    loose = make_broker(clock, store=store, keys=keys)
    strict = make_broker(clock, store=store, keys=keys, max_delegation_depth=2)
    creds = chain(loose, 3)
    with pytest.raises(InvalidRequest, match="3 delegations deep; the limit is 2"):
        strict.attenuate(creds[3])


# -- never wider, never longer ----------------------------------------------------------
def test_a_child_never_has_wider_scopes(broker: Broker) -> None:
    cred = root(broker, scopes=["orders:read"])
    with pytest.raises(InvalidRequest, match="cannot widen"):
        broker.attenuate(cred, scopes=["orders:read", "orders:write"])
    with pytest.raises(InvalidRequest, match="cannot widen"):
        broker.attenuate(cred, scopes=["orders:*"])
    wildcard = root(broker, scopes=["orders:*"])
    child = broker.attenuate(wildcard, scopes=["orders:read"])
    assert child.lease.scopes == ("orders:read",)
    with pytest.raises(InvalidRequest, match="cannot widen"):
        broker.attenuate(child, scopes=["orders:write"])
    assert broker.attenuate(cred).lease.scopes == ("orders:read",)  # default: the parent's


def test_a_child_never_has_a_wider_audience(broker: Broker) -> None:
    cred = root(broker)
    with pytest.raises(InvalidRequest, match="outside the parent's"):
        broker.attenuate(cred, audience="db:payments")
    wide = root(broker, audience="db:*")
    narrow = broker.attenuate(wide, audience="db:orders")
    assert payload(narrow)["aud"] == "db:orders"
    with pytest.raises(InvalidRequest, match="outside the parent's"):
        broker.attenuate(narrow, audience="db:*")


def test_a_child_never_outlives_its_parent(broker: Broker) -> None:
    cred = root(broker, ttl=100)
    clock = broker.clock
    assert isinstance(clock, FakeClock)
    clock.advance(40)
    with pytest.raises(InvalidRequest, match="exceeds the parent's remaining"):
        broker.attenuate(cred, ttl=61)
    child = broker.attenuate(cred)  # default: whatever the parent has left
    assert child.lease.expires_at == cred.lease.expires_at
    assert payload(child)["exp"] <= payload(cred)["exp"]
    short = broker.attenuate(cred, ttl=10)
    clock.advance(5)
    renewed = broker.renew(short, ttl=600)  # capped by the parent's expiry
    assert renewed.lease.expires_at == cred.lease.expires_at


def test_a_child_of_a_dead_parent_is_refused(broker: Broker) -> None:
    cred = root(broker)
    broker.revoke(cred)
    with pytest.raises(LeaseNotActive, match="revoked"):
        broker.attenuate(cred)


# -- delegating to another subject -------------------------------------------------
def test_delegation_to_another_subject_is_judged_for_that_subject() -> None:
    policy = Policy(
        [
            Rule(subjects=SUBJECT, audiences=AUDIENCE, scopes=SCOPES, name="deployer"),
            Rule(subjects="svc:report", audiences=AUDIENCE, scopes="orders:read", name="report"),
        ]
    )
    broker = make_broker(policy=policy)
    cred = root(broker)
    child = broker.attenuate(cred, scopes=["orders:read"], subject="svc:report")
    assert child.lease.subject == "svc:report"
    assert child.lease.owner == cred.lease.owner  # accountability is inherited
    verified = broker.verify(child.token, audience=AUDIENCE)
    assert (verified.subject, verified.actor) == (SUBJECT, "svc:report")  # RFC 8693
    with pytest.raises(PolicyDenied) as info:
        broker.attenuate(cred, subject="svc:report")  # would carry orders:write
    assert info.value.reasons == ("report does not grant scopes 'orders:write'",)
    with pytest.raises(PolicyDenied, match="no rule applies to subject 'svc:intruder'"):
        broker.attenuate(cred, scopes=["orders:read"], subject="svc:intruder")


def test_delegation_checks_the_new_subject() -> None:
    broker = make_broker()
    with pytest.raises(InvalidRequest):
        broker.attenuate(root(broker), subject="")


# -- the chain in leases(), report() and revocation -------------------------------
def test_the_chain_is_visible_in_leases_and_the_report(broker: Broker) -> None:
    creds = chain(broker, 3)
    sibling = broker.attenuate(creds[0], scopes=["orders:read"])
    ids = [cred.lease_id for cred in creds]
    assert {lease.id for lease in broker.leases(parent=ids[0])} == {ids[1], sibling.lease_id}
    assert [lease.id for lease in broker.leases(parent=ids[1])] == [ids[2]]
    assert [lease.id for lease in broker.leases(parent=ids[2])] == [ids[3]]
    assert list(broker.leases(parent=ids[3])) == []
    assert broker.report().delegated == {
        ids[1]: 1,
        ids[2]: 2,
        ids[3]: 3,
        sibling.lease_id: 1,
    }


def test_revoking_a_middle_link_revokes_below_not_above(broker: Broker) -> None:
    creds = chain(broker, 4)
    side = broker.attenuate(creds[1], scopes=["orders:read"])  # below the middle link
    other = broker.attenuate(creds[0], scopes=["orders:read"])  # a separate branch
    assert broker.revoke(creds[2], reason="compromised") is True
    for cred in [*creds[:2], side, other]:
        broker.verify(cred.token, audience=AUDIENCE)
    for cred in creds[2:]:
        with pytest.raises(TokenRevoked):
            broker.verify(cred.token, audience=AUDIENCE)
        assert broker.lease(cred).revoke_reason == "compromised"
    assert set(broker.report().delegated) == {creds[1].lease_id, side.lease_id, other.lease_id}
    assert broker.revoke(creds[1]) is True
    with pytest.raises(TokenRevoked):
        broker.verify(side.token, audience=AUDIENCE)
    broker.verify(creds[0].token, audience=AUDIENCE)
    broker.verify(other.token, audience=AUDIENCE)


def test_renewing_a_child_keeps_its_act_claim(broker: Broker) -> None:
    creds = chain(broker, 2)
    clock = broker.clock
    assert isinstance(clock, FakeClock)
    child = broker.attenuate(creds[2], ttl=60)
    clock.advance(30)
    renewed = broker.renew(child, ttl=120)
    assert renewed.lease_id == child.lease_id
    assert renewed.token != child.token
    assert payload(renewed)["act"] == payload(child)["act"]
    assert payload(renewed)["parent"] == creds[2].lease_id
    claims = broker.verify(renewed.token, audience=AUDIENCE)
    assert claims.delegated_by == tuple(cred.lease_id for cred in reversed(creds))
    root_renewed = broker.renew(creds[0], ttl=600)
    assert "act" not in payload(root_renewed)


# -- forged act claims are rejected ----------------------------------------------------
def test_an_act_that_does_not_name_the_parent_is_rejected(broker: Broker) -> None:
    creds = chain(broker, 2)
    claims = payload(creds[2])
    claims["act"] = {"sub": SUBJECT, "jti": creds[0].lease_id}  # skips the real parent
    with pytest.raises(MalformedToken, match="'act'"):
        broker.verify(resign(broker, claims), audience=AUDIENCE)
    claims["act"] = {"sub": SUBJECT, "jti": "f" * 32}
    with pytest.raises(MalformedToken):
        broker.verify(resign(broker, claims), audience=AUDIENCE)
    broker.verify(creds[2].token, audience=AUDIENCE)  # the genuine token still works


def test_a_parent_claim_without_act_is_rejected(broker: Broker) -> None:
    creds = chain(broker, 1)
    claims = payload(creds[1])
    del claims["act"]
    with pytest.raises(MalformedToken, match="'act'"):
        broker.verify(resign(broker, claims), audience=AUDIENCE)


def test_an_act_claim_on_a_root_token_is_rejected(broker: Broker) -> None:
    top, child = chain(broker, 1)
    claims = payload(top)
    claims["act"] = {"sub": SUBJECT, "jti": child.lease_id}
    with pytest.raises(MalformedToken):
        broker.verify(resign(broker, claims), audience=AUDIENCE)


def test_a_consistently_forged_parent_is_caught_by_the_lease(broker: Broker) -> None:
    # parent and act agree with each other but not with the authority record.
    creds = chain(broker, 2)
    claims = payload(creds[2])
    claims["parent"] = creds[0].lease_id
    claims["act"] = {"sub": SUBJECT, "delegated_from": creds[0].lease_id}
    with pytest.raises(UnknownLease):
        broker.verify(resign(broker, claims), audience=AUDIENCE)


@pytest.mark.parametrize(
    "act",
    [
        "not-an-object",
        {"sub": SUBJECT},
        {"delegated_from": "a" * 32},
        {"sub": 1, "delegated_from": "a" * 32},
        {"sub": "", "delegated_from": "a" * 32},
        {"sub": SUBJECT, "delegated_from": "NOT-A-LEASE-ID"},
        {"sub": SUBJECT, "delegated_from": "a" * 32, "extra": True},
        {"sub": SUBJECT, "delegated_from": "a" * 32, "act": "x"},
        {"sub": SUBJECT, "jti": "a" * 32},  # the pre-RFC-order shape
    ],
)
def test_malformed_act_claims_are_rejected(broker: Broker, act: object) -> None:
    top, child = chain(broker, 1)
    claims = payload(child)
    if isinstance(act, dict) and act.get("delegated_from") == "a" * 32:
        act = {**act, "delegated_from": top.lease_id}
    claims["act"] = act
    with pytest.raises(MalformedToken):
        broker.verify(resign(broker, claims), audience=AUDIENCE)


def test_an_act_chain_deeper_than_the_verifier_allows_is_rejected(broker: Broker) -> None:
    top, child = chain(broker, 1)
    act: dict[str, Any] = {"sub": SUBJECT, "jti": "b" * 32}
    for _ in range(MAX_ACT_DEPTH):
        act = {"sub": SUBJECT, "jti": "c" * 32, "act": act}
    act["jti"] = top.lease_id
    claims = payload(child)
    claims["act"] = act
    with pytest.raises(MalformedToken):
        broker.verify(resign(broker, claims), audience=AUDIENCE)
