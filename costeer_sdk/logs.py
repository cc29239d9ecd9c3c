"""Structured logs that behave like any library's logs.

Loggers are structlog loggers wrapped around the standard library logger of the same
name, so ``logging.getLogger("costeer_sdk").setLevel(logging.INFO)`` (or the CLI's
``--verbose``) turns them on. The package logger has a `logging.NullHandler`, as the
logging guide asks of libraries: nothing prints unless the application configures
logging (without it, Python's last-resort handler would print warnings to stderr). Prompt
and context text is logged at DEBUG alone; INFO events carry counts and timings.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

logging.getLogger("costeer_sdk").addHandler(logging.NullHandler())

_PROCESSORS: list[Any] = [
    structlog.stdlib.filter_by_level,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso"),
    structlog.processors.format_exc_info,
    structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"]),
]


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger that obeys the stdlib logger ``name``'s level and handlers."""
    return structlog.wrap_logger(
        logging.getLogger(name),
        processors=_PROCESSORS,
        wrapper_class=structlog.stdlib.BoundLogger,
    )
