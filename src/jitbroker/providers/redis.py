"""``RedisUsers``: a Redis ACL user per lease, made at issue and deleted when it dies.

A scope maps to ACL rules from a whitelist (key and channel patterns under a
literal namespace, categories, commands); what could reach past the patterns
(``allkeys``, ``flushall``, ``keys``...), change the user itself (passwords,
``reset``, selectors), or touch the broker's own keys is refused at
construction, and every command or category the server puts in ``@admin`` or
``@dangerous`` at the first ``check``. The admin connection is a redis-py
client (``pip install 'jitbroker[redis]'``), made at first use.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from ..errors import InvalidRequest, ProviderError
from ..lease import Lease, Secret
from .base import check_provider_name

if TYPE_CHECKING:
    import redis

__all__ = ["RedisUsers"]
T = TypeVar("T")

_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")
_PATTERN = re.compile(r"(~|%R~|%W~|%RW~|&)([\x21-\x7e]+)")
_CATEGORY = re.compile(r"([+-])@([A-Za-z0-9_-]+)")
_COMMAND = re.compile(r"([+-])([A-Za-z][A-Za-z0-9_.-]*(?:\|[A-Za-z0-9_.-]+)?)")
_GLOB = re.compile(r"[*?\[\\]")
#: Words a refusal may name; any other rule (``>password``, ``#hash``...) is never echoed.
_KEYWORDS = frozenset(
    {"allkeys", "allchannels", "allcommands", "nocommands", "nopass", "on", "off", "reset"}
    | {"resetkeys", "resetchannels", "resetpass", "clearselectors"}
)
_CATEGORIES_REFUSED = frozenset({"all", "admin", "dangerous"})
#: Refused whatever the server says: they act on the server itself, or past any
#: key pattern (flush every key; ``keys``, ``scan`` and ``randomkey`` list key
#: names the user's patterns do not cover, the broker's lease ids among them).
_COMMANDS_REFUSED = frozenset(
    {"acl", "config", "module", "debug", "shutdown", "flushall", "flushdb", "keys"}
    | {"scan", "randomkey"}
)
#: Last on every user, so a category the server widens later still grants neither.
_FINAL_RULES = ("-@admin", "-@dangerous")


class RedisUsers:
    """A ``Provider`` of Redis ACL users: ``<prefix><lease id>`` with a random
    password and the ACL rules its scopes map to (``rules``: scope -> rules, a
    string split on whitespace or a sequence, applied in the order of the
    lease's scopes). ``admin_url`` is the admin connection (it runs ``ACL``);
    ``connect_url`` (default ``admin_url``) is what the holder gets, its user and
    password replaced by the lease's. Key and channel patterns must start with a
    literal namespace and a ``:``, and must not overlap a ``protect`` prefix
    (a store's prefix ``p``: keys ``p...`` and ``{p}...``).

    Whatever the rules, every user ends with ``-@admin -@dangerous``. At the
    first ``check`` the server is asked (one round trip, cached) which commands
    it puts in ``@admin`` and ``@dangerous``, what each category named holds and
    which commands it knows: a scope granting one of those, or naming a command
    (or ``cmd|subcommand``) the server does not know, is refused.

    Redis has no expiry on ACL users, so ``renew`` does nothing: the user lives
    until the lease dies and the broker's revoke (or its reaper, for an expiry)
    deletes it. Users are made with ``ACL SETUSER`` only: no ``ACL SAVE`` is
    done, and replicas do not get them unless they load the same ACL file.
    ``round_trips`` counts the calls made to Redis."""

    def __init__(
        self,
        name: str = "redis",
        *,
        admin_url: str,
        rules: Mapping[str, str | Sequence[str]],
        prefix: str = "jit_",
        protect: Sequence[str] = ("jitbroker",),
        connect_url: str | None = None,
        socket_timeout: float = 5.0,
    ) -> None:
        self.name = check_provider_name(name)
        if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
            raise InvalidRequest(
                "prefix is 1 to 32 letters, digits or '_', not starting with a digit"
            )
        self.prefix = prefix
        self._users = re.compile(re.escape(prefix) + "([0-9a-f]{32})")
        self._rules = _checked_rules(rules, _protected(protect))
        self._url = _checked_url(admin_url, "admin_url")
        self._connect_url = (
            self._url if connect_url is None else _checked_url(connect_url, "connect_url")
        )
        self._timeout = _checked_timeout(socket_timeout)
        #: How many round trips this provider made to Redis.
        self.round_trips = 0
        self._client: redis.Redis | None = None
        self._refused: dict[str, str] | None = None  # scope -> why the server refuses it
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<RedisUsers {self.name!r} prefix={self.prefix!r}>"

    def check(self, lease: Lease) -> None:
        """Refuse a lease with a scope that maps to no rules, or to rules the
        server puts in ``@admin`` or ``@dangerous`` (asked once, then cached)."""
        self._user(lease)
        unmapped = [scope for scope in lease.scopes if scope not in self._rules]
        if unmapped:
            raise InvalidRequest(
                f"provider {self.name!r} maps no Redis ACL rules to scope(s) "
                + ", ".join(map(repr, unmapped))
            )
        refused = self._server_refusals(lease)
        reasons = [f"{scope!r}: {refused[scope]}" for scope in lease.scopes if scope in refused]
        if reasons:
            raise InvalidRequest(f"provider {self.name!r} refuses " + "; ".join(reasons))

    def create(self, lease: Lease) -> Secret:
        """Make the lease's user in one ``ACL SETUSER`` (a reset, then its rules);
        its ``user``, ``password`` and ``url``."""
        self.check(lease)  # no I/O once the server's categories are known
        user, password = self._user(lease), secrets.token_urlsafe(24)
        rules = [rule for scope in lease.scopes for rule in self._rules[scope]]
        client = self._redis()
        self._call(
            client.execute_command,
            *("ACL", "SETUSER", user, "reset", "on", ">" + password, "resetchannels"),
            *rules,
            *_FINAL_RULES,
        )
        url = _with_credentials(self._connect_url, user, password)
        return Secret({"user": user, "password": password, "url": url})

    def revoke(self, lease: Lease) -> None:
        """Disconnect and delete the lease's user, in one round trip. ``CLIENT
        KILL USER`` goes first; ``ACL DELUSER`` then also drops any connection
        that authenticated in between. A missing user is success."""
        user = self._user(lease)
        for reply in self._pipelined(("CLIENT KILL", "USER", user), ("ACL DELUSER", user)):
            # On a missing user DELUSER answers 0, CLIENT KILL "ERR No such user".
            if isinstance(reply, Exception) and "No such user" not in str(reply):
                raise reply

    def renew(self, lease: Lease) -> None:
        """Nothing: a Redis ACL user has no expiry (see the class docstring)."""

    def managed(self) -> list[str]:
        """The lease ids of the users named ``<prefix><32 hex>`` (``ACL USERS``)."""
        users = self._call(self._redis().execute_command, "ACL USERS")
        return sorted(m[1] for user in users if (m := self._users.fullmatch(_text(user))))

    def close(self) -> None:
        """Close the admin connections (a later call opens new ones)."""
        if self._client is not None:
            self._client.close()

    # -- at the edge ---------------------------------------------------------
    def _user(self, lease: Lease) -> str:
        if not re.fullmatch(r"[0-9a-f]{32}", lease.id):
            raise InvalidRequest(f"provider {self.name!r}: a lease id is 32 lowercase hex digits")
        return self.prefix + lease.id

    def _redis(self) -> redis.Redis:
        with self._lock:  # one client (one pool) however many threads ask first
            if self._client is None:
                import redis
                from redis.backoff import NoBackoff
                from redis.retry import Retry

                self._client = redis.Redis.from_url(
                    self._url,
                    socket_timeout=self._timeout,
                    socket_connect_timeout=self._timeout,
                    # One retry, at once, for a pooled connection the server
                    # dropped: every call here is idempotent. The outbox retries
                    # the rest, so a dead server costs one timeout, not a backoff.
                    retry=Retry(NoBackoff(), 1),
                )
            return self._client

    def _call(self, fn: Callable[..., T], *args: Any, **options: Any) -> T:
        with self._lock:
            self.round_trips += 1
        return fn(*args, **options)

    def _pipelined(self, *commands: tuple[str, ...]) -> list[Any]:
        """Send ``commands`` in one round trip; each reply, or the error it got
        (a dead connection raises)."""
        pipe: Any = self._redis().pipeline(transaction=False)  # its methods are untyped
        for command in commands:
            pipe.execute_command(*command)
        replies: list[Any] = self._call(pipe.execute, raise_on_error=False)
        return replies

    def _server_refusals(self, lease: Lease) -> dict[str, str]:
        """The scopes the server's own categories refuse; ``ProviderError`` if it
        cannot be asked (``check`` runs before the broker's error handling)."""
        if self._refused is None:
            import redis

            try:
                self._refused = self._ask_server()
            except redis.RedisError as exc:
                raise ProviderError(
                    f"provider {self.name!r} could not ask Redis which commands are admin or"
                    f" dangerous ({type(exc).__name__}); nothing was issued",
                    provider=self.name,
                    lease_id=lease.id,
                ) from exc
        return self._refused

    def _ask_server(self) -> dict[str, str]:
        """One pipeline: ``ACL CAT admin`` and ``dangerous``, the members of every
        category the rules name, and ``COMMAND INFO`` of every command they name."""
        rules = [rule.lower() for scope_rules in self._rules.values() for rule in scope_rules]
        categories = sorted({m[2] for rule in rules if (m := _CATEGORY.fullmatch(rule))})
        commands = sorted({m[2] for rule in rules if (m := _COMMAND.fullmatch(rule))})
        asked: list[tuple[str, ...]] = [
            ("ACL CAT", category) for category in ("admin", "dangerous", *categories)
        ]
        if commands:
            asked.append(("COMMAND INFO", *commands))
        replies = self._pipelined(*asked)
        for reply in replies[:2]:
            if isinstance(reply, Exception):
                raise reply
        denied = {_text(name) for reply in replies[:2] for name in reply} | _COMMANDS_REFUSED
        members = {
            category: None if isinstance(reply, Exception) else {_text(name) for name in reply}
            for category, reply in zip(categories, replies[2 : 2 + len(categories)], strict=True)
        }
        infos = replies[-1] if commands else []
        if isinstance(infos, Exception):
            raise infos
        known = {command for command, info in zip(commands, infos, strict=True) if info}
        facts = _Facts(denied, members, known)
        refused: dict[str, str] = {}
        for scope, scope_rules in self._rules.items():
            reasons = [why for rule in scope_rules if (why := facts.refusal(rule))]
            if reasons:
                refused[scope] = "; ".join(reasons)
        return refused


class _Facts:
    """What the server said: its denied commands, the categories' members
    (None: no such category) and the commands it knows."""

    def __init__(
        self, denied: set[str], members: dict[str, set[str] | None], known: set[str]
    ) -> None:
        self.denied = denied
        self.members = members
        self.known = known
        self.denied_bases = {name.partition("|")[0] for name in denied}

    def refusal(self, rule: str) -> str | None:
        """Why the server's categories refuse ``rule``, or None."""
        lowered = rule.lower()
        if m := _CATEGORY.fullmatch(lowered):
            return self._category(rule, m[1], m[2])
        if m := _COMMAND.fullmatch(lowered):
            return self._command(rule, m[1], m[2])
        return None  # a key or channel pattern

    def _category(self, rule: str, sign: str, category: str) -> str | None:
        members = self.members[category]
        if members is None:
            return f"{rule!r} names no category this server knows"
        if sign == "-":
            return None
        worst = sorted(name for name in members if self._is_denied(name))
        if not worst:
            return None
        more = f" and {len(worst) - 3} more" if len(worst) > 3 else ""
        return f"{rule!r} grants {', '.join(worst[:3])}{more} (list the commands it needs)"

    def _command(self, rule: str, sign: str, command: str) -> str | None:
        if command not in self.known:
            return f"{rule!r} names no command or subcommand this server knows"
        if sign == "+" and self._is_denied(command):
            return f"{rule!r} is a command the server puts in @admin or @dangerous"
        if sign == "+" and command in self.denied_bases:
            return f"{rule!r} grants subcommands in @admin or @dangerous (name the safe ones)"
        return None

    def _is_denied(self, command: str) -> bool:
        return command in self.denied or command.partition("|")[0] in _COMMANDS_REFUSED


# -- construction: plain checks ---------------------------------------------------
def _protected(protect: object) -> tuple[str, ...]:
    """The key prefixes no pattern may overlap: each ``p`` and its hash-tagged ``{p}``."""
    if isinstance(protect, str) or not isinstance(protect, Sequence):
        raise InvalidRequest("protect is a sequence of key prefixes, such as ('jitbroker',)")
    if not all(isinstance(p, str) and p for p in protect):
        raise InvalidRequest("each protected key prefix is a non-empty string")
    return tuple(form for p in protect for form in (p, "{" + p + "}"))


def _checked_rules(rules: object, protected: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """``{scope: rules}``, each rule on the whitelist."""
    if not isinstance(rules, Mapping) or not rules:
        raise InvalidRequest("rules maps each scope to Redis ACL rules, and needs one scope")
    checked: dict[str, tuple[str, ...]] = {}
    for scope, value in rules.items():
        if not isinstance(scope, str) or not scope:
            raise InvalidRequest("each scope in rules is a non-empty string")
        if isinstance(value, str):
            split = tuple(value.split())
        elif isinstance(value, Sequence) and all(isinstance(rule, str) for rule in value):
            split = tuple(value)
        else:
            raise InvalidRequest(f"rules for scope {scope!r} are a string or a sequence of them")
        if not split:
            raise InvalidRequest(f"scope {scope!r} maps to no rules")
        for number, rule in enumerate(split, 1):
            why = _refusal(rule, protected)
            if why:
                shown = repr(rule) if _shown(rule) else f"rule #{number}"
                raise InvalidRequest(f"scope {scope!r}: {shown} is refused: {why}")
        checked[scope] = split
    return checked


def _refusal(rule: str, protected: tuple[str, ...]) -> str | None:
    """Why ``rule`` is off the whitelist, or None."""
    if not re.fullmatch(r"[\x21-\x7e]+", rule):
        return "a rule is one word of printable ASCII (no spaces)"
    if m := _PATTERN.fullmatch(rule):
        return _pattern_refusal(m[2], protected)
    if m := _CATEGORY.fullmatch(rule):
        refused = m[1] == "+" and m[2].lower() in _CATEGORIES_REFUSED
        return "it grants admin or dangerous commands" if refused else None
    if m := _COMMAND.fullmatch(rule):
        base = m[2].lower().partition("|")[0]
        refused = m[1] == "+" and base in _COMMANDS_REFUSED
        return "it acts on the server or past the key patterns" if refused else None
    return (
        "only ~pat, %R~pat, %W~pat, %RW~pat, &pat, +@category, -@category,"
        " +command, -command and +command|subcommand may be mapped"
    )


def _shown(rule: str) -> bool:
    """Whether a refusal may echo ``rule``: a keyword, or a pattern, category or
    command (never a password, a hash or a rule with spaces smuggled in)."""
    if rule.lower() in _KEYWORDS:
        return True
    shapes = (_PATTERN, _CATEGORY, _COMMAND)
    return len(rule) <= 64 and any(shape.fullmatch(rule) for shape in shapes)


def _pattern_refusal(pattern: str, protected: tuple[str, ...]) -> str | None:
    """Why a key or channel pattern is refused: no literal namespace before its
    first ``:``, or a literal part that overlaps a protected prefix."""
    namespace, colon, _ = pattern.partition(":")
    if not colon or not namespace or _GLOB.search(namespace):
        return "a pattern starts with a literal namespace and ':' (no * ? [ \\ before it)"
    literal = _GLOB.split(pattern, maxsplit=1)[0]
    if any(literal.startswith(p) or p.startswith(literal) for p in protected):
        return "it overlaps a protected key prefix (the broker's own keys)"
    return None


def _checked_url(url: object, label: str) -> str:
    """``url`` if redis-py can connect with it; never echoed (it may hold a password)."""
    from redis.connection import parse_url

    if isinstance(url, str):
        try:
            parse_url(url)  # type: ignore[no-untyped-call]
            return url
        except ValueError:
            pass
    raise InvalidRequest(f"{label} must be a valid redis://, rediss:// or unix:// URL")


def _checked_timeout(timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < 3600:
        raise InvalidRequest("socket_timeout is a number of seconds, above 0 and below 3600")
    return float(timeout)


def _with_credentials(url: str, user: str, password: str) -> str:
    """``url`` with its user and password (in the authority or the query) replaced."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in {"username", "password"}]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
