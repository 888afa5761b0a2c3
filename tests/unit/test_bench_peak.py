"""The peak run that the freshness part makes when the HTTP part did not run: a request
file that wrapped is signed again, larger, and the run repeated once, so that no
signature repeats. The server runs and the signing are replaced by a recorder here, and
`bench/run --part freshness` runs the real path."""

import pytest

from bench import http_part
from bench.config import Profile
from bench.context import Context
from bench.report import Results


class Recorder:
    """A stand-in for `_generate` and `measure`, which records the file sizes signed and returns
    one prepared result per run."""

    def __init__(self, wrapped: list[bool], rps: float):
        self.wrapped = wrapped
        self.rps = rps
        self.signed: list[int] = []

    def generate(self, ctx, count, name):
        self.signed.append(count)
        return name

    def measure(self, ctx, kind, processes, request_file, tag):
        return {"rps": self.rps, "repeated_signatures": self.wrapped.pop(0)}


def _context() -> Context:
    return Context(profile=Profile.quick(), runs=1, port=18080, worker_port=18091, accounts=[], visible=None,
                   results=Results(), unique_baselines=False)


@pytest.fixture
def recorder(monkeypatch):
    """Return a function that installs a Recorder with the given wraps and rate."""

    def install(wrapped: list[bool], rps: float) -> Recorder:
        fake = Recorder(wrapped, rps)
        monkeypatch.setattr(http_part, "_generate", fake.generate)
        monkeypatch.setattr(http_part, "measure", fake.measure)
        return fake

    return install


def test_peak_without_wrap_signs_once(recorder):
    fake = recorder([False], rps=3000.0)
    ctx = _context()

    figures = http_part.measure_peak(ctx, 1)

    assert figures["rps"] == 3000.0
    assert len(fake.signed) == 1
    assert ctx.results.notes == []
    assert ctx.rates[("service", 1)] == 3000.0


def test_peak_wrap_signs_larger_file(recorder):
    fake = recorder([True, False], rps=16000.0)
    ctx = _context()

    http_part.measure_peak(ctx, 1)

    assert len(fake.signed) == 2
    assert fake.signed[1] > fake.signed[0]
    assert fake.signed[1] >= 16000 * (ctx.profile.warmup_seconds + ctx.profile.http_seconds)
    assert ctx.results.notes == []


def test_peak_second_wrap_gets_note(recorder):
    recorder([True, True], rps=16000.0)
    ctx = _context()

    http_part.measure_peak(ctx, 1)

    assert len(ctx.results.notes) == 1
    assert "signatures repeated" in ctx.results.notes[0]
