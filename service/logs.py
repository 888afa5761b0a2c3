"""structlog configuration shared by the API and the workers.

Every line carries a stable `event` name in the form `<noun>_<past verb>` (for example
`request_served`, `image_event_applied`); filter on it, never on free text.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import sys
import threading
import time

import orjson
import structlog
from structlog.tracebacks import ExceptionDictTransformer

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _orjson_dumps(event_dict, **_kwargs) -> bytes:
    # default=str keeps a log call from failing on a value orjson cannot serialize.
    try:
        return orjson.dumps(event_dict, default=str)
    except orjson.JSONEncodeError:
        # A string with lone surrogates (request bytes that are not UTF-8), which orjson
        # rejects; the standard library escapes them as \udcXX instead.
        return json.dumps(event_dict, default=str).encode("ascii")


# Tracebacks without the local variables of each frame: those hold request headers,
# signatures and DSNs, which must never reach a log.
_dict_tracebacks = structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))


class _Timestamper:
    """Add `timestamp` in ISO 8601 UTC with microseconds, like structlog's TimeStamper
    with fmt="iso" and utc=True, for a fraction of its cost: the date and time part is
    formatted once per second."""

    def __init__(self):
        self._second = -1
        self._prefix = ""

    def __call__(self, _logger, _method, event_dict):
        now = time.time()
        second = int(now)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        event_dict["timestamp"] = f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"
        return event_dict


class BufferedLineWriter:
    """Collect log lines in memory and write them out in batches.

    A write system call per line costs as much as a fifth of a cached GetImage. Lines are
    written at least every 100 ms by a background thread, and at exit. A process killed
    with SIGKILL can therefore lose the last 100 ms of its log.

    Writers only append to a deque, which needs no lock: the event loop never waits
    while the thread writes.
    """

    FLUSH_INTERVAL = 0.1  # seconds

    def __init__(self, stream):
        self._stream = stream
        self._lines: collections.deque[bytes] = collections.deque()
        self.write_line = self._lines.append
        self._flush_lock = threading.Lock()
        threading.Thread(target=self._flush_periodically, name="log-flusher", daemon=True).start()
        atexit.register(self.flush)

    def flush(self) -> None:
        with self._flush_lock:
            lines = self._lines
            popleft = lines.popleft
            chunk = [popleft() for _ in range(len(lines))]
            if not chunk:
                return
            chunk.append(b"")
            try:
                self._stream.write(b"\n".join(chunk))
                self._stream.flush()
            except (OSError, ValueError):
                # stdout is gone (closed pipe, interpreter shutting down): nothing to do.
                pass

    def _flush_periodically(self) -> None:
        while True:
            time.sleep(self.FLUSH_INTERVAL)
            self.flush()


class _BufferedLogger:
    """The structlog logger of `BufferedLineWriter`: every level writes the rendered line."""

    def __init__(self, writer: BufferedLineWriter):
        self._write = writer.write_line

    def msg(self, message: bytes) -> None:
        # An exact-size copy, as in line_writer(): orjson's bytes keep its buffer's size.
        self._write(bytes(memoryview(message)))

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


_writer: BufferedLineWriter | None = None
_timestamper = _Timestamper()
_level_number = logging.INFO


def line_writer(logger_name: str):
    """Return a function that writes one JSON log line from a dict, or None.

    It skips structlog's processor chain, for the one line per request of the API; the
    line has the keys structlog's would have (`event`, `level`, `timestamp`, the bound
    context is not included). Only when the log is buffered JSON; otherwise callers use
    structlog.
    """
    if _writer is None or _level_number > logging.INFO:
        return None
    write = _writer.write_line
    stamp = _timestamper

    def write_line(fields: dict) -> None:
        stamp(None, None, fields)
        fields["logger"] = logger_name
        # orjson's bytes keep the capacity of its output buffer, several KiB for a
        # 250-byte line. An exact-size copy keeps 100 ms of lines from using megabytes.
        write(bytes(memoryview(_orjson_dumps(fields))))

    return write_line


def flush() -> None:
    """Write out the buffered log lines now (before an exit that skips atexit)."""
    if _writer is not None:
        _writer.flush()


def configure(log_format: str = "json", level: str = "info", *, cache: bool = True, buffered: bool = False) -> None:
    """Configure structlog for JSON lines (deployments) or coloured console output.

    `buffered` writes JSON lines in batches (see BufferedLineWriter): for long-running
    processes that log a line per request or per event.
    """
    global _writer, _level_number
    _level_number = _LEVELS[level]
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _timestamper,
    ]
    if _writer is not None and (log_format != "json" or not buffered):
        _writer.flush()
        _writer = None
    if log_format == "console":
        # plain_traceback, because structlog's default for the console (rich, when it is
        # installed) shows the local variables of every frame.
        processors = shared + [structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)]
        logger_factory = structlog.PrintLoggerFactory(sys.stdout)
    else:
        processors = shared + [
            _dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=_orjson_dumps),
        ]
        if buffered:
            if _writer is None:
                _writer = BufferedLineWriter(sys.stdout.buffer)
            buffered_logger = _BufferedLogger(_writer)
            logger_factory = lambda *_args: buffered_logger  # noqa: E731 (structlog wants a callable)
        else:
            logger_factory = structlog.BytesLoggerFactory(sys.stdout.buffer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=logger_factory,
        cache_logger_on_first_use=cache,
    )
    # Libraries log through the standard library; keep their warnings, in the same stream.
    logging.basicConfig(level=max(_LEVELS[level], logging.WARNING), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
