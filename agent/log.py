"""structlog set-up: JSON lines on stderr (or a console renderer), contextvars bound per request.

Event names are constant and dotted (`endpoint.connect.complete`); values go in fields.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import msgspec
import structlog

_json = msgspec.json.Encoder(enc_hook=repr)  # anything msgspec cannot encode: its repr


def _dumps(event_dict: dict[str, Any], **_: Any) -> bytes:
    """structlog's serializer: msgspec (~5x json.dumps on these small dicts), bytes out."""
    return _json.encode(event_dict)


def configure(level: str = "info", fmt: str = "json") -> None:
    renderer: structlog.typing.Processor
    factory: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
        factory = structlog.BytesLoggerFactory(file=sys.stderr.buffer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger
