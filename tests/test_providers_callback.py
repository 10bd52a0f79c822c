"""``CallbackProvider`` in a broker: sync and async callables, and bad input."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from jitbroker import Broker, Lease
from jitbroker.errors import InvalidRequest
from jitbroker.providers import CallbackProvider, Provider, check_provider_name


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_callback_provider_mints_and_removes_keys(kind: str) -> None:
    keys: dict[str, str] = {}

    def create(lease: Lease) -> dict[str, str]:
        keys[lease.id] = "k-" + lease.id[:8]
        return {"api_key": keys[lease.id]}

    def revoke(lease: Lease) -> None:
        keys.pop(lease.id, None)

    async def acreate(lease: Lease) -> dict[str, str]:
        return create(lease)

    async def arevoke(lease: Lease) -> None:
        revoke(lease)

    provider = CallbackProvider(
        "billing-api",
        create=create if kind == "sync" else acreate,
        revoke=revoke if kind == "sync" else arevoke,
        managed=lambda: list(keys),
    )
    assert isinstance(provider, Provider)
    broker = Broker(providers=[provider])
    with broker.task("sync", subject="svc:sync", audience="billing-api", ttl=60) as cred:
        assert cred.secret is not None
        assert cred.secret["api_key"] == keys[cred.lease_id]
        assert keys[cred.lease_id] not in repr(cred)
    assert keys == {}
    assert broker.reconcile().revoked == ()


def test_bad_names_and_results_are_refused() -> None:
    for bad in ("", " x", "a/b", "x" * 65, 3):
        with pytest.raises(InvalidRequest):
            check_provider_name(bad)
    with pytest.raises(InvalidRequest):
        CallbackProvider("p", create="nope", revoke=print)  # type: ignore[arg-type]
    provider = CallbackProvider("p", create=lambda lease: 42, revoke=lambda lease: None)
    broker = Broker(providers=[provider])
    with pytest.raises(Exception, match="could not create"):
        broker.issue("svc:a", "p", ttl=60)


def test_importing_providers_loads_no_backend_driver() -> None:
    code = (
        "import sys, jitbroker.providers;"
        "print(sorted(m for m in ('psycopg', 'redis', 'httpx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_docs_example_runs() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "providers.md").read_text()
    [block] = [b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "CallbackProvider(" in b]
    exec(compile(block, "docs/providers.md", "exec"), {"__name__": "__main__"})  # noqa: S102
