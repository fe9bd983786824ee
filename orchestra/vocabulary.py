"""The one vocabulary of choices: every mode, strategy and grader name, as Literal types.

The settings model, the command line, pool and workflow YAML and the pipeline all take their
choices from here, so a choice is added or renamed in one place.
"""

from __future__ import annotations

from typing import Literal, get_args

Mode = Literal["calibrated", "symbolic-moe", "topk", "adaptive", "global", "random"]
"""How experts are recruited for a node."""

Strategy = Literal["synthesize", "vote", "refine", "none"]
"""How a node's expert answers become its output."""

AggregatorChoice = Literal["best", "per-node"]
"""One aggregator for every node (the best measured), or the best among each node's fitting agents."""

GraderName = Literal["auto", "mc", "numeric", "exact"]
"""How an answer is read for voting and grading."""

PlanFallback = Literal["fail", "single"]
"""What happens when the planner's plan stays invalid."""

ExecutorKind = Literal["local", "ray"]
"""Where in-process engines run: in this process, or as Ray actors on a cluster."""

Method = Literal["calibrated", "symbolic-moe", "vote", "moa", "random", "single"]
"""An evaluation method preset (``orchestra.evaluate.METHODS`` says what each sets)."""

MODES: tuple[str, ...] = get_args(Mode)
GRADER_NAMES: tuple[str, ...] = get_args(GraderName)
METHOD_NAMES: tuple[str, ...] = get_args(Method)
