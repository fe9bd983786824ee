"""Every setting reachable from Python, pool and workflow YAML and the command line, recorded with
the run, restored on resume; an unknown one is an error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import AGGREGATE_MARK, KEYWORDS_MARK
from loopback_llm import ScriptedLLM, write_pool
from test_cli import cli, llm  # noqa: F401 - the llm fixture

from orchestra import KeywordConfig, Orchestra
from orchestra.agents import Pool
from orchestra.errors import ConfigError
from orchestra.settings import Settings
from orchestra.store import RunStore
from orchestra.testing import LoopbackRequest, Reply, chat_handler
from orchestra.workflow import Workflow
from orchestra.workflow_run import orchestra_for


def _keyword_requests(server) -> int:
    return sum(KEYWORDS_MARK in r.prompt for r in server.requests)


def test_a_nested_setting_from_the_command_line_is_used_recorded_and_restored(loopback, tmp_path: Path) -> None:
    server = loopback(ScriptedLLM().handler())
    pool = write_pool(tmp_path, server.url)
    stopped = cli("ask", "What is the pH of pure water?", "--pool", str(pool), "--no-plan", "--k", "1",
                  "--set", "keywords.samples=2", "--set", "keywords.min_count=1", "--max-calls", "1", "--json")
    assert stopped.returncode == 3, stopped.stderr
    assert _keyword_requests(server) == 1  # the second sample was refused by the budget
    run_id = json.loads(stopped.stdout)["run_id"]
    stored = RunStore().run(run_id).config["spec"]["settings"]
    assert stored["keywords"]["samples"] == 2 and stored["keywords"]["min_count"] == 1
    resumed = cli("resume", run_id, "--max-calls", "10", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert _keyword_requests(server) == 2  # resumed with 2 samples, not the default 5


def test_a_pool_matcher_setting_is_used_and_kept_on_resume(loopback, tmp_path: Path) -> None:
    def answer(request: LoopbackRequest) -> str | Reply:
        if request.path.endswith("/embeddings"):
            inputs = request.json()["input"]
            return Reply(body={"data": [{"index": i, "embedding": [1.0, float(len(t))]} for i, t in enumerate(inputs)]})
        return json.dumps({"keywords": ["history"]}) if KEYWORDS_MARK in request.prompt else "The answer is 1"

    handler = chat_handler(answer)

    async def route(request: LoopbackRequest) -> Reply:
        return answer(request) if request.path.endswith("/embeddings") else await handler(request)  # type: ignore[return-value]

    server = loopback(route)
    extra = (f"settings:\n  matcher: {{type: embedding, model: mini, base_url: '{server.url}/v1', min_similarity: 0.1}}"
             "\n  keywords: {samples: 1, min_count: 1}\n")
    pool = write_pool(tmp_path, server.url, extra=extra)
    done = cli("ask", "Who built the pyramids?", "--pool", str(pool), "--no-plan", "--k", "1", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    embeddings = [r for r in server.requests if r.path.endswith("/embeddings")]
    assert len(embeddings) == 1 and data["usage"]["requests"] == len(server.requests)
    config = RunStore().run(data["run_id"]).config["spec"]["settings"]
    assert config["matcher"]["type"] == "embedding" and config["matcher"]["model"] == "mini"
    rebuilt = Orchestra.resuming(data["run_id"], store=RunStore())
    assert rebuilt.stages.staffing.matcher.spec() == Pool.load(pool).settings.matcher.model_copy(
        update={"base_url": f"{server.url}/v1"})
    assert rebuilt.stages.staffing.extractor.config == KeywordConfig(samples=1, min_count=1)


def eval_files(loopback, tmp_path: Path, items: int, settings: str) -> tuple[ScriptedLLM, Any, Path, Path]:
    """A scripted server, a data set of ``items`` questions (answer 42) and a pool with ``settings``."""
    scripted = ScriptedLLM()
    server = loopback(scripted.handler())
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "question": f"What is 6 x {i} / {i}?", "answer": "42"}) + "\n"
                            for i in range(1, items + 1)))
    return scripted, server, data, write_pool(tmp_path, server.url, extra=f"settings: {settings}\n")


def test_eval_takes_mode_and_aggregate_and_honours_the_pools_settings(loopback, tmp_path: Path) -> None:
    scripted, server, data, pool = eval_files(loopback, tmp_path, 3, "{aggregate: vote, k: 2}")
    by_pool = json.loads(cli("eval", "--data", str(data), "--pool", str(pool), "--json").stdout)
    # (the pool votes: no aggregator; and recruits k=2, which the name says: another k is another method)
    assert by_pool["method"] == "calibrated + vote, k=2" and scripted.kinds["aggregate"] == 0
    assert scripted.kinds["expert"] == 3 * 2
    flags = cli("eval", "--data", str(data), "--pool", str(pool), "--mode", "random", "--aggregate", "synthesize",
                "--json")
    assert flags.returncode == 0, flags.stderr
    assert json.loads(flags.stdout)["method"] == "random, k=2" and scripted.kinds["aggregate"] == 3  # the random preset
    preset = json.loads(cli("eval", "--data", str(data), "--pool", str(pool), "--method", "moa", "--aggregate",
                            "vote", "--k", "3", "--json").stdout)
    assert preset["method"] == "global + vote"  # (k=3 given: the default, no rename)
    calls = scripted.kinds["expert"]
    single = json.loads(cli("eval", "--data", str(data), "--pool", str(pool), "--method", "single", "--k", "3",
                            "--json").stdout)  # single's one expert is its k: another k is another method
    assert single["method"] == "global + none, k=3" and scripted.kinds["expert"] - calls == 3 * 3
    alone = json.loads(cli("eval", "--data", str(data), "--pool", str(pool), "--method", "single", "--json").stdout)
    assert alone["method"] == "single" and scripted.kinds["expert"] - calls == 3 * 3 + 3
    priced = json.loads(cli("eval", "--data", str(data), "--pool", str(pool), "--method", "single", "--cost-lambda",
                            "5", "--json").stdout)  # another trade-off is another method too
    default = json.loads(cli("eval", "--data", str(data), "--pool", str(pool), "--method", "calibrated",
                             "--cost-lambda", "0.05", "--json").stdout)
    assert (priced["method"], default["method"]) == ("single, λ=5", "calibrated, k=2")  # (the default λ: no rename)
    capped = json.loads(cli("eval", "--data", str(data), "--pool", str(pool), "--max-cost-per-item", "0.5",
                            "--limit", "1", "--json").stdout)
    assert capped["method"] == "calibrated + vote, k=2, cap $0.5000/item"
    # settings a method would take and then not use are refused before any call
    sent = len(server.requests)
    for command, flags, method in [("eval", ("--data", str(data), "--method", "random", "--cost-lambda", "1"), "--method"),
                                   ("ask", ("What is 6 x 7?", "--mode", "random", "--set", "recruit.cost_lambda=1"),
                                    "--mode")]:
        refused = cli(command, *flags, "--pool", str(pool))
        assert (refused.returncode, refused.stderr.splitlines()[0]) == (
            2, "error: --cost-lambda (recruit.cost_lambda) weighs the experts' prices; random recruiting does not use "
               f"it: leave it out, or use another {method} (see python -m orchestra {command} --help)")
    assert len(server.requests) == sent
    for command, flags, mode in [("eval", ("--data", str(data), "--method", "random"), "random"),
                                 ("ask", ("What is 6 x 7?", "--mode", "global"), "global")]:
        refused = cli(command, *flags, "--pool", str(pool), "--competence-weight", "2")
        assert (refused.returncode, refused.stderr.splitlines()[0].split(";")[1]) == (
            2, f" {mode} recruiting does not use it: leave it out, or use {flags[-2]} symbolic-moe (see python -m "
               f"orchestra {command} --help)")
    # adaptive takes experts until their weights reach recruit.p, at most recruit.k_max: --k was accepted, named
    # in the method ("adaptive + synthesize, k=1") and 3 experts asked; p and k_max are adaptive's alone
    for command, flags in [("eval", ("--data", str(data), "--method", "symbolic-moe", "--mode", "adaptive")),
                           ("ask", ("What is 6 x 7?", "--set", "mode=adaptive"))]:
        refused = cli(command, *flags, "--pool", str(pool), "--k", "1")
        assert (refused.returncode, refused.stderr.splitlines()[0]) == (
            2, "error: --k (k) sets how many experts a node asks; adaptive recruiting adds experts until their weights "
               "reach recruit.p, at most recruit.k_max: leave it out and give --set recruit.k_max=N, or use --mode "
               f"topk (see python -m orchestra {command} --help)")
    adaptive = json.loads(cli("eval", "--data", str(data), "--pool", str(pool), "--mode", "adaptive", "--set",
                              "recruit.k_max=2", "--limit", "1", "--json").stdout)  # (the pool's k=2 is not its)
    assert adaptive["method"] == "adaptive + vote, k_max=2"  # (the pool votes)
    sent = len(server.requests)
    for setting in ("recruit.p=0.5", "recruit.k_max=2"):
        refused = cli("ask", "What is 6 x 7?", "--pool", str(pool), "--mode", "topk", "--set", setting)
        assert (refused.returncode, refused.stderr.splitlines()[0]) == (
            2, f"error: {setting.split('=')[0]} bounds adaptive recruiting; topk recruiting does not use it: leave it "
               "out, or use --mode adaptive (see python -m orchestra ask --help)")
    assert len(server.requests) == sent
    assert cli("ask", "What is 6 x 7?", "--pool", str(pool), "--mode", "topk", "--competence-weight", "2").returncode == 0
    assert len(server.requests) > sent
    sent = len(server.requests)
    for command, flags in [("eval", ("--data", str(data), "--method", "moa")), ("ask", ("What is 6 x 7?",)),
                           ("ask", ("What is 6 x 7?", "--mode", "symbolic-moe"))]:
        mode = {"moa": "global"}.get(flags[-1], flags[-1] if "--mode" in flags else "calibrated")
        sent = len(server.requests)
        refused = cli(command, *flags, "--pool", str(pool), "--max-cost-per-item", "0.5")
        assert refused.returncode == (0 if mode == "calibrated" else 2), refused.stderr
        if mode != "calibrated":
            assert f"caps the calibrated router's teams; {mode} recruiting does not use it" in refused.stderr
            assert len(server.requests) == sent


def test_an_evaluation_named_otherwise_by_an_older_version_is_resumed(loopback, tmp_path: Path) -> None:
    """Method names gained ", k=2" (a pool's k) and a cost cap; resume looked earlier runs up by the
    name, so one begun before found nothing and ran every item again."""
    import sqlite3

    _, server, data, pool = eval_files(loopback, tmp_path, 2, "{k: 2}")
    first = json.loads(cli("eval", "--data", str(data), "--pool", str(pool), "--json").stdout)
    assert first["method"] == "calibrated, k=2"
    with sqlite3.connect(RunStore().path) as db:  # as the older version named it
        db.execute("UPDATE runs SET config = json_set(config, '$.spec.meta.method', 'calibrated')")
    sent = len(server.requests)
    again = cli("eval", "--data", str(data), "--pool", str(pool), "--resume", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["correct"] == first["correct"] and len(server.requests) == sent


@pytest.mark.parametrize(("flag", "message"), [
    # (a name close to none said only "no such setting": nothing to try, nor where the settings are)
    ("nonsense=1", "error: --set nonsense: no such setting; the closest are 'seed', 'planner_max_tokens', "
                   "'max_response_chars' (every setting: the README's Settings table, or orchestra.Settings in Python)"),
    ("recruit.nonsense=1", "error: --set recruit.nonsense: no such setting; the closest are 'confidence', "
                           "'max_cost_per_item', 'competence_weight' (every recruit setting: the README's Settings "
                           "table, or orchestra.RecruitConfig in Python)"),
    ("keywords.samplez=3", "error: --set keywords.samplez: no such setting; did you mean 'samples'?"),
    ("budget.max_call=3", "error: --set budget.max_call: no such setting; did you mean 'max_calls'?"),
    ("K=3", "error: --set K: no such setting; did you mean 'k'?"),  # (difflib weighs case: it named none)
    # a setting of its own given in a group ("the closest are 'k_max', 'p', 'cost_lambda'", a trial)
    ("recruit.k=2", "error: --set recruit.k: no such setting; k is a setting of its own, not of recruit: k=..."),
    # (read as the experts' sampling temperature, which is each agent's)
    ("temperature=0.5", "error: --set temperature: no such setting; it is a recruit or keywords setting: "
                        "recruit.temperature or keywords.temperature (the experts' sampling temperature is each "
                        "agent's: temperature: in the pool file)"),
    # a nested setting at the top said only "no such setting" (as a Python keyword it said where it belongs)
    ("competence_weight=1", "error: --set competence_weight: no such setting; it is a recruit setting: "
                            "recruit.competence_weight"),
    ("max_calls=5", "error: --set max_calls: no such setting; it is a budget setting: budget.max_calls"),
    # (a budget's max_tokens was "did you mean 'planner_max_tokens'?", the planner's answer limit)
    ("max_tokens=5000", "error: --set max_tokens: no such setting; it is a keywords or budget setting: "
                        "keywords.max_tokens or budget.max_tokens"),
    ("k=many", "error: --set k: Input should be a valid integer, unable to parse string as an integer"),
    ("matcher.type=embedding", "error: --set matcher: an embedding matcher needs model and base_url"),
    ("novalue", "error: --set expects KEY=VALUE, got 'novalue'"),
    ("k=" + "[" * 5000 + "]" * 5000, "error: --set k: the value is nested too deeply to read"),
    # (100,000 experts sent hundreds of calls, then hung on gigabytes of recruiting)
    ("k=100000", "error: --set k: Input should be less than or equal to 64"),
    # (pydantic reads true as 1 and 1.0: one expert, one dollar, without a word)
    ("k=true", "error: --set k: give a number, not true"),
    ("budget.max_cost_usd=yes", "error: --set budget.max_cost_usd: give a number, not true"),
    ("recruit.p=off", "error: --set recruit.p: give a number, not false"),
    # (YAML 1.1 reads 1e3 as text: "unable to parse string as an integer" named no fix)
    ("budget.max_calls=1e3", "error: --set budget.max_calls: give a whole number; YAML reads 1e3 as text, not a "
                             "number: write 1000"),
    ("k=2.5e0", "error: --set k: Input should be a valid integer, unable to parse string as an integer"),
    # (YAML 1.1's octal, base 60 and hex: max_calls=010 stopped at 8 where --max-calls 010 is 10)
    ("budget.max_calls=010", "error: --set budget.max_calls: YAML reads 010 as 8: write the number meant in decimal "
                             "digits, or quote it if it is text"),
    ("seed=12:30", "error: --set seed: YAML reads 12:30 as 750: write the number meant in decimal digits, or quote it "
                   "if it is text"),
    ("seed=0x1f", "error: --set seed: YAML reads 0x1f as 31: write the number meant in decimal digits, or quote it if "
                  "it is text"),
    ("budget={max_calls: 010}", "error: --set budget: YAML reads 010 as 8: write the number meant in decimal digits, or "
                                "quote it if it is text"),  # (a mapping's numbers too: it was 8)
    # (nan was said to be not above 0; an infinite λ or budget was taken)
    ("budget.max_cost_usd=nan", "error: --set budget.max_cost_usd: Input should be a finite number"),
    ("recruit.cost_lambda=inf", "error: --set recruit.cost_lambda: Input should be a finite number"),
])
def test_an_unknown_or_invalid_setting_is_one_line(llm, tmp_path: Path, flag: str, message: str) -> None:
    pool = write_pool(tmp_path, llm.server.url)
    done = cli("ask", "x", "--pool", str(pool), "--set", flag)
    assert (done.returncode, done.stderr.strip()) == (2, message)
    assert not llm.kinds


@pytest.mark.parametrize("flags, message", [
    (("--max-calls", "1", "--set", "budget.max_calls=3"),
     "error: --max-calls and --set budget.max_calls both set budget.max_calls; give it once"),
    (("--set", "k=2", "--k", "3"), "error: --k and --set k both set k; give it once"),
    (("--set", "budget={max_calls: 3}", "--max-calls", "1"),
     "error: --max-calls and --set budget.max_calls both set budget.max_calls; give it once"),
    # (these went through: --no-plan won over plan=true, --set over --ray, the last --set over the first)
    (("--no-plan", "--set", "plan=true"), "error: --no-plan and --set plan both set plan; give it once"),
    (("--ray", "--set", "executor=local"), "error: --ray and --set executor both set executor; give it once"),
    (("--set", "k=2", "--set", "k=3"), "error: --set k is given twice; give it once"),
    (("--store", "s.db", "--no-store"),  # (nothing was kept, in silence)
     "error: --store and --no-store contradict each other; give one (see python -m orchestra ask --help)"),
    (("--set", "budget={max_calls: 3}", "--set", "budget.max_calls=4"),
     "error: --set budget and --set budget.max_calls both set budget.max_calls; give it once"),
])
def test_one_setting_given_by_a_flag_and_by_set_is_refused(llm, tmp_path: Path, flags: tuple[str, ...],
                                                          message: str) -> None:
    """Which of two values on one command line should win? Neither silently."""
    pool = write_pool(tmp_path, llm.server.url)
    done = cli("ask", "x", "--pool", str(pool), *flags)
    assert (done.returncode, done.stderr.strip()) == (2, message)
    assert not llm.kinds
    other = cli("ask", "x", "--pool", str(pool), "--no-plan", "--max-calls", "20", "--set", "budget.max_tokens=90000")
    assert other.returncode == 0, other.stderr  # two different settings of one group are fine


def test_workflow_settings_reach_the_orchestra_and_a_pool_setting_stays_under_them(tmp_path: Path) -> None:
    (tmp_path / "pool.yaml").write_text(
        "models:\n  m: {type: openai, model: m, base_url: 'http://127.0.0.1:9/v1'}\nagents:\n  - {name: a, model: m}\n"
        "settings: {k: 2, keywords: {samples: 4}, memory_budget_gb: 8}\n")
    (tmp_path / "flow.yaml").write_text(
        "pool: pool.yaml\nsettings:\n  context_chars: 321\n  planner_max_tokens: 77\n  max_resident_models: 2\n"
        "  memory_budget_gb: 1.5\n  recruit: {competence_weight: 0}\n  grader: mc\n"
        "plan: auto\ntask: hi\n")  # (planned: a workflow with steps refuses the planner's settings)
    orc = orchestra_for(Workflow.load(tmp_path / "flow.yaml"), store=False)
    assert (orc.settings.context_chars, orc.settings.planner_max_tokens, orc.settings.k) == (321, 77, 2)
    assert orc.executor.max_resident_models == 2 and orc.executor.memory_budget_bytes == int(1.5 * 2**30)
    assert orc.stages.staffing.recruiter.config.competence_weight == 0
    assert orc.stages.staffing.extractor.config.samples == 4
    assert orc.settings.memory_budget_gb == 1.5 and orc.settings.recruit.competence_weight == 0


def test_python_keywords_win_over_settings_which_win_over_the_pool() -> None:
    pool = Pool.load()
    layered = Orchestra(pool, settings={"k": 4, "aggregate": "vote"}, aggregate="refine", store=False)
    assert (layered.settings.k, layered.settings.aggregate) == (4, "refine")
    with pytest.raises(ConfigError, match="no such setting"):
        Settings().assigned(["keyword.samples=2"])
    with pytest.raises(TypeError):  # (Python's own error for a keyword nobody takes)
        Orchestra(pool, store=False, planner_tokens=5)  # type: ignore[call-arg]
    # and a ConfigError, as every bad setting is, naming the setting it is likely to mean
    with pytest.raises(ConfigError, match=r"^unknown setting 'planner_tokens'; did you mean 'planner_max_tokens'\?$"):
        Orchestra(pool, store=False, planner_tokens=5)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match=r"^unknown settings 'kk', 'windw'; did you mean 'k'\?$"):
        layered.run("Hi", kk=2, windw=3)


def test_a_run_can_clear_a_setting_whose_value_may_be_none() -> None:
    orc = Orchestra(Pool.load(), aggregator="writer", store=False)
    assert orc.run_settings({}).aggregator == "writer"
    # None is one of aggregator's values (chosen per run): passing it clears the Orchestra's for this run
    assert orc.run_settings({"aggregator": None}).aggregator is None
    # for a setting that cannot be None, None still means "not given" (the Orchestra's value stays)
    assert orc.run_settings({"k": None, "aggregate": None}).k == orc.settings.k
    with pytest.raises(ConfigError, match="memory_budget_gb sets the Orchestra"):
        Orchestra(Pool.load(), memory_budget_gb=2, store=False).run_settings({"memory_budget_gb": None})


def test_a_workflow_with_an_unknown_setting_fails_to_load(tmp_path: Path) -> None:
    (tmp_path / "flow.yaml").write_text("settings:\n  context_char: 10\nsteps:\n  - {id: s, prompt: hi}\n")
    with pytest.raises(ConfigError, match=r"flow.yaml:2:\d+: unknown field 'context_char'"):
        Workflow.load(tmp_path / "flow.yaml")


def test_no_aggregation_when_voting(loopback, tmp_path: Path) -> None:
    scripted = ScriptedLLM()
    server = loopback(scripted.handler())
    pool = write_pool(tmp_path, server.url)
    done = cli("ask", "Quick question", "--pool", str(pool), "--no-plan", "--set", "aggregate=vote", "--json")
    assert done.returncode == 0, done.stderr
    assert scripted.kinds["aggregate"] == 0 and not any(AGGREGATE_MARK in r.prompt for r in server.requests)


def test_a_pools_fingerprint_changes_with_what_its_answers_depend_on(tmp_path: Path) -> None:
    base = ("models:\n  m: {type: openai, model: x, base_url: 'http://127.0.0.1:9/v1', api_key_env: null}\n"
            "agents:\n  - {name: a, model: m, skills: [algebra]}\n")

    def fingerprint(text: str) -> str:
        (tmp_path / "pool.yaml").write_text(text)
        return Pool.load(tmp_path / "pool.yaml").fingerprint()

    first = fingerprint(base)
    assert fingerprint("# a comment\n" + base.replace("\n", "\n\n")) == first  # the same pool, reformatted
    for edited in (base.replace("[algebra]", "[geometry]"),  # declared skills route before profiles exist
                   base.replace("api_key_env: null", "api_key_env: null, extra_body: {top_k: 5}"),
                   base.replace("model: x", "model: y"), base.replace("skills:", "temperature: 0.2, skills:")):
        assert fingerprint(edited) != first, edited
    # prices (an eval --resume reused runs routed and costed at the old ones); none given: the fingerprint of before
    priced = fingerprint(base.replace("api_key_env: null", "api_key_env: null, prices: [1, 2]"))
    assert priced != first and priced != fingerprint(base.replace("api_key_env: null", "api_key_env: null, prices: [100, 2]"))
    assert fingerprint(base.replace("api_key_env: null", "api_key_env: null, prices: [0, 0]")) == first
    assert first == "b834a7c437a2097b"  # what earlier versions stored: their runs of this pool are still reused
