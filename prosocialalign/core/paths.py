"""Where things live: the repository, its build and reports folders, the cache and the shared data sets.

Every default location is anchored here (to this file or an environment variable), never to the working
directory, so a command behaves the same from any folder.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_DIR = REPO_ROOT / "build"
"""Regenerable outputs: test runs, per-response evaluation data, checkpoints (ignored by git)."""
REPORTS_DIR = REPO_ROOT / "reports"
"""Committed summaries of measurements, each naming the command that produced it."""


def cache_dir() -> Path:
    """Root of everything this project caches (``$PROSOCIAL_CACHE_DIR``, default ``~/.cache/prosocial``)."""
    return Path(os.environ.get("PROSOCIAL_CACHE_DIR", Path.home() / ".cache" / "prosocial")).expanduser()


def default_data_dir() -> Path:
    """The shared data sets: ``$PROSOCIAL_DATA_DIR``, else ``<repo>/../shared/data`` (see its SOURCES.md)."""
    configured = os.environ.get("PROSOCIAL_DATA_DIR")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"
