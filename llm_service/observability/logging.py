"""structlog setup: JSON lines (console in development) for ours, uvicorn's and vLLM's logs."""

from __future__ import annotations

import logging
import sys

import structlog


class _NamedWriteLogger(structlog.WriteLogger):
    """structlog's plain writer with the stdlib logger's name (for `add_logger_name`)."""

    def __init__(self, name: str) -> None:
        super().__init__(sys.stdout)
        self.name = name


def _named_logger(*args: object) -> _NamedWriteLogger:
    return _NamedWriteLogger(str(args[0]) if args else "")


def configure_logging(level: str, console: bool) -> None:
    """Route structlog and the standard library (uvicorn, vLLM) through one renderer. Our own lines
    skip the standard library (its records, handlers and the formatter's copy cost about a third of
    a refused request, bench/flood.py): structlog filters by level and writes them itself."""
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        logger_factory=_named_logger,
        # A line below the level costs one call to a no-op.
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level]),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # uvicorn's access lines carry no request id; ours (request_finished) do (server.py also
    # turns uvicorn's access log off: vLLM's dictConfig re-enables disabled loggers).
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error", "vllm"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
