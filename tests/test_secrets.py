"""Invariant 6: secrets never appear in repr, str, logs, audit events or exceptions.

The secrets are the token string and its signature segment, the private key
(PEM, and the private JWK members in every encoding a careless formatter might
use) and the HMAC secret. Every check runs for every algorithm.
"""

from __future__ import annotations

import base64
import json
import logging
import pickle
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from jitbroker import AuditEvent, Broker, Credential, JitBrokerError, KeyRing, Verifier
from jitbroker.errors import InvalidToken
from jitbroker.keys import Key, b64url
from jitbroker.testing import TEST_ISSUER, FakeClock

ALGORITHMS = ["EdDSA", "ES256", "RS256", "HS256"]
SUBJECT = "svc:ci-deploy"
AUDIENCE = "db:orders"
SCOPES = ["orders:read", "orders:write"]


# -- what counts as a secret -------------------------------------------------------
def dec(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def encodings(raw: bytes) -> list[str]:
    """The ways a formatter could spell secret bytes."""
    return [
        b64url(raw),
        base64.b64encode(raw).decode("ascii").rstrip("="),
        raw.hex(),
        raw.hex().upper(),
        repr(raw)[2:-1],
    ]


def key_secrets(key: Key) -> list[str]:
    jwk = key.to_jwk(private=True)
    members = ("k",) if key.symmetric else ("d", "p", "q", "dp", "dq", "qi")
    found = [m for m in members if m in jwk]
    assert found, "the private JWK has no secret members"
    out = [s for m in found for s in encodings(dec(jwk[m]))]
    if not key.symmetric:
        pem = key.to_pem().decode("ascii")
        body = [line for line in pem.splitlines() if not line.startswith("-----")]
        out += [pem, "".join(body)] + [line for line in body if len(line) >= 16]
    return out


def token_secrets(token: str) -> list[str]:
    out = [token]
    parts = token.split(".")
    if len(parts) == 3 and len(parts[2]) >= 16:
        out.append(parts[2])
    if token.startswith("jbo_"):
        out.append(token[4:])
    return out


class Secrets:
    """Every secret of one test; ``check`` fails naming the place, never the secret."""

    def __init__(self, keys: KeyRing) -> None:
        self.values = [s for key in keys if key.private for s in key_secrets(key)]

    def add_token(self, token: str) -> None:
        self.values += token_secrets(token)

    def add(self, *creds: Credential) -> None:
        for cred in creds:
            self.add_token(cred.token)

    def check(self, where: str, text: str) -> None:
        leaked = [i for i, secret in enumerate(self.values) if secret in text]
        assert not leaked, f"secret(s) {leaked} leaked into {where}"

    def check_object(self, where: str, obj: object) -> None:
        self.check(f"repr({where})", repr(obj))
        self.check(f"str({where})", str(obj))
        self.check(f"format({where})", f"{obj}")

    def check_error(self, where: str, error: BaseException) -> None:
        for depth, exc in enumerate(chain(error)):
            self.check_object(f"{where} (chain {depth})", exc)
            self.check(f"{where} args (chain {depth})", repr(exc.args))
            self.check(f"{where} attrs (chain {depth})", repr(getattr(exc, "__dict__", {})))


def chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# -- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module", params=ALGORITHMS)
def ring(request: pytest.FixtureRequest) -> KeyRing:
    """One ring per algorithm for the module (RSA generation is slow); never mutated."""
    return KeyRing.generate(request.param)


@pytest.fixture
def events() -> list[AuditEvent]:
    return []


@pytest.fixture
def broker(ring: KeyRing, jitbroker_clock: FakeClock, events: list[AuditEvent]) -> Broker:
    return Broker(issuer=TEST_ISSUER, keys=ring, clock=jitbroker_clock, audit=[events.append])


@pytest.fixture
def opaque_broker(ring: KeyRing, jitbroker_clock: FakeClock, events: list[AuditEvent]) -> Broker:
    return Broker(
        issuer=TEST_ISSUER,
        keys=ring,
        clock=jitbroker_clock,
        token_format="opaque",
        audit=[events.append],
    )


@pytest.fixture
def secrets(ring: KeyRing) -> Secrets:
    return Secrets(ring)


def issue(broker: Broker, **options: Any) -> Credential:
    options = {"ttl": 60, "owner": "alice@example.com", "purpose": "export", **options}
    return broker.issue(SUBJECT, AUDIENCE, SCOPES, **options)


def test_secret_lists_are_not_empty(ring: KeyRing, secrets: Secrets) -> None:
    # A guard for the helpers: every check below would pass vacuously otherwise.
    assert len(secrets.values) >= 5
    assert all(len(s) >= 16 for s in secrets.values)
    hmac = ring.active.to_jwk(private=True).get("k")
    assert hmac is None or hmac in secrets.values


def test_the_checker_catches_leaks(ring: KeyRing, broker: Broker, secrets: Secrets) -> None:
    cred = issue(broker)
    secrets.add(cred)
    key = ring.active
    jwk = key.to_jwk(private=True)
    member = jwk["k"] if key.symmetric else jwk["d"]
    leaks = [
        repr(jwk),
        f"secret={dec(member).hex()}",
        f"Authorization: Bearer {cred.token}",
        f"sig={cred.token.rsplit('.', 1)[1]}",
    ]
    if not key.symmetric:
        leaks.append(key.to_pem().decode("ascii"))
    for leak in leaks:
        with pytest.raises(AssertionError):
            secrets.check("a planted leak", leak)


# -- repr and str -------------------------------------------------------------------------
def test_values_hide_secrets(
    broker: Broker, ring: KeyRing, secrets: Secrets, jitbroker_clock: FakeClock
) -> None:
    cred = issue(broker, task="job-1")
    renewed = broker.renew(cred, ttl=120)
    child = broker.attenuate(cred, scopes=["orders:read"], ttl=30)
    secrets.add(cred, renewed, child)
    claims = broker.verify(cred.token, audience=AUDIENCE, scopes=["orders:read"])
    verifiers = [
        Verifier(ring, issuer=TEST_ISSUER, offline=True, clock=jitbroker_clock),
        Verifier(ring, issuer=TEST_ISSUER, store=broker.store, clock=jitbroker_clock),
    ]
    if not ring.active.symmetric:
        verifiers.append(
            Verifier(broker.jwks(), issuer=TEST_ISSUER, offline=True, clock=jitbroker_clock)
        )
    values: dict[str, object] = {
        "credential": cred,
        "renewed credential": renewed,
        "child credential": child,
        "lease": cred.lease,
        "claims": claims,
        "key": ring.active,
        "public key": ring.active.public(),
        "key ring": ring,
        "public key ring": ring.public(),
        "broker": broker,
        "store": broker.store,
        "leases": list(broker.leases()),
    }
    values.update({f"verifier {i}": v for i, v in enumerate(verifiers)})
    for where, value in values.items():
        secrets.check_object(where, value)
    for verifier in verifiers:  # the cache holds tokens as keys: they stay inside
        assert verifier.verify(child.token, audience=AUDIENCE).lease_id == child.lease_id
        secrets.check_object("verifier after a verification", verifier)


def test_credential_repr_hides_the_token_but_keeps_it(broker: Broker, secrets: Secrets) -> None:
    cred = issue(broker)
    secrets.add(cred)
    assert cred.token.count(".") == 2  # the token is there, just not shown
    secrets.check_object("credential", cred)
    assert "lease" in repr(cred)


def test_opaque_values_hide_the_token(opaque_broker: Broker, secrets: Secrets) -> None:
    cred = issue(opaque_broker)
    secrets.add(cred)
    claims = opaque_broker.verify(cred.token, audience=AUDIENCE)
    for where, value in {
        "credential": cred,
        "lease": cred.lease,
        "claims": claims,
        "broker": opaque_broker,
        "store": opaque_broker.store,
    }.items():
        secrets.check_object(where, value)


# -- audit events and logs ---------------------------------------------------------
def lifecycle(broker: Broker, clock: FakeClock, secrets: Secrets) -> None:
    """Every operation the broker has, including failures, on one broker."""
    cred = issue(broker, task="job-1")
    secrets.add(cred)
    broker.verify(cred.token, audience=AUDIENCE)
    renewed = broker.renew(cred, ttl=120)
    child = broker.attenuate(renewed, scopes=["orders:read"], ttl=30)
    secrets.add(renewed, child)
    broker.verify(child.token, audience=AUDIENCE, scopes=["orders:read"])
    for bad in tampered(cred.token) + tampered(child.token):
        secrets.add_token(bad)
        with pytest.raises(InvalidToken):
            broker.verify(bad, audience=AUDIENCE)
    with pytest.raises(InvalidToken):
        broker.verify(cred.token, audience="db:payments")
    with pytest.raises(InvalidToken):
        broker.verify(cred.token, audience=AUDIENCE, scopes=["orders:admin"])
    with broker.task("job-2", subject=SUBJECT, audience=AUDIENCE, scopes=SCOPES) as in_task:
        secrets.add(in_task)

    def failing_task() -> None:
        with broker.task("job-3", subject=SUBJECT, audience=AUDIENCE, scopes=SCOPES) as failing:
            secrets.add(failing)
            raise RuntimeError("task body failed")

    with pytest.raises(RuntimeError):
        failing_task()

    @broker.ephemeral(subject=SUBJECT, audience=AUDIENCE, scopes=SCOPES, ttl=10)
    def job(cred: Credential) -> str:
        secrets.add(cred)
        return cred.lease_id

    job()
    broker.revoke(child.token, reason="done")
    broker.revoke(cred, reason="done")
    with pytest.raises(JitBrokerError):
        broker.renew(cred.token)
    doomed = issue(broker, owner="bob@example.com")
    secrets.add(doomed)
    broker.revoke_where(owner="bob@example.com", reason="offboarded")
    expiring = issue(broker, ttl=5)
    secrets.add(expiring)
    clock.advance(3600)
    assert expiring.lease_id in [lease.id for lease in broker.sweep()]
    with pytest.raises(InvalidToken):
        broker.verify(expiring.token, audience=AUDIENCE)


def tampered(token: str) -> list[str]:
    """Tokens one edit away from ``token`` that must each be rejected."""
    header, payload, signature = token.split(".")

    def flip(segment: str) -> str:
        return segment[:5] + ("A" if segment[5] != "A" else "B") + segment[6:]

    return [
        f"{header}.{payload}.{flip(signature)}",
        f"{header}.{flip(payload)}.{signature}",
        f"{header}x.{payload}.{signature}",
        f"{header}.{payload}.{signature[:-1]}",
        f"{token}.{signature}",
        f" {token}",
        f"{token}\n",
        f"Bearer {token}",
        token.replace(".", "", 1),
    ]


def test_audit_events_hide_secrets(
    broker: Broker, jitbroker_clock: FakeClock, secrets: Secrets, events: list[AuditEvent]
) -> None:
    lifecycle(broker, jitbroker_clock, secrets)
    actions = {event.action for event in events}
    assert {"issued", "renewed", "attenuated", "revoked", "revoked_where", "expired"} <= actions
    for i, event in enumerate(events):
        secrets.check_object(f"event {i} ({event.action})", event)
        secrets.check(f"event {i} to_dict", repr(event.to_dict()))
        secrets.check(f"event {i} json", json.dumps(event.to_dict()))


def check_records(caplog: pytest.LogCaptureFixture, secrets: Secrets) -> None:
    assert caplog.records, "nothing was logged: the check would be vacuous"
    for i, record in enumerate(caplog.records):
        secrets.check(f"log record {i} message", record.getMessage())
        secrets.check(f"log record {i} attributes", repr(vars(record)))
    secrets.check("formatted log output", caplog.text)


def test_logs_hide_secrets(
    broker: Broker,
    jitbroker_clock: FakeClock,
    secrets: Secrets,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="jitbroker")
    lifecycle(broker, jitbroker_clock, secrets)
    assert any(r.name == "jitbroker.audit" for r in caplog.records)
    check_records(caplog, secrets)


def test_logs_of_a_failing_audit_sink_hide_secrets(
    ring: KeyRing,
    jitbroker_clock: FakeClock,
    secrets: Secrets,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken_sink(event: AuditEvent) -> None:
        raise RuntimeError(f"sink down while handling {event.action}")

    caplog.set_level(logging.DEBUG)
    broker = Broker(issuer=TEST_ISSUER, keys=ring, clock=jitbroker_clock, audit=[broken_sink])
    lifecycle(broker, jitbroker_clock, secrets)
    assert any(r.exc_info for r in caplog.records), "the sink failure was not logged"
    check_records(caplog, secrets)


def test_opaque_logs_and_events_hide_the_token(
    opaque_broker: Broker,
    jitbroker_clock: FakeClock,
    secrets: Secrets,
    events: list[AuditEvent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    cred = issue(opaque_broker, task="job-1")
    secrets.add(cred)
    opaque_broker.verify(cred.token, audience=AUDIENCE)
    renewed = opaque_broker.renew(cred, ttl=120)
    child = opaque_broker.attenuate(cred, scopes=["orders:read"])
    secrets.add(renewed, child)
    last = "0" if cred.token[-1] != "0" else "1"
    for bad in (cred.token[:-1] + last, cred.token + "0", " " + cred.token, cred.token.upper()):
        secrets.add_token(bad)
        with pytest.raises(InvalidToken) as info:
            opaque_broker.verify(bad, audience=AUDIENCE)
        secrets.check_error("verify error", info.value)
    opaque_broker.revoke(cred.token, reason="done")
    with pytest.raises(InvalidToken) as info:
        opaque_broker.verify(child.token, audience=AUDIENCE)
    secrets.check_error("revoked opaque error", info.value)
    jitbroker_clock.advance(3600)
    opaque_broker.sweep()
    for i, event in enumerate(events):
        secrets.check_object(f"event {i}", event)
        secrets.check(f"event {i} to_dict", repr(event.to_dict()))
    check_records(caplog, secrets)


# -- exceptions --------------------------------------------------------------------
def test_verify_errors_hide_secrets(
    broker: Broker, ring: KeyRing, jitbroker_clock: FakeClock, secrets: Secrets
) -> None:
    cred = issue(broker)
    other = issue(broker)
    secrets.add(cred, other)
    header, payload, signature = cred.token.split(".")
    stranger = KeyRing.generate("HS256" if ring.active.symmetric else "EdDSA").active
    forged_input = f"{stranger.header}.{payload}"
    alg_none = b64url(json.dumps({"alg": "none", "typ": "at+jwt", "kid": ring.active.kid}).encode())
    bad_tokens = [
        *tampered(cred.token),
        f"{header}.{payload}.{other.token.split('.')[2]}",
        f"{forged_input}.{b64url(stranger.sign(forged_input.encode()))}",
        f"{alg_none}.{payload}.{signature}",
        cred.token * 30,  # over the length cap
    ]
    errors: list[tuple[str, BaseException]] = []
    for i, bad in enumerate(bad_tokens):
        secrets.add_token(bad)
        with pytest.raises(InvalidToken) as info:
            broker.verify(bad, audience=AUDIENCE)
        errors.append((f"tampered token {i}", info.value))
    checks: list[tuple[str, Callable[[], object]]] = [
        ("wrong audience", lambda: broker.verify(cred.token, audience="db:payments")),
        ("missing scope", lambda: broker.verify(cred.token, audience=AUDIENCE, scopes="x:y")),
    ]
    for where, call in checks:
        with pytest.raises(InvalidToken) as info:
            call()
        errors.append((where, info.value))
    broker.revoke(other, reason="done")
    with pytest.raises(InvalidToken) as info:
        broker.verify(other.token, audience=AUDIENCE)
    errors.append(("revoked", info.value))
    jitbroker_clock.advance(3600)
    with pytest.raises(InvalidToken) as info:
        broker.verify(cred.token, audience=AUDIENCE)
    errors.append(("expired", info.value))
    for where, error in errors:
        secrets.check_error(where, error)


def test_operation_errors_hide_tokens(broker: Broker, secrets: Secrets) -> None:
    cred = issue(broker)
    secrets.add(cred)
    bad_tokens = tampered(cred.token)
    operations: dict[str, Callable[[str], object]] = {
        "revoke": broker.revoke,
        "renew": broker.renew,
        "lease": broker.lease,
        "attenuate": broker.attenuate,
    }
    raised = 0
    for bad in bad_tokens:
        secrets.add_token(bad)
        for name, operation in operations.items():
            try:
                operation(bad)
            except JitBrokerError as error:
                raised += 1
                secrets.check_error(f"{name}(tampered token)", error)
    assert raised >= len(bad_tokens) * 3


@pytest.mark.parametrize("operation", ["renew", "lease", "attenuate"])
@pytest.mark.parametrize("prefix", ["Bearer ", " "])
def test_operation_errors_hide_a_prefixed_opaque_token(
    jitbroker_keys: KeyRing, jitbroker_clock: FakeClock, operation: str, prefix: str
) -> None:
    # Opaque tokens do not depend on the key algorithm: one ring is enough.
    broker = Broker(
        issuer=TEST_ISSUER, keys=jitbroker_keys, clock=jitbroker_clock, token_format="opaque"
    )
    secrets = Secrets(jitbroker_keys)
    cred = issue(broker)
    secrets.add(cred)
    with pytest.raises(JitBrokerError) as info:
        getattr(broker, operation)(prefix + cred.token)
    secrets.check_error(f"{operation}({prefix!r} + token)", info.value)


def test_key_errors_hide_secrets(ring: KeyRing, secrets: Secrets) -> None:
    key = ring.active
    jwk = key.to_jwk(private=True)
    member = "k" if key.symmetric else "d"
    calls: list[Callable[[], object]] = [
        lambda: KeyRing([key, key]),
        lambda: ring.retire(key.kid),
        lambda: ring.add(key),
        lambda: KeyRing.from_jwk({**jwk, "kid": "not-the-thumbprint"}),
        lambda: KeyRing.from_jwk({**jwk, "alg": "PS512"}),
        lambda: KeyRing.from_jwk({**jwk, member: jwk[member][:20]}),
        lambda: KeyRing.from_jwk({**jwk, member: jwk[member] + "!"}),
        lambda: KeyRing.from_jwks({"keys": [jwk, jwk]}),
        lambda: KeyRing.from_jwks({"keys": [jwk]}),  # private keys and HMAC secrets
    ]
    if not key.symmetric:
        pem = key.to_pem(password=b"correct horse")
        calls.append(lambda: KeyRing.from_pem(pem, password=b"wrong"))
        calls.append(lambda: KeyRing.from_pem(pem))
        calls.append(lambda: KeyRing.from_pem(key.to_pem()[:-40]))
    raised: list[BaseException] = []
    for call in calls:
        with pytest.raises(JitBrokerError) as info:
            call()
        raised.append(info.value)
    for i, error in enumerate(raised):
        secrets.check_error(f"key error {i}", error)


# -- pickling ------------------------------------------------------------------------
def _picklables(ring: KeyRing) -> Iterable[tuple[str, object]]:
    yield "key", ring.active
    yield "public key", ring.active.public()
    yield "key ring", ring
    yield "public key ring", ring.public()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_keys_cannot_be_pickled(ring: KeyRing, secrets: Secrets, protocol: int) -> None:
    for where, value in _picklables(ring):
        with pytest.raises(TypeError) as info:
            pickle.dumps(value, protocol=protocol)
        secrets.check_error(f"pickling the {where}", info.value)
