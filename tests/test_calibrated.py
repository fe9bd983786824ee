"""The calibrated router: skill estimates, merged variants, cost-aware teams and confident early stops."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orchestra import Agent, Orchestra, Pool, RecruitConfig
from orchestra.calibration import AgentSkills, Calibration, posterior
from orchestra.datasets import Dataset
from orchestra.errors import BadResponse, ConfigError
from orchestra.grading import AutoGrader
from orchestra.matching import Match
from orchestra.models import ChatRequest, FunctionModel
from orchestra.profile import Provenance, SkillProfile, load_profiles
from orchestra.profiling import build_profiles
from orchestra.recruit import Candidate, Recruiter, Recruitment, SkillTable
from orchestra.result import RunResult
from orchestra.teams import Option, choose_team, majority_odds, team_accuracy, team_cost
from orchestra.testing.simulation import SimulatedPool, specialist_pool
from orchestra.variants import merge_variants, pooled_counts


def test_a_posterior_is_shrunk_toward_overall_accuracy_by_how_little_evidence_there_is() -> None:
    assert posterior(0, 0, 0.6) == (pytest.approx(0.6), pytest.approx(math.sqrt(0.24 / 5)))
    few, few_sd = posterior(3, 3, 0.4)  # three right answers barely move an agent...
    many, many_sd = posterior(30, 30, 0.4)  # ...thirty decide
    assert few == pytest.approx((3 + 4 * 0.4) / 7)
    assert few < 0.7 < 0.9 < many
    assert many_sd < few_sd


def test_extreme_and_cold_agents_get_estimates_the_router_can_use() -> None:
    perfect = Calibration({"a": AgentSkills(1.0, {"x": (5, 5)}), "b": AgentSkills(0.5, {})})
    assert 0 < perfect.query("a", [Match("x", "x", 1.0)])[0] <= 0.98  # (no division by zero at accuracy 1)
    assert perfect.query("a", [])[0] == 0.98  # no matched skill: the overall accuracy, kept off certainty
    # an agent not yet profiled counts each declared skill as one right answer of one
    cold = Calibration({"m": AgentSkills(0.5, {"law": (2, 4)}), "c": AgentSkills.of(None, ["Law"])})
    assert cold.estimate("c", "law")[0] == pytest.approx(0.6)


def test_a_query_weighs_each_skill_by_match_and_separation_and_counts_a_skill_once() -> None:
    agents = {"s": AgentSkills(0.5, {"alg": (18, 20), "geo": (2, 20)}),
              "g": AgentSkills(0.5, {"alg": (10, 20), "geo": (10, 20)})}
    calibration = Calibration(agents)
    weak_geo = calibration.query("s", [Match("alg", "alg", 1.0), Match("geo", "geo", 0.1)])[0]
    assert weak_geo > 0.7  # a barely similar keyword barely pulls the specialist's estimate down
    one = calibration.query("s", [Match("alg", "alg", 1.0), Match("geo", "geo", 1.0)])
    two = calibration.query("s", [Match("alg", "alg", 1.0), Match("algebra", "alg", 1.0), Match("geo", "geo", 1.0)])
    assert len(two[2]) == 2 and two[0] == pytest.approx(one[0])  # two keywords of one skill count once
    [part] = calibration.query("s", [Match("alg", "alg", 1.0)])[2]
    assert part.weight == pytest.approx(max(calibration.separation("alg"), 0.05) ** 2)


def test_variants_merge_by_name_unless_the_agents_results_tell_them_apart() -> None:
    item_keywords = {f"o{i}": ["organic chemistry"] for i in range(6)}
    item_keywords.update({f"c{i}": ["organic chem"] for i in range(4)})
    item_keywords.update({f"n{i}": ["inorganic chemistry"] for i in range(6)})
    item_keywords.update({f"r{i}": ["reasoning"] for i in range(3)})
    # "alice" knows organic chemistry under both names and fails inorganic: the names are close,
    # the evidence is not
    alice = {i: not i.startswith("n") for i in item_keywords}
    bob = {i: i.startswith("n") for i in item_keywords}
    vocabulary = asyncio.run(merge_variants(item_keywords, {"alice": alice, "bob": bob}))
    assert vocabulary.canonical("organic chem") == "organic chemistry"
    assert vocabulary.canonical("inorganic chemistry") == "inorganic chemistry"
    assert vocabulary.canonical("reasoning") == "reasoning"
    assert vocabulary.merged == {"organic chemistry": ["organic chem"]}
    assert vocabulary.explain() == ["organic chemistry <- organic chem (0.77)"]
    # evidence is pooled: 10 items on organic chemistry, one count per item
    assert pooled_counts(item_keywords, alice, vocabulary)["organic chemistry"] == (10, 10)
    # without the evidence check, the names alone would merge inorganic too
    loose = asyncio.run(merge_variants(item_keywords, {"alice": alice, "bob": bob}, max_z=100))
    assert loose.canonical("inorganic chemistry") == "organic chemistry"
    assert asyncio.run(merge_variants(item_keywords, {"alice": alice}, threshold=1)).merged == {}


def test_a_generic_keyword_does_not_dilute_a_topic_that_separates_the_agents() -> None:
    agents = {
        "specialist": AgentSkills(0.4, {"algebra": (18, 20), "reasoning": (32, 80)}),
        "generalist": AgentSkills(0.65, {"algebra": (13, 20), "reasoning": (52, 80)}),
    }
    calibration = Calibration(agents)
    both = [Match("algebra", "algebra", 1.0), Match("reasoning", "reasoning", 1.0)]
    specialist, _, parts = calibration.query("specialist", both)
    generalist, _, _ = calibration.query("generalist", both)
    topic_alone = calibration.estimate("specialist", "algebra")[0]
    # a plain average of the two skills would give (0.83 + 0.4) / 2 = 0.62, below the generalist
    assert specialist == pytest.approx(topic_alone, abs=0.03)
    assert specialist > generalist
    assert [p.skill for p in parts] == ["algebra", "reasoning"]
    assert parts[0].weight > 10 * parts[1].weight
    # no matched skill: the overall accuracy
    assert calibration.query("generalist", [])[0] == pytest.approx(0.65)


def test_team_odds_and_costs() -> None:
    two, one = majority_odds([0.9, 0.8, 0.5])
    assert two == pytest.approx(0.9 * 0.8 + 0.9 * 0.2 * 0.5 + 0.1 * 0.8 * 0.5)
    assert one == pytest.approx(0.9 * 0.2 * 0.5 + 0.1 * 0.8 * 0.5 + 0.1 * 0.2 * 0.5)
    assert team_accuracy([0.9, 0.8, 0.5], 0.6) == pytest.approx(two + 0.6 * one)
    assert team_accuracy([0.7], None) == 0.7
    members = [Option("a", 0.9, 1.0), Option("b", 0.8, 2.0), Option("c", 0.5, 4.0)]
    assert team_cost(members, 8.0, staged=False) == 15.0
    # staged: the third expert and the aggregator only when a and b are not both right
    assert team_cost(members, 8.0, staged=True) == pytest.approx(3.0 + (1 - 0.72) * 12.0)


def test_team_choice_trades_accuracy_for_cost() -> None:
    experts = [Option("spec", 0.9, 0.001), Option("spec2", 0.88, 0.001), Option("gen", 0.7, 0.05),
               Option("weak", 0.3, 0.001)]
    aggregators = [Option("gen", 0.95, 0.1), Option("spec", 0.6, 0.002)]
    free = choose_team(experts, aggregators, k=3, cost_lambda=0, unit_cost=0.05)
    assert free.aggregator == "gen" and "gen" in free.experts  # no price: the most accuracy
    thrifty = choose_team(experts, aggregators, k=3, cost_lambda=0.05, unit_cost=0.05)
    assert {"spec", "spec2"} <= set(thrifty.experts) and "gen" not in thrifty.experts
    assert thrifty.staged == 2 and thrifty.expected_cost < free.expected_cost
    miser = choose_team(experts, aggregators, k=3, cost_lambda=5, unit_cost=0.05)
    assert miser.experts == ("spec",) and miser.aggregator is None
    capped = choose_team(experts, aggregators, k=3, cost_lambda=0, unit_cost=0.05, max_cost=0.0025)
    assert capped.expected_cost <= 0.0025 and "gen" not in capped.experts and capped.over_cap is None
    beyond = choose_team(experts, aggregators, k=3, cost_lambda=0, unit_cost=0.05, max_cost=0.0005)
    assert beyond.experts == ("spec",) and beyond.over_cap == 0.0005  # the cheapest, best of the cheap, said so
    recruitment = Recruitment(experts=beyond.experts, keywords=(), matches=(), mode="calibrated",
                              candidates=(Candidate("spec", 0.9, 0.9, 1.0, 0.9, 1.0, (), cost=0.001),), team=beyond)
    assert recruitment.explain()[-1].endswith("; no team fits the cost cap ($0.0005 per item): the cheapest expert alone")
    assert recruitment.to_dict()["team"]["over_cap_usd"] == 0.0005  # type: ignore[index]
    never_staged = choose_team(experts, aggregators, k=3, cost_lambda=0.05, unit_cost=0.05, confidence=None)
    assert never_staged.staged == 0


def _profile(agent: str, accuracy: float, skills: dict[str, int]) -> SkillProfile:
    return SkillProfile(agent=agent, skills=skills, accuracy=accuracy,
                        provenance=Provenance(dataset="v", dataset_sha256="x", items=10, model="m"))


def test_profiles_from_before_calibration_still_route_by_their_net_scores() -> None:
    profiles = {"chem": _profile("chem", 0.5, {"chemistry": 6, "history": -4}),
                "hist": _profile("hist", 0.5, {"chemistry": -5, "history": 5})}
    table = SkillTable.build(list(profiles), profiles, {}, {}, RecruitConfig())
    recruiter = Recruiter(table)
    pick = recruiter.recruit(["chemistry"], [Match("chemistry", "chemistry", 1.0)], seed=0, k=1, mode="calibrated")
    assert pick.experts == ("chem",)
    pick = recruiter.recruit(["history"], [Match("history", "history", 1.0)], seed=0, k=1, mode="calibrated")
    assert pick.experts == ("hist",)


@pytest.mark.parametrize(("change", "message"), [
    ({"skill_counts": {"arithmetic": [9, 3]}}, "skill_counts.arithmetic: 9 correct of 3 items"),
    ({"skill_counts": {"arithmetic": [-3, 8]}}, "skill_counts.arithmetic.0: Input should be greater than or equal to 0"),
    ({"aggregation_skills": {"math": [9, 2]}}, "aggregation_skills.math: 9 correct of 2 items"),
    ({"estimates": {"math": [5.0, 0.1]}}, "estimates.math.0: Input should be less than or equal to 1"),
    ({"estimates": {"math": [0.5, -0.1]}}, "estimates.math.1: Input should be greater than or equal to 0"),
    ({"answer_tokens": [-1, 20]}, "answer_tokens.0: Input should be greater than or equal to 0"),
    # (an infinite mean made every other agent's cost nothing beside it: λ weighed nothing)
    ({"answer_tokens": [math.inf, 3]}, "answer_tokens.0: Input should be a finite number"),
    ({"estimates": {"math": [math.nan, 0.1]}}, "estimates.math.0: Input should be a finite number"),
    ({"version": 99}, "version: profile version 99 was written by a newer Orchestra"),
])
def test_a_profile_with_impossible_numbers_is_refused_when_it_loads(tmp_path: Path, change: dict[str, Any],
                                                                    message: str) -> None:
    # (counts beyond their items made a calibrated run fail on a math domain error, item after item)
    path = tmp_path / "math.json"
    path.write_text(json.dumps({**json.loads(_profile("math", 0.5, {"math": 2}).model_dump_json()), **change}))
    with pytest.raises(ConfigError) as refused:
        SkillProfile.load(path)
    assert str(refused.value).startswith(f"{path}: invalid skill profile: {message}")


def test_a_profile_that_is_not_json_is_refused_without_an_empty_location(tmp_path: Path) -> None:
    (tmp_path / "math.json").write_text("{")
    with pytest.raises(ConfigError, match=r"math.json: invalid skill profile: Invalid JSON: EOF"):
        SkillProfile.load(tmp_path / "math.json")


def test_a_profile_saved_in_another_encoding_is_one_line_and_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    text = _profile("math", 0.5, {"math": 2}).model_dump_json()
    (tmp_path / "math.json").write_text(text, encoding="utf-16")  # (an editor's "Unicode": a traceback before)
    with pytest.raises(ConfigError, match=r"math.json: invalid skill profile: not UTF-8 text \(byte 0xff at offset 0\)"):
        SkillProfile.load(tmp_path / "math.json")
    (tmp_path / "math.json").write_text(text, encoding="utf-8-sig")
    assert SkillProfile.load(tmp_path / "math.json").skills == {"math": 2}


def test_two_profiles_of_one_agent_are_refused_rather_than_one_chosen_by_file_name(tmp_path: Path) -> None:
    _profile("bio", 0.9, {"biology": 5}).save(tmp_path)
    (tmp_path / "bio.v1.json").write_text(_profile("bio", 0.1, {"biology": -5}).model_dump_json())
    with pytest.raises(ConfigError, match=r"bio.json and bio.v1.json both profile agent 'bio'; keep one"):
        load_profiles(tmp_path)


# --- the market of specialists and generalists -----------------------------------------------


def _run(orc: Orchestra, items: Dataset, **overrides: object) -> tuple[float, float, list[RunResult]]:
    results = orc.run_many([item.prompt() for item in items], **overrides)
    grader = AutoGrader()
    accuracy = sum(grader.grade(r.answer or "", item) for r, item in zip(results, items)) / len(items)
    return accuracy, sum(r.usage.cost_usd for r in results), results


@pytest.fixture(scope="module")
def market() -> tuple[SimulatedPool, Orchestra, Dataset]:
    sim = specialist_pool(seed=0)
    pool = sim.pool()
    report = build_profiles(pool, sim.items(15), seed=0)
    pool.profiles = report.profiles
    # keyword variants were merged into the topics they name
    assert report.vocabulary.canonical("organic chem") == report.vocabulary.canonical("organic chemistry")
    assert report.vocabulary.canonical("basic algebra") == "algebra"
    profile = report.profiles["spec3"]
    assert profile.skill_counts["algebra"][1] > max(n for k, (_, n) in profile.skill_counts.items()
                                                    if k in ("reasoning", "facts"))
    return sim, Orchestra(pool, k=3, plan=False, store=False), sim.items(40, offset=1000)


def test_the_default_router_recruits_specialists_and_beats_moa_at_a_fraction_of_its_cost(market) -> None:
    sim, orc, held_out = market
    default_accuracy, default_cost, results = _run(orc, held_out)
    moa_accuracy, moa_cost, _ = _run(orc, held_out, mode="global")
    exact_accuracy, _, exact = _run(orc, held_out, mode="symbolic-moe")
    best = sim.best_routing_accuracy(held_out)

    called = [o.agent for r in results for node in r.plan.nodes for o in node.expert_outputs]
    assert sum(e.startswith("spec") for e in called) / len(called) > 0.6  # a generalist may back them up
    exact_slots = [e for r in exact for node in r.plan.nodes for e in node.experts]
    assert sum(e.startswith("spec") for e in exact_slots) / len(exact_slots) < 0.2  # the paper's γ drowns skill
    assert default_accuracy > moa_accuracy + 0.01
    assert default_accuracy > exact_accuracy + 0.1
    assert default_cost <= 0.2 * moa_cost
    assert default_accuracy >= best - 0.03
    # a topic's own specialists are on its team, mostly at its head (estimates are noisy; a few
    # items' keywords missed the topic)
    teams = [(result.plan.nodes[0].experts, item.category or "") for result, item in zip(results, held_out)]
    assert sum(any(sim.accuracy[e][topic] == 0.9 for e in experts) for experts, topic in teams) >= 0.95 * len(teams)
    assert sum(sim.accuracy[experts[0]][topic] == 0.9 for experts, topic in teams) >= 0.8 * len(teams)
    assert sum(node.saved_calls for r in results for node in r.plan.nodes) > len(held_out) // 2


def test_confident_experts_who_agree_end_the_node_without_more_calls(market) -> None:
    _, orc, held_out = market
    pool = orc.pool
    item = held_out.items[0]
    before = {a.name: len(a.model.requests) for a in pool.agents}
    result = orc.run(item.prompt())
    node = result.plan.nodes[0]
    team = node.recruitment["team"]
    called = {a.name: len(a.model.requests) - before[a.name] for a in pool.agents}
    assert team["staged"] == 2 and len(team["experts"]) == 3
    answers = [o.text for o in node.expert_outputs]
    if len({AutoGrader().extract(t) for t in answers}) == 1:
        assert sum(called.values()) == 2 and node.saved_calls == 2 and node.aggregator is None
        assert result.usage.calls == 2 + 5  # two experts and five keyword samples
    else:
        assert sum(called.values()) == 4 and node.saved_calls == 0
    assert any("asked first" in line for line in node.recruitment["explanation"])


def test_show_tells_which_experts_a_confident_team_did_not_need(market, tmp_path: Path) -> None:
    from rich.console import Console

    from orchestra.inspect import show_run
    from orchestra.store import RunStore

    _, orc, held_out = market
    stored = Orchestra(orc.pool, k=3, plan=False, store=tmp_path / "runs.db")
    results = stored.run_many([item.prompt() for item in held_out.items[:8]])
    early = next(r for r in results if r.plan.nodes[0].saved_calls)
    node = early.plan.nodes[0]
    asked = [o.agent for o in node.expert_outputs]
    left = [e for e in node.recruitment["team"]["experts"] if e not in asked]
    console = Console(record=True, width=300)
    show_run(console, RunStore(tmp_path / "runs.db"), early.run_id)
    shown = console.export_text()
    assert f"{', '.join(asked)} (not asked: {', '.join(left)})" in shown
    assert f"{node.recruitment['team']['aggregator']} (not needed)" in shown  # (the node itself names none)
    assert "answer: stopped early: its first 2 experts agreed, so 2 calls (the other experts and the aggregation)" \
           " were not made" in shown
    from orchestra.inspect import run_report

    report = run_report(RunStore(tmp_path / "runs.db"), early.run_id)  # `show --json` says it too
    [row] = report["nodes"]
    assert (row["not_asked"], row["saved_calls"]) == (left, 2) and row["experts"] == [*asked, *left]
    everyone = next(r for r in results if not r.plan.nodes[0].saved_calls)
    [row] = run_report(RunStore(tmp_path / "runs.db"), everyone.run_id)["nodes"]
    assert (row["not_asked"], row["saved_calls"]) == ([], 0) and len(row["experts"]) == 3
    # a team of two that agreed saved the aggregation alone ("1 call (the other experts and the aggregation)
    # were not made", with no other experts)
    pair = Orchestra(orc.pool, k=2, plan=False, store=tmp_path / "pairs.db")
    agreed = next(r for r in pair.run_many([item.prompt() for item in held_out.items[:8]])
                  if r.plan.nodes[0].saved_calls)
    console = Console(record=True, width=300)
    show_run(console, RunStore(tmp_path / "pairs.db"), agreed.run_id)
    assert "answer: stopped early: its first 2 experts agreed, so 1 call (the aggregation) was not made" \
        in console.export_text()


def confident_pool(failing: str = "", unsure: str = "",
                   answers: dict[str, str] | None = None) -> tuple[Pool, dict[str, FunctionModel]]:
    """Agents a, b (0.95) and c (0.9), measured on math: a staged team; ``failing`` experts fail,
    ``unsure`` ones state no answer, the others answer as ``answers`` says (else "The answer is 4")."""
    from helpers import kind_of

    def answer(name: str) -> Callable[[ChatRequest], object]:
        def reply(request: ChatRequest) -> object:
            if kind_of(request) == "keywords":
                return {"keywords": ["math"]}
            if kind_of(request) == "expert" and name in failing:
                return BadResponse(f"{name} is down")
            if kind_of(request) == "expert" and name in unsure:
                return "Let me think.\nI am not sure."
            return (answers or {}).get(name, "The answer is 4")
        return reply

    models = {name: FunctionModel(answer(name), name=name) for name in "abck"}
    provenance = Provenance(dataset="v", dataset_sha256="x", items=40, model="m")
    profiles = {name: SkillProfile(agent=name, skills={"math": 30}, accuracy=accuracy, aggregation_score=0.9,
                                   skill_counts={"math": (int(40 * accuracy), 40)}, provenance=provenance)
                for name, accuracy in (("a", 0.95), ("b", 0.95), ("c", 0.9))}
    return Pool(agents=[Agent(name=name, model=models[name]) for name in "abc"], profiles=profiles,
                planner=models["k"]), models


def test_a_staged_team_whose_first_experts_failed_asks_the_rest() -> None:
    pool, _ = confident_pool(failing="ab")  # two failures are not two experts agreeing
    result = Orchestra(pool, k=3, plan=False, store=False).run("What is 2 + 2?")
    node = result.plan.nodes[0]
    assert node.recruitment is not None and node.recruitment["team"]["staged"] == 2
    assert [o.agent for o in node.expert_outputs] == ["a", "b", "c"] and node.saved_calls == 0
    assert result.status == "done" and result.answer == "The answer is 4"


def test_a_staged_team_of_two_that_agrees_needs_no_aggregation() -> None:
    pool, models = confident_pool()
    result = Orchestra(pool, k=2, plan=False, store=False).run("What is 2 + 2?")
    node = result.plan.nodes[0]
    assert node.recruitment is not None and node.recruitment["team"]["staged"] == 2
    assert node.saved_calls == 1 and node.aggregator is None
    assert sum(len(models[name].requests) for name in "abc") == 2  # the two answers, no aggregation call


def test_staged_experts_who_name_one_choice_two_ways_agree() -> None:
    """"London." and "(B)" for a task listing (B) London were two answers: the third expert was asked."""
    pool, models = confident_pool(answers={"a": "The answer is London.", "b": "The answer is (B)."})
    result = Orchestra(pool, k=3, plan=False, store=False).run("Which city is the capital of England?\n(A) Paris\n"
                                                                "(B) London\n(C) Rome")
    node = result.plan.nodes[0]
    assert [o.agent for o in node.expert_outputs] == ["a", "b"] and node.saved_calls == 2  # (c and the aggregator)
    assert not models["c"].requests


@pytest.mark.parametrize(("first", "second"), [("x = \\boxed{-3}", "x = \\boxed{3}"), ("so \\boxed{1.2}", "so \\boxed{12}")])
def test_staged_experts_whose_boxed_numbers_differ_do_not_agree(first: str, second: str) -> None:
    """Boxed answers were read as text without their sign or point: -3 and 3 (or 1.2 and 12) agreed,
    and the team stopped on the first expert's answer with no third expert and no aggregation."""
    pool, _ = confident_pool(answers={"a": first, "b": second})
    result = Orchestra(pool, k=3, plan=False, store=False).run("Solve x + 5 = 2.")
    node = result.plan.nodes[0]
    assert node.recruitment is not None and node.recruitment["team"]["staged"] == 2
    assert [o.agent for o in node.expert_outputs] == ["a", "b", "c"] and node.saved_calls == 0


@pytest.mark.parametrize("answer_format", ['End with "The answer is ..."', None])
def test_staged_experts_told_how_to_answer_agree_only_on_stated_answers(answer_format: str | None) -> None:
    """Two replies ending "I am not sure" stop a staged team only where nobody asked the experts
    to state their answer (then their last lines are all there is to compare)."""
    pool, models = confident_pool(unsure="ab")
    result = asyncio.run(Orchestra(pool, k=3, plan=False, store=False).arun("What is 2 + 2?",
                                                                             answer_format=answer_format))
    node = result.plan.nodes[0]
    assert node.recruitment is not None and node.recruitment["team"]["staged"] == 2
    if answer_format is None:
        assert node.saved_calls == 2 and len(models["c"].requests) == 0
    else:
        assert [o.agent for o in node.expert_outputs] == ["a", "b", "c"] and node.saved_calls == 0


def test_staged_teams_ask_the_rest_when_the_first_two_disagree(market) -> None:
    _, orc, held_out = market
    results = orc.run_many([item.prompt() for item in held_out])
    disagreed = [r for r in results
                 if r.plan.nodes[0].recruitment["team"]["staged"] and not r.plan.nodes[0].saved_calls]
    agreed = [r for r in results if r.plan.nodes[0].saved_calls]
    assert disagreed and agreed
    for result in disagreed:
        node = result.plan.nodes[0]
        assert len(node.expert_outputs) == len(node.experts) == 3 and node.aggregator is not None
        assert result.usage.calls == 3 + 1 + 5
    for result in agreed:
        assert len(result.plan.nodes[0].expert_outputs) == 2 and result.usage.calls == 2 + 5


def test_a_cost_cap_per_item_is_honoured(market) -> None:
    _, orc, held_out = market
    _, _, results = _run(orc, held_out, recruit={"max_cost_per_item": 0.00002})
    for result in results:
        team = result.plan.nodes[0].recruitment["team"]
        assert team["expected_cost_usd"] <= 0.00002
        assert result.usage.cost_usd <= 0.0001  # keyword calls are free here; experts within the cap's reach
    assert all(len(r.plan.nodes[0].experts) == 1 for r in results)


def test_equally_accurate_candidates_are_ranked_cheapest_first() -> None:
    """The calibrated ranking (what explanations and ``show`` list) puts the cheaper of two agents
    with the same expected accuracy first, whatever their names."""
    profiles = {name: SkillProfile(agent=name, skills={"math": 5}, accuracy=0.8,
                                   skill_counts={"math": (16, 20)},
                                   provenance=Provenance(dataset="v", dataset_sha256="x", items=20, model="m"))
                for name in ("alpha", "beta")}
    costs = {"alpha": (0.002, 0.002), "beta": (0.001, 0.001)}
    table = SkillTable.build(list(profiles), profiles, {}, {}, RecruitConfig(), costs=costs)
    ranked, _ = Recruiter(table).team([Match("math", "math", 1.0)], k=1)
    assert [c.agent for c in ranked] == ["beta", "alpha"]
    assert ranked[0].suitability == ranked[1].suitability


def test_a_newcomer_is_taken_for_an_average_agent_not_for_one_right_half_the_time() -> None:
    """An agent without a profile starts at the measured agents' mean accuracy: on hard questions
    (every measured agent under 0.5) one that declared arithmetic outranked the biologist on biology."""
    def measured(agent: str, accuracy: float, counts: dict[str, tuple[int, int]]) -> SkillProfile:
        return SkillProfile(agent=agent, skills={s: 2 * c - n for s, (c, n) in counts.items()}, accuracy=accuracy,
                            skill_counts=counts, provenance=Provenance(dataset="v", dataset_sha256="x", items=40, model="m"))

    profiles = {"bio": measured("bio", 0.3, {"biology": (8, 20), "arithmetic": (4, 20)}),
                "calc": measured("calc", 0.2, {"biology": (3, 20), "arithmetic": (5, 20)})}
    table = SkillTable.build([*profiles, "new"], profiles, {"new": ["arithmetic"]}, {}, RecruitConfig())
    assert table.calibration is not None and table.calibration.agents["new"].overall == pytest.approx(0.25)
    ranked, _ = Recruiter(table).team([Match("biology", "biology", 1.0)], k=1)
    assert [c.agent for c in ranked] == ["bio", "new", "calc"]  # (the newcomer: average, so between them)
    # on the skill it declared, the newcomer is still recruited before it is measured
    ranked, _ = Recruiter(table).team([Match("arithmetic", "arithmetic", 1.0)], k=1)
    assert ranked[0].agent == "new"
    # with nobody measured, a newcomer is one right half the time, as before
    cold = SkillTable.build(["a", "b"], {}, {"a": ["arithmetic"]}, {}, RecruitConfig())
    assert cold.calibration is not None and cold.calibration.agents["b"].overall == 0.5


def test_a_newcomer_that_declares_a_keyword_variant_is_credited_on_its_canonical_skill() -> None:
    """The profiles merged "organic chem" into "organic chemistry": a newcomer declaring "organic chem"
    got no credit for it, even on a query in those very words (symbolic-moe gave it)."""
    counts = {"organic chemistry": (10, 20)}
    profiles = {name: SkillProfile(agent=name, skills={"organic chemistry": 0}, accuracy=0.5, skill_counts=counts,
                                   aliases={"organic chem": "organic chemistry"},
                                   provenance=Provenance(dataset="v", dataset_sha256="x", items=40, model="m"))
                for name in ("gen1", "gen2")}
    declared = {"variant": ["Organic Chem"], "canonical": ["organic chemistry"]}
    table = SkillTable.build([*profiles, *declared], profiles, declared, {}, RecruitConfig())
    for query in ("organic chem", "organic chemistry"):
        ranked, _ = Recruiter(table).team([Match(query, query, 1.0)], k=1)
        assert ranked[0].suitability == ranked[1].suitability > ranked[2].suitability, query
        assert {c.agent for c in ranked[:2]} == {"variant", "canonical"}, query


def test_an_unmeasured_agent_priced_above_the_measured_does_not_change_the_teams_it_is_not_in() -> None:
    """λ's cost unit is one call to the priciest measured model: a newcomer's cost is a guess (400+300
    tokens at its price), and priced above every measured agent it lowered every team's cost penalty (a
    new user saw 25 of 90 teams change, 18% more spent, with the newcomer never called)."""
    def measured(agent: str, counts: tuple[int, int]) -> SkillProfile:
        return SkillProfile(agent=agent, skills={"arithmetic": 2 * counts[0] - counts[1]}, accuracy=0.5,
                            skill_counts={"arithmetic": counts},
                            provenance=Provenance(dataset="v", dataset_sha256="x", items=30, model="m"))

    profiles = {"math": measured("math", (22, 30)), "gen": measured("gen", (15, 30)),
                "cheap": measured("cheap", (14, 30))}
    costs = {"math": (0.000081, 0.0003), "gen": (0.000901, 0.003), "cheap": (0.000008, 0.00003)}
    query = [Match("arithmetic", "arithmetic", 1.0)]
    alone = Recruiter(SkillTable.build(list(profiles), profiles, {}, {}, RecruitConfig(), costs=costs))
    joined = Recruiter(SkillTable.build([*profiles, "newbie"], profiles, {}, {}, RecruitConfig(),
                                        costs={**costs, "newbie": (0.002, 0.006)}))
    _, before = alone.team(query, k=3)
    _, after = joined.team(query, k=3)
    assert "newbie" not in after.experts and after.experts == before.experts == ("math",)
    # with nobody measured, the guesses are all there is
    guessed = {"a": (1.0, 1.0), "b": (1.0, 1.0), "c": (100.0, 100.0)}
    cold = Recruiter(SkillTable.build(list(guessed), {}, {}, {}, RecruitConfig(), costs=guessed),
                     RecruitConfig(cost_lambda=0.5))
    _, team = cold.team(query, k=3)
    assert team.experts == ("a",)  # (costing nothing, three guesses at 0.5 beat one: 0.69 against 0.5)
