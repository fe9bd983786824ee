"""The market of specialists and generalists over loopback HTTP, from the command line: profile,
then eval each method and a sweep; accuracy and cost as the server counted them."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from test_cli import cli

from orchestra.testing import LoopbackRequest, Reply
from orchestra.testing.loopback import openai_reply
from orchestra.testing.simulation import SimulatedPool, specialist_pool


class Market:
    """The server side: answers as the simulated agents, counts requests and the cost of each
    answer at the agent's price (what a provider would bill)."""

    def __init__(self, sim: SimulatedPool) -> None:
        self.sim = sim
        self.requests: Counter[str] = Counter()
        self.cost = 0.0

    def handler(self, request: LoopbackRequest) -> Reply:
        payload = request.json()
        model, prompt = payload["model"], request.prompt
        self.requests[model] += 1
        if model == "keywords":
            return openai_reply(json.dumps(self.sim.keywords(prompt, payload.get("seed"))), model=model)
        text = self.sim.answer(model, prompt)
        prompt_tokens, completion_tokens = len(prompt) // 4 + 1, len(text) // 4 + 1
        price_in, price_out = (self.sim.prices or {})[model]
        self.cost += (prompt_tokens * price_in + completion_tokens * price_out) / 1e6
        return openai_reply(text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, model=model)

    def reset(self) -> tuple[Counter[str], float]:
        counted = (self.requests, self.cost)
        self.requests, self.cost = Counter(), 0.0
        return counted


def market_files(directory: Path, url: str, sim: SimulatedPool) -> tuple[Path, Path, Path]:
    models = "".join(f"""
  {name}:
    type: openai
    model: {name}
    base_url: {url}/v1
    api_key_env: null
    prices: {{input: {price[0]}, output: {price[1]}}}""" for name, price in (sim.prices or {}).items())
    agents = "".join(f"\n  - {{name: {name}, model: {name}}}" for name in sim.agents)
    pool = directory / "market.yaml"
    pool.write_text(f"""name: market
models:{models}
  keywords:
    type: openai
    model: keywords
    base_url: {url}/v1
    api_key_env: null
planner: keywords
keywords: keywords
profiles: profiles
settings: {{k: 3}}
agents:{agents}
""")
    validation, test = directory / "validation.jsonl", directory / "test.jsonl"
    for path, items in ((validation, sim.items(15)), (test, sim.items(10, offset=1000))):
        path.write_text("".join(json.dumps({"id": i.id, "question": i.question, "answer": i.answer,
                                            "category": i.category}) + "\n" for i in items))
    return pool, validation, test


def test_profile_then_eval_each_method_as_the_server_counts_it(loopback, tmp_path: Path) -> None:
    sim = specialist_pool(seed=1)
    market = Market(sim)
    server = loopback(market.handler)
    pool, validation, test = market_files(tmp_path, server.url, sim)

    profiled = cli("profile", "--pool", str(pool), "--data", str(validation), "--json")
    assert profiled.returncode == 0, profiled.stderr
    merged = json.loads(profiled.stdout)["merged_skills"]
    groups = [{skill, *variants} for skill, variants in merged.items()]
    assert {"algebra", "basic algebra", "algebra problems"} in groups
    assert any({"organic chemistry", "organic chem"} <= group for group in groups)
    stored = json.loads((tmp_path / "profiles" / "spec0.json").read_text())
    market.reset()
    # β weighs the Symbolic-MoE draw; calibrated recruiting on measured profiles ranks by calibrated
    # accuracy (β 0, 1 and 50 gave the same team): the flag is refused, not accepted and dropped
    unused = cli("eval", "--pool", str(pool), "--data", str(test), "--competence-weight", "0", "--no-store")
    assert (unused.returncode, unused.stderr.splitlines()[0]) == (
        2, "error: --competence-weight (recruit.competence_weight) weighs the Symbolic-MoE draw; calibrated recruiting "
           "on measured profiles does not use it: leave it out, or use --method symbolic-moe (see python -m "
           "orchestra eval --help)")
    chosen = cli("eval", "--pool", str(pool), "--data", str(test), "--aggregator-choice", "per-node", "--no-store")
    assert (chosen.returncode, chosen.stderr.splitlines()[0]) == (  # (the same teams and calls, its name unsaid)
        2, "error: --aggregator-choice (aggregator_choice) says how a node's aggregator is chosen; calibrated "
           "recruiting on measured profiles chooses it with each team: leave it out, or use --method symbolic-moe "
           "(see python -m orchestra eval --help)")
    assert sum(market.reset()[0].values()) == 0
    algebra = stored["aliases"].get("algebra", "algebra")
    assert stored["aliases"].get("basic algebra") in (algebra, None) and stored["answer_tokens"][1] > 0
    assert 12 <= stored["skill_counts"][algebra][1] <= 15  # its variants pooled: one count per item
    market.reset()

    reports = {}
    for method in ("calibrated", "moa", "symbolic-moe"):
        done = cli("eval", "--pool", str(pool), "--data", str(test), "--method", method, "--no-store", "--json")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        requests, cost = market.reset()
        assert report["requests"] == sum(requests.values())  # our count is the server's
        assert abs(report["cost_usd"] - cost) <= 1e-9 + 0.01 * cost  # and so is our bill
        reports[method] = (report["accuracy"], cost, requests)

    best = sim.best_routing_accuracy(sim.items(10, offset=1000))
    (ours, our_cost, our_requests), (moa, moa_cost, _), (exact, _, _) = (
        reports["calibrated"], reports["moa"], reports["symbolic-moe"])
    assert ours > moa and ours > exact
    assert our_cost <= 0.2 * moa_cost
    assert ours >= best - 0.03
    specialists = sum(n for model, n in our_requests.items() if model.startswith("spec"))
    generalists = sum(n for model, n in our_requests.items() if model.startswith("gen"))
    assert specialists > 2 * generalists


def test_a_sweep_reports_every_method_and_draws_the_frontier(loopback, tmp_path: Path) -> None:
    sim = specialist_pool(seed=2)
    market = Market(sim)
    server = loopback(market.handler)
    pool, validation, test = market_files(tmp_path, server.url, sim)
    assert cli("profile", "--pool", str(pool), "--data", str(validation)).returncode == 0
    market.reset()
    plot = tmp_path / "frontier.html"
    done = cli("eval", "--pool", str(pool), "--data", str(test), "--sweep", "--lambdas", "0,0.05,1", "--limit", "24",
               "--plot", str(plot), "--no-store", "--json")
    assert done.returncode == 0, done.stderr
    points = {p["method"]: p for p in json.loads(done.stdout)["points"]}
    assert set(points) == {"symbolic-moe", "vote", "moa", "random", "single",
                           "calibrated λ=0", "calibrated λ=0.05", "calibrated λ=1"}
    requests, cost = market.reset()
    assert sum(p["calls"] for p in points.values()) == sum(requests.values())  # no retries on this server
    assert sum(p["requests"] for p in points.values()) == sum(requests.values())  # each point's, as counted there
    assert all(sum(category["items"] for category in p["per_category"].values()) == 24 for p in points.values())
    assert abs(sum(p["spent_usd"] for p in points.values()) - cost) <= 0.01 * cost
    assert points["calibrated λ=1"]["cost_usd"] < points["calibrated λ=0.05"]["cost_usd"] < points["moa"]["cost_usd"]
    frontier = {name for name, p in points.items() if p["on_frontier"]}
    assert "moa" not in frontier and "calibrated λ=0.05" in frontier
    page = plot.read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page and page.count("<circle") == len(points)
    assert "calibrated λ=0.05" in page

    table = cli("eval", "--pool", str(pool), "--data", str(test), "--sweep", "--lambdas", "0.05", "--limit", "4",
                "--no-store")
    assert table.returncode == 0 and "frontier" in table.stdout and "calibrated λ=0.05" in table.stdout
    capped = cli("eval", "--pool", str(pool), "--data", str(test), "--sweep", "--lambdas", "1", "--limit", "2",
                 "--max-cost-per-item", "0.5", "--no-store", "--json")  # (the cap changes the router's points)
    assert capped.returncode == 0, capped.stderr
    assert [p["method"] for p in json.loads(capped.stdout)["points"]][-1] == "calibrated λ=1, cap $0.5000/item"
    market.reset()
    two = cli("eval", "--pool", str(pool), "--data", str(test), "--sweep", "--lambdas", "0.05", "--limit", "2",
              "--k", "2", "--no-store", "--json")  # (its points were named as at k=3, single's with 2 experts)
    assert two.returncode == 0, two.stderr
    named = {p["method"]: p for p in json.loads(two.stdout)["points"]}
    assert set(named) == {"symbolic-moe, k=2", "vote, k=2", "moa, k=2", "random, k=2", "single",
                          "calibrated λ=0.05, k=2"}
    made = {name: p["calls"] + p["reused_calls"] for name, p in named.items()}  # (sent, or taken from a point)
    assert made["single"] == 2 and made["moa, k=2"] == 2 * 3  # one expert an item; two + synthesis
    assert sum(p["requests"] for p in named.values()) == sum(market.reset()[0].values())
    for flag in (("--aggregate", "vote"), ("--mode", "topk"), ("--set", "aggregate=vote")):  # (two points were one)
        mixed = cli("eval", "--pool", str(pool), "--data", str(test), "--sweep", *flag)
        assert (mixed.returncode, mixed.stderr.splitlines()[-1]) == (
            2, "error: --sweep compares the methods, each with its own recruiting and aggregation: leave out --mode "
               "and --aggregate (see python -m orchestra eval --help)")
    bad = cli("eval", "--pool", str(pool), "--data", str(test), "--sweep", "--lambdas", "cheap")
    assert bad.returncode == 2 and "--lambdas" in bad.stderr and "comma-separated" in bad.stderr
    empty = cli("eval", "--pool", str(pool), "--data", str(test), "--sweep", "--lambdas", "0.1,,0.2")  # (0.2 was dropped)
    assert empty.returncode == 2 and "'0.1,,0.2' is not a comma-separated list of numbers" in empty.stderr
    twice = cli("eval", "--pool", str(pool), "--data", str(test), "--sweep", "--lambdas", "0.05,0,0.050")
    assert (twice.returncode, twice.stderr.strip()) == (2, "error: Invalid value for --lambdas: 0.05 is given twice "
                                                           "(see python -m orchestra eval --help)")  # (paid twice)
    for endless in ("0,inf", "0,1e400"):  # (every point was paid for, then the last refused and all lost)
        refused = cli("eval", "--pool", str(pool), "--data", str(test), "--sweep", "--lambdas", endless)
        assert refused.returncode == 2 and "give one or more finite numbers >= 0" in refused.stderr
    assert sum(market.reset()[0].values()) == 0
    lonely = cli("eval", "--pool", str(pool), "--data", str(test), "--plot", str(plot))
    assert lonely.returncode == 2 and "add --sweep" in lonely.stderr
    dropped = cli("eval", "--pool", str(pool), "--data", str(test), "--lambdas", "0,1")  # (ran a plain eval)
    assert dropped.returncode == 2 and "--lambdas are the points of a sweep: add --sweep" in dropped.stderr
    planned = cli("eval", "--pool", str(pool), "--data", str(test), "--set", "plan=true")  # (was accepted, unused)
    assert planned.returncode == 2 and "without a plan: leave out --set plan" in planned.stderr
    for sweep in ((), ("--sweep",)):  # (a traceback: eval built the data set's budget unvalidated)
        nan = cli("eval", "--pool", str(pool), "--data", str(test), "--max-cost", "nan", *sweep)
        assert nan.returncode == 2 and nan.stderr.strip() == ("error: command line budget.max_cost_usd: Input should "
                                                              "be a finite number")


def test_profiles_unfit_to_route_by_are_named_before_anything_runs(tmp_path: Path) -> None:
    from orchestra.profile import Provenance, SkillProfile

    # (math's profile was written before the endpoint was recorded)
    for agent, model, endpoint in (("math", "mathbot", ""), ("bio", "biobot", "http://127.0.0.1:9/v1")):
        SkillProfile(agent=agent, skills={agent: 3}, accuracy=0.8, provenance=Provenance(
            dataset="v.jsonl", dataset_sha256="x", items=10, model=f"OpenAICompatible:{model}",
            endpoint=endpoint)).save(tmp_path / "p")

    def pool(profiles: str, math_model: str = "mathbot", extra: str = "", bio_url: str = "http://127.0.0.1:9/v1") -> str:
        models = "".join(f"\n  {m}: {{type: openai, model: {m}, base_url: '{bio_url if m == 'biobot' else 'http://127.0.0.1:9/v1'}', "
                         "api_key_env: null}" for m in ("mathbot", "biobot", "other"))
        path = tmp_path / "pool.yaml"
        path.write_text(f"models:{models}\nprofiles: {profiles}\nagents:\n  - {{name: math, model: {math_model}}}\n"
                        f"  - {{name: bio, model: biobot}}\n{extra}")
        return str(path)

    fine = cli("agents", "--pool", pool("p"))
    assert fine.returncode == 0 and fine.stderr == ""
    mistyped = cli("agents", "--pool", pool("profils"))
    assert mistyped.returncode == 0
    assert mistyped.stderr.startswith(f"warning: the profiles folder {tmp_path / 'profils'} does not exist")
    (tmp_path / "afile").write_text("")
    a_file = cli("agents", "--pool", pool("afile"))  # (it said a file that is there does not exist)
    assert a_file.stderr.startswith(f"warning: the profiles folder {tmp_path / 'afile'} is a file, not a folder:")
    swapped = cli("agents", "--pool", pool("p", math_model="other"))
    assert swapped.stderr == ("warning: the profile of math was measured on OpenAICompatible:mathbot, but the pool "
                              "now gives it OpenAICompatible:other: run orchestra profile again\n")
    # bio's model name is the same, its server is not (many servers answer with one name whatever they run)
    moved = cli("agents", "--pool", pool("p", bio_url="http://127.0.0.1:8/v1"))
    assert moved.stderr == ("warning: the profile of bio was measured on http://127.0.0.1:9/v1, but the pool now sends "
                            "it to http://127.0.0.1:8/v1: run orchestra profile again (unless that is the same server)\n")
    same = cli("agents", "--pool", pool("p", bio_url="http://someone:secret@127.0.0.1:9/v1/"))  # (credentials aside)
    assert same.returncode == 0 and same.stderr == ""
    joined = cli("agents", "--pool", pool("p", extra="  - {name: newbie, model: other}\n"
                                                    "  - {name: chemist, model: other, skills: [chemistry]}\n"))
    assert joined.stderr == ("warning: newbie has no measured profile: recruited on a uniform prior until orchestra "
                             "profile measures it\n")  # (the chemist is recruited on its declared skills)
    assert "(no profile)" in joined.stdout and "(declared) chemistry" in joined.stdout
    # the commands that send requests warn too (eval stops later, at the closed port; the warning came first)
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "1", "question": "1+1?", "answer": "2"}\n')
    tried = cli("eval", "--pool", pool("p", math_model="other"), "--data", str(data), "--no-store",
                env={"ORCHESTRA_ALLOW_MODEL_REQUESTS": "0"})
    assert tried.stderr.startswith("warning: the profile of math was measured on OpenAICompatible:mathbot")


def test_a_profile_measured_with_another_persona_or_sampling_is_named(tmp_path: Path) -> None:
    """An agent given another persona ("a historian who hates numbers") kept routing math by its old
    profile, with no word; a model or endpoint change was named."""
    from orchestra.agents import DEFAULT_PERSONA
    from orchestra.profile import Provenance, SkillProfile, persona_sha256

    SkillProfile(agent="math", skills={"math": 3}, accuracy=0.8, provenance=Provenance(
        dataset="v.jsonl", dataset_sha256="x", items=10, model="OpenAICompatible:mathbot",
        endpoint="http://127.0.0.1:9/v1", persona_sha256=persona_sha256(DEFAULT_PERSONA),
        sampling={"temperature": None, "max_tokens": 256})).save(tmp_path / "p")

    def pool(agent: str) -> str:
        path = tmp_path / "pool.yaml"
        path.write_text("models:\n  mathbot: {type: openai, model: mathbot, base_url: 'http://127.0.0.1:9/v1', "
                        f"api_key_env: null}}\nprofiles: p\nagents:\n  - {{name: math, model: mathbot, {agent}}}\n")
        return str(path)

    same = cli("agents", "--pool", pool("max_tokens: 256"))
    assert same.returncode == 0 and same.stderr == ""
    changed = cli("agents", "--pool", pool("max_tokens: 256, persona: 'You are a historian who hates numbers.', "
                                           "temperature: 1.5"))
    assert changed.stderr == ("warning: the profile of math was measured with another persona and temperature than "
                              "the pool now gives it: run orchestra profile again\n")
    assert cli("agents", "--pool", pool("max_tokens: 512")).stderr == (
        "warning: the profile of math was measured with another max_tokens than the pool now gives it: run orchestra "
        "profile again\n")


def test_agents_shows_skills_merged_as_recruiting_reads_them_and_who_aggregates(tmp_path: Path) -> None:
    """`agents` listed keyword variants apart ("european history +10, history of europe +7", which
    profile had merged), and named one aggregator where calibrated teams choose their own."""
    from orchestra.profile import Provenance, SkillProfile

    SkillProfile(agent="hist", skills={"european history": 10, "history of europe": 7, "geometry": 3}, accuracy=0.8,
                 aliases={"history of europe": "european history"},
                 provenance=Provenance(dataset="v.jsonl", dataset_sha256="x", items=20,
                                       model="OpenAICompatible:histbot")).save(tmp_path / "p")
    path = tmp_path / "pool.yaml"
    path.write_text("models:\n  histbot: {type: openai, model: histbot, base_url: 'http://127.0.0.1:9/v1', "
                    "api_key_env: null}\nprofiles: p\nagents:\n  - {name: hist, model: histbot}\n")
    listed = json.loads(cli("agents", "--pool", str(path), "--json").stdout)
    assert listed["agents"][0]["top_skills"] == ["european history +17", "geometry +3"]
    table = cli("agents", "--pool", str(path))
    assert "aggregator: hist (calibrated teams choose their own)" in table.stdout


@pytest.mark.parametrize(("mode", "match"), [
    ("calibrated", {"keyword": "history of europe", "skill": "european history", "similarity": 1.0,
                    "variant": "history of europe"}),
    ("symbolic-moe", {"keyword": "history of europe", "skill": "history of europe", "similarity": 1.0}),
])
def test_ask_json_matches_name_the_skill_recruiting_counted(loopback, tmp_path: Path, mode: str,
                                                            match: dict[str, object]) -> None:
    """`ask --json` matched a keyword variant to its own skill ("history of europe") where calibrated
    recruiting, and show's explanation, counted the skill profiling merged it into ("european history")."""
    from loopback_llm import ScriptedLLM

    from orchestra.profile import Provenance, SkillProfile

    server = loopback(ScriptedLLM(keywords=["history of europe"]).handler())
    for agent, right in (("hist", 17), ("geo", 8)):
        SkillProfile(agent=agent, skills={"european history": 10, "history of europe": 7}, accuracy=right / 20,
                     aliases={"history of europe": "european history"}, skill_counts={"european history": (right, 20)},
                     provenance=Provenance(dataset="v.jsonl", dataset_sha256="x", items=20,
                                           model=f"OpenAICompatible:{agent}")).save(tmp_path / "p")
    path = tmp_path / "pool.yaml"
    path.write_text("models:\n" + "".join(f"  {a}: {{type: openai, model: {a}, base_url: '{server.url}/v1', "
                                          "api_key_env: null}\n" for a in ("hist", "geo"))
                    + "profiles: p\nagents:\n  - {name: hist, model: hist}\n  - {name: geo, model: geo}\n")
    done = cli("ask", "Who won at Waterloo?", "--pool", str(path), "--no-plan", "--k", "1", "--mode", mode, "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    recruitment = data["plan"]["nodes"][0]["recruitment"]
    assert recruitment["matches"] == [match]
    assert {part["skill"] for candidate in recruitment["candidates"] for part in candidate["contributions"]} == {
        match["skill"]}
    assert f"; {match['skill']} " in recruitment["explanation"][0]  # as show explains it
    shown = cli("show", data["run_id"], "--json")
    assert json.loads(shown.stdout)["result"]["plan"]["nodes"][0]["recruitment"]["matches"] == [match]


def test_a_profile_without_aggregation_items_says_why_and_views_do_not_cite_its_assumed_score(
        loopback, tmp_path: Path) -> None:
    """A data set no agent pair got wrong on one item (each item: one agent wrong) measures no aggregation
    skill: profile said only "aggregation benchmark: 0 item(s)", and show then cited the 0.50 recruiting
    assumes as the aggregator's measured score ("aggregation 0.50 here")."""
    from loopback_llm import ScriptedLLM, write_pool

    def expert(model: str, assignment: str) -> str:  # item i: the agent i % 3 is wrong, the others right
        return "The answer is 7" if int(assignment.split()[2]) % 3 == "abg".index(model[0]) else "The answer is 42"

    server = loopback(ScriptedLLM(expert=expert).handler())
    pool = write_pool(tmp_path, server.url, extra="profiles: profs\n")
    data = tmp_path / "v.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} and six?", "answer": "42"}) + "\n"
                            for i in range(6)))
    profiled = cli("profile", "--pool", str(pool), "--data", str(data), "--out", str(tmp_path / "profs"))
    assert profiled.returncode == 0, profiled.stderr
    assert ("note: aggregation skill was not measured: no item got one right answer and two wrong ones from the "
            "agents, as its items need: give a data set with questions some of the agents get wrong; calibrated "
            "recruiting assumes 0.50 for every agent until it is\n") in profiled.stderr
    listed = " ".join(cli("agents", "--pool", str(pool), env={"COLUMNS": "200"}).stdout.split())
    assert "│ alpha-expert │ alpha │ 0.333 │ 0.67 │ not measured │" in listed, listed
    done = cli("ask", "What is 9 and six?", "--pool", str(pool), "--no-plan", "--k", "3", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)["plan"]["nodes"][0]["recruitment"]["explanation"][-1]
    assert summary.endswith("; aggregator alpha-expert (aggregation not measured: 0.50 assumed)"), summary
    shown = " ".join(cli("show", json.loads(done.stdout)["run_id"], env={"COLUMNS": "200"}).stdout.split())
    assert "(aggregation not measured: 0.50 assumed)" in shown and "0.50 here" not in shown
    left_out = cli("profile", "--pool", str(pool), "--data", str(data), "--out", str(tmp_path / "again"),
                   "--aggregation-items", "0")
    assert ("note: aggregation skill was not measured: --aggregation-items 0 left it out (leave the flag out to "
            "measure it)") in left_out.stderr


def test_agents_shows_the_estimates_and_items_profile_shows_not_sums_counting_an_item_per_variant(
        tmp_path: Path) -> None:
    """`agents` said "history +48" (26 + 22 from a merged variant: items counted twice) where profile said
    "history 0.89 (30)"."""
    from orchestra.profile import Provenance, SkillProfile

    SkillProfile(agent="hist", skills={"history": 26, "ancient history": 22, "geography": 2}, accuracy=0.56,
                 aliases={"ancient history": "history"}, skill_counts={"history": (28, 30), "geography": (16, 30)},
                 estimates={"history": (0.8906, 0.05), "geography": (0.5412, 0.08)},
                 provenance=Provenance(dataset="v.jsonl", dataset_sha256="x", items=30,
                                       model="OpenAICompatible:histbot")).save(tmp_path / "p")
    path = tmp_path / "pool.yaml"
    path.write_text("models:\n  histbot: {type: openai, model: histbot, base_url: 'http://127.0.0.1:9/v1', "
                    "api_key_env: null}\nprofiles: p\nagents:\n  - {name: hist, model: histbot}\n")
    listed = json.loads(cli("agents", "--pool", str(path), "--json").stdout)["agents"][0]
    assert listed["top_estimates"] == [{"skill": "history", "estimate": 0.8906, "items": 30},
                                       {"skill": "geography", "estimate": 0.5412, "items": 30}]
    table = " ".join(cli("agents", "--pool", str(path), env={"COLUMNS": "200"}).stdout.split())
    assert "top skills (estimate, items) / declared" in table and "history 0.89 (30), geography 0.54 (30)" in table
    assert "+48" not in table, table


def test_a_sweep_table_in_80_columns_shows_every_number_whole(capsys, monkeypatch) -> None:
    """Piped (80 columns), the table cut a cost to "$0.000077…" and a method to "symbolic-m…": the
    numbers it is there to compare."""
    from orchestra.cli import print_sweep
    from orchestra.datasets import Dataset
    from orchestra.frontier import SweepPoint

    monkeypatch.setenv("COLUMNS", "80")
    points = [SweepPoint(method=name, cost_lambda=lam, accuracy=0.875, cost_usd=cost, cost_per_item_usd=cost / 8,
                         cost_per_correct_usd=cost / 7, calls=1234, saved_calls=56, items=8, failed=0,
                         on_frontier=lam == 0.05)
              for name, lam, cost in (("symbolic-moe, k=3", None, 0.00061800), ("single", None, 0.00007725),
                                      ("calibrated λ=0.05, k=3", 0.05, 0.00023456))]
    print_sweep(points, Dataset(items=(), path="examples/data/quiz.jsonl", sha256=""), 8, None, False)
    shown = capsys.readouterr().out
    assert "…" not in shown, shown
    # (a column's amounts to the same decimals: `$0.000618` read as rounded beside `$0.00007725`)
    for whole in ("$0.00061800", "$0.00007725", "$0.0000110357", "$0.00023456", "$0.0000335086", "$0.0000882857",
                  "1234", "●"):
        assert whole in shown, (whole, shown)
    # unfinished and cut off: numbers sized to their cells left the method column no room at all
    points[0].failed, points[1].interrupted = 3, True
    with pytest.raises(SystemExit):
        print_sweep(points, Dataset(items=(), path="examples/data/quiz.jsonl", sha256=""), 8, None, False)
    shown = capsys.readouterr().out
    for whole in ("symbolic-moe, k=3", "single (cut off after 8 items)", "0.875 (5 of 8 finished)", "●"):
        assert whole in shown, (whole, shown)


class PricedMarket(Market):
    """A market whose keyword model is priced too, counting each distinct request (``asks``) and each
    distinct keyword request (``keyword_asks``)."""

    def __init__(self, sim: SimulatedPool) -> None:
        super().__init__(sim)
        self.keyword_asks: Counter[tuple[str, int | None]] = Counter()
        self.asks: Counter[str] = Counter()

    def handler(self, request: LoopbackRequest) -> Reply:
        payload = request.json()
        self.asks[json.dumps(payload, sort_keys=True)] += 1
        if payload["model"] != "keywords":
            return super().handler(request)
        self.requests["keywords"] += 1
        self.keyword_asks[(request.prompt, payload.get("seed"))] += 1
        text = json.dumps(self.sim.keywords(request.prompt, payload.get("seed")))
        prompt_tokens, completion_tokens = len(request.prompt) // 4 + 1, len(text) // 4 + 1
        self.cost += (prompt_tokens * 2.0 + completion_tokens * 4.0) / 1e6
        return openai_reply(text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, model="keywords")


def test_a_sweep_asks_no_request_twice_and_prices_each_point_as_its_method_alone(loopback, tmp_path: Path) -> None:
    """Every method that recruits by skills sent the same keyword samples again (800 of a sweep's 1,152
    requests in a trial), and points that chose the same team sent its calls again. No request is asked
    twice now; each point's cost still counts the answers it took (what the method costs on its own, as
    a plain eval of it says), and the sweep says what it spent."""
    sim = specialist_pool(seed=2)
    market = PricedMarket(sim)
    server = loopback(market.handler)
    pool, validation, test = market_files(tmp_path, server.url, sim)
    pool.write_text(pool.read_text().replace("    model: keywords\n",
                                             "    model: keywords\n    prices: {input: 2.0, output: 4.0}\n"))
    assert cli("profile", "--pool", str(pool), "--data", str(validation)).returncode == 0
    market.reset()
    market.keyword_asks.clear()
    market.asks.clear()
    done = cli("eval", "--pool", str(pool), "--data", str(test), "--sweep", "--lambdas", "0,1", "--limit", "6",
               "--no-store", "--json")
    assert done.returncode == 0, done.stderr
    swept = json.loads(done.stdout)
    points = {p["method"]: p for p in swept["points"]}
    requests, cost = market.reset()
    assert market.asks and set(market.asks.values()) == {1}  # each request asked once in the sweep
    asked = len(market.keyword_asks)  # (the items' samples: every method recruiting by skills takes them)
    assert points["symbolic-moe"]["reused_calls"] == 0
    assert all(points[method]["reused_calls"] >= asked for method in ("vote", "calibrated λ=0", "calibrated λ=1"))
    assert swept["reused_calls"] == sum(p["reused_calls"] for p in points.values())
    assert sum(p["calls"] for p in points.values()) == sum(p["requests"] for p in points.values()) == sum(
        requests.values())  # the calls sent, as the server counts them
    assert abs(swept["spent_usd"] - cost) <= 1e-9 + 0.001 * cost  # what the server billed
    for point in points.values():
        assert point["cost_usd"] == pytest.approx(point["spent_usd"] + point["reused_usd"], abs=1e-9)
    for method, flags in (("calibrated λ=1", ("--method", "calibrated", "--cost-lambda", "1")),
                          ("vote", ("--method", "vote"))):
        alone = cli("eval", "--pool", str(pool), "--data", str(test), "--limit", "6", "--no-store", "--json", *flags)
        report = json.loads(alone.stdout)
        assert report["cost_usd"] == pytest.approx(points[method]["cost_usd"], rel=1e-6), (report, points[method])
        assert report["cost_per_correct_usd"] == pytest.approx(points[method]["cost_per_correct_usd"], rel=1e-6)
        assert market.keyword_asks and set(market.keyword_asks.values()) == {2}  # a plain eval asks them all
        market.keyword_asks = Counter({ask: 1 for ask in market.keyword_asks})
        assert report["calls"] == points[method]["calls"] + points[method]["reused_calls"]
    market.reset()
    plot = tmp_path / "frontier.html"
    table = cli("eval", "--pool", str(pool), "--data", str(test), "--sweep", "--lambdas", "1", "--limit", "2",
                "--no-store", "--plot", str(plot))
    assert table.returncode == 0, table.stderr
    said = re.search(r"no request is asked twice in a sweep: (\d+) of the points' calls were taken from the point "
                     r"that made them \(each item's keyword samples, and the calls of teams chosen again\), not sent "
                     r"again; each point's cost counts them, as the method alone would pay them; the sweep spent "
                     r"\$([\d.]+)", " ".join(table.stdout.split()))
    assert said is not None, table.stdout
    assert float(said.group(2)) == pytest.approx(market.reset()[1], rel=1e-3)
    assert (f"({said.group(1)} calls taken from the point that made them, not sent again, their cost counted in "
            f"each point's); the sweep spent ${said.group(2)}.") in plot.read_text()
