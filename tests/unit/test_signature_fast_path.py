"""The one-step parser for the clients' header form gives exactly what the general
parser gives, and hands everything else to it."""

import time
from email.utils import formatdate

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from service.auth.signature import RequestView, parse_client_form, _current
from tests.helpers import TestAccount

ALICE = TestAccount("alice")
NOW = time.time()


def _view(headers: dict[str, str], target: str) -> RequestView:
    return RequestView("GET", target, "1.1", CIMultiDictProxy(CIMultiDict(headers)))


@settings(max_examples=200, deadline=None)
@given(
    signed=st.sampled_from([("(request-target)", "date"), ("date", "(request-target)"), ("date",)]),
    offset=st.integers(min_value=-400, max_value=400),
    query=st.sampled_from(["", "?a=1", "?x=%2F&y"]),
    algorithm=st.sampled_from(["rsa-sha256", "RSA-SHA256", "rsa-sha1", "rsa-sha384"]),
)
def test_fast_path_matches_general_parser(signed, offset, query, algorithm):
    target = f"/my/images/2b683a82-a066-11e3-97ab-2faa44701c5a{query}"
    headers = ALICE.sign("GET", target, signed=signed, date=formatdate(NOW + offset, usegmt=True))
    headers["Authorization"] = headers["Authorization"].replace('algorithm="rsa-sha256"', f'algorithm="{algorithm}"')
    view = _view(headers, target)

    fast = parse_client_form(headers["Authorization"], view, NOW)

    if fast is not None:
        assert fast == _current(headers["Authorization"], view, NOW)
    else:
        # Refused or unusual forms go to the general parser, which names the problem.
        assert abs(offset) > 299 or algorithm.lower() not in ("rsa-sha256", "rsa-sha1")


def test_other_parameter_orders_use_the_general_parser():
    headers = ALICE.sign("GET", "/my/images/x")
    key_id, algorithm, listed, signature = (part.split("=", 1)[1] for part in headers["Authorization"][10:].split(","))
    reordered = f"Signature algorithm={algorithm},keyId={key_id},signature={signature},headers={listed}"

    assert parse_client_form(reordered, _view({**headers, "Authorization": reordered}, "/my/images/x"), NOW) is None
