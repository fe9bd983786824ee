"""What a run returns: the answer and everything needed to see how it was reached."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field

from orchestra.money import dollars

RunStatus = Literal["done", "partial", "failed", "budget_exceeded", "cancelled"]
EXIT_CODES = {"done": 0, "partial": 1, "failed": 1, "budget_exceeded": 3, "cancelled": 130}
NodeStatus = Literal["pending", "recruiting", "running", "aggregating", "done", "failed", "skipped"]


class ExpertOutput(BaseModel):
    """One expert's answer for a node (or its error)."""

    agent: str
    model: str
    text: str | None = None
    error: str | None = None


class NodeTrace(BaseModel):
    """A node of the plan after the run."""

    id: str
    instruction: str
    depends_on: list[str] = Field(default_factory=list)
    status: NodeStatus = "pending"
    skills: list[str] = Field(default_factory=list)
    experts: list[str] = Field(default_factory=list)
    aggregator: str | None = None
    strategy: str = "synthesize"
    output: str | None = None
    data: Any = None
    expert_outputs: list[ExpertOutput] = Field(default_factory=list)
    recruitment: dict[str, Any] | None = None
    error: str | None = None
    elapsed_s: float = 0.0
    saved_calls: int = 0
    """Calls a confident team did not need: its first experts agreed, so no further expert and no
    aggregation call were made."""


class PlanTrace(BaseModel):
    """The plan that ran."""

    nodes: list[NodeTrace] = Field(default_factory=list)
    attempts: int = 0
    note: str = ""


class FailedCalls(BaseModel):
    """A model's calls that failed after their retries, and the first one's error."""

    calls: int
    first_error: str


class RunUsage(BaseModel):
    """Calls, requests, tokens and cost of one run.

    A *call* is one logical model call (an expert's answer, a keyword extraction...); *requests*
    counts every HTTP request and engine generation behind the calls (retries, JSON repairs and
    format fallbacks included) plus the embedding matcher's requests. Tokens and cost cover every
    billed request, failed calls' included.
    """

    calls: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    failed_calls: int = 0
    failed_by_model: dict[str, FailedCalls] = Field(default_factory=dict)
    """Of ``failed_calls``, per model (which endpoint failed, and why)."""
    failed_keyword_calls: int = 0
    """Of ``failed_calls``, keyword samples: their nodes took the keywords of their other samples (a node
    whose samples all failed is among ``skill_extraction_failures``). A resumed run counts the whole run's,
    as ``failed_calls`` does."""
    reused_calls: int = 0
    """Calls answered by another point of a sweep, which made the same requests (``orchestra.sharing``): not
    sent, so not among ``calls``, ``requests``, tokens or cost; its budget counted them as if sent."""
    reused_usd: float = 0.0
    """What those calls cost where they were made."""
    cache_hits: int = 0
    cache_misses: int = 0
    replayed_calls: int = 0
    skill_extraction_failures: int = 0
    """Nodes whose keyword calls, or skills of their own (a plan's, a step's), named none of the pool's skills
    (they were recruited without skills)."""
    cache_errors: int = 0
    """Answers that could not be written to the response cache (they were saved in the store)."""


class BatchInfo(BaseModel):
    """One batch this run took part in: ``size`` is the whole batch, ``calls`` this run's share."""

    model: str
    size: int
    calls: int
    wave: int
    purpose: str


class RunResult(BaseModel):
    """The answer with its plan, experts, explanations, usage, batches, loads and timings."""

    run_id: str
    task: str
    status: RunStatus
    answer: str | None = None
    error: str | None = None
    plan: PlanTrace = Field(default_factory=PlanTrace)
    usage: RunUsage = Field(default_factory=RunUsage)
    batches: list[BatchInfo] = Field(default_factory=list)
    #: the loads this run's calls waited for, by model (one shared with other runs' calls is in each of
    #: theirs too: ``Executor.stats.loads`` counts each once)
    model_loads: dict[str, int] = Field(default_factory=dict)
    elapsed_s: float = 0.0
    timings: dict[str, float] = Field(default_factory=dict)
    user_error: bool = False
    """The run failed for a reason the user must fix (a key, a URL, a context limit): exit code 2."""
    answer_cut: bool = False
    """The answer stopped at a token limit (its writer's ``max_tokens``), not where its writer ended it."""
    context_full: bool = False
    """Of an ``answer_cut``: it stopped where its writer's context window filled up (the server said
    ``length`` with fewer tokens written than ``max_tokens`` allowed), not at ``max_tokens``."""

    @property
    def exit_code(self) -> int:
        """The command line's exit code for this run: 0 done, 1 failed or partial, 2 failed or
        partial for a user error (what the user must fix: a key, a template), 3 a budget stopped it,
        130 cancelled."""
        if self.user_error and self.status in ("failed", "partial"):
            return 2
        return EXIT_CODES.get(self.status, 1)

    @property
    def ok(self) -> bool:
        """Whether the run produced a complete answer."""
        return self.status == "done"

    def node(self, node_id: str) -> NodeTrace:
        """A node by id."""
        return next(n for n in self.plan.nodes if n.id == node_id)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` shape: answer, plan.nodes[], usage, batches[], model_loads, elapsed_s, and more."""
        data = self.model_dump(mode="json")
        data["usage"]["cost_usd"] = dollars(data["usage"]["cost_usd"])
        data["elapsed_s"] = round(data["elapsed_s"], 3)
        return data

    def dumps(self) -> str:
        """``to_json()`` as text."""
        return json.dumps(self.to_json(), ensure_ascii=False, indent=2)
