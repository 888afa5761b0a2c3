"""CPU time of one API process and its signature helper at given request rates.

    .venv/bin/python -m bench.api_cpu [RATE ...] [--seconds S] [--port P]

Starts the service with one process and its defaults, as bench/run does, and warms it
up for 3 s. Then it runs wrk for S seconds (default 10) at each RATE in turn. A RATE is
requests per second, or `peak` for as fast as wrk's 64 connections allow (default:
`peak 8134`). For each run it prints the rate wrk held and the CPU time of the API
process and its helper, read from /proc/PID/stat, as cores and as microseconds a
request. Needs what bench/run needs, and the bench database it creates.
"""

from __future__ import annotations

import argparse
import os
import sys

from bench import dataset, servers, signing, wrk
from bench.processes import BenchError, ProcessGroup

_TICKS = os.sysconf("SC_CLK_TCK")
_WARMUP_SECONDS = 3


def _cpu_seconds(pid: int) -> float:
    """Return the user and system CPU time of process `pid`, in seconds."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _rate(text: str) -> float | None:
    if text == "peak":
        return None
    value = float(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r}: expected 'peak' or a number of at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("rates", nargs="*", type=_rate, metavar="RATE", help="requests/s, or 'peak' (default: peak 8134)")
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run (default 10)")
    parser.add_argument("--port", type=int, default=18080, help="port of the service (default 18080)")
    args = parser.parse_args(argv)
    rates = args.rates or [None, 8134.0]

    try:
        wrk.require_wrk()
        accounts = dataset.prepare(reset=False)
        # Enough distinct signatures for every run at up to 25,000 req/s.
        count = int(sum(rate or 25000 for rate in rates) * args.seconds * 1.2) + 25000 * _WARMUP_SECONDS
        request_file = signing.generate(accounts, dataset.visibility(), count, "api-cpu", 1)
        group = ProcessGroup()
        try:
            started = servers.start(group, "service", 1, args.port, tag="-api-cpu")
            api = servers.api_pids("service", started)[0]
            helpers = servers.helper_pids(api)
            url = f"http://127.0.0.1:{args.port}"
            offset = wrk.run(url, str(request_file.path), _WARMUP_SECONDS, log_name="api-cpu-warmup")["issued"]
            for rate in rates:
                api_before = _cpu_seconds(api)
                helper_before = sum(_cpu_seconds(pid) for pid in helpers)
                figures = wrk.run(url, str(request_file.path), args.seconds, offset=offset, rate=rate, log_name="api-cpu")
                offset += figures["issued"]
                # wrk takes seconds to load the request file before its measured run, so divide by
                # the duration wrk reports.
                api_cores = (_cpu_seconds(api) - api_before) / figures["seconds"]
                helper_cores = (sum(_cpu_seconds(pid) for pid in helpers) - helper_before) / figures["seconds"]
                label = "peak" if rate is None else f"{rate:,.0f} req/s"
                print(f"{label:>13}: held {figures['rps']:,.0f} req/s, p99 {figures['p99_ms']:.2f} ms; "
                      f"API {api_cores:.2f} of a core ({api_cores / figures['rps'] * 1e6:.0f} µs a request), "
                      f"helper {helper_cores:.2f} ({helper_cores / figures['rps'] * 1e6:.0f} µs)", flush=True)
        finally:
            group.stop_all()
    except BenchError as exc:
        print(f"bench.api_cpu: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
