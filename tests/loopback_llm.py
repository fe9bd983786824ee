"""A scripted 'LLM' behind a real loopback HTTP server, and pool files pointing at it."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import AGGREGATE_MARK, FINAL_MARK, KEYWORDS_MARK, PLANNER_MARK

from orchestra.testing import LoopbackRequest, Reply, chat_handler

DEFAULT_PLAN = {"subtasks": [
    {"id": "facts", "instruction": "List the key facts for the report.", "depends_on": [], "skills": ["history"]},
    {"id": "numbers", "instruction": "Compute the numbers of the report.", "depends_on": [], "skills": ["arithmetic"]},
    {"id": "report", "instruction": "Write the report.", "depends_on": ["facts", "numbers"], "skills": ["writing"]},
]}


class ScriptedLLM:
    """Answers every pipeline stage by its prompt; counts what it saw (thread-safe)."""

    def __init__(self, plan: dict[str, Any] | None = None, *, keywords: list[str] | None = None,
                 expert: Callable[[str, str], str] | None = None) -> None:
        self.plan = plan or DEFAULT_PLAN
        self.plans: list[dict[str, Any]] = []
        self.keywords = keywords or ["history"]
        self.expert = expert
        self.structured: dict[str, Any] | None = None  # the answer to requests that ask for JSON
        self.kinds: Counter[str] = Counter()
        self.prompts: list[tuple[str, str]] = []  # (kind, prompt) of every request, in arrival order
        self.models: Counter[str] = Counter()
        self.lock = threading.Lock()

    def text(self, request: LoopbackRequest) -> str | Reply:
        prompt = request.prompt
        model = (request.json() or {}).get("model", "?")
        kind = next((k for mark, k in ((PLANNER_MARK, "plan"), (KEYWORDS_MARK, "keywords"),
                                        (AGGREGATE_MARK, "aggregate"), (FINAL_MARK, "final")) if mark in prompt),
                    "expert")
        with self.lock:
            self.kinds[kind] += 1
            self.prompts.append((kind, prompt))
            self.models[model] += 1
            plan = self.plans.pop(0) if kind == "plan" and self.plans else self.plan
        if kind == "plan":
            return json.dumps(plan)
        if self.structured is not None and "response_format" in (request.json() or {}):
            return json.dumps(self.structured)
        if kind == "keywords":
            return json.dumps({"keywords": self.keywords})
        if kind == "aggregate":
            return "Synthesized answer. The answer is 42"
        if kind == "final":
            return "Final report: everything checks out."
        assignment = prompt.split("Your assignment:")[-1].strip().splitlines()[0]
        if self.expert is not None:
            return self.expert(model, assignment)
        return f"{model} on '{assignment}': The answer is 42"

    def handler(self) -> Any:
        return chat_handler(self.text)

    def experts_hang(self, hanging: Callable[[], bool] = lambda: True) -> Any:
        """``handler()`` whose experts' requests never answer while ``hanging()`` (the planner's and
        the keyword requests do): a task to interrupt in flight."""
        inner = self.handler()

        async def handler(request: LoopbackRequest) -> Any:
            if hanging() and "Your assignment:" in request.prompt:
                return Reply(hang=True)
            return await inner(request)

        return handler


LOCAL_AGENTS = ("mathematician", "scientist", "programmer", "writer", "generalist")


def write_pool(directory: Path, url: str, *, models: tuple[str, ...] = ("alpha", "beta", "gamma"),
               api_key_env: str | None = None, extra: str = "", agents: tuple[str, ...] = (),
               timeout: float = 10) -> Path:
    """A pool file with one agent per model, all on the loopback server (``agents`` adds named
    agents spread over the same models, e.g. the embedded pool's names)."""
    key = f"\n    api_key_env: {api_key_env}" if api_key_env else "\n    api_key_env: null"
    model_lines = "".join(f"""
  {name}:
    type: openai
    model: {name}
    base_url: {url}/v1{key}
    max_attempts: 2
    timeout: {timeout:g}""" for name in models)
    agent_lines = "".join(f"""
  - name: {name}-expert
    model: {name}
    persona: You are the {name} expert.
    skills: [{'history' if i == 0 else 'arithmetic' if i == 1 else 'writing'}]""" for i, name in enumerate(models))
    agent_lines += "".join(f"""
  - name: {name}
    model: {models[i % len(models)]}
    persona: You are the {name}.""" for i, name in enumerate(agents))
    path = directory / "pool.yaml"
    path.write_text(f"name: loopback\nmodels:{model_lines}\nagents:{agent_lines}\n{extra}")
    return path
