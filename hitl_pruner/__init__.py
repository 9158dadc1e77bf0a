"""hitl-pruner: optuna-dashboard where a human's PRUNE or FAIL note ends the trial."""

from .app import create_app
from .config import Settings
from .middleware import HitlMiddleware

__version__ = "0.1.0"
__all__ = ["HitlMiddleware", "Settings", "create_app"]
