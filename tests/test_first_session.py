"""What a new user meets first: chat over several tasks, long tasks, the planner's safeguards,
answers printed literally, and one-line errors with the exit codes the README promises."""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from pathlib import Path

import pexpect
import pytest
from helpers import kind_of, single_agent_pool, wait_for
from loopback_llm import DEFAULT_PLAN, ScriptedLLM, write_pool
from test_cli import cli

from orchestra import Orchestra
from orchestra.models import FunctionModel
from orchestra.pipeline.planning import content_words, is_simple_task, off_topic_steps
from orchestra.plan import Plan
from orchestra.testing import Reply, chat_handler, error_reply

LONG_TEXT = ("Summarise this text in two sentences. " + "The tide rises and falls twice a day because the Moon's "
             "gravity pulls the oceans toward it, while the Earth turns beneath the bulge of water. " * 6).strip()
HOSTILE = "Use [bold]x[/bold] and arr[i]; end the turn with [/INST] or [/oops] :smile: \\[done]"


@pytest.fixture
def llm(loopback):
    scripted = ScriptedLLM()
    scripted.server = loopback(scripted.handler())
    return scripted


def stderr_lines(done) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.strip()]


# --- chat: a whole session ---------------------------------------------------------------------


def test_chat_session_of_three_tasks_survives_a_planner_failure(llm, tmp_path: Path) -> None:
    """History is context: it never enters a task or a step's instruction, even when the planner
    fails and the task runs as one step (the 600-character crash of the second task)."""
    pool = write_pool(tmp_path, llm.server.url, extra="settings: {plan_fallback: single, plan_repairs: 0}\n")
    cyclic = {"subtasks": [{"id": "a", "instruction": "tides of the moon", "depends_on": ["b"]},
                           {"id": "b", "instruction": "tides and the moon", "depends_on": ["a"]}]}
    on_topic = {"subtasks": [{"id": "orbit", "instruction": "Describe the orbit of the Moon.", "depends_on": []}]}
    llm.plans = [DEFAULT_PLAN, cyclic, on_topic]
    first = LONG_TEXT + " Then report on it."
    second = "Now explain the tides, then relate them to the Moon."
    third = "Describe the Moon's orbit, then say why it matters."
    done = cli("chat", "--pool", str(pool), stdin="\n".join([first, "a", second, "a", third, "a", "/quit"]) + "\n")
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 0 and "Traceback" not in output, output[-2000:]
    assert output.count("Synthesized answer. The answer is 42") >= 3
    assert "planner failed" in output and "ran the task as one step" in output
    planner_prompts = [p for kind, p in llm.prompts if kind == "plan"]
    assert len(planner_prompts) == 3
    assert "Conversation so far" not in planner_prompts[0]
    assert "Conversation so far" in planner_prompts[1] and "Q: Summarise this text" in planner_prompts[1]
    assignments = [p.split("Your assignment:")[1] for kind, p in llm.prompts if kind == "expert"]
    assert any(a.strip().startswith(second) for a in assignments)  # the failed plan's one step: the task itself
    assert not any("Q: " in a for a in assignments)  # history stays out of every instruction
    second_experts = [p for kind, p in llm.prompts if kind == "expert" and second in p]
    assert second_experts and all("Conversation so far" in p and "Q: Summarise this text" in p
                                  for p in second_experts)


def test_chat_budget_spent_while_planning_names_no_run_to_resume(llm, tmp_path: Path) -> None:
    pool = write_pool(tmp_path, llm.server.url)
    cyclic = {"subtasks": [{"id": "a", "instruction": "tides", "depends_on": ["b"]},
                           {"id": "b", "instruction": "moon", "depends_on": ["a"]}]}
    llm.plans = [cyclic, DEFAULT_PLAN]  # the first plan needs a repair: a second call the budget refuses
    done = cli("chat", "--pool", str(pool), "--max-calls", "1", stdin="Explain the tides, then the moon\n/quit\n")
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 0 and "Traceback" not in output, output
    # (it said: run `orchestra resume ID`, an id no store had: planning alone is no run)
    assert "error: budget max_calls=1 reached (1 call made) while planning; raise it with --max-calls and ask " \
           "again" in output, output
    assert "orchestra resume" not in output and json.loads(cli("runs", "--json").stdout) == []


def test_chat_max_calls_bounds_a_task_s_planning_and_its_run_together(llm, tmp_path: Path) -> None:
    """--max-calls is the task's: three plannings (two replans) spent 3 of 6, so its run had 3 left (it
    had 6 of its own, and the server saw 9 requests); the run is resumed with a higher limit."""
    pool = write_pool(tmp_path, llm.server.url)
    done = cli("chat", "--pool", str(pool), "--max-calls", "6",
               stdin="Write a report on the tides, then check it\nr\nr\na\n/quit\n")
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 0 and "Traceback" not in output, output
    assert llm.kinds == {"plan": 3, "expert": 3}, output
    [run] = json.loads(cli("runs", "--json").stdout)
    assert (f"error: run {run['id']} budget_exceeded: this task's budget max_calls=6 is spent (6 calls made); "
            f"`orchestra resume {run['id']} --max-calls N`, N above it, goes on with it") in output
    resumed = cli("resume", run["id"], "--max-calls", "40")
    assert resumed.returncode == 0 and "The answer is 42" in resumed.stdout, resumed.stderr
    assert llm.kinds["plan"] == 3 and llm.kinds["expert"] == 9  # (the 3 answered were replayed)


def test_chat_task_stopped_by_its_budget_resumes_only_under_a_higher_limit(llm, tmp_path: Path) -> None:
    """What the task spent planning counts against its resumed run's limit too: a resume without a
    higher limit counted the run's own 3 calls alone and sent 3 more (9 under --max-calls 6)."""
    pool = write_pool(tmp_path, llm.server.url)
    done = cli("chat", "--pool", str(pool), "--max-calls", "6",
               stdin="Write a report on the tides, then check it\nr\nr\na\n/quit\n")
    assert done.returncode == 0 and llm.kinds == {"plan": 3, "expert": 3}, done.stdout + done.stderr
    [run] = json.loads(cli("runs", "--json").stdout)
    again = cli("resume", run["id"])
    assert again.returncode == 3 and llm.kinds == {"plan": 3, "expert": 3}, again.stderr
    assert (f"error: run {run['id']} budget_exceeded: this task's budget max_calls=6 is spent (6 calls made); "
            f"`orchestra resume {run['id']} --max-calls N`, N above it, goes on with it") in again.stderr
    resumed = cli("resume", run["id"], "--max-calls", "10")  # (4 more: 3 experts of a step, an aggregation)
    assert resumed.returncode == 3 and llm.kinds == {"plan": 3, "expert": 6, "aggregate": 1}, resumed.stderr
    assert "this task's budget max_calls=10 is spent (10 calls made)" in resumed.stderr
    assert json.loads(cli("runs", "--json").stdout)[0]["calls"] == 7  # (its planning is no call of the run)


def test_chat_without_a_store_names_no_resume_after_a_budget_stop(llm, tmp_path: Path) -> None:
    """`chat --no-store` told the user to run `orchestra resume ID` after a budget stop, for a run
    nothing had kept (`ask --no-store` says to run it again)."""
    pool = write_pool(tmp_path, llm.server.url)
    done = cli("chat", "--pool", str(pool), "--max-calls", "3", "--no-store",
               stdin="Write a report on the tides, then check it\na\n/quit\n")
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 0 and "budget_exceeded: this task's budget max_calls=3 is spent" in output, output
    assert "run it again (nothing was kept: --no-store)" in output and "orchestra resume" not in output, output


def test_chat_piped_writes_its_status_and_error_lines_whole(llm, tmp_path: Path) -> None:
    """Piped, chat wrapped its lines at 80 columns, the `orchestra resume ID` of a cancelled task
    and a run's summary line split in two (ask writes them whole)."""
    pool = write_pool(tmp_path, llm.server.url)
    done = cli("chat", "--pool", str(pool), "--max-calls", "3", env={"COLUMNS": "80"},  # (Rich's width for a pipe)
               stdin="Write a report on the tides, then check it\nr\na\n/quit\n")
    assert done.returncode == 0, done.stderr
    [run] = json.loads(cli("runs", "--json").stdout)
    lines = done.stdout.splitlines()
    assert any(re.fullmatch(rf"run {run['id']} · budget_exceeded · 1 call · 1 request · [\d,]+ tokens · \$[\d.]+ · "
                            r"[\d.]+ s", line) for line in lines), done.stdout
    assert any(line.startswith(f"error: run {run['id']} budget_exceeded: ") and line.endswith(
        f"`orchestra resume {run['id']} --max-calls N`, N above it, goes on with it (a resume keeps its budget)")
        for line in lines), done.stdout


def test_chat_refuses_a_replan_hint_over_the_limit_and_keeps_the_plan(llm, tmp_path: Path) -> None:
    """A hint of 2 million characters ended chat in a jinja2 SecurityError traceback (the planner's
    template wrote too much); one of 1 million was sent as it was, a 250,000-token planning call."""
    pool = write_pool(tmp_path, llm.server.url)
    hint = "hint " * 200_000
    done = cli("chat", "--pool", str(pool), stdin=f"Write a report on the tides, then check it\nr {hint}\na\n/quit\n")
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 0 and "Traceback" not in output, output[-2000:]
    assert ("error: the hint is 999,999 characters; at most 499,964 fit Orchestra's prompts: shorten it; the plan is "
            "as it was") in output
    assert llm.kinds["plan"] == 1 and "Synthesized answer. The answer is 42" in output  # (the plan ran as it was)


def test_chat_edit_reports_unknown_commands_and_rewords_recruit_on_new_words(llm, tmp_path: Path) -> None:
    pool = write_pool(tmp_path, llm.server.url)
    script = "Write a short report, then check it\ne\nsplit 1\nreword 1 Summarise the tidal records\ndone\na\n/quit\n"
    done = cli("chat", "--pool", str(pool), stdin=script)
    assert done.returncode == 0, done.stderr
    assert "unknown edit command 'split'" in done.stdout
    keyword_prompts = [p for kind, p in llm.prompts if kind == "keywords"]
    # step 1 lost the planner's skills with its old words, so its skills come from the new words
    assert any("Summarise the tidal records" in p for p in keyword_prompts)


def test_trace_after_a_cancelled_task_shows_that_task(loopback, tmp_path: Path) -> None:
    pool = write_pool(tmp_path, loopback(ScriptedLLM().experts_hang()).url)
    child = pexpect.spawn(sys.executable, ["-m", "orchestra", "chat", "--pool", str(pool)],
                          env={**os.environ, "ORCHESTRA_ALLOW_MODEL_REQUESTS": "1", "TERM": "xterm-256color"},
                          encoding="utf-8", codec_errors="replace", dimensions=(50, 140), timeout=60)
    child.expect("> ")
    child.sendline("Write a short report, then check it")
    child.expect(r"\[a\]ccept")
    child.sendline("a")
    child.expect("experts")  # recruited: its expert calls now hang
    child.sendintr()
    child.expect(r"orchestra resume (\d{8}-\d{6}-[0-9a-f]{6})")
    run_id = child.match.group(1)
    child.expect("> ")
    child.sendline("/trace")
    child.expect("facts")
    child.expect(f"run {run_id} · cancelled")
    child.sendline("/quit")
    child.expect(pexpect.EOF)


# --- long tasks and the context limit ------------------------------------------------------------


def test_a_long_task_runs_without_planning(llm, tmp_path: Path) -> None:
    assert len(LONG_TEXT) > 700
    pool = write_pool(tmp_path, llm.server.url)
    done = cli("ask", LONG_TEXT, "--pool", str(pool), "--no-plan", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["plan"]["nodes"][0]["instruction"] == LONG_TEXT
    assert any(LONG_TEXT in p for kind, p in llm.prompts if kind == "expert")


@pytest.mark.llama
def test_a_prompt_over_the_context_window_is_one_line_naming_n_ctx(tmp_path: Path) -> None:
    pool = tmp_path / "pool.yaml"
    pool.write_text("models:\n  tiny: {type: llamacpp, n_ctx: 256, default_max_tokens: 8}\n"
                    "agents:\n  - {name: solo, model: tiny}\n")
    done = cli("ask", LONG_TEXT * 2, "--pool", str(pool), "--no-plan", "--k", "1", "--no-store")
    assert done.returncode == 2
    assert stderr_lines(done) == [line for line in stderr_lines(done) if line.startswith("error:")]
    assert len(stderr_lines(done)) == 1
    assert "context window (n_ctx=256 tokens); raise n_ctx in the pool's entry for tiny" in done.stderr


# --- the planner's safeguards ------------------------------------------------------------------


MOON = "Give two facts about the Moon, then say which matters most for tides."
COPIED_EXAMPLE = {"subtasks": [
    {"id": "water", "instruction": "State the boiling point of water at sea level.", "depends_on": []},
    {"id": "ethanol", "instruction": "State the boiling point of ethanol at sea level.", "depends_on": []},
    {"id": "explain", "instruction": "Compare the two boiling points.", "depends_on": ["water", "ethanol"]}]}


def planned(plan: dict, task: str) -> tuple:
    def answer(request):
        if kind_of(request) == "plan":
            return plan
        return {"keywords": ["astronomy"]} if kind_of(request) == "keywords" else "The answer is 1"

    model = FunctionModel(answer, name="solo")
    result = Orchestra(single_agent_pool(model), k=1, store=False).run(task)
    return result, sum(kind_of(r) == "plan" for r in model.requests)


def test_a_plan_with_a_step_off_the_task_runs_the_task_as_one_step() -> None:
    half = {"subtasks": [{"id": "sky", "instruction": "Why is the sky blue?", "depends_on": []},
                         {"id": "planner", "instruction": "To plan, you need to know how things work.",
                          "depends_on": []}]}
    task = "Why is the sky blue? Give one practical consequence."
    result, _ = planned(half, task)
    assert [n.instruction for n in result.plan.nodes] == [task] and "(planner)" in result.plan.note


def test_a_plan_that_is_not_about_the_task_runs_the_task_as_one_step() -> None:
    result, planner_calls = planned(COPIED_EXAMPLE, MOON)
    assert result.status == "done" and planner_calls == 1
    assert [(n.id, n.instruction) for n in result.plan.nodes] == [("answer", MOON)]
    assert "water, ethanol, explain" in result.plan.note and "not about the task" in result.plan.note


def test_a_plan_about_the_task_is_kept() -> None:
    plan = {"subtasks": [
        {"id": "facts", "instruction": "Give two facts about the Moon.", "depends_on": [],
         "skills": ["depends_on", "Astronomy"]},
        {"id": "tides", "instruction": "Say which fact matters most for tides.", "depends_on": ["facts"]}]}
    result, planner_calls = planned(plan, MOON)
    assert [n.id for n in result.plan.nodes] == ["facts", "tides"] and planner_calls == 1
    assert result.node("facts").skills == ["astronomy"]  # a planner's skills are plain words too


def test_a_short_simple_task_takes_the_fast_path_without_a_planner_call() -> None:
    result, planner_calls = planned(COPIED_EXAMPLE, "Why is the sky blue?")
    assert planner_calls == 0 and [n.instruction for n in result.plan.nodes] == ["Why is the sky blue?"]
    assert "fast path" in result.plan.note


def test_fast_path_and_plan_check_can_be_switched_off() -> None:
    model = FunctionModel(lambda r: COPIED_EXAMPLE if kind_of(r) == "plan" else "The answer is 1", name="solo")
    orc = Orchestra(single_agent_pool(model), k=1, store=False, fast_path=False, plan_check=False)
    result = orc.run("Why is the sky blue?")
    assert [n.id for n in result.plan.nodes] == ["water", "ethanol", "explain"]


@pytest.mark.parametrize(("task", "simple"), [
    ("Why is the sky blue?", True),
    ("Name three primary colours.", True),
    (MOON, False),  # "then"
    ("Why is the sky blue? Give one practical consequence.", False),  # two sentences
    ("Compare lists and tuples in Python.", False),
    ("What " + "very " * 20 + "long question is this?", False),
])
def test_which_tasks_are_simple(task: str, simple: bool) -> None:
    assert is_simple_task(task) is simple


def test_off_topic_steps_share_no_content_word_with_the_task() -> None:
    assert off_topic_steps(Plan.model_validate(COPIED_EXAMPLE), MOON) == ["water", "ethanol", "explain"]
    assert content_words("The Moon's tides") == {"moon", "tide"}
    # the conversation counts: a follow-up's steps may use its words
    follow_up = Plan.model_validate({"subtasks": [{"id": "x", "instruction": "List its moons."}]})
    assert off_topic_steps(follow_up, "What about its satellites?") == ["x"]
    assert off_topic_steps(follow_up, "What about its satellites?", "Q: Tell me about Jupiter's moons") == []


def test_a_replan_hints_wording_is_not_the_tasks_and_the_planners_schema_has_no_text_to_copy() -> None:
    """`r keep it short` in chat: the steps "One node of a plan" (a docstring the planner saw in its
    schema) and "A different plan" passed the check on the words asking for another plan, and ran."""
    from orchestra.pipeline.planning import with_replan_hint
    from orchestra.plan import plan_schema

    copied = Plan.model_validate({"subtasks": [{"id": "node", "instruction": "One node of a plan"},
                                               {"id": "other", "instruction": "A different plan"}]})
    hinted = with_replan_hint("Q: earlier question", "keep it short")
    assert off_topic_steps(copied, MOON, hinted) == ["node", "other"]
    assert "keep it short" in hinted and off_topic_steps(copied, MOON, with_replan_hint("", "a plan per node")) == []
    assert "description" not in json.dumps(plan_schema(5)) and "One node" not in json.dumps(plan_schema(5))


@pytest.mark.llama
def test_the_embedded_planner_plans_the_task_it_was_given() -> None:
    from orchestra.models import allow_model_requests
    from orchestra.pipeline.planning import off_topic_steps

    with allow_model_requests():
        orc = Orchestra(store=False)
        for task in (MOON, "Why is the sky blue? Give one practical consequence."):
            plan, note = orc.plan(task)
            assert off_topic_steps(plan, task) == [], (task, plan, note)


# --- answers are text, never markup ------------------------------------------------------------


def test_answers_with_brackets_are_printed_literally_everywhere(loopback, tmp_path: Path) -> None:
    scripted = ScriptedLLM(expert=lambda model, assignment: HOSTILE)
    server = loopback(scripted.handler())
    pool = write_pool(tmp_path, server.url)
    done = cli("ask", "Quick question", "--pool", str(pool), "--no-plan", "--k", "1", "--aggregate", "none")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == HOSTILE
    verbose = cli("ask", "Quick question", "--pool", str(pool), "--no-plan", "--k", "1", "--aggregate", "none",
                  "--verbose", "--json")
    run_id = json.loads(verbose.stdout)["run_id"]
    shown = cli("show", run_id)
    assert shown.returncode == 0 and HOSTILE in shown.stdout.replace("\n", "")
    chat = cli("chat", "--pool", str(pool), "--k", "1", stdin="Quick question\na\n/quit\n")
    assert chat.returncode == 0 and HOSTILE in chat.stdout
    tty = pexpect.spawn(sys.executable, ["-m", "orchestra", "ask", "Quick question", "--pool", str(pool),
                                         "--no-plan", "--k", "1", "--aggregate", "none", "--verbose"],
                        env={**os.environ, "ORCHESTRA_ALLOW_MODEL_REQUESTS": "1", "TERM": "xterm-256color"},
                        encoding="utf-8", codec_errors="replace", dimensions=(50, 200), timeout=60)
    tty.expect(re.escape(HOSTILE))
    tty.expect(pexpect.EOF)
    tty.close()
    assert tty.exitstatus == 0 and "Traceback" not in (tty.before or "")


# --- one-line errors and exit codes ------------------------------------------------------------


def test_a_rejected_key_exits_2_with_one_line_after_one_batch(loopback, tmp_path: Path) -> None:
    server = loopback(lambda request: error_reply(401, "invalid api key"))
    pool = write_pool(tmp_path, server.url, api_key_env="ORCHESTRA_TEST_KEY")
    done = cli("ask", MOON, "--pool", str(pool), env={"ORCHESTRA_TEST_KEY": "sk-test-123"})
    assert done.returncode == 2 and done.stdout == ""
    assert stderr_lines(done) == [stderr_lines(done)[0]] and "rejected the credentials (HTTP 401)" in done.stderr
    assert "check ORCHESTRA_TEST_KEY" in done.stderr and "sk-test-123" not in done.stderr
    assert len(server.requests) == 1  # the planner's request: a 401 is never retried, and the run stops


def test_a_rejected_key_costs_one_request_per_run_not_one_per_call(loopback, tmp_path: Path) -> None:
    server = loopback(lambda request: error_reply(401, "invalid api key"))
    pool = write_pool(tmp_path, server.url, api_key_env="ORCHESTRA_TEST_KEY")
    env = {"ORCHESTRA_TEST_KEY": "sk-test-123"}
    # five keyword samples wait for the first request to learn what the server takes: its 401 is theirs
    done = cli("ask", MOON, "--pool", str(pool), "--no-plan", env=env)
    assert done.returncode == 2 and "rejected the credentials (HTTP 401)" in done.stderr
    assert len(server.requests) == 1
    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"id": "q{i}", "question": "What is {i} + {i}?", "answer": "{2 * i}"}}\n'
                            for i in range(3)))
    server.requests.clear()
    evaluated = cli("eval", "--pool", str(pool), "--data", str(data), env=env)
    assert evaluated.returncode == 2, evaluated.stderr  # the first unfinished item's code: a user error
    assert "3 of 3 run(s) did not finish; first: item q0 (failed):" in evaluated.stderr
    assert "rejected the credentials (HTTP 401)" in evaluated.stderr
    assert 1 <= len(server.requests) <= 3  # (each item's keyword calls once: they were sent twice, 5 each)


def test_a_rejected_key_costs_one_request_when_a_budget_holds_calls_back(loopback, tmp_path: Path) -> None:
    """With prices, the default $1 budget holds a keyword sample back (the worst cases of the others
    fill it); released by the 401, it sent a request of its own: 2 requests for one refused key."""
    server = loopback(lambda request: error_reply(401, "invalid api key"))
    pool = write_pool(tmp_path, server.url, api_key_env="ORCHESTRA_TEST_KEY")
    pool.write_text(pool.read_text().replace("    max_attempts: 2", "    max_attempts: 2\n"
                                             "    prices: {input: 1000, output: 2000}"))
    done = cli("ask", MOON, "--pool", str(pool), "--no-plan", "--json", env={"ORCHESTRA_TEST_KEY": "sk-test-123"})
    assert done.returncode == 2 and "rejected the credentials (HTTP 401)" in done.stderr
    assert len(server.requests) == 1
    assert json.loads(done.stdout)["usage"]["requests"] == 1


def test_an_unreachable_endpoint_exits_2_with_one_line(tmp_path: Path) -> None:
    pool = write_pool(tmp_path, "http://127.0.0.1:9")
    done = cli("ask", "anything at all", "--pool", str(pool), "--no-store")
    assert done.returncode == 2
    assert len(stderr_lines(done)) == 1 and "cannot reach http://127.0.0.1:9/v1" in done.stderr


def test_a_missing_key_exits_2_before_any_request(llm, tmp_path: Path) -> None:
    pool = write_pool(tmp_path, llm.server.url, api_key_env="ORCHESTRA_TEST_MISSING_KEY")
    env = {k: v for k, v in os.environ.items() if k != "ORCHESTRA_TEST_MISSING_KEY"}
    data = tmp_path / "data.jsonl"
    data.write_text('{"id": "1", "question": "What is 1 + 1?", "answer": "2"}\n')
    for command in (["ask", "x"], ["eval", "--data", str(data)]):
        done = cli(*command, "--pool", str(pool), env=env)
        assert done.returncode == 2, done.stderr
        assert stderr_lines(done) == ["error: environment variable ORCHESTRA_TEST_MISSING_KEY is not set; "
                                      f"export it to use {llm.server.url}/v1"]
    assert not llm.prompts


def test_a_malformed_base_url_is_caught_when_the_pool_loads(tmp_path: Path) -> None:
    pool = tmp_path / "pool.yaml"
    pool.write_text("models:\n  m: {type: openai, model: x, base_url: not a url}\nagents:\n  - {name: a, model: m}\n")
    done = cli("agents", "--pool", str(pool))
    assert done.returncode == 2
    assert stderr_lines(done) == [f"error: {pool}:2:41: models.m.base_url: base_url 'not a url' is not an "
                                  "http(s) URL such as http://localhost:8000/v1"]


def test_retrying_is_printed_only_when_a_retry_follows(loopback, tmp_path: Path) -> None:
    server = loopback(lambda request: error_reply(503, "busy"))
    pool = write_pool(tmp_path, server.url, models=("alpha",), agents=("second",))  # max_attempts: 2
    done = cli("ask", "Quick question", "--pool", str(pool), "--no-plan", "--k", "1")
    assert done.returncode == 1
    retries = [line for line in done.stderr.splitlines() if "retrying" in line]
    assert len(retries) == 1 and "failed attempt 1" in retries[0]  # 2 attempts: one retry, printed once
    # what the attempt met, not the final error ("... after 2 attempts", when one more is to come)
    assert "answered HTTP 503: busy" in retries[0] and "after 2 attempts" not in retries[0]
    assert "failed with HTTP 503 after 2 attempts: busy" in done.stderr
    assert len(server.requests) == 5 * 2 + 2  # 5 keyword calls and the expert call, 2 attempts each


def test_the_budget_message_counts_the_calls_the_run_made(llm, tmp_path: Path) -> None:
    # refused while three calls were in flight; the message said "0 calls made, 3 in flight" next
    # to a footer of 3 calls: it is counted as the run ends
    pool = write_pool(tmp_path, llm.server.url)
    done = cli("ask", "Quick question", "--pool", str(pool), "--no-plan", "--max-calls", "3", "--json")
    assert done.returncode == 3
    assert json.loads(done.stdout)["usage"]["calls"] == 3
    assert "budget max_calls=3 reached (3 calls made);" in done.stderr and "in flight" not in done.stderr


def test_ctrl_c_names_the_run_to_resume(loopback, tmp_path: Path) -> None:
    server = loopback(lambda request: Reply(hang=True))
    pool = write_pool(tmp_path, server.url)
    child = pexpect.spawn(sys.executable, ["-m", "orchestra", "ask", "Quick question", "--pool", str(pool),
                                           "--no-plan", "--quiet"],
                          env={**os.environ, "ORCHESTRA_ALLOW_MODEL_REQUESTS": "1"}, encoding="utf-8", codec_errors="replace",
                          timeout=60)
    while not server.requests:
        child.expect([pexpect.TIMEOUT], timeout=0.1)
    child.sendintr()
    child.expect(r"interrupted run (\d{8}-\d{6}-[0-9a-f]{6}); its finished calls are saved; "
                 r"`orchestra resume \1` finishes it")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130


@pytest.mark.parametrize("store, stop", [(True, "SIGINT"), (False, "SIGINT"), (True, "SIGTERM"),
                                         (True, "SIGTERM SIGTERM"), (True, "SIGHUP")])
def test_ctrl_c_with_json_still_prints_the_run_as_recorded(loopback, tmp_path: Path, store: bool, stop: str) -> None:
    """SIGTERM (what timeout, kill, docker and systemd send) is a Ctrl-C too: it ended the process
    at once, with nothing printed and the run listed failed, short of the requests that went out;
    SIGHUP (a closed terminal, a dropped SSH connection) as well."""
    import signal
    import subprocess

    server = loopback(lambda request: Reply(hang=True))
    pool = write_pool(tmp_path, server.url)
    child = subprocess.Popen([sys.executable, "-m", "orchestra", "ask", "Quick question", "--pool", str(pool),
                              "--no-plan", "--json", *([] if store else ["--no-store"])],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "ORCHESTRA_ALLOW_MODEL_REQUESTS": "1"})
    wait_for(child, lambda: bool(server.requests), "the run was under way")
    for name in stop.split():  # (timeout sends SIGTERM to the command and to its group: it was "interrupted again")
        child.send_signal(getattr(signal, name))
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130
    stopped = json.loads(out)  # one JSON object, as --json promises
    assert stopped["status"] == "cancelled" and stopped["task"] == "Quick question"
    assert stopped["usage"]["requests"] == len(server.requests) > 0  # the requests cut off in flight count
    # the node it was working on does not read as running
    assert [(n["status"], n["error"]) for n in stopped["plan"]["nodes"]] == [("failed", "cancelled by the user")]
    if store:
        shown = json.loads(cli("show", stopped["run_id"], "--json").stdout)
        assert [(n["status"], n["error"]) for n in shown["nodes"]] == [("failed", "cancelled by the user")]
    saved = (f"its finished calls are saved; `orchestra resume {stopped['run_id']}` finishes it" if store
             else "nothing was kept (--no-store)")
    assert err.strip() == f"error: interrupted run {stopped['run_id']}; {saved}"


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_ctrl_c_prints_what_the_run_spent_before_the_run_to_resume(loopback, tmp_path: Path, stop: str) -> None:
    """A failed or budget-stopped run ends with its usage line; an interrupted one printed only its
    error line, though its calls were billed (its requests in flight too)."""
    import signal
    import subprocess

    scripted = ScriptedLLM()  # (the keyword calls are answered, the experts' never)
    server = loopback(chat_handler(lambda request: Reply(hang=True) if "Your assignment:" in request.prompt
                                   else scripted.text(request)))
    pool = write_pool(tmp_path, server.url)
    child = subprocess.Popen([sys.executable, "-m", "orchestra", "ask", "Quick question", "--pool", str(pool),
                              "--no-plan"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "ORCHESTRA_ALLOW_MODEL_REQUESTS": "1"})
    wait_for(child, lambda: any("Your assignment:" in r.prompt for r in server.requests), "the experts were asked")
    child.send_signal(getattr(signal, stop))
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130 and out == "", err
    listed = json.loads(cli("runs", "--json").stdout)[0]
    assert listed["status"] == "cancelled" and listed["requests"] == len(server.requests)
    calls = f"{listed['calls']} calls" + (f" ({listed['failed_calls']} failed)" if listed["failed_calls"] else "")
    *_, usage, error = err.splitlines()
    assert re.fullmatch(rf"run {listed['run_id']} · cancelled · {re.escape(calls)} · {listed['requests']} requests "
                        r"· [\d,]+ tokens · \$\d+\.\d+ · \d+\.\d s", usage), usage
    assert error == (f"error: interrupted run {listed['run_id']}; its finished calls are saved; "
                     f"`orchestra resume {listed['run_id']}` finishes it")


# --- small things a user trips on ---------------------------------------------------------------


def test_a_pool_file_given_as_a_workflow_and_the_reverse_say_which_is_which(tmp_path: Path) -> None:
    """They said "unknown field 'models'" and "unknown field 'pool'"."""
    pool = tmp_path / "pool.yaml"
    pool.write_text("models: {m: {type: openai, model: x, base_url: 'http://127.0.0.1:9/v1'}}\n"
                    "agents: [{name: a, model: m}]\n")
    workflow = tmp_path / "wf.yaml"
    workflow.write_text(f"pool: {pool}\nsteps:\n  - {{id: a, prompt: hi}}\n")
    for command in ("run", "validate"):
        done = cli(command, str(pool))
        assert done.returncode == 2 and stderr_lines(done) == [
            f"error: {pool}:1:1: pool.yaml is a pool file (it has models: and agents:), not a workflow: give it with "
            f"--pool (orchestra ask \"...\" --pool {pool}), or run a workflow file"]
    done = cli("ask", "hi", "--pool", str(workflow))
    assert done.returncode == 2 and stderr_lines(done) == [
        f"error: {workflow}:1:1: wf.yaml is a workflow file (it has pool: and steps:), not a pool: run it with "
        f"`orchestra run {workflow}`, or give a pool file here"]
    assert cli("validate", str(workflow)).returncode == 0


def test_a_binary_or_non_utf8_file_is_one_line(tmp_path: Path) -> None:
    binary = tmp_path / "pool.yaml"
    binary.write_bytes(b"name: x\n\x89PNG\r\n\x1a\n\x00\x00")
    done = cli("validate", str(binary))
    assert done.returncode == 2 and stderr_lines(done) == [f"error: {binary}:2:1: not a UTF-8 text file (byte 0x89); "
                                                           "save it as UTF-8 text"]
    nul = tmp_path / "nul.yaml"
    nul.write_text("name: x\x00\n")
    done = cli("agents", "--pool", str(nul))
    assert done.returncode == 2 and stderr_lines(done) == [f"error: {nul}:1:8: invalid YAML: character U+0000 is not "
                                                           "allowed in a YAML file"]


def test_chat_shows_a_line_while_planning(llm, tmp_path: Path) -> None:
    pool = write_pool(tmp_path, llm.server.url)
    pool.write_text(pool.read_text().replace("    timeout: 10", "    timeout: 10\n    prices: [0.15, 0.6]"))
    done = cli("chat", "--pool", str(pool), stdin="Write a short report, then check it\nr\nc\n/quit\n")
    assert done.returncode == 0 and done.stdout.index("planning…") < done.stdout.index("List the key facts")
    # what each plan cost, as the endpoint counted it: the task was cancelled, so no run records it; a
    # cheap model's millionths of a dollar show (four decimals read "$0.0000": free)
    planned = [line.strip() for line in done.stdout.splitlines() if line.strip().startswith("planning: ")]
    assert planned == ["planning: 1 call · 1 request · " + planned[0].split(" · ", 2)[2]] * 2
    assert re.search(r" · \$0\.0000[1-9]\d*$", planned[0]), planned[0]
    assert len(llm.server.requests) == 2 and llm.kinds == {"plan": 2}


@pytest.mark.llama
def test_eval_uses_the_embedded_pool_by_default(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"id": "1", "question": "What is 2 + 2?", "answer": "4"}\n')
    done = cli("eval", "--data", str(data), "--method", "single", "--json", "--no-store")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["items"] == 1 and report["model_loads"] == {"smollm2": 1}


def test_ctrl_c_while_a_chat_command_prints_keeps_the_session() -> None:
    """A Ctrl-C during /trace's output ended the chat with `error: interrupted`, exit 130 (found by a
    trial under pexpect, 3 times in 4)."""
    import io

    from rich.console import Console

    from orchestra import Agent, Pool
    from orchestra.chat import ChatSession
    from orchestra.testing import FunctionModel

    lines = iter(["/trace", "/k 2", "/quit"])
    out = io.StringIO()
    model = FunctionModel(lambda request: "4", name="m")
    session = ChatSession(Orchestra(Pool(agents=[Agent(name="a", model=model)]), store=False),
                          Console(file=out, width=100), read=lambda prompt: next(lines))

    def interrupted() -> None:
        raise KeyboardInterrupt

    session.show_trace = interrupted  # type: ignore[method-assign]
    try:
        session.loop()
    except KeyboardInterrupt:  # (caught here: one reaching pytest would stop the whole suite)
        pytest.fail("Ctrl-C during a command left the chat session")
    text = out.getvalue()
    assert "(/trace interrupted; /quit or Ctrl-D leaves)" in text and "k = 2" in text and text.endswith("bye\n")


def test_chat_takes_a_byte_order_mark_off_the_first_piped_line(llm, tmp_path: Path) -> None:
    """A task file saved by an editor that writes a byte-order mark, piped into chat: the mark went to
    the planner's, keyword and expert prompts and into the stored task (`ask -` takes it off)."""
    pool = write_pool(tmp_path, llm.server.url)
    done = cli("chat", "--pool", str(pool), stdin="\ufeffWhat is 2 + 2?\na\n/quit\n")
    assert done.returncode == 0, done.stderr
    [run] = json.loads(cli("runs", "--json").stdout)
    assert run["task"] == "What is 2 + 2?" and run["status"] == "done", run
    assert llm.server.requests and not any("\ufeff" in request.prompt for request in llm.server.requests)


def test_a_run_an_endpoint_stopped_after_answers_came_says_they_are_kept_and_how_to_finish_it(
        llm, tmp_path: Path) -> None:
    """Its one line named the endpoint and nothing else: no word that the 5 answered calls were kept,
    or that `orchestra resume` would finish the run once the endpoint was back."""
    def pool(expert_url: str) -> Path:
        path = tmp_path / "pool.yaml"
        path.write_text(f"""name: split
models:
  kw: {{type: openai, model: kw, base_url: "{llm.server.url}/v1", api_key_env: null}}
  x: {{type: openai, model: x, base_url: "{expert_url}/v1", api_key_env: null, max_attempts: 1}}
planner: kw
keywords: kw
agents: [{{name: expert, model: x}}]
""")
        return path

    home = {"ORCHESTRA_HOME": str(tmp_path / "home")}
    stopped = cli("ask", "What is 1 + 1?", "--pool", str(pool("http://127.0.0.1:9")), "--no-plan", env=home)
    assert stopped.returncode == 2, stopped.stderr
    run_id = stopped.stderr.split("run ", 1)[1].split(":", 1)[0]
    assert stderr_lines(stopped)[-1].endswith(
        "(ConnectError); is the server running?; its 5 answered calls are kept: once that is fixed, "
        f"`orchestra resume {run_id}` finishes it"), stopped.stderr
    assert llm.kinds == Counter({"keywords": 5})
    pool(llm.server.url)  # (the endpoint is back, at the address the pool now gives)
    finished = cli("resume", run_id, env=home)
    assert finished.returncode == 0, finished.stderr
    assert llm.kinds["keywords"] == 5  # (the answered calls were not asked again)
