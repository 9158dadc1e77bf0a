"""Logging set-up for the entry points (the library itself only logs)."""

from __future__ import annotations

import logging


def setup_logging(verbose: bool) -> None:
    logger = logging.getLogger("hitl_pruner")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s [%(process)d] [hitl] %(levelname)s %(message)s")
        )
        logger.addHandler(handler)
        logger.propagate = False
