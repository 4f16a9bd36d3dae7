"""Logging set-up for the service process."""

from __future__ import annotations

import logging


def configure_logging(level: str) -> None:
    """Plain timestamped logs on stderr for the service and uvicorn at `level`."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
