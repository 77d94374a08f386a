"""Logging set-up for entry points: stdlib logging for the core, txaio for the WAMP side, one format."""

from __future__ import annotations

import logging
import sys

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}


def setup_logging(level: str) -> None:
    """Send core (stdlib) logs to stderr in the same shape as txaio's, at ``level``."""
    logging.basicConfig(stream=sys.stderr, level=_LEVELS[level],
                        format="%(asctime)s [%(name)s] %(levelname)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%S%z")
