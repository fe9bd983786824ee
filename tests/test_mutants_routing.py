"""Routing details the other tests left open (each found by a surviving one-line mutant): the rare-expert
filter's pool, tie-breaks, team choice at its edges, calibration, keyword matching and extraction, the frontier."""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import pytest

from orchestra import Orchestra
from orchestra.calibration import AgentSkills, Calibration
from orchestra.frontier import SweepPoint, asweep, frontier_html, mark_frontier
from orchestra.matching import EmbeddingMatcher, LexicalMatcher, Match
from orchestra.models import ChatResult
from orchestra.profile import Provenance, SkillProfile
from orchestra.profiling import build_profiles
from orchestra.recruit import (
    Candidate,
    RecruitConfig,
    Recruiter,
    Recruitment,
    SkillTable,
    choose_aggregator,
    node_aggregator,
)
from orchestra.skills import SkillExtractor
from orchestra.teams import Option, choose_team, pareto
from orchestra.testing import LoopbackRequest, Reply
from orchestra.testing.simulation import specialist_pool

PROVENANCE = Provenance(dataset="val.jsonl", dataset_sha256="0" * 64, items=40, model="test")


def profile(agent: str, skills: dict[str, int], *, accuracy: float = 0.5, aggregation: float | None = None,
            stderr: float | None = None) -> SkillProfile:
    return SkillProfile(agent=agent, skills=skills, accuracy=accuracy, aggregation_score=aggregation,
                        aggregation_stderr=stderr, provenance=PROVENANCE)


def recruiter(profiles: dict[str, SkillProfile], config: RecruitConfig | None = None,
              costs: dict[str, tuple[float, float]] | None = None) -> Recruiter:
    config = config or RecruitConfig()
    return Recruiter(SkillTable.build(list(profiles), profiles, {}, {}, config, costs=costs), config)


def on(*skills: str) -> list[Match]:
    return [Match(s, s, 1.0) for s in skills]


def chosen(experts: tuple[str, ...], probabilities: dict[str, float], mode: str) -> Recruitment:
    return Recruitment(experts=experts, keywords=(), matches=(), mode=mode,
                       candidates=tuple(Candidate(a, 1.0, 1.0, 1.0, p, p, ()) for a, p in probabilities.items()))


# --- symbolic-moe and the other drawing modes --------------------------------------------------


def test_the_only_agent_with_weight_is_drawn_k_times() -> None:
    """symbolic-moe draws k experts with replacement: a single agent with weight fills all k places."""
    r = recruiter({"A": profile("A", {"algebra": 2}), "B": profile("B", {"algebra": -1})})
    assert r.recruit(["algebra"], on("algebra"), seed=4, k=3).experts == ("A", "A", "A")


def test_equally_weighted_candidates_are_ranked_by_name_whatever_the_pool_order() -> None:
    """Ties in selection probability are broken by the agent's name, not by the pool's order."""
    same = {"algebra": 2}
    for order in (["B", "A"], ["A", "B"]):
        r = recruiter({name: profile(name, same) for name in order})
        assert [c.agent for c in r.candidates(on("algebra"))] == ["A", "B"]
        assert r.recruit(["algebra"], on("algebra"), seed=0, k=1, mode="topk").experts == ("A",)


# --- the rare-expert filter --------------------------------------------------------------------


def test_a_rare_expert_is_never_replaced_by_a_light_agent_nobody_chose() -> None:
    """The filter resamples among agents the batch chose; a light agent it never chose is no replacement."""
    r = recruiter({name: profile(name, {"law": 1}) for name in ("F", "R", "X")})
    probabilities = {"F": 0.05, "R": 0.9, "X": 0.05}
    batch = [chosen(("F",), probabilities, "calibrated")] * 24 + [chosen(("X",), probabilities, "calibrated")]
    for seed in range(10):
        filtered = r.filter_rare(batch, seed=seed, light={"R"})
        assert filtered[-1].experts == ("F",) and "replaced X" in filtered[-1].notes[-1]


def test_without_weight_on_the_instance_a_rare_expert_is_replaced_by_how_often_the_others_are_chosen() -> None:
    """With no frequent agent weighted on the instance, replacements follow the batch's choice counts."""
    agents = ["F1", "F2", *(f"r{i}" for i in range(30))]
    r = recruiter({name: profile(name, {"x": 1}) for name in agents})

    def only(expert: str) -> Recruitment:
        return chosen((expert,), {a: (1.0 if a == expert else 0.0) for a in agents}, "symbolic-moe")

    batch = [only("F1")] * 60 + [only("F2")] * 10 + [only(f"r{i}") for i in range(30)]
    filtered = r.filter_rare(batch, seed=0)
    replacements = Counter(f.experts[0] for f in filtered[70:])
    assert set(replacements) <= {"F1", "F2"}
    assert replacements["F1"] >= 3 * replacements["F2"]  # chosen 60 times to 10: mostly F1 (uniform: about half)


# --- aggregator choice ------------------------------------------------------------------------


def test_several_agents_at_the_best_score_count_the_largest_error_as_the_near_tie_margin() -> None:
    """When several agents share the best aggregation score, the widest of their errors sets the near-tie margin."""
    profiles = {"a": profile("a", {}, aggregation=0.80, stderr=0.01), "b": profile("b", {}, aggregation=0.80, stderr=0.10),
                "c": profile("c", {}, aggregation=0.75, stderr=0.0)}
    assert choose_aggregator(profiles, {"a": 0.2, "b": 0.1, "c": 0.7}, ["a", "b", "c"]) == "c"


def test_without_aggregation_scores_equal_competence_goes_to_the_same_agent_whatever_the_order() -> None:
    """The fallback choice by γ breaks ties by name, so the pool's order does not decide."""
    competence = {"a": 0.5, "b": 0.5}
    assert choose_aggregator({}, competence, ["a", "b"]) == choose_aggregator({}, competence, ["b", "a"]) == "b"


def test_a_per_node_near_tie_goes_to_the_better_fit_before_global_competence() -> None:
    """Per-node aggregator near-ties are broken by the fit to the node's skills first, γ second."""
    profiles = {"fit": profile("fit", {"chemistry": 12}, aggregation=0.8, stderr=0.06),
                "broad": profile("broad", {"chemistry": 3, "history": 30}, aggregation=0.8, stderr=0.06)}
    r = recruiter(profiles)
    assert r.table.competence["broad"] > r.table.competence["fit"]
    recruitment = r.recruit(["chemistry"], on("chemistry"), seed=0, k=2, mode="topk")
    choice = node_aggregator(profiles, r.table.competence, recruitment, "broad")
    assert choice.agent == "fit" and "near tie with broad" in choice.reason


# --- calibrated teams -------------------------------------------------------------------------


def test_the_cost_unit_is_one_answer_of_the_priciest_model_not_its_aggregation_call() -> None:
    """λ is measured against one answer from the priciest model, whatever aggregation calls cost."""
    profiles = {"accurate": profile("accurate", {"x": 1}, accuracy=0.80),
                "cheap": profile("cheap", {"x": 1}, accuracy=0.77)}
    costs = {"accurate": (0.01, 0.01), "cheap": (0.001, 1.0)}  # (one answer, one aggregation call)
    r = recruiter(profiles, RecruitConfig(cost_lambda=0.05, confidence=1.0), costs=costs)
    # 0.80 - 0.05 * 0.01 / 0.01 < 0.77 - 0.05 * 0.001 / 0.01: the 3 points do not pay for the price
    assert r.team([], 1)[1].experts == ("cheap",)


def test_a_cheap_expert_outside_the_most_accurate_six_is_still_considered() -> None:
    """Team choice shortlists the best value experts too, not only the six most accurate."""
    experts = [Option(f"e{i}", 0.90 - i / 100, 1.0) for i in range(6)] + [Option("cheap", 0.80, 0.01)]
    team = choose_team(experts, [], k=1, cost_lambda=0.5, unit_cost=1.0)
    assert team.experts == ("cheap",)


def test_equal_utility_and_cost_keep_the_first_team_considered() -> None:
    """Exact ties in utility and cost go to the first team considered (the more accurate, then by name)."""
    experts = [Option("b", 0.5, 0.0), Option("a", 0.5, 0.0)]
    assert choose_team(experts, [], k=1, cost_lambda=0.0, unit_cost=0.0).experts == ("a",)


def test_over_the_cap_the_cheapest_expert_is_the_most_accurate_of_the_cheapest() -> None:
    """When no team fits the cost cap, cost ties among the cheapest go to the more accurate expert."""
    experts = [Option("a", 0.6, 1.0), Option("b", 0.9, 1.0), Option("c", 0.99, 2.0)]
    team = choose_team(experts, [], k=1, cost_lambda=0.0, unit_cost=2.0, max_cost=0.5)
    assert team.experts == ("b",) and team.over_cap == 0.5


def test_experts_exactly_at_the_confidence_threshold_are_staged() -> None:
    """A team is staged when both first experts are estimated at least ``confidence`` (the bound included)."""
    experts = [Option("a", 0.8, 0.001), Option("b", 0.8, 0.001)]
    team = choose_team(experts, [Option("a", 0.9, 0.001)], k=2, cost_lambda=0.0, unit_cost=0.001, confidence=0.8)
    assert team.experts == ("a", "b") and team.staged == 2


def test_a_team_is_staged_only_when_both_first_experts_are_confident() -> None:
    """One confident expert beside an unsure one does not make a staged team."""
    experts = [Option("a", 0.9, 0.001), Option("b", 0.6, 0.001)]
    team = choose_team(experts, [Option("a", 0.9, 0.001)], k=2, cost_lambda=0.0, unit_cost=0.001, confidence=0.8)
    assert team.experts == ("a", "b") and team.staged == 0
    assert team.expected_cost == pytest.approx(0.003)  # every call: no early stop counted


def test_pareto_keeps_only_aggregators_no_other_beats_on_skill_and_cost() -> None:
    """An aggregator as skilled as a cheaper one, or less skilled at the same price, is dropped."""
    options = [Option("dear", 0.8, 2.0), Option("cheap", 0.8, 1.0), Option("a_weak", 0.6, 1.0), Option("top", 0.9, 3.0)]
    assert [o.agent for o in pareto(options)] == ["cheap", "top"]


# --- calibration ------------------------------------------------------------------------------


def test_an_old_profiles_negative_net_score_counts_as_wrong_answers() -> None:
    """A profile without pooled counts reads a net score of -4 as 0 right of 4, pulling its estimate down."""
    old = profile("old", {"history": -4, "law": 3}, accuracy=0.6)
    skills = AgentSkills.of(old)
    assert skills.counts == {"history": (0.0, 4.0), "law": (3.0, 3.0)}
    calibration = Calibration({"old": skills})
    assert calibration.estimate("old", "history")[0] == pytest.approx(4 * 0.6 / 8)


def test_a_querys_deviation_is_the_weighted_mean_of_its_skills_deviations() -> None:
    """A query's standard deviation averages the matched skills' deviations by each skill's weight."""
    calibration = Calibration({"s": AgentSkills(0.5, {"alg": (18, 20), "geo": (2, 3)}),
                               "g": AgentSkills(0.5, {"alg": (10, 20), "geo": (2, 3)})})
    _, sd, parts = calibration.query("s", [Match("alg", "alg", 1.0), Match("geo", "geo", 0.5)])
    assert len(parts) == 2 and parts[0].stderr != parts[1].stderr
    expected = sum(p.weight * p.stderr for p in parts) / sum(p.weight for p in parts)
    assert sd == pytest.approx(expected)


def test_separation_is_the_population_spread_of_log_odds_shifts_less_sampling_noise() -> None:
    """A skill's separation, by hand: the spread over the agents (divided by their number) less the noise."""
    calibration = Calibration({"s": AgentSkills(0.5, {"alg": (18, 20)}), "g": AgentSkills(0.5, {"alg": (10, 20)})})
    # estimates (18 + 2) / 24 = 5/6 and (10 + 2) / 24 = 1/2: shifts ln 5 and 0; noise 20 / (24² p(1-p))
    spread = (math.log(5) / 2) ** 2
    noise = (20 / (576 * 5 / 36) + 20 / (576 / 4)) / 2
    assert calibration.separation("alg") == pytest.approx(math.sqrt(spread - noise))


# --- keyword matching -------------------------------------------------------------------------

VOCABULARY = ["algebra", "geometry", "organic chemistry", "python programming", "european history", "probability"]


def test_unrelated_keywords_that_share_a_few_letters_map_to_nothing() -> None:
    """The default lexical matcher (threshold 0.3, unseen n-grams weighed as the rarest) leaves these unmatched."""
    matcher = LexicalMatcher()
    assert asyncio.run(matcher.match(["grammar", "geology", "probate law", "painting", "chess"], VOCABULARY)) == []


def test_keywords_match_whatever_their_case() -> None:
    """Lexical matching is case-blind: a shouted keyword is its skill exactly."""
    assert LexicalMatcher().nearest("ALGEBRA", VOCABULARY) == Match("ALGEBRA", "algebra", 1.0)


def test_equally_similar_skills_go_to_the_first_in_the_vocabulary() -> None:
    """A tie in similarity is won by the skill listed first."""
    assert LexicalMatcher().nearest("algebra", ["Algebra", "algebra"]) == Match("algebra", "Algebra", 1.0)


def test_a_keyword_at_exactly_the_threshold_is_matched() -> None:
    """``min_similarity`` is inclusive (here a similarity of exactly 1, computed without rounding error)."""
    matcher = LexicalMatcher(min_similarity=1.0, sizes=(2,))  # "abc": four distinct bigrams, weight 1/2 each
    assert matcher.nearest("abc", ["abc"]) == Match("abc", "abc", 1.0)


def test_a_matcher_used_on_another_vocabulary_matches_against_that_one() -> None:
    """A matcher reused with a new vocabulary rebuilds its index and forgets its earlier matches."""
    matcher = LexicalMatcher()
    assert matcher.nearest("chemistry", ["organic chemistry", "algebra"]) is not None
    assert matcher.nearest("chemistry", ["algebra", "geometry"]) is None
    assert matcher.nearest("geometric", ["algebra", "geometry"]).skill == "geometry"  # type: ignore[union-attr]


def test_an_embedding_at_exactly_the_threshold_is_matched(loopback) -> None:
    """The embedding matcher's ``min_similarity`` is inclusive too (an exact cosine of 1)."""
    axes = {"equations": [2, 0], "algebra": [1, 0], "geometry": [0, 1]}

    def embeddings(request: LoopbackRequest) -> Reply:
        inputs = request.json()["input"]
        return Reply(body={"data": [{"index": i, "embedding": axes[t]} for i, t in enumerate(inputs)]})

    server = loopback(embeddings)
    matcher = EmbeddingMatcher(model="mini", base_url=server.url + "/v1", min_similarity=1.0)
    found = asyncio.run(matcher.match(["equations"], ["algebra", "geometry"]))
    assert found == [Match("equations", "algebra", 1.0)]


# --- keyword extraction -----------------------------------------------------------------------


def test_the_last_keywords_line_of_a_text_answer_is_the_answer() -> None:
    """With several ``Keywords:`` lines (an echoed example, then the reply), the last one is read."""
    text = "For example, Keywords: arithmetic\nSo for this question:\nKeywords: optics, music"
    assert SkillExtractor().parse(ChatResult(text=text)) == ["optics", "music"]


# --- the accuracy/cost frontier ---------------------------------------------------------------


def point(method: str, accuracy: float, cost: float, failed: int = 0) -> SweepPoint:
    return SweepPoint(method=method, cost_lambda=None, accuracy=accuracy, cost_usd=cost, cost_per_item_usd=cost / 10,
                      cost_per_correct_usd=None, calls=10, saved_calls=0, items=10, failed=failed)


def test_an_unfinished_method_is_off_the_frontier_and_beats_nothing() -> None:
    """A method a budget stopped neither sits on the frontier nor pushes finished methods off it."""
    points = [point("cut", 0.9, 0.001, failed=3), point("whole", 0.5, 0.01)]
    mark_frontier(points)
    assert [p.on_frontier for p in points] == [False, True]


def test_the_frontier_line_is_drawn_from_the_cheapest_point_up() -> None:
    """The plotted frontier joins its points in order of cost per item, whatever the order of the sweep."""
    points = [point("dear", 0.9, 1.0), point("cheap", 0.5, 0.01), point("middle", 0.7, 0.1)]
    mark_frontier(points)
    page = frontier_html(points, "t")
    line = page.split('<polyline points="')[1].split('"')[0]
    xs = [float(pair.split(",")[0]) for pair in line.split()]
    assert len(xs) == 3 and xs == sorted(xs)


def test_a_sweeps_own_lambda_wins_over_a_cost_lambda_given_for_the_other_methods() -> None:
    """``--cost-lambda`` beside a sweep weighs prices in the other methods only: each calibrated point keeps its λ."""
    sim = specialist_pool(seed=0)
    pool = sim.pool()
    pool.profiles = build_profiles(pool, sim.items(15), seed=0).profiles
    orc = Orchestra(pool, k=3, plan=False, store=False)
    items = sim.items(4, offset=1000)

    def calibrated_cost(lam: float, **overrides: object) -> float:
        points = asyncio.run(asweep(orc, items, lambdas=[lam], methods=["single"], **overrides))
        return points[-1].cost_usd

    free, dear = calibrated_cost(0.0), calibrated_cost(5.0)
    assert free != dear  # (λ changes the teams here)
    assert calibrated_cost(0.0, recruit={"cost_lambda": 5.0}) == free
