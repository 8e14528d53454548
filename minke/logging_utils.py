"""minke's logger prints INFO to stderr by default, as vLLM's does (start-up facts such as the KV capacity are
things users look for). MINKE_CONFIGURE_LOGGING=0 leaves logging to the application."""

from __future__ import annotations

import logging
import os
import sys


def configure_logging() -> None:
    logger = logging.getLogger("minke")
    if os.environ.get("MINKE_CONFIGURE_LOGGING", "1") == "0" or logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [minke] %(message)s", "%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("MINKE_LOGGING_LEVEL", "INFO"))
