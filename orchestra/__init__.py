"""Orchestra: answer a task with a team of LLM experts recruited by measured skills."""

from orchestra.agents import Agent, Pool
from orchestra.budget import Budget
from orchestra.core import Instance, Orchestra
from orchestra.plan import Plan, Subtask
from orchestra.recruit import RecruitConfig
from orchestra.result import RunResult
from orchestra.settings import RunSpec, Settings
from orchestra.skills import KeywordConfig

__version__ = "0.1.0"

__all__ = ["Agent", "Budget", "Instance", "KeywordConfig", "Orchestra", "Plan", "Pool", "RecruitConfig", "RunResult",
           "RunSpec", "Settings", "Subtask", "__version__"]
