"""Where mullama keeps its per-user files (standard library + optional platformdirs).

``build_llama.py`` imports this module too, so the build and the library agree on
one cache layout:

    <cache root>/llama.cpp/src/<commit>/      the pinned source tree
    <cache root>/llama.cpp/build/<key>/       cmake build trees (incremental)
    <cache root>/llama.cpp/<key>/lib, bin     finished builds, with manifest.json
    <cache root>/models/                      downloaded models
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The per-user cache directory; ``MULLAMA_HOME`` overrides it."""
    home = os.environ.get("MULLAMA_HOME")
    if home:
        return Path(home).expanduser()
    try:
        from platformdirs import user_cache_dir
    except ImportError:  # only while building, before dependencies are installed
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "mullama"
    return Path(user_cache_dir("mullama", appauthor=False))


def llama_cache_dir() -> Path:
    """Builds of llama.cpp (see ``build_llama.py``)."""
    return cache_root() / "llama.cpp"


def models_dir() -> Path:
    """Downloaded model files."""
    return cache_root() / "models"
