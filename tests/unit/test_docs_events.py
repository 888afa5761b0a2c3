"""The examples of docs/events.md are valid events, one of every type."""

import re
from pathlib import Path

import orjson

from workers.contract import EVENT_TYPES, decode

DOC = Path(__file__).parents[2] / "docs" / "events.md"


def _examples() -> list[dict]:
    blocks = re.findall(r"```json\n(.*?)\n```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    return [orjson.loads(block) for block in blocks]


def test_every_example_decodes():
    for example in _examples():
        event = decode(orjson.dumps(example))

        assert event.type == example["type"]


def test_every_type_has_an_example():
    assert sorted(example["type"] for example in _examples()) == sorted(EVENT_TYPES)
