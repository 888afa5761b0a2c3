"""Collect the figures of a session and print them as a table with medians, spreads,
ratios and PASS/FAIL against the targets.

A ratio is computed within each repetition (both figures come from the same
repetition, minutes apart at most), and the table shows the median of those ratios and
their min–max. PASS or FAIL is decided on the median.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field

import orjson

from bench import config

# Baselines of the machine the absolute targets (milliseconds, events per second) were
# set on: bare aiohttp with one uvloop process, and the bare consumer acking each message.
REFERENCE_BARE_RPS = 41_000
REFERENCE_BARE_CONSUMER = 11_400
# A baseline under this fraction of its reference gets a note under the table.
SLOW_MACHINE_FRACTION = 0.6


@dataclass
class Row:
    part: str
    figure: str
    unit: str
    values: list[float]
    target: str = ""  # e.g. ">= 1.70"; empty when the line has no target
    note: str = ""

    def verdict(self) -> str:
        if not self.target or not self.values:
            return ""
        operator, _, bound = self.target.partition(" ")
        median = statistics.median(self.values)
        ok = median >= float(bound) if operator == ">=" else median <= float(bound)
        return "PASS" if ok else "FAIL"


@dataclass
class Results:
    """Raw measurements keyed by (part, name), one value per repetition, plus notes."""

    started: float = field(default_factory=time.time)
    values: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    raw: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)

    def add(self, part: str, name: str, value: float) -> None:
        self.values[(part, name)].append(value)

    def get(self, part: str, name: str) -> list[float]:
        return self.values.get((part, name), [])

    def record(self, **fields) -> None:
        self.raw.append(fields)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    def row(self, part: str, figure: str, unit: str, values: list[float], target: str = "", note: str = "") -> None:
        if values:
            self.rows.append(Row(part, figure, unit, list(values), target, note))

    def save(self, command: str) -> str:
        directory = config.STATE_DIR / "results"
        directory.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.started))
        path = directory / f"{stamp}.json"
        document = {
            "command": command,
            "started": self.started,
            "rows": [row.__dict__ | {"verdict": row.verdict()} for row in self.rows],
            "raw": self.raw,
            "notes": self.notes,
        }
        path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
        (directory / f"{stamp}.txt").write_text(format_table(self.rows) + "\n" + "\n".join(self.notes) + "\n")
        return str(path)


def _number(value: float, unit: str) -> str:
    if unit in ("req/s", "events/s"):
        return f"{value:,.0f}"
    if unit == "x":
        return f"{value:.2f}"
    if unit == "MB":
        return f"{value:.1f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def format_table(rows: list[Row]) -> str:
    header = ("part", "figure", "unit", "n", "median", "min–max", "target", "result")
    lines = [header]
    for row in rows:
        median = statistics.median(row.values)
        spread = f"{_number(min(row.values), row.unit)}–{_number(max(row.values), row.unit)}"
        lines.append((row.part, row.figure, row.unit, str(len(row.values)), _number(median, row.unit), spread,
                      row.target, row.verdict()))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for index, line in enumerate(lines):
        cells = [cell.rjust(widths[i]) if i in (3, 4, 5) else cell.ljust(widths[i]) for i, cell in enumerate(line)]
        out.append("  ".join(cells).rstrip())
        if index == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(out)


def note_slow_machine(results: Results) -> None:
    """Add a note when a baseline of this session ran far below the same baseline on the
    machine the absolute targets come from. On such a machine, a FAIL of a p99, of
    events/s or of freshness is more about the machine than the service, while the
    ratios still compare the service with baselines run on the same machine."""
    for part, name, label, unit, reference in (
        ("HTTP 1p", "bare rps", "bare aiohttp with 1 process", "req/s", REFERENCE_BARE_RPS),
        ("worker", "bare", "the bare consumer", "events/s", REFERENCE_BARE_CONSUMER),
    ):
        values = results.get(part, name)
        if not values:
            continue
        median = statistics.median(values)
        if median < SLOW_MACHINE_FRACTION * reference:
            # Appended without printing, because the caller prints every note under the table next.
            results.notes.append(f"{label} ran at {median:,.0f} {unit}, {median / reference:.2f} of the "
                                 f"{reference:,} of the machine the targets were set on: judge this machine by "
                                 "the ratios, not by the targets in ms and events/s")


def ratios(numerators: list[float], denominators: list[float]) -> list[float]:
    """Return the per-repetition ratios of two figures measured in the same repetitions."""
    return [n / d for n, d in zip(numerators, denominators) if d]
