"""HTTP Signature authentication: every failure of CloudAPI's matrix, every algorithm and
keyId form, tampering, the clock, disabled accounts and key removal."""

import base64
from email.utils import formatdate

import pytest

from service.auth.client import sign_headers
from tests.api.conftest import Answer
from tests.helpers import ALICE_UUID, PUB, PUB_BODY, PUB_UUID, new_uuid, openssh_public

PATH = f"/my/images/{PUB_UUID}"
NOT_AUTHENTICATED = {"code": "InvalidCredentials", "message": "You must make authenticated requests to use CloudAPI"}
BAD_CREDENTIALS = {"code": "InvalidCredentials", "message": "Invalid authorization credentials supplied"}


@pytest.fixture(scope="module", autouse=True)
async def _images(db_pool):
    from tests.conftest import store_manifests

    await store_manifests(db_pool, PUB)


@pytest.fixture
def raw(api, http):
    """Send a request with exactly the given headers (nothing signed for you)."""

    async def send(path: str = PATH, *, method: str = "GET", headers: dict[str, str] | None = None) -> Answer:
        async with http.request(method, api + path, headers=headers or {}) as response:
            return Answer(response.status, response.headers, await response.read())

    return send


def _invalid_header(message: str) -> dict[str, str]:
    return {"code": "InvalidHeader", "message": f"Authorization header invalid: {message}"}


async def test_no_authorization(raw):
    answer = await raw()

    assert answer.status == 401
    assert answer.json() == NOT_AUTHENTICATED
    assert answer.headers["Content-MD5"]


async def test_basic_scheme(raw):
    answer = await raw(headers={"Authorization": "Basic " + base64.b64encode(b"alice:secret").decode()})

    assert answer.status == 401
    assert answer.json() == NOT_AUTHENTICATED


async def test_unknown_scheme(raw):
    answer = await raw(headers={"Authorization": "Bearer abc"})

    assert answer.status == 401
    assert answer.json() == NOT_AUTHENTICATED


async def test_header_without_a_space(raw):
    answer = await raw(headers={"Authorization": "Signature"})

    assert answer.status == 400
    assert answer.json() == {"code": "InvalidHeader", "message": "BasicAuth content is invalid."}


async def test_lower_case_scheme(raw, accounts):
    headers = accounts["alice"].sign("GET", PATH)
    headers["Authorization"] = "s" + headers["Authorization"][1:]

    answer = await raw(headers=headers)

    assert answer.status == 400
    assert answer.json() == _invalid_header('scheme was not "Signature"')


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        ('Signature algorithm="rsa-sha256",signature="AAAA"', "keyId was not specified"),
        ('Signature keyId="/alice/keys/rsa",signature="AAAA"', "algorithm was not specified"),
        ('Signature keyId="/alice/keys/rsa",algorithm="rsa-sha256"', "signature was not specified"),
        ('Signature keyId=/alice/keys/rsa,algorithm="rsa-sha256",signature="AAAA"', "bad param format"),
        ('Signature keyId="/alice/keys/rsa", algorithm="rsa-sha256",signature="AAAA"', "bad param format"),
        ('Signature key_id="/alice/keys/rsa"', "bad param format"),
    ],
)
async def test_malformed_signature_header(raw, authorization, message):
    answer = await raw(headers={"Authorization": authorization, "Date": formatdate(usegmt=True)})

    assert answer.status == 400
    assert answer.json() == _invalid_header(message)


@pytest.mark.parametrize("algorithm", ["rsa-sha384", "dsa-sha1", "hmac-sha256", "rsa-md5"])
async def test_unsupported_algorithm(raw, accounts, algorithm):
    headers = accounts["alice"].sign("GET", PATH)
    headers["Authorization"] = headers["Authorization"].replace('algorithm="rsa-sha256"', f'algorithm="{algorithm}"')

    answer = await raw(headers=headers)

    assert answer.status == 400
    assert answer.json() == _invalid_header(f"{algorithm} is not supported")


@pytest.mark.parametrize("seconds", [-301, 301, -3600, 86400 * 365])
async def test_clock_skew(raw, accounts, seconds):
    import time

    date = formatdate(time.time() + seconds, usegmt=True)
    answer = await raw(headers=accounts["alice"].sign("GET", PATH, date=date))

    assert answer.status == 400
    message = answer.json()["message"]
    assert answer.json()["code"] == "InvalidHeader"
    assert message.startswith("Authorization header invalid: clock skew of ")
    assert message.endswith("s was greater than 300s")
    skew = float(message.removeprefix("Authorization header invalid: clock skew of ").split("s")[0])
    assert abs(skew - abs(seconds)) < 5


@pytest.mark.parametrize("seconds", [-290, 290])
async def test_clock_skew_within_limit(call, accounts, raw, seconds):
    import time

    date = formatdate(time.time() + seconds, usegmt=True)
    answer = await raw(headers=accounts["alice"].sign("GET", PATH, date=date))

    assert answer.status == 200


async def test_legacy_format_with_clock_skew(raw, accounts):
    import time

    date = formatdate(time.time() - 301, usegmt=True)
    answer = await raw(headers=accounts["alice"].sign("GET", PATH, date=date, signed=("date",), legacy=True))

    assert answer.status == 400
    assert answer.json() == _invalid_header("bad param format")


async def test_garbage_date(raw, accounts):
    answer = await raw(headers=accounts["alice"].sign("GET", PATH, date="not a date"))

    assert answer.status == 400
    assert answer.json()["code"] == "InvalidHeader"
    assert "not a valid HTTP date" in answer.json()["message"]


async def test_date_not_signed(raw, accounts):
    headers = accounts["alice"].sign("GET", PATH, signed=("(request-target)",))
    headers["Date"] = formatdate(usegmt=True)

    answer = await raw(headers=headers)

    assert answer.status == 400
    assert answer.json() == _invalid_header("date was not a signed header")


async def test_date_missing(raw, accounts):
    headers = accounts["alice"].sign("GET", PATH, signed=("date",))
    headers["Authorization"] = headers["Authorization"].replace(',headers="date"', "")
    del headers["Date"]

    answer = await raw(headers=headers)

    assert answer.status == 400
    assert answer.json() == _invalid_header("date was not in the request")


@pytest.mark.parametrize("key_id", ["/nosuchuser/keys/rsa", "/alice/keys/nokey", f"/{new_uuid()}/keys/rsa"])
async def test_unknown_account_or_key(raw, accounts, key_id):
    answer = await raw(headers=accounts["alice"].sign("GET", PATH, key_id=key_id))

    assert answer.status == 401
    assert answer.json() == BAD_CREDENTIALS


async def test_key_of_another_account(raw, accounts):
    headers = accounts["alice"].sign("GET", PATH, key_id="/bob/keys/rsa")

    answer = await raw(headers=headers)

    assert answer.status == 401
    assert answer.json() == BAD_CREDENTIALS


@pytest.mark.parametrize("key_id", ["alice/keys/rsa", "/alice/rsa", "/alice/keys/", "//keys/rsa", "/alice/keys/rsa/extra"])
async def test_malformed_key_id(raw, accounts, key_id):
    answer = await raw(headers=accounts["alice"].sign("GET", PATH, key_id=key_id))

    assert answer.status == 401
    assert answer.json() == {"code": "InvalidCredentials", "message": f"Invalid KeyId {key_id} in authorization header"}


async def test_sub_user_key_id(raw, accounts):
    answer = await raw(headers=accounts["alice"].sign("GET", PATH, key_id="/alice/users/sue/keys/k"))

    assert answer.status == 401
    body = answer.json()
    assert body["code"] == "InvalidCredentials"
    assert body["message"].startswith("Invalid KeyId /alice/users/sue/keys/k in authorization header")
    assert "sub-user" in body["message"]


@pytest.mark.parametrize(
    ("key", "algorithm"),
    [
        ("rsa", "rsa-sha1"),
        ("rsa", "rsa-sha256"),
        ("rsa", "rsa-sha512"),
        ("ecdsa-p256", "ecdsa-sha256"),
        ("ecdsa-p384", "ecdsa-sha384"),
        ("ecdsa-p521", "ecdsa-sha512"),
        ("ed25519", "ed25519-sha512"),
    ],
)
async def test_every_algorithm(raw, accounts, key, algorithm):
    answer = await raw(headers=accounts["alice"].sign("GET", PATH, key=key, algorithm=algorithm))

    assert answer.status == 200
    assert answer.body == PUB_BODY


async def test_raw_ecdsa_signature(raw, accounts):
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    headers = accounts["alice"].sign("GET", PATH, key="ecdsa-p256")
    prefix, _, rest = headers["Authorization"].partition('signature="')
    r, s = decode_dss_signature(base64.b64decode(rest.rstrip('"')))
    raw_signature = base64.b64encode(r.to_bytes(32, "big") + s.to_bytes(32, "big")).decode()
    headers["Authorization"] = f'{prefix}signature="{raw_signature}"'

    answer = await raw(headers=headers)

    assert answer.status == 200


async def test_algorithm_of_another_key_type(raw, accounts):
    answer = await raw(headers=accounts["alice"].sign("GET", PATH, key="rsa", key_id="/alice/keys/ed25519"))

    assert answer.status == 401
    assert answer.json() == BAD_CREDENTIALS


@pytest.mark.parametrize("form", ["md5", "md5-prefixed", "md5-upper", "sha256", "name", "uuid"])
async def test_key_id_forms(raw, accounts, form):
    alice = accounts["alice"]
    key_id = {
        "md5": f"/alice/keys/{alice.fingerprint()}",
        "md5-prefixed": f"/alice/keys/MD5:{alice.fingerprint()}",
        "md5-upper": f"/alice/keys/{alice.fingerprint().upper()}",
        "sha256": f"/alice/keys/{alice.sha256()}",
        "name": "/alice/keys/rsa",
        "uuid": f"/{ALICE_UUID}/keys/rsa",
    }[form]

    answer = await raw(headers=alice.sign("GET", PATH, key_id=key_id))

    assert answer.status == 200


async def test_legacy_format(raw, accounts):
    answer = await raw(headers=accounts["alice"].sign("GET", PATH, signed=("date",), legacy=True))

    assert answer.status == 200
    assert answer.body == PUB_BODY


async def test_signature_without_request_target(raw, accounts):
    answer = await raw(headers=accounts["alice"].sign("GET", PATH, signed=("date",)))

    assert answer.status == 200


@pytest.mark.parametrize("tamper", ["path", "method", "date", "signature", "not-base64"])
async def test_tampered_request(raw, accounts, tamper):
    alice = accounts["alice"]
    headers = alice.sign("GET", PATH)
    path, method = PATH, "GET"
    if tamper == "path":
        path = f"/my/images/{new_uuid()}"
    elif tamper == "method":
        method = "HEAD"
    elif tamper == "date":
        import time

        headers["Date"] = formatdate(time.time() - 5, usegmt=True)
    elif tamper == "signature":
        headers["Authorization"] = headers["Authorization"].replace('signature="', 'signature="AAAA')
    elif tamper == "not-base64":
        prefix = headers["Authorization"].partition('signature="')[0]
        headers["Authorization"] = prefix + 'signature="!!!not base64!!!"'

    answer = await raw(path, method=method, headers=headers)

    assert answer.status == 401
    if method == "GET":
        assert answer.json() == BAD_CREDENTIALS


async def test_signature_over_another_query(raw, accounts):
    headers = accounts["alice"].sign("GET", PATH + "?a=1")

    answer = await raw(PATH + "?a=2", headers=headers)

    assert answer.status == 401


async def test_disabled_account(raw, accounts):
    answer = await raw(headers=accounts["dave"].sign("GET", PATH))

    assert answer.status == 403
    assert answer.json() == {"code": "NotAuthorized", "message": "Account or user is disabled"}


async def test_disabled_account_with_a_bad_signature_gets_401(raw, accounts):
    headers = accounts["dave"].sign("GET", PATH, key_id="/dave/keys/ed25519")

    answer = await raw(headers=headers)

    assert answer.status == 401


@pytest.mark.parametrize("login", ["my", "alice", ALICE_UUID])
async def test_own_login_forms(raw, accounts, login):
    path = f"/{login}/images/{PUB_UUID}"

    answer = await raw(path, headers=accounts["alice"].sign("GET", path))

    assert answer.status == 200
    assert answer.body == PUB_BODY


@pytest.mark.parametrize("login", ["bob", "nosuchlogin", "My", "ALICE"])
async def test_foreign_login_is_refused_before_any_lookup(raw, accounts, login):
    for image in (PUB_UUID, new_uuid(), "not-an-id"):
        path = f"/{login}/images/{image}"

        answer = await raw(path, headers=accounts["alice"].sign("GET", path))

        assert answer.status == 403
        assert answer.json() == {"code": "NotAuthorized", "message": f"You do not have permission to access {path} (getimage)"}


async def test_foreign_login_on_head(raw, accounts):
    path = f"/bob/images/{PUB_UUID}"

    answer = await raw(path, method="HEAD", headers=accounts["alice"].sign("HEAD", path))

    assert answer.status == 403
    assert answer.body == b""


async def test_invalid_version_is_answered_before_authentication(raw):
    answer = await raw(headers={"Accept-Version": "~6.5"})

    assert answer.status == 400
    assert answer.json()["code"] == "InvalidVersion"


async def test_removed_key_stops_working_at_once(raw, accounts, db_pool):
    from service import accounts as account_commands
    from tests.helpers import TestAccount

    erin = TestAccount("erin")
    async with db_pool.acquire() as connection:
        await account_commands.add_account(connection, "erin", erin.uuid)
        await account_commands.add_key(connection, "erin", openssh_public(erin.keys["ed25519"]), "laptop")
    first = await raw(headers=erin.sign("GET", PATH, key="ed25519", key_id="/erin/keys/laptop"))
    assert first.status == 200

    async with db_pool.acquire() as connection:
        await account_commands.remove_key(connection, "erin", "laptop")

    from tests.helpers import wait_until

    async def refused():
        answer = await raw(headers=erin.sign("GET", PATH, key="ed25519", key_id="/erin/keys/laptop"))
        return answer.status == 401

    # The API learns of the removal by a notification, within milliseconds.
    await wait_until(refused, timeout=5, message="the removed key to be refused")


async def test_new_key_works_at_once(raw, accounts, db_pool):
    from service import accounts as account_commands
    from tests.helpers import TestAccount, wait_until

    frank = TestAccount("frank")
    unknown = await raw(headers=frank.sign("GET", PATH, key="rsa"))
    assert unknown.status == 401

    async with db_pool.acquire() as connection:
        await account_commands.add_account(connection, "frank", frank.uuid)
        await account_commands.add_key(connection, "frank", openssh_public(frank.keys["rsa"]), "rsa")

    async def accepted():
        return (await raw(headers=frank.sign("GET", PATH, key="rsa"))).status == 200

    await wait_until(accepted, timeout=5, message="the new key to be accepted")


async def test_signing_helper_matches_the_client_format(accounts):
    headers = sign_headers(accounts["alice"].keys["rsa"], key_id="/alice/keys/rsa", target=PATH)

    assert headers["Authorization"].startswith('Signature keyId="/alice/keys/rsa",algorithm="rsa-sha256",headers="date (request-target)",signature="')
