"""Calibrated skill estimates: each agent's accuracy on each skill, with how sure we are of it.

A Beta-Bernoulli posterior per agent and skill, shrunk toward the agent's overall accuracy: with
``c`` correct answers of ``n`` items on a skill and a prior worth ``m`` items at the overall
accuracy ``a``, the estimate is ``p = (c + m·a) / (n + m)`` with standard deviation
``sqrt(p(1-p) / (n + m + 1))``. Three items of evidence barely move an agent; thirty decide.

A query's expected accuracy combines its matched skills on the log-odds scale: each skill moves
the agent from its overall accuracy by its own deviation, weighted by the match's similarity and
by how much the skill separates the agents beyond sampling noise (the variance of their
deviations, less what the few items behind each estimate would produce by chance). A generic keyword ("reasoning"),
on which every agent performs at its own average, moves nobody; a topic on which specialists
shine moves them most.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from orchestra.matching import Match
from orchestra.profile import SkillProfile

PRIOR_ITEMS = 4.0
"""How many items the prior (the agent's overall accuracy) counts for on each skill."""
COLD_ACCURACY = 0.5
"""The overall accuracy assumed for an agent without a measured profile where no agent has one
(otherwise it is the measured agents' mean: a newcomer is taken for an average agent)."""
_FLOOR = 0.02  # keeps log-odds finite and every estimate off 0 and 1
_SEPARATION_FLOOR = 0.05  # a skill that separates nobody still counts a little


def posterior(correct: float, items: float, overall: float, prior_items: float = PRIOR_ITEMS) -> tuple[float, float]:
    """The estimate and its standard deviation (see the module docstring)."""
    p = (correct + prior_items * overall) / (items + prior_items)
    return p, math.sqrt(p * (1 - p) / (items + prior_items + 1))


def skill_estimates(counts: Mapping[str, tuple[int, int]], overall: float,
                    prior_items: float = PRIOR_ITEMS) -> dict[str, tuple[float, float]]:
    """``{skill: (estimate, standard deviation)}`` from ``{skill: (correct, items)}``, rounded for a profile file."""
    return {skill: tuple(round(x, 4) for x in posterior(c, n, overall, prior_items))  # type: ignore[misc]
            for skill, (c, n) in counts.items()}


def _logit(p: float) -> float:
    p = min(1 - _FLOOR, max(_FLOOR, p))
    return math.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@dataclass(frozen=True)
class AgentSkills:
    """One agent's evidence as the router uses it: overall accuracy and (correct, items) per canonical skill."""

    overall: float
    counts: Mapping[str, tuple[float, float]]
    measured: bool = True

    @classmethod
    def of(cls, profile: SkillProfile | None, declared: Sequence[str] = (),
           cold_accuracy: float = COLD_ACCURACY) -> AgentSkills:
        """From a profile; one without pooled counts (written before calibration) uses its ±1 sums as
        net evidence; an agent without a profile has ``cold_accuracy`` overall and counts each
        declared skill as one right answer."""
        if profile is None:
            return cls(cold_accuracy, {skill.lower().strip(): (1.0, 1.0) for skill in declared}, measured=False)
        if profile.skill_counts:
            return cls(profile.accuracy, {s: (float(c), float(n)) for s, (c, n) in profile.skill_counts.items()})
        return cls(profile.accuracy, {s: (float(max(v, 0)), float(abs(v))) for s, v in profile.skills.items()})


@dataclass(frozen=True)
class SkillEvidence:
    """One matched skill's estimate for one agent."""

    keyword: str
    skill: str
    similarity: float
    estimate: float
    stderr: float
    items: float
    weight: float


class Calibration:
    """Every agent's skill estimates, and their expected accuracy on a query's matched skills.

    Args:
        agents: agent -> its evidence.
        aliases: keyword variant -> canonical skill (matches are mapped through it).
        prior_items: the prior's weight, in items.
    """

    def __init__(self, agents: Mapping[str, AgentSkills], aliases: Mapping[str, str] | None = None,
                 prior_items: float = PRIOR_ITEMS) -> None:
        self.agents = dict(agents)
        self.aliases = dict(aliases or {})
        self.prior_items = prior_items
        self._separation: dict[str, float] = {}

    def canonical(self, skill: str) -> str:
        """The canonical skill a vocabulary entry stands for."""
        return self.aliases.get(skill, skill)

    def estimate(self, agent: str, skill: str) -> tuple[float, float, float]:
        """(estimate, standard deviation, items of evidence) for an agent on a canonical skill."""
        evidence = self.agents[agent]
        correct, items = evidence.counts.get(skill, (0.0, 0.0))
        p, sd = posterior(correct, items, evidence.overall, self.prior_items)
        return p, sd, items

    def separation(self, skill: str) -> float:
        """How far a skill separates the agents beyond sampling noise: the standard deviation over
        agents of their log-odds deviation from their own overall accuracy on it, less the part
        that the few items behind each estimate would produce by chance (so a keyword seen on two
        items separates nobody, however different its estimates look)."""
        cached = self._separation.get(skill)
        if cached is None:
            shifts, noise = [], []
            for agent, evidence in self.agents.items():
                p, _, items = self.estimate(agent, skill)
                p = min(1 - _FLOOR, max(_FLOOR, p))
                shifts.append(_logit(p) - _logit(evidence.overall))
                # the delta method: a shrunk estimate's variance on the log-odds scale
                noise.append(items / ((items + self.prior_items) ** 2 * p * (1 - p)))
            mean = sum(shifts) / len(shifts)
            spread = sum((x - mean) ** 2 for x in shifts) / len(shifts)
            cached = math.sqrt(max(0.0, spread - sum(noise) / len(noise)))
            self._separation[skill] = cached
        return cached

    def query(self, agent: str, matches: Sequence[Match]) -> tuple[float, float, tuple[SkillEvidence, ...]]:
        """An agent's expected accuracy on a query, its standard deviation, and each skill's part.

        With no matched skill, the agent's overall accuracy (and the deviation of that estimate).
        """
        evidence = self.agents[agent]
        base = _logit(evidence.overall)
        parts: list[SkillEvidence] = []
        seen: set[str] = set()
        for match in matches:
            skill = self.canonical(match.skill)
            if skill in seen:
                continue
            seen.add(skill)
            p, sd, items = self.estimate(agent, skill)
            weight = match.similarity * max(self.separation(skill), _SEPARATION_FLOOR) ** 2
            parts.append(SkillEvidence(match.keyword, skill, match.similarity, p, sd, items, weight))
        total = sum(part.weight for part in parts)
        if not total:
            p = min(1 - _FLOOR, max(_FLOOR, evidence.overall))
            return p, math.sqrt(p * (1 - p) / (self.prior_items + 1)), tuple(parts)
        shift = sum(part.weight * (_logit(part.estimate) - base) for part in parts) / total
        p = _sigmoid(base + shift)
        sd = sum(part.weight * part.stderr for part in parts) / total
        return p, sd, tuple(parts)
