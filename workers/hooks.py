"""Test-only fault points of the worker, switched on by environment variables.

Fault-injection tests run `python -m workers` as a subprocess and need to stop it at
moments that no signal can hit reliably. Both variables are for tests only: they are
not settings, `python -m workers --help` does not list them, and a production worker
must never have them set.

- `CLOUDAPI_TEST_PAUSE_AFTER_COMMIT=FILE`: after a batch commits and before any of its
  messages is settled, write the batch's message ids to FILE as a JSON array (written
  to a temporary name, then renamed). Then wait forever, so that a test can SIGKILL the
  process between commit and ack.
- `CLOUDAPI_TEST_CRASH_ON_MESSAGE_ID=ID`: when a batch holds the message whose
  `message_id` is ID, end the process at once with status 70 (`os._exit`: no cleanup,
  no close of the broker connection), as a crash caused by that message would.
"""

from __future__ import annotations

import asyncio
import atexit
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson
import structlog

log = structlog.get_logger("worker")

PAUSE_AFTER_COMMIT = "CLOUDAPI_TEST_PAUSE_AFTER_COMMIT"
CRASH_ON_MESSAGE_ID = "CLOUDAPI_TEST_CRASH_ON_MESSAGE_ID"
CRASH_EXIT_STATUS = 70


@dataclass(frozen=True)
class TestHooks:
    """The fault points switched on for this process; by default none."""

    __test__ = False  # not a pytest test class, despite the name

    pause_after_commit: Path | None = None
    crash_on_message_id: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TestHooks:
        environ = os.environ if environ is None else environ
        pause = environ.get(PAUSE_AFTER_COMMIT) or None
        crash = environ.get(CRASH_ON_MESSAGE_ID) or None
        hooks = cls(Path(pause) if pause else None, crash)
        if pause or crash:
            log.warning("test_hooks_enabled", pause_after_commit=pause, crash_on_message_id=crash)
        return hooks

    def crash_if_held(self, message_ids: Sequence[str | None]) -> None:
        """End the process at once when the batch contains the crash message."""
        if self.crash_on_message_id is not None and self.crash_on_message_id in message_ids:
            log.error("test_crash", message_id=self.crash_on_message_id)
            # os._exit skips the exit handlers; run them first, so that a log written in
            # batches reaches its file. None of them touches the broker connection.
            atexit._run_exitfuncs()
            os._exit(CRASH_EXIT_STATUS)

    async def pause_after_commit_if_enabled(self, message_ids: Sequence[str | None]) -> None:
        """Report the committed batch to the test and wait until the process is killed."""
        if self.pause_after_commit is None:
            return
        partial = self.pause_after_commit.with_name(self.pause_after_commit.name + ".partial")
        partial.write_bytes(orjson.dumps(list(message_ids)))
        partial.rename(self.pause_after_commit)
        log.warning("test_paused_after_commit", messages=len(message_ids))
        await asyncio.Event().wait()
