"""Start and stop the processes of a benchmark, and read their memory from /proc.

Every process is started here with its own log file and stopped by its pid; nothing is
ever looked up or killed by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.config import STATE_DIR


class BenchError(Exception):
    """A benchmark step failed; the message names what failed and what to check."""


class Process:
    """A child process with its log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None):
        self.name = name
        self.log_path = STATE_DIR / "logs" / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        full_env = {**os.environ, **(env or {})}
        self.popen = subprocess.Popen(argv, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
        self.pid = self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """Send SIGTERM to this pid, wait, then SIGKILL it if it is still there."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ProcessGroup:
    """Processes stopped together, in reverse start order, by `stop_all` (call it in a finally)."""

    def __init__(self):
        self._processes: list[Process] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        process = Process(name, argv, env)
        self._processes.append(process)
        return process

    def stop_all(self) -> None:
        while self._processes:
            self._processes.pop().stop()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR as the servers set it: connections left in TIME_WAIT by the last
        # run do not count, a listening socket does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def require_free_port(port: int) -> None:
    if not port_is_free(port):
        raise BenchError(f"port {port} on 127.0.0.1 is in use; stop what listens there or pass --port")


def wait_http(url: str, processes: list[Process], timeout: float = 30.0, status: int = 200) -> None:
    """Wait until GET `url` returns `status`; raise when a process exits or time runs out."""
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        for process in processes:
            if not process.running():
                raise BenchError(f"{process.name} exited with status {process.popen.returncode} before {url} "
                                 f"responded; its log ({process.log_path}) ends with:\n{process.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == status:
                    return
                last_error = f"status {response.status}"
        except urllib.error.HTTPError as exc:
            last_error = f"status {exc.code}"
        except OSError as exc:
            last_error = repr(exc)
        time.sleep(0.1)
    raise BenchError(f"{url} did not return {status} within {timeout:g} s (last: {last_error})")


def children_of(pid: int) -> list[int]:
    """Return the pids of the direct children of `pid` (from /proc, Linux only)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(part) for part in path.read_text().split()]
    except OSError:
        return []


def memory_kib(pid: int) -> dict[str, int]:
    """Return VmRSS and VmHWM (peak RSS) of `pid` in KiB, from /proc/PID/status."""
    found = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0])
    return found
