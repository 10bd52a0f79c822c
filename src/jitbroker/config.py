"""``jitbroker.toml``: one file for the CLI and ``jitbroker serve``.

::

    [broker]
    issuer = "urn:acme:jitbroker"
    keys = "keys"                  # a key directory (`jitbroker keys generate keys`)
    key_password_env = "JB_KEY_PW" # optional: the variable holding its passphrase
    store = "leases.db"            # a SQLite path or store URL (see open_store)
    policy = "policy.toml"         # optional: a policy file (Policy.from_toml)
    default_ttl = "5m"             # seconds, or a duration: 600, "10m", "1h30m"
    max_ttl = "1h"
    audit_log = "audit.jsonl"      # optional: JSON lines, appended, mode 0600
    labels = { env = "prod" }      # optional: what policy rules match on

    [serve]    # ...    read by `jitbroker serve` (jitbroker.web.config)
    [[trust]]  # ...
    [[clients]] # ...

Key material is never inline: ``keys`` names a directory, trusted only as
``KeyRing.from_dir`` trusts one. Relative paths (keys, store, policy, audit
log) resolve against the directory of the config file, not the working
directory, so a config works the same from cron, systemd or a shell.

The file is refused (``InvalidRequest``, one line saying what to run) when
group or others may write it, or it belongs to another user than you or root:
whoever can edit it chooses the store, the policy and the key directory, so it
is trusted as OpenSSH trusts ``~/.ssh/config``. The policy file is checked the
same way. Unknown tables or keys and values of the wrong type are refused
naming them; a value is never echoed (a store URL may hold a password).
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import attrs

from .errors import InvalidRequest

if TYPE_CHECKING:
    from .broker import Broker
    from .metrics import Metrics

__all__ = ["CONFIG_ENV", "Config", "load_config", "parse_duration"]

#: The environment variable naming the default config file.
CONFIG_ENV = "JITBROKER_CONFIG"
#: Tables read by other parts (``jitbroker.web.config`` validates them).
SECTIONS = ("serve", "trust", "clients")
_BROKER_KEYS = {
    "issuer": str,
    "keys": str,
    "key_password_env": str,
    "store": str,
    "policy": str,
    "default_ttl": "duration",
    "max_ttl": "duration",
    "leeway": "duration",
    "token_format": str,
    "audit_log": str,
    "labels": dict,
}
_UNIT = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?"
                       r"(?:(\d+(?:\.\d+)?)s)?")  # fmt: skip
_MAX_CONFIG_BYTES = 1 << 20  # a config is a few hundred bytes; refuse a huge file unread


def parse_duration(value: object, name: str = "duration") -> float:
    """Seconds from ``600``, ``"600"``, ``"10m"``, ``"1h30m"``, ``"2d"`` or
    ``"1.5s"``; ``InvalidRequest`` naming ``name`` for anything else, zero or
    a negative value."""
    if isinstance(value, bool):
        raise InvalidRequest(f"{name} must be a duration such as 600, '10m' or '1h30m'")
    if isinstance(value, int | float):
        result = float(value)
    elif isinstance(value, str):
        result = _parse_text(value.strip().lower(), name)
    else:
        raise InvalidRequest(f"{name} must be a duration such as 600, '10m' or '1h30m'")
    if not 0 < result < float(2**53):
        raise InvalidRequest(f"{name} must be more than zero seconds (and finite)")
    return result


def _parse_text(text: str, name: str) -> float:
    try:
        return float(text) if text and text.replace(".", "", 1).isdigit() else _units(text)
    except ValueError:
        raise InvalidRequest(
            f"{name}: {text[:20]!r} is not a duration (seconds, or like 10m, 1h30m, 2d)"
        ) from None


def _units(text: str) -> float:
    match = _DURATION.fullmatch(text)
    if not text or match is None:
        raise ValueError(text)
    return sum(float(n) * _UNIT[u] for n, u in zip(match.groups(), "dhms", strict=True) if n)


@attrs.frozen(slots=True, weakref_slot=False)
class Config:
    """A loaded ``jitbroker.toml``: the ``[broker]`` settings, paths resolved."""

    path: Path
    issuer: str
    keys: Path
    #: The store URL or SQLite path. Hidden from ``repr``: it may hold a password.
    store: str = attrs.field(repr=False)
    key_password_env: str | None = None
    policy: Path | None = None
    default_ttl: float = 300.0
    max_ttl: float = 3600.0
    leeway: float | None = None
    token_format: str = "jws"
    audit_log: Path | None = None
    labels: Mapping[str, str] = attrs.field(factory=dict)
    #: The raw ``serve``, ``trust`` and ``clients`` tables (validated elsewhere).
    sections: Mapping[str, Any] = attrs.field(factory=dict, repr=False)

    def open_broker(
        self,
        *,
        create_store: bool = True,
        metrics: Metrics | None = None,
        lease_warning_threshold: int | None = None,
    ) -> Broker:
        """A ``Broker`` with these keys, store, policy and audit log. With
        ``create_store=False`` the store must exist (a typo is an error, never
        a new empty store). ``metrics`` and ``lease_warning_threshold`` are
        ``Broker``'s (see docs/metrics.md; None: no metrics, the default
        threshold). Close it with ``broker.close()`` (the store) when done;
        the audit log file is closed when the broker is collected or at exit."""
        from .audit import JsonLinesSink
        from .broker import Broker
        from .keyring import KeyRing
        from .metrics import check_threshold
        from .policy import Policy
        from .stores import open_store

        options: dict[str, Any] = {} if self.leeway is None else {"leeway": self.leeway}
        if lease_warning_threshold is not None:  # checked before a store is opened
            options["lease_warning_threshold"] = check_threshold(lease_warning_threshold)
        if metrics is not None:
            options["metrics"] = metrics

        # Followed: `jitbroker keys rotate/retire` on the directory reach a running
        # `jitbroker serve` within the poll interval (1 s), without a restart.
        keys = KeyRing.from_dir(self.keys, self._password(), follow=True)
        policy = None
        if self.policy is not None:
            _check_private(self.policy, "policy file")
            policy = Policy.from_toml(self.policy)
        store = open_store(self.store, create=create_store)
        try:
            sinks = [] if self.audit_log is None else [JsonLinesSink(self.audit_log)]
            broker = Broker(
                issuer=self.issuer,
                keys=keys,
                store=store,
                policy=policy,
                default_ttl=self.default_ttl,
                max_ttl=self.max_ttl,
                token_format=self.token_format,  # type: ignore[arg-type]
                audit=sinks,
                labels=self.labels,
                **options,
            )
        except BaseException:
            for sink in sinks:
                sink.close()
            store.close()
            raise
        for sink in sinks:  # the audit file closes with the broker, whenever it goes
            weakref.finalize(broker, sink.close)
        return broker

    def _password(self) -> bytes | None:
        if self.key_password_env is None:
            return None
        value = os.environ.get(self.key_password_env)
        if not value:
            raise InvalidRequest(
                f"[broker] key_password_env: environment variable {self.key_password_env}"
                " is not set or empty"
            )
        return value.encode()


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and check a ``jitbroker.toml`` (default: ``$JITBROKER_CONFIG``)."""
    if path is None:
        path = os.environ.get(CONFIG_ENV) or None
        if path is None:
            raise InvalidRequest(f"give --config FILE or set {CONFIG_ENV}")
    if not isinstance(path, str | os.PathLike):
        raise InvalidRequest(f"a config path must be a path, not {type(path).__name__}")
    file = Path(path).absolute()
    data = _read(file)
    unknown = sorted(set(data) - {"broker", *SECTIONS})
    if unknown:
        raise InvalidRequest(
            f"{file}: unknown table(s) {', '.join(unknown)} (known: broker, {', '.join(SECTIONS)})"
        )
    broker = data.get("broker")
    if not isinstance(broker, dict):
        raise InvalidRequest(f"{file}: needs a [broker] table (issuer, keys, store)")
    return _broker_config(file, broker, {k: data[k] for k in SECTIONS if k in data})


def _read(file: Path) -> dict[str, Any]:
    try:
        # O_NONBLOCK: a FIFO named as the config must not hang us; no effect on files.
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise InvalidRequest(f"{file}: cannot read the config file ({exc.strerror})") from exc
    except ValueError as exc:  # a NUL byte in the path
        raise InvalidRequest(f"{str(file)!r}: not a usable file path") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidRequest(f"{file}: the config must be a regular file")
        _check_owner(file, info, "config file")
        raw = os.read(fd, _MAX_CONFIG_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > _MAX_CONFIG_BYTES:
        raise InvalidRequest(f"{file}: larger than {_MAX_CONFIG_BYTES} bytes; not a config")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"{file}: not valid TOML: {exc}") from None


def _check_private(file: Path, what: str) -> None:
    try:
        info = os.stat(file)
    except OSError as exc:
        raise InvalidRequest(f"{file}: cannot read the {what} ({exc.strerror})") from exc
    _check_owner(file, info, what)


def _check_owner(file: Path, info: os.stat_result, what: str) -> None:
    getuid = getattr(os, "getuid", None)
    if getuid is None:  # no POSIX ownership to check (Windows)
        return
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise InvalidRequest(
            f"{file}: the {what} is writable by group or others, who could point the"
            f" broker at their own keys or policy; run `chmod go-w {file}`"
        )
    if info.st_uid not in (0, getuid()):
        raise InvalidRequest(f"{file}: the {what} belongs to another user (uid {info.st_uid})")


def _broker_config(file: Path, table: dict[str, Any], sections: dict[str, Any]) -> Config:
    unknown = sorted(set(table) - set(_BROKER_KEYS))
    if unknown:
        raise InvalidRequest(
            f"{file}: unknown key(s) in [broker]: {', '.join(unknown)}"
            f" (known: {', '.join(sorted(_BROKER_KEYS))})"
        )
    for key in ("issuer", "keys", "store"):
        if key not in table:
            raise InvalidRequest(f"{file}: [broker] needs {key!r}")
    values = {key: _typed(file, key, value) for key, value in table.items()}
    base = file.parent
    store = values.pop("store")
    if not store.strip():
        raise InvalidRequest(f"{file}: [broker] store must not be empty")
    return Config(
        path=file,
        keys=base / values.pop("keys"),
        store=_resolve_store(store, base),
        policy=None if "policy" not in values else base / values.pop("policy"),
        audit_log=None if "audit_log" not in values else base / values.pop("audit_log"),
        labels=MappingProxyType(values.pop("labels", {})),
        sections=MappingProxyType(sections),
        **values,
    )


def _typed(file: Path, key: str, value: object) -> Any:
    kind = _BROKER_KEYS[key]
    if kind == "duration":
        try:
            return parse_duration(value, f"[broker] {key}")
        except InvalidRequest as exc:
            raise InvalidRequest(f"{file}: {exc}") from None
    if not isinstance(value, kind):  # type: ignore[arg-type]
        expected = "a table" if kind is dict else "a string"
        raise InvalidRequest(f"{file}: [broker] {key} must be {expected}")
    if kind is dict:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):  # type: ignore[attr-defined]
            raise InvalidRequest(f"{file}: [broker] labels must map names to strings")
        return dict(value)  # type: ignore[call-overload]
    if key == "token_format" and value not in ("jws", "opaque"):
        raise InvalidRequest(f"{file}: [broker] token_format must be 'jws' or 'opaque'")
    if not value:
        raise InvalidRequest(f"{file}: [broker] {key} must not be empty")
    return value


def _resolve_store(store: str, base: Path) -> str:
    """A SQLite path (bare or ``sqlite:``) made absolute against ``base``; URLs
    of servers are returned as given."""
    if store.lower().startswith("sqlite:"):
        rest = store[len("sqlite:") :]
        if rest.startswith("///") and not rest.startswith("////"):  # sqlite:///relative
            return "sqlite:////" + str(base / rest[3:]).lstrip("/")
        if rest.startswith("//") or os.path.isabs(rest):
            return store  # absolute already (or malformed: open_store says so)
        return "sqlite:" + str(base / rest)
    if "://" in store or re.match(r"\s*[A-Za-z_]+\s*=", store):
        return store  # a server URL (or a refused DSN): open_store judges it
    return str(base / store)
