"""Capture of every log line of a test run, and of every signature the tests make, so
that tests/hostile/test_log_safety.py can check at the end of the run that no secret
reached a log.

- structlog: every rendered JSON line, at every level, goes to `structlog.jsonl`.
- The standard library (aiohttp, asyncpg, aio-pika): every record at INFO or above goes
  to `stdlib.log`. The console keeps the WARNING threshold of `service.logs`.
- API processes that tests start write their output into the same directory.
- `service.auth.client.sign` is wrapped so that every signature a test computes is
  remembered, whether or not it is sent.

The cost is one extra write per log line and one set insertion per signature.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import sys
from urllib.parse import urlsplit
from pathlib import Path

import structlog

from service.auth import client

SIGNATURES: set[str] = set()  # base64 of every signature made during the run
# A password that the API processes of the tests get in their DSN. Postgres ignores it
# where it trusts loopback connections, as the local cluster does.
DSN_PASSWORD = "dsn-password-" + secrets.token_hex(8)

_original_sign = client.sign


def _recording_sign(private_key, algorithm: str, data: bytes) -> bytes:
    signature = _original_sign(private_key, algorithm, data)
    SIGNATURES.add(base64.b64encode(signature).decode("ascii"))
    return signature


def dsn_with_password(dsn: str) -> str:
    """Return `dsn` with DSN_PASSWORD as a `?password=` parameter, unless the DSN or
    PGPASSWORD already gives a password, which must then be kept."""
    if urlsplit(dsn).password is not None or "PGPASSWORD" in os.environ:
        return dsn
    separator = "&" if "?" in dsn else "?"
    return f"{dsn}{separator}password={DSN_PASSWORD}"


def record_signatures() -> None:
    """Wrap `service.auth.client.sign`; call before test modules import it."""
    client.sign = _recording_sign


class _TeeLogger:
    """A structlog logger writing every rendered line to the capture file, and lines at
    WARNING or above to stdout too, as the tests' own configuration did before."""

    def __init__(self, file, stdout):
        self._file = file
        self._stdout = stdout

    def _capture(self, message: bytes) -> None:
        self._file.write(message + b"\n")

    def _show(self, message: bytes) -> None:
        line = message + b"\n"
        self._file.write(line)
        self._stdout.write(line)

    msg = log = debug = info = _capture
    warn = warning = err = error = critical = exception = fatal = failure = _show


def start_capture(directory: Path) -> None:
    """Send a copy of every structlog line and stdlib record of this process to `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    structlog_file = open(directory / "structlog.jsonl", "ab", buffering=0)  # noqa: SIM115 (open for the session)
    stdout = sys.stdout.buffer
    structlog.configure(logger_factory=lambda *args: _TeeLogger(structlog_file, stdout))

    root = logging.getLogger()
    for handler in root.handlers:
        # The console handler of `service.logs` keeps showing warnings only.
        if type(handler) is logging.StreamHandler and handler.level == logging.NOTSET:
            handler.setLevel(logging.WARNING)
    handler = logging.FileHandler(directory / "stdlib.log", encoding="utf-8", errors="backslashreplace")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(min(root.level, logging.INFO))


def captured_text(directory: Path) -> str:
    """Return everything captured in `directory`, from every file, as one text."""
    parts = []
    for path in sorted(directory.iterdir()):
        if path.is_file():
            parts.append(path.read_bytes().decode("utf-8", "backslashreplace"))
    return "\n".join(parts)
