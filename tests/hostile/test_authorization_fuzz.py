"""Property tests of the Authorization header: the parser and signing-string builder of
`service.auth.signature`, the keyId parser of `service.auth.stage`, and a sample of the
same headers sent to the live API.

Whatever the header holds, the parser may only return credentials or raise
InvalidHeader (400) or InvalidCredentials (401). The strategies below draw truncated,
duplicated, reordered and oversized parameters, odd quoting, non-ASCII text, bytes that
are not UTF-8, unknown algorithms, signatures that are not base64, and keyIds with path
tricks.
"""

from __future__ import annotations

import base64
import re
import string
import time
from email.utils import formatdate

import orjson
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from service.auth.client import sign_headers
from service.auth.keys import SUPPORTED_ALGORITHMS
from service.auth.signature import Credentials, RequestView, parse_authorization
from service.auth.stage import parse_key_id
from service.auth.store import POSSIBLE_LOGIN, KeyStore
from service.errors import InvalidCredentials, InvalidHeader
from service.http import error_body
from tests.helpers import ALICE_UUID, PUB, PUB_BODY, PUB_UUID
from tests.hostile.conftest import send_raw
from workers.contract import EVENT_SCHEMA

NOW = 1_800_000_000.0  # the server clock of the pure tests (2027-01-15)
IMAGE = f"/my/images/{PUB_UUID}"
PARAMETER_NAMES = ("keyId", "algorithm", "headers", "signature")

# Text of every kind: printable ASCII, the characters the header grammar uses, other
# Unicode planes, and the lone surrogates that stand for bytes that are not UTF-8.
_TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from(string.printable),
        st.sampled_from('",= /\\:%.'),
        st.characters(codec="utf-8"),
        st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF),
    ),
    max_size=60,
)

_KEY_IDS = st.one_of(
    st.sampled_from(
        [
            "/alice/keys/rsa",
            f"/{ALICE_UUID}/keys/rsa",
            "/alice/keys/../../bob/keys/rsa",
            "/alice/keys/rsa/../../../bob/keys/rsa",
            "/../alice/keys/rsa",
            "/alice/keys/..",
            "/%2Falice/keys/rsa",
            "/alice%2Fkeys%2Frsa",
            "/alice/keys/rsa%2F..%2F..%2Fbob",
            "/bob/keys/rsa",
            "/dave/keys/rsa",
            "/ALICE/keys/rsa",
            "/\u0430lice/keys/rsa",  # a Cyrillic a
            "/alice\u200b/keys/rsa",  # a zero-width space
            "/al\udcffice/keys/rsa",  # a byte that is not UTF-8
            "/alice/keys/SHA256:abc/def+ghi",
            "/alice/users/sue/keys/rsa",
            "/alice/keys/",
            "//keys/rsa",
            "/alice' OR '1'='1/keys/rsa",
            "/alice;DROP TABLE accounts/keys/rsa",
            "/my/keys/rsa",
            "/" + "a" * 5000 + "/keys/rsa",
            "",
        ]
    ),
    _TEXT.map(lambda text: f"/{text}/keys/rsa"),
    _TEXT,
)

_ALGORITHMS = st.one_of(
    st.sampled_from(sorted(SUPPORTED_ALGORITHMS)),
    st.sampled_from(["RSA-SHA256", "rsa-sha384", "dsa-sha1", "hmac-sha256", "ed25519", "rsa", "-", "rsa-sha256 ", ""]),
    _TEXT,
)

_SIGNED_HEADER_LISTS = st.one_of(
    st.lists(
        st.sampled_from(["date", "(request-target)", "request-line", "host", "x-missing", "DATE", "Date", ""]),
        max_size=6,
    ).map(" ".join),
    _TEXT,
)

_SIGNATURES = st.one_of(
    st.binary(max_size=600).map(lambda raw: base64.b64encode(raw).decode()),
    st.sampled_from(["!!!not base64!!!", "AAAA=", "A", "====", "AAAA AAAA", "QUJD\u00e9"]),
    _TEXT,
)

_DATES = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6).map(lambda offset: formatdate(NOW + offset, usegmt=True)),
    st.sampled_from(
        [
            "Mon, 01 Jan 99999999999999999999 00:00:00 GMT",
            "Fri, 31 Dec 9999 23:59:59 -2359",
            "0001-01-01T00:00:00+14:00",
            "2027-01-15T08:00:00",
            "2027-01-15T08:00:00Z",
            "not a date",
            "",
            "\udcff\udcfe",
        ]
    ),
    _TEXT,
)


@st.composite
def _parameter_lists(draw) -> list[tuple[str, str]]:
    """Draw the parameters of a header: the four known ones, maybe reordered, dropped,
    duplicated, renamed, or joined by unknown ones."""
    values = {
        "keyId": draw(_KEY_IDS),
        "algorithm": draw(_ALGORITHMS),
        "headers": draw(_SIGNED_HEADER_LISTS),
        "signature": draw(_SIGNATURES),
    }
    names = draw(st.permutations(PARAMETER_NAMES))
    present = [name for name in names if draw(st.booleans()) or name != "headers"]
    if draw(st.booleans()):
        # Drop and repeat parameters at random.
        present = draw(st.lists(st.sampled_from(present), min_size=0, max_size=6))
    parameters = [(name, values[name]) for name in present]
    if draw(st.booleans()):
        parameters.insert(draw(st.integers(0, len(parameters))), (draw(st.sampled_from(["keyid", "KeyId", "nonce", "x"])), draw(_TEXT)))
    return parameters


def _quote(draw, value: str) -> str:
    style = draw(st.sampled_from(["plain", "plain", "none", "single", "unterminated", "escaped"]))
    if style == "plain":
        return f'"{value}"'
    if style == "none":
        return value
    if style == "single":
        return f"'{value}'"
    if style == "unterminated":
        return f'"{value}'
    return '"' + value.replace('"', '\\"') + '"'


@st.composite
def authorization_headers(draw) -> str:
    """Draw an Authorization header in the current format, the legacy one, or neither."""
    parameters = draw(_parameter_lists())
    separator = draw(st.sampled_from([",", ",", ", ", ";", " ", ",,"]))
    text = separator.join(f"{name}={_quote(draw, value)}" for name, value in parameters)
    scheme = draw(st.sampled_from(["Signature", "Signature", "signature", "SIGNATURE", "Basic", "Bearer", ""]))
    value = f"{scheme} {text}"
    if draw(st.booleans()):
        # The legacy format: the signature follows the parameters after a space.
        value += " " + draw(_SIGNATURES)
    if draw(st.integers(0, 4)) == 0:
        value = value[: draw(st.integers(0, len(value)))]
    if draw(st.integers(0, 9)) == 0:
        value += "x" * draw(st.integers(1000, 20_000))
    return value


@st.composite
def request_views(draw) -> RequestView:
    headers: CIMultiDict = CIMultiDict()
    for _ in range(draw(st.integers(0, 2))):
        headers.add("Date", draw(_DATES))
    if draw(st.booleans()):
        headers.add("Host", draw(_TEXT))
    target = draw(st.sampled_from([IMAGE, f"/my/images/{PUB_UUID}?a=1", "/", "/%2e%2e/x"]))
    return RequestView(
        method=draw(st.sampled_from(["GET", "HEAD", "POST"])),
        target=target,
        http_version="1.1",
        headers=CIMultiDictProxy(headers),
    )


def _check_outcome(value: str, view: RequestView) -> Credentials | None:
    """Parse `value`, require one of the three allowed outcomes, and check that the
    error's JSON body can be built."""
    try:
        credentials = parse_authorization(value, view, NOW)
    except (InvalidHeader, InvalidCredentials) as exc:
        body = orjson.loads(error_body(exc))
        assert body["code"] == ("InvalidHeader" if exc.status == 400 else "InvalidCredentials")
        assert exc.status in (400, 401)
        return None
    assert isinstance(credentials.signing_string, bytes)
    assert credentials.algorithm in SUPPORTED_ALGORITHMS
    assert credentials.key_id
    assert credentials.signature
    return credentials


@settings(max_examples=300, deadline=None)
@given(value=authorization_headers(), view=request_views())
@example(value='Signature keyId="/alice/keys/rsa",algorithm="rsa-sha256",headers="date x-a",signature="AAAA"',
         view=RequestView("GET", IMAGE, "1.1", CIMultiDictProxy(CIMultiDict({"Date": formatdate(NOW, usegmt=True), "X-A": "\udcff"}))))
@example(value='Signature keyId="/alice/keys/rsa",algorithm="rsa-sha256",headers="date",signature="AAAA"',
         view=RequestView("GET", IMAGE, "1.1", CIMultiDictProxy(CIMultiDict({"Date": "Mon, 01 Jan 99999999999999999999 00:00:00 GMT"}))))
@example(value='Signature keyId="/alice/keys/rsa",algorithm="\udcff",signature="AAAA"',
         view=RequestView("GET", IMAGE, "1.1", CIMultiDictProxy(CIMultiDict({"Date": formatdate(NOW, usegmt=True)}))))
def test_parser_raises_only_cloudapi_errors(value, view):
    _check_outcome(value, view)


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.none(), _TEXT, st.text(max_size=300)), view=request_views())
def test_parser_on_arbitrary_text(value, view):
    _check_outcome(value, view)


@settings(max_examples=300, deadline=None)
@given(key_id=_KEY_IDS)
def test_key_id_parser(key_id):
    try:
        login, key = parse_key_id(key_id)
    except InvalidCredentials as exc:
        assert exc.message.startswith(f"Invalid KeyId {key_id} in authorization header")
        assert orjson.loads(error_body(exc))["code"] == "InvalidCredentials"
        return

    assert login
    assert key
    assert "/" not in login
    assert key_id == f"/{login}/keys/{key}"


@pytest.mark.parametrize(
    ("key_id", "parts"),
    [
        ("/alice/keys/../../bob/keys/rsa", None),
        ("/../alice/keys/rsa", None),
        ("/alice/keys/..", ("alice", "..")),
        ("/%2Falice/keys/rsa", ("%2Falice", "rsa")),
        ("/alice%2Fkeys%2Frsa", None),
        ("/bob/keys/rsa", ("bob", "rsa")),
    ],
)
def test_key_id_path_tricks(key_id, parts):
    # Nothing is resolved or percent-decoded: the segments are compared as they are.
    if parts is None:
        with pytest.raises(InvalidCredentials):
            parse_key_id(key_id)
    else:
        assert parse_key_id(key_id) == parts


def test_possible_login_matches_the_event_schema():
    login = EVENT_SCHEMA["definitions"]["login"]

    assert login["pattern"] == "^[A-Za-z0-9][A-Za-z0-9._@+-]*$"
    assert login["maxLength"] == 256
    assert POSSIBLE_LOGIN.pattern == "[A-Za-z0-9][A-Za-z0-9._@+-]{0,255}"


class _UnusablePool:
    """A pool whose use fails the test: the key store must not query for these."""

    def acquire(self):
        raise AssertionError("the key store queried Postgres for a reference no login can match")


@pytest.mark.parametrize(
    "reference",
    ["al\udcffice", "alice\x00", "", "..", "%2Falice", "alice'--", "\u0430lice", "a" * 257, "alice\n", "-alice"],
)
async def test_key_store_skips_impossible_logins(reference):
    store = KeyStore(_UnusablePool(), query_timeout=1.0)

    assert await store.find(reference) is None


# The signing string: what the server rebuilds is exactly what a client signed.

_HEADER_VALUES = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\r\n\x00"), min_size=1, max_size=40
).map(str.strip).filter(bool)


@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from(["GET", "HEAD"]),
    query=st.text(alphabet=string.ascii_letters + string.digits + "=&%", max_size=20),
    extra=st.dictionaries(st.sampled_from(["x-a", "x-b", "host", "accept-version"]), _HEADER_VALUES, max_size=3),
    order=st.randoms(use_true_random=False),
    legacy=st.booleans(),
    with_target=st.booleans(),
)
def test_signing_string_round_trip(accounts_keys, method, query, extra, order, legacy, with_target):
    target = IMAGE + (f"?{query}" if query else "")
    signed = ["date", *extra]
    if with_target and not legacy:
        signed.append("(request-target)")
    order.shuffle(signed)
    date = formatdate(NOW, usegmt=True)
    client = sign_headers(
        accounts_keys["ed25519"] if not legacy else accounts_keys["rsa"],
        key_id="/alice/keys/k",
        method=method,
        target=target,
        date=date,
        signed=tuple(signed),
        legacy=legacy,
        extra_headers=extra,
    )
    headers = CIMultiDict({"Date": client["Date"], **extra})
    view = RequestView(method, target, "1.1", CIMultiDictProxy(headers))

    credentials = parse_authorization(client["Authorization"], view, NOW)

    public_key = _public_key(accounts_keys["ed25519"] if not legacy else accounts_keys["rsa"])
    signature = base64.b64decode(credentials.signature)
    assert credentials.legacy is legacy
    assert public_key.verify(credentials.algorithm, signature, credentials.signing_string)


def _public_key(private_key):
    from service.auth.keys import parse_public_key
    from tests.helpers import openssh_public

    return parse_public_key(openssh_public(private_key))


@pytest.fixture(scope="module")
def accounts_keys():
    from tests.helpers import TestAccount

    keys = TestAccount("keys").keys
    return {"rsa": keys["rsa"], "ed25519": keys["ed25519"]}


def test_signing_string_keeps_bytes_that_are_not_utf8():
    # aiohttp hands over the header byte 0xff as "\udcff"; the client signed the raw byte.
    view = RequestView("GET", IMAGE, "1.1", CIMultiDictProxy(CIMultiDict({"Date": formatdate(NOW, usegmt=True), "X-A": "a\udcffb"})))
    header = 'Signature keyId="/alice/keys/rsa",algorithm="rsa-sha256",headers="date x-a",signature="AAAA"'

    credentials = parse_authorization(header, view, NOW)

    assert credentials.signing_string.endswith(b"\nx-a: a\xffb")


# A sample of the same headers, sent to the live API next to a real signature.


def _encode_header(value: str) -> bytes:
    # Bytes as a client would send them; CR, LF and NUL would end the header, so they
    # become spaces (the parser tests above cover them).
    cleaned = re.sub(r"[\r\n\x00]", " ", value)
    return cleaned.encode("utf-8", "surrogateescape")


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(value=authorization_headers())
async def test_live_api_answers_400_or_401(edge_api, accounts, value):
    assume(value.strip())
    date = formatdate(usegmt=True)
    request = (
        f"GET {IMAGE} HTTP/1.1\r\nHost: 127.0.0.1\r\nDate: {date}\r\n".encode()
        + b"Authorization: "
        + _encode_header(value)
        + b"\r\n\r\n"
    )

    answer = await send_raw(edge_api, request)

    assert answer.status in (400, 401, 431), answer.body
    assert answer.headers["Content-Type"] == "application/json"
    body = answer.json()
    assert set(body) == {"code", "message"}
    assert body["code"] in ("InvalidHeader", "InvalidCredentials", "RequestHeaderFieldsTooLarge", "BadRequestError")


@pytest.fixture(scope="module", autouse=True)
async def _images(db_pool):
    from tests.conftest import store_manifests

    await store_manifests(db_pool, PUB)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    mutation=st.sampled_from(["truncate", "duplicate", "reorder", "unquote", "algorithm", "key_id", "not_base64", "non_ascii", "oversize"]),
    data=st.data(),
)
async def test_mutated_real_signature(edge_api, accounts, mutation, data):
    signed = accounts["alice"].sign("GET", IMAGE)
    header = signed["Authorization"]
    params = re.findall(r'(\w+)="([^"]*)"', header)
    if mutation == "truncate":
        header = header[: data.draw(st.integers(0, len(header) - 1))]
    elif mutation == "duplicate":
        name, value = data.draw(st.sampled_from(params))
        header += f',{name}="{data.draw(_TEXT) if data.draw(st.booleans()) else value}"'
    elif mutation == "reorder":
        shuffled = data.draw(st.permutations(params))
        header = "Signature " + ",".join(f'{name}="{value}"' for name, value in shuffled)
    elif mutation == "unquote":
        quote = data.draw(st.sampled_from(["", "'", '""', '\\"']))
        header = header.replace('"', quote, data.draw(st.integers(1, 8)))
    elif mutation == "algorithm":
        header = header.replace('algorithm="rsa-sha256"', f'algorithm="{data.draw(_ALGORITHMS)}"')
    elif mutation == "key_id":
        header = header.replace('keyId="/alice/keys/rsa"', f'keyId="{data.draw(_KEY_IDS)}"')
    elif mutation == "not_base64":
        bad_signature = data.draw(st.sampled_from(["!!!", "A", "AAAA====", "Zm9v\u00e9"]))
        header = re.sub(r'signature="[^"]*"', f'signature="{bad_signature}"', header)
    elif mutation == "non_ascii":
        position = data.draw(st.integers(0, len(header)))
        header = header[:position] + data.draw(st.sampled_from(["\u00e9", "\u0430", "\U0001f600", "\udcff", "\u200b"])) + header[position:]
    elif mutation == "oversize":
        header += "," + "x" * data.draw(st.integers(100, 9000))
    request = (
        f"GET {IMAGE} HTTP/1.1\r\nHost: 127.0.0.1\r\nDate: {signed['Date']}\r\n".encode()
        + b"Authorization: "
        + _encode_header(header)
        + b"\r\n\r\n"
    )

    answer = await send_raw(edge_api, request)

    if mutation == "reorder" or answer.status == 200:
        # The same parameters in another order still verify; nothing else may.
        assert mutation in ("reorder", "duplicate", "unquote", "key_id", "algorithm"), (mutation, header)
        assert answer.status == 200
        assert answer.body == PUB_BODY
        return
    assert answer.status in (400, 401, 431), (mutation, header, answer.body)
    assert answer.headers["Content-Type"] == "application/json"
    # BadRequestError: a control character the HTTP parser rejects in any header.
    assert answer.json()["code"] in ("InvalidHeader", "InvalidCredentials", "RequestHeaderFieldsTooLarge", "BadRequestError")


async def test_live_api_with_non_utf8_key_id(edge_api, accounts):
    date = formatdate(time.time(), usegmt=True)
    request = (
        f"GET {IMAGE} HTTP/1.1\r\nHost: 127.0.0.1\r\nDate: {date}\r\n".encode()
        + b'Authorization: Signature keyId="/al\xffice/keys/rsa",algorithm="rsa-sha256",headers="date",signature="AAAA"\r\n\r\n'
    )

    answer = await send_raw(edge_api, request)

    assert answer.status == 401
    assert answer.json() == {"code": "InvalidCredentials", "message": "Invalid authorization credentials supplied"}


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b'Signature keyId="\xff",algorithm="rsa-sha256",headers="date",signature="AAAA"', "Invalid KeyId \\xff in authorization header"),
        (b'Signature keyId="/alice/keys/rsa",algorithm="\xff",headers="date",signature="AAAA"', "Authorization header invalid: \\xff is not supported"),
    ],
)
async def test_live_api_echoes_non_utf8_bytes_escaped(edge_api, header, message):
    date = formatdate(time.time(), usegmt=True)
    request = f"GET {IMAGE} HTTP/1.1\r\nHost: 127.0.0.1\r\nDate: {date}\r\n".encode() + b"Authorization: " + header + b"\r\n\r\n"

    answer = await send_raw(edge_api, request)

    assert answer.status in (400, 401)
    assert answer.json()["message"] == message


async def test_live_api_signature_over_non_utf8_header(edge_api, accounts):
    # The client signs the raw bytes it sends; the server must rebuild the same bytes.
    from service.auth.client import sign

    date = formatdate(time.time(), usegmt=True)
    key = accounts["alice"].keys["ed25519"]
    signing_string = b"date: " + date.encode() + b"\nx-a: a\xffb"
    signature = base64.b64encode(sign(key, "ed25519-sha512", signing_string)).decode()
    request = (
        f"GET {IMAGE} HTTP/1.1\r\nHost: 127.0.0.1\r\nDate: {date}\r\n".encode()
        + b"X-A: a\xffb\r\n"
        + f'Authorization: Signature keyId="/alice/keys/ed25519",algorithm="ed25519-sha512",headers="date x-a",signature="{signature}"\r\n\r\n'.encode()
    )

    answer = await send_raw(edge_api, request)

    assert answer.status == 200
    assert answer.body == PUB_BODY


@pytest.mark.parametrize("version_range", [b"\xff", b"~9\xfe"])
async def test_live_api_version_header_with_non_utf8_bytes(edge_api, version_range):
    request = b"GET /--ping HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept-Version: " + version_range + b"\r\n\r\n"

    answer = await send_raw(edge_api, request)

    assert answer.status == 400
    assert answer.json()["code"] == "InvalidVersion"
