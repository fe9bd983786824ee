"""Tests that turn red on one-line regressions of the pipeline (issue 11, item 9).

Each test names the regression it guards against. They run the real pipeline on scripted models
(only the LLM answers are scripted), the CLI as a subprocess against a loopback server, and real
profiling; none asserts a timing.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from helpers import kind_of, plan_json, scripted_pool
from loopback_llm import ScriptedLLM, write_pool
from test_cli import cli

from orchestra import Orchestra
from orchestra.datasets import Dataset
from orchestra.grading import NumericGrader
from orchestra.models import ChatRequest
from orchestra.pipeline.aggregation import Response, refine_prompt, synthesize_prompt, vote
from orchestra.pipeline.scheduler import node_seed
from orchestra.profiling import build_profiles
from orchestra.recruit import RecruitConfig
from orchestra.result import EXIT_CODES, RunResult
from orchestra.testing import error_reply

REFINE_MARK = "Improve the draft answer below"
SYNTHESIZE_MARK = "responses from several experts"


def node_of(request: ChatRequest) -> str | None:
    """The node an expert request is for (scripted plans say "do <id>")."""
    found = re.search(r"Your assignment: do (\w+)", request.prompt_text())
    return found.group(1) if found else None


# --- a. vote: ties -----------------------------------------------------------------------------


def test_vote_tie_goes_to_the_heavier_supporters_whatever_the_order() -> None:
    light, heavy = Response("a", "The answer is 7", weight=0.2), Response("b", "The answer is 9", weight=0.8)
    assert vote([light, heavy]).answer == "9"
    assert vote([heavy, light]).answer == "9"
    # summed weight: two light supporters outweigh one heavier one at equal counts? counts come first
    crowd = [Response("c", "The answer is 7", weight=0.3), Response("d", "The answer is 7", weight=0.3),
             Response("e", "The answer is 9", weight=0.9)]
    assert vote(crowd).answer == "7"
    # equal counts: the summed weight of each side decides (0.3 + 0.3 < 0.4 + 0.4)
    pairs = [Response("c", "The answer is 7", weight=0.3), Response("d", "The answer is 9", weight=0.4),
             Response("e", "The answer is 7", weight=0.3), Response("f", "The answer is 9", weight=0.4)]
    assert vote(pairs).answer == "9"


def test_vote_tie_in_count_and_weight_goes_to_the_answer_given_first() -> None:
    seven, nine = Response("a", "The answer is 7"), Response("b", "The answer is 9")
    assert vote([seven, nine]).answer == "7"
    assert vote([nine, seven]).answer == "9"
    three = [Response("a", "The answer is 5"), Response("b", "The answer is 6"), Response("c", "The answer is 4")]
    assert vote(three).answer == "5"


def test_vote_winning_text_is_the_strongest_supporters_and_the_tally_counts_every_voter() -> None:
    responses = [Response("a", "first says: the answer is 3", weight=0.1),
                 Response("b", "<think>hmm</think>second says: the answer is 3", weight=0.5),
                 Response("c", "no answer here at all, sorry", weight=0.9),
                 Response("d", "The answer is 8", weight=0.4)]
    result = vote(responses, NumericGrader())  # the third states no number: it does not vote
    assert result.answer == "3" and result.tally == {"3": 2, "8": 1}
    assert result.text == "second says: the answer is 3"  # reasoning stripped
    # nobody states an answer: the strongest response, with an empty tally
    silent = vote([Response("a", "no idea", weight=0.2), Response("b", "<think>x</think>none either", weight=0.7)],
                  NumericGrader())
    assert (silent.answer, silent.tally, silent.text) == (None, {}, "none either")


# --- b and c. the strategies inside a run ----------------------------------------------------


def test_a_vote_run_answers_with_the_majority_not_the_first_or_the_last_expert() -> None:
    answers = {"m0": "m0 thinks. The answer is 7", "m1": "m1 thinks. The answer is 42",
               "m2": "m2 thinks. The answer is 42", "m3": "m3 thinks. The answer is 9"}
    pool, models = scripted_pool(expert=lambda name, request: answers[name])
    result = Orchestra(pool, k=4, mode="topk", aggregate="vote", store=False).run("vote please", plan=False)
    node = result.node("answer")
    texts = [o.text for o in node.expert_outputs]
    assert sorted(texts) == sorted(answers.values())
    assert "42" not in texts[0] and "42" not in texts[-1]  # the majority is neither first nor last
    assert result.status == "done" and result.answer == texts[1]  # the strongest (first) supporter's text
    assert not any(SYNTHESIZE_MARK in r.prompt_text() or REFINE_MARK in r.prompt_text()
                   for m in models.values() for r in m.requests)  # voting calls no aggregator


def aggregation_prompts(models: dict) -> list[str]:
    """Every refine or synthesize prompt the scripted models received."""
    return [r.prompt_text() for m in models.values() for r in m.requests
            if REFINE_MARK in r.prompt_text() or SYNTHESIZE_MARK in r.prompt_text()]


def test_a_refine_run_sends_the_refine_prompt_with_a_draft_and_reviews() -> None:
    def expert(name: str, request: ChatRequest) -> str:
        if REFINE_MARK in request.prompt_text():
            return "refined: The answer is 42"
        return f"draft by {name}: The answer is 41"

    pool, models = scripted_pool(3, expert=expert)
    result = Orchestra(pool, k=3, mode="topk", aggregate="refine", store=False).run("refine please", plan=False)
    assert result.status == "done" and result.answer == "refined: The answer is 42"
    [prompt] = aggregation_prompts(models)
    assert REFINE_MARK in prompt and SYNTHESIZE_MARK not in prompt
    first, *others = [o.text for o in result.node("answer").expert_outputs]
    draft = prompt.split("Draft:\n", 1)[1].split("\n\nReviews:", 1)[0]
    assert draft == first  # equal weights: the first expert's answer is the draft
    reviews = prompt.split("Reviews:", 1)[1]
    assert all(text in reviews for text in others) and first not in reviews


def test_a_synthesize_run_sends_every_response_to_the_aggregator() -> None:
    pool, models = scripted_pool(3, expert=lambda name, request: f"{name}: The answer is 41")
    result = Orchestra(pool, k=3, mode="topk", aggregate="synthesize", store=False).run("synthesize", plan=False)
    assert result.status == "done" and result.node("answer").aggregator
    [prompt] = aggregation_prompts(models)
    assert SYNTHESIZE_MARK in prompt and REFINE_MARK not in prompt
    responses = prompt.split("Responses:", 1)[1]
    assert all(o.text in responses for o in result.node("answer").expert_outputs)


def test_refine_prompt_drafts_the_heaviest_response_not_the_first() -> None:
    responses = [Response("a", "weak draft", weight=0.1), Response("b", "<think>x</think>strong draft", weight=0.7),
                 Response("c", "middle draft", weight=0.2)]
    prompt = refine_prompt("task", "task", responses)
    assert "Draft:\nstrong draft\n" in prompt
    reviews = prompt.split("Reviews:", 1)[1]
    assert reviews.index("middle draft") < reviews.index("weak draft")  # strongest first
    assert "<think>" not in prompt
    merged = synthesize_prompt("task", "task", responses)
    assert merged.index("weak draft") < merged.index("strong draft") < merged.index("middle draft")


# --- d. context truncation -------------------------------------------------------------------


def test_upstream_outputs_are_cut_at_context_chars_in_the_downstream_prompt() -> None:
    seen: dict[str, str] = {}

    def expert(name: str, request: ChatRequest) -> str:
        node = node_of(request)
        seen[node or "?"] = request.prompt_text()
        return "x" * 300 + "TAIL" if node == "a" else "short"

    pool, _ = scripted_pool(1, plan=plan_json(("a", []), ("b", ["a"])), expert=expert)
    result = Orchestra(pool, k=1, aggregate="none", context_chars=100, store=False).run("two steps, then one")
    assert result.status == "done", result.error
    assert result.node("a").output == "x" * 300 + "TAIL"  # the node itself keeps everything
    downstream = seen["b"]
    assert "x" * 100 + " [...]" in downstream
    assert "x" * 101 not in downstream and "TAIL" not in downstream
    # an output within the limit is passed whole, with no marker
    result = Orchestra(pool, k=1, aggregate="none", context_chars=400, store=False).run("two steps, then one")
    assert "x" * 300 + "TAIL" in seen["b"] and "[...]" not in seen["b"]
    # exactly at the limit: passed whole
    result = Orchestra(pool, k=1, aggregate="none", context_chars=304, store=False).run("two steps, then one")
    assert "x" * 300 + "TAIL" in seen["b"] and "[...]" not in seen["b"]


# --- e. per-node seeds -----------------------------------------------------------------------


def test_node_seed_depends_on_the_seed_the_task_and_the_node() -> None:
    base = node_seed(0, "task", "a")
    assert base == node_seed(0, "task", "a")
    assert len({base, node_seed(0, "task", "b"), node_seed(1, "task", "a"), node_seed(0, "other", "a")}) == 4


def test_nodes_of_one_run_get_distinct_reproducible_seeds() -> None:
    def run_seeds(seed: int) -> dict[str, set[int]]:
        seeds: dict[str, set[int]] = {}

        def expert(name: str, request: ChatRequest) -> str:
            seeds.setdefault(node_of(request) or "?", set()).add(request.seed)
            return "The answer is 1"

        pool, _ = scripted_pool(2, plan=plan_json(("a", []), ("b", []), ("c", ["a", "b"])), expert=expert)
        result = Orchestra(pool, k=1, aggregate="none", seed=seed, store=False).run("three steps, then a join")
        assert result.status == "done", result.error
        return seeds

    first = run_seeds(0)
    assert set(first) == {"a", "b", "c"}
    assert not (first["a"] & first["b"]) and not (first["a"] & first["c"]) and not (first["b"] & first["c"])
    assert run_seeds(0) == first  # the same seed repeats the same per-node seeds
    assert run_seeds(5) != first


# --- f. exit codes ---------------------------------------------------------------------------


def test_only_a_complete_run_exits_zero() -> None:
    assert EXIT_CODES["done"] == 0
    assert all(code != 0 for status, code in EXIT_CODES.items() if status != "done")
    codes = {status: RunResult(run_id="r", task="t", status=status).exit_code
             for status in ("done", "partial", "failed", "budget_exceeded", "cancelled")}
    assert codes == {"done": 0, "partial": 1, "failed": 1, "budget_exceeded": 3, "cancelled": 130}
    assert RunResult(run_id="r", task="t", status="failed", user_error=True).exit_code == 2
    # a partial run whose failed node was the user's to fix (a template, a prompt over the context) says so
    assert RunResult(run_id="r", task="t", status="partial", user_error=True).exit_code == 2


def test_the_cli_exits_non_zero_on_a_partial_run(loopback, tmp_path: Path) -> None:
    plan = {"subtasks": [
        {"id": "facts", "instruction": "List the key facts for the report.", "depends_on": [], "skills": ["history"]},
        {"id": "numbers", "instruction": "Compute the numbers of the report.", "depends_on": [],
         "skills": ["history"]}]}

    def expert(model: str, assignment: str) -> object:
        if "numbers" in assignment:
            return error_reply(400, "simulated failure of this step")
        return "The facts: The answer is 42"

    scripted = ScriptedLLM(plan, expert=expert)
    server = loopback(scripted.handler())
    pool = write_pool(tmp_path, server.url)
    done = cli("ask", "Write a short report on the facts and numbers, then check it", "--pool", str(pool),
               "--k", "1", "--json")
    data = json.loads(done.stdout)
    assert data["status"] == "partial" and data["answer"] == "The facts: The answer is 42"
    assert done.returncode == 1
    assert "simulated failure of this step" in done.stderr


# --- g. the rare-expert filter in run_many ---------------------------------------------------


def test_run_many_applies_the_rare_expert_filter() -> None:
    # agent0 declares the only skill asked for; the others are rarely drawn (uniform prior 0.1 vs 1)
    def orchestra() -> tuple[Orchestra, dict]:
        pool, models = scripted_pool(4)
        pool.agents[0].skills = ("general",)
        config = RecruitConfig(rare_threshold=0.5, uniform_prior_score=0.1)
        return Orchestra(pool, k=3, recruit=config, store=False), models

    tasks = [f"question number {i}" for i in range(12)]
    orc, _ = orchestra()
    unfiltered = orc.run_many(tasks, rare_filter=False)
    used = Counter(e for r in unfiltered for e in r.node("answer").experts)
    assert used["agent0"] > 0 and set(used) - {"agent0"}  # without the filter, rare experts answer too

    orc, models = orchestra()
    filtered = orc.run_many(tasks)
    assert all(r.status == "done" for r in filtered)
    assert {e for r in filtered for e in r.node("answer").experts} == {"agent0"}
    replaced = [r for r in filtered if any("rare-expert filter replaced" in line
                                           for line in r.node("answer").recruitment["explanation"])]
    assert replaced  # the explanation says so
    experts_asked = {name for name, m in models.items() if any(kind_of(r) == "expert" for r in m.requests)}
    assert experts_asked == {"m0"}


# --- h. the aggregation benchmark ------------------------------------------------------------


def test_aggregation_benchmark_items_hold_exactly_one_right_and_two_wrong_traces() -> None:
    # four agents: m0 always right, m1-m3 always wrong (each in its own way); item 'two' has only
    # two wrong answers (m3 is right there too), item 'none' has no right answer at all
    def expert(name: str, request: ChatRequest) -> str:
        prompt = request.prompt_text()
        code = int(re.search(r"code (\d+)", prompt).group(1))
        right = name == "m0" or (name == "m3" and code == 200)
        if code == 300:
            right = False
        return f"{name} says: The answer is {code if right else code + (int(name[1:]) + 1) * 1000}"

    pool, models = scripted_pool(4, expert=expert)
    items = [{"id": "one", "question": "What is code 100?", "answer": "100"},
             {"id": "two", "question": "What is code 200?", "answer": "200"},
             {"id": "none", "question": "What is code 300?", "answer": "300"},
             {"id": "four", "question": "What is code 400?", "answer": "400"}]
    report = build_profiles(pool, Dataset.from_items(items), seed=4)
    assert report.aggregation_items == 3  # 'none' has no right trace
    prompts = [r.prompt_text() for r in models["m0"].requests if SYNTHESIZE_MARK in r.prompt_text()]
    assert len(prompts) == 3
    for prompt in prompts:
        code = int(re.search(r"code (\d+)", prompt).group(1))
        traces = re.findall(r"^\d+\. (m\d) says: The answer is (\d+)$", prompt.split("Responses:", 1)[1], re.M)
        assert len(traces) == 3, prompt
        assert [int(value) == code for _, value in traces].count(True) == 1
        assert len({agent for agent, _ in traces}) == 3


def test_a_loopback_server_on_a_taken_port_fails_at_once() -> None:
    import subprocess
    import sys

    from orchestra.testing import LoopbackServer, Reply

    with LoopbackServer(lambda request: Reply(body={"ok": True})) as first:
        with pytest.raises(OSError):  # (start() waited for ever: the error stayed in the server's thread)
            LoopbackServer(lambda request: Reply(body={"ok": True}), port=first.port).start()
        done = subprocess.run([sys.executable, "-m", "orchestra.testing", "--port", str(first.port)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: cannot listen on port {first.port}: "), done.stderr
    helped = subprocess.run([sys.executable, "-m", "orchestra.testing", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert helped.stdout.startswith("usage: python -m orchestra.testing ")  # (it said "usage: __main__.py")


# --- Ctrl-C on the command line: the loop's own shutdown is covered too ---------------------

_LATE_CTRL_C = """
import asyncio, os, signal
from orchestra.core import run_interruptibly

async def work():
    async def closes_late():  # (an endpoint's connections close so, as asyncio.run shuts the loop down)
        try:
            yield
        finally:
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.sleep(0.05)
    held = closes_late()
    await held.__anext__()
    return "answered"

print(run_interruptibly(work()))
"""

_SPAWNS_AS_IT_STOPS = """
import asyncio, gc, os, signal
from orchestra.core import run_interruptibly

ended = []
held = set()  # (the loop keeps only weak references to tasks: one nobody holds may be collected pending)
gc.set_threshold(1)  # (and collection comes early and often, so a task the code fails to hold is seen lost)

async def late():
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        ended.append("cancelled")
        raise
    except GeneratorExit:
        ended.append("destroyed")
        raise

async def background():  # cancelled, it starts more work (as an executor dispatching as runs stop)
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        held.add(asyncio.ensure_future(late()))
        raise

async def work():
    held.add(asyncio.ensure_future(background()))
    await asyncio.sleep(0)
    os.kill(os.getpid(), signal.SIGINT)
    await asyncio.Event().wait()

try:
    run_interruptibly(work())
except KeyboardInterrupt:
    print("interrupted", ended)
"""


_SECOND_CTRL_C = """
import asyncio, os, signal, sys, threading, time
from orchestra.core import SAME_INTERRUPT_S, run_interruptibly

stopping = threading.Event()

def stuck():  # a worker thread that does not end (a model load): asyncio.run waits for it as it closes
    stopping.wait()
    time.sleep(2 * SAME_INTERRUPT_S)  # (one within it is the first again)
    os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again
    threading.Event().wait()

async def work():
    asyncio.get_running_loop().run_in_executor(None, stuck)
    os.kill(os.getpid(), signal.SIGINT)
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        stopping.set()
        raise

print("working", flush=True)
run_interruptibly(work())
print("not reached", flush=True)
"""


def test_a_second_ctrl_c_ends_the_process_without_waiting_for_a_worker_thread() -> None:
    # (it was swallowed while the loop waited for the thread; then a KeyboardInterrupt that came
    # before the loop closed waited there for the thread for ever: closing waits for its executor)
    import subprocess
    import sys

    for _ in range(5):  # (the second press lands at one point or another of the shutdown)
        done = subprocess.run([sys.executable, "-c", _SECOND_CTRL_C], capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout) == (130, "working\n"), done.stderr
        assert done.stderr == ("error: interrupted again: stopped without waiting for the work in progress; "
                               "finished calls are saved where a store was kept\n")


_SIGINT_TWICE_AT_ONCE = """
import asyncio, os, signal
from orchestra.core import run_interruptibly

async def work():
    os.kill(os.getpid(), signal.SIGINT)  # as `timeout -s INT` sends it: to the command, then to its group
    os.kill(os.getpid(), signal.SIGINT)
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        await asyncio.sleep(0.01)  # (stopping takes a while: the run records itself)
        print("stopped cleanly", flush=True)
        raise

try:
    run_interruptibly(work())
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_a_sigint_sent_twice_at_once_is_one_interrupt_not_a_second_ctrl_c() -> None:
    # (found by a trial: `timeout -s INT 2 orchestra ask ... --json` printed "interrupted again" and no JSON
    # in about one run of three, when both signals reached the process)
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _SIGINT_TWICE_AT_ONCE], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "stopped cleanly\ninterrupted\n", "")


_SIGINT_AGAIN_AS_THE_REPORT_IS_PRINTED = """
import asyncio, os, signal, time
from orchestra import core
from orchestra.core import interrupts_as_usual, run_interruptibly

core.SAME_INTERRUPT_S = 3600.0  # (the duplicate comes however long the report takes)

async def work():
    os.kill(os.getpid(), signal.SIGINT)
    await asyncio.Event().wait()

try:
    run_interruptibly(work())
except KeyboardInterrupt:
    print("report:", flush=True, end=" ")
    os.kill(os.getpid(), signal.SIGINT)  # the same interrupt again, as the caller says what was kept
    time.sleep(0.01)
    print("printed whole", flush=True)
interrupts_as_usual()  # (chat goes on: its next Ctrl-C is the user's own)
core.SAME_INTERRUPT_S = 0.0  # (a press of its own, not the interrupt's duplicate)
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(1)
except KeyboardInterrupt:
    print("then as usual", flush=True)
"""


def test_a_sigint_while_an_interrupted_command_reports_what_it_kept_does_not_cut_the_report() -> None:
    # (a trial: `eval`'s report and its line on how to go on were lost to a second SIGINT a few ms after
    # the first, with "Exception ignored ... signal wakeup fd" tracebacks: the loop's handler had gone)
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _SIGINT_AGAIN_AS_THE_REPORT_IS_PRINTED], capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "report: printed whole\nthen as usual\n", "")


@pytest.mark.parametrize("script, expected", [
    (_LATE_CTRL_C, "answered"),  # (was a KeyboardInterrupt traceback from inside asyncio.run's shutdown)
    (_SPAWNS_AS_IT_STOPS, "interrupted ['cancelled']"),  # (was destroyed pending: "Task was destroyed...")
])
def test_ctrl_c_around_the_loops_shutdown_is_handled(script: str, expected: str) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.stdout.strip(), done.stderr) == (expected, ""), done.stderr


_ASK_CTRL_C_AS_IT_FINISHES = """
import asyncio, os, signal, sys
from orchestra import Agent, Pool, agents, cli, core
from orchestra.testing import FunctionModel

core.SAME_INTERRUPT_S = float(sys.argv[1])  # 3600: the SIGINT again is the same one; 0: a second press
again = sys.argv[2]  # where it comes: as the result is printed, or once the command returned, as it exits
pool = Pool(agents=[Agent(name="solo", model=FunctionModel(lambda request: "4", name="m"))])
agents.Pool.load = classmethod(lambda cls, *args, **kwargs: pool)
arun = core.Orchestra.arun

def interrupt() -> None:
    os.kill(os.getpid(), signal.SIGINT)

async def finishing(self, *args, **kwargs):
    result = await arun(self, *args, **kwargs)

    async def closes_late():  # (an endpoint's connection closes so, as asyncio.run shuts the loop down)
        try:
            yield
        finally:
            interrupt()  # the first Ctrl-C comes as the run finishes
    held = closes_late()
    await held.__anext__()
    return result

core.Orchestra.arun = finishing
echo_json = cli.echo_json

def printed(text: str) -> None:
    echo_json(text)
    interrupt()

if again == "printed":
    cli.echo_json = printed
else:
    cli.shield_ray_shutdown = interrupt
cli.command_line(["ask", "What is 2+2?", "--no-plan", "--json", "--no-store"])
"""


_ASK_IN_PROCESS = """
import os, signal, time
from orchestra import Agent, Pool, agents, cli
from orchestra.testing import FunctionModel

pool = Pool(agents=[Agent(name="solo", model=FunctionModel(lambda request: "4", name="m"))])
agents.Pool.load = classmethod(lambda cls, *args, **kwargs: pool)
try:
    cli.main(["ask", "What is 2+2?", "--no-plan", "--json", "--no-store"])
except SystemExit as done:
    print("exit", done.code)
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
    print("deaf to Ctrl-C")
except KeyboardInterrupt:
    print("hears Ctrl-C")
"""


def test_a_command_run_inside_another_program_leaves_its_ctrl_c_as_it_was() -> None:
    """`ask` run by a program of its own (click's ``CliRunner``, ``main([...])``) left that program deaf to
    Ctrl-C: ignoring it once the outcome is printed is for the `orchestra` process alone, which then exits."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _ASK_IN_PROCESS], capture_output=True, text=True, timeout=60)
    said = (done.stdout + done.stderr).splitlines()  # (--json's prints after it go to stderr)
    assert "exit 0" in said and said[-1] == "hears Ctrl-C", (done.stdout, done.stderr)


@pytest.mark.parametrize("same_s, again", [(3600.0, "printed"), (0.0, "printed"), (3600.0, "exiting")])
def test_ask_json_interrupted_as_it_finishes_prints_one_outcome(same_s: float, again: str) -> None:
    """A SIGINT as `ask --json` finished (while the loop shut down), then again (`timeout -s INT` sends it twice)
    or pressed again: it printed the done result, then `error: interrupted` and exit 130, or died by SIGINT."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _ASK_CTRL_C_AS_IT_FINISHES, str(same_s), again],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert json.loads(done.stdout)["status"] == "done"
