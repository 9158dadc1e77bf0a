"""hitl-pruner: optuna-dashboard where a human's PRUNE or FAIL note ends the trial."""

from .app import create_app
from .config import Settings
from .middleware import HitlMiddleware
from .worker import HumanInTheLoopPruner
from .worker import ask
from .worker import requested_state
from .worker import tell

__version__ = "0.1.0"
__all__ = [
    "HitlMiddleware",
    "HumanInTheLoopPruner",
    "Settings",
    "ask",
    "create_app",
    "requested_state",
    "tell",
]
