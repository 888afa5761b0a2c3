"""Run wrk with bench/requests.lua and return its figures."""

from __future__ import annotations

import os
import shutil
import subprocess

import orjson

from bench import config
from bench.processes import BenchError


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise BenchError("wrk is not installed; install the Debian package with: apt-get install -y wrk")
    return path


def run(url: str, request_file: str, seconds: float, *, offset: int = 0, connections: int = config.WRK_CONNECTIONS,
        rate: float | None = None, log_name: str | None = None) -> dict:
    """Run `wrk -t1 -cN -dS --latency` on `url` with the requests of `request_file`.

    Returns requests/s, p50/p90/p99/max latency in milliseconds, the error counts (a
    status other than 2xx or 3xx counts as an error) and how often the file wrapped.
    With `rate`, it also counts how often the schedule fell a second behind and restarted.
    """
    argv = [require_wrk(), f"-t{config.WRK_THREADS}", f"-c{connections}", f"-d{seconds:g}s", "--latency",
            "-s", config.LUA_SCRIPT, url, "--", request_file, str(offset)]
    env = dict(os.environ)
    env.pop("BENCH_RATE", None)
    if rate:
        env["BENCH_RATE"] = f"{rate / config.WRK_THREADS:.3f}"
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=seconds + 120)
    if log_name:
        log_path = config.STATE_DIR / "logs" / f"{log_name}.wrk.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(" ".join(argv) + "\n" + result.stdout + result.stderr)
    line = next((l for l in result.stdout.splitlines() if l.startswith("BENCH_RESULT ")), None)
    if result.returncode != 0 or line is None:
        raise BenchError(f"wrk failed (status {result.returncode}) on {url}:\n{result.stdout}\n{result.stderr}")
    raw = orjson.loads(line.removeprefix("BENCH_RESULT "))
    seconds_measured = raw["duration_us"] / 1e6
    errors = raw["errors_connect"] + raw["errors_read"] + raw["errors_write"] + raw["errors_timeout"]
    return {
        "requests": raw["requests"],
        "rps": raw["requests"] / seconds_measured,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "socket_errors": errors,
        "status_errors": raw["errors_status"],
        "issued": raw["issued"],
        "wraps": raw["wraps"],
        "restarts": raw["restarts"],
        "file_count": raw["file_count"],
        "seconds": seconds_measured,
    }
