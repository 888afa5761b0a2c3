"""Version negotiation with node-semver ranges, pinned on the ranges real clients send."""

import pytest

from service.images import Rendering
from service.versions import negotiate, rendering_for, requested_range


@pytest.mark.parametrize(
    ("version_range", "negotiated"),
    [
        ("~9||~8", "9.0.0"),  # triton
        ("~7||~8", "8.0.0"),  # sdc-getimage
        ("~7.2", "7.2.0"),
        ("7.0.0", "7.0.0"),
        ("*", "9.0.0"),
        ("~8", "8.0.0"),
        ("^7", "7.3.0"),
        ("8.x", "8.0.0"),
        ("~7", "7.3.0"),
        ("~7.0", "7.0.0"),
        ("~7.1", "7.1.0"),
        ("7.3.0", "7.3.0"),
        ("~9 || ~8", "9.0.0"),
        ("^7.3.0||^9.0.0", "9.0.0"),
        (">=7.0.0", "9.0.0"),
        ("x", "9.0.0"),
        (None, "9.0.0"),
    ],
)
def test_supported_ranges(version_range, negotiated):
    assert negotiate(version_range) == negotiated


@pytest.mark.parametrize("version_range", ["~6.5", "8.1.0", "~10", "foo", "7.0.0 - ", "~" * 300, "1.2.3.4"])
def test_unsatisfiable_or_unparsable_ranges(version_range):
    assert negotiate(version_range) is None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Accept-Version": "~8", "Api-Version": "~7.0", "X-Api-Version": "~7.1"}, "~8"),
        ({"Api-Version": "~7.0", "X-Api-Version": "~7.1"}, "~7.0"),
        ({"X-Api-Version": "~7.1"}, "~7.1"),
        ({"Accept-Version": "  ", "X-Api-Version": "~7.1"}, "~7.1"),
        ({}, None),
    ],
)
def test_header_precedence(headers, expected):
    assert requested_range(headers) == expected


@pytest.mark.parametrize(
    ("version", "rendering"),
    [("7.0.0", Rendering.V7_0), ("7.1.0", Rendering.V7_1), ("7.3.0", Rendering.V7_1), ("8.0.0", Rendering.V8), ("9.0.0", Rendering.V8)],
)
def test_rendering_follows_negotiated_version(version, rendering):
    assert rendering_for(version) is rendering
