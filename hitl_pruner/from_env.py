"""``app``: hitl-pruner configured from the environment (HITL_*, HITL_CONFIG's TOML file), for
WSGI servers: ``gunicorn wsgi:app`` in the repository root imports it from here.

The adapter over the library: ``config.resolve`` reads the environment, ``create_app`` opens
the storage and the artifact directory it names and builds the stack, ``behind_proxy`` adds the
proxy's path prefix and trust. (Not ``hitl_pruner.wsgi``: that name is the library function.)
"""

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
