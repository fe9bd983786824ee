"""Choosing a node's team (experts and aggregator) for the most expected accuracy per dollar.

A team's expected accuracy treats its experts as independent, with wrong answers that differ:
with two or more right answers the majority is right (an aggregator follows it); with exactly
one, the aggregator finds it with its aggregation skill ``A``; with none, the node is wrong. A
single expert needs no aggregator.

A team may be *staged*: when its first two experts are each estimated at least ``confidence``
on the query, they are asked first, and if they agree, the node's answer is theirs: no further
expert and no aggregation call. The expected cost counts that saving; the expected accuracy is
unchanged (two right answers already decide the majority).

The choice maximises ``expected accuracy - λ · expected cost / unit`` where ``unit`` is what one
call to the pool's priciest model is expected to cost (so λ = 0.05 means such a call must buy 5
points of accuracy), among teams of 1 to ``k`` distinct experts whose expected cost fits
``max_cost``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

CANDIDATES = 6
"""How many of the best-estimated experts team choice considers (teams up to k drawn from them)."""


@dataclass(frozen=True)
class Option:
    """An agent as a team member: its expected accuracy on the query and cost of one call."""

    agent: str
    accuracy: float
    cost: float


@dataclass(frozen=True)
class Team:
    """A chosen team and what it is expected to achieve and spend."""

    experts: tuple[str, ...]
    aggregator: str | None
    aggregation_skill: float | None
    expected_accuracy: float
    expected_cost: float
    staged: int
    """Experts asked first (2), whose agreement ends the node; 0 when all are asked at once."""
    utility: float
    over_cap: float | None = None
    """The cost cap no team fitted (this team is then the cheapest expert), else None."""
    aggregation_measured: bool = True
    """Whether the aggregator's ``aggregation_skill`` was measured (else it is assumed)."""


def majority_odds(accuracies: Sequence[float]) -> tuple[float, float]:
    """(P(at least two right), P(exactly one right)) for independent experts."""
    none = 1.0
    one = 0.0
    for p in accuracies:
        one = one * (1 - p) + none * p
        none *= 1 - p
    return 1 - none - one, one


def team_accuracy(accuracies: Sequence[float], aggregation_skill: float | None) -> float:
    """Expected accuracy of experts with these accuracies and an aggregator with this skill
    (None: one expert, no aggregator)."""
    if len(accuracies) == 1:
        return accuracies[0]
    two, one = majority_odds(accuracies)
    return two + one * (aggregation_skill or 0.0)


def team_cost(members: Sequence[Option], aggregation_cost: float, staged: bool) -> float:
    """Expected cost: every member and the aggregator, or, staged, the first two plus the rest
    only when those two do not both answer right."""
    if len(members) == 1:
        return members[0].cost
    everyone = sum(m.cost for m in members) + aggregation_cost
    if not staged:
        return everyone
    first, second = members[0], members[1]
    agree = first.accuracy * second.accuracy
    return first.cost + second.cost + (1 - agree) * (everyone - first.cost - second.cost)


def choose_team(experts: Sequence[Option], aggregators: Sequence[Option], *, k: int, cost_lambda: float,
                unit_cost: float, max_cost: float | None = None, confidence: float | None = 0.8) -> Team:
    """The team with the best utility (see the module docstring); ties go to the cheaper team.

    Args:
        experts: every candidate expert (its ``accuracy`` is its estimate on this query).
        aggregators: every candidate aggregator (its ``accuracy`` is its aggregation skill here,
            its ``cost`` that of one aggregation call); empty: teams of one only.
        k: the largest team.
        cost_lambda: λ; unit_cost: the cost unit (0: cost does not count).
        max_cost: the most a team may be expected to cost; when no team fits, the cheapest expert.
        confidence: the estimate both first experts need for a staged team (None: never staged).
    """
    scale = cost_lambda / unit_cost if unit_cost > 0 else 0.0
    by_accuracy = sorted(experts, key=lambda o: (-o.accuracy, o.cost, o.agent))[:CANDIDATES]
    by_value = sorted(experts, key=lambda o: (-(o.accuracy - scale * o.cost), o.cost, o.agent))[:CANDIDATES]
    shortlist = sorted({o.agent: o for o in [*by_accuracy, *by_value]}.values(),
                       key=lambda o: (-o.accuracy, o.cost, o.agent))
    frontier = pareto(aggregators)
    best: Team | None = None
    for size in range(1, max(1, k) + 1):
        for members in itertools.combinations(shortlist, size):
            for team in _teams(members, frontier, confidence):
                if max_cost is not None and team.expected_cost > max_cost + 1e-15:
                    continue
                team = replace(team, utility=team.expected_accuracy - scale * team.expected_cost)
                if best is None or team.utility > best.utility + 1e-12 or (
                        abs(team.utility - best.utility) <= 1e-12 and team.expected_cost < best.expected_cost):
                    best = team
    if best is None:  # nothing fits the cap: the cheapest single expert
        cheapest = min(experts, key=lambda o: (o.cost, -o.accuracy, o.agent))
        return Team((cheapest.agent,), None, None, cheapest.accuracy, cheapest.cost, 0,
                    cheapest.accuracy - scale * cheapest.cost, over_cap=max_cost)
    return best


def pareto(options: Sequence[Option]) -> list[Option]:
    """The options no other beats on both skill and cost (the only aggregators worth trying)."""
    kept: list[Option] = []
    for option in sorted(options, key=lambda o: (o.cost, -o.accuracy, o.agent)):
        if not kept or option.accuracy > kept[-1].accuracy:
            kept.append(option)
    return kept


def _teams(members: Sequence[Option], aggregators: Sequence[Option], confidence: float | None) -> list[Team]:
    accuracies = [m.accuracy for m in members]
    if len(members) == 1:
        m = members[0]
        return [Team((m.agent,), None, None, m.accuracy, m.cost, 0, 0.0)]
    staged = confidence is not None and min(accuracies[:2]) >= confidence
    teams = []
    for aggregator in aggregators:
        accuracy = team_accuracy(accuracies, aggregator.accuracy)
        cost = team_cost(members, aggregator.cost, staged)
        teams.append(Team(tuple(m.agent for m in members), aggregator.agent, aggregator.accuracy, accuracy, cost,
                          2 if staged else 0, 0.0))
    return teams
