"""The terminal: the live view in a real pseudo-terminal, and `orchestra chat` driven by a user."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pexpect
import pytest
from helpers import KEYWORDS_MARK
from loopback_llm import ScriptedLLM, write_pool
from test_cli import cli

from orchestra.testing import Reply


@pytest.fixture
def served(loopback, tmp_path: Path) -> tuple[ScriptedLLM, Path]:
    scripted = ScriptedLLM()
    server = loopback(scripted.handler())
    return scripted, write_pool(tmp_path, server.url)


def spawn(*args: str) -> pexpect.spawn:
    # (codec_errors: the terminal echoes "^C" where it is pressed, which may be inside a character being drawn)
    env = {**os.environ, "ORCHESTRA_ALLOW_MODEL_REQUESTS": "1", "TERM": "xterm-256color"}
    return pexpect.spawn(sys.executable, ["-m", "orchestra", *args], env=env, encoding="utf-8", codec_errors="replace",
                         dimensions=(50, 140), timeout=60)


def test_live_view_in_a_pseudo_terminal(served) -> None:
    _, pool = served
    child = spawn("ask", "Write a short report, then check it", "--pool", str(pool))
    child.expect("plan")
    child.expect("batches per model")
    child.expect("facts")
    child.expect("alpha")  # a model row of the batch panel
    child.expect("Synthesized answer. The answer is 42")
    child.expect(pexpect.EOF)
    child.close()
    output = child.before or ""
    assert child.exitstatus == 0
    assert "✔" in output or "done" in output


def test_chat_in_a_pseudo_terminal_with_a_plan_edit(served) -> None:
    scripted, pool = served
    child = spawn("chat", "--pool", str(pool))
    child.expect("/help for commands")
    child.expect("> ")
    child.sendline("Write a short report, then check it")
    child.expect(r"\[a\]ccept")
    child.sendline("e")
    child.expect("edit")
    child.sendline("drop 2")
    child.expect("edit")
    child.sendline("done")
    child.expect(r"\[a\]ccept")
    child.sendline("a")
    child.expect("Synthesized answer. The answer is 42")
    child.expect("> ")
    child.sendline("/quit")
    child.expect("bye")
    child.expect(pexpect.EOF)
    # step 2 was dropped: two nodes ran, 3 experts and one aggregation each
    assert dict(scripted.kinds) == {"plan": 1, "expert": 6, "aggregate": 2}


def test_chat_takes_a_pasted_block_as_one_task_and_quit_at_its_plan_leaves(served) -> None:
    """A pasted multi-line task was planned from its first line, the next ones read as answers to the
    plan prompt ("r = x + 1" a paid replan, "a" ran the cut-down task); /quit there read as a wrong answer."""
    scripted, pool = served
    child = spawn("chat", "--pool", str(pool))
    child.expect("/help for commands")
    child.expect("> ")
    child.send("Fix this code so it prints 2:\rr = x + 1\ra\rprint(r)\r")  # (one write, as a terminal pastes)
    child.expect(r"\[a\]ccept")
    child.sendline("/quit")
    child.expect("bye")
    child.expect(pexpect.EOF)
    assert dict(scripted.kinds) == {"plan": 1}
    editing = spawn("chat", "--pool", str(pool))  # (and at the edit prompt, where it was an unknown command)
    editing.expect("> ")
    editing.sendline("Write a short report, then check it")
    editing.expect(r"\[a\]ccept")
    editing.sendline("e")
    editing.expect("edit")
    editing.sendline("/quit")
    editing.expect("bye")
    editing.expect(pexpect.EOF)
    planned = next(prompt for kind, prompt in scripted.prompts if kind == "plan")
    assert "Fix this code so it prints 2:\nr = x + 1\na\nprint(r)" in planned


def test_chat_through_stdin_accept_edit_and_replan(served) -> None:
    scripted, pool = served
    script = "\n".join([
        "Write a short report, then check it",
        "e", "drop 2", "reword 1 List three key facts.", "done",
        "a",
        "/trace",
        "/k 2",
        "Another report, then a summary",
        "r",
        "a",
        "What is 2+2?",  # one step, no planner call (fast path); a replan with a hint asks the planner
        "r split it into two steps: compute, then verify",
        "a",
        "/pool",
        "/help",
        "/quit",
    ]) + "\n"
    done = cli("chat", "--pool", str(pool), stdin=script)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.count("plan") >= 4  # shown, edited twice, ...
    assert "List three key facts." in out and "bye" in out
    assert "Synthesized answer" in out  # the first task's answer
    assert scripted.kinds["plan"] == 4  # first task, second task, its re-plan, the simple task's re-plan
    assert "experts alpha-expert" in out or "experts beta-expert" in out or "experts gamma-expert" in out
    assert "k = 2" in out and "pool loopback" in out and "/trace" in out


def test_chat_takes_a_task_that_starts_with_a_slash_written_with_two(served) -> None:
    """A task such as `/usr/bin/env: what does it do?` was an unknown command, with no way to send it."""
    scripted, pool = served
    done = cli("chat", "--pool", str(pool), stdin="/usr/bin/env: what is it?\n//usr/bin/env: what is it?\na\n/quit\n")
    assert done.returncode == 0, done.stderr
    assert ("unknown command /usr/bin/env:; /help lists them (a task that starts with / is written with one more, "
            "//...)") in done.stdout
    prompts = [prompt for _, prompt in scripted.prompts]
    assert any("/usr/bin/env: what is it?" in prompt for prompt in prompts)
    assert not any("//usr/bin/env" in prompt for prompt in prompts)


def test_chat_k_is_refused_under_adaptive_recruiting_which_does_not_use_it(loopback, tmp_path: Path) -> None:
    """`/k 2` said `k = 2` under adaptive recruiting, which takes experts by recruit.p and k_max: as --k is."""
    pool = write_pool(tmp_path, loopback(ScriptedLLM().handler()).url, extra="settings: {mode: adaptive}\n")
    done = cli("chat", "--pool", str(pool), stdin="/k 2\n/quit\n")
    assert done.returncode == 0 and "k = 2" not in done.stdout, done.stdout
    assert ("/k is not used by adaptive recruiting, which adds experts until their weights reach recruit.p, at most "
            "recruit.k_max (set those in the pool's settings)") in " ".join(done.stdout.split())


def test_chat_pool_shows_skills_as_the_agents_command_does(loopback, tmp_path: Path) -> None:
    """An agent with neither a profile nor declared skills read `(declared) ` followed by nothing, where
    `orchestra agents` says `(no profile)`; a profile's raw ±1 sums were shown without saying so."""
    from orchestra.profile import Provenance, SkillProfile
    from orchestra.view import skills_cell

    pool = write_pool(tmp_path, loopback(ScriptedLLM().handler()).url, agents=("generalist",))
    done = cli("chat", "--pool", str(pool), stdin="/pool\n/quit\n")
    rows = {line.split("│")[1].strip(): line for line in done.stdout.splitlines() if line.count("│") >= 5}
    assert "(declared) history" in rows["alpha-expert"] and "(no profile)" in rows["generalist"], done.stdout
    listed = cli("agents", "--pool", str(pool))
    assert "(no profile)" in listed.stdout and "(declared) history" in listed.stdout
    provenance = Provenance(dataset="v.jsonl", dataset_sha256="0", items=10, model="m")
    sums = SkillProfile(agent="a", skills={"algebra": 4, "history": -2, "geometry": 6}, accuracy=0.6,
                        provenance=provenance)
    assert skills_cell(["x"], sums) == "(±1 sums) geometry +6, algebra +4, history -2"
    measured = sums.model_copy(update={"skill_counts": {"algebra": (8, 10), "geometry": (9, 10)},
                                       "estimates": {"algebra": (0.75, 0.1), "geometry": (0.82, 0.1)}})
    assert skills_cell([], measured) == "geometry 0.82 (10), algebra 0.75 (10)"
    assert skills_cell([], None) == "(no profile)" and skills_cell(["law", "art"], None) == "(declared) law, art"


def test_chat_edit_refuses_what_would_break_the_plan(served) -> None:
    _, pool = served
    script = "Write a short report, then check it\ne\ndrop 9\nreword 2\ndone\nc\n/quit\n"
    done = cli("chat", "--pool", str(pool), stdin=script)
    assert "no step '9'; steps are 1 to 3" in done.stdout
    assert "use: drop N" in done.stdout and "cancelled" in done.stdout


def test_chat_edit_refuses_an_instruction_no_run_could_take_and_keeps_the_plan(served) -> None:
    """A reword to NULs alone or to bytes that are not UTF-8 was taken at the edit prompt, then
    refused as the plan was accepted: the task and its paid planning were lost."""
    import subprocess

    scripted, pool = served
    script = b"Write a short report, then check it\ne\nreword 1 \x00\x00\nreword 2 \xff\xfe tides\ndone\na\n/quit\n"
    done = subprocess.run([sys.executable, "-m", "orchestra", "chat", "--pool", str(pool)], input=script,
                          capture_output=True, env={**os.environ, "ORCHESTRA_ALLOW_MODEL_REQUESTS": "1",
                                                    "COLUMNS": "300"}, timeout=120)
    out = done.stdout.decode("utf-8", "replace")
    assert done.returncode == 0, out
    assert ("that edit would break the plan: the new instruction has no visible character (only spaces, control "
            "characters such as NUL and format characters such as a zero-width space)") in out
    assert ("that edit would break the plan: the new instruction is not valid Unicode: character 1 is a lone "
            "surrogate ('\\udcff')") in out
    assert "Synthesized answer" in out and "error:" not in out and scripted.kinds["plan"] == 1  # (the plan ran)


def chat_interrupted_mid_task(loopback, tmp_path: Path, *flags: str) -> tuple[pexpect.spawn, dict[str, bool]]:
    """A chat whose accepted task is cut off by Ctrl-C while its expert calls hang (until
    ``hanging["on"]`` is set False)."""
    hanging = {"on": True}
    server = loopback(ScriptedLLM().experts_hang(lambda: hanging["on"]))
    pool = write_pool(tmp_path, server.url)
    child = spawn("chat", "--pool", str(pool), *flags)
    child.expect("> ")
    child.sendline("Write a short report, then check it")
    child.expect(r"\[a\]ccept")
    child.sendline("a")
    child.expect("batches per model")  # running, its expert calls hang
    child.sendintr()
    return child, hanging


def test_ctrl_c_in_chat_cancels_the_task_not_the_session(loopback, tmp_path: Path) -> None:
    child, hanging = chat_interrupted_mid_task(loopback, tmp_path)
    child.expect("stopping the task")  # (said at once: a model's load or generation may take seconds to end)
    child.expect("task cancelled")
    child.expect("> ")
    hanging["on"] = False
    child.sendline("Write a short report, then check it")
    child.expect(r"\[a\]ccept")
    child.sendline("a")
    child.expect("Synthesized answer. The answer is 42")
    child.expect("> ")
    child.sendline("/quit")
    child.expect("bye")
    child.expect(pexpect.EOF)


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_in_chat_ends_the_session_after_the_task_records_itself(loopback, tmp_path: Path,
                                                                                   stop: str) -> None:
    """SIGTERM (timeout, kill, systemd) or SIGHUP cancelled the running task, then the chat went on
    with the next tasks, deaf to both: `timeout 4 orchestra chat < tasks` ran for 22 s."""
    import signal
    import subprocess

    from helpers import wait_for

    scripted = ScriptedLLM()
    server = loopback(scripted.experts_hang())
    pool = write_pool(tmp_path, server.url)
    tasks = "".join(f"Write a short report on {topic}, then check it\na\n" for topic in ("tides", "moons", "stars"))
    child = subprocess.Popen([sys.executable, "-m", "orchestra", "chat", "--pool", str(pool)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "ORCHESTRA_ALLOW_MODEL_REQUESTS": "1"})
    assert child.stdin is not None
    child.stdin.write(tasks)
    child.stdin.flush()
    wait_for(child, lambda: any("Your assignment:" in r.prompt for r in server.requests), "the first task ran")
    child.send_signal(getattr(signal, stop))
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130, out + err
    said = " ".join(out.split())
    assert re.search(r"task cancelled; its finished calls are saved: `orchestra resume \S+` finishes it", said), out
    assert err.strip().splitlines()[-1] == "error: interrupted"
    assert scripted.kinds["plan"] == 1 and "moons" not in out  # (the next tasks were never planned)


def test_ctrl_c_at_the_prompt_keeps_the_session(served) -> None:
    """A Ctrl-C that lands just after an answer, at the idle prompt, ended the whole chat (exit 130)."""
    _, pool = served
    child = spawn("chat", "--pool", str(pool))
    child.expect("> ")
    child.sendintr()
    child.expect(r"Ctrl-C stops a running task; /quit or Ctrl-D leaves")
    child.expect("> ")
    child.sendline("/quit")
    child.expect("bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_trace_after_ctrl_c_without_a_store_shows_the_cancelled_task(loopback, tmp_path: Path) -> None:
    child, _ = chat_interrupted_mid_task(loopback, tmp_path, "--no-store")
    child.expect(r"task cancelled \(no run store: nothing was kept\)")
    child.expect("> ")
    child.sendline("/trace")  # (it said "no run yet")
    child.expect(r"\[failed\] \w+: ")
    child.expect("> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)


def test_control_characters_from_a_task_or_a_model_never_reach_the_terminal(loopback, tmp_path: Path) -> None:
    """An answer, a task (a client of `serve` writes it) or an endpoint's error holding an escape
    sequence was written as it is by ask, runs, show, the log lines and the error line: a remote
    party could recolour, retitle or clear the terminal. Each is shown as its escape instead."""
    import json

    hostile = "red \x1b[31mRED\x1b[0m \x1b]0;title\x07 nul \x00 rtl \u202eLTR cr 10\r50 bs a\x08b"
    refuse = [False]

    def text(request) -> str | Reply:
        if refuse[0]:
            return Reply(status=400, body={"error": {"message": "bad request \x1b[2J"}})
        if KEYWORDS_MARK in request.prompt:
            return json.dumps({"keywords": ["general"]})
        return f"The answer: {hostile}"

    from orchestra.testing import chat_handler

    server = loopback(chat_handler(text))
    pool = write_pool(tmp_path, server.url)
    asked = cli("ask", "-", "--pool", str(pool), "--no-plan", "--verbose", stdin=f"Task {hostile}")
    assert asked.returncode == 0, asked.stderr
    run_id = json.loads(cli("runs", "--json").stdout)[0]["id"]
    shown = [asked.stdout, asked.stderr, cli("runs").stdout, cli("show", run_id).stdout]
    refuse[0] = True
    failed = cli("ask", "Another task", "--pool", str(pool), "--no-plan")
    assert failed.returncode != 0
    refused = cli("ask", "x", "--pool", str(pool), "--set", "mode=\x1b[2J")  # (an error line of the command line)
    assert refused.returncode == 2 and "\\x1b[2J" in refused.stderr
    for output in [*shown, failed.stderr, refused.stderr]:
        assert not any(c in output for c in "\x1b\x00\u202e\r\x08"), output
    assert "red \\x1b[31mRED\\x1b[0m" in asked.stdout and "\\u202eLTR" in asked.stdout
    # Rich drops a carriage return or a backspace where it makes its text: "10\r50" read "1050"
    assert "cr 10\\r50 bs a\\x08b" in asked.stdout and "Task red" in shown[3].split("cr 10\\r50 bs a\\x08b")[0]
    assert shown[3].count("cr 10\\r50 bs a\\x08b") >= 3  # the task, the expert's response, the answer
    assert "Task red \\x1b[31mRED" in asked.stderr  # (the log lines)
    assert "red \\x1b[31mRED" in shown[2] and "red \\x1b[31mRED" in shown[3]
    assert "bad request \\x1b[2J" in failed.stderr
    # --json keeps the text as it is
    assert json.loads(cli("show", run_id, "--json").stdout)["run"]["answer"] == f"The answer: {hostile}"


def test_chat_takes_enter_as_accept_refuses_unicode_digits_and_shows_a_failed_planning_s_cost(loopback,
                                                                                           tmp_path: Path) -> None:
    """Enter at the plan prompt cancelled (though listed as accept); `/k ²` and `drop ³` were
    tracebacks that ended the session; a planning that failed showed no cost for its requests; a
    failed turn's error went to the next planner as its answer."""
    from helpers import PLANNER_MARK

    from orchestra.testing import error_reply

    scripted = ScriptedLLM()
    inner = scripted.handler()
    planner_down = {"on": False}
    prompts: list[str] = []

    async def handler(request):
        if PLANNER_MARK in request.prompt:
            prompts.append(request.prompt)
            if planner_down["on"]:
                return error_reply(500, "the planner is down")
        return await inner(request)

    server = loopback(handler)
    pool = write_pool(tmp_path, server.url, extra="settings: {fast_path: false}\n")
    script = "\n".join(["/k \u00b2", "/k 65", "Write a short report, then check it", "e", "drop \u00b3", "done", "",
                        "/quit"]) + "\n"  # (/k 65 was an error that ended the session)
    done = cli("chat", "--pool", str(pool), stdin=script)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.count("usage: /k N (1 <= N <= 64)") == 2 and "no step '\u00b3'; steps are 1 to 3" in done.stdout
    assert "cancelled" not in done.stdout and "Synthesized answer" in done.stdout  # Enter accepted the plan
    planner_down["on"] = True
    done = cli("chat", "--pool", str(pool), stdin="Write a short report, then check it\n/quit\n")
    assert "planning: 1 call · 2 requests" in done.stdout, done.stdout  # (max_attempts 2, both refused)
    planner_down["on"] = False
    prompts.clear()
    done = cli("chat", "--pool", str(pool), "--max-calls", "4",
               stdin="Write a short report, then check it\na\nAnd a summary?\nc\n/quit\n")
    assert "budget max_calls=4" in done.stdout and len(prompts) == 2
    assert "Q: Write a short report, then check it\nA: (not answered)" in prompts[1] and "budget" not in prompts[1]


_CTRL_C_AS_THE_VIEW_CLOSES = """
import io, os, signal
from rich.console import Console
from orchestra.view import LiveView

view = LiveView(Console(file=io.StringIO(), force_terminal=True, width=80))
refresh = view._live.refresh

def pressed_again() -> None:  # a second Ctrl-C lands as the view draws its last state
    os.kill(os.getpid(), signal.SIGINT)
    refresh()

view._live.refresh = pressed_again
with view:
    pass
print("stopped" if not view._live.is_started else "still drawing")
os.kill(os.getpid(), signal.SIGINT)  # (Ctrl-C is Python's own again afterwards)
"""


_CTRL_C_TWICE_WHILE_STOPPING = """
import asyncio, os, signal, sys
import orchestra.core as core
core.SAME_INTERRUPT_S = 0.0  # (every SIGINT below is a press of its own)
said = []

async def work():
    os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:  # stopping takes a while (a model's load ends its step first)
        os.kill(os.getpid(), signal.SIGINT)  # a second press meanwhile
        for _ in range(50):
            await asyncio.sleep(0)
        raise

try:
    core.run_interruptibly(work(), stopping=said.append if sys.argv[1] == "chat" else None)
except KeyboardInterrupt:
    print("interrupted", said)
"""


_CTRL_C_IGNORED = """
import asyncio, os, signal
import orchestra.core as core

async def work():
    os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C meant for the script that started this in the background
    for _ in range(50):
        await asyncio.sleep(0)
    return "finished"

print(core.run_interruptibly(work()))
"""


_SIGTERM_WHILE_DEAF_TO_CTRL_C = """
import asyncio, os, signal
import orchestra.core as core

async def work():
    os.kill(os.getpid(), signal.SIGTERM)  # `kill` stops it, as a Ctrl-C would
    await asyncio.Event().wait()

try:
    core.run_interruptibly(work())
except KeyboardInterrupt:
    print("stopped", signal.getsignal(signal.SIGINT) is signal.SIG_IGN)
"""

_CTRL_C_AS_THE_TASK_ENDS = """
import asyncio, os, signal
import orchestra.core as core
said = []

async def finishing():
    os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C as the task's last steps run: it ends on its own
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    return "answer"

try:
    result = core.run_interruptibly(finishing(), stopping=said.append)
except KeyboardInterrupt:
    result = "interrupted"
core.SAME_INTERRUPT_S = 0.0  # (the next press is the user's own, not that Ctrl-C's duplicate)
try:
    os.kill(os.getpid(), signal.SIGINT)
    heard = False
except KeyboardInterrupt:
    heard = True
print(result, said, heard)
"""


def test_a_run_started_deaf_to_ctrl_c_stays_deaf() -> None:
    """A shell starts `cmd &` with SIGINT ignored: the run's own handler replaced that, and a Ctrl-C aimed at
    the script cancelled the run in the background too; stopped by SIGTERM, it heard SIGINT again after."""
    import signal
    import subprocess

    for script, says in ((_CTRL_C_IGNORED, "finished\n"), (_SIGTERM_WHILE_DEAF_TO_CTRL_C, "stopped True\n")):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        assert (done.returncode, done.stdout) == (0, says), done.stderr


def test_a_session_hears_ctrl_c_again_after_one_that_came_as_its_task_ended() -> None:
    """A Ctrl-C as a chat task ended on its own left SIGINT ignored: the rest of the session was deaf to it."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", _CTRL_C_AS_THE_TASK_ENDS], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.split()[-1] == "True", (done.stdout, done.stderr)


@pytest.mark.parametrize("session", ["chat", "ask"])
def test_a_second_ctrl_c_while_a_chat_task_stops_is_told_and_keeps_the_session(session: str) -> None:
    """Two Ctrl-Cs while a chat task stopped (its model loading) ended the whole chat, exit 130, with no word
    that it was stopping; `ask` still ends at a second press."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", _CTRL_C_TWICE_WHILE_STOPPING, session], capture_output=True,
                          text=True, timeout=60)
    if session == "chat":
        assert (done.returncode, done.stdout) == (0, "interrupted [False, True]\n"), done.stderr
    else:
        assert done.returncode == 130 and "interrupted again: stopped without waiting" in done.stderr


def test_a_ctrl_c_as_the_live_view_closes_does_not_leave_it_drawing() -> None:
    # (found by a trial: two quick Ctrl-Cs during a chat task left the panel redrawing over the prompt for ever)
    import subprocess

    done = subprocess.run([sys.executable, "-c", _CTRL_C_AS_THE_VIEW_CLOSES], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout == "stopped\n" and done.stderr.rstrip().endswith("KeyboardInterrupt"), done.stderr


_PIPED_CHAT_SIGINT_TWICE = """
import asyncio, os, signal, sys
from orchestra import Agent, Pool, agents, cli, core
from orchestra.settings import Settings
from orchestra.testing import FunctionModel

core.SAME_INTERRUPT_S = float(sys.argv[2])  # 3600: the SIGINT again is the same one; 0: a press of its own
again = sys.argv[1]  # where it comes: as the next task is planned, or after the session said "bye"

held = []

def interrupt() -> None:
    os.kill(os.getpid(), signal.SIGINT)

async def expert(request):
    if "first question" in request.prompt_text():
        if not held:  # (once: its three experts are asked together)
            interrupt()  # `timeout -s INT` (or a Ctrl-C) as the first task runs
        held.append(request)
        await asyncio.Event().wait()
    return "The answer is 1"

def planner(request):
    if again == "next" and "second question" in request.prompt_text():
        interrupt()  # the same SIGINT again
    if KEYWORDS_MARK in request.prompt_text():
        return {"keywords": ["general"]}
    return {"subtasks": [{"id": "answer", "instruction": "answer it", "depends_on": [], "skills": ["general"]}]}

pool = Pool(agents=[Agent(name="solo", model=FunctionModel(expert, name="m"))],
            planner=FunctionModel(planner, name="planner"), settings=Settings(fast_path=False, plan_check=False))
agents.Pool.load = classmethod(lambda cls, *args, **kwargs: pool)
if again == "bye":
    cli.shield_ray_shutdown = interrupt  # (as the command has returned: the process exits)
cli.command_line(["chat", "--no-store"])
""".replace("KEYWORDS_MARK", repr(KEYWORDS_MARK))


@pytest.mark.parametrize("again, same_s", [("next", 3600.0), ("bye", 3600.0), ("bye", 0.0)])
def test_a_piped_chat_takes_a_sigint_sent_twice_as_one_interrupt(again: str, same_s: float) -> None:
    """`timeout -s INT` sends SIGINT to the command and to its group: in a piped chat the second, once the
    cancelled task had said what it kept, cancelled the next task (its plan's prompt then read the "a" meant for
    it as a task), or, after "bye", ended the process by SIGINT (so did a press of its own there)."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", _PIPED_CHAT_SIGINT_TWICE, again, str(same_s)], capture_output=True,
                          text=True, timeout=60, input="first question\na\nsecond question\na\n")
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert done.stdout.count("planning…") == 2 and "\ncancelled" not in done.stdout, done.stdout
    assert "task cancelled" in done.stdout and "The answer is 1" in done.stdout and done.stdout.endswith("> bye\n")
