"""The URL a client called, rebuilt on the server for a DPoP proof's ``htu`` (no I/O).

RFC 9449 section 4.3: the proof names the request's URI without query and
fragment. The server rebuilds it from what it knows, in this order:

1. ``public_url`` (e.g. ``"https://api.example.com"``), when set: the origin is
   fixed, whatever the request or any proxy says. The safest choice.
2. Otherwise the connection's scheme and the ``Host`` header, overridden by a
   ``Forwarded`` (RFC 7239) or ``X-Forwarded-Proto`` / ``X-Forwarded-Host``
   header only when the direct peer is one of ``trusted_proxies``. Never by
   default: anyone can send those headers.

The path is the request's raw (still percent-encoded) path, as the client sent it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import NamedTuple
from urllib.parse import quote, urlsplit

from ..errors import InvalidRequest

__all__ = [
    "Origin",
    "TrustedProxies",
    "forwarded_origin",
    "parse_public_url",
    "quoted_path",
    "request_url",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_FORWARDED = 4096  # a proxy chain is a few hops; longer is refused, not parsed
# Comma- and semicolon-separated lists whose quoted-strings may hold either.
_ELEMENT = re.compile(r'(?:[^,"]|"(?:[^"\\]|\\.)*")+')
_PARAM = re.compile(r'(?:[^;"]|"(?:[^"\\]|\\.)*")+')
_SAFE_PATH = "/:@!$&'()*+,;=~%"


class Origin(NamedTuple):
    """Scheme and authority (``host[:port]``) of the URL the client called."""

    scheme: str
    host: str


class TrustedProxies:
    """The peers (IP addresses or networks) whose forwarding headers are believed."""

    def __init__(self, proxies: Iterable[str | Network] = ()) -> None:
        if isinstance(proxies, str):
            proxies = (proxies,)
        try:
            self.networks: tuple[Network, ...] = tuple(
                ipaddress.ip_network(p, strict=False) for p in proxies
            )
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(
                "trusted_proxies must be IP addresses or networks, like '10.0.0.0/8'"
            ) from exc

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, peer: object) -> bool:
        if not self.networks or not isinstance(peer, str):
            return False
        if peer.startswith("["):  # "[2001:db8::1]:4711", as Forwarded writes IPv6 nodes
            peer = peer[1:].partition("]")[0]
        elif peer.count(":") == 1:  # "192.0.2.43:47011"
            peer = peer.partition(":")[0]
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:  # a unix socket path, "unknown", an obfuscated node
            return False
        return any(address in network for network in self.networks)

    def __repr__(self) -> str:
        return f"TrustedProxies({[str(n) for n in self.networks]!r})"


def parse_public_url(url: str | None) -> Origin | None:
    """``public_url`` as an origin; it must be an http(s) origin with no path."""
    if url is None:
        return None
    parts = urlsplit(url) if isinstance(url, str) else None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.netloc
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or "@" in parts.netloc
    ):
        raise InvalidRequest(
            "public_url must be the origin clients call, like 'https://api.example.com' "
            "(no path: a mount point is the ASGI root_path or WSGI SCRIPT_NAME)"
        )
    return Origin(parts.scheme, parts.netloc.lower())


def forwarded_origin(
    origin: Origin,
    proxies: TrustedProxies,
    forwarded: list[str],
    x_proto: list[str],
    x_host: list[str],
) -> Origin:
    """``origin`` as rewritten by the trusted proxies in front of the server.

    ``Forwarded`` wins over ``X-Forwarded-*``. Its elements are read from the
    right (the nearest proxy's) leftwards while the hop an element names
    (``for=``) is itself a trusted proxy, so a value the client wrote is
    never reached. ``X-Forwarded-Proto``/``-Host`` carry no hop: their last
    value, the one the nearest proxy set, is used.
    """
    if forwarded:
        text = ",".join(forwarded)
        if len(text) > MAX_FORWARDED:
            return Origin(origin.scheme, "")  # no htu can be built: the proof fails
        elements = [_pairs(element) for element in _ELEMENT.findall(text)]
        index = len(elements) - 1
        while index > 0 and _unquote(elements[index].get("for", "")) in proxies:
            index -= 1
        if elements:
            chosen = elements[index]
            return Origin(
                _unquote(chosen.get("proto", origin.scheme)).lower(),
                _unquote(chosen.get("host", origin.host)),
            )
    scheme = _last(x_proto) or origin.scheme
    return Origin(scheme.lower(), _last(x_host) or origin.host)


def request_url(origin: Origin, raw_path: str) -> str:
    """``scheme://host/path``; the verifier normalizes and checks it."""
    return f"{origin.scheme}://{origin.host}{raw_path or '/'}"


def quoted_path(path: str) -> str:
    """A decoded (latin-1 per ASGI/WSGI) path percent-encoded again, for servers
    that give no raw path."""
    return quote(path.encode("latin-1", "replace"), safe=_SAFE_PATH)


def _last(values: list[str]) -> str:
    if not values:
        return ""
    return values[-1].rsplit(",", 1)[-1].strip()


def _pairs(element: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for param in _PARAM.findall(element):
        name, sep, value = param.partition("=")
        if sep:
            pairs.setdefault(name.strip().lower(), value.strip())
    return pairs


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value
