"""`python -m workers seed FILE.jsonl`: publish IMGAPI manifests as the lifecycle events
that lead to their state.

| manifest state | events published (revisions 1, 2, 3)                  |
|----------------|-------------------------------------------------------|
| active         | image.created, image.activated                        |
| disabled       | image.created, image.activated, image.disabled        |
| unactivated    | image.created                                         |
| creating       | image.created                                         |
| failed         | image.created (state creating), image.failed          |

A manifest without `state`, `public` or `owner` first gets IMGAPI's values for them
(active, false, the operator's UUID); nothing else is changed, so odd real values (an
`os` of `QEMU`, an owner that is not a UUID, nanosecond timestamps) are published as
they are. The intermediate manifests look as IMGAPI shows them at that step: an image
not yet activated has state `unactivated` and no `published_at`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from workers.contract import apply_imgapi_defaults
from workers.producer import image_event


class SeedError(ValueError):
    """A line of the seed file is not a manifest."""


def _unactivated(manifest: dict[str, Any]) -> dict[str, Any]:
    created = {key: value for key, value in manifest.items() if key not in ("published_at", "error")}
    created["state"] = "unactivated"
    if "disabled" in created:
        created["disabled"] = False
    return created


def lifecycle_events(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the events, in order, that bring an image to `manifest`'s state."""
    manifest = apply_imgapi_defaults(manifest)
    state = manifest["state"]
    if state == "active":
        steps = [("image.created", _unactivated(manifest)), ("image.activated", manifest)]
    elif state == "disabled":
        enabled = {**manifest, "state": "active"}
        if "disabled" in enabled:
            enabled["disabled"] = False
        steps = [
            ("image.created", _unactivated(manifest)),
            ("image.activated", enabled),
            ("image.disabled", manifest),
        ]
    elif state == "failed":
        placeholder = {key: value for key, value in manifest.items() if key != "error"}
        placeholder["state"] = "creating"
        steps = [("image.created", placeholder), ("image.failed", manifest)]
    else:
        # unactivated and creating images exist as soon as they are created.
        steps = [("image.created", manifest)]
    return [image_event(event_type, body, revision=revision) for revision, (event_type, body) in enumerate(steps, 1)]


def read_manifests(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the manifests of a JSON Lines file; blank lines are skipped."""
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                manifest = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise SeedError(f"{path}:{number}: not valid JSON: {exc}") from None
            if not isinstance(manifest, dict) or not isinstance(manifest.get("uuid"), str):
                raise SeedError(f"{path}:{number}: expected a manifest object with a uuid")
            yield manifest


def seed_events(paths: list[Path]) -> list[dict[str, Any]]:
    """Return every event for every manifest of `paths`, in file order."""
    events: list[dict[str, Any]] = []
    for path in paths:
        for manifest in read_manifests(path):
            events.extend(lifecycle_events(manifest))
    return events
