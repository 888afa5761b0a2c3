"""Schemathesis against the service's own OpenAPI document, over loopback.

The API runs as in production (`python -m service`, in its own process, on a free
loopback port), and schemathesis loads the document the API serves at /openapi.yaml.
Generated requests go out unsigned, and signed as alice with her RSA key. The signature
is added by a `requests` auth hook, which runs after schemathesis has built the final
method, path, query and headers, so it covers exactly what is sent.

Each response must not be a 5xx and must conform to the document: a documented
status, the documented headers and content type, and a body matching its schema.
FUZZ_MAX_EXAMPLES sets the examples per test (default 50, 300 requests in all);
docs/security.md gives the longer run for release checks.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests import log_capture
from tests.conftest import AMQP_URL
from tests.helpers import PUB

MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "50"))
ROOT = Path(__file__).parents[2]


class HttpSignatureAuth(requests.auth.AuthBase):
    """Sign a prepared request the way the triton CLI does, as `account`."""

    def __init__(self, account, key: str = "rsa"):
        self.account = account
        self.key = key

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        # path_url is the request target as requests writes it on the request line.
        request.headers.update(self.account.sign(request.method, request.path_url, key=self.key))
        return request


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
async def _images(db_pool):
    from tests.conftest import store_manifests

    await store_manifests(db_pool, PUB)


@pytest.fixture(scope="module")
def api_process(database_url, accounts, log_capture_dir):
    """The API as `python -m service` serves it; yields its base URL."""
    port = _free_port()
    environment = {
        **os.environ,
        "DATABASE_URL": log_capture.dsn_with_password(database_url),
        "AMQP_URL": AMQP_URL,
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": str(port),
        "METRICS_PORT": "0",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "debug",
    }
    log_path = log_capture_dir / "api-process.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=ROOT, env=environment, stdout=log_file, stderr=subprocess.STDOUT
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if requests.get(base_url + "/readyz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert process.poll() is None, f"the API exited with {process.returncode}; see {log_path}"
            assert time.monotonic() < deadline, f"the API was not ready within 20 s; see {log_path}"
            time.sleep(0.1)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


# How schemathesis's checks are set up for this API, and why:
# - positive_data_acceptance: a request that matches the document may still get 400
#   (InvalidVersion for a version range no supported version satisfies, InvalidHeader
#   for an unusable Authorization header) or 406 (an Accept that excludes JSON). JSON
#   Schema cannot state those rules, so they count as accepted. POST, PUT, DELETE and
#   PATCH are documented only to state that they get 405.
# - ignored_auth probes "no credentials" and "invalid credentials" through the same
#   session, which signs every request, and counts CloudAPI's 400 for an unparsable
#   Authorization header as "accepted". The unsigned mode covers what it checks.
# - allow_header_conformance compares Allow with the documented methods of the path,
#   which include OPTIONS (the CORS preflight) and the 405-only methods; Allow names
#   the methods that serve the image, GET and HEAD, as in CloudAPI.
_CHECKS_CONFIG = {
    "checks": {
        "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "401", "403", "404", "406"]},
        "ignored_auth": {"enabled": False},
    },
    "operations": [
        {"include-operation-id": operation_id, "checks": {"positive_data_acceptance": {"expected-statuses": ["405"]}}}
        for operation_id in ("PostImageNotAllowed", "PutImageNotAllowed", "DeleteImageNotAllowed", "PatchImageNotAllowed")
    ]
    + [{"include-path": "/{login}/images/{id}", "checks": {"allow_header_conformance": {"enabled": False}}}],
}


@pytest.fixture(scope="module")
def openapi_schema(api_process):
    """The document as the API serves it, which must be docs/openapi.yaml."""
    served = requests.get(api_process + "/openapi.yaml", timeout=10)
    assert served.content == (ROOT / "docs" / "openapi.yaml").read_bytes()
    config = schemathesis.Config.from_dict(_CHECKS_CONFIG)
    return schemathesis.openapi.from_url(api_process + "/openapi.yaml", config=config)


@pytest.fixture(scope="module")
def sessions(accounts):
    """A `requests` session per mode: one that signs every request as alice, one that does not."""
    signed = requests.Session()
    signed.auth = HttpSignatureAuth(accounts["alice"])
    unsigned = requests.Session()
    yield {"signed": signed, "unsigned": unsigned}
    signed.close()
    unsigned.close()


def _breaks_authorization(case) -> bool:
    """Whether schemathesis made `case` invalid through its Authorization header."""
    data = getattr(case.meta.phase, "data", None) if case.meta is not None else None
    return getattr(data, "parameter", None) == "Authorization"


def _call_and_validate(case, base_url: str, session: requests.Session):
    __tracebackhide__ = True
    return case.call_and_validate(base_url=base_url, session=session, timeout=10)


def _assert_unsigned_rejected(case, response) -> None:
    if case.operation.path == "/{login}/images/{id}" and case.method in ("GET", "HEAD"):
        assert response.status_code >= 400, f"{case.method} {case.formatted_path} without a signature got {response.status_code}"


# Cases of every operation, valid ones and ones that break the document (negative),
# each sent signed and unsigned. schemathesis's pytest plugin (from_fixture) fails
# under pytest 9.2 ("'Function' object has no attribute '_nodeid'"), so the
# strategies are drawn in plain hypothesis tests.
@pytest.mark.parametrize("signing", ["signed", "unsigned"])
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_generated_requests_conform(openapi_schema, api_process, sessions, signing, mode):
    strategy = openapi_schema.as_strategy(generation_mode=mode)

    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=st.data())
    def check(data):
        case = data.draw(strategy)
        # A case that breaks the Authorization header on purpose is sent as generated.
        unsigned = signing == "unsigned" or _breaks_authorization(case)
        response = _call_and_validate(case, api_process, sessions["unsigned" if unsigned else "signed"])
        if unsigned:
            _assert_unsigned_rejected(case, response)

    check()


# The stored image, so that 200 responses are generated too: a fixed path, generated headers.
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_stored_image_conforms(openapi_schema, api_process, sessions, method):
    operation = openapi_schema["/{login}/images/{id}"][method]
    strategy = operation.as_strategy(path_parameters={"login": "my", "id": PUB["uuid"]})

    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(data=st.data())
    def check(data):
        case = data.draw(strategy)
        _call_and_validate(case, api_process, sessions["signed"])

    check()
