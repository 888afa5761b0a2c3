"""Where signature checks run: on a thread of the API process, or in a helper process.

An RSA-2048 check takes about 20 microseconds in a tight loop. On the event loop's
thread of a busy API process it cost about 45 microseconds of each request's time,
measured against a process with the check switched off (docs/benchmarks.md). The
likely cause is that the rest of the request evicts OpenSSL's code and data from the
CPU caches. So the checks leave the event loop, in one of two ways:

- `ThreadVerifier`: a thread of the API process. OpenSSL releases the GIL while it
  checks, so the thread checks while the event loop serves other requests. The event
  loop puts each check on a queue and awaits a future. The thread takes everything
  queued, checks it, and hands all the results back in one callback. So a busy process
  pays one wake-up per batch, not per request.
- `service.auth.helper.HelperVerifier`: a helper process, which shares no GIL with the
  event loop.

`start_verifier` chooses (`SIGNATURE_CHECKS`). Measured on 2 cores, as a share of bare
aiohttp's requests/s (docs/benchmarks.md): with one API process, 0.44 with the helper
against 0.30 with the thread, which waited for the GIL while the second core stayed
mostly idle. With two API processes, which keep both cores busy, 0.40 with the thread
against 0.34 with helpers, whose wake-ups compete with the API processes. So `auto`
starts a helper when the process may use a core more than the API processes take, and
the thread otherwise.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from typing import Protocol

import structlog

from service.auth.keys import PublicKey

log = structlog.get_logger("auth")

_STOP = object()


class Verifier(Protocol):
    """Checks signatures away from the event loop."""

    def verify(self, key: PublicKey, algorithm: str, signature: bytes, data: bytes) -> asyncio.Future:
        """Return a future of `key.verify(algorithm, signature, data)`."""

    async def close(self) -> None:
        """Stop checking off the event loop. Later checks run on the event loop."""


async def start_verifier(mode: str, api_processes: int) -> Verifier:
    """Start the verifier `mode` names: "thread", "helper", or "auto" (see above)."""
    cpus = usable_cpus()
    chosen = mode
    if mode == "auto":
        chosen = "helper" if cpus >= api_processes + 1 else "thread"
    log.info("signature_checks", mode=chosen, setting=mode, usable_cpus=round(cpus, 2), api_processes=api_processes)
    if chosen == "helper":
        from service.auth.helper import HelperVerifier

        try:
            return await HelperVerifier.start()
        except Exception as exc:
            # The API keeps serving at the thread's speed, and the log line gives the reason.
            log.error("signature_helper_start_failed", error=repr(exc), fallback="thread")
    return ThreadVerifier()


def usable_cpus() -> float:
    """Return the CPUs this process may use: its affinity, capped by a cgroup v2 CPU
    quota (a Kubernetes CPU limit) when one is set."""
    try:
        count = float(len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        count = float(os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as limits:
            quota, period = limits.read().split()
        if quota != "max":
            count = min(count, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return count


class ThreadVerifier:
    """One thread that checks signatures for one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self._loop = loop or asyncio.get_running_loop()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="signature-verifier", daemon=True)
        self._thread.start()

    def verify(self, key: PublicKey, algorithm: str, signature: bytes, data: bytes) -> asyncio.Future:
        """Return a future of `key.verify(algorithm, signature, data)`."""
        future = self._loop.create_future()
        if self._thread.is_alive():
            self._queue.put((future, key, algorithm, signature, data))
        else:
            # Stopped (or, against expectations, dead): check here rather than never.
            future.set_result(key.verify(algorithm, signature, data))
        return future

    async def close(self) -> None:
        """Stop the thread once it has checked what is queued."""
        self._queue.put(_STOP)

    def _run(self) -> None:
        get = self._queue.get
        get_nowait = self._queue.get_nowait
        while True:
            batch = [get()]
            try:
                while True:
                    batch.append(get_nowait())
            except queue.Empty:
                pass
            results = []
            stop = False
            for item in batch:
                if item is _STOP:
                    stop = True
                    continue
                future, key, algorithm, signature, data = item
                try:
                    results.append((future, key.verify(algorithm, signature, data)))
                except Exception as exc:  # pragma: no cover - verify() catches what it expects
                    log.error("signature_check_failed", error=repr(exc), algorithm=algorithm)
                    results.append((future, exc))
            if results:
                try:
                    self._loop.call_soon_threadsafe(_deliver, results)
                except RuntimeError:
                    # The loop is closed, so no request waits for these results any more.
                    return
            if stop:
                return


def _deliver(results: list) -> None:
    for future, outcome in results:
        if future.done():
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
