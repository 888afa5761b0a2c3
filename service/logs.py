"""structlog configuration shared by the API and the workers.

Every line carries a stable `event` name in the form `<noun>_<past verb>` (for example
`request_served`, `image_event_applied`); filter on it, never on free text.
"""

from __future__ import annotations

import json
import logging
import sys

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


def configure(log_format: str = "json", level: str = "info", *, cache: bool = True) -> None:
    """Configure structlog for JSON lines (deployments) or coloured console output."""
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
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
        logger_factory = structlog.BytesLoggerFactory(sys.stdout.buffer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=logger_factory,
        cache_logger_on_first_use=cache,
    )
    # Libraries log through the standard library; keep their warnings, in the same stream.
    logging.basicConfig(level=max(_LEVELS[level], logging.WARNING), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
