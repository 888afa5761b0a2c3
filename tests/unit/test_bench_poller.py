"""The poller agent of the benchmark's freshness part keeps polling an image on a
schedule, but never has more than `MAX_POLLS_IN_FLIGHT` of its polls waiting for a
response, so a slow API does not get ever more polls."""

import asyncio
import time

from aiohttp import web

from bench.freshness_agents import MAX_POLLS_IN_FLIGHT, poll
from tests.helpers import bench_image_server

RESPONSE_DELAY = 0.05  # seconds the server takes to respond: five poll intervals
MARKER_AFTER = 0.3  # seconds after the first poll from which responses contain the marker


async def test_slow_responses_limit_polls():
    in_flight = 0
    max_in_flight = 0
    first_poll = None

    async def image(request: web.Request) -> web.Response:
        nonlocal in_flight, max_in_flight, first_poll
        first_poll = first_poll or time.monotonic()
        in_flight += 1
        max_in_flight = max(max_in_flight, in_flight)
        try:
            await asyncio.sleep(RESPONSE_DELAY)
            changed = time.monotonic() - first_poll >= MARKER_AFTER
            return web.json_response({"tags": {"marker": "m-1" if changed else "m-0"}})
        finally:
            in_flight -= 1

    async with bench_image_server(image) as base_url:
        plan = {
            "t0": time.monotonic(),
            "min_interval": 0.01,
            "timeout": 5.0,
            "base_url": base_url,
            "connections": 64,
            "samples": [{"index": "0", "path": "/bench01/images/a", "headers": {}, "scheduled": 0.0, "marker": "m-1"}],
        }
        async with asyncio.timeout(10):
            result = await poll(plan)

    sample = result["samples"]["0"]
    assert sample["seen"] is not None
    assert sample["errors"] == 0
    assert sample["last_negative_sent"] is not None
    # Without the limit, a poll every 10 ms with responses taking 50 ms keeps about 5 out.
    assert max_in_flight == MAX_POLLS_IN_FLIGHT
