"""docs/openapi.yaml is a valid OpenAPI 3.1 document, is served at /openapi.yaml, and
describes the live answers: status, body schema and headers of every kind of response."""

import re
from pathlib import Path

import jsonschema
import pytest
import referencing
import yaml
from openapi_spec_validator import validate

from tests.helpers import PUB, PUB_UUID, new_uuid

DOCUMENT_PATH = Path(__file__).parents[2] / "docs" / "openapi.yaml"
DOCUMENT = yaml.safe_load(DOCUMENT_PATH.read_text(encoding="utf-8"))
_URI = "urn:cloudapi-images:openapi"
_REGISTRY = referencing.Registry().with_resource(
    _URI, referencing.Resource.from_contents(DOCUMENT, default_specification=referencing.jsonschema.DRAFT202012)
)


@pytest.fixture(scope="module", autouse=True)
async def _images(db_pool):
    from tests.conftest import store_manifests

    await store_manifests(db_pool, PUB)


def _resolve(node: dict) -> dict:
    while "$ref" in node:
        node = _REGISTRY.resolver(_URI).lookup(_URI + node["$ref"]).contents
    return node


def _operation(path: str, method: str) -> dict:
    for template, item in DOCUMENT["paths"].items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", re.escape(template).replace(r"\{", "{").replace(r"\}", "}")) + "$"
        if re.match(pattern, path.split("?")[0]) and method.lower() in item:
            return item[method.lower()]
    raise AssertionError(f"{method} {path} is not in the OpenAPI document")


def assert_conforms(method: str, path: str, answer) -> None:
    operation = _operation(path, method)
    responses = operation["responses"]
    assert str(answer.status) in responses, f"{method} {path} answered {answer.status}, not documented"
    response = _resolve(responses[str(answer.status)])
    for name, header in response.get("headers", {}).items():
        header = _resolve(header)
        if header.get("required"):
            assert name in answer.headers, f"{method} {path} {answer.status}: missing header {name}"
            jsonschema.validate(answer.headers[name], header["schema"])
    content = response.get("content")
    if method == "HEAD" or content is None:
        assert answer.body == b""
        return
    (media_type, description), = content.items()
    assert answer.headers["Content-Type"].split(";")[0] == media_type
    if media_type == "application/json":
        schema = {"$ref": _URI + description["schema"]["$ref"]} if "$ref" in description["schema"] else description["schema"]
        validator = jsonschema.Draft202012Validator(schema, registry=_REGISTRY)
        validator.validate(answer.json())


def test_document_is_valid_openapi():
    validate(DOCUMENT)


async def test_document_is_served(call):
    answer = await call("/openapi.yaml", as_=None)

    assert answer.status == 200
    assert answer.body == DOCUMENT_PATH.read_bytes()
    assert answer.headers["Content-Type"] == "application/yaml"


IMAGE = f"/my/images/{PUB_UUID}"
CASES = [
    ("GET", IMAGE, {}, "alice"),
    ("GET", IMAGE, {"Accept-Version": "~7.0"}, "alice"),
    ("GET", IMAGE, {"Accept-Version": "~7.1"}, "alice"),
    ("HEAD", IMAGE, {}, "alice"),
    ("GET", IMAGE, {}, None),
    ("HEAD", IMAGE, {}, None),
    ("GET", IMAGE, {"Accept-Version": "~6.5"}, "alice"),
    ("GET", IMAGE, {"Accept": "text/html"}, "alice"),
    ("GET", f"/bob/images/{PUB_UUID}", {}, "alice"),
    ("GET", IMAGE, {}, "dave"),
    ("GET", f"/my/images/{new_uuid()}", {}, "alice"),
    ("GET", "/my/images/not-an-id", {}, "alice"),
    ("HEAD", f"/my/images/{new_uuid()}", {}, "alice"),
    ("POST", IMAGE, {}, None),
    ("PUT", IMAGE, {}, None),
    ("DELETE", IMAGE, {}, None),
    ("PATCH", IMAGE, {}, None),
    ("OPTIONS", IMAGE, {}, None),
    ("OPTIONS", IMAGE, {"Origin": "https://console.example.com", "Access-Control-Request-Method": "GET"}, None),
    ("GET", "/--ping", {}, None),
    ("GET", "/--ping", {"Accept-Version": "~6"}, None),
    ("GET", "/livez", {}, None),
    ("GET", "/readyz", {}, None),
]


@pytest.mark.parametrize(("method", "path", "headers", "as_"), CASES)
async def test_live_answers_conform(call, method, path, headers, as_):
    answer = await call(path, method=method, headers=headers, as_=as_)

    assert_conforms(method, path, answer)


async def test_too_large_body_conforms(call):
    answer = await call(IMAGE, data=b"x" * 100_000)

    assert answer.status == 413
    assert_conforms("GET", IMAGE, answer)
