"""Orchestra: answer a task with a team of LLM experts recruited by measured skills.

The public names are imported on first use (PEP 562), so ``import orchestra`` and the command
line's start-up stay fast: the HTTP clients and Jinja2 load only when a run needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestra.agents import Agent, Pool
    from orchestra.budget import Budget
    from orchestra.core import Instance, Orchestra
    from orchestra.pipeline.scheduler import NodeSettings
    from orchestra.plan import Plan, Subtask
    from orchestra.recruit import RecruitConfig
    from orchestra.result import RunResult
    from orchestra.settings import RunSpec, Settings
    from orchestra.skills import KeywordConfig

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "Agent": "orchestra.agents", "Pool": "orchestra.agents", "Budget": "orchestra.budget",
    "Instance": "orchestra.core", "Orchestra": "orchestra.core", "NodeSettings": "orchestra.pipeline.scheduler",
    "Plan": "orchestra.plan",
    "Subtask": "orchestra.plan", "RecruitConfig": "orchestra.recruit", "RunResult": "orchestra.result",
    "RunSpec": "orchestra.settings", "Settings": "orchestra.settings", "KeywordConfig": "orchestra.skills",
}

__all__ = ["Agent", "Budget", "Instance", "KeywordConfig", "NodeSettings", "Orchestra", "Plan", "Pool", "RecruitConfig",
           "RunResult", "RunSpec", "Settings", "Subtask", "__version__"]


def __getattr__(name: str) -> Any:
    """A public name, imported from its module the first time it is asked for."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'orchestra' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
