"""Signature checks in a helper process, handed over in batches.

An RSA-2048 check takes about 21 microseconds in a tight loop, and about 35 of each
request's time on the event loop of a busy API process. When the machine has a core
that no API process uses, the checking thread of `service.auth.verifier` leaves most
of it idle. `cryptography` releases the GIL during the check itself, but the thread
needs the GIL before and after each check, and a busy event loop lets go of it only
every few milliseconds. Requests waited about 4.5 ms for their check
(docs/benchmarks.md, "Where the signature check runs").

A helper process shares no GIL with the event loop. `HelperVerifier` starts one,
`python -m service.auth.checker`, and talks to it over a socket pair. The checks asked
for during one pass of the event loop go over in messages of up to `SEND_CHUNK`, and
the helper replies after every `checker.REPLY_CHUNK` checks. So a busy process pays one
write and one read per few checks, and writes the first responses while the helper
still checks the rest.

The helper only ever receives public keys, signatures and signing strings. It exits when
its socket closes, so it never outlives the API process, even one killed with SIGKILL.
If it exits anyway, or leaves checks without a reply for `_REPLY_TIMEOUT` seconds, every
check it had not replied to, and every later one, runs on the event loop, and a new
helper is started after a pause; requests see no error.
"""

from __future__ import annotations

import asyncio
import marshal
import socket
import sys

import structlog

from service.auth.checker import LENGTH
from service.auth.keys import PublicKey

log = structlog.get_logger("auth")

_RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # seconds, then 30 s between attempts
_STABLE = 60.0  # seconds a helper runs before the delays start over
# Seconds the helper may leave checks without a reply before it counts as stalled and
# is replaced. A batch of a thousand RSA-2048 checks takes 20 to 40 ms (an estimate
# from single checks).
_REPLY_TIMEOUT = 2.0
# Maximum checks in one message to the helper. Sent in one message at the end of a loop
# pass, a pass's checks left the loop idle until the helper had checked them all, so
# full messages go at once (docs/benchmarks.md, "Where the signature check runs").
SEND_CHUNK = 16


class HelperVerifier(asyncio.Protocol):
    """The event loop's side of one helper process: `verify()` returns a future."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._next = 0
        self._queued: list[tuple] = []  # requests of this loop pass, not sent yet
        self._sent: dict[int, tuple] = {}  # number -> (future, key, algorithm, signature, data)
        self._buffer = bytearray()
        self._flush_scheduled = False
        self._closing = False
        self._restarts = 0
        self._connected_at = 0.0
        self._waiting_since = 0.0  # when the helper last replied, or got checks while it had none
        self._watchdog: asyncio.TimerHandle | None = None
        self._restart_task: asyncio.Task | None = None
        # Checks made on the event loop because no helper was running; read by the tests.
        self.checked_in_place = 0

    @classmethod
    async def start(cls) -> HelperVerifier:
        """Return a verifier whose helper process has started."""
        verifier = cls(asyncio.get_running_loop())
        await verifier._spawn()
        return verifier

    @property
    def helper_pid(self) -> int | None:
        """The helper's process id while it is connected, else None."""
        return self._process.pid if self._transport is not None and self._process is not None else None

    def verify(self, key: PublicKey, algorithm: str, signature: bytes, data: bytes) -> asyncio.Future:
        """Return a future of `key.verify(algorithm, signature, data)`."""
        future = self._loop.create_future()
        if self._transport is None:
            self.checked_in_place += 1
            future.set_result(key.verify(algorithm, signature, data))
            return future
        queued = self._queued
        queued.append((future, key, algorithm, signature, data))
        if len(queued) >= SEND_CHUNK:
            self._send_queued()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return future

    async def close(self) -> None:
        """Stop the helper. Checks still waiting for it run on the event loop."""
        self._closing = True
        if self._restart_task is not None:
            self._restart_task.cancel()
        transport, process = self._transport, self._process
        self._disconnect()
        if transport is not None:
            transport.close()
        if process is not None and process.returncode is None:
            # The helper exits when it reads the end of its socket.
            try:
                await asyncio.wait_for(process.wait(), timeout=5)
            except asyncio.TimeoutError:
                log.error("signature_helper_killed", pid=process.pid, reason="timed out waiting 5 s for it to exit after its socket closed")
                process.kill()
                await process.wait()

    # The helper process

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "service.auth.checker", stdin=theirs, stdout=theirs
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        await self._loop.connect_accepted_socket(lambda: self, sock=ours)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._send_queued()

    def _send_queued(self) -> None:
        queued, self._queued = self._queued, []
        if not queued:
            return
        if self._transport is None:
            self._check_in_place(queued)
            return
        requests = []
        sent = self._sent
        if not sent:
            self._waiting_since = self._loop.time()
        number = self._next
        for item in queued:
            _future, key, algorithm, signature, data = item
            sent[number] = item
            requests.append((number, key.openssh, algorithm, signature, data))
            number += 1
        self._next = number
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(_REPLY_TIMEOUT, self._check_progress)
        payload = marshal.dumps(requests)
        self._transport.write(LENGTH.pack(len(payload)) + payload)

    def _check_in_place(self, items) -> None:
        for future, key, algorithm, signature, data in items:
            if not future.done():
                self.checked_in_place += 1
                future.set_result(key.verify(algorithm, signature, data))

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._connected_at = self._loop.time()
        self._buffer.clear()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= LENGTH.size:
            (size,) = LENGTH.unpack_from(buffer)
            end = LENGTH.size + size
            if len(buffer) < end:
                return
            self._waiting_since = self._loop.time()
            replies = marshal.loads(buffer[LENGTH.size : end])
            del buffer[:end]
            sent = self._sent
            for number, outcome in replies:
                item = sent.pop(number, None)
                if item is None:
                    continue
                future = item[0]
                if future.done():
                    continue
                if outcome is None:
                    self._check_in_place([item])
                else:
                    future.set_result(outcome)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is None:
            return
        self._disconnect()
        if self._loop.time() - self._connected_at >= _STABLE:
            self._restarts = 0
        if not self._closing:
            log.error("signature_helper_stopped", pid=self._process.pid, error=repr(exc) if exc else None)
            self._restart_task = self._loop.create_task(self._restart())

    def _check_progress(self) -> None:
        self._watchdog = None
        if self._transport is None or not self._sent:
            return
        waited = self._loop.time() - self._waiting_since
        if waited < _REPLY_TIMEOUT:
            self._watchdog = self._loop.call_later(_REPLY_TIMEOUT - waited, self._check_progress)
            return
        # Stopped (SIGSTOP), stuck or starved: check here and start a new helper.
        log.error("signature_helper_stalled", pid=self._process.pid, waited_s=round(waited, 3), checks=len(self._sent))
        transport = self._transport
        self._disconnect()
        transport.abort()
        if self._process.returncode is None:
            self._process.kill()
        if not self._closing:
            self._restart_task = self._loop.create_task(self._restart())

    def _disconnect(self) -> None:
        """Forget the helper and check on the event loop what it had not replied to."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._transport = None
        waiting = list(self._sent.values())
        self._sent.clear()
        self._check_in_place(waiting)

    async def _restart(self) -> None:
        process = self._process
        if process is not None:
            if process.returncode is None:
                process.kill()
            await process.wait()
        while not self._closing:
            delay = _RESTART_DELAYS[min(self._restarts, len(_RESTART_DELAYS) - 1)]
            self._restarts += 1
            await asyncio.sleep(delay)
            try:
                await self._spawn()
            except Exception as exc:
                log.error("signature_helper_start_failed", error=repr(exc))
                continue
            log.info("signature_helper_started", pid=self._process.pid)
            return
