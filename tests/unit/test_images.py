"""The image object: key order, version gates, requirements, files and error rules."""

import orjson
import pytest

from service.images import Rendering, js_truthy, render, translate
from tests.helpers import PUB, PUB_BODY, PUB_MD5, REMOVE, manifest, md5_base64


def test_documentation_example_is_byte_exact():
    body = render(PUB, Rendering.V8)

    assert body == PUB_BODY
    assert len(body) == 609
    assert md5_base64(body) == PUB_MD5


@pytest.mark.parametrize(
    ("rendering", "length", "md5"),
    [
        (Rendering.V7_0, 531, "kRx6TBT0eXewBs6TBptK2Q=="),
        (Rendering.V7_1, 609, "wCILgKKo3Fy3ctWNAgio1Q=="),
        (Rendering.V8, 609, "42n5PWY5xZP0lnjdMb7Omg=="),
    ],
)
def test_documentation_example_per_version(rendering, length, md5):
    body = render(PUB, rendering)

    assert len(body) == length
    assert md5_base64(body) == md5


def test_version_7_0_translates_type_and_drops_gated_fields():
    image = translate(PUB, Rendering.V7_0)

    assert image["type"] == "smartmachine"
    for key in ("owner", "public", "state", "eula", "acl", "origin", "error"):
        assert key not in image
    assert image["files"] == [{"compression": "gzip", "sha1": "3bebb6ae2cdb26eef20cfb30fdc4a00a059a0b7b", "size": 110742036}]


def test_version_7_1_translates_type_and_keeps_gated_fields():
    image = translate(PUB, Rendering.V7_1)

    assert image["type"] == "smartmachine"
    assert (image["owner"], image["public"], image["state"]) == (PUB["owner"], True, "active")


def test_zvol_type_image_size_and_requirements():
    zvol = manifest(
        type="zvol",
        os="linux",
        image_size=10240,
        requirements={
            "min_ram": 512,
            "max_ram": 8192,
            "brand": "kvm",
            "networks": [{"name": "net0", "description": "public"}],
            "ssh_key": True,
        },
    )

    old = translate(zvol, Rendering.V7_1)
    new = translate(zvol, Rendering.V8)

    assert old["type"] == "virtualmachine"
    assert new["type"] == "zvol"
    for image in (old, new):
        keys = list(image)
        assert keys[keys.index("type") + 1] == "image_size"
        assert image["image_size"] == 10240
        assert orjson.dumps(image["requirements"]) == (
            b'{"max_memory":8192,"max_ram":8192,"min_memory":512,"min_ram":512,"brand":"kvm"}'
        )


def test_image_size_only_for_zvol():
    image = translate(manifest(type="zone-dataset", image_size=5), Rendering.V8)

    assert "image_size" not in image


def test_requirements_keep_only_truthy_values_in_fixed_order():
    image = translate(
        manifest(requirements={"bootrom": "uefi", "brand": "", "min_ram": 0, "max_ram": 1024, "min_platform": {"7.0": "x"}}),
        Rendering.V8,
    )

    assert list(image["requirements"].items()) == [("max_memory", 1024), ("max_ram", 1024), ("bootrom", "uefi")]


def test_full_key_order():
    full = manifest(
        description="d",
        tags={"b": 1, "a": 2},
        homepage="https://example.com/h",
        eula="https://example.com/e",
        acl=["b0c1d2e3-0000-4000-8000-000000000002", "b0c1d2e3-0000-4000-8000-000000000001"],
        origin="b0c1d2e3-0000-4000-8000-000000000003",
        state="failed",
        error={"code": "NotSupported", "message": "m", "stack": "s"},
    )

    image = translate(full, Rendering.V8)

    assert list(image) == [
        "id", "name", "version", "os", "requirements", "type", "description", "files", "tags",
        "homepage", "published_at", "owner", "public", "state", "eula", "acl", "origin", "error",
    ]
    assert list(image["tags"]) == ["b", "a"]
    assert image["acl"] == full["acl"]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ({"code": "PrepareImageDidNotRun", "message": "m1", "stack": "s"}, {"code": "PrepareImageDidNotRun", "message": "m1"}),
        ({"code": "VmHasNoOrigin", "message": "m2"}, {"code": "VmHasNoOrigin", "message": "m2"}),
        ({"code": "NotSupported", "message": "m3"}, {"code": "NotSupported", "message": "m3"}),
        ({"code": "VmNotStopped", "message": "m4"}, {"code": "InternalError", "message": "an unexpected error occurred (Contact support for assistance.)"}),
        ({"message": "could not publish"}, {"code": "InternalError", "message": "an unexpected error occurred (Contact support for assistance.)"}),
    ],
)
def test_error_translation(error, expected):
    image = translate(manifest(state="failed", error=error), Rendering.V8)

    assert image["error"] == expected


def test_placeholder_has_no_os_type_files_or_published_at():
    creating = manifest(state="creating", type="null", os="null", files=[], published_at=REMOVE, public=False)

    image = translate(creating, Rendering.V8)

    assert list(image) == ["id", "name", "version", "requirements", "owner", "public", "state"]


def test_files_reduced_to_first_file_without_missing_keys():
    image = translate(manifest(files=[{"sha1": "ab", "size": 3, "dataset_guid": "x"}, {"sha1": "cd"}]), Rendering.V8)

    assert image["files"] == [{"sha1": "ab", "size": 3}]


def test_non_ascii_is_not_escaped():
    body = render(manifest(name="imágen", description="説明 ✓"), Rendering.V8)

    assert "imágen".encode() in body
    assert "説明 ✓".encode() in body


def test_published_at_is_kept_verbatim():
    image = translate(manifest(published_at="2015-03-04T05:06:07.123456789Z"), Rendering.V8)

    assert image["published_at"] == "2015-03-04T05:06:07.123456789Z"


@pytest.mark.parametrize(
    ("value", "truthy"),
    [(None, False), (False, False), (0, False), (0.0, False), ("", False), (float("nan"), False),
     (True, True), (1, True), (-1, True), ("0", True), ([], True), ({}, True)],
)
def test_js_truthy(value, truthy):
    assert js_truthy(value) is truthy
