"""The application configured from the environment (HITL_*), for WSGI servers."""

from __future__ import annotations

import sys

from .app import create_app
from .config import ConfigError
from .config import resolve
from .logs import setup_logging
from .prefix import behind_proxy

try:
    _settings = resolve()
    setup_logging(_settings.verbose)
    app = behind_proxy(create_app(_settings), _settings)
except ConfigError as exc:
    # A clear line instead of a traceback. Exit code 4 is gunicorn's "App failed to load": it
    # stops the server, where any other code makes it boot the worker again, forever.
    sys.stderr.write(f"hitl-pruner: {exc}\n")
    raise SystemExit(4) from None
