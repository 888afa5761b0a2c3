"""Measure what the per-request observer (metrics and access log) and the request-id
context add to one request, in microseconds.

    .venv/bin/python -m tests.observer_cost
    PROMETHEUS_MULTIPROC_DIR=$(mktemp -d) .venv/bin/python -m tests.observer_cost

The second form measures the metrics as the children of a multi-process API record
them (memory-mapped files). Log lines are rendered as in production (JSON) and written
to /dev/null, so the figures leave out the cost of the terminal or the log collector.
"""

from __future__ import annotations

import os
import sys
import timeit

import structlog
from aiohttp.test_utils import make_mocked_request
from prometheus_client import values
from structlog.contextvars import bind_contextvars, clear_contextvars

from service import logs
from service.app import _request_observer
from service.http import REQUEST_ID
from service.metrics import ApiMetrics
from service.routes import ROUTES
from service.settings import Settings

_ROUNDS = 200_000


def _per_call_microseconds(function, rounds: int = _ROUNDS) -> float:
    # The best of 5 runs: the others include noise from the rest of the machine.
    best = min(timeit.repeat(function, number=rounds, repeat=5))
    return best / rounds * 1e6


def main() -> int:
    logs.configure("json", "info")
    devnull = open(os.devnull, "wb")  # noqa: SIM115 (open until the process exits)
    structlog.configure(logger_factory=structlog.BytesLoggerFactory(devnull))

    request = make_mocked_request("GET", "/my/images/2b683a82-a066-11e3-97ab-2faa44701c5a")
    request[REQUEST_ID] = "2f1e4c1e-52a4-4b0e-9d0c-1d6f3a0d6f11"
    spec = ROUTES["/{login}/images/{id}"]

    def observer(metrics: bool, access_log: bool):
        settings = Settings.from_env({}, access_log=access_log)
        return _request_observer(settings, ApiMetrics() if metrics else None)

    metrics_only = observer(metrics=True, access_log=False)
    log_only = observer(metrics=False, access_log=True)
    both = observer(metrics=True, access_log=True)

    def request_context() -> None:
        bind_contextvars(request_id="2f1e4c1e-52a4-4b0e-9d0c-1d6f3a0d6f11")
        clear_contextvars()

    mode = "multiprocess (memory-mapped files)" if values.ValueClass is not values.MutexValue else "one process"
    print(f"Python {sys.version.split()[0]}, metrics mode: {mode}")
    print(f"metrics only        {_per_call_microseconds(lambda: metrics_only(request, spec, 200, 0.0012, None)):6.2f} us")
    print(f"access log only     {_per_call_microseconds(lambda: log_only(request, spec, 200, 0.0012, None)):6.2f} us")
    print(f"metrics, access log {_per_call_microseconds(lambda: both(request, spec, 200, 0.0012, None)):6.2f} us")
    print(f"request id context  {_per_call_microseconds(request_context):6.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
