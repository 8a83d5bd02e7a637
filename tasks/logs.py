"""Send the library's `incremental` log records to the Prefect run logger, so the
`[INCREMENTAL] ...` lines users grep for show up in the Prefect UI as well as the terminal."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger


class _ToRunLogger(logging.Handler):
    def __init__(self, run_logger: logging.LoggerAdapter):
        super().__init__(level=logging.INFO)
        self.run_logger = run_logger

    def emit(self, record: logging.LogRecord) -> None:
        self.run_logger.log(record.levelno, record.getMessage())


@contextmanager
def library_logs_to_run_logger() -> Iterator[logging.LoggerAdapter]:
    """While open, library INFO+ records go to the current flow or task run's logger."""
    run_logger = get_run_logger()
    library = logging.getLogger("incremental")
    handler = _ToRunLogger(run_logger)
    previous_level, previous_propagate = library.level, library.propagate
    library.addHandler(handler)
    library.setLevel(logging.INFO)
    library.propagate = False  # the run logger already prints to the console
    try:
        yield run_logger
    finally:
        library.removeHandler(handler)
        library.setLevel(previous_level)
        library.propagate = previous_propagate
