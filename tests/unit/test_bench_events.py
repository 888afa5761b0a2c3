"""The events file of the benchmark's freshness part: encoded before the run with a
placeholder time, which the publisher agent replaces when it sends each event."""

from pathlib import Path

import orjson
import pytest

from bench.freshness_agents import TIME_PLACEHOLDER, _split
from bench.freshness_part import _encoded
from workers.contract import InvalidEvent, decode
from workers.producer import image_event

MANIFESTS = Path(__file__).resolve().parents[1] / "data" / "real-manifests.jsonl"


def _events(count: int) -> list[dict]:
    with MANIFESTS.open("rb") as handle:
        manifests = [orjson.loads(line) for _, line in zip(range(count), handle)]
    return [image_event("image.updated", manifest, revision=2) for manifest in manifests]


def test_sent_body_is_event_with_time():
    events = _events(20)
    for event, line in zip(events, _encoded(events)):
        head, tail, event_id, event_type = _split(line + b"\n")
        body = head + b"2026-12-05T03:04:28.123Z" + tail

        sent = orjson.loads(body)
        assert sent == {**event, "time": "2026-12-05T03:04:28.123Z"}
        assert event_id == event["event_id"]
        assert event_type == "image.updated"
        assert decode(body).event_id == event["event_id"]


def test_encoded_events_carry_placeholder():
    for line in _encoded(_events(3)):
        assert orjson.loads(line)["time"] == TIME_PLACEHOLDER


def test_line_without_placeholder_rejected():
    event = _events(1)[0]
    with pytest.raises(ValueError, match="lacks the time"):
        _split(orjson.dumps(event))


def test_invalid_event_rejected_before_run():
    event = _events(1)[0]
    event["revision"] = 0
    with pytest.raises(InvalidEvent):
        _encoded([event])
