"""Signature checks on a thread of their own, handed over in batches.

An RSA-2048 check takes about 20 microseconds in a tight loop. On the event loop's
thread of a busy API process it cost about 45 microseconds of each request's time,
measured against a process with the check switched off (docs/benchmarks.md). The
likely cause is that the rest of the request evicts OpenSSL's code and data from the
CPU caches. OpenSSL releases the GIL while it checks, so the checks can run on another
core while the event loop serves other requests.

The event loop puts each check on a queue and awaits a future. The thread takes
everything queued, checks it, and hands all the results back in one callback, so a
busy process pays one wake-up per batch, not per request.
"""

from __future__ import annotations

import asyncio
import queue
import threading

import structlog

from service.auth.keys import PublicKey

log = structlog.get_logger("auth")

_STOP = object()


class SignatureVerifier:
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

    def close(self) -> None:
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
