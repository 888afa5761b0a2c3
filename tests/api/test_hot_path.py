"""The hot path (service.hotpath) responds exactly as the pipeline does.

Every case is sent twice with the same signature: once in the form the CLIs use, which
the hot path handles, and once with the Authorization parameters in another order, which
it passes to the application and its pipeline. The two responses must be the same but
for the headers that differ on every request.
"""

import re

import pytest
from yarl import URL

from service.hotpath import HOT_PATH
from tests.api.test_get_image import assert_full_headers
from tests.helpers import BOB_UUID, PUB, PUB_UUID, manifest, new_uuid

HIDDEN = manifest(owner=BOB_UUID, public=False)
_PER_REQUEST = {"request-id", "x-request-id", "response-time", "x-response-time", "date"}
_CLIENT_FORM = re.compile(r'Signature keyId="([^"]*)",algorithm="([^"]*)",headers="([^"]*)",signature="([^"]*)"')


@pytest.fixture(scope="module", autouse=True)
async def _images(db_pool):
    from tests.conftest import store_manifests

    await store_manifests(db_pool, PUB, HIDDEN)


def _reordered(authorization: str) -> str:
    key_id, algorithm, headers, signature = _CLIENT_FORM.fullmatch(authorization).groups()
    return f'Signature algorithm="{algorithm}",keyId="{key_id}",headers="{headers}",signature="{signature}"'


async def _send(http, api, method, path, headers):
    # encoded=True sends the path as written, percent escapes included.
    async with http.request(method, URL(api + path, encoded=True), headers=headers) as response:
        return response.status, response.headers, await response.read()


async def _both_ways(http, api, api_server, method, path, headers):
    """Send `headers` as they are, then reordered; return both responses, checking which
    path handled each."""
    hot_path = api_server.app[HOT_PATH]
    answered, declined = hot_path.answered, hot_path.declined
    hot = await _send(http, api, method, path, headers)
    assert (hot_path.answered, hot_path.declined) == (answered + 1, declined)
    reordered = {**headers, "Authorization": _reordered(headers["Authorization"])}
    piped = await _send(http, api, method, path, reordered)
    assert (hot_path.answered, hot_path.declined) == (answered + 1, declined + 1)
    return hot, piped


def _comparable(answer):
    status, headers, body = answer
    compared = sorted((name.lower(), value) for name, value in headers.items() if name.lower() not in _PER_REQUEST)
    return status, compared, body


def _tampered(headers):
    authorization = headers["Authorization"]
    head, _, signature = authorization.rpartition('signature="')
    flipped = ("B" if signature[0] == "A" else "A") + signature[1:]
    return {**headers, "Authorization": head + 'signature="' + flipped}


CASES = {
    "found": ("alice", "GET", f"/my/images/{PUB_UUID}", {}),
    "found with HEAD": ("alice", "HEAD", f"/my/images/{PUB_UUID}", {}),
    "found by login": ("alice", "GET", f"/alice/images/{PUB_UUID}", {}),
    "version 7": ("alice", "GET", f"/my/images/{PUB_UUID}", {"Accept-Version": "~7"}),
    "missing": ("alice", "GET", f"/my/images/{new_uuid()}", {}),
    "hidden": ("alice", "GET", f"/my/images/{HIDDEN['uuid']}", {}),
    "own private": ("bob", "GET", f"/my/images/{HIDDEN['uuid']}", {}),
    "malformed id": ("alice", "GET", "/my/images/not-a-uuid", {}),
    "another login": ("alice", "GET", f"/bob/images/{PUB_UUID}", {}),
    "disabled account": ("dave", "GET", f"/my/images/{PUB_UUID}", {}),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_same_answer_both_ways(http, api, api_server, accounts, case):
    login, method, path, extra = CASES[case]
    # The first request of an account fills the key cache; the hot path needs it filled.
    await _send(http, api, "GET", path, {**extra, **accounts[login].sign("GET", path)})
    headers = {"Accept": "application/json", **extra, **accounts[login].sign(method, path)}

    hot, piped = await _both_ways(http, api, api_server, method, path, headers)

    assert _comparable(hot) == _comparable(piped)
    assert hot[1]["Request-Id"] != piped[1]["Request-Id"]


@pytest.mark.parametrize("key", ["rsa", "ecdsa-p256", "ecdsa-p521", "ed25519"])
async def test_bad_signature_same_answer_both_ways(http, api, api_server, accounts, key):
    path = f"/my/images/{PUB_UUID}"
    await _send(http, api, "GET", path, accounts["alice"].sign("GET", path, key=key))
    headers = _tampered(accounts["alice"].sign("GET", path, key=key))

    hot, piped = await _both_ways(http, api, api_server, "GET", path, headers)

    assert hot[0] == 401
    assert _comparable(hot) == _comparable(piped)


async def test_unknown_key_and_account_same_answer_both_ways(http, api, api_server, accounts):
    path = f"/my/images/{PUB_UUID}"
    for key_id in ("/alice/keys/no-such-key", "/nobody-at-all/keys/rsa"):
        await _send(http, api, "GET", path, accounts["alice"].sign("GET", path, key_id=key_id))
        headers = accounts["alice"].sign("GET", path, key_id=key_id)

        hot, piped = await _both_ways(http, api, api_server, "GET", path, headers)

        assert hot[0] == 401
        assert _comparable(hot) == _comparable(piped)


async def test_hot_answer_has_the_full_header_set(http, api, api_server, accounts):
    path = f"/my/images/{PUB_UUID}"
    await _send(http, api, "GET", path, accounts["alice"].sign("GET", path))

    hot, _piped = await _both_ways(http, api, api_server, "GET", path, accounts["alice"].sign("GET", path))

    class Answer:
        status, headers, body = hot

    assert hot[0] == 200
    assert_full_headers(Answer, api_version="9.0.0")


@pytest.mark.parametrize(
    "method, path, extra",
    [
        ("GET", f"/my/images/{PUB_UUID}?x=1", {}),
        ("GET", f"/my/images/{PUB_UUID}", {"Accept": "text/html"}),
        ("GET", f"/my/images/{PUB_UUID}", {"Accept-Version": "~6"}),
        ("OPTIONS", f"/my/images/{PUB_UUID}", {}),
        ("GET", "/my/images/", {}),
        ("GET", "/my/images/%32b683a82-a066-11e3-97ab-2faa44701c5a", {}),
    ],
)
async def test_unusual_requests_go_to_the_pipeline(http, api, api_server, accounts, method, path, extra):
    hot_path = api_server.app[HOT_PATH]
    await _send(http, api, "GET", f"/my/images/{PUB_UUID}", accounts["alice"].sign("GET", f"/my/images/{PUB_UUID}"))
    answered = hot_path.answered

    status, _headers, _body = await _send(http, api, method, path, {**extra, **accounts["alice"].sign(method, path)})

    assert hot_path.answered == answered
    assert status != 500
