"""hitl-pruner: optuna-dashboard where a human's PRUNE or FAIL note ends the trial."""

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
