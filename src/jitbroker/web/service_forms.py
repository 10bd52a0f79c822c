"""The wire format of the broker's endpoints: form bodies in, JSON out (no broker calls).

Every POST endpoint reads an ``application/x-www-form-urlencoded`` body
(RFC 6749 section 3.2, RFC 7009 section 2.1, RFC 7662 section 2.1) and answers
JSON. What is refused here, before any parameter is looked at:

- a body larger than ``max_body`` (from ``Content-Length``, or counted as it
  arrives): 413, never buffered past the cap;
- another content type, a charset other than UTF-8, bytes that are not UTF-8,
  a field that is not ``name=value``, more than ``MAX_FIELDS`` fields, or a
  query string (RFC 6749 section 2.3.1: credentials never go in the URI):
  ``invalid_request``;
- a parameter sent twice (RFC 6749 section 3.2), except ``resource`` and
  ``audience``, which RFC 8707 and RFC 8693 let repeat (the grant then refuses
  more than one with ``invalid_target``).

Parameters sent without a value are treated as omitted, and unknown ones are
ignored, both as RFC 6749 section 3.2 says.

``OAuthError`` is the one error every endpoint raises: an RFC 6749 section 5.2
code, a fixed client-safe description, and a ``reason`` for the audit log only.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any
from urllib.parse import parse_qsl

__all__ = [
    "FORM_TYPE",
    "MAX_FIELDS",
    "MULTI",
    "Form",
    "OAuthError",
    "json_body",
    "read_form",
]

FORM_TYPE = "application/x-www-form-urlencoded"
#: The most fields a form may have: a token request has about a dozen.
MAX_FIELDS = 32
#: Parameters that may repeat (RFC 8707 ``resource``, RFC 8693 ``audience``).
MULTI = frozenset({"resource", "audience"})
#: Parameter names we echo in an error: ours only, never one the client made up.
_KNOWN = frozenset(
    {
        "grant_type",
        "scope",
        "audience",
        "resource",
        "client_id",
        "client_secret",
        "client_assertion",
        "client_assertion_type",
        "subject_token",
        "subject_token_type",
        "actor_token",
        "actor_token_type",
        "requested_token_type",
        "token",
        "token_type_hint",
        "owner",
        "ttl",
        "task",
        "purpose",
        "renewable",
    }
)


class OAuthError(Exception):
    """An RFC 6749 section 5.2 error response.

    ``code`` and ``description`` go to the client (the description is fixed
    text of ours, never an input, a token or an internal); ``reason`` (default:
    the description) goes to the audit log only. ``basic`` adds the
    ``WWW-Authenticate: Basic`` challenge of a 401 when the client tried Basic;
    ``nonce`` the ``DPoP-Nonce`` header of a ``use_dpop_nonce`` error.
    """

    def __init__(
        self,
        code: str,
        description: str,
        *,
        status: int = 400,
        reason: str | None = None,
        basic: bool = False,
        retry_after: int | None = None,
        nonce: str | None = None,
    ) -> None:
        super().__init__(description)
        self.code = code
        self.description = description
        self.status = status
        self.reason = reason if reason is not None else description
        self.basic = basic
        self.retry_after = retry_after
        self.nonce = nonce

    def headers(self, realm: str) -> dict[str, str]:
        """The response headers besides the JSON content type."""
        out = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        if self.basic and self.status == 401:  # RFC 6749 section 5.2, invalid_client
            out["WWW-Authenticate"] = f'Basic realm="{realm}"'
        if self.retry_after is not None:
            out["Retry-After"] = str(self.retry_after)
        if self.nonce is not None:  # RFC 9449 section 8: use_dpop_nonce
            out["DPoP-Nonce"] = self.nonce
        return out

    def body(self) -> bytes:
        """The JSON body: ``error`` and ``error_description``."""
        return json_body({"error": self.code, "error_description": self.description})


def json_body(payload: Mapping[str, Any]) -> bytes:
    """Compact JSON, as every endpoint answers."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


class Form(Mapping[str, str]):
    """The parsed body: one value per parameter (empty ones dropped), plus the
    repeatable ones (``all("resource")``)."""

    def __init__(self, single: dict[str, str], multi: dict[str, tuple[str, ...]]) -> None:
        self._single = single
        self._multi = multi

    def __getitem__(self, name: str) -> str:
        return self._single[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._single)

    def __len__(self) -> int:
        return len(self._single)

    def all(self, name: str) -> tuple[str, ...]:
        """Every value of a repeatable parameter, in order."""
        return self._multi.get(name, ())

    def __repr__(self) -> str:  # values may be secrets: names only
        return f"<Form {sorted({*self._single, *self._multi})}>"


def _bad(description: str, reason: str | None = None) -> OAuthError:
    return OAuthError("invalid_request", description, reason=reason)


def check_content_type(value: str | None) -> None:
    """Refuse anything but an urlencoded form in UTF-8 (or with no charset)."""
    if value is None:
        raise _bad("the request body must be application/x-www-form-urlencoded")
    media, _, params = value.partition(";")
    if media.strip().lower() != FORM_TYPE:
        raise _bad("the request body must be application/x-www-form-urlencoded")
    for param in params.split(";"):
        name, _, charset = param.partition("=")
        if name.strip().lower() == "charset" and charset.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            raise _bad("the request body must be encoded in UTF-8")


async def read_body(
    chunks: AsyncIterator[bytes], content_length: str | None, max_body: int
) -> bytes:
    """The body, refused with a 413 once it passes ``max_body`` bytes: at once
    when ``Content-Length`` says so, else as soon as the count passes it."""
    if content_length is not None:
        if not content_length.isdigit():
            raise _bad("the Content-Length header is not a number")
        if int(content_length) > max_body:
            raise _too_large(max_body)
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_body:
            raise _too_large(max_body)
    return bytes(body)


def _too_large(max_body: int) -> OAuthError:
    return OAuthError(
        "invalid_request", f"the request body is larger than {max_body} bytes", status=413
    )


def parse_form(body: bytes) -> Form:
    """Parse an urlencoded body strictly (see the module docstring)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("the request body is not valid UTF-8") from None
    if not text:
        return Form({}, {})
    try:
        pairs = parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=True,
            encoding="utf-8",
            errors="strict",
            max_num_fields=MAX_FIELDS,
            separator="&",
        )
    except UnicodeDecodeError:
        raise _bad("a parameter is not valid UTF-8 once percent-decoded") from None
    except ValueError:  # a field with no "=", or too many fields
        raise _bad(
            f"the request body is not a form of at most {MAX_FIELDS} name=value fields"
        ) from None
    single: dict[str, str] = {}
    multi: dict[str, list[str]] = {}
    seen: set[str] = set()
    for name, value in pairs:
        if name in MULTI:
            if value:
                multi.setdefault(name, []).append(value)
            continue
        if name in seen:  # RFC 6749 section 3.2, even when one of them is empty
            shown = repr(name) if name in _KNOWN else "a parameter"
            raise _bad(f"{shown} is included more than once")
        seen.add(name)
        if value:
            single[name] = value
    return Form(single, {k: tuple(v) for k, v in multi.items()})


async def read_form(
    chunks: AsyncIterator[bytes],
    *,
    content_type: str | None,
    content_length: str | None,
    query: bytes,
    max_body: int,
    optional: bool = False,
) -> Form:
    """Check, read and parse one request's form body (with ``optional``, a
    request with no body and no content type has an empty form)."""
    if query:
        raise _bad("parameters go in the request body, never in the URI")
    if optional and content_type is None:
        if await read_body(chunks, content_length, max_body):
            raise _bad("the request body must be application/x-www-form-urlencoded")
        return Form({}, {})
    check_content_type(content_type)
    return parse_form(await read_body(chunks, content_length, max_body))
