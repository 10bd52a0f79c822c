"""Claims of a verified assertion: finding them, matching them, templating them.

A ``TrustRule`` names claims by path (``repository``, or a dotted path into
nested objects such as ``kubernetes.io.namespace``), matches them against
exact values or path-aware globs (``policy.glob_match``), and puts them into
its subject and owner ``Template``s. Plain functions over values: the JWT
checks are in ``assertions``, the rules in ``trust_rules``. Every refusal is an
``InvalidClient`` whose ``reason`` is ``claim_missing``, ``claim_mismatch`` or
``template_value``; see docs/trust.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from ..errors import InvalidRequest
from ..policy import glob_match
from .assertions import refused

__all__ = ["MAX_VALUE_LENGTH", "Template", "check_matchers", "claim_values", "lookup"]

MAX_VALUE_LENGTH = 256  # a claim value put into a subject or owner
# A claim path: member names joined by dots ("kubernetes.io.namespace").
_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
# What a templated value may hold: plain text, nothing a subject parser could split on
# unexpectedly (no spaces, no quotes, no control characters, no braces or percent).
_SAFE_VALUE = re.compile(rf"[A-Za-z0-9._:/@-]{{1,{MAX_VALUE_LENGTH}}}")
_MISSING = object()


def _is_path(name: object) -> bool:
    return isinstance(name, str) and bool(_PATH.fullmatch(name)) and ".." not in name


@attrs.frozen
class Template:
    """A subject or owner template: literal text and ``{claim}`` placeholders.

    Parsed once, at rule construction: a placeholder is a claim path and
    nothing else (no format spec, conversion, attribute or index access), two
    placeholders must be separated by literal text, and any other brace is an
    error. Rendering is injective: a value may not contain the first character
    of the literal text after its placeholder, so one subject has one reading.
    """

    text: str
    parts: tuple[tuple[str, str | None], ...]  # (literal, claim path or None)

    @classmethod
    def parse(cls, text: object, field: str) -> Template:
        """The template ``text``; ``InvalidRequest`` naming ``field`` if it is not one."""
        if not isinstance(text, str) or not text:
            raise InvalidRequest(f"{field} must be a non-empty template string")
        parts: list[tuple[str, str | None]] = []
        pos = 0
        for match in _PLACEHOLDER.finditer(text):
            literal = text[pos : match.start()]
            if "{" in literal or "}" in literal:
                raise InvalidRequest(f"{field} has a brace outside a {{claim}} placeholder")
            if parts and parts[-1][1] is not None and not literal:
                raise InvalidRequest(f"{field} has two placeholders with no text between them")
            name = match[1]
            if not _is_path(name) or name.endswith("."):
                raise InvalidRequest(
                    f"{field}: placeholders are {{claim}} or {{dotted.claim.path}} only, "
                    "with no format spec, conversion or index"
                )
            parts.append((literal, name))
            pos = match.end()
        tail = text[pos:]
        if "{" in tail or "}" in tail:
            raise InvalidRequest(f"{field} has a brace outside a {{claim}} placeholder")
        parts.append((tail, None))
        return cls(text, tuple(parts))

    @property
    def claims(self) -> tuple[str, ...]:
        """The claim paths the template uses, in order."""
        return tuple(name for _, name in self.parts if name is not None)

    def render(self, values: Mapping[str, str]) -> str:
        """The text with each placeholder replaced by its value; ``InvalidClient``
        (``template_value``) for a value outside the safe alphabet, or holding
        the character that separates it from the next placeholder."""
        out = []
        for i, (literal, name) in enumerate(self.parts):
            out.append(literal)
            if name is None:
                continue
            value = values[name]
            if not _SAFE_VALUE.fullmatch(value):
                raise refused(
                    "template_value",
                    f"claim {name!r} is not plain text (letters, digits, -_.:/@) for the template",
                )
            following, after = self.parts[i + 1]
            if after is not None and following[0] in value:
                raise refused(
                    "template_value",
                    f"claim {name!r} holds the character that ends it in the template",
                )
            out.append(value)
        return "".join(out)


def check_matchers(claims: Mapping[Any, object], where: str) -> None:
    """A rule's ``claims``: claim paths to non-empty printable strings (exact
    values or globs); else ``InvalidRequest`` naming ``where``."""
    for path, pattern in claims.items():
        if not _is_path(path):
            raise InvalidRequest(f"{where}: claims has a name that is not a claim path")
        if not isinstance(pattern, str) or not pattern or not pattern.isprintable():
            raise InvalidRequest(f"{where}: claims[{path!r}] must be a non-empty string")


def lookup(payload: Mapping[str, Any], path: str) -> object:
    """The claim at ``path``: a member name, or names joined by dots for nested
    objects; at each level the longest dotted name that is a member wins (so
    ``kubernetes.io.namespace`` is ``payload["kubernetes.io"]["namespace"]``)."""
    node: object = payload
    parts = path.split(".")
    while parts:
        if not isinstance(node, Mapping):
            return _MISSING
        for cut in range(len(parts), 0, -1):
            name = ".".join(parts[:cut])
            if name in node:
                node, parts = node[name], parts[cut:]
                break
        else:
            return _MISSING
    return node


def _string_claim(payload: Mapping[str, Any], path: str, reason: str) -> str:
    value = lookup(payload, path)
    if value is _MISSING:
        raise refused("claim_missing", f"the assertion lacks the claim {path!r}")
    if not isinstance(value, str):
        raise refused(reason, f"claim {path!r} is not a string")
    return value


def claim_values(
    matchers: Mapping[str, str], templates: Iterable[Template], payload: Mapping[str, Any]
) -> dict[str, str]:
    """The values of the claims ``matchers`` match and ``templates`` use; refused
    when one is missing, not a string, or does not match its pattern."""
    values: dict[str, str] = {}
    for path, pattern in matchers.items():
        value = _string_claim(payload, path, "claim_mismatch")
        if not glob_match(pattern, value):
            raise refused("claim_mismatch", f"claim {path!r} does not match the rule")
        values[path] = value
    for template in templates:
        for path in template.claims:
            if path not in values:
                values[path] = _string_claim(payload, path, "template_value")
    return values
