"""Recruiting: the exact Symbolic-MoE weights, determinism, modes, cold start, rare-expert filter."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from fractions import Fraction
from typing import Any

import pytest
from helpers import kind_of

from orchestra.matching import Match
from orchestra.profile import Provenance, SkillProfile, global_competence
from orchestra.recruit import RecruitConfig, Recruiter, SkillTable, choose_aggregator

PROVENANCE = Provenance(dataset="val.jsonl", dataset_sha256="0" * 64, items=40, model="test")


def profile(agent: str, skills: dict[str, int], aggregation: float | None = None) -> SkillProfile:
    return SkillProfile(agent=agent, skills=skills, accuracy=0.5, aggregation_score=aggregation,
                        provenance=PROVENANCE)


PROFILES = {"A": profile("A", {"algebra": 3, "geometry": -1}),
            "B": profile("B", {"algebra": 1, "geometry": 2}),
            "C": profile("C", {"algebra": -2, "geometry": 1})}


def recruiter(config: RecruitConfig | None = None, profiles: dict[str, SkillProfile] = PROFILES,
              declared: dict[str, list[str]] | None = None, prices: dict[str, float] | None = None) -> Recruiter:
    config = config or RecruitConfig()
    agents = list(profiles) + [a for a in (declared or {}) if a not in profiles]
    table = SkillTable.build(agents, profiles, declared or {}, prices or {}, config)
    return Recruiter(table, config)


def matches(*skills: str) -> list[Match]:
    return [Match(s, s, 1.0) for s in skills]


def probabilities(r: Recruiter, *skills: str) -> dict[str, Fraction]:
    return {c.agent: Fraction(c.probability).limit_denominator(10_000) for c in r.candidates(matches(*skills))}


def test_global_competence_by_hand() -> None:
    # sums 2, 3, -1 -> shift by -min + 1 = 2 -> 4, 5, 1 -> squared (T = 0.5) 16, 25, 1 -> / 42
    gamma = global_competence({"A": 2, "B": 3, "C": -1})
    assert {a: Fraction(g).limit_denominator(1000) for a, g in gamma.items()} == {
        "A": Fraction(16, 42), "B": Fraction(25, 42), "C": Fraction(1, 42)}
    assert global_competence({"A": 4, "B": 0}) == {"A": 1.0, "B": 0.0}  # no shift when the minimum is not negative


def test_global_competence_at_a_low_temperature_does_not_overflow() -> None:
    """Sums of 300 and 200 at T = 0.005 (300 ** 200) overflowed a float: `orchestra ask` died in a traceback."""
    gamma = global_competence({"A": 300, "B": 200, "C": 0}, temperature=0.005)
    assert gamma["A"] == pytest.approx(1.0) and 0 <= gamma["B"] < 1e-30 and gamma["C"] == 0.0
    assert global_competence({"A": 3, "B": 1}, temperature=0.5) == pytest.approx({"A": 0.9, "B": 0.1})
    assert global_competence({"A": 0, "B": 0}) == {"A": 0.5, "B": 0.5}


def test_hand_computed_selection_probabilities() -> None:
    r = recruiter()
    # algebra: s = 3, 1, -2 -> C filtered (s <= 0); w = 3 * 16/42, 1 * 25/42 -> 48/73, 25/73
    assert probabilities(r, "algebra") == {"A": Fraction(48, 73), "B": Fraction(25, 73), "C": 0}
    # algebra + geometry: s = 2, 3, -1 -> w = 2 * 16, 3 * 25 -> 32/107, 75/107
    assert probabilities(r, "algebra", "geometry") == {"A": Fraction(32, 107), "B": Fraction(75, 107), "C": 0}
    # nothing matched: every s = 0, none positive -> shifted to 1 -> probabilities follow γ
    assert probabilities(r) == {"A": Fraction(16, 42), "B": Fraction(25, 42), "C": Fraction(1, 42)}


def test_sampling_with_replacement_follows_the_probabilities() -> None:
    r = recruiter()
    draws = Counter()
    for seed in range(4000):
        draws.update(r.recruit(["algebra"], matches("algebra"), seed=seed, k=3).experts)
    total = sum(draws.values())
    assert draws["C"] == 0
    assert abs(draws["A"] / total - 48 / 73) < 0.02 and abs(draws["B"] / total - 25 / 73) < 0.02
    repeated = [r.recruit(["algebra"], matches("algebra"), seed=s, k=3).experts for s in range(50)]
    assert any(len(set(e)) < 3 for e in repeated)  # with replacement: an agent can be drawn twice


def test_seeded_recruiting_is_deterministic() -> None:
    r = recruiter()
    first = [r.recruit(["algebra", "geometry"], matches("algebra", "geometry"), seed=s).experts for s in range(20)]
    again = [recruiter().recruit(["algebra", "geometry"], matches("algebra", "geometry"), seed=s).experts
             for s in range(20)]
    assert first == again
    assert len(set(first)) > 1  # different seeds differ


def test_topk_distinct_and_adaptive_modes() -> None:
    r = recruiter()
    assert r.recruit(["algebra"], matches("algebra"), seed=0, mode="topk", k=3).experts == ("A", "B")
    adaptive = recruiter(RecruitConfig(p=0.6, k_max=3))
    assert adaptive.recruit(["algebra"], matches("algebra"), seed=0, mode="adaptive").experts == ("A",)  # 48/73 >= 0.6
    assert adaptive.recruit(["a"], matches("algebra", "geometry"), seed=0, mode="adaptive").experts == ("B",)
    wide = recruiter(RecruitConfig(p=0.99, k_max=2))
    assert wide.recruit([], matches(), seed=0, mode="adaptive").experts == ("B", "A")  # capped at k_max


def test_cost_aware_trade_off_shifts_choice_to_cheaper_agents() -> None:
    prices = {"A": 0.1, "B": 10.0, "C": 0.1}
    plain = recruiter(RecruitConfig(cost_lambda=0.0), prices=prices)
    thrifty = recruiter(RecruitConfig(cost_lambda=3.0), prices=prices)
    assert plain.candidates(matches("algebra", "geometry"))[0].agent == "B"
    ranked = thrifty.candidates(matches("algebra", "geometry"))
    assert ranked[0].agent == "A"
    b = next(c for c in ranked if c.agent == "B")
    assert b.cost_factor == pytest.approx(pow(2.718281828, -3.0), rel=1e-6)


def test_cold_start_declared_skills_then_uniform_prior() -> None:
    r = recruiter(profiles={}, declared={"coder": ["python"], "writer": ["prose"], "blank": []})
    python = {c.agent: c for c in r.candidates(matches("python"))}
    assert python["coder"].suitability == 1.0 and python["coder"].cold_start
    assert python["blank"].suitability == 0.5  # the uniform prior, below a declared specialist
    assert python["writer"].suitability == 0.0 and python["writer"].probability == 0.0
    assert r.recruit(["python"], matches("python"), seed=1, mode="topk", k=1).experts == ("coder",)


def test_explanations_name_matched_skills_and_contributions() -> None:
    r = recruiter()
    recruitment = r.recruit(["algebraic", "shapes"], [Match("algebraic", "algebra", 0.7), Match("shapes", "geometry", 0.4)],
                            seed=3, mode="topk", k=2)
    lines = recruitment.explain()
    assert lines[0].startswith("B: p=0.701") and "algebra +1 (from 'algebraic')" in lines[0]
    assert "geometry +2 (from 'shapes')" in lines[0]
    data = recruitment.to_dict()
    assert data["matches"][0] == {"keyword": "algebraic", "skill": "algebra", "similarity": 0.7}
    assert data["candidates"][0]["agent"] == "B"


def test_rare_expert_filter_cuts_distinct_models() -> None:
    # 12 agents; agents 0-2 are strong everywhere, 3-11 weakly positive: each is drawn rarely
    skills = {f"s{i}": 1 for i in range(4)}
    profiles = {f"a{i}": profile(f"a{i}", {k: (20 if i < 3 else 1) for k in skills}) for i in range(12)}
    r = recruiter(RecruitConfig(rare_threshold=0.05, competence_weight=0), profiles=profiles)
    batch = [r.recruit(["s0"], matches(f"s{i % 4}"), seed=i) for i in range(200)]
    before = {a for rec in batch for a in rec.experts}
    counts = Counter(a for rec in batch for a in set(rec.experts))
    assert any(n / 200 < 0.05 for n in counts.values())
    filtered = r.filter_rare(batch, seed=0)
    after = {a for rec in filtered for a in rec.experts}
    assert len(after) < len(before)
    assert all(Counter(a for rec in filtered for a in set(rec.experts))[a] / 200 >= 0.05 for a in after)
    changed = [f for f, b in zip(filtered, batch) if f.experts != b.experts]
    assert changed and all("rare-expert filter replaced" in f.notes[-1] for f in changed)


def test_aggregator_choice() -> None:
    profiles = {"A": profile("A", {"x": 1}, aggregation=0.4), "B": profile("B", {"x": 1}, aggregation=0.9)}
    assert choose_aggregator(profiles, {"A": 0.9, "B": 0.1}, ["A", "B"]) == "B"
    assert choose_aggregator(profiles, {}, ["A", "B"], configured="A") == "A"
    assert choose_aggregator({}, {"A": 0.2, "B": 0.8}, ["A", "B"]) == "B"


def test_equal_recruitments_are_one_object_and_different_ones_are_not() -> None:
    r = recruiter()
    first = r.recruit(["algebra"], matches("algebra"), seed=1, k=2, mode="topk")
    assert r.recruit(["algebra"], matches("algebra"), seed=2, k=2, mode="topk") is first  # topk ignores the seed
    assert first.explain() is not first.explain() and first.explain() == first.explain()  # a copy each time
    others = [r.recruit(["algebra"], matches("algebra"), seed=1, k=1, mode="topk"),
              r.recruit(["geometry"], matches("geometry"), seed=1, k=2, mode="topk"),
              r.recruit(["algebra"], matches("algebra"), seed=1, k=2, mode="global")]
    assert all(o is not first for o in others)
    assert [o.experts for o in others] == [("A",), ("B", "C"), ("B", "A")]
    drawn = {r.recruit(["algebra"], matches("algebra"), seed=s, k=3).experts for s in range(40)}
    assert len(drawn) > 1  # symbolic-moe still draws per seed


def test_a_shared_recruitments_json_is_a_new_copy_each_time_it_is_asked_for() -> None:
    """One recruitment serves every node and run that drew the same: a trace changed by its user
    must not change the others' (every list and dict of its JSON is the trace's own)."""
    r = recruiter()
    shared = r.recruit(["algebra"], matches("algebra"), seed=1, k=2, mode="topk")
    first, second = shared.to_dict(), shared.to_dict()
    assert first == second
    for key in ("experts", "keywords", "explanation"):
        first[key].append("changed")  # type: ignore[attr-defined]
    first["matches"][0]["skill"] = "changed"  # type: ignore[index]
    first["candidates"][0]["weight"] = -1  # type: ignore[index]
    first["candidates"][0]["contributions"][0]["score"] = -1  # type: ignore[index]
    assert shared.to_dict() == second and first != second
    assert not shared_containers(shared.to_dict(), shared.to_dict())
    calibrated = recruiter().recruit(["algebra"], matches("algebra"), seed=1, k=2, mode="calibrated")
    assert calibrated.team is not None
    mine = calibrated.to_dict()
    mine["team"]["experts"].append("changed")  # type: ignore[index]
    assert calibrated.to_dict()["team"]["experts"] == list(calibrated.team.experts)  # type: ignore[index,union-attr]
    assert not shared_containers(calibrated.to_dict(), calibrated.to_dict())


def shared_containers(one: object, other: object) -> list[object]:
    """The lists and dicts that are the same object in both JSON values (compared where they correspond)."""
    if isinstance(one, dict) and isinstance(other, dict):
        return [one] * (one is other) + [x for key in one for x in shared_containers(one[key], other.get(key))]
    if isinstance(one, list) and isinstance(other, list):
        return [one] * (one is other) + [x for a, b in zip(one, other) for x in shared_containers(a, b)]
    return []


def test_calibrated_with_nothing_measured_draws_and_says_so() -> None:
    r = recruiter(profiles={}, declared={"A": ["algebra"], "B": ["geometry"]})
    recruitment = r.recruit(["algebra"], matches("algebra"), seed=3, k=2, mode="calibrated")
    assert recruitment.mode == "symbolic-moe" and recruitment.team is None
    assert "drawn as symbolic-moe" in recruitment.explain()[-1]
    assert r.recruit(["algebra"], matches("algebra"), seed=3, k=2, mode="symbolic-moe").notes == ()


def test_two_agents_with_weight_on_a_skill_make_a_draw_the_seed_can_change() -> None:
    profiles = {"A": profile("A", {"algebra": 2}), "B": profile("B", {"algebra": 1}), "C": profile("C", {"algebra": -1})}
    recruiter = Recruiter(SkillTable.build(list(profiles), profiles, {}, {}, RecruitConfig()), RecruitConfig())
    # (with exactly two, one cached recruitment served every node: their seeds stopped mattering)
    assert recruiter.draws([Match("algebra", "algebra", 1.0)], "symbolic-moe") is True


def test_a_rare_remote_expert_chosen_by_its_estimate_is_kept() -> None:
    from orchestra.recruit import Candidate, Recruitment

    def chosen(experts: tuple[str, ...]) -> Recruitment:
        return Recruitment(experts=experts, keywords=(), matches=(), mode="calibrated",
                           candidates=tuple(Candidate(a, 1.0, 1.0, 1.0, 0.5, 0.5, ()) for a in ("F", "R")))

    profiles = {"F": profile("F", {"law": 1}), "R": profile("R", {"law": 1})}
    config = RecruitConfig(rare_threshold=0.05)
    recruiter = Recruiter(SkillTable.build(list(profiles), profiles, {}, {}, config), config)
    batch = [chosen(("F",))] * 24 + [chosen(("R",))]
    assert recruiter.filter_rare(batch, seed=0, light={"R"})[-1].experts == ("R",)  # no model load to save
    assert recruiter.filter_rare(batch, seed=0)[-1].experts == ("F",)  # an engine's: replaced


def test_a_rare_expert_of_a_team_is_replaced_by_one_not_in_it_and_the_team_is_no_longer_staged() -> None:
    """A calibrated team of distinct experts became ``(A, A)`` (15 seeds of 20), still staged on the
    confidence measured for the team before: one model asked twice, its two answers alike."""
    from orchestra.recruit import Candidate, Recruitment
    from orchestra.teams import Team

    candidates = tuple(Candidate(a, p, p, 1.0, p, p, ()) for a, p in (("A", 0.5), ("B", 0.3), ("C", 0.2)))

    def team(*experts: str) -> Recruitment:
        return Recruitment(experts=experts, keywords=(), matches=(), candidates=candidates, mode="calibrated",
                           team=Team(experts, "A", 0.9, 0.9, 1.0, 2, 0.0))

    profiles = {name: profile(name, {"law": 1}) for name in "ABC"}
    recruiter = Recruiter(SkillTable.build(list(profiles), profiles, {}, {}, RecruitConfig()), RecruitConfig())
    for seed in range(20):
        replaced = recruiter.filter_rare([team("A", "B")] * 30 + [team("A", "C")], seed=seed)[-1]
        assert replaced.experts == ("A", "B") and replaced.staged == 0, seed
        assert replaced.explain()[-1].endswith("replaced C; the team's numbers above are of the team before")
    assert team("A", "B").staged == 2
    alone = recruiter.filter_rare([team("A")] * 30 + [team("A", "C")], seed=0)[-1]
    assert alone.experts == ("A",)  # every frequent agent is in the team already: the rare one is left out


def test_a_team_is_priced_with_its_aggregators_aggregation_call() -> None:
    from orchestra.recruit import Recruitment
    from orchestra.teams import Team

    profiles = {name: SkillProfile(agent=name, skills={"law": 1}, accuracy=0.7, aggregation_score=0.8,
                                   provenance=PROVENANCE) for name in ("X", "Y", "Z")}
    costs = {"X": (0.001, 0.05), "Y": (0.002, 0.003), "Z": (0.002, 0.004)}  # X answers cheaply, aggregates dearly
    config = RecruitConfig(confidence=1.0, cost_lambda=0.0)
    recruiter = Recruiter(SkillTable.build(list(profiles), profiles, {}, {}, config, costs=costs), config)
    _, team = recruiter.team([Match("law", "law", 1.0)], 3)
    assert len(team.experts) == 3 and team.aggregator == "Y"
    assert team.expected_cost == pytest.approx(0.001 + 0.002 + 0.002 + 0.003)
    staged = Recruitment(experts=("A", "B", "C"), keywords=(), matches=(), candidates=(), mode="calibrated",
                         team=Team(("A", "B", "C"), "A", 0.9, 0.95, 1.0, 2, 0.9))
    assert staged.staged == 2 and replace(staged, experts=("A", "B")).staged == 0  # no longer that team


def test_a_tied_vote_goes_to_the_expert_recruiting_favoured_even_when_drawn_second() -> None:
    from orchestra import Agent, Orchestra, Pool
    from orchestra.models import ChatRequest, FunctionModel

    def answer(name: str) -> Any:
        def reply(request: ChatRequest) -> object:
            if kind_of(request) == "keywords":
                return {"keywords": ["math"]}
            return f"{name} says: The answer is {4 if name == 'a' else 5}"
        return reply

    models = {name: FunctionModel(answer(name), name=name) for name in "abk"}
    profiles = {"a": SkillProfile(agent="a", skills={"math": 6}, accuracy=0.6, provenance=PROVENANCE),
                "b": SkillProfile(agent="b", skills={"math": 2}, accuracy=0.6, provenance=PROVENANCE)}
    pool = Pool(agents=[Agent(name=name, model=models[name]) for name in "ab"], profiles=profiles,
                planner=models["k"])
    result = Orchestra(pool, k=2, plan=False, store=False, mode="symbolic-moe", aggregate="vote", seed=3).run(
        "What is 2 + 2?")
    assert result.plan.nodes[0].experts == ["b", "a"]  # (this seed draws the weaker one first)
    assert result.answer == "a says: The answer is 4"  # one vote each: the drawing weights break the tie


def test_global_weighs_prices_under_a_cost_lambda_and_random_draws_alike_whatever_the_prices() -> None:
    """``global`` (moa, single) ranks by γ times the cost factor (--cost-lambda was accepted and did
    nothing there); ``random`` draws from the pool's order, so neither skills nor prices move it."""
    prices = {"A": 1.0, "B": 10.0, "C": 1.0}
    plain = recruiter(prices=prices).recruit(["x"], matches("algebra"), seed=1, k=1, mode="global")
    assert plain.experts == ("B",)  # the most competent overall
    weighed = recruiter(RecruitConfig(cost_lambda=5), prices=prices).recruit(["x"], matches("algebra"), seed=1, k=1,
                                                                           mode="global")
    assert weighed.experts == ("A",) and "cost factor" in weighed.explain()[0]
    draws = {recruiter(RecruitConfig(cost_lambda=lam), prices=prices).recruit(["x"], matches(skill), seed=7, k=2,
                                                                              mode="random").experts
             for lam in (0, 5) for skill in ("algebra", "geometry")}
    assert len(draws) == 1
