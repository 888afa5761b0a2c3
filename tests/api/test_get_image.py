"""GetImage as CloudAPI answers it: bodies, versions, headers and errors."""

import re
import uuid

import pytest

from tests.helpers import ALICE_UUID, PUB, PUB_BODY, PUB_MD5, PUB_UUID, REMOVE, manifest, md5_base64, new_uuid

CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Headers": "Accept, Accept-Version, Content-Length, Content-MD5, Content-Type, Date, Api-Version, Response-Time",
    "Access-Control-Allow-Methods": "GET, HEAD",
    "Access-Control-Expose-Headers": "Api-Version, Request-Id, Response-Time",
}
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def assert_full_headers(answer, *, api_version: str):
    headers = answer.headers
    assert headers["Content-Type"] == "application/json"
    assert headers["Content-MD5"] == md5_base64(answer.body) if answer.body else True
    assert headers["Server"].startswith("cloudapi-images/")
    assert headers["Api-Version"] == api_version
    assert headers["X-Api-Version"] == api_version
    assert headers["Request-Id"] == headers["X-Request-Id"]
    assert int(headers["Response-Time"]) >= 0
    assert headers["X-Response-Time"] == headers["Response-Time"]
    assert "Date" in headers
    for name, value in CORS.items():
        assert headers[name] == value


@pytest.fixture(scope="module", autouse=True)
async def _images(db_pool):
    from tests.conftest import store_manifests

    await store_manifests(db_pool, PUB, ZVOL, FAIL1, FAIL2, CREATING, PUBDIS)


ZVOL = manifest(
    name="zvol-image",
    type="zvol",
    os="linux",
    image_size=10240,
    requirements={"min_ram": 512, "max_ram": 8192, "brand": "kvm", "networks": [{"name": "net0", "description": "public"}], "ssh_key": True},
)
FAIL1 = manifest(owner=ALICE_UUID, state="failed", error={"code": "PrepareImageDidNotRun", "message": "m1", "stack": "s"}, type="null", os="null", files=[], published_at=REMOVE, public=False)
FAIL2 = manifest(owner=ALICE_UUID, state="failed", error={"code": "VmNotStopped", "message": "m2"}, public=False)
CREATING = manifest(owner=ALICE_UUID, state="creating", type="null", os="null", files=[], published_at=REMOVE, public=False, description="in progress")
PUBDIS = manifest(state="disabled", disabled=True)


async def test_documentation_example_byte_exact(call):
    answer = await call(f"/my/images/{PUB_UUID}", headers={"Accept-Version": "~8"})

    assert answer.status == 200
    assert answer.body == PUB_BODY
    assert answer.headers["Content-Length"] == "609"
    assert answer.headers["Content-MD5"] == PUB_MD5
    assert_full_headers(answer, api_version="8.0.0")


@pytest.mark.parametrize(
    ("headers", "length", "md5", "api_version"),
    [
        ({"Accept-Version": "~7.0"}, 531, "kRx6TBT0eXewBs6TBptK2Q==", "7.0.0"),
        ({"Accept-Version": "~7.1"}, 609, "wCILgKKo3Fy3ctWNAgio1Q==", "7.1.0"),
        ({"Accept-Version": "~7"}, 609, "wCILgKKo3Fy3ctWNAgio1Q==", "7.3.0"),
        ({"Accept-Version": "7.3.0"}, 609, "wCILgKKo3Fy3ctWNAgio1Q==", "7.3.0"),
        ({}, 609, PUB_MD5, "9.0.0"),
        ({"Accept-Version": "*"}, 609, PUB_MD5, "9.0.0"),
        ({"Accept-Version": "~9"}, 609, PUB_MD5, "9.0.0"),
        ({"Accept-Version": "~9||~8"}, 609, PUB_MD5, "9.0.0"),
        ({"Accept-Version": "~7||~8"}, 609, PUB_MD5, "8.0.0"),
        ({"Accept-Version": "~7.2"}, 609, "wCILgKKo3Fy3ctWNAgio1Q==", "7.2.0"),
        ({"Accept-Version": "7.0.0"}, 531, "kRx6TBT0eXewBs6TBptK2Q==", "7.0.0"),
        ({"Accept-Version": "^7"}, 609, "wCILgKKo3Fy3ctWNAgio1Q==", "7.3.0"),
        ({"Accept-Version": "8.x"}, 609, PUB_MD5, "8.0.0"),
        ({"Api-Version": "~7.0"}, 531, "kRx6TBT0eXewBs6TBptK2Q==", "7.0.0"),
        ({"X-Api-Version": "~7.0"}, 531, "kRx6TBT0eXewBs6TBptK2Q==", "7.0.0"),
        ({"Accept-Version": "~8", "X-Api-Version": "~7.0"}, 609, PUB_MD5, "8.0.0"),
        ({"Api-Version": "~8", "X-Api-Version": "~7.0"}, 609, PUB_MD5, "8.0.0"),
    ],
)
async def test_version_ranges(call, headers, length, md5, api_version):
    answer = await call(f"/my/images/{PUB_UUID}", headers=headers)

    assert answer.status == 200
    assert len(answer.body) == length
    assert answer.headers["Content-MD5"] == md5
    assert answer.headers["Api-Version"] == api_version


@pytest.mark.parametrize("version_range", ["~6.5", "8.1.0", "~10", "foo"])
async def test_invalid_version(call, version_range):
    answer = await call(f"/my/images/{PUB_UUID}", headers={"Accept-Version": version_range})

    assert answer.status == 400
    assert answer.json() == {"code": "InvalidVersion", "message": f"{version_range} is not supported by GET /my/images/{PUB_UUID}"}
    assert_full_headers(answer, api_version="9.0.0")


async def test_zvol_per_version(call):
    old = (await call(f"/my/images/{ZVOL['uuid']}", headers={"Accept-Version": "~7"})).json()
    new = (await call(f"/my/images/{ZVOL['uuid']}", headers={"Accept-Version": "~8"})).json()

    assert old["type"] == "virtualmachine"
    assert new["type"] == "zvol"
    for image in (old, new):
        keys = list(image)
        assert keys[keys.index("type") + 1] == "image_size"
        assert image["image_size"] == 10240
        assert image["requirements"] == {"max_memory": 8192, "max_ram": 8192, "min_memory": 512, "min_ram": 512, "brand": "kvm"}


async def test_failed_image_with_known_code(call):
    image = (await call(f"/my/images/{FAIL1['uuid']}", headers={"Accept-Version": "~8"})).json()

    assert image["state"] == "failed"
    assert image["error"] == {"code": "PrepareImageDidNotRun", "message": "m1"}
    for key in ("type", "os", "files", "published_at"):
        assert key not in image


async def test_failed_image_with_unknown_code(call):
    image = (await call(f"/my/images/{FAIL2['uuid']}", headers={"Accept-Version": "~8"})).json()

    assert image["error"] == {"code": "InternalError", "message": "an unexpected error occurred (Contact support for assistance.)"}


async def test_failed_image_at_7_0_has_no_error_or_state(call):
    image = (await call(f"/my/images/{FAIL1['uuid']}", headers={"Accept-Version": "~7.0"})).json()

    assert "error" not in image
    assert "state" not in image


async def test_creating_placeholder(call):
    image = (await call(f"/my/images/{CREATING['uuid']}")).json()

    assert list(image) == ["id", "name", "version", "requirements", "description", "owner", "public", "state"]
    assert image["state"] == "creating"
    assert image["requirements"] == {}


async def test_disabled_public_image(call):
    image = (await call(f"/my/images/{PUBDIS['uuid']}")).json()

    assert image["state"] == "disabled"


async def test_missing_image(call):
    missing = new_uuid()

    answer = await call(f"/my/images/{missing}")

    assert answer.status == 404
    assert answer.json() == {"code": "ResourceNotFound", "message": f"image {missing} not found"}
    assert_full_headers(answer, api_version="9.0.0")


@pytest.mark.parametrize("image_id", ["foo", PUB_UUID.upper(), "2b683a82a06611e397ab2faa44701c5a", "x" * 200])
async def test_malformed_id(call, image_id):
    answer = await call(f"/my/images/{image_id}")

    assert answer.status == 404
    assert answer.json() == {"code": "ResourceNotFound", "message": f"{image_id} not found"}


async def test_head_matches_get(call):
    get = await call(f"/my/images/{PUB_UUID}", headers={"Accept-Version": "~8"})
    head = await call(f"/my/images/{PUB_UUID}", method="HEAD", headers={"Accept-Version": "~8"})

    assert head.status == 200
    assert head.body == b""
    assert head.headers["Content-Length"] == "609"
    assert head.headers["Content-MD5"] == PUB_MD5
    for name in ("Content-Type", "Server", "Api-Version", *CORS):
        assert head.headers[name] == get.headers[name]


async def test_head_of_missing_image(call):
    missing = new_uuid()

    head = await call(f"/my/images/{missing}", method="HEAD")

    body = f'{{"code":"ResourceNotFound","message":"image {missing} not found"}}'.encode()
    assert head.status == 404
    assert head.body == b""
    assert head.headers["Content-Length"] == str(len(body))
    assert head.headers["Content-MD5"] == md5_base64(body)
    assert head.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_other_methods(call, method):
    answer = await call(f"/my/images/{PUB_UUID}", method=method)

    assert answer.status == 405
    assert answer.json() == {"code": "MethodNotAllowedError", "message": f"{method} is not allowed"}
    assert answer.headers["Allow"] == "GET, HEAD"
    assert_full_headers(answer, api_version="9.0.0")


async def test_cors_preflight(call):
    answer = await call(
        f"/my/images/{PUB_UUID}",
        method="OPTIONS",
        headers={"Origin": "https://console.example.com", "Access-Control-Request-Method": "GET"},
    )

    assert answer.status == 200
    assert answer.headers["Access-Control-Allow-Methods"] == "GET, HEAD"


@pytest.mark.parametrize("path", ["/my/imagez/PUB", "/my/images", "/my/images/", "/", "/my/images/a/b"])
async def test_unknown_route(call, path):
    answer = await call(path)

    assert answer.status == 404
    assert answer.json() == {"code": "ResourceNotFound", "message": f"{path} does not exist"}
    assert_full_headers(answer, api_version="9.0.0")


async def test_unknown_route_drops_query(call):
    answer = await call("/my/imagez/PUB?x=1")

    assert answer.json()["message"] == "/my/imagez/PUB does not exist"


@pytest.mark.parametrize("accept", ["text/html", "application/xml", "application/json;q=0"])
async def test_not_acceptable(call, accept):
    answer = await call(f"/my/images/{PUB_UUID}", headers={"Accept": accept})

    assert answer.status == 406
    assert answer.json() == {"code": "NotAcceptableError", "message": "Server accepts: application/json"}
    assert_full_headers(answer, api_version="9.0.0")


@pytest.mark.parametrize("accept", ["application/json", "*/*", "application/*", "text/html, application/json;q=0.5"])
async def test_acceptable(call, accept):
    answer = await call(f"/my/images/{PUB_UUID}", headers={"Accept": accept})

    assert answer.status == 200


async def test_small_body_is_ignored(call):
    answer = await call(f"/my/images/{PUB_UUID}", data=b"x" * 100)

    assert answer.status == 200


async def test_large_body_is_refused(call):
    answer = await call(f"/my/images/{PUB_UUID}", data=b"x" * 100_000)

    assert answer.status == 413
    assert answer.json()["code"] == "RequestTooLarge"
    assert_full_headers(answer, api_version="9.0.0")


@pytest.mark.parametrize("name", ["Request-Id", "X-Request-Id"])
async def test_request_id_is_echoed(call, name):
    answer = await call(f"/my/images/{PUB_UUID}", headers={name: "3e5a-client.id:1"})

    assert answer.headers["Request-Id"] == "3e5a-client.id:1"
    assert answer.headers["X-Request-Id"] == "3e5a-client.id:1"


@pytest.mark.parametrize("value", ["has space", "x" * 129, "semi;colon", ""])
async def test_insane_request_id_is_replaced(call, value):
    answer = await call(f"/my/images/{PUB_UUID}", headers={"Request-Id": value})

    assert answer.headers["Request-Id"] != value
    uuid.UUID(answer.headers["Request-Id"])


async def test_ping(call):
    answer = await call("/--ping")

    assert answer.status == 200
    assert answer.body == b'{"ping":"pong","cloudapi":{"versions":["7.0.0","7.1.0","7.2.0","7.3.0","8.0.0","9.0.0"]}}'
    assert_full_headers(answer, api_version="9.0.0")
