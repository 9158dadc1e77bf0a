"""hitl-pruner: optuna-dashboard where a human's PRUNE or FAIL note ends the trial."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING
from typing import Any

if TYPE_CHECKING:
    from .app import create_app
    from .config import ConfigError
    from .config import Settings
    from .embed import wsgi
    from .middleware import HitlMiddleware
    from .script import TrialResult
    from .script import UsageError
    from .script import fail
    from .script import prune
    from .script import undo
    from .study_stop import StudyStopped
    from .study_stop import stop_if_asked
    from .study_stop import study_stopped
    from .worker import HumanInTheLoopPruner
    from .worker import ask
    from .worker import requested_state
    from .worker import tell

__version__ = "0.1.0"

# Each public name and the module it comes from, imported when first asked for: an Optuna worker's
# `from hitl_pruner import HumanInTheLoopPruner` then imports Optuna and the worker side only,
# not the dashboard, bottle and what they import (about 0.3 s of CPU per worker process).
_HOMES = {
    "ConfigError": "config",
    "HitlMiddleware": "middleware",
    "HumanInTheLoopPruner": "worker",
    "Settings": "config",
    "StudyStopped": "study_stop",
    "TrialResult": "script",
    "UsageError": "script",
    "ask": "worker",
    "create_app": "app",
    "fail": "script",
    "prune": "script",
    "requested_state": "worker",
    "stop_if_asked": "study_stop",
    "study_stopped": "study_stop",
    "tell": "worker",
    "undo": "script",
    "wsgi": "embed",
}
__all__ = [
    "ConfigError",
    "HitlMiddleware",
    "HumanInTheLoopPruner",
    "Settings",
    "StudyStopped",
    "TrialResult",
    "UsageError",
    "ask",
    "create_app",
    "fail",
    "prune",
    "requested_state",
    "stop_if_asked",
    "study_stopped",
    "tell",
    "undo",
    "wsgi",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # asked once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
