"""Start the service or a baseline on the bench port, with 1 or more processes."""

from __future__ import annotations

import time

from bench import config
from bench.processes import BenchError, Process, ProcessGroup, children_of, require_free_port, wait_http

# The service's defaults stay as they are (access log on, metrics on, JSON logs,
# DB_POOL_SIZE 8, CACHE_MAX_IMAGES 100000); only the database and the ports change. The
# metrics port is the bench port plus 1000, so a service running on the default 9090
# does not get in the way.
KINDS = ("bare", "naive", "service")
LABELS = {"bare": "(a) bare aiohttp", "naive": "(b) aiohttp+asyncpg", "service": "service"}


def start(group: ProcessGroup, kind: str, processes: int, port: int, extra_env: dict[str, str] | None = None,
          tag: str = "") -> list[Process]:
    """Start `kind` with `processes` processes on `port` and wait until it responds."""
    require_free_port(port)
    name = f"{kind}-{processes}p{tag}"
    started: list[Process] = []
    if kind == "service":
        env = {"DATABASE_URL": config.database_url(), "HTTP_HOST": "127.0.0.1", "HTTP_PORT": str(port),
               "METRICS_PORT": str(port + 1000), "HTTP_PROCESSES": str(processes), **(extra_env or {})}
        started.append(group.start(name, [config.PYTHON, "-m", "service"], env))
        ready_path = "/readyz"
    else:
        argv = [config.PYTHON, "-m", "bench.baselines", kind, "--port", str(port)]
        if kind == "naive":
            argv += ["--database-url", config.database_url()]
        for index in range(processes):
            started.append(group.start(f"{name}-{index}", argv))
        ready_path = "/--ping"
    url = f"http://127.0.0.1:{port}{ready_path}"
    wait_http(url, started)
    if kind == "service" and processes > 1:
        _wait_children(started[0], processes)
    # With SO_REUSEPORT the kernel spreads new connections over the sockets by a hash.
    # More probes make it likely, though not certain, that every process has started,
    # and the warm-up covers any that has not.
    for _ in range(10 * processes):
        wait_http(url, started)
    return started


def _wait_children(parent: Process, processes: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = [pid for pid in children_of(parent.pid) if b"spawn_main" in _cmdline(pid)]
        if len(children) >= processes:
            return
        time.sleep(0.1)
    raise BenchError(f"the service did not start {processes} API processes within {timeout:g} s; "
                     f"see {parent.log_path}")


def api_pids(kind: str, started: list[Process]) -> list[int]:
    """Return the pids of the processes that serve requests."""
    if kind == "service":
        parent = started[0]
        children = children_of(parent.pid)
        # The multiprocessing "spawn" start method adds a resource tracker child; the
        # API processes are the children whose command line runs the spawn entry point.
        api = [pid for pid in children if b"spawn_main" in _cmdline(pid)]
        # With HTTP_PROCESSES=1 the parent serves requests itself.
        return api or [parent.pid]
    return [process.pid for process in started]


def helper_pids(api_pid: int) -> list[int]:
    """Return the pids of the signature helper processes (python -m service.auth.checker) of an API process."""
    return [pid for pid in children_of(api_pid) if b"service.auth.checker" in _cmdline(pid)]


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""
