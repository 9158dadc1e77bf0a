"""Opening the dashboard in a browser once the server is ready (serve's --browser-path and
--thorium-app, the seed tool's two ways)."""

from __future__ import annotations

import logging
import shutil
import subprocess
from typing import Sequence

logger = logging.getLogger("hitl_pruner")

# --thorium-app: the Thorium browser's app mode (a window without tabs or address bar), which
# every Chromium-family browser offers as --app=URL. The first one found on PATH is used.
APP_BROWSERS = (
    "thorium-browser",
    "thorium",
    "chromium",
    "chromium-browser",
    "google-chrome",
    "google-chrome-stable",
    "brave-browser",
    "microsoft-edge",
)


def app_browser(path: str | None = None, names: Sequence[str] = APP_BROWSERS) -> str | None:
    """The first Chromium-family browser on ``path`` (default: $PATH), or None."""
    for name in names:
        found = shutil.which(name, path=path)
        if found is not None:
            return found
    return None


def open_dashboard(
    url: str, *, browser_path: str | None = None, app_mode: bool = False,
    path: str | None = None,
) -> subprocess.Popen[bytes] | None:
    """Start the browser on ``url``; log why not instead of raising (the server keeps going)."""
    if browser_path:
        command = [browser_path, url]
    elif app_mode:
        found = app_browser(path)
        if found is None:
            logger.error(
                "--thorium-app: no Chromium-family browser on PATH (%s); open %s yourself, or "
                "name one with --browser-path", ", ".join(APP_BROWSERS), url,
            )
            return None
        command = [found, f"--app={url}"]
    else:
        return None
    try:
        return subprocess.Popen(command)
    except OSError as exc:
        logger.error("cannot start the browser %s: %s", command[0], exc)
        return None
