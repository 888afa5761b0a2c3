"""Parse a CloudAPI `Authorization: Signature ...` header and build its signing string.

Two header formats are accepted, as CloudAPI does:

- current: `Signature keyId="/LOGIN/keys/KEY",algorithm="rsa-sha256",headers="date (request-target)",signature="BASE64"`.
  The signing string has one `name: value` line per listed header; `(request-target)`
  contributes `(request-target): <lower-case method> <path and query>`.
- legacy: `Signature keyId="/LOGIN/keys/KEY",algorithm="rsa-sha256" BASE64`, signing the
  header values alone, one per line (by default just the Date value).

The current format is tried first. When both fail, the error of the current format is
reported, so a legacy header with any problem is answered with "bad param format",
exactly as CloudAPI answers it.

Checks, in CloudAPI's order: the parameters; the algorithm; every listed header present;
the clock skew of `Date` (at most 300 seconds, either way); `date` among the signed
headers. Verifying the signature against a key happens later, in `service.auth.stage`.
"""

from __future__ import annotations

import functools
import re
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import NamedTuple

from service.auth.keys import SUPPORTED_ALGORITHMS
from service.errors import InvalidCredentials, InvalidHeader

MAX_CLOCK_SKEW = 300  # seconds Date may differ from the server clock, either way
NOT_AUTHENTICATED = "You must make authenticated requests to use CloudAPI"
_PREFIX = "Authorization header invalid: "
# The legacy format supports only these algorithms (the others need the current format).
_LEGACY_ALGORITHMS = frozenset({"rsa-sha1", "rsa-sha256", "rsa-sha512"})


# Credentials, RequestView and stage.Caller are built for every request. A NamedTuple is
# as immutable as a frozen dataclass, and half its cost to build.
class Credentials(NamedTuple):
    """The claims of a parsed Authorization header, not verified yet."""

    key_id: str
    algorithm: str
    signature: str  # base64, as sent
    signing_string: bytes
    legacy: bool


class RequestView(NamedTuple):
    """The parts of an HTTP request a signature can cover."""

    method: str
    target: str  # the request target as sent: raw path and query
    http_version: str  # "1.1"
    headers: object  # case-insensitive mapping with getall(), e.g. aiohttp's CIMultiDictProxy


class _Malformed(Exception):
    pass


def _header(view: RequestView, name: str) -> str | None:
    values = view.headers.getall(name, ())
    if not values:
        return None
    # Node.js joins repeated request headers with ", ", which is what clients sign against.
    return ", ".join(values)


@functools.lru_cache(maxsize=4096)
def parse_date(value: str) -> float | None:
    """Return the POSIX time of an HTTP date (RFC 1123, or ISO 8601), or None."""
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        try:
            moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
    if moment.tzinfo is None:
        return None
    return moment.timestamp()


def _format_seconds(milliseconds: int) -> str:
    # The way JavaScript prints a number of seconds with millisecond precision.
    if milliseconds % 1000 == 0:
        return str(milliseconds // 1000)
    return f"{milliseconds / 1000:.3f}".rstrip("0")


# A well-formed parameter list: what the loop below accepts, in one regular expression,
# for the common case. Anything else goes through the loop, which names the error.
_WELL_FORMED = re.compile(r'[A-Za-z]+="[^"]*"(?:,[A-Za-z]+="[^"]*")*')
_PARAMETER = re.compile(r'([A-Za-z]+)="([^"]*)"')


def _parse_current(value: str) -> tuple[str, dict[str, str]]:
    scheme, space, rest = value.partition(" ")
    params: dict[str, str] = {}
    if not space:
        return scheme, params
    if _WELL_FORMED.fullmatch(rest):
        return scheme, dict(_PARAMETER.findall(rest))
    index = 0
    length = len(rest)
    while index < length:
        start = index
        while index < length and ("a" <= rest[index] <= "z" or "A" <= rest[index] <= "Z"):
            index += 1
        name = rest[start:index]
        if not name or index >= length or rest[index] != "=":
            raise _Malformed("bad param format")
        index += 1
        if index >= length or rest[index] != '"':
            raise _Malformed("bad param format")
        end = rest.find('"', index + 1)
        if end < 0:
            # An unterminated value is dropped, as CloudAPI's parser drops it.
            break
        params[name] = rest[index + 1 : end]
        index = end + 1
        if index < length:
            if rest[index] != ",":
                raise _Malformed("bad param format")
            index += 1
    return scheme, params


def _parse_legacy(value: str) -> tuple[str, dict[str, str], str]:
    scheme, space, rest = value.partition(" ")
    params: dict[str, str] = {}
    signature = ""
    name = ""
    index = 0
    length = len(rest) if space else 0
    while index < length:
        char = rest[index]
        if char == '"':
            end = rest.find('"', index + 1)
            if end < 0:
                params[name] = ""
                break
            params[name] = rest[index + 1 : end]
            name = ""
            index = end + 1
            continue
        if char == " ":
            signature = rest[index + 1 :]
            break
        if char not in "=,":
            name += char
        index += 1
    return scheme, params, signature


def _signing_bytes(lines: list[str]) -> bytes:
    # aiohttp decodes header bytes that are not UTF-8 as lone surrogates
    # ("surrogateescape"). Encoding them back the same way gives the exact bytes that the
    # client sent and signed. Other lone surrogates cannot come from the wire.
    text = "\n".join(lines)
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _signed_headers(params: dict[str, str]) -> list[str]:
    listed = params.get("headers")
    if not listed:
        return ["date"]
    return [name.lower() for name in listed.split(" ")]


def _check_clock(view: RequestView, now: float) -> None:
    date = _header(view, "date")
    if date is None:
        return
    moment = parse_date(date)
    if moment is None:
        raise _Malformed(f'date header "{date[:100]}" is not a valid HTTP date')
    skew_ms = round(abs(now - moment) * 1000)
    if skew_ms > MAX_CLOCK_SKEW * 1000:
        raise _Malformed(f"clock skew of {_format_seconds(skew_ms)}s was greater than {MAX_CLOCK_SKEW}s")


def _current(value: str, view: RequestView, now: float) -> Credentials:
    scheme, params = _parse_current(value)
    if scheme != "Signature":
        raise _Malformed('scheme was not "Signature"')
    for name in ("keyId", "algorithm", "signature"):
        if not params.get(name):
            raise _Malformed(f"{name} was not specified")
    algorithm = params["algorithm"].lower()
    if algorithm not in SUPPORTED_ALGORITHMS:
        raise _Malformed(f"{algorithm} is not supported")
    headers = _signed_headers(params)
    lines = []
    for name in headers:
        if name == "(request-target)":
            lines.append(f"(request-target): {view.method.lower()} {view.target}")
        elif name == "request-line":
            lines.append(f"{view.method} {view.target} HTTP/{view.http_version}")
        else:
            header = _header(view, name)
            if header is None:
                raise _Malformed(f"{name} was not in the request")
            lines.append(f"{name}: {header}")
    _check_clock(view, now)
    if "date" not in headers:
        raise _Malformed("date was not a signed header")
    return Credentials(params["keyId"], algorithm, params["signature"], _signing_bytes(lines), legacy=False)


def _legacy(value: str, view: RequestView, now: float) -> Credentials:
    scheme, params, signature = _parse_legacy(value)
    if scheme != "Signature":
        raise _Malformed('scheme was not "Signature"')
    if not params.get("keyId"):
        raise _Malformed("keyId was not specified")
    if not params.get("algorithm"):
        raise _Malformed("algorithm was not specified")
    if not signature:
        raise _Malformed("signature was empty")
    algorithm = params["algorithm"].lower()
    if algorithm not in _LEGACY_ALGORITHMS:
        raise _Malformed(f"{algorithm} is not supported")
    headers = _signed_headers(params)
    lines = []
    for name in headers:
        if name == "request-line":
            lines.append(f"{view.method} {view.target} HTTP/{view.http_version}")
        else:
            header = _header(view, name)
            if not header:
                raise _Malformed(f"{name} was not in the request")
            lines.append(header)
    _check_clock(view, now)
    if "date" not in headers:
        raise _Malformed("date was not a signed header")
    return Credentials(params["keyId"], algorithm, signature, _signing_bytes(lines), legacy=True)


# The header exactly as the triton and sdc-getimage clients send it: the four parameters
# in this order, signing (request-target) and date, or date alone. Such a header is
# parsed in one step; every other one goes through the general parsers below, which
# give the same result for this form.
_CLIENT_FORM = re.compile(r'Signature keyId="([^"]+)",algorithm="([^"]+)",headers="([^"]+)",signature="([^"]+)"')
_CLIENT_HEADER_LISTS = frozenset({"(request-target) date", "date (request-target)", "date"})


def parse_client_form(value: str, view: RequestView, now: float) -> Credentials | None:
    """Parse an Authorization header in the clients' form into Credentials.

    Return None for any other header, and when the Date is missing, unreadable or too
    far off, so that the general parsers run and name the error.
    """
    match = _CLIENT_FORM.fullmatch(value)
    if match is None:
        return None
    key_id, algorithm, listed, signature = match.groups()
    algorithm = algorithm.lower()
    if algorithm not in SUPPORTED_ALGORITHMS or listed not in _CLIENT_HEADER_LISTS:
        return None
    date = _header(view, "date")
    if date is None:
        return None
    moment = parse_date(date)
    if moment is None or round(abs(now - moment) * 1000) > MAX_CLOCK_SKEW * 1000:
        return None
    if listed == "date":
        signing = f"date: {date}"
    else:
        target = f"(request-target): {view.method.lower()} {view.target}"
        signing = f"{target}\ndate: {date}" if listed[0] == "(" else f"date: {date}\n{target}"
    try:
        signing_bytes = signing.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return Credentials(key_id, algorithm, signature, signing_bytes, legacy=False)


def parse_authorization(value: str | None, view: RequestView, now: float) -> Credentials:
    """Parse the Authorization header of `view` at server time `now` (POSIX seconds).

    Raises InvalidCredentials (401) when the request carries no signature at all, and
    InvalidHeader (400) when its signature header is unusable.
    """
    if not value:
        raise InvalidCredentials(NOT_AUTHENTICATED)
    credentials = parse_client_form(value, view, now)
    if credentials is not None:
        return credentials
    scheme, space, _rest = value.partition(" ")
    if not space:
        raise InvalidHeader("BasicAuth content is invalid.")
    if scheme.lower() != "signature":
        # Basic and unknown schemes authenticate nothing.
        raise InvalidCredentials(NOT_AUTHENTICATED)
    try:
        return _current(value, view, now)
    except _Malformed as current_error:
        try:
            return _legacy(value, view, now)
        except _Malformed:
            raise InvalidHeader(_PREFIX + str(current_error)) from None
