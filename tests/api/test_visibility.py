"""CloudAPI's visibility rules for owner, acl member, stranger and `my`, in every state.

The owner sees their images in every state; anyone else sees an image only when it is
active or disabled and either public or lists them in its acl. Everything else is the
same 404 as an image that does not exist.
"""

import pytest

from tests.helpers import ALICE_UUID, BOB_UUID, CAROL_UUID, OPERATOR, manifest

STATES = ("active", "disabled", "unactivated", "creating", "failed")


def _image(state: str, *, public: bool, owner: str = ALICE_UUID, acl: list[str] | None = None) -> dict:
    fields = {"state": state, "public": public, "owner": owner, "disabled": state == "disabled"}
    if acl is not None:
        fields["acl"] = acl
    if state == "failed":
        fields["error"] = {"code": "NotSupported", "message": "m"}
    return manifest(**fields)


PRIVATE = {state: _image(state, public=False, acl=[BOB_UUID]) for state in STATES}
PUBLIC = {state: _image(state, public=True, owner=OPERATOR) for state in STATES}
PUBLIC_OF_ALICE = {state: _image(state, public=True, acl=[BOB_UUID]) for state in STATES}


@pytest.fixture(scope="module", autouse=True)
async def _images(db_pool):
    from tests.conftest import store_manifests

    await store_manifests(db_pool, *PRIVATE.values(), *PUBLIC.values(), *PUBLIC_OF_ALICE.values())


def _expected(viewer: str, image: dict) -> bool:
    owner_uuid = {"alice": ALICE_UUID, "bob": BOB_UUID, "carol": CAROL_UUID}[viewer]
    if image["owner"] == owner_uuid:
        return True
    if image["state"] not in ("active", "disabled"):
        return False
    return image["public"] or owner_uuid in image.get("acl", [])


CASES = [
    (viewer, group, state)
    for viewer in ("alice", "bob", "carol")
    for group in ("private", "public", "public_of_alice")
    for state in STATES
]


@pytest.mark.parametrize(("viewer", "group", "state"), CASES)
async def test_visibility_table(call, viewer, group, state):
    image = {"private": PRIVATE, "public": PUBLIC, "public_of_alice": PUBLIC_OF_ALICE}[group][state]

    answer = await call(f"/my/images/{image['uuid']}", as_=viewer)

    if _expected(viewer, image):
        assert answer.status == 200
        assert answer.json()["state"] == state
    else:
        assert answer.status == 404
        assert answer.json() == {"code": "ResourceNotFound", "message": f"image {image['uuid']} not found"}


@pytest.mark.parametrize(
    ("viewer", "state", "visible"),
    [
        ("alice", "active", True),  # owner
        ("bob", "active", True),  # on the acl
        ("carol", "active", False),  # stranger
        ("bob", "disabled", True),
        ("carol", "disabled", False),
        ("bob", "unactivated", False),  # acl members do not see images never activated
        ("alice", "unactivated", True),
        ("alice", "failed", True),
        ("alice", "creating", True),
    ],
)
async def test_visibility_through_my_and_own_login(call, accounts, viewer, state, visible):
    image = PRIVATE[state]
    person = accounts[viewer]

    for login in ("my", person.login, person.uuid):
        answer = await call(f"/{login}/images/{image['uuid']}", as_=viewer)

        assert answer.status == (200 if visible else 404)


async def test_acl_member_sees_the_whole_acl(call):
    image = (await call(f"/my/images/{PRIVATE['active']['uuid']}", as_="bob")).json()

    assert image["acl"] == [BOB_UUID]
    assert image["owner"] == ALICE_UUID


async def test_hidden_and_missing_answers_are_identical(call):
    from tests.helpers import new_uuid

    hidden = PRIVATE["active"]["uuid"]
    missing = new_uuid()

    hidden_answer = await call(f"/my/images/{hidden}", as_="carol")
    missing_answer = await call(f"/my/images/{missing}", as_="carol")

    assert hidden_answer.body.replace(hidden.encode(), b"ID") == missing_answer.body.replace(missing.encode(), b"ID")
    ignored = {"date", "request-id", "x-request-id", "response-time", "x-response-time", "content-md5"}

    def kept(headers):
        return {name.lower(): value for name, value in headers.items() if name.lower() not in ignored}

    assert kept(hidden_answer.headers) == kept(missing_answer.headers)


async def test_owner_change_moves_visibility(call, db_pool):
    from tests.conftest import store_manifests

    image = manifest(owner=ALICE_UUID, public=False)
    await store_manifests(db_pool, image, revision=1)
    assert (await call(f"/my/images/{image['uuid']}", as_="alice")).status == 200

    await store_manifests(db_pool, {**image, "owner": BOB_UUID}, revision=2)

    from tests.helpers import wait_until

    async def moved():
        alice = await call(f"/my/images/{image['uuid']}", as_="alice")
        bob = await call(f"/my/images/{image['uuid']}", as_="bob")
        return alice.status == 404 and bob.status == 200

    await wait_until(moved, timeout=5, message="the new owner to be the only one seeing the image")
