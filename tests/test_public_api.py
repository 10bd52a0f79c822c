"""The public surface: names re-exported from ``jitbroker`` with a sorted ``__all__``."""

from __future__ import annotations

import jitbroker
from jitbroker import errors


def test_all_is_sorted_and_complete() -> None:
    assert jitbroker.__all__ == sorted(jitbroker.__all__)
    for name in jitbroker.__all__:
        assert getattr(jitbroker, name) is not None


def test_design_names_are_exported() -> None:
    for name in (
        "Broker",
        "AsyncBroker",
        "KeyRing",
        "MemoryStore",
        "Policy",
        "Rule",
        "Lease",
        "Credential",
        "Claims",
        "Verifier",
    ):
        assert name in jitbroker.__all__


def test_error_tree() -> None:
    assert errors.__all__ == sorted(errors.__all__)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.JitBrokerError)
    for name in (
        "MalformedToken",
        "BadSignature",
        "TokenExpired",
        "TokenNotYetValid",
        "WrongIssuer",
        "WrongAudience",
        "InsufficientScope",
        "TokenRevoked",
        "UnknownKey",
        "UnknownLease",
    ):
        assert issubclass(getattr(errors, name), errors.InvalidToken)
    for name in ("LeaseNotFound", "LeaseNotActive", "RenewalDenied"):
        assert issubclass(getattr(errors, name), errors.LeaseError)
    assert issubclass(errors.StoreUnavailable, errors.StoreError)
    assert issubclass(errors.InvalidRequest, ValueError)
