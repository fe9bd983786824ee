"""The aggregator is chosen on evidence: the whole benchmark, its standard error, near-ties, per-node choice."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import kind_of
from loopback_llm import ScriptedLLM, write_pool

from orchestra import Agent, Orchestra, Plan, Pool
from orchestra.errors import ConfigError
from orchestra.matching import Match
from orchestra.models import ChatRequest, FunctionModel
from orchestra.profile import Provenance, SkillProfile
from orchestra.profiling import AggregationResult, build_profiles
from orchestra.recruit import RecruitConfig, Recruiter, SkillTable, choose_aggregator, node_aggregator
from orchestra.settings import RunSpec, Settings
from orchestra.store import RunStore
from orchestra.testing.simulation import simulated_pool

PROVENANCE = Provenance(dataset="val.jsonl", dataset_sha256="0" * 64, items=100, model="test")


def profile(agent: str, skills: dict[str, int], *, score: float | None = None, items: int | None = None,
            by_skill: dict[str, tuple[int, int]] | None = None) -> SkillProfile:
    stderr = math.sqrt(score * (1 - score) / items) if score is not None and items else None
    return SkillProfile(agent=agent, skills=skills, accuracy=0.5, aggregation_score=score, aggregation_items=items,
                        aggregation_stderr=stderr, aggregation_skills=by_skill or {}, provenance=PROVENANCE)


# --- profiling: every usable item, item count and standard error -------------------------------


def test_profiling_uses_every_usable_item_and_records_count_and_stderr() -> None:
    sim = simulated_pool(seed=3)
    pool = sim.pool()
    report = build_profiles(pool, sim.items(6), seed=3)
    usable = [item_id for item_id in report.item_keywords
              if any(report.correct[a][item_id] for a in sim.agents)
              and sum(not report.correct[a][item_id] for a in sim.agents) >= 2]
    assert len(usable) > 30  # more than the old default of 30
    assert report.aggregation_items == len(usable)
    keyword_items = sum(len(set(report.item_keywords[i])) for i in usable)
    for prof in report.profiles.values():
        p = prof.aggregation_score
        assert prof.aggregation_items == len(usable)
        n = len(usable)
        q = (p * n + 2) / (n + 4)  # (Agresti-Coull)
        assert prof.aggregation_stderr == pytest.approx(math.sqrt(q * (1 - q) / (n + 4)))
        # the same benchmark per keyword: each item counted once under each of its keywords
        assert sum(n for _, n in prof.aggregation_skills.values()) == keyword_items
        assert all(0 <= c <= n for c, n in prof.aggregation_skills.values())


def test_an_explicit_limit_still_caps_the_benchmark() -> None:
    sim = simulated_pool(seed=1)
    report = build_profiles(sim.pool(), sim.items(4), seed=1, aggregation_items=7)
    assert report.aggregation_items == 7
    for prof in report.profiles.values():
        p = prof.aggregation_score
        q = (p * 7 + 2) / 11
        assert prof.aggregation_items == 7 and prof.aggregation_stderr == pytest.approx(math.sqrt(q * (1 - q) / 11))
    none = build_profiles(sim.pool(), sim.items(4), seed=1, aggregation_items=0)
    assert all(p.aggregation_score is None and p.aggregation_items is None for p in none.profiles.values())


def test_one_lucky_benchmark_item_does_not_outweigh_a_long_strong_record() -> None:
    """A 1-item benchmark answered right read ``1.00 ±0.00`` and won the choice over 34 of 40 with
    a higher γ: its error is now that of one item (0.22), so the two are a near-tie γ breaks."""
    lucky = AggregationResult.from_grades([True], [["x"]])
    strong = AggregationResult.from_grades([True] * 34 + [False] * 6, [["x"]] * 40)
    assert lucky.stderr == pytest.approx(math.sqrt(0.6 * 0.4 / 5))  # 0.22
    assert strong.stderr == pytest.approx(math.sqrt((36 / 44) * (8 / 44) / 44))  # near sqrt(p(1-p)/n) = 0.056
    profiles = {name: SkillProfile(agent=name, skills={"x": 1}, accuracy=0.5, aggregation_score=result.score,
                                   aggregation_items=result.items, aggregation_stderr=result.stderr,
                                   provenance=PROVENANCE)
                for name, result in (("lucky", lucky), ("strong", strong))}
    assert choose_aggregator(profiles, {"lucky": 0.3, "strong": 0.7}, ["lucky", "strong"]) == "strong"


def test_profiles_round_trip_and_old_files_without_the_new_fields_load(tmp_path: Path) -> None:
    saved = profile("a", {"x": 2}, score=0.75, items=40, by_skill={"x": (3, 4)}).save(tmp_path)
    again = SkillProfile.load(saved)
    assert (again.aggregation_items, again.aggregation_skills) == (40, {"x": (3, 4)})
    assert again.aggregation_stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 40))
    old = {"version": 1, "agent": "old", "skills": {"x": 1}, "accuracy": 0.5, "competence": 0.2,
           "aggregation_score": 0.6, "provenance": PROVENANCE.model_dump()}
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = SkillProfile.load(tmp_path / "old.json")
    assert loaded.aggregation_items is None and loaded.aggregation_stderr is None and loaded.aggregation_skills == {}
    # an old profile still competes: its unknown error means only exact ties are ties
    assert choose_aggregator({"old": loaded, "a": again}, {"old": 0.9, "a": 0.1}, ["old", "a"]) == "a"


def test_cli_profile_uses_every_item_unless_limited(loopback, tmp_path: Path) -> None:
    def expert(model: str, assignment: str) -> str:
        good = {"alpha": "history", "beta": "arithmetic", "gamma": "writing"}[model]
        return "The answer is 1" if good in assignment else "The answer is 2"

    server = loopback(ScriptedLLM(expert=expert, keywords=["general"]).handler())
    data = tmp_path / "val.jsonl"
    rows = [{"id": f"{topic}{i}", "question": f"A {topic} question number {i}", "answer": "1", "category": topic}
            for topic in ("history", "arithmetic", "writing") for i in range(4)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pool = write_pool(tmp_path, server.url)
    env = {**os.environ, "ORCHESTRA_ALLOW_MODEL_REQUESTS": "1"}
    for flags, expected in (((), 12), (("--aggregation-items", "5"), 5)):
        out = tmp_path / f"profiles{expected}"
        done = subprocess.run([sys.executable, "-m", "orchestra", "profile", "--pool", str(pool), "--data", str(data),
                               "--out", str(out), "--json", *flags], capture_output=True, text=True, env=env,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["aggregation_items"] == expected
        written = json.loads((out / "alpha-expert.json").read_text())
        assert written["aggregation_items"] == expected and written["aggregation_stderr"] is not None


# --- the global choice: best score, near-ties by global competence -----------------------------


def test_a_clearly_better_aggregator_wins_whatever_its_competence() -> None:
    profiles = {"a": profile("a", {}, score=0.9, items=200), "b": profile("b", {}, score=0.6, items=200)}
    assert choose_aggregator(profiles, {"a": 0.01, "b": 0.99}, ["a", "b"]) == "a"
    # a gap the benchmark resolves (one standard error is about 0.01 on 2000 items) is not a tie either
    profiles = {"a": profile("a", {}, score=0.80, items=2000), "b": profile("b", {}, score=0.77, items=2000)}
    assert choose_aggregator(profiles, {"a": 0.01, "b": 0.99}, ["a", "b"]) == "a"


def test_near_ties_go_to_global_competence_not_to_the_name() -> None:
    # exact tie: the name rule would pick "zed" (or "abe", alphabetically); competence picks "mid"
    profiles = {n: profile(n, {}, score=0.7, items=100) for n in ("abe", "mid", "zed")}
    assert choose_aggregator(profiles, {"abe": 0.2, "mid": 0.5, "zed": 0.3}, ["abe", "mid", "zed"]) == "mid"
    # within one standard error of the best (0.046 on 100 items): a near-tie, the more competent wins
    profiles = {"zed": profile("zed", {}, score=0.70, items=100), "abe": profile("abe", {}, score=0.67, items=100)}
    assert choose_aggregator(profiles, {"abe": 0.6, "zed": 0.4}, ["abe", "zed"]) == "abe"
    assert choose_aggregator(profiles, {"abe": 0.4, "zed": 0.6}, ["abe", "zed"]) == "zed"
    # the same gap on 30 items is a tie; with margin 0 the best score alone decides
    assert choose_aggregator(profiles, {"abe": 0.6, "zed": 0.4}, ["abe", "zed"], margin=0.0) == "zed"
    # a configured aggregator always wins; with no scores at all, competence decides
    assert choose_aggregator(profiles, {"abe": 0.6, "zed": 0.4}, ["abe", "zed"], configured="zed") == "zed"
    assert choose_aggregator({}, {"abe": 0.6, "zed": 0.4}, ["abe", "zed"]) == "abe"


# --- per-node choice ---------------------------------------------------------------------------


def per_node_profiles() -> dict[str, SkillProfile]:
    """``chem`` and ``hist`` are specialists; ``gen`` fits both topics a little; ``hist`` is the best
    aggregator overall, ``chem`` the best on chemistry."""
    return {
        "chem": profile("chem", {"chemistry": 10, "history": -6}, score=0.70, items=40,
                        by_skill={"chemistry": (19, 20), "history": (9, 20)}),
        "hist": profile("hist", {"chemistry": -6, "history": 10}, score=0.90, items=40,
                        by_skill={"chemistry": (16, 20), "history": (20, 20)}),
        "gen": profile("gen", {"chemistry": 2, "history": 2}, score=0.60, items=40,
                       by_skill={"chemistry": (12, 20), "history": (12, 20)}),
    }


def recruiter(profiles: dict[str, SkillProfile]) -> Recruiter:
    config = RecruitConfig()
    table = SkillTable.build(list(profiles), profiles, {}, {}, config)
    return Recruiter(table, config)


def recruit_on(rec: Recruiter, skill: str | None):
    matches = [Match(skill, skill, 1.0)] if skill else []
    return rec.recruit([skill] if skill else [], matches, seed=0, k=2, mode="topk")


def test_node_aggregator_is_the_best_measured_among_the_agents_that_fit() -> None:
    profiles = per_node_profiles()
    rec = recruiter(profiles)
    gamma = rec.table.competence
    best = choose_aggregator(profiles, gamma, list(profiles))
    assert best == "hist"
    chemistry = node_aggregator(profiles, gamma, recruit_on(rec, "chemistry"), best)
    assert chemistry.agent == "chem"  # hist does not fit chemistry, gen fits but aggregates it worse
    assert "chem (per node)" in chemistry.explain() and "2 fitting agent(s)" in chemistry.explain()
    history = node_aggregator(profiles, gamma, recruit_on(rec, "history"), best)
    assert history.agent == "hist"
    # no matched skill: the pool's best aggregator
    blind = node_aggregator(profiles, gamma, recruit_on(rec, None), best)
    assert blind.agent == "hist" and "no skill matched" in blind.reason


def test_node_aggregator_near_tie_goes_to_the_better_fit_and_old_profiles_use_the_overall_score() -> None:
    profiles = {
        "close": profile("close", {"chemistry": 3}, score=0.80, items=40),  # no per-skill record: overall score
        "expert": profile("expert", {"chemistry": 12}, score=0.78, items=40),
        "poor": profile("poor", {"chemistry": 5}, score=0.30, items=40),
    }
    rec = recruiter(profiles)
    choice = node_aggregator(profiles, rec.table.competence, recruit_on(rec, "chemistry"), "close")
    assert choice.agent == "expert" and "near tie with close" in choice.reason


# --- in a run ----------------------------------------------------------------------------------


def team(**options: object) -> tuple[Pool, dict[str, FunctionModel]]:
    """Three agents with the per-node profiles; each names itself when it aggregates."""
    models = {}
    for name in ("chem", "hist", "gen"):
        def reply(request: ChatRequest, name: str = name) -> str:
            return f"aggregated by {name}" if kind_of(request) == "aggregate" else f"{name}: The answer is 1"
        models[name] = FunctionModel(reply, name=name)
    planner = FunctionModel(lambda request: "Final: both parts done.", name="planner")
    pool = Pool(agents=[Agent(name=n, model=m) for n, m in models.items()], planner=planner,
                profiles=per_node_profiles(), **options)  # type: ignore[arg-type]
    return pool, models


PLAN = Plan.model_validate({"subtasks": [
    {"id": "reaction", "instruction": "Balance the reaction", "skills": ["chemistry"]},
    {"id": "treaty", "instruction": "Date the treaty", "skills": ["history"]},
]})


def run_plan(orc: Orchestra, **overrides: object) -> dict[str, tuple[str | None, str | None]]:
    result = orc.run("Balance the reaction and date the treaty", plan=PLAN, **overrides)
    assert result.status == "done", result.error
    return {node.id: (node.aggregator, node.output) for node in result.plan.nodes}


def test_per_node_recruiting_in_a_run_changes_who_aggregates_each_node() -> None:
    pool, models = team()
    best = Orchestra(pool, k=2, mode="topk", store=False)
    assert best.settings.aggregator_choice == "best"
    assert run_plan(best) == {"reaction": ("hist", "aggregated by hist"), "treaty": ("hist", "aggregated by hist")}

    pool, models = team()
    orc = Orchestra(pool, k=2, mode="topk", store=False, aggregator_choice="per-node")
    result = orc.run("Balance the reaction and date the treaty", plan=PLAN)
    nodes = {node.id: node for node in result.plan.nodes}
    assert (nodes["reaction"].aggregator, nodes["reaction"].output) == ("chem", "aggregated by chem")
    assert (nodes["treaty"].aggregator, nodes["treaty"].output) == ("hist", "aggregated by hist")
    explanation = nodes["reaction"].recruitment["explanation"]  # type: ignore[index]
    assert any(line.startswith("aggregator chem (per node):") for line in explanation)
    # the chosen agent's model got the node's aggregation request, and hist's only its own node's
    aggregations = {name: [r for r in model.requests if kind_of(r) == "aggregate"] for name, model in models.items()}
    assert [len(aggregations[n]) for n in ("chem", "hist", "gen")] == [1, 1, 0]
    assert "Balance the reaction" in aggregations["chem"][0].prompt_text()


def test_choice_layers_call_over_pool_over_default_and_a_fixed_aggregator_wins() -> None:
    pool, _ = team(settings=Settings(aggregator_choice="per-node"))
    assert Orchestra(pool, store=False).settings.aggregator_choice == "per-node"
    assert Orchestra(pool, store=False, aggregator_choice="best").settings.aggregator_choice == "best"
    # per run, too
    pool, _ = team()
    orc = Orchestra(pool, k=2, mode="topk", store=False)
    assert run_plan(orc, aggregator_choice="per-node")["reaction"][0] == "chem"
    # a configured aggregator (call or pool) aggregates every node
    pool, _ = team()
    fixed = Orchestra(pool, k=2, mode="topk", store=False, aggregator="gen", aggregator_choice="per-node")
    assert {a for a, _ in run_plan(fixed).values()} == {"gen"}
    pool, _ = team(aggregator="gen")
    assert {a for a, _ in run_plan(Orchestra(pool, k=2, mode="topk", store=False,
                                             aggregator_choice="per-node")).values()} == {"gen"}
    with pytest.raises(ConfigError, match="aggregator_choice"):
        Orchestra(pool, store=False, aggregator_choice="smartest")
    with pytest.raises(ConfigError, match="aggregator_choice"):
        orc.run("x", aggregator_choice="smartest")


def test_the_choice_is_stored_with_the_run_spec() -> None:
    spec = RunSpec(task="t", settings=Settings(aggregator_choice="per-node"))
    assert RunSpec.from_record(json.loads(spec.record_json()), "t").settings.aggregator_choice == "per-node"
    recorded_before = {"options": {"k": 2}, "orchestra": {}}  # a run recorded by version 0.1
    assert RunSpec.from_record(recorded_before, "t").settings.aggregator_choice == "best"


def test_pool_file_settings_accept_the_choice(tmp_path: Path) -> None:
    path = tmp_path / "pool.yaml"
    path.write_text("models:\n  m:\n    type: openai\n    model: x\n    base_url: http://127.0.0.1:9/v1\n"
                    "    api_key_env: null\nsettings:\n  aggregator_choice: per-node\n"
                    "agents:\n  - name: a\n    model: m\n")
    assert Pool.load(path).settings.aggregator_choice == "per-node"
    path.write_text(path.read_text().replace("per-node", "cleverest"))
    with pytest.raises(ConfigError, match="aggregator_choice"):
        Pool.load(path)


def test_per_node_on_a_simulated_pool_picks_topical_aggregators() -> None:
    """Aggregation skill that follows topic knowledge: per-node choice finds the topic's best aggregator
    far more often than the single global best does (the bench measures how much it helps accuracy)."""
    sim = simulated_pool(seed=2, aggregation_levels=[0.45, 0.52, 0.59, 0.66, 0.73, 0.80], topical_aggregation=1.0)
    pool = sim.pool()
    pool.profiles = build_profiles(pool, sim.items(12), seed=2).profiles
    held_out = sim.items(6, offset=1000)
    hits = {}
    for choice in ("best", "per-node"):
        orc = Orchestra(pool, k=3, mode="topk", aggregate="synthesize", plan=False, store=False, seed=2,
                        aggregator_choice=choice)
        results = orc.run_many([item.prompt() for item in held_out])
        nodes = [(r.plan.nodes[0].aggregator, item.category) for r, item in zip(results, held_out)]
        hits[choice] = sum(agent == sim.best_aggregator(skill) for agent, skill in nodes if agent)
    assert hits["per-node"] > hits["best"]


def test_cli_aggregator_choice_flag_recruits_per_node(loopback, tmp_path: Path) -> None:
    llm = ScriptedLLM()  # plans facts (history), numbers (arithmetic), report (writing)
    server = loopback(llm.handler())
    own = {"alpha": "history", "beta": "arithmetic", "gamma": "writing"}
    for model, skill in own.items():
        skills = {s: (5 if s == skill else 1) for s in own.values()}
        by_skill = {s: ((10, 10) if s == skill else (3, 10)) for s in own.values()}
        overall = 0.9 if model == "gamma" else 0.6
        profile(f"{model}-expert", skills, score=overall, items=30, by_skill=by_skill).save(tmp_path / "profiles")
    pool = write_pool(tmp_path, server.url, extra="profiles: profiles\n")
    env = {**os.environ, "ORCHESTRA_ALLOW_MODEL_REQUESTS": "1"}
    aggregators = {}
    for choice in ("best", "per-node"):
        done = subprocess.run([sys.executable, "-m", "orchestra", "ask", "Write a short report, then check it",
                               "--pool", str(pool), "--mode", "topk", "--k", "2", "--aggregator-choice", choice,
                               "--no-store", "--json"], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        aggregators[choice] = {n["id"]: n["aggregator"] for n in json.loads(done.stdout)["plan"]["nodes"]}
    assert aggregators["best"] == {"facts": "gamma-expert", "numbers": "gamma-expert", "report": "gamma-expert"}
    assert aggregators["per-node"] == {"facts": "alpha-expert", "numbers": "beta-expert", "report": "gamma-expert"}


def test_a_near_tie_with_equal_competence_goes_to_the_better_measured_score_not_the_later_name() -> None:
    """generalist 0.625 ± 0.14 and math 0.50 tie within an error; with equal γ, "math" won by its name
    (found by a trial: `orchestra agents` said aggregator: math)."""
    from orchestra.recruit import near_tie_best

    scored = {"generalist": (0.625, 0.14), "math": (0.50, 0.10)}
    assert near_tie_best(scored, {"generalist": (0.7,), "math": (0.7,)}) == ("generalist", ["generalist", "math"])
    assert near_tie_best(scored, {"generalist": (0.6,), "math": (0.7,)})[0] == "math"  # (γ still decides first)
    assert near_tie_best({"b": (0.5, 0.1), "a": (0.5, 0.1)}, {})[0] == "b"  # (the name, last)


@pytest.mark.parametrize("failure", ["server", "json", "python"])
def test_a_failed_aggregator_leaves_the_experts_answers_to_a_vote(failure: str, tmp_path: Path) -> None:
    """One aggregator endpoint failing (HTTP 500, or JSON it could not repair) failed every node it
    aggregated though its experts had answered (21 of 80 items of an evaluation); the node now takes
    its experts' vote, says so, and the run is done. A model in Python whose client library raised
    (a RuntimeError) failed the run ("unexpected RuntimeError") where an expert's was tolerated."""
    from helpers import AGGREGATE_MARK

    from orchestra.errors import InvalidOutput, RequestRejected
    from orchestra.events import AggregationFellBack

    def answer(request: ChatRequest) -> str:
        if AGGREGATE_MARK in request.prompt_text():
            if failure == "python":
                raise RuntimeError("my client library raised")
            raise RequestRejected("http://127.0.0.1:9/v1 answered HTTP 500") if failure == "server" else \
                InvalidOutput("judge returned invalid JSON for Answer")
        return "The answer is 7"

    models = {name: FunctionModel(answer, name=name) for name in ("a", "b", "judge")}
    pool = Pool(agents=[Agent(name=name, model=model) for name, model in models.items()])
    told: list[AggregationFellBack] = []
    store = RunStore(tmp_path / "runs.db")
    orc = Orchestra(pool, k=2, mode="topk", store=store, aggregator="judge", aggregate="synthesize",
                    on_event=lambda event: told.append(event) if isinstance(event, AggregationFellBack) else None)
    result = orc.run("What is 3 + 4?", plan=False)
    [row] = store.nodes(result.run_id)  # what `orchestra show` reads: it said nothing of why there was none
    assert row["aggregator"] is None and row["explanation"][-1].startswith("aggregator judge failed (")
    assert (result.status, result.answer) == ("done", "The answer is 7")
    [node] = result.plan.nodes
    assert node.aggregator is None and any("aggregator judge failed" in line for line in node.recruitment["explanation"])
    assert [(event.node, event.aggregator) for event in told] == [("answer", "judge")]
    assert sum(1 for request in models["judge"].requests if AGGREGATE_MARK in request.prompt_text()) == 1


def test_the_pools_aggregator_says_why_it_aggregates_in_each_nodes_explanation() -> None:
    """Under the default `aggregator_choice: best` outside the calibrated router, a node named its
    aggregator with no word of why (the README says the choice and its numbers are a line of it)."""
    from orchestra.pipeline.staffing import Staffing

    model = FunctionModel(lambda request: "x", name="m")
    agents = [Agent(name=name, model=model) for name in ("a", "b", "c")]
    scored = {"a": profile("a", {"x": 1}, score=0.6, items=50), "b": profile("b", {"x": 2}, score=0.8, items=50)}
    say = {
        "measured": (Pool(agents=agents, profiles=scored), {},
                     "aggregator b: the pool's best measured aggregator (score 0.800; aggregator_choice: per-node "
                     "picks one per node)"),
        "competence": (Pool(agents=agents, profiles={"a": profile("a", {"x": 5}), "b": profile("b", {"x": 1})}), {},
                       "aggregator a: no aggregation measured; the highest global competence"),
        "nothing": (Pool(agents=agents), {}, "aggregator c: nothing measured (run orchestra profile): the last agent "
                                             "by name"),
        "settings": (Pool(agents=agents, profiles=scored), {"aggregator": "a"}, "aggregator a: set in the run's "
                                                                                  "settings"),
        "pool": (Pool(agents=agents, profiles=scored, aggregator="c"), {}, "aggregator c: set in the pool"),
        # (each said "nothing measured (run orchestra profile)", which profiling again could not change)
        "alone": (Pool(agents=agents[:1], profiles={"a": profile("a", {"x": 1})}), {},
                  "aggregator a: the pool's only agent"),
        "equal": (Pool(agents=agents[:2], profiles={"a": profile("a", {"x": 1}), "b": profile("b", {"x": 1})}), {},
                  "aggregator b: no aggregation measured, and every agent's global competence is equal (γ=0.500): "
                  "the last agent by name"),
    }
    for case, (pool, settings, reason) in say.items():
        staffing = Staffing(pool, Settings(mode="topk", **settings))
        assert staffing.aggregator_reason.startswith(reason), (case, staffing.aggregator_reason)
