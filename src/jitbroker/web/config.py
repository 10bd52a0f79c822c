"""The service tables of ``jitbroker.toml``: ``[serve]``, ``[[trust]]`` and ``[[clients]]``.

::

    [serve]
    base_url = "https://broker.example"   # required: the public URL (RFC 8414 issuer)
    host = "127.0.0.1"                    # default: loopback only
    port = 8471
    workers = 1
    tls_cert = "tls/cert.pem"             # with tls_key: serve HTTPS
    tls_key = "tls/key.pem"
    tls_ca = "tls/clients-ca.pem"         # optional: require client certificates
    resource_servers = ["orders-api"]     # rule names / client ids allowed to introspect
    offboarders = ["hr-offboarding"]      # may revoke any owner's leases
    default_ttl = "5m"
    max_body = 65536
    retry_after = 5
    dpop = true
    dpop_nonces = false                   # require server nonces in DPoP proofs (RFC 9449 8)
    allow_any_access = false              # serve a broker without a policy (refused by default)
    insecure_http = false                 # plain HTTP on a non-loopback host (behind TLS)
    access_log = false                    # uvicorn's access log (off: a careless client's
                                          # URL may carry a secret)
    metrics = false                       # GET /metrics: Prometheus, through OpenTelemetry
                                          # (needs jitbroker[otel]; docs/metrics.md)
    health = false                        # GET /healthz: readiness (503 when the store is down)
    lease_warning_threshold = 256000      # active leases over which /healthz says degraded

    [[trust]]                             # one TrustRule per table (docs/trust.md)
    issuer = "https://token.actions.githubusercontent.com"
    audience = "https://broker.example"
    subject = "svc:ci:{repository}"
    claims = { repository = "acme/*", ref = "refs/heads/main" }
    max_ttl = "1h"

    [[clients]]                           # a ClientKey (jwks_file) or ClientSecret (secret_hash)
    client_id = "orders-api"
    subject = "svc:orders-api"
    jwks_file = "clients/orders-api.jwks.json"

Every table is checked as a whole: an unknown key, a value of the wrong type or
a missing required key is an ``InvalidRequest`` naming it (never echoing a
value). Relative paths resolve against the config file's directory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from ..config import Config, parse_duration
from ..errors import InvalidRequest
from .service import check_base_url
from .trust import ClientKey, ClientSecret, TrustRule

__all__ = ["ServeSettings", "clients_from", "serve_settings", "trust_rules"]

DEFAULT_PORT = 8471


@attrs.frozen
class ServeSettings:
    """The ``[serve]`` table, checked; paths absolute."""

    base_url: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    workers: int = 1
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    resource_servers: tuple[str, ...] = ()
    offboarders: tuple[str, ...] = ()
    default_ttl: float = 300.0
    max_body: int = 65536
    retry_after: int = 5
    dpop: bool = True
    dpop_nonces: bool = False
    allow_any_access: bool = False
    insecure_http: bool = False
    access_log: bool = False
    log_level: str = "info"
    metrics: bool = False
    health: bool = False
    lease_warning_threshold: int | None = None

    def app_options(self) -> dict[str, Any]:
        """The keyword arguments of ``broker_app`` these settings give."""
        return {
            "base_url": self.base_url,
            "resource_servers": self.resource_servers,
            "offboarders": self.offboarders,
            "default_ttl": self.default_ttl,
            "max_body": self.max_body,
            "retry_after": self.retry_after,
            "dpop": self.dpop,
            "allow_any_access": self.allow_any_access,
        }


_SERVE: dict[str, Any] = {
    "base_url": str,
    "host": str,
    "port": int,
    "workers": int,
    "tls_cert": "path",
    "tls_key": "path",
    "tls_ca": "path",
    "resource_servers": "names",
    "offboarders": "names",
    "default_ttl": "duration",
    "max_body": int,
    "retry_after": int,
    "dpop": bool,
    "dpop_nonces": bool,
    "allow_any_access": bool,
    "insecure_http": bool,
    "access_log": bool,
    "log_level": str,
    "metrics": bool,
    "health": bool,
    "lease_warning_threshold": int,
}
_TRUST: dict[str, Any] = {
    "issuer": str,
    "audience": str,
    "subject": str,
    "claims": "strings",
    "jwks_url": str,
    "max_ttl": "duration",
    "owner": str,
    "name": str,
    "algorithms": "names",
    "allow_http": bool,
    "max_assertion_ttl": "duration",
    "single_use": bool,
}
_CLIENT: dict[str, Any] = {
    "client_id": str,
    "subject": str,
    "owner": str,
    "max_ttl": "duration",
    "jwks_file": "path",
    "secret_hash": str,
}
_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _value(where: str, key: str, kind: Any, value: object, base: Path) -> Any:
    """``value`` checked as ``kind``; paths resolved against ``base``."""
    if kind == "duration":
        return parse_duration(value, f"{where} {key}")
    if kind == "path":
        if not isinstance(value, str) or not value:
            raise InvalidRequest(f"{where} {key} must be a file path (a string)")
        return base / value
    if kind == "names":
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise InvalidRequest(f"{where} {key} must be a list of non-empty strings")
        return tuple(value)
    if kind == "strings":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise InvalidRequest(f"{where} {key} must be a table of strings")
        return dict(value)
    # bool is an int: a port of `true` is refused, as `port = "80"` is.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidRequest(f"{where} {key} must be {_KIND_NAMES[kind]}")
    return value


_KIND_NAMES = {str: "a string", int: "a whole number", bool: "true or false"}


def _table(where: str, table: object, keys: Mapping[str, Any], base: Path) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise InvalidRequest(f"{where} must be a table")
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise InvalidRequest(
            f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(keys))})"
        )
    return {key: _value(where, key, keys[key], value, base) for key, value in table.items()}


def _tables(config: Config, name: str) -> Sequence[object]:
    value = config.sections.get(name, [])
    if not isinstance(value, list):
        raise InvalidRequest(f"{config.path}: {name} must be an array of tables: [[{name}]]")
    return value


def serve_settings(config: Config) -> ServeSettings:
    """The ``[serve]`` table of ``config`` (``base_url`` is required)."""
    where = f"{config.path}: [serve]"
    values = _table(where, config.sections.get("serve", {}), _SERVE, config.path.parent)
    if "base_url" not in values:
        raise InvalidRequest(f"{where} needs base_url, the public URL clients call")
    try:
        values["base_url"] = check_base_url(values["base_url"])
    except InvalidRequest as exc:
        raise InvalidRequest(f"{where} {exc}") from None
    if not 0 <= values.get("port", DEFAULT_PORT) <= 65535:
        raise InvalidRequest(f"{where} port must be 0 to 65535")
    if not 1 <= values.get("workers", 1) <= 64:
        raise InvalidRequest(f"{where} workers must be 1 to 64")
    if ("tls_cert" in values) != ("tls_key" in values):
        raise InvalidRequest(f"{where} tls_cert and tls_key go together")
    if "tls_ca" in values and "tls_cert" not in values:
        raise InvalidRequest(f"{where} tls_ca (client certificates) needs tls_cert and tls_key")
    if values.get("dpop_nonces", False) and not values.get("dpop", True):
        raise InvalidRequest(f"{where} dpop_nonces needs dpop = true")
    if values.get("lease_warning_threshold", 1) < 1:
        raise InvalidRequest(f"{where} lease_warning_threshold must be at least 1")
    if values.get("log_level", "info") not in _LEVELS:
        raise InvalidRequest(f"{where} log_level must be one of {', '.join(_LEVELS)}")
    return ServeSettings(**values)


def trust_rules(config: Config) -> list[TrustRule]:
    """One ``TrustRule`` per ``[[trust]]`` table."""
    rules = []
    for i, table in enumerate(_tables(config, "trust")):
        where = f"{config.path}: [[trust]] #{i + 1}"
        values = _table(where, table, _TRUST, config.path.parent)
        missing = [k for k in ("issuer", "audience", "subject") if k not in values]
        if missing:
            raise InvalidRequest(f"{where} needs {', '.join(missing)}")
        try:
            rules.append(TrustRule(**values))
        except InvalidRequest as exc:
            raise InvalidRequest(f"{where}: {exc}") from None
    return rules


def clients_from(config: Config) -> list[ClientKey | ClientSecret]:
    """One ``ClientKey`` (``jwks_file``) or ``ClientSecret`` (``secret_hash``) per
    ``[[clients]]`` table."""
    clients: list[ClientKey | ClientSecret] = []
    for i, table in enumerate(_tables(config, "clients")):
        where = f"{config.path}: [[clients]] #{i + 1}"
        values = _table(where, table, _CLIENT, config.path.parent)
        missing = [k for k in ("client_id", "subject") if k not in values]
        if missing:
            raise InvalidRequest(f"{where} needs {', '.join(missing)}")
        if ("jwks_file" in values) == ("secret_hash" in values):
            raise InvalidRequest(f"{where} needs one of jwks_file or secret_hash")
        options = {k: values[k] for k in ("max_ttl", "owner") if k in values}
        try:
            if "jwks_file" in values:
                clients.append(
                    ClientKey.from_jwks_file(
                        values["client_id"], values["jwks_file"], values["subject"], **options
                    )
                )
            else:
                clients.append(
                    ClientSecret(
                        values["client_id"], values["secret_hash"], values["subject"], **options
                    )
                )
        except InvalidRequest as exc:
            raise InvalidRequest(f"{where}: {exc}") from None
    return clients
