"""The table of bench/run: verdicts on medians, and the note about a slow machine."""

from bench import report


def _results(bare_aiohttp: list[float], bare_consumer: list[float]) -> report.Results:
    results = report.Results()
    for value in bare_aiohttp:
        results.add("HTTP 1p", "bare rps", value)
    for value in bare_consumer:
        results.add("worker", "bare", value)
    return results


def test_verdict_on_the_median():
    assert report.Row("HTTP 1p", "service / (a)", "x", [0.40, 0.50, 0.46], ">= 0.45").verdict() == "PASS"
    assert report.Row("HTTP 1p", "service p99", "ms", [9.0, 12.0, 11.0], "<= 10").verdict() == "FAIL"
    assert report.Row("HTTP 1p", "service p50", "ms", [1.0]).verdict() == ""


def test_slow_machine_noted():
    results = _results(bare_aiohttp=[7_162, 6_048, 6_900], bare_consumer=[2_000, 2_100, 2_050])
    report.note_slow_machine(results)
    assert len(results.notes) == 2
    assert results.notes[0].startswith("bare aiohttp with 1 process ran at 6,900 req/s, 0.17 of the 41,000")
    assert results.notes[1].startswith("the bare consumer ran at 2,050 events/s, 0.18 of the 11,400")
    assert "judge this machine by the ratios" in results.notes[1]


def test_machine_near_the_reference_not_noted():
    results = _results(bare_aiohttp=[33_539, 30_000, 35_000], bare_consumer=[9_143, 9_000, 9_500])
    report.note_slow_machine(results)
    assert results.notes == []


def test_parts_not_run_not_noted():
    results = report.Results()
    report.note_slow_machine(results)
    assert results.notes == []
