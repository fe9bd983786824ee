"""Recruiting: choose the experts for a subtask from measured skill profiles.

``calibrated`` (the default): each agent's expected accuracy on the subtask comes from calibrated
per-skill estimates (``orchestra.calibration``), and the team, experts and aggregator together, is
the one with the most expected accuracy for its expected cost (``orchestra.teams``).

``symbolic-moe`` (the paper, exact): for query keywords already mapped onto the profile
vocabulary, an agent's local suitability is ``s = sum(profile[skill])``; agents with ``s > 0``
are kept (if none, every ``s`` is shifted by ``-min + 1``); the weight is ``w = s * γ``; k experts
are sampled from the normalised weights with replacement. Other modes (top-k distinct, adaptive
k), a cost trade-off, the rare-expert filter, cold start and explanations are built on the same
weights. ``calibrated`` with no measured profile at all draws as ``symbolic-moe`` does.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from orchestra.calibration import COLD_ACCURACY, PRIOR_ITEMS, AgentSkills, Calibration
from orchestra.matching import Match
from orchestra.numbers import Amount, Count
from orchestra.profile import SkillProfile, global_competence
from orchestra.teams import Option, Team, choose_team
from orchestra.terminal_text import counted
from orchestra.vocabulary import MODES, Mode

CALIBRATED_COST_LAMBDA = 0.05
"""The calibrated mode's default λ: one call to the priciest model must buy 5 points of accuracy."""


class RecruitConfig(BaseModel):
    """How experts are chosen, beyond the mode and k (which are run settings of their own).

    Attributes:
        p: the adaptive mode's cumulative probability threshold.
        k_max: the adaptive mode's cap.
        cost_lambda: the cost trade-off λ. ``calibrated``: a team's utility is its expected accuracy
            minus ``λ · expected cost / cost of one call to the priciest model`` (None: 0.05);
            other modes but ``random`` multiply weights by ``exp(-λ · price / max price)`` (None: 0).
        max_cost_per_item: ``calibrated``: the most (USD) a node's team may be expected to cost.
        prior_items: ``calibrated``: how many items an agent's overall accuracy counts for in
            each skill estimate.
        confidence: ``calibrated``: when the first two experts are each estimated at least this
            accurate, they are asked first, and their agreement ends the node (1 turns it off).
        rare_threshold: in a batch, experts chosen for fewer than this share of instances are replaced.
        cold_start_score: the profile score given to each declared skill of an agent that has
            no measured profile.
        uniform_prior_score: the score, on every skill, of an agent with neither a profile nor
            declared skills: below a declared specialist, above nothing.
        temperature: T in γ's power ``1/T``.
        competence_weight: β in ``w = s · γ^β``. 1 is Symbolic-MoE exactly; 0 routes by the
            subtask's skills alone (for pools of equally strong specialists, where global
            competence measured on a mixed validation set mostly reflects sampling noise).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    p: Amount = Field(default=0.8, gt=0, le=1)
    k_max: Count = Field(default=5, ge=1)
    cost_lambda: Amount | None = Field(default=None, ge=0)
    max_cost_per_item: Amount | None = Field(default=None, ge=0)
    prior_items: Amount = Field(default=PRIOR_ITEMS, gt=0)
    confidence: Amount = Field(default=0.75, gt=0, le=1)
    rare_threshold: Amount = Field(default=0.05, ge=0, le=1)
    cold_start_score: Amount = 1.0
    uniform_prior_score: Amount = 0.5
    temperature: Amount = Field(default=0.5, gt=0)
    competence_weight: Amount = Field(default=1.0, ge=0)


class Contribution(NamedTuple):
    """One matched skill's part in an agent's suitability (``calibrated``: the agent's estimated
    accuracy on the skill, and the items of evidence behind it)."""

    keyword: str
    skill: str
    similarity: float
    score: float
    items: float = 0.0


class Candidate(NamedTuple):
    """An agent's standing for one subtask."""

    agent: str
    suitability: float
    competence: float
    cost_factor: float
    weight: float
    probability: float
    contributions: tuple[Contribution, ...]
    cold_start: bool = False
    cost: float = 0.0
    """``calibrated``: the expected cost (USD) of one answer."""


@dataclass(frozen=True)
class Recruitment:
    """The experts chosen for one subtask, with every candidate's numbers."""

    experts: tuple[str, ...]
    keywords: tuple[str, ...]
    matches: tuple[Match, ...]
    candidates: tuple[Candidate, ...]
    mode: str
    notes: tuple[str, ...] = ()
    team: Team | None = None
    """``calibrated``: the chosen team, its aggregator, and what it is expected to achieve and cost."""
    skills: tuple[str, ...] = ()
    """``calibrated``: the skill each of ``matches`` was counted under (a keyword variant's canonical
    skill, into which profiling merged it); empty where each counts under its own."""

    @property
    def staged(self) -> int:
        """Experts asked first, whose agreement ends the node (0: all at once)."""
        return self.team.staged if self.team is not None and self.experts == self.team.experts else 0

    def candidate(self, agent: str) -> Candidate | None:
        """The numbers for one agent."""
        return self._by_agent.get(agent)

    @cached_property
    def _by_agent(self) -> dict[str, Candidate]:
        found: dict[str, Candidate] = {}
        for candidate in self.candidates:
            found.setdefault(candidate.agent, candidate)
        return found

    def explain(self) -> list[str]:
        """One line per chosen expert: its probability and the skills that earned it."""
        return list(self._explanation)

    @cached_property
    def _explanation(self) -> tuple[str, ...]:  # written once: a recruitment is never changed
        return tuple(self._explain_team(self.team) if self.team is not None else self._explain_draw())

    def _explain_draw(self) -> list[str]:
        lines = []
        for agent, picks in Counter(self.experts).items():
            candidate = self.candidate(agent)
            if candidate is None:
                continue
            times = f" x{picks}" if picks > 1 else ""
            cold = " [cold start]" if candidate.cold_start else ""
            if self.mode in ("random", "global"):  # baselines that ignore the skills and the weights
                priced = f", cost factor {candidate.cost_factor:.3f}" if candidate.cost_factor != 1 else ""
                how = (f"drawn uniformly, 1 in {len(self.candidates)}" if self.mode == "random"
                       else f"among the most competent overall, γ={candidate.competence:.3f}{priced}")
                lines.append(f"{agent}{times}: {how}{cold} (mode {self.mode}: skills not used)")
                continue
            parts = [f"{c.skill} {c.score:+g}" + (f" (from '{c.keyword}')" if c.keyword != c.skill else "")
                     for c in candidate.contributions if c.score]
            matched = dict.fromkeys(c.skill for c in candidate.contributions)  # (in order, each once)
            skills = (", ".join(parts) if parts else
                      f"{', '.join(matched)} +0 in its profile: chosen by global competence" if matched else
                      "no matched skill: chosen by global competence")
            lines.append(f"{agent}{times}: p={candidate.probability:.3f} s={candidate.suitability:g} "
                         f"γ={candidate.competence:.3f}{cold}; {skills}")
        return lines + list(self.notes)

    def _explain_team(self, team: Team) -> list[str]:
        lines = []
        for agent in self.experts:
            candidate = self.candidate(agent)
            if candidate is None:
                continue
            parts = [f"{c.skill} {c.score:.2f} ({c.items:g} items" + (f", from '{c.keyword}')" if c.keyword != c.skill
                                                                      else ")")
                     for c in candidate.contributions]
            skills = "; ".join(parts) if parts else "no matched skill: overall accuracy"
            cold = " [cold start]" if candidate.cold_start else ""
            lines.append(f"{agent}: expected accuracy {candidate.suitability:.2f} (overall "
                         f"{candidate.competence:.2f}), ${candidate.cost:.6f} per answer{cold}; {skills}")
        summary = f"team: expected accuracy {team.expected_accuracy:.3f}, expected cost ${team.expected_cost:.6f}"
        if team.aggregator is not None and len(self.experts) > 1:  # (an assumed 0.50 read as measured)
            summary += (f"; aggregator {team.aggregator} (aggregation {team.aggregation_skill:.2f} here)"
                        if team.aggregation_measured else
                        f"; aggregator {team.aggregator} (aggregation not measured: {team.aggregation_skill:.2f} "
                        "assumed)")
        if self.staged:
            summary += (f"; the first {self.staged} experts are asked first, and if they agree, "
                        "no further expert and no aggregation call")
        if team.over_cap is not None:
            summary += f"; no team fits the cost cap (${team.over_cap:g} per item): the cheapest expert alone"
        return [*lines, summary, *self.notes]

    def to_dict(self, explanation: list[str] | None = None) -> dict[str, object]:
        """A JSON-ready explanation (``explanation``: lines to show instead of ``explain()``'s), with
        lists and dicts of its own: one recruitment serves every node and run that drew the same."""
        record = self._record  # (copied level by level: 3 µs, against 18 for a generic deep copy)
        team = record["team"]
        return {**record, "experts": [*record["experts"]], "keywords": [*record["keywords"]],
                "matches": [{**match} for match in record["matches"]],
                "candidates": [{**candidate, "contributions": [{**part} for part in candidate["contributions"]]}
                               for candidate in record["candidates"]],
                "team": None if team is None else {**team, "experts": [*team["experts"]]},
                "explanation": self.explain() if explanation is None else explanation}

    @cached_property
    def _record(self) -> dict[str, Any]:  # written once: a recruitment is never changed
        return {
            "mode": self.mode,
            "experts": list(self.experts),
            "keywords": list(self.keywords),
            # (a variant's own skill was shown where calibrated recruiting counted its canonical one)
            "matches": [{"keyword": m.keyword, "skill": skill, "similarity": m.similarity}
                        | ({"variant": m.skill} if skill != m.skill else {})
                        for m, skill in zip(self.matches, self.skills or (m.skill for m in self.matches))],
            "candidates": [{"agent": c.agent, "suitability": c.suitability, "competence": round(c.competence, 6),
                            "weight": round(c.weight, 6), "probability": round(c.probability, 6),
                            "cold_start": c.cold_start,
                            "contributions": [{"keyword": x.keyword, "skill": x.skill, "score": x.score}
                                              for x in c.contributions]}
                           for c in self.candidates],
            "team": None if self.team is None else {
                "experts": list(self.team.experts), "aggregator": self.team.aggregator,
                "expected_accuracy": round(self.team.expected_accuracy, 6),
                "expected_cost_usd": self.team.expected_cost, "staged": self.staged,
                "over_cap_usd": self.team.over_cap},
        }


DEFAULT_ANSWER_TOKENS = (400.0, 300.0)
"""(prompt, completion) tokens assumed for an answer when the profile measured none."""
DEFAULT_AGGREGATION_TOKENS = (1200.0, 300.0)
"""(prompt, completion) tokens assumed for an aggregation call when the profile measured none."""
UNMEASURED_AGGREGATION = 0.5
"""The aggregation skill assumed for an aggregator without a measured score."""


@dataclass
class SkillTable:
    """The pool's profiles as recruiting needs them: per-agent skill scores, γ, vocabulary, and
    (for ``calibrated``) the calibrated estimates and each agent's expected cost per call."""

    scores: dict[str, dict[str, float]]
    competence: dict[str, float]
    cold: frozenset[str] = frozenset()
    universal: frozenset[str] = frozenset()
    prices: dict[str, float] = field(default_factory=dict)
    calibration: Calibration | None = None
    costs: dict[str, tuple[float, float]] = field(default_factory=dict)
    """agent -> expected USD of (one answer, one aggregation call)."""
    profiles: Mapping[str, SkillProfile] = field(default_factory=dict)

    @property
    def vocabulary(self) -> list[str]:
        """Every skill any agent has a score for (and every variant merged into one), sorted."""
        skills = {skill for scores in self.scores.values() for skill in scores}
        if self.calibration is not None:
            skills.update(self.calibration.aliases)
        return sorted(skills)

    @classmethod
    def build(cls, agents: Sequence[str], profiles: Mapping[str, SkillProfile],
              declared: Mapping[str, Sequence[str]], prices: Mapping[str, float],
              config: RecruitConfig, costs: Mapping[str, tuple[float, float]] | None = None) -> SkillTable:
        """Measured agents use their profiles; the others start cold (declared skills, else uniform)."""
        scores: dict[str, dict[str, float]] = {}
        cold, universal = set(), set()
        for agent in agents:
            profile = profiles.get(agent)
            if profile is not None:
                scores[agent] = {k: float(v) for k, v in profile.skills.items()}
            else:
                cold.add(agent)
                skills = [s.lower().strip() for s in declared.get(agent, ())]
                scores[agent] = {s: config.cold_start_score for s in skills}
                if not skills:
                    universal.add(agent)
        measured = {a: sum(scores[a].values()) for a in agents if a not in cold}
        competence = global_competence(measured, config.temperature) if measured else {}
        cold_gamma = (sum(competence.values()) / len(competence)) if competence else 1.0
        gammas = {a: competence.get(a, cold_gamma) for a in agents}
        norm = sum(gammas.values()) or 1.0
        aliases = {variant: skill for a in agents if (p := profiles.get(a)) is not None
                   for variant, skill in p.aliases.items()}
        # a newcomer is taken for an average agent: at 0.5 it outranked, on skills it never declared,
        # every measured agent below 0.5 (a pool on hard questions)
        accuracies = [p.accuracy for a in agents if (p := profiles.get(a)) is not None]
        cold_accuracy = sum(accuracies) / len(accuracies) if accuracies else COLD_ACCURACY
        # a newcomer's declared skills under their canonical names, as the queries' matches are read
        # (one declaring a keyword variant, "organic chem", got no credit for it)
        canonical = {a: [aliases.get(skill.lower().strip(), skill) for skill in declared.get(a, ())] for a in agents}
        calibration = Calibration({a: AgentSkills.of(profiles.get(a), canonical[a], cold_accuracy)
                                   for a in agents}, aliases, config.prior_items)
        return cls(scores=scores, competence={a: g / norm for a, g in gammas.items()},
                   cold=frozenset(cold), universal=frozenset(universal), prices=dict(prices),
                   calibration=calibration, costs=dict(costs or {}),
                   profiles={a: profiles[a] for a in agents if a in profiles})


class Recruiter:
    """Turns mapped skills into a recruitment, deterministically for a given seed.

    Args:
        table: the pool's profiles.
        config: recruiting settings.
        aggregators: who may aggregate a ``calibrated`` team (default: every agent with a measured
            aggregation score, else every agent).
    """

    def __init__(self, table: SkillTable, config: RecruitConfig | None = None,
                 aggregators: Sequence[str] | None = None) -> None:
        self.table = table
        self.config = config or RecruitConfig()
        measured = [a for a in table.scores if aggregation_evidence(table.profiles.get(a)) is not None]
        self.aggregators = list(aggregators) if aggregators else (measured or list(table.scores))
        self._ranked: dict[tuple[Match, ...], list[Candidate]] = {}
        self._teams: dict[tuple[tuple[Match, ...], int], tuple[list[Candidate], Team]] = {}
        self._recruitments: dict[tuple[object, ...], Recruitment] = {}
        self._cumulative: dict[tuple[Match, ...], tuple[list[str], list[float]]] = {}

    def suitability(self, agent: str, matches: Sequence[Match]) -> tuple[float, tuple[Contribution, ...]]:
        """``s(agent, query)`` and the part each matched skill played."""
        scores = self.table.scores[agent]
        contributions = []
        for match in matches:
            if agent in self.table.universal:
                score = self.config.uniform_prior_score
            else:
                score = scores.get(match.skill, 0.0)
            contributions.append(Contribution(match.keyword, match.skill, match.similarity, score))
        return sum(c.score for c in contributions), tuple(contributions)

    def candidates(self, matches: Sequence[Match]) -> list[Candidate]:
        """Every agent with its weight and selection probability, best first (memoised per skill set)."""
        key = tuple(matches)
        ranked = self._ranked.get(key)
        if ranked is None:
            if len(self._ranked) >= 4096:
                self._ranked.clear()
            ranked = self._ranked[key] = self._rank(matches)
        return ranked

    def _rank(self, matches: Sequence[Match]) -> list[Candidate]:
        agents = list(self.table.scores)
        raw = {a: self.suitability(a, matches) for a in agents}
        suit = {a: s for a, (s, _) in raw.items()}
        if not any(s > 0 for s in suit.values()):
            low = min(suit.values())
            suit = {a: s - low + 1 for a, s in suit.items()}
        top_price = max(self.table.prices.values(), default=0.0)
        weights, factors = {}, {}
        cost_lambda = self.config.cost_lambda or 0.0
        for agent in agents:
            price = self.table.prices.get(agent, 0.0)
            factors[agent] = math.exp(-cost_lambda * price / top_price) if top_price else 1.0
            gamma = self.table.competence[agent] ** self.config.competence_weight
            weights[agent] = suit[agent] * gamma * factors[agent] if suit[agent] > 0 else 0.0
        total = sum(weights.values())
        if total <= 0:  # every γ is zero: fall back to suitability alone
            weights = {a: max(suit[a], 0.0) for a in agents}
            total = sum(weights.values()) or 1.0
        result = [Candidate(agent=a, suitability=suit[a], competence=self.table.competence[a],
                            cost_factor=factors[a], weight=weights[a], probability=weights[a] / total,
                            contributions=raw[a][1], cold_start=a in self.table.cold)
                  for a in agents]
        return sorted(result, key=lambda c: (-c.probability, c.agent))

    def recruit(self, keywords: Sequence[str], matches: Sequence[Match], *, seed: int, k: int = 3,
                mode: Mode = "symbolic-moe") -> Recruitment:
        """Choose ``k`` experts for one subtask, the ``mode``'s way (for ``calibrated``, ``k`` is a cap;
        ``adaptive`` takes as many as its threshold admits, up to ``k_max`` of the recruiting settings).
        Equal recruitments are one object (memoised), so its explanation is written once."""
        keywords, matches = tuple(keywords), tuple(matches)
        notes: tuple[str, ...] = ()
        if mode == "calibrated":
            if len(self.table.cold) < len(self.table.scores):
                ranked, team = self.team(matches, k)
                return self._made(mode, k, keywords, matches, team.experts, ranked, team, notes)
            # nothing measured to calibrate: the paper's draw, from declared skills and the uniform prior
            mode, notes = "symbolic-moe", ("no agent has a measured profile: drawn as symbolic-moe does "
                                           "(run orchestra profile to calibrate)",)
        ranked = self.candidates(matches)
        experts = self._draw(matches, ranked, seed, k, mode)
        if mode in ("topk", "global", "random") and len(experts) < k:
            pool = len(self.table.scores)
            if len(experts) == pool:  # (each agent once: the pool is smaller than k)
                notes += (f"{mode}: only {len(experts)} of the {k} experts asked for: the pool has "
                          f"{counted(pool, 'agent')}, each chosen once",)
            else:  # (topk: the others have no weight; a shift of scores all 0 or less gives every agent one)
                others = pool - len(experts)
                notes += (f"{mode}: only {len(experts)} of the {k} experts asked for have a positive weight on these "
                          f"skills; " + ("the other agent scores 0 or less on them (or has γ = 0)" if others == 1 else
                                         f"the other {others} agents score 0 or less on them (or have γ = 0)"),)
        return self._made(mode, k, keywords, matches, experts, ranked, None, notes)

    def draws(self, matches: Sequence[Match], mode: Mode) -> bool:
        """Whether the seed can change the experts ``recruit`` chooses on these matches in ``mode``
        (a draw among several agents); when it cannot, one recruitment serves every node."""
        if mode == "random":
            return True
        if mode == "calibrated" and len(self.table.cold) < len(self.table.scores):
            return False  # a team chosen by expected accuracy and cost
        if mode in ("symbolic-moe", "calibrated"):  # (calibrated with nothing measured draws as symbolic-moe)
            key = tuple(matches)
            agents, _ = self._weights(key, self.candidates(key))
            return len(agents) != 1
        return False  # topk, adaptive and global rank the agents

    def _draw(self, matches: tuple[Match, ...], ranked: Sequence[Candidate], seed: int, k: int,
              mode: Mode) -> tuple[str, ...]:
        if mode == "symbolic-moe":
            agents, cumulative = self._weights(matches, ranked)
            if len(agents) == 1:  # the only agent with weight, k times: nothing to draw
                return (agents[0],) * k
            return tuple(SeededDraws(seed).pick(agents, cumulative, k))
        eligible = [c for c in ranked if c.probability > 0]
        if mode == "topk":
            experts = [c.agent for c in eligible[:k]]
        elif mode == "adaptive":
            experts, covered = [], 0.0
            for candidate in eligible[: self.config.k_max]:
                experts.append(candidate.agent)
                covered += candidate.probability
                if covered >= self.config.p - 1e-12:
                    break
        elif mode == "global":  # (γ times the cost factor: --cost-lambda was accepted and did nothing here)
            experts = [c.agent for c in sorted(ranked, key=lambda c: (-c.competence * c.cost_factor, c.agent))[:k]]
        elif mode == "random":  # (in the pool's order: neither the skills nor a price changes the draw)
            experts = SeededDraws(seed).sample(list(self.table.scores), k)
        else:
            raise ValueError(f"unknown recruiting mode {mode!r}; choose one of {', '.join(MODES)}")
        return tuple(experts)

    def _weights(self, matches: tuple[Match, ...], ranked: Sequence[Candidate]) -> tuple[list[str], list[float]]:
        """The agents a draw may pick on these matches and their cumulative probabilities (memoised)."""
        found = self._cumulative.get(matches)
        if found is None:
            if len(self._cumulative) >= 4096:
                self._cumulative.clear()
            eligible = [c for c in ranked if c.probability > 0]
            found = self._cumulative[matches] = ([c.agent for c in eligible],
                                                 list(itertools.accumulate(c.probability for c in eligible)))
        return found

    def _made(self, mode: str, k: int, keywords: tuple[str, ...], matches: tuple[Match, ...],
              experts: tuple[str, ...], ranked: Sequence[Candidate], team: Team | None,
              notes: tuple[str, ...]) -> Recruitment:
        """The recruitment of these choices: one object per distinct one (``ranked`` and ``team``
        follow from the matches and k)."""
        key = (mode, k, keywords, matches, experts, notes)
        found = self._recruitments.get(key)
        if found is None:
            if len(self._recruitments) >= 4096:
                self._recruitments.clear()
            calibration = self.table.calibration if team is not None else None
            skills = tuple(calibration.canonical(m.skill) for m in matches) if calibration is not None else ()
            found = self._recruitments[key] = Recruitment(experts=experts, keywords=keywords, matches=matches,
                                                          candidates=tuple(ranked), mode=mode, notes=notes,
                                                          team=team, skills=skills)
        return found

    def team(self, matches: Sequence[Match], k: int) -> tuple[list[Candidate], Team]:
        """``calibrated``: every agent's expected accuracy and cost on these skills, best first, and
        the team chosen from them (memoised per skill set and k)."""
        key = (tuple(matches), k)
        found = self._teams.get(key)
        if found is None:
            if len(self._teams) >= 4096:
                self._teams.clear()
            found = self._teams[key] = self._choose_team(matches, k)
        return found

    def _choose_team(self, matches: Sequence[Match], k: int) -> tuple[list[Candidate], Team]:
        calibration = self.table.calibration
        assert calibration is not None  # SkillTable.build always sets it
        costs = self.table.costs
        canonical = [Match(m.keyword, calibration.canonical(m.skill), m.similarity) for m in matches]
        ranked, options = [], []
        for agent in self.table.scores:
            accuracy, _, parts = calibration.query(agent, matches)
            cost = costs.get(agent, (0.0, 0.0))[0]
            options.append(Option(agent, accuracy, cost))
            contributions = tuple(Contribution(p.keyword, p.skill, p.similarity, round(p.estimate, 4), p.items)
                                  for p in parts)
            ranked.append(Candidate(agent=agent, suitability=round(accuracy, 4),
                                    competence=calibration.agents[agent].overall, cost_factor=1.0, weight=accuracy,
                                    probability=0.0, contributions=contributions,
                                    cold_start=agent in self.table.cold, cost=cost))
        total = sum(c.weight for c in ranked) or 1.0
        ranked = sorted((c._replace(probability=c.weight / total) for c in ranked),
                        key=lambda c: (-c.weight, c.cost, c.agent))
        aggregators = []
        for agent in self.aggregators:
            profile = self.table.profiles.get(agent)
            skill = (node_aggregation_estimate(profile, canonical)[0]
                     if aggregation_evidence(profile) is not None and profile is not None else UNMEASURED_AGGREGATION)
            aggregators.append(Option(agent, skill, costs.get(agent, (0.0, 0.0))[1]))
        lam = self.config.cost_lambda if self.config.cost_lambda is not None else CALIBRATED_COST_LAMBDA
        # (a newcomer's cost is a guess, 400+300 tokens: priced above the measured, it moved every team)
        unit = (max((cost for agent, (cost, _) in costs.items() if agent not in self.table.cold), default=0.0)
                or max((cost for cost, _ in costs.values()), default=0.0))
        team = choose_team(options, aggregators, k=k, cost_lambda=lam, unit_cost=unit,
                           max_cost=self.config.max_cost_per_item, confidence=self.config.confidence)
        if team.aggregator is not None and aggregation_evidence(self.table.profiles.get(team.aggregator)) is None:
            team = replace(team, aggregation_measured=False)
        return ranked, team

    def filter_rare(self, recruitments: Sequence[Recruitment], *, seed: int,
                    light: Collection[str] = ()) -> list[Recruitment]:
        """Replace experts chosen for under ``rare_threshold`` of the instances, so fewer models load.

        A rare expert is resampled among the frequent ones by that instance's own weights (or,
        when none of them has weight there, by how often they are chosen overall). ``light``
        agents (remote models: nothing to load) are never replaced in a ``calibrated``
        recruitment, whose choices are estimates, not sampling noise.
        """
        if not recruitments:
            return []
        counts = Counter(agent for r in recruitments for agent in set(r.experts))
        frequent = {a for a, n in counts.items() if n / len(recruitments) >= self.config.rare_threshold}
        if any(r.mode == "calibrated" for r in recruitments):
            frequent |= set(light) & set(counts)
        if not frequent:
            return list(recruitments)
        rng = SeededDraws(seed)
        filtered = []
        for recruitment in recruitments:
            rare = [a for a in recruitment.experts if a not in frequent]
            if not rare:
                filtered.append(recruitment)
                continue
            pool = [c for c in recruitment.candidates if c.agent in frequent and c.probability > 0]
            names = [c.agent for c in pool] or sorted(frequent)
            weights = [c.probability for c in pool] or [counts[a] for a in names]
            note = f"rare-expert filter replaced {', '.join(sorted(set(rare)))}"
            if recruitment.team is None:  # a draw with replacement: a replacement may be drawn twice
                experts = tuple(a if a in frequent else rng.choices(names, weights, 1)[0]
                                for a in recruitment.experts)
            else:  # a team of distinct experts (it became ``(A, A)``): one not in it yet, else none
                experts = self._distinct_replacements(recruitment.experts, frequent, names, weights, rng)
                note += "; the team's numbers above are of the team before"
            filtered.append(replace(recruitment, experts=experts, notes=(*recruitment.notes, note)))
        return filtered

    @staticmethod
    def _distinct_replacements(experts: tuple[str, ...], frequent: set[str], names: list[str],
                               weights: list[float], rng: SeededDraws) -> tuple[str, ...]:
        """A team's experts with each rare one replaced by a frequent agent not in the team (drawn by
        ``weights``), or left out when every frequent agent is in it already."""
        team = [a for a in experts if a in frequent]
        chosen: list[str] = []
        for agent in experts:
            if agent in frequent:
                chosen.append(agent)
                continue
            left = [(name, weight) for name, weight in zip(names, weights) if name not in team]
            if left:
                pick = rng.choices([name for name, _ in left], [weight for _, weight in left], 1)[0]
                team.append(pick)
                chosen.append(pick)
        return tuple(chosen)


class SeededDraws:
    """A small, fast, seeded generator (splitmix64): the same seed always gives the same draws."""

    _MASK = (1 << 64) - 1

    def __init__(self, seed: int) -> None:
        self.state = seed & self._MASK

    def uniform(self) -> float:
        """The next number in [0, 1)."""
        self.state = (self.state + 0x9E3779B97F4A7C15) & self._MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self._MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self._MASK
        return ((z ^ (z >> 31)) >> 11) / float(1 << 53)

    def choices(self, items: Sequence[str], weights: Sequence[float], k: int) -> list[str]:
        """``k`` items drawn with replacement, each with probability proportional to its weight."""
        return self.pick(items, list(itertools.accumulate(weights)), k)

    def pick(self, items: Sequence[str], cumulative: Sequence[float], k: int) -> list[str]:
        """``choices`` given the weights' running sums."""
        total = cumulative[-1]
        return [items[min(bisect.bisect_right(cumulative, self.uniform() * total), len(items) - 1)]
                for _ in range(k)]

    def sample(self, items: Sequence[str], k: int) -> list[str]:
        """``k`` distinct items, uniformly."""
        pool = list(items)
        return [pool.pop(int(self.uniform() * len(pool))) for _ in range(min(k, len(pool)))]



NODE_PRIOR_ITEMS = 4.0
"""Per-node aggregator choice: how many benchmark items the agent's overall aggregation score
counts for when it is blended with its results on the node's own skills."""


def aggregation_evidence(profile: SkillProfile | None) -> tuple[float, float] | None:
    """A profile's aggregation score and its standard error (0 when not recorded), or None."""
    if profile is None or profile.aggregation_score is None:
        return None
    return profile.aggregation_score, profile.aggregation_stderr or 0.0


def near_tie_best(scored: Mapping[str, tuple[float, float]], tiebreak: Mapping[str, Sequence[float]], *,
                  margin: float | None = None) -> tuple[str, list[str]]:
    """The best score, near-ties broken by ``tiebreak``, then by the score itself, then by name as a
    last resort.

    Args:
        scored: agent -> (score, standard error).
        tiebreak: agent -> numbers compared in order, higher first (e.g. global competence).
        margin: how far below the best score still counts as a tie; None means one standard error
            of the best score (the largest, when several share it).

    Returns:
        The winner, and every agent that tied with the best (best score first).
    """
    best = max(score for score, _ in scored.values())
    if margin is None:
        margin = max(error for score, error in scored.values() if score == best)
    tied = sorted((a for a, (score, _) in scored.items() if score >= best - margin - 1e-12),
                  key=lambda a: -scored[a][0])
    return max(tied, key=lambda a: (*tiebreak.get(a, ()), scored[a][0], a)), tied


def choose_aggregator(profiles: Mapping[str, SkillProfile], competence: Mapping[str, float],
                      agents: Sequence[str], configured: str | None = None, *, margin: float | None = None) -> str:
    """The configured aggregator, else the best aggregation score, else the highest γ.

    Scores within one standard error of the best (``margin`` overrides it) are a near-tie: the
    benchmark cannot tell them apart, so global competence decides, then the score (equal γ: the
    better measured one), and the name only after that.
    """
    if configured:
        return configured
    scored = {a: evidence for a in agents if (evidence := aggregation_evidence(profiles.get(a))) is not None}
    if scored:
        return near_tie_best(scored, {a: (competence.get(a, 0.0),) for a in scored}, margin=margin)[0]
    return max(agents, key=lambda a: (competence.get(a, 0.0), a))


@dataclass(frozen=True)
class NodeAggregator:
    """Who aggregates one node under per-node choice, and why (one line for the explanation)."""

    agent: str
    reason: str
    estimate: float | None = None
    stderr: float | None = None

    def explain(self) -> str:
        """The explanation line."""
        return f"aggregator {self.agent} (per node): {self.reason}"


def node_aggregation_estimate(profile: SkillProfile, matches: Sequence[Match],
                              prior_items: float = NODE_PRIOR_ITEMS) -> tuple[float, float, float]:
    """An agent's expected aggregation accuracy on a node: (estimate, standard error, items of evidence).

    The benchmark's items that carry the node's matched skills (each skill once, weighted by the
    match's similarity) give ``correct / items``; it is shrunk toward the agent's overall
    aggregation score, which counts as ``m`` items: ``prior_items``, or the items it was measured
    on where fewer: ``(c + m·A) / (n + m)``. The standard error is Agresti-Coull's, as the overall
    score's: ``sqrt(q(1-q) / (n + m + 4))`` with ``q = (c + m·A + 2) / (n + m + 4)`` (``p(1-p)`` is
    0 for a perfect score: one lucky benchmark item read as certain and won the node).
    """
    overall = profile.aggregation_score or 0.0
    if profile.aggregation_items is not None:
        prior_items = min(prior_items, profile.aggregation_items)
    correct = items = 0.0
    seen: set[str] = set()
    for match in matches:
        skill = profile.aliases.get(match.skill, match.skill)
        if skill in seen:
            continue
        seen.add(skill)
        counts = profile.aggregation_skills.get(skill)
        if counts:
            correct += match.similarity * counts[0]
            items += match.similarity * counts[1]
    evidence = correct + prior_items * overall
    estimate = evidence / (items + prior_items) if items + prior_items else overall
    widened = (evidence + 2) / (items + prior_items + 4)
    return estimate, math.sqrt(widened * (1 - widened) / (items + prior_items + 4)), items


def node_aggregator(profiles: Mapping[str, SkillProfile], competence: Mapping[str, float],
                    recruitment: Recruitment, fallback: str, *,
                    prior_items: float = NODE_PRIOR_ITEMS) -> NodeAggregator:
    """Per-node aggregator recruiting: the best aggregation evidence among the agents that fit the node.

    An agent fits when its profile gives the node's skills a positive suitability (the recruiter's
    own ``s``, before any shift). Among the fitting agents with a measured aggregation score, the
    highest ``node_aggregation_estimate`` wins; estimates within one standard error of the best are
    a near-tie, broken by the better fit (higher ``s``), then global competence, then name. With no
    fitting agent measured (no skills matched, a fixed expert, old profiles without a score), the
    pool's best aggregator (``fallback``) aggregates.
    """
    fits = {c.agent: s for c in recruitment.candidates if (s := sum(x.score for x in c.contributions)) > 0}
    estimates = {agent: node_aggregation_estimate(profiles[agent], recruitment.matches, prior_items)
                 for agent in fits if aggregation_evidence(profiles.get(agent)) is not None}
    if not estimates:
        why = ("no skill matched" if not recruitment.matches
               else "no agent that fits this node has a measured aggregation score")
        return NodeAggregator(fallback, f"{why}; the pool's best aggregator")
    winner, tied = near_tie_best({a: (e[0], e[1]) for a, e in estimates.items()},
                                 {a: (fits[a], competence.get(a, 0.0)) for a in estimates})
    estimate, error, items = estimates[winner]
    overall = profiles[winner].aggregation_score or 0.0
    reason = (f"aggregation {estimate:.2f} ±{error:.2f} on this node's skills ({items:g} benchmark item(s), "
              f"overall {overall:.2f}), fit s={fits[winner]:+g}; best of {len(estimates)} fitting agent(s)")
    others = [a for a in tied if a != winner]
    if others:
        reason += f"; near tie with {', '.join(others)}, broken by fit, then γ"
    return NodeAggregator(winner, reason, estimate, error)
