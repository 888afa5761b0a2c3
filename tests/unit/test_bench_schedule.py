"""The rate schedule of bench/requests.lua. A schedule that falls more than a second
behind starts again from the current time, and wrk's result counts each restart. So a
held rate below the requested one can be read as seconds of schedule dropped."""

import asyncio
import shutil

import pytest
from aiohttp import web

from bench import wrk
from tests.helpers import bench_image_server

STALL = 1.5  # seconds the server takes for its first response, more than the schedule's 1 s limit
RATE = 100.0  # requests per second requested from wrk
SECONDS = 3  # length of each wrk run (wrk takes whole seconds)

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install -y wrk)")


async def _run_wrk(tmp_path, *, stall_first: bool) -> dict:
    """Run wrk on one connection at RATE against a local server and return its figures."""
    responses = 0

    async def image(request: web.Request) -> web.Response:
        nonlocal responses
        responses += 1
        if stall_first and responses == 1:
            await asyncio.sleep(STALL)
        return web.json_response({"id": request.match_info["id"]})

    request_file = tmp_path / "requests.tsv"
    request_file.write_text("".join(f"GET\t/bench01/images/{index}\tAccept: application/json\n" for index in range(1000)))
    async with bench_image_server(image) as base_url:
        return await asyncio.to_thread(wrk.run, base_url, str(request_file), SECONDS, connections=1, rate=RATE)


async def test_stall_restarts_schedule_once(tmp_path):
    figures = await _run_wrk(tmp_path, stall_first=True)
    assert figures["restarts"] == 1
    assert figures["status_errors"] == 0


async def test_steady_server_never_restarts(tmp_path):
    figures = await _run_wrk(tmp_path, stall_first=False)
    assert figures["restarts"] == 0
    assert figures["requests"] > 0
