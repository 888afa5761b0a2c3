"""The publisher agent of the benchmark's freshness part sends each event when it falls
due, and pauses at least a millisecond between sends. Under uvloop, which rounds timers
to whole milliseconds, a shorter pause returns at once and the agent spins."""

import asyncio
import time

import uvloop

from bench.freshness_agents import MIN_PAUSE, pace

COUNT = 300
RATE = 1000.0  # events per second, the freshness part's rate


def test_publisher_pauses_instead_of_spinning():
    started: list[tuple[int, float]] = []

    async def run() -> tuple[int, float, float]:
        t0 = time.monotonic() + 0.01
        began = time.monotonic()
        pauses = await pace(COUNT, RATE, t0, lambda index: started.append((index, time.monotonic())))
        return pauses, t0, time.monotonic() - began

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        pauses, t0, elapsed = runner.run(run())

    assert [index for index, _ in started] == list(range(COUNT))
    assert all(at >= t0 + index / RATE for index, at in started), "an event started before it fell due"
    # Each pause requests at least MIN_PAUSE, so about one fits into each millisecond of
    # the run (276 in 309 ms in one run). A pause may end a little early, so the bound
    # allows twice as many. Pauses that return at once (the spin) came to about 5,800
    # in the same time.
    assert pauses <= 2 * elapsed / MIN_PAUSE, f"{pauses} pauses in {elapsed * 1000:.0f} ms"
