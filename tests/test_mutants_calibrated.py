"""Calibrated routing details the other tests left open (each found by a surviving one-line mutant): team choice
at the cost cap and on ties, calibration without evidence, merging keyword variants, and staffing a node."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence

import pytest

from orchestra import Agent, Orchestra, Pool
from orchestra.calibration import AgentSkills, Calibration, posterior
from orchestra.errors import BudgetExceeded
from orchestra.frontier import asweep
from orchestra.matching import ngram_vector, sparse_cosine
from orchestra.models import ChatResult, FunctionModel
from orchestra.pipeline.staffing import Pin, Staffing
from orchestra.settings import Settings
from orchestra.teams import Option, choose_team, team_accuracy
from orchestra.testing.simulation import specialist_pool
from orchestra.variants import Vocabulary, contradicts, merge_variants, pooled_counts

# --- team choice ------------------------------------------------------------------------------


def test_an_aggregator_measured_at_zero_skill_finds_no_lone_right_answer() -> None:
    """A skill of 0 is a measured 0, not a missing one: with one right answer the node is wrong."""
    assert team_accuracy([0.6, 0.5], 0.0) == pytest.approx(0.6 * 0.5)
    # so a pair it aggregates (0.36 + 0.48 * 0) is worth less than its better expert alone
    team = choose_team([Option("a", 0.6, 0.0), Option("b", 0.6, 0.0)], [Option("agg", 0.0, 0.0)], k=2,
                       cost_lambda=0.0, unit_cost=0.0, confidence=None)
    assert team.experts == ("a",) and team.expected_accuracy == pytest.approx(0.6)


def test_a_team_expected_to_cost_exactly_the_cap_fits_it() -> None:
    """``max_cost`` is the most a team may cost, the bound included: no fallback, no over-cap note."""
    experts = [Option("a", 0.9, 1.0), Option("b", 0.5, 0.5)]
    team = choose_team(experts, [], k=1, cost_lambda=0.0, unit_cost=1.0, max_cost=1.0)
    assert team.experts == ("a",) and team.over_cap is None


def test_equally_useful_teams_go_to_the_cheaper_whatever_the_order_considered() -> None:
    """When cost does not count (λ = 0), two equally accurate experts tie on utility: the cheaper wins."""
    for experts in ([Option("dear", 0.8, 2.0), Option("cheap", 0.8, 1.0)],
                    [Option("a_dear", 0.8, 2.0), Option("b_cheap", 0.8, 1.0)]):
        team = choose_team(experts, [], k=1, cost_lambda=0.0, unit_cost=2.0)
        assert team.expected_cost == 1.0, experts


def test_a_teams_experts_are_listed_most_accurate_first_so_the_confident_pair_is_staged() -> None:
    """The first two experts (those asked first in a staged team) are the most accurate, not the cheapest."""
    experts = [Option("cheap", 0.6, 0.001), Option("a", 0.9, 0.002), Option("b", 0.85, 0.002)]
    team = choose_team(experts, [Option("agg", 0.9, 0.001)], k=3, cost_lambda=0.0, unit_cost=0.002, confidence=0.8)
    assert team.experts == ("a", "b", "cheap") and team.staged == 2


def test_six_candidates_make_a_team_of_six_and_no_more() -> None:
    """Team choice considers the six best-estimated experts: with cost not counting, every one adds accuracy."""
    experts = [Option(f"e{i}", 0.7 - i / 100, 0.0) for i in range(8)]
    six = choose_team(experts, [Option("agg", 0.5, 0.0)], k=6, cost_lambda=0.0, unit_cost=0.0, confidence=None)
    assert six.experts == tuple(f"e{i}" for i in range(6))
    seven = choose_team(experts, [Option("agg", 0.5, 0.0)], k=7, cost_lambda=0.0, unit_cost=0.0, confidence=None)
    assert seven.experts == six.experts


# --- calibration ------------------------------------------------------------------------------


def test_a_query_without_matched_skills_has_the_deviation_of_an_estimate_without_evidence() -> None:
    """No matched skill: the overall accuracy, with the deviation of a skill estimate on no items (prior only)."""
    calibration = Calibration({"a": AgentSkills(0.7, {"alg": (8, 10)}), "b": AgentSkills(0.4, {"alg": (2, 10)})})
    p, sd, parts = calibration.query("a", [])
    assert parts == () and p == pytest.approx(0.7)
    assert (p, sd) == pytest.approx(posterior(0, 0, 0.7))
    assert (p, sd) == pytest.approx(calibration.estimate("a", "geo")[:2])  # (a skill it has no items of)
    assert sd == pytest.approx(math.sqrt(0.7 * 0.3 / 5))


# --- keyword variants -------------------------------------------------------------------------


def merged(item_keywords: dict[str, list[str]], correct: dict[str, dict[str, bool]] | None = None,
           **options: float) -> Vocabulary:
    return asyncio.run(merge_variants(item_keywords, correct or {}, **options))


def test_an_agent_without_results_on_one_keyword_is_no_evidence_either_way() -> None:
    """An agent that answered no item of one of the two keywords (its calls failed) neither contradicts nor raises."""
    assert not contradicts({"x": (3, 3)}, {"x": (0, 0)}) and not contradicts({"x": (0, 0)}, {"x": (0, 3)})
    assert not contradicts({"x": (3, 3)}, {})
    items = {"o1": ["organic chemistry"], "o2": ["organic chemistry"], "c1": ["organic chem"]}
    vocabulary = merged(items, {"alice": {"o1": True, "o2": True}})
    assert vocabulary.canonical("organic chem") == "organic chemistry"


def test_the_evidence_check_is_a_two_proportion_z_test_with_both_sample_sizes() -> None:
    """10/10 against 5/10: pooled 0.75, standard error sqrt(0.75 · 0.25 · (1/10 + 1/10)) = 0.19, z = 2.6 (no
    contradiction); 10/10 against 2/10: z = 3.7 (a contradiction)."""
    assert not contradicts({"x": (10, 10)}, {"x": (5, 10)})
    assert contradicts({"x": (10, 10)}, {"x": (2, 10)})


def test_a_difference_of_exactly_max_z_standard_errors_is_no_contradiction() -> None:
    """``max_z`` is the most two keywords' results may differ by and still merge, the bound included."""
    z = abs(4 / 4 - 0 / 4) / math.sqrt(0.5 * (1 - 0.5) * (1 / 4 + 1 / 4))  # as contradicts computes it
    assert not contradicts({"x": (4, 4)}, {"x": (0, 4)}, max_z=z)
    assert contradicts({"x": (4, 4)}, {"x": (0, 4)}, max_z=z * 0.999)


def test_a_threshold_of_one_merges_even_names_that_differ_only_in_case() -> None:
    """"Algebra" and "algebra" are a lexical similarity of exactly 1: a threshold of 1 still merges nothing."""
    items = {"i1": ["algebra"], "i2": ["algebra"], "i3": ["Algebra"]}
    assert merged(items, threshold=0.99).canonical("Algebra") == "algebra"  # (they are close enough to merge)
    vocabulary = merged(items, threshold=1.0)
    assert vocabulary.aliases == {"algebra": "algebra", "Algebra": "Algebra"} and vocabulary.merged == {}


def test_a_keyword_exactly_at_the_merge_threshold_joins_the_skill() -> None:
    """The name similarity threshold is inclusive (here the exact similarity of the two names)."""
    similarity = sparse_cosine(ngram_vector("algebra"), ngram_vector("linear algebra"))
    items = {"i1": ["algebra"], "i2": ["algebra"], "i3": ["linear algebra"]}
    vocabulary = merged(items, threshold=similarity)
    assert vocabulary.canonical("linear algebra") == "algebra"
    assert vocabulary.similarity == {"linear algebra": round(similarity, 4)}


def test_a_keyword_close_to_two_skills_joins_the_more_similar() -> None:
    """Organic and inorganic chemistry stay apart (alice knows one, not the other); "organic chem", close
    enough to both, joins organic chemistry, its nearer name."""
    items = {f"o{i}": ["organic chemistry"] for i in range(6)}
    items.update({f"n{i}": ["inorganic chemistry"] for i in range(5)})
    items["c0"] = ["organic chem"]
    alice = {i: not i.startswith("n") for i in items}
    vocabulary = merged(items, {"alice": alice})
    assert vocabulary.canonical("inorganic chemistry") == "inorganic chemistry"
    assert vocabulary.canonical("organic chem") == "organic chemistry"


def test_a_keyword_joins_a_skill_through_any_of_its_variants() -> None:
    """"org chem" is close to "organic chem" (0.61), a variant already merged, though not to the canonical
    "organic chemistry" (0.43): it joins the skill."""
    items = {f"o{i}": ["organic chemistry"] for i in range(3)}
    items.update({"c0": ["organic chem"], "c1": ["organic chem"], "g0": ["org chem"]})
    vocabulary = merged(items)
    assert vocabulary.merged == {"organic chemistry": ["org chem", "organic chem"]}
    assert vocabulary.similarity["org chem"] == pytest.approx(0.612, abs=1e-3)


def test_a_keyword_is_checked_against_the_evidence_of_every_variant_already_merged() -> None:
    """alice answered the 9 items of organic chemistry and its variant "organic chem" right, and the one item of
    "org chem" wrong: against all 9 items, that is a contradiction (against the 5 of the canonical name alone, not)."""
    items = {f"o{i}": ["organic chemistry"] for i in range(5)}
    items.update({f"c{i}": ["organic chem"] for i in range(4)})
    items["g0"] = ["org chem"]
    alice = {i: i != "g0" for i in items}
    vocabulary = merged(items, {"alice": alice})
    assert vocabulary.canonical("organic chem") == "organic chemistry"
    assert vocabulary.canonical("org chem") == "org chem"


def test_a_keyword_repeated_in_one_item_counts_that_item_once() -> None:
    """The most frequent variant names the skill, frequency counting items, not mentions."""
    items = {"o1": ["organic chemistry"], "o2": ["organic chemistry"], "c1": ["organic chem", "organic chem",
                                                                             "organic chem"]}
    vocabulary = merged(items, {"alice": {"o1": True, "o2": True, "c1": True}})
    assert vocabulary.canonical("organic chem") == "organic chemistry"


def test_an_item_given_two_variants_of_one_skill_counts_once_in_its_evidence() -> None:
    """Pooled counts: an item named by "organic chemistry" and "organic chem" is one item of the skill."""
    items = {"i1": ["organic chemistry", "organic chem"], "i2": ["organic chemistry"], "i3": ["organic chem"],
             "i4": ["organic chemistry"]}
    vocabulary = merged(items)
    assert vocabulary.canonical("organic chem") == "organic chemistry"
    answers = {"i1": True, "i2": False, "i3": True, "i4": True}
    assert pooled_counts(items, answers, vocabulary) == {"organic chemistry": (3, 4)}
    # an item the agent has no result for (its call failed) is not counted
    assert pooled_counts(items, {"i2": True}, vocabulary) == {"organic chemistry": (1, 1)}


# --- staffing ---------------------------------------------------------------------------------


def test_a_one_agent_pool_still_draws_its_agent_k_times_for_a_node_of_several() -> None:
    """Only a node of one expert in a one-agent pool is fixed without recruiting: symbolic-moe's k = 3 draws
    the one agent three times (three sampled answers), and says so as its own recruitment."""
    solo = Pool(agents=[Agent(name="solo", model=FunctionModel(lambda request: "ok", name="m"))])
    staffing = Staffing(solo, Settings())
    assert staffing.known(["Algebra"], seed=1, k=3, mode="symbolic-moe") is None

    async def no_calls(calls: object) -> list[object]:
        raise AssertionError("the skills were given: no keyword call")

    staffed = asyncio.run(staffing.recruit("q", ["Algebra"], no_calls, seed=1, k=3, mode="symbolic-moe"))
    assert staffed.recruitment.experts == ("solo", "solo", "solo") and staffed.recruitment.mode == "symbolic-moe"


def one_agent_staffing() -> Staffing:
    solo = Pool(agents=[Agent(name="solo", model=FunctionModel(lambda request: "ok", name="m"))])
    return Staffing(solo, Settings())


def test_keyword_calls_failed_only_when_every_one_failed() -> None:
    """One failed keyword call beside answers that name no skill is the LLM naming none, not a failed stage."""
    staffing = one_agent_staffing()

    def answering(*outcomes: ChatResult | Exception) -> Callable[[Sequence[object]], Awaitable[list[object]]]:
        async def call(calls: Sequence[object]) -> list[object]:
            return [outcomes[i % len(outcomes)] for i in range(len(calls))]
        return call

    for outcomes, failed in (((RuntimeError("down"), ChatResult(text="")), False),
                             ((RuntimeError("down"),), True)):
        staffed = asyncio.run(staffing.recruit("q", [], answering(*outcomes), seed=1, k=2, mode="symbolic-moe"))
        assert staffed.extraction_failure is not None and staffed.keyword_calls_failed is failed, outcomes


def test_a_keyword_call_stopped_by_the_budget_stops_the_node() -> None:
    """A budget that stops a keyword call stops the run: it is not read as a failed extraction."""
    staffing = one_agent_staffing()
    stop = BudgetExceeded(limit="max_calls", value=1, spent="1 call", run_id="r")

    async def call(calls: Sequence[object]) -> list[object]:
        return [stop, *[ChatResult(text="Keywords: algebra") for _ in calls[1:]]]

    with pytest.raises(BudgetExceeded) as raised:
        asyncio.run(staffing.recruit("q", [], call, seed=1, k=2, mode="symbolic-moe"))
    assert raised.value is stop


def test_experts_pinned_by_name_replace_those_of_skills_matched_before() -> None:
    """A resumed node keeps the experts recorded with the run, even when its skills were matched for another
    node before (so its recruitment is known without a request)."""
    pair = Pool(agents=[Agent(name=n, model=FunctionModel(lambda request: "ok", name=n)) for n in ("a", "b")])
    staffing = Staffing(pair, Settings())

    async def no_calls(calls: object) -> list[object]:
        raise AssertionError("the skills were given: no keyword call")

    asyncio.run(staffing.recruit("q", ["Algebra"], no_calls, seed=1, k=2, mode="topk"))  # matched: now known
    assert staffing.known(["Algebra"], seed=1, k=2, mode="topk") is not None
    pinned = staffing.known(["Algebra"], seed=1, k=2, mode="topk", pin=Pin(("b", "b")))
    assert pinned is not None and pinned.experts == ("b", "b") and pinned.notes[-1] == "experts as first recruited"


# --- the accuracy/cost frontier ---------------------------------------------------------------


def test_a_sweeps_k_reaches_every_method_but_one_whose_preset_fixes_it() -> None:
    """``k`` given to a sweep is each method's k (moa asks 2 experts), except single's own k of 1."""
    sim = specialist_pool(seed=0)
    orc = Orchestra(sim.pool(), k=3, plan=False, store=False)
    moa, single = asyncio.run(asweep(orc, sim.items(2, offset=1000), lambdas=[], methods=["moa", "single"], k=2))
    assert moa.method == "moa, k=2" and single.method == "single"
    # (2 experts and the aggregator; single's one expert call an item, sent or taken from an earlier point)
    assert moa.calls + moa.reused_calls == moa.items * (2 + 1) and single.calls + single.reused_calls == single.items
