"""Where the data the library ships lives: ``agents/``, ``skills/`` and ``prompts/``.

In a source checkout (or an editable install) they are the repository's top-level folders; in an
installed wheel they are bundled under ``orchestra/_data/`` with the same layout.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_root() -> Path:
    """The folder that holds ``agents/``, ``skills/`` and ``prompts/``."""
    bundled = _PACKAGE / "_data"
    return bundled if bundled.is_dir() else _PACKAGE.parent


def prompts_dir() -> Path:
    """The Jinja2 prompt templates."""
    return data_root() / "prompts"


def agents_dir() -> Path:
    """Agent cards and pools."""
    return data_root() / "agents"


def default_pool_path() -> Path:
    """The embedded default pool: expert personas on the in-process SmolLM2 model."""
    return agents_dir() / "pools" / "local.yaml"


def orchestra_home() -> Path:
    """Orchestra's per-user folder (``$ORCHESTRA_HOME``, else ``~/.orchestra``)."""
    return Path(os.environ.get("ORCHESTRA_HOME") or Path.home() / ".orchestra")
