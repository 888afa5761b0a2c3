"""API version negotiation with node-semver range semantics.

The range comes from `Accept-Version`, else `Api-Version`, else `X-Api-Version`; none
means `*`. The negotiated version is the highest supported version the range admits,
which both the `Api-Version` response header and the image object's fields follow.
"""

from __future__ import annotations

import functools

import nodesemver

from service.images import Rendering

SUPPORTED_VERSIONS = ("7.0.0", "7.1.0", "7.2.0", "7.3.0", "8.0.0", "9.0.0")
LATEST_VERSION = SUPPORTED_VERSIONS[-1]
VERSION_HEADERS = ("Accept-Version", "Api-Version", "X-Api-Version")

# Real clients send ranges of a few characters (`~9||~8`); a longer value is refused
# before it reaches the range parser's regular expressions.
MAX_RANGE_LENGTH = 256


def requested_range(headers) -> str | None:
    """Return the first non-empty version header value, or None when there is none."""
    for name in VERSION_HEADERS:
        value = headers.get(name)
        if value is not None and value.strip():
            return value
    return None


@functools.lru_cache(maxsize=4096)
def negotiate(version_range: str | None) -> str | None:
    """Return the highest supported version `version_range` admits, or None."""
    if version_range is None:
        return LATEST_VERSION
    if len(version_range) > MAX_RANGE_LENGTH:
        return None
    try:
        return nodesemver.max_satisfying(SUPPORTED_VERSIONS, version_range.strip(), loose=False)
    except (ValueError, TypeError, IndexError, AttributeError):
        # The port raises assorted errors on some malformed input; all mean "unusable".
        return None


_RENDERINGS = {
    "7.0.0": Rendering.V7_0,
    "7.1.0": Rendering.V7_1,
    "7.2.0": Rendering.V7_1,
    "7.3.0": Rendering.V7_1,
    "8.0.0": Rendering.V8,
    "9.0.0": Rendering.V8,
}


def rendering_for(version: str) -> Rendering:
    """Return how the image object looks at the negotiated `version`."""
    return _RENDERINGS[version]
