"""The command line, run as a real subprocess against loopback endpoints."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import AGGREGATE_MARK, KEYWORDS_MARK, wait_for
from loopback_llm import ScriptedLLM, write_pool

from orchestra import Pool
from orchestra.profile import persona_sha256
from orchestra.testing import LoopbackRequest, Reply, chat_handler, error_reply, openai_reply


def cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m orchestra ARGS`` with real model requests allowed (they go to loopback servers)."""
    full_env = {**os.environ, "ORCHESTRA_ALLOW_MODEL_REQUESTS": "1", "COLUMNS": "120", **(env or {})}
    return subprocess.run([sys.executable, "-m", "orchestra", *args], input=stdin, capture_output=True, text=True,
                          env=full_env, timeout=timeout)


@pytest.fixture
def llm(loopback):
    scripted = ScriptedLLM()
    server = loopback(scripted.handler())
    scripted.server = server
    return scripted


def test_help_lists_the_commands() -> None:
    done = cli("--help")
    assert done.returncode == 0
    for command in ("ask", "run", "validate", "profile", "eval", "chat", "agents", "resume", "runs", "show"):
        assert command in done.stdout


def test_no_command_shows_the_help() -> None:
    """Not a one-line usage error holding the whole help text (click raises the help as a usage error)."""
    done = cli()
    assert done.returncode in (0, 2)  # (click before 8.2 exits 0)
    shown = done.stdout + done.stderr
    assert shown.startswith("Usage: ") and "error:" not in shown
    assert all(command in shown for command in ("ask", "run", "eval", "serve"))


def test_ask_json_multi_step_dag_batches_and_aggregation(loopback, tmp_path: Path) -> None:
    llm = ScriptedLLM()
    numbers_aggregated: list[asyncio.Event] = []  # made in the server's event loop

    async def answer(request: LoopbackRequest) -> str | Reply:
        if not numbers_aggregated:
            numbers_aggregated.append(asyncio.Event())
        aggregate = AGGREGATE_MARK in request.prompt
        if aggregate and "Compute the numbers" in request.prompt:
            numbers_aggregated[0].set()
        elif not aggregate and "Your assignment: List the key facts" in request.prompt:
            # the facts experts answer only once the numbers node's aggregation was sent: its own
            # experts' answers were enough (remote calls have no barrier), so the two aggregations
            # are two waves, whatever the timing
            await asyncio.wait_for(numbers_aggregated[0].wait(), 10)
        return llm.text(request)

    pool = write_pool(tmp_path, loopback(chat_handler(answer)).url)
    done = cli("ask", "Write a short report on the numbers, then check it", "--pool", str(pool), "--json", "--k", "3")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    data = json.loads(done.stdout)
    assert data["answer"] == "Final report: everything checks out." or data["answer"].startswith("Synthesized")
    nodes = {n["id"]: n for n in data["plan"]["nodes"]}
    assert set(nodes) == {"facts", "numbers", "report"}
    assert nodes["report"]["depends_on"] == ["facts", "numbers"]
    assert all(len(n["experts"]) == 3 and n["aggregator"] for n in nodes.values())
    assert data["usage"]["calls"] == 1 + 3 * (3 + 1)  # plan, then per node 3 experts + 1 aggregation
    # one batch per model per wave
    per_wave = Counter((b["wave"], b["model"]) for b in data["batches"])
    assert max(per_wave.values()) == 1
    # plan, experts (facts and numbers together), numbers' aggregation, facts' aggregation, experts
    # (report), report's aggregation
    assert [(b["wave"], b["purpose"]) for b in data["batches"] if b["purpose"] != "expert"] == [
        (1, "plan"), (3, "aggregate"), (4, "aggregate"), (6, "aggregate")]
    assert {b["wave"] for b in data["batches"] if b["purpose"] == "expert"} == {2, 5}
    aggregations = [prompt for kind, prompt in llm.prompts if kind == "aggregate"]
    assert ["Compute the numbers" in p for p in aggregations] == [True, False, False]
    assert "List the key facts" in aggregations[1]
    assert data["model_loads"] == {} and data["elapsed_s"] > 0
    assert set(data["usage"]) >= {"calls", "prompt_tokens", "completion_tokens", "cost_usd"}


def test_ask_plain_output_is_the_answer_with_log_lines_on_stderr(llm, tmp_path: Path) -> None:
    pool = write_pool(tmp_path, llm.server.url)
    done = cli("ask", "Quick question", "--pool", str(pool), "--no-plan")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Synthesized answer. The answer is 42"
    assert "batch" in done.stderr and "run " in done.stderr
    quiet = cli("ask", "Quick question", "--pool", str(pool), "--no-plan", "--quiet")
    assert quiet.stderr == "" and quiet.stdout.strip() == "Synthesized answer. The answer is 42"
    sent = len(llm.server.requests)
    for flags in (("-q", "-v"), ("--verbose", "--quiet")):  # (--verbose silently won)
        both = cli("ask", "Quick question", "--pool", str(pool), *flags)
        assert both.returncode == 2 and "--quiet and --verbose contradict each other; give one" in both.stderr
    assert len(llm.server.requests) == sent


def test_an_answer_cut_at_its_token_limit_is_said_beside_it_and_in_show(loopback, tmp_path: Path) -> None:
    """The aggregator's answer stopped at its max_tokens (finish_reason length): `ask` printed the cut text,
    `done` and exit 0 with no word of it (only `--json`'s answer_cut knew), and `show` neither."""
    scripted = ScriptedLLM()

    def text(request: LoopbackRequest) -> str | Reply:
        written = scripted.text(request)
        if AGGREGATE_MARK in request.prompt:
            return openai_reply("Synthesized answer. The answer is", finish_reason="length")
        return written

    server = loopback(chat_handler(text))
    pool = write_pool(tmp_path, server.url)
    done = cli("ask", "Quick question", "--pool", str(pool), "--no-plan")
    assert done.returncode == 0 and done.stdout.strip() == "Synthesized answer. The answer is", done.stderr
    assert "warning: the answer stopped at its token limit and may be incomplete: raise max_tokens" in done.stderr
    run_id = re.search(r"run (\S+) · done", done.stderr)[1]  # type: ignore[index]
    shown = cli("show", run_id)
    assert "answer (stopped at its token limit)" in shown.stdout, shown.stdout
    as_json = cli("ask", "Quick question", "--pool", str(pool), "--no-plan", "--json")  # (said nothing on stderr)
    assert json.loads(as_json.stdout)["answer_cut"] is True
    assert "warning: the answer stopped at its token limit and may be incomplete" in as_json.stderr
    whole = loopback(ScriptedLLM().handler())  # (answers that end on their own: no warning)
    ended = cli("ask", "Quick question", "--pool", str(write_pool(tmp_path, whole.url)), "--no-plan")
    assert ended.returncode == 0 and "warning" not in ended.stderr, ended.stderr


def test_an_answer_cut_where_the_context_window_filled_says_so(loopback, tmp_path: Path) -> None:
    """The server wrote 11 of the 450 tokens allowed and said "length": its context was full, yet the
    warning advised raising max_tokens, which could not help."""
    scripted = ScriptedLLM()

    def text(request: LoopbackRequest) -> str | Reply:
        if AGGREGATE_MARK in request.prompt:
            return openai_reply("The Roman Empire, a tapestry of", finish_reason="length", completion_tokens=11)
        return scripted.text(request)

    server = loopback(chat_handler(text))
    pool = write_pool(tmp_path, server.url, extra="defaults: {max_tokens: 450}\n")
    done = cli("ask", "Quick question", "--pool", str(pool), "--no-plan")
    assert done.returncode == 0 and ("warning: the answer stopped where its writer's context window filled up, before "
                                     "its max_tokens") in done.stderr, done.stderr
    assert "raise max_tokens" not in done.stderr
    result = json.loads(cli("ask", "Quick question", "--pool", str(pool), "--no-plan", "--json").stdout)
    assert result["answer_cut"] and result["context_full"]


def test_a_task_of_dash_is_read_from_standard_input(llm, tmp_path: Path) -> None:
    pool = write_pool(tmp_path, llm.server.url)
    long_task = "Quick question about this log:\n" + "line of the log\n" * 20_000  # beyond a command line's reach
    done = cli("ask", "-", "--pool", str(pool), "--no-plan", "--json", stdin=long_task)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["task"] == long_task.rstrip("\n")  # a file's final newline is no part of it
    assert any(long_task.strip() in request.prompt for request in llm.server.requests)
    empty = cli("ask", "-", "--pool", str(pool), stdin="")
    assert empty.returncode == 2 and "empty" in empty.stderr
    marked = cli("ask", "-", "--pool", str(pool), "--no-plan", "--json", stdin="\ufeffQuick question\n")
    assert json.loads(marked.stdout)["task"] == "Quick question"  # an editor's byte-order mark is no part of it


def test_a_feature_the_server_refuses_is_reported_once_and_the_run_goes_on(loopback, tmp_path: Path) -> None:
    scripted = ScriptedLLM()
    refusals: list[str] = []

    def refuse_json_schema(request: LoopbackRequest) -> str | Reply:  # as llama-cpp-python's server does
        body = request.json() or {}
        if (body.get("response_format") or {}).get("type") == "json_schema":
            refusals.append(body["model"])
            return Reply(status=500, body={"error": {"message": "1 validation error: {'loc': ('body', "
                                                     "'response_format', 'type'), 'input': 'json_schema'}"}})
        return scripted.text(request)

    server = loopback(chat_handler(refuse_json_schema))
    pool = write_pool(tmp_path, server.url)
    done = cli("ask", "Write a short report on the numbers, then check it", "--pool", str(pool), "--k", "2")
    assert done.returncode == 0, done.stderr
    dropped = [line for line in done.stderr.splitlines() if "going on without" in line]
    assert len(dropped) == 1, done.stderr
    assert ": going on without response_format:json_schema: " in dropped[0]
    assert "does not accept response_format:json_schema (HTTP 500)" in dropped[0]
    assert len(refusals) == 1  # one endpoint, one probe: every later structured request used the next mode
    assert scripted.kinds["plan"] == 1 and done.stdout.strip()


def test_verbose_shows_every_prompt_and_response(llm, tmp_path: Path) -> None:
    pool = write_pool(tmp_path, llm.server.url)
    done = cli("ask", "Quick question", "--pool", str(pool), "--no-plan", "--verbose", "--k", "1")
    assert done.returncode == 0, done.stderr
    assert "--- system ---" in done.stderr and "--- user ---" in done.stderr
    assert "Your assignment: Quick question" in done.stderr and "--- response ---" in done.stderr


def test_unreachable_endpoint_is_one_line_naming_the_url(tmp_path: Path) -> None:
    pool = write_pool(tmp_path, "http://127.0.0.1:9")
    done = cli("ask", "anything", "--pool", str(pool), "--no-plan", "--k", "1")
    assert done.returncode != 0
    lines = [line for line in done.stdout.splitlines() + done.stderr.splitlines()
             if "127.0.0.1:9" in line]
    assert lines and "cannot reach http://127.0.0.1:9/v1/chat/completions" in lines[0]
    assert "Traceback" not in done.stderr


def test_missing_api_key_is_one_line_naming_the_variable(llm, tmp_path: Path) -> None:
    pool = write_pool(tmp_path, llm.server.url, api_key_env="ORCHESTRA_TEST_MISSING_KEY")
    env = {k: v for k, v in os.environ.items() if k != "ORCHESTRA_TEST_MISSING_KEY"}
    done = subprocess.run([sys.executable, "-m", "orchestra", "ask", "x", "--pool", str(pool), "--json"],
                          capture_output=True, text=True, env={**env, "ORCHESTRA_ALLOW_MODEL_REQUESTS": "1"})
    assert done.returncode != 0
    assert "environment variable ORCHESTRA_TEST_MISSING_KEY is not set" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert llm.kinds == Counter()


def test_bad_pool_file_is_one_line_with_file_and_line(tmp_path: Path) -> None:
    pool = tmp_path / "pool.yaml"
    pool.write_text("models:\n  m:\n    type: openai\n    model: x\nagents:\n  - name: a\n    model: nope\n")
    done = cli("ask", "x", "--pool", str(pool))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: {pool}:7:12: agent 'a' names unknown model 'nope'; models: m")


def test_agents_lists_pool_and_profiles(tmp_path: Path, llm) -> None:
    pool = write_pool(tmp_path, llm.server.url)
    done = cli("agents", "--pool", str(pool), "--json")
    data = json.loads(done.stdout)
    assert [a["name"] for a in data["agents"]] == ["alpha-expert", "beta-expert", "gamma-expert"]
    assert data["agents"][0]["declared_skills"] == ["history"] and not data["agents"][0]["profiled"]
    table = cli("agents")
    assert table.returncode == 0 and "mathematician" in table.stdout


def test_json_output_is_the_one_object_on_stdout_whatever_else_writes_there(llm, tmp_path: Path) -> None:
    """On Ray, `ask --json` began with `(raylet) A worker died...` (Ray prints on stdout): no JSON reader
    took it. Whatever else the process writes to stdout, from Python or to file 1 itself, goes to stderr."""
    pool = write_pool(tmp_path, llm.server.url)
    script = (
        "import os, sys\n"
        "from orchestra import cli, core\n"
        "answer = core.Orchestra.arun\n"
        "async def noisy(self, *args, **kwargs):\n"
        "    print('(raylet) A worker died or was killed')\n"
        "    os.write(1, b'a C library writes here\\n')\n"
        "    return await answer(self, *args, **kwargs)\n"
        "core.Orchestra.arun = noisy\n"
        f"cli.main(['ask', 'Why is the sky blue?', '--pool', {str(pool)!r}, '--json'])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ORCHESTRA_ALLOW_MODEL_REQUESTS": "1"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "done"
    assert "(raylet) A worker died" in done.stderr and "a C library writes here" in done.stderr


def test_json_output_with_stdout_closed_is_no_traceback() -> None:
    """`orchestra eval ... --json >&-` (a daemon with no stdout): an AttributeError traceback, exit 1."""
    script = ("import sys\nfrom orchestra.cli import echo_json, keep_stdout_for_json\n"
              "keep_stdout_for_json(True)\necho_json('{}')\nprint('done', file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, timeout=60, close_fds=True,
                          preexec_fn=lambda: os.close(1))
    assert (done.returncode, done.stderr) == (0, "done\n")


def test_commands_started_without_stdout_or_stdin_read_them_as_dev_null(tmp_path: Path) -> None:
    """`ask --json >&-`, `chat <&-` and `serve >&-` (a daemon's) ended in an AttributeError traceback
    (`sys.stdout.isatty()` on None, uvicorn's logging set-up), exit 1: now as if redirected to /dev/null."""
    pool = tmp_path / "pool.yaml"
    pool.write_text("name: p\nmodels:\n  a: {type: openai, model: a, base_url: 'http://127.0.0.1:9/v1', "
                    "api_key_env: null, max_attempts: 1}\nagents:\n  - {name: h, model: a}\n")
    env = {**os.environ, "ORCHESTRA_HOME": str(tmp_path / "home"), "ORCHESTRA_ALLOW_MODEL_REQUESTS": "1"}

    def without(fd: int, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "orchestra", *args], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120, env=env,
                              close_fds=True, preexec_fn=lambda: os.close(fd))

    asked = without(1, "ask", "What is 6*7?", "--pool", str(pool), "--json")
    assert asked.returncode == 2 and asked.stderr.count("\n") == 1, asked.stderr
    assert "cannot reach http://127.0.0.1:9/v1" in asked.stderr
    chatted = without(0, "chat", "--pool", str(pool))
    assert (chatted.returncode, chatted.stderr) == (0, "")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        served = without(1, "serve", "--pool", str(pool), "--port", str(port), "--no-store")
    assert served.returncode == 2 and served.stderr.count("\n") == 1, served.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in served.stderr


def test_counts_of_one_read_in_the_singular() -> None:
    """`ask --max-calls 1` ended with `· 1 calls · 1 requests ·`; chat greeted a one-agent pool with `(1 agents)`."""
    from orchestra.result import RunResult
    from orchestra.terminal_text import counted
    from orchestra.view import summary_line

    assert [counted(n, "call") for n in (0, 1, 2)] == ["0 calls", "1 call", "2 calls"]
    one = RunResult.model_validate({"run_id": "r1", "task": "t", "status": "done", "answer": "a",
                                    "usage": {"calls": 1, "requests": 1}, "elapsed_s": 1.0})
    assert " · done · 1 call · 1 request · " in summary_line(one)


def test_a_resumes_last_line_gives_its_two_costs_to_the_same_decimals() -> None:
    """`$0.0001 in all; this resume sent 3 requests ($0.0000586)`: the first read as rounded (a trial)."""
    from orchestra.result import RunResult
    from orchestra.view import summary_line

    resumed = RunResult.model_validate({"run_id": "r1", "task": "t", "status": "done", "answer": "a", "elapsed_s": 1.0,
                                        "usage": {"calls": 5, "requests": 5, "cost_usd": 0.0001102}})
    line = summary_line(resumed, earlier={"requests": 2, "cost_usd": 0.0000516})
    assert " · $0.0001102 in all; this resume sent 3 requests ($0.0000586) · " in line, line


def test_ctrl_c_is_ignored_while_a_command_that_used_ray_exits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C after `ask --ray --json` had printed interrupted Ray's shutdown at exit: a traceback, exit 0,
    and Ray's processes left running. Without Ray, Ctrl-C is left as it was."""
    import signal
    import types

    from orchestra.cli import shield_ray_shutdown

    before = signal.getsignal(signal.SIGINT)
    try:
        monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False))
        shield_ray_shutdown()
        assert signal.getsignal(signal.SIGINT) is before
        monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: True))
        shield_ray_shutdown()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("initialized", [True, False])
def test_a_command_that_used_ray_exits_deaf_to_ctrl_c(tmp_path: Path, initialized: bool) -> None:
    (tmp_path / "ray.py").write_text(f"def is_initialized():\n    return {initialized}\n")  # (Ray, as it exits)
    script = ("import atexit, signal, ray\n"
              "atexit.register(lambda: print('deaf' if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else 'hears'))\n"
              f"from orchestra.cli import main\nmain(['runs', '--store', {str(tmp_path / 'runs.db')!r}])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])})
    assert done.stdout.splitlines()[-1] == ("deaf" if initialized else "hears"), done.stderr


def test_agents_shows_gamma_at_the_pools_temperature(tmp_path: Path) -> None:
    """`orchestra agents` computed γ at the default temperature, not the pool's (0.409 shown where its
    runs used about 1.0)."""
    from orchestra.profile import Provenance, SkillProfile, global_competence

    profiles = tmp_path / "profiles"
    for name, total in (("alpha", 6), ("beta", 2)):
        SkillProfile(agent=f"{name}-expert", skills={"history": total}, accuracy=0.5,
                     provenance=Provenance(dataset="d", dataset_sha256="0" * 64, items=10, model="m")).save(profiles)
    pool = write_pool(tmp_path, "http://127.0.0.1:9", models=("alpha", "beta"),
                      extra="profiles: profiles\nsettings: {recruit: {temperature: 0.1}}\n")
    shown = {a["name"]: a["competence"] for a in json.loads(cli("agents", "--pool", str(pool), "--json").stdout)["agents"]}
    expected = global_competence({"alpha-expert": 6, "beta-expert": 2}, temperature=0.1)
    assert shown == {name: round(gamma, 4) for name, gamma in expected.items()} and shown["alpha-expert"] > 0.99


def test_runs_show_and_export(llm, tmp_path: Path) -> None:
    pool = write_pool(tmp_path, llm.server.url)
    done = cli("ask", "Write a short report, then check it", "--pool", str(pool), "--json")
    run_id = json.loads(done.stdout)["run_id"]
    listed = json.loads(cli("runs", "--json").stdout)
    assert listed[0]["id"] == run_id and listed[0]["status"] == "done" and listed[0]["calls"] == 13
    for width in ("80", "60"):  # the id `resume` takes is whole on a narrow terminal; the task gives way
        lines = cli("runs", env={"COLUMNS": width}).stdout.splitlines()
        assert f" {run_id} " in lines[3] and " done " in lines[3] and " 13 " in lines[3], lines[3]
        assert max(len(line) for line in lines) <= int(width)  # columns left out whole, none squeezed to nothing
    shown = cli("show", run_id[:15])
    assert shown.returncode == 0, shown.stderr
    for fragment in ("plan", "recruitment of facts", "history +1", "[system]", "[response]", "calls 13"):
        assert fragment in shown.stdout, fragment
    lines = [json.loads(line) for line in cli("show", run_id, "--export", "jsonl").stdout.splitlines()]
    types = Counter(line["type"] for line in lines)
    assert types["run"] == 1 and types["node"] == 3 and types["call"] == 13 and types["event"] > 10
    report = json.loads(cli("show", run_id, "--json").stdout)
    assert report["result"]["answer"] == report["run"]["answer"]
    missing = cli("show", "nope")
    assert missing.returncode == 2 and "no run 'nope'" in missing.stderr


@pytest.mark.parametrize(("given", "position"), [(b"\xff\xfe", 1), (b"\xffab", 1), (b"caf\xc3\xa9\xff", 5)])
@pytest.mark.parametrize("command", [("show",), ("show", "--json"), ("show", "--export", "jsonl"), ("resume", "--json")])
def test_a_run_id_not_utf8_is_refused_in_one_line(given: bytes, position: int, command: tuple[str, ...]) -> None:
    """A command line's bytes that are not UTF-8 (lone surrogates in Python) were a UnicodeEncodeError
    traceback from SQLite, exit 1."""
    run_id = os.fsdecode(given)
    done = cli(command[0], run_id, *command[1:])
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.splitlines() == [
        f"error: no run {run_id!r} in {Path(os.environ['ORCHESTRA_HOME']) / 'runs.db'}: the id is not valid Unicode: "
        f"character {position} is a lone surrogate (bytes that are not UTF-8 in this locale); `orchestra runs` lists "
        "them"]


def test_runs_with_a_limit_past_sqlites_largest_integer_lists_them_all() -> None:
    """``runs --limit 9223372036854775808`` was an OverflowError traceback from SQLite, exit 1."""
    from orchestra.store import RunStore

    store = RunStore()
    for index in range(3):
        store.begin_run(f"20261203-00000{index}-abcdef", "t", {})
    for extra in ((), ("--json",)):
        listed = cli("runs", "--limit", str(2**63), *extra)
        assert listed.returncode == 0 and listed.stderr == "", listed.stderr
    assert len(json.loads(listed.stdout)) == 3
    for below in ("0", "-3"):  # (a clamp of the range took them as 1)
        assert cli("runs", "--limit", below).returncode == 2


@pytest.mark.parametrize("begun", [2, 7])
def test_an_ambiguous_run_id_lists_the_runs_it_starts(begun: int) -> None:
    """`show 2026` said `run id '2026' is ambiguous (10 runs start with it)` and named none of them."""
    from orchestra.store import RunStore

    store = RunStore()
    ids = [f"20261203-00000{i}-abcdef" for i in range(begun)]
    for run_id in ids:
        store.begin_run(run_id, "t", {})
    newest = ", ".join(reversed(ids[-5:]))
    for command in ("show", "resume"):
        done = cli(command, "2026")
        more = ", and 2 more" if begun == 7 else ""
        assert done.returncode == 2 and done.stderr.splitlines() == [
            f"error: run id '2026' is ambiguous ({begun} runs start with it: {newest}{more}); give more of it"]


def test_show_says_the_cost_of_a_request_cut_off_in_flight_is_unknown() -> None:
    """Its answer never came, so what the endpoint bills is not known: `show` read `0+0 tokens · $0.0000`."""
    from orchestra.errors import CallCancelled, ConnectionBroke
    from orchestra.models import ChatRequest, Usage
    from orchestra.store import RunStore

    store = RunStore()
    store.begin_run("20261203-000000-abcdef", "t", {})

    def failed(error: Exception, usage: Usage) -> Exception:
        error.usage = usage  # type: ignore[attr-defined]
        return error

    for seq, outcome in enumerate([
            failed(CallCancelled("m: cancelled while its request was in flight"), Usage(requests=1)),
            failed(CallCancelled("m: cancelled while its request was in flight"),
                   Usage(prompt_tokens=7, completion_tokens=3, cost_usd=0.0004, requests=2)),
            failed(CallCancelled("m: cancelled before its request was sent"), Usage()),
            failed(ConnectionBroke("m: the connection broke"), Usage(requests=1))]):
        store.record("20261203-000000-abcdef", "k", seq, "m", ChatRequest.user(f"q{seq}"), outcome, purpose="expert",
                     node="a", source="model")
    shown = cli("show", "20261203-000000-abcdef")
    assert shown.returncode == 0, shown.stderr
    lines = [line.strip("│ ") for line in shown.stdout.splitlines() if line.startswith("│ model · ")]
    assert lines == ["model · 1 request · tokens and cost unknown (cut off in flight)",
                     "model · 2 requests · 7+3 tokens · $0.0004, and the cut-off request's unknown",
                     "model · 0 requests · 0+0 tokens · $0.0000",
                     "model · 1 request · 0+0 tokens · $0.0000"]


def test_a_long_run_id_is_shortened_where_it_is_echoed() -> None:
    """A 5,000-character id was echoed whole in its error line."""
    done = cli("show", "a" * 5000)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"error: no run '{'a' * 59}... in {Path(os.environ['ORCHESTRA_HOME']) / 'runs.db'}; `orchestra runs` lists them"]


def gamma_gated(loopback: Any, tmp_path: Path, reply: Reply,
                expert: Callable[[str], str]) -> tuple[Any, Path, Path, list[bool]]:
    """A loopback server whose model gamma answers its expert calls with ``reply`` while the gate
    (the list returned, ``[True]``) is shut, a pool of three models on it, and three questions."""
    gate = [True]
    scripted = ScriptedLLM(expert=lambda model, assignment: expert(model))

    def text(request: LoopbackRequest) -> str | Reply:
        if gate[0] and (request.json() or {}).get("model") == "gamma" and KEYWORDS_MARK not in request.prompt:
            return reply
        return scripted.text(request)

    server = loopback(chat_handler(text))
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} minus {i - 1}?", "answer": "1"}) + "\n"
                            for i in range(3)))
    return server, write_pool(tmp_path, server.url), data, gate


def test_an_interrupted_profile_goes_on_with_resume_sending_only_what_it_had_not(loopback, tmp_path: Path) -> None:
    """Ctrl-C of a profile (it writes its profiles only at the end) lost every answer and said
    "finished calls are saved: `orchestra runs` lists the runs to resume": there was no such run.
    Answers are now recorded as they come; ``--resume`` reuses them and sends only the rest,
    counted at the server, and the profiles are those of an uninterrupted profile."""
    import signal

    # gamma's answers never come: the profile is stopped there
    server, pool, data, hang = gamma_gated(loopback, tmp_path, Reply(hang=True),
                                           lambda model: "The answer is 1" if model == "alpha" else "The answer is 2")
    argv = [sys.executable, "-m", "orchestra", "profile", "--pool", str(pool), "--data", str(data), "--json"]
    env = {**os.environ, "ORCHESTRA_ALLOW_MODEL_REQUESTS": "1"}
    # started as a shell script starts a job in the background: with SIGINT ignored, which it keeps (a
    # Ctrl-C at the script is not the job's); SIGTERM, what `kill` sends, stops it as a Ctrl-C does
    child = subprocess.Popen([*argv, "--out", str(tmp_path / "stopped")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    wait_for(child, lambda: any((r.json() or {}).get("model") == "gamma" and KEYWORDS_MARK not in r.prompt
                                for r in list(server.requests)), "gamma was asked")
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130
    stopped = json.loads(out)  # (--json printed nothing) what was sent, as the server counted it
    assert (stopped["interrupted"], stopped["written"], stopped["reused"]) == (True, [], 0)
    assert stopped["requests"] == len(server.requests) and stopped["prompt_tokens"] > 0
    assert err.strip().splitlines()[-1] == ("error: interrupted; no profiles were written; the answers so far are "
                                            "saved: the same command with --resume goes on with this profile")
    assert not list((tmp_path / "stopped").iterdir())  # (the folder is made, and checked, before any call)
    home = Path(os.environ["ORCHESTRA_HOME"])
    with sqlite3.connect(home / "runs.db") as db:
        [(recorded,)] = db.execute("SELECT count(*) FROM cache WHERE key LIKE 'profile:%'").fetchall()
    assert recorded >= 3 * 5  # every keyword sample at least: that stage ends before any agent is asked
    hang[0] = False
    before = len(server.requests)
    resumed = cli(*argv[3:], "--out", str(tmp_path / "resumed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    sent = len(server.requests) - before
    assert json.loads(resumed.stdout)["reused"] == recorded
    # what a profile cost is said (it said nothing): the requests the server received, reused answers aside
    assert json.loads(resumed.stdout)["requests"] == json.loads(resumed.stdout)["calls"] == sent
    before = len(server.requests)
    whole = cli(*argv[3:], "--out", str(tmp_path / "whole"), "--no-store")  # uninterrupted, nothing reused
    assert whole.returncode == 0, whole.stderr
    assert sent == len(server.requests) - before - recorded  # only what was not answered before
    assert json.loads(whole.stdout)["requests"] == len(server.requests) - before
    assert json.loads(whole.stdout)["prompt_tokens"] > 0
    assert [json.loads(p.read_text())["skills"] for p in sorted((tmp_path / "resumed").glob("*.json"))] == \
        [json.loads(p.read_text())["skills"] for p in sorted((tmp_path / "whole").glob("*.json"))]
    refused = cli(*argv[3:], "--resume", "--no-store")
    assert (refused.returncode, refused.stderr.strip()) == (
        2, "error: --resume reuses the answers recorded in the run store; drop --no-store")


def test_a_profile_whose_calls_fail_writes_nothing_and_resume_finishes_it(loopback, tmp_path: Path) -> None:
    """An endpoint that refused every call was profiled as always wrong (accuracy 0.0, exit 0), over
    the good profiles there: a question not answered is not a wrong answer. Now nothing is written,
    the exit code is the failure's, and --resume sends only the calls not answered."""
    server, pool, data, refuse = gamma_gated(loopback, tmp_path, error_reply(401, "bad key"),
                                             lambda model: "The answer is 1")
    out = tmp_path / "profiles"
    out.mkdir()
    (out / "gamma-expert.json").write_text("the profile measured before")
    argv = ("profile", "--pool", str(pool), "--data", str(data), "--out", str(out), "--json")
    failed = cli(*argv)
    assert failed.returncode == 2
    spent = json.loads(failed.stdout)  # (--json printed nothing)
    assert (spent["interrupted"], spent["written"], spent["requests"]) == (False, [], len(server.requests))
    assert spent["error"].startswith("profiling stopped after its answers stage")
    assert failed.stderr.strip().splitlines()[-1].startswith(
        "error: profiling stopped after its answers stage: 3 of its calls failed (first: agent gamma-expert on item q0: ")
    assert failed.stderr.strip().endswith("no profiles were written; the answers so far are saved: once the cause is "
                                          "fixed, the same command with --resume sends only the calls not answered")
    assert [p.name for p in out.iterdir()] == ["gamma-expert.json"]
    assert (out / "gamma-expert.json").read_text() == "the profile measured before"
    refuse[0] = False
    before = len(server.requests)
    resumed = cli(*argv, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    answered_before = 3 * 5 + 2 * 3  # the keyword samples, and the two other agents' answers
    assert json.loads(resumed.stdout)["reused"] == answered_before
    assert len(server.requests) - before == 3  # gamma's three answers (no aggregation set: all are right)
    assert json.loads((out / "gamma-expert.json").read_text())["accuracy"] == 1.0
    # (written where the pool does not read them, it says so)
    assert resumed.stderr.strip().splitlines()[-1] == (f"note: {pool} reads its profiles from nowhere (it has no "
                                                       f"profiles: line); to recruit by these, set `profiles: {out}` in it")


def test_profile_refuses_before_any_call_what_could_not_finish(llm, tmp_path: Path) -> None:
    pool = write_pool(tmp_path, llm.server.url)
    data = tmp_path / "val.jsonl"
    data.write_text(json.dumps({"id": "q1", "question": "Name the capital of France.", "answer": "Paris"}) + "\n")
    wrong_grader = cli("profile", "--pool", str(pool), "--data", str(data), "--grader", "mc")
    assert (wrong_grader.returncode, wrong_grader.stderr.strip()) == (
        2, f"error: the mc grader cannot grade item q1 of {data}: its answer 'Paris' is not the letter of a choice "
           "(it has no choices); choose another grader (auto picks one per item)")
    blocker = tmp_path / "afile"
    blocker.write_text("")
    no_folder = cli("profile", "--pool", str(pool), "--data", str(data), "--out", str(blocker / "sub"))
    assert (no_folder.returncode, no_folder.stderr.strip()) == (
        2, f"error: cannot write the profiles to {blocker / 'sub'}: {blocker} is a file, not a folder")
    numbers = cli("eval", "--pool", str(pool), "--data", str(data), "--set", "grader=numeric")
    assert (numbers.returncode, numbers.stderr.strip()) == (
        2, f"error: the numeric grader cannot grade item q1 of {data}: its answer 'Paris' is not a number; choose "
           "another grader (auto picks one per item)")
    assert not llm.server.requests


def test_profile_budget_flags_bound_what_the_command_sends(llm, tmp_path: Path) -> None:
    """profile took no budget (a pool's, which bounds a run, was ignored without a word: 96 requests
    under max_calls 10): --max-calls bounds what it sends (a resume's reused answers aside), and a
    pool's budget gets a note."""
    pool = write_pool(tmp_path, llm.server.url, extra="settings: {budget: {max_calls: 10}}\nprofiles: profiles\n")
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(4)))
    stopped = cli("profile", "--pool", str(pool), "--data", str(data), "--max-calls", "7")
    assert stopped.returncode == 3, stopped.stderr
    assert len(llm.server.requests) == 7
    # (the 13 keyword calls the budget left unsent "failed"; "raise it" read as if a resume's reused answers counted)
    assert stopped.stderr.strip().splitlines()[-1] == (
        "error: profiling stopped after its keywords stage: its budget left 13 of its calls unsent (first: the "
        "keywords of item q1: budget max_calls=7 reached (7 calls made)); no profiles were written; the answers so "
        "far are saved: the same command with --resume sends only the calls not answered, up to --max-calls more")
    again = cli("profile", "--pool", str(pool), "--data", str(data), "--max-calls", "7", "--resume")
    assert again.returncode == 3 and len(llm.server.requests) == 14, again.stderr  # (7 reused, 7 more sent)
    whole = cli("profile", "--pool", str(pool), "--data", str(data), "--resume")
    assert whole.returncode == 0, whole.stderr
    assert whole.stderr.splitlines()[0] == ("note: the pool's budget bounds each run of ask, eval and run, not a "
                                            "profile; give profile --max-calls, --max-cost or --max-tokens to bound "
                                            "this one")
    assert len(llm.server.requests) == 4 * 5 + 3 * 4  # keyword samples and answers, each sent once


def test_a_pool_with_the_profile_of_a_removed_agent_says_which_file_and_can_be_profiled_again(
        llm, tmp_path: Path) -> None:
    """(Removing a profiled agent made the pool unloadable, `orchestra profile` too, with a message
    that did not say which file to move.)"""
    pool = write_pool(tmp_path, llm.server.url, extra="profiles: profiles\n")
    data = tmp_path / "val.jsonl"
    data.write_text(json.dumps({"id": "q1", "question": "What is 1 + 0?", "answer": "1"}) + "\n")
    assert cli("profile", "--pool", str(pool), "--data", str(data)).returncode == 0
    text = pool.read_text()
    pool.write_text(text[:text.index("\n  - name: gamma-expert")] + text[text.index("\nprofiles:"):])
    listed = cli("agents", "--pool", str(pool))
    assert listed.returncode == 2
    assert listed.stderr.strip().endswith(
        f"{tmp_path / 'profiles'} holds profiles of agents the pool does not have: gamma-expert.json (agent "
        "'gamma-expert'); move those files out of the folder (an agent removed or renamed since it was profiled)")
    again = cli("profile", "--pool", str(pool), "--data", str(data))
    assert again.returncode == 0, again.stderr
    assert again.stderr.strip().splitlines()[-1] == (
        f"note: {tmp_path / 'profiles'} also holds profiles of agents {pool} does not have: gamma-expert.json (agent "
        "'gamma-expert'); move those files out of the folder")
    (tmp_path / "profiles" / "gamma-expert.json").unlink()
    assert cli("agents", "--pool", str(pool)).returncode == 0


def test_show_refuses_two_formats_at_once(tmp_path: Path) -> None:
    done = cli("show", "some-run", "--export", "jsonl", "--json")  # (--json was silently ignored)
    assert done.returncode == 2 and "--export jsonl and --json are two formats; give one" in done.stderr


def test_profile_and_eval_over_loopback(loopback, tmp_path: Path) -> None:
    def expert(model: str, assignment: str) -> str:
        good = {"alpha": "history", "beta": "arithmetic", "gamma": "writing"}[model]
        return "The answer is 1" if good in assignment else "The answer is 2"

    scripted = ScriptedLLM(expert=expert)
    server = loopback(scripted.handler())
    data = tmp_path / "val.jsonl"
    rows = [{"id": f"{topic}{i}", "question": f"A {topic} question number {i}", "answer": "1", "category": topic}
            for topic in ("history", "arithmetic", "writing") for i in range(4)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    scripted.keywords = ["general"]
    pool = write_pool(tmp_path, server.url)
    out = tmp_path / "profiles"
    done = cli("profile", "--pool", str(pool), "--data", str(data), "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert len(report["written"]) == 3
    assert report["requests"] == report["calls"] == len(server.requests)  # (each answered at once)
    before = len(server.requests)
    shown = cli("profile", "--pool", str(pool), "--data", str(data), "--out", str(out))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[-1] == (f"profile · {len(server.requests) - before} calls · "
                                             f"{len(server.requests) - before} requests · "
                                             f"{report['prompt_tokens'] + report['completion_tokens']:,} tokens · $0.0000")
    alpha = json.loads((out / "alpha-expert.json").read_text())
    assert alpha["provenance"]["items"] == 12 and len(alpha["provenance"]["dataset_sha256"]) == 64
    # what the models are, not the pool's aliases for them
    assert alpha["provenance"]["keyword_model"] == alpha["provenance"]["model"] == "OpenAICompatible:alpha"
    assert alpha["provenance"]["endpoint"] == f"{server.url}/v1"  # and which server it was measured on
    # and the persona and sampling settings it answered with
    assert alpha["provenance"]["persona_sha256"] == persona_sha256(Pool.load(pool)["alpha-expert"].persona)
    assert alpha["provenance"]["sampling"] == {"temperature": None, "max_tokens": None}
    assert alpha["accuracy"] == pytest.approx(4 / 12)
    evaluated = cli("eval", "--pool", str(pool), "--data", str(data), "--method", "single", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["items"] == 12 and result["method"] == "single" and 0 <= result["accuracy"] <= 1
    shown = cli("eval", "--pool", str(pool), "--data", str(data), "--method", "single")
    assert shown.returncode == 0, shown.stderr
    # dollars as everywhere else: four decimals, more where a smaller amount needs them (it printed $0.000000)
    assert "$0.0000 " in shown.stdout and "$0.000000" not in shown.stdout, shown.stdout
    for topic in ("history", "arithmetic", "writing"):  # the text report has each category's accuracy too
        accuracy = result["per_category"][topic]["accuracy"]
        assert re.search(rf"accuracy: {topic}\s.*{accuracy:.3f} of 4", shown.stdout), shown.stdout


def test_eval_refuses_to_overwrite_its_data_or_to_plot_nowhere_before_any_call(loopback, tmp_path: Path) -> None:
    server = loopback(ScriptedLLM().handler())
    pool = write_pool(tmp_path, server.url)
    data = tmp_path / "val.jsonl"
    data.write_text('{"id": "a", "question": "What is 1 + 1?", "answer": "2"}\n')
    kept = data.read_bytes()
    same = cli("eval", "--pool", str(pool), "--data", str(data), "--output", str(data))
    assert same.returncode == 2 and same.stderr == (f"error: the answers would overwrite the data set {data}: "
                                                    "give --output another file\n")
    nowhere = cli("eval", "--pool", str(pool), "--data", str(data), "--sweep", "--lambdas", "0",
                  "--plot", str(tmp_path / "no" / "such" / "plot.html"))
    assert nowhere.returncode == 2 and nowhere.stderr == (
        f"error: cannot write the plot to {tmp_path / 'no' / 'such' / 'plot.html'}: no such folder, or no "
        "permission to write there\n")
    assert data.read_bytes() == kept and not server.requests
    # the run store, the pool file, or any file that is not an earlier answers file or plot (they were emptied)
    store = tmp_path / "runs.db"
    assert cli("ask", "What is 2 + 2?", "--pool", str(pool), "--no-plan", "--store", str(store)).returncode == 0
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    files, asked = {path: path.read_bytes() for path in (store, pool, notes)}, len(server.requests)
    for output, says in ((store, f"the answers would overwrite the run store {store}: give --output another file"),
                         (pool, f"the answers would overwrite the pool file {pool}: give --output another file"),
                         (notes, f"{notes} exists and is not an earlier answers file (JSON Lines): give --output a "
                                 "new file, or remove it first")):
        refused = cli("eval", "--pool", str(pool), "--data", str(data), "--store", str(store), "--output", str(output))
        assert (refused.returncode, refused.stderr) == (2, f"error: {says}\n")
    plotted = cli("eval", "--pool", str(pool), "--data", str(data), "--sweep", "--lambdas", "0", "--plot", str(notes))
    assert (plotted.returncode, plotted.stderr) == (2, f"error: {notes} exists and is not an earlier plot (an HTML "
                                                       "page): give --plot a new file, or remove it first\n")
    assert {path: path.read_bytes() for path in files} == files and len(server.requests) == asked
    other = tmp_path / "other.jsonl"  # another data set is JSON Lines too, not answers: refused
    other.write_text('{"id": "b", "question": "What is 2 + 2?", "answer": "4"}\n')
    refused = cli("eval", "--pool", str(pool), "--data", str(data), "--no-store", "--output", str(other))
    assert refused.returncode == 2 and "is not an earlier answers file" in refused.stderr, refused.stderr
    dash = cli("eval", "--pool", str(pool), "--data", str(data), "--no-store", "--output", "-")  # (a file named -)
    assert (dash.returncode, dash.stderr) == (2, "error: --output - would be a file named '-': give a file (--output "
                                                 "/dev/stdout writes to standard output)\n")
    assert len(server.requests) == asked
    piped = cli("eval", "--pool", str(pool), "--data", str(data), "--no-store", "--output", "/dev/stdout", timeout=60)
    assert piped.returncode == 0 and '{"id": "a", ' in piped.stdout, piped.stderr  # (it read the pipe: for ever)
    answers = tmp_path / "answers.jsonl"  # an earlier answers file is written over
    for _ in range(2):
        again = cli("eval", "--pool", str(pool), "--data", str(data), "--no-store", "--output", str(answers))
        assert again.returncode == 0 and len(answers.read_text().splitlines()) == 1, again.stderr



def test_eval_resume_refused_for_a_held_run_leaves_the_answers_file_as_it_was(loopback, tmp_path: Path) -> None:
    """A refused `eval --resume` had already written the answers file over (its earlier rows again),
    while the evaluation still running in another process appended to it: NUL bytes, rows lost."""
    import socket
    import time

    server = loopback(ScriptedLLM().handler())
    pool = write_pool(tmp_path, server.url)
    data, answers, store = tmp_path / "val.jsonl", tmp_path / "answers.jsonl", tmp_path / "runs.db"
    data.write_text("".join(f'{{"id": "q{i}", "question": "What is {i} + 1?", "answer": "{i + 1}"}}\n'
                            for i in range(3)))
    argv = ("eval", "--pool", str(pool), "--data", str(data), "--store", str(store), "--output", str(answers))
    first = cli(*argv, "--set", "budget.max_calls=5")  # (each run's budget stops it: they go on in a resume)
    assert first.returncode != 0 and len(answers.read_text().splitlines()) == 3, first.stderr
    kept, asked = answers.read_bytes(), len(server.requests)
    with sqlite3.connect(store) as db:  # one run of it goes on in another live process (this one)
        db.execute("UPDATE runs SET status='running', owner=?, updated=? WHERE id=(SELECT id FROM runs "
                   "WHERE status != 'done' LIMIT 1)", (f"{socket.gethostname()} pid {os.getpid()}:beef", time.time()))
    refused = cli(*argv, "--resume")
    assert refused.returncode == 2 and "is still running in another process" in refused.stderr, refused.stderr
    # (it advised `orchestra resume ITEM_RUN --force`: one item's run, not how to go on with the evaluation)
    assert refused.stderr.strip().endswith("another evaluation is going on with this one's runs: wait for it to end "
                                           "(where its process is gone, its lease runs out within 30 s), then run "
                                           "this command again") and "--force" not in refused.stderr
    assert answers.read_bytes() == kept and len(server.requests) == asked
    for sibling in ("-wal", "-shm", "-journal"):  # (the answers went into SQLite's own files)
        into = cli(*argv[:-1], f"{store}{sibling}")
        assert (into.returncode, into.stderr) == (2, f"error: the answers would overwrite the run store's {sibling} "
                                                     f"file {store}{sibling}: give --output another file\n")
    plotted = cli("eval", "--pool", str(pool), "--data", str(data), "--store", str(store), "--sweep", "--lambdas", "0",
                  "--plot", f"{store}-wal")
    assert (plotted.returncode, plotted.stderr) == (2, f"error: the plot would overwrite the run store's -wal file "
                                                       f"{store}-wal: give --plot another file\n")
    assert len(server.requests) == asked



def test_eval_reports_the_calls_the_response_cache_answered(loopback, tmp_path: Path) -> None:
    """A repeated evaluation with the cache on reported 0 calls and $0 per correct answer, and never
    said the cache had answered."""
    server = loopback(ScriptedLLM().handler())
    pool = write_pool(tmp_path, server.url)
    data = tmp_path / "val.jsonl"
    data.write_text('{"id": "a", "question": "What is 1 + 1?", "answer": "2"}\n'
                    '{"id": "b", "question": "What is 2 + 2?", "answer": "4"}\n')
    argv = ("eval", "--pool", str(pool), "--data", str(data), "--store", str(tmp_path / "runs.db"), "--set",
            "cache=true")
    first = json.loads(cli(*argv, "--json").stdout)
    assert first["cache_hits"] == 0 and first["calls"] > 0
    asked = len(server.requests)
    again = json.loads(cli(*argv, "--json").stdout)
    assert (again["cache_hits"], again["calls"], again["cost_usd"]) == (first["calls"], 0, 0)
    assert len(server.requests) == asked
    table = " ".join(cli(*argv).stdout.split())
    assert f"answered from the cache (free) │ {first['calls']} calls" in table, table


def test_profile_extracts_keywords_with_the_pool_s_settings_and_says_when_no_skill_came_of_them(
        loopback, tmp_path: Path) -> None:
    """A keyword model that never named a word twice left every profile without skills, silently (recruiting
    then ranked by overall accuracy alone), and the pool's keywords settings were not used by profile."""
    import itertools

    scripted, fresh = ScriptedLLM(), itertools.count()

    def text(request: Any) -> Any:
        if KEYWORDS_MARK in request.prompt:  # (a new word each time: no keyword reaches min_count 2)
            return json.dumps({"keywords": [f"topic{next(fresh)}"]})
        return scripted.text(request)

    server = loopback(chat_handler(text))
    data = tmp_path / "val.jsonl"
    data.write_text("".join(f'{{"id": "q{i}", "question": "What is {i} + 1?", "answer": "42"}}\n' for i in range(3)))
    pool = write_pool(tmp_path, server.url)
    bare = cli("profile", "--pool", str(pool), "--data", str(data), "--out", str(tmp_path / "p1"), "--no-store")
    assert bare.returncode == 0 and "note: the profiles have no skills: no keyword was named by 2 of an item's 5 " \
        "samples" in " ".join(bare.stderr.split()), bare.stderr
    assert json.loads((tmp_path / "p1" / "alpha-expert.json").read_text())["skill_counts"] == {}
    pool = write_pool(tmp_path, server.url, extra="settings: {keywords: {min_count: 1}}\n")
    kept = cli("profile", "--pool", str(pool), "--data", str(data), "--out", str(tmp_path / "p2"), "--no-store")
    assert kept.returncode == 0 and "no skills" not in kept.stderr, kept.stderr
    assert json.loads((tmp_path / "p2" / "alpha-expert.json").read_text())["skill_counts"]  # (variants merged)


def test_profile_warns_of_two_agents_that_answered_every_item_alike(loopback, tmp_path: Path) -> None:
    """Two endpoints of one model (alike on all 90 items) were taken as independent experts: a team of both
    said "expected accuracy 0.983" where the one model's was 0.967."""
    scripted = ScriptedLLM()
    right = {"always": False}

    def text(request: Any) -> Any:
        found = re.search(r"What is (\d+) \+ 1\?", request.prompt)
        if KEYWORDS_MARK in request.prompt or found is None:
            return scripted.text(request)
        number, model = int(found.group(1)), (request.json() or {}).get("model")
        if right["always"]:
            return f"The answer is {number + 1}"
        if model == "gamma" and number % 5 == 0:  # (gamma differs on a few items only)
            return "The answer is 0"
        return f"Let me add. The answer is {number + 1 if number % 3 else number}"  # (alpha and beta: word for word)

    server = loopback(chat_handler(text))
    pool = write_pool(tmp_path, server.url)
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(20)))
    done = cli("profile", "--pool", str(pool), "--data", str(data), "--out", str(tmp_path / "p"), "--no-store",
               "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["answered_alike"] == [{"agents": ["alpha-expert", "beta-expert"], "items": 20}]
    warned = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert warned == ["warning: alpha-expert and beta-expert answered all 20 items alike: a team of both counts one "
                      "expert twice (expected accuracy overstated); keep one of them in the pool"], done.stderr
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:19]))  # (too few items to tell)
    fewer = cli("profile", "--pool", str(pool), "--data", str(data), "--out", str(tmp_path / "p"), "--no-store",
                "--json")
    assert fewer.returncode == 0 and json.loads(fewer.stdout)["answered_alike"] == [], fewer.stderr
    assert "warning:" not in fewer.stderr, fewer.stderr
    right["always"] = True  # agents right on every item agree whatever they are: no clones named
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(20)))
    perfect = cli("profile", "--pool", str(pool), "--data", str(data), "--out", str(tmp_path / "p"), "--no-store",
                  "--json")
    assert perfect.returncode == 0 and json.loads(perfect.stdout)["answered_alike"] == [], perfect.stderr


def _beta_refused(loopback: Any, tmp_path: Path) -> tuple[ScriptedLLM, Path, Path]:
    """A pool whose model beta answers every request but keyword samples HTTP 503 (counted as
    ``refused``), and a data set of two items: the scripted answers, the pool file, the data set."""
    scripted = ScriptedLLM()

    def text(request: Any) -> Any:
        if (request.json() or {}).get("model") == "beta" and KEYWORDS_MARK not in request.prompt:
            scripted.kinds["refused"] += 1
            return error_reply(503, "overloaded")
        return scripted.text(request)

    pool = write_pool(tmp_path, loopback(chat_handler(text)).url)
    data = tmp_path / "val.jsonl"
    data.write_text("".join(f'{{"id": "q{i}", "question": "What is {i} + 1?", "answer": "42"}}\n' for i in range(2)))
    return scripted, pool, data


def test_eval_and_ask_say_how_many_calls_failed_after_their_retries(loopback, tmp_path: Path) -> None:
    """An expert whose endpoint failed every item left accuracy looking merely lower: exit 0, no word of it
    (the requests, 4 attempts a call, were the only trace; found by a trial)."""
    scripted, pool, data = _beta_refused(loopback, tmp_path)
    done = cli("eval", "--pool", str(pool), "--data", str(data), "--method", "moa", "--json", "--no-store")
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["failed_calls"] == 2 and scripted.kinds["refused"] == 2 * 2, done.stderr
    shown = cli("eval", "--pool", str(pool), "--data", str(data), "--method", "moa", "--no-store")
    assert re.search(r"│ calls +│ +\d+ \(2 failed after their retries\) │", shown.stdout), shown.stdout
    asked = cli("ask", "What is 2 + 2?", "--pool", str(pool), "--no-plan", "--mode", "global", "--no-store")
    assert asked.returncode == 0 and re.search(r"· done · \d+ calls \(1 failed\) · ", asked.stderr), asked.stderr


def test_eval_names_the_model_whose_endpoint_began_failing_and_warns_of_the_accuracy(loopback, tmp_path: Path) -> None:
    """An expert's endpoint that answered HTTP 500 after its first answers: the report said `calls 774 (70 failed
    after their retries)` and nothing of which model failed, nor that the accuracy was no longer the method's."""
    scripted = ScriptedLLM()

    def text(request: Any) -> Any:
        if (request.json() or {}).get("model") == "beta" and KEYWORDS_MARK not in request.prompt:
            scripted.kinds["beta"] += 1
            if scripted.kinds["beta"] > 2:
                return error_reply(500, "internal error")
        return scripted.text(request)

    server = loopback(chat_handler(text))
    pool = write_pool(tmp_path, server.url)
    data = tmp_path / "val.jsonl"
    data.write_text("".join(f'{{"id": "q{i}", "question": "What is {i} + 1?", "answer": "42"}}\n' for i in range(4)))
    argv = ("eval", "--pool", str(pool), "--data", str(data), "--method", "moa", "--no-store")
    done = cli(*argv, "--json")
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["failed_calls"] >= 2, done.stderr
    assert report["failed_by_model"].keys() == {"beta"}, report["failed_by_model"]
    beta = report["failed_by_model"]["beta"]
    assert beta["calls"] == report["failed_calls"] and "HTTP 500" in beta["first_error"], beta
    assert "internal error" in beta["first_error"], beta
    warning = f"warning: {report['failed_calls']} calls failed after their retries (beta {beta['calls']}): the " \
              f"accuracy {report['accuracy']:.3f} is not the method's own"
    assert warning in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    shown = cli(*argv, env={"COLUMNS": "300"}).stdout  # (the row on one line)
    assert re.search(r"│ failed calls by model +│ +beta \d+ \(http://\S+ failed with HTTP 500 after 2 attempts: "
                     r"internal error\) │", shown), shown


def _failing_beta(scripted: ScriptedLLM, broken: list[bool]) -> Callable[[LoopbackRequest], Any]:
    """``scripted``'s answers, but HTTP 503 for the expert requests of model beta while ``broken[0]``."""
    def text(request: LoopbackRequest) -> Any:
        if broken[0] and (request.json() or {}).get("model") == "beta" and "Your assignment:" in request.prompt:
            return error_reply(503, "overloaded")
        return scripted.text(request)

    return text


def test_eval_resume_retry_failed_sends_only_the_failed_calls_and_what_depends_on_them(loopback,
                                                                                        tmp_path: Path) -> None:
    """With a failing endpoint fixed, `eval --resume` reused the finished runs and sent nothing (the same degraded
    report), `resume RUN_ID` said `nothing to resume`: only a new evaluation, every paid call sent again, helped."""
    scripted, broken = ScriptedLLM(), [True]
    server = loopback(chat_handler(_failing_beta(scripted, broken)))
    pool = write_pool(tmp_path, server.url)
    data = tmp_path / "val.jsonl"
    data.write_text("".join(f'{{"id": "q{i}", "question": "What is {i} + 1?", "answer": "42"}}\n' for i in range(2)))
    argv = ("eval", "--pool", str(pool), "--data", str(data), "--method", "moa", "--json")
    first = cli(*argv)
    assert first.returncode == 0 and json.loads(first.stdout)["failed_calls"] == 2, first.stderr
    assert "the same command with --resume --retry-failed sends only those calls again" in first.stderr, first.stderr
    broken[0] = False
    sent, scripted.prompts = len(server.requests), []
    retried = cli(*argv, "--resume", "--retry-failed")
    report = json.loads(retried.stdout)
    assert retried.returncode == 0 and retried.stderr == "", retried.stderr
    # per item: beta's expert call, and the aggregator's, whose request now holds beta's answer; nothing else
    assert sorted(kind for kind, _ in scripted.prompts) == ["aggregate", "aggregate", "expert", "expert"]
    assert all("beta on" in prompt for kind, prompt in scripted.prompts if kind == "aggregate")
    assert len(server.requests) - sent == 4
    assert (report["failed_calls"], report["retried"], report["reused"], report["resumed"]) == (0, 2, 0, 0)
    runs = [run for run in json.loads(cli("runs", "--json").stdout)]
    assert len(runs) == 2 and {run["failed_calls"] for run in runs} == {0}
    assert report["requests"] == sum(run["requests"] for run in runs) == len(server.requests)
    assert report["calls"] == sum(run["calls"] for run in runs) == 2 * (4 + 1)  # (the first aggregations were paid)
    sent = len(server.requests)
    again = cli(*argv, "--resume", "--retry-failed")  # nothing failed now: every item reused, nothing sent
    assert json.loads(again.stdout)["reused"] == 2 and len(server.requests) == sent, again.stderr


def test_resume_retry_failed_sends_a_done_runs_failed_calls_again(loopback, tmp_path: Path) -> None:
    """`orchestra resume RUN_ID` of a done run that lost an expert said `nothing to resume`."""
    scripted, broken = ScriptedLLM(), [True]
    server = loopback(chat_handler(_failing_beta(scripted, broken)))
    pool = write_pool(tmp_path, server.url)
    asked = cli("ask", "What is 2 + 2?", "--pool", str(pool), "--no-plan", "--mode", "global")
    assert asked.returncode == 0 and re.search(r"· done · 4 calls \(1 failed\) · ", asked.stderr), asked.stderr
    run_id = re.search(r"run (\S+) · done", asked.stderr)[1]  # type: ignore[index]
    assert "beta on" not in asked.stdout
    broken[0] = False
    plain = cli("resume", run_id)  # (it said `nothing to resume` and nothing of the failed call)
    assert plain.returncode == 0 and plain.stderr.startswith(
        f"nothing to resume: run {run_id} is done; 1 of its calls failed after their retries, which `orchestra "
        f"resume {run_id} --retry-failed` sends again ("), plain.stderr
    sent, scripted.prompts = len(server.requests), []
    retried = cli("resume", run_id, "--retry-failed")
    assert retried.returncode == 0 and sorted(kind for kind, _ in scripted.prompts) == ["aggregate", "expert"]
    run = json.loads(cli("runs", "--json").stdout)[0]
    assert run["failed_calls"] == 0 and run["requests"] == len(server.requests), run
    assert re.search(rf"run {run_id} · done · 5 calls · {run['requests']} requests · .* in all; this resume sent "
                     rf"{len(server.requests) - sent} requests", retried.stderr), retried.stderr
    sent = len(server.requests)
    again = cli("resume", run_id, "--retry-failed")  # its recorded result lost no call now
    assert again.returncode == 0 and len(server.requests) == sent, again.stderr
    assert again.stderr.startswith(f"nothing to retry: run {run_id} is done and none of its calls failed ("), again.stderr
    data = tmp_path / "val.jsonl"
    data.write_text('{"id": "q1", "question": "What is 1 + 1?", "answer": "2"}\n')
    alone = cli("eval", "--pool", str(pool), "--data", str(data), "--retry-failed")  # (it retries an earlier evaluation's)
    assert alone.returncode == 2 and "--retry-failed retries the failed calls of an earlier evaluation: add --resume" \
        in alone.stderr, alone.stderr
    swept = cli("eval", "--pool", str(pool), "--data", str(data), "--sweep", "--retry-failed")  # (it asked for --resume)
    assert swept.returncode == 2 and "leave out --method, --output, --resume and --retry-failed (a sweep does not " \
        "resume: `--method M --resume --retry-failed`" in " ".join(swept.stderr.split()), swept.stderr


def test_a_retry_that_finishes_a_run_supersedes_the_failures_it_did_not_ask_again(loopback, tmp_path: Path) -> None:
    """beta, an expert and the aggregator, failed both: a retry after the fix answered both (the aggregator's
    request, now with beta's answer, is another call), yet the first aggregation's failure still counted,
    `5 calls (1 failed)`, and every later `--retry-failed` ran the run again and said it lost a call."""
    scripted, broken = ScriptedLLM(), [True]

    def text(request: LoopbackRequest) -> Any:
        if broken[0] and (request.json() or {}).get("model") == "beta" and KEYWORDS_MARK not in request.prompt:
            return error_reply(503, "overloaded")
        return scripted.text(request)

    server = loopback(chat_handler(text))
    pool = write_pool(tmp_path, server.url)
    asked = cli("ask", "What is 2 + 2?", "--pool", str(pool), "--no-plan", "--mode", "global",
                "--set", "aggregator=beta-expert")
    assert asked.returncode == 0 and re.search(r"· done · \d+ calls \(2 failed\) · ", asked.stderr), asked.stderr
    run_id = re.search(r"run (\S+) · done", asked.stderr)[1]  # type: ignore[index]
    broken[0] = False
    retried = cli("resume", run_id, "--retry-failed", "--json")
    assert retried.returncode == 0 and json.loads(retried.stdout)["usage"]["failed_calls"] == 0, retried.stderr
    run = json.loads(cli("runs", "--json").stdout)[0]
    assert run["failed_calls"] == 0 and run["requests"] == len(server.requests), run  # (its cost still counted)
    shown = json.loads(cli("show", run_id, "--json").stdout)
    assert [call["status"] for call in shown["calls"]].count("superseded") == 1, shown["calls"]
    sent = len(server.requests)
    again = cli("resume", run_id, "--retry-failed")
    assert again.returncode == 0 and len(server.requests) == sent, again.stderr
    assert again.stderr.startswith(f"nothing to retry: run {run_id} is done and none of its calls failed ("), again.stderr


def test_eval_warning_says_apart_keyword_samples_that_left_every_node_its_keywords(loopback, tmp_path: Path) -> None:
    """16 of 80 keyword samples failed, every item still had its keywords (skill extraction failures 0, the
    accuracy as in a clean run), yet the warning said the accuracy `is not the method's own` (a trial)."""
    scripted = ScriptedLLM()

    def text(request: LoopbackRequest) -> Any:
        body = request.json() or {}
        if KEYWORDS_MARK in request.prompt and body.get("seed", 0) % 5 == 0:  # one sample of each item's five
            return error_reply(500, "internal error")
        return scripted.text(request)

    server = loopback(chat_handler(text))
    pool = write_pool(tmp_path, server.url)
    data = tmp_path / "val.jsonl"
    data.write_text("".join(f'{{"id": "q{i}", "question": "What is {i} + 1?", "answer": "42"}}\n' for i in range(2)))
    done = cli("eval", "--pool", str(pool), "--data", str(data), "--method", "symbolic-moe", "--json", "--no-store")
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["skill_extraction_failures"] == 0, done.stderr
    assert report["failed_calls"] == report["failed_keyword_calls"] == 2, report
    assert re.search(r"warning: 2 calls failed after their retries \(\w+ 2\), all of them keyword samples: every node "
                     r"still had the keywords of its other samples, so the accuracy 1\.000 is the method's, its "
                     r"experts chosen on fewer samples; fix those endpoints and evaluate again", done.stderr), done.stderr
    assert "not the method's own" not in done.stderr


def test_a_sweep_says_which_points_lost_calls_to_a_failing_endpoint(loopback, tmp_path: Path) -> None:
    """Every point of a sweep read `failed: 0` (unfinished runs) while an endpoint answered HTTP 500: no point
    had its failed calls, no warning came, and exit 0 (a trial: 25 of 473 requests failed)."""
    scripted, pool, data = _beta_refused(loopback, tmp_path)
    argv = ("eval", "--pool", str(pool), "--data", str(data), "--sweep", "--lambdas", "0", "--no-store")
    done = cli(*argv, "--json")
    points = json.loads(done.stdout)["points"]
    hit = [p for p in points if p["failed_calls"]]
    assert done.returncode == 0 and hit and all(p["failed"] == 0 for p in points), done.stderr
    assert all(p["failed_by_model"].keys() == {"beta"} for p in hit), hit
    assert sum(p["failed_calls"] for p in points) * 2 == scripted.kinds["refused"]  # (2 attempts a call)
    listed = ", ".join(f"{p['method']} {p['failed_calls']}" for p in hit)
    total = sum(p["failed_calls"] for p in hit)
    assert (f"warning: {total} calls failed after their retries in {len(hit)} of {len(points)} points ({listed}; "
            f"by model: beta {total}): their accuracy is not the methods' own") in done.stderr, done.stderr
    shown = cli(*argv, env={"COLUMNS": "300"})
    assert re.search(rf"│ {re.escape(hit[0]['method'])} .*│ +{hit[0]['calls']} \({hit[0]['failed_calls']} failed\) │",
                     shown.stdout), shown.stdout


@pytest.mark.parametrize("as_json", [True, False])
def test_ctrl_c_during_eval_prints_the_items_finished_so_far(loopback, tmp_path: Path, as_json: bool) -> None:
    import signal

    scripted = ScriptedLLM()
    inner = scripted.handler()

    async def handler(request: LoopbackRequest) -> Reply:
        hang = "question q2" in request.prompt and "Your assignment:" in request.prompt  # q2's experts
        return Reply(hang=True) if hang else await inner(request)

    server = loopback(handler)
    pool = write_pool(tmp_path, server.url)
    data, answers = tmp_path / "val.jsonl", tmp_path / "answers.jsonl"
    data.write_text("".join(f'{{"id": "q{i}", "question": "The question q{i}", "answer": "42"}}\n' for i in range(3)))
    child = subprocess.Popen([sys.executable, "-m", "orchestra", "eval", "--pool", str(pool), "--data", str(data),
                              "--output", str(answers), *(["--json"] if as_json else [])],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "ORCHESTRA_ALLOW_MODEL_REQUESTS": "1"})
    wait_for(child, lambda: len(answers.read_text().splitlines() if answers.exists() else []) >= 2,
             "q0 and q1 were graded")
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130
    if as_json:
        report = json.loads(out)  # one JSON object: the report of the items finished before Ctrl-C
        assert report["items"] == 2 and report["correct"] == 2 and report["failed"] == 0 and report["interrupted"]
        # q2 was cut off: what it had spent counts (its keyword requests), its 3 hanging expert requests not yet
        assert report["cut_off"] == 1 and report["requests"] == len(server.requests) - 3, report
    else:
        assert "interrupted after 2 item(s)" in " ".join(out.split()) and re.search(r"items\s.*\b2\b", out), out
        assert "0 (and 1 cut off, to resume)" in " ".join(out.split()), out
    assert err.strip().splitlines()[-1] == ("error: interrupted; finished calls are saved: the same command with "
                                            "--resume goes on with this evaluation")
    listed = {run["item"]: run["status"] for run in json.loads(cli("runs", "--json").stdout)}
    assert listed == {"q0": "done", "q1": "done", "q2": "cancelled"}


@pytest.mark.parametrize("as_json, first_done", [(True, True), (False, True), (False, False)])
def test_ctrl_c_during_a_sweep_prints_the_points_evaluated_in_full(loopback, tmp_path: Path, as_json: bool,
                                                                   first_done: bool) -> None:
    import signal

    scripted = ScriptedLLM()
    inner = scripted.handler()
    answered = [0]
    first_method = [10**9]  # requests the sweep's first method sends; the cut-off one's first two are answered, then
    # every request hangs

    async def handler(request: LoopbackRequest) -> Reply:
        answered[0] += 1
        return Reply(hang=True) if answered[0] > first_method[0] + 2 else await inner(request)

    server = loopback(handler)
    pool = write_pool(tmp_path, server.url)
    data = tmp_path / "val.jsonl"
    data.write_text('{"id": "q0", "question": "The question q0", "answer": "42"}\n')
    alone = cli("eval", "--pool", str(pool), "--data", str(data), "--method", "symbolic-moe", "--no-store", "--json")
    assert json.loads(alone.stdout)["requests"] == answered[0]
    first_method[0] = answered[0] if first_done else 0
    answered[0] = 0  # (before the child starts: reset after, a slow parent dropped its first requests from the count)
    child = subprocess.Popen([sys.executable, "-m", "orchestra", "eval", "--pool", str(pool), "--data", str(data),
                              "--sweep", "--lambdas", "0,1", *(["--json"] if as_json else [])],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "ORCHESTRA_ALLOW_MODEL_REQUESTS": "1"})
    wait_for(child, lambda: answered[0] > first_method[0] + 2, "the cut-off method sent a request that hangs")
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130, err  # (a pool with no prices: every point at $0, and said so)
    assert err.startswith("warning: no agent's model has a price: every point costs $0, so the frontier weighs "
                          "accuracy alone")
    # (vote makes the calls symbolic-moe made, which it takes: it sends none, and moa is the one cut off)
    if as_json:
        swept = json.loads(out)  # one JSON object: the points evaluated in full, then the one cut off
        assert swept["interrupted"] and [p["method"] for p in swept["points"]] == ["symbolic-moe", "vote", "moa"]
        assert swept["points"][0]["items"] == 1 and swept["points"][0]["on_frontier"]
        assert swept["points"][1]["requests"] == 0 and swept["points"][1]["reused_calls"] > 0
        # what the cut-off method spent (its two answered requests) was in no point
        cut = swept["points"][2]
        assert cut["interrupted"] and not cut["on_frontier"] and cut["requests"] == 2
    elif first_done:
        text = " ".join(out.split())
        assert "(1 items): interrupted after 2 of 7 points" in text, out
        assert "symbolic-moe" in text and "moa (cut off" in text and "after 0 items)" in text, out
    else:  # (the title said 0 items, and the line below pointed at points above)
        assert "(1 items): interrupted after 0 of 7 points" in " ".join(out.split()), out
    shown = ("no point was evaluated in full" if not first_done else
             f"the points {'printed' if as_json else 'above'} are the ones evaluated in full")
    shown += f", and {'moa' if first_done else 'symbolic-moe'}, cut off, with what it had spent"
    assert err.strip().splitlines()[-1] == (
        "error: interrupted; finished calls are saved (a sweep starts afresh, but `orchestra eval --method M --resume`, "
        f"with the sweep's other flags, goes on with one method's evaluation from them); {shown}")
    if first_done and not as_json:  # as said: the method the sweep finished is reused, nothing sent again
        sent, first_method[0] = answered[0], 10**9
        again = cli("eval", "--pool", str(pool), "--data", str(data), "--method", "symbolic-moe", "--resume", "--json")
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["reused"] == 1 and answered[0] == sent


def test_eval_resume_counts_finished_items_and_resumes_the_cut_off_one(loopback, tmp_path: Path) -> None:
    import signal

    scripted = ScriptedLLM()
    inner = scripted.handler()
    hanging = [True]

    async def handler(request: LoopbackRequest) -> Reply:
        if hanging[0] and "question q2" in request.prompt and "Your assignment:" in request.prompt:
            return Reply(hang=True)
        return await inner(request)

    server = loopback(handler)
    pool = write_pool(tmp_path, server.url)
    data, answers = tmp_path / "val.jsonl", tmp_path / "answers.jsonl"
    data.write_text("".join(f'{{"id": "q{i}", "question": "The question q{i}", "answer": "42"}}\n' for i in range(3)))
    child = subprocess.Popen([sys.executable, "-m", "orchestra", "eval", "--pool", str(pool), "--data", str(data),
                              "--output", str(answers)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "ORCHESTRA_ALLOW_MODEL_REQUESTS": "1"})
    wait_for(child, lambda: len(answers.read_text().splitlines() if answers.exists() else []) >= 2,
             "q0 and q1 were graded")
    child.send_signal(signal.SIGINT)
    child.communicate(timeout=60)
    assert child.returncode == 130
    before = len(server.requests)
    hanging[0] = False

    resumed = cli("eval", "--pool", str(pool), "--data", str(data), "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert (report["items"], report["correct"], report["reused"], report["resumed"]) == (3, 3, 2, 1)
    assert [row["id"] for row in report["answers"]] == ["q0", "q1", "q2"]
    sent = [r.prompt for r in server.requests[before:]]
    # only q2's calls that had no answer: its experts (cut off) and the synthesis; not its keyword samples,
    # and nothing of q0 and q1
    assert sent and all("q2" in prompt for prompt in sent) and not any("as 1 to 5" in p for p in sent), sent
    assert len(sent) == 4
    runs = json.loads(cli("runs", "--json").stdout)
    assert sorted((run["item"], run["status"]) for run in runs) == [("q0", "done"), ("q1", "done"), ("q2", "done")]
    again = json.loads(cli("eval", "--pool", str(pool), "--data", str(data), "--resume", "--json").stdout)
    assert (again["reused"], again["resumed"], again["correct"]) == (3, 0, 3)
    assert len(server.requests) == before + 4  # everything came from the store
    raised = json.loads(cli("eval", "--pool", str(pool), "--data", str(data), "--resume", "--max-calls", "500",
                            "--json").stdout)
    assert raised["reused"] == 3 and len(server.requests) == before + 4  # another budget: the same answers
    assert cli("eval", "--pool", str(pool), "--data", str(data), "--max-tokens", "50").returncode == 3
    sent = len(server.requests)
    kept = json.loads(cli("eval", "--pool", str(pool), "--data", str(data), "--resume", "--json").stdout)
    # the runs that budget stopped came later, but each item's finished run is kept (they were resumed, and paid)
    assert (kept["reused"], kept["resumed"]) == (3, 0) and len(server.requests) == sent
    other = cli("eval", "--pool", str(pool), "--data", str(data), "--resume", "--k", "2", "--json")
    assert json.loads(other.stdout)["reused"] == 0  # other settings: the earlier runs do not count
    assert ("warning: resume found no earlier run of this evaluation (the same data set, method, settings and pool) "
            "to go on with: every item runs") in other.stderr and "resume found" not in resumed.stderr
    sent = len(server.requests)
    # the latest run that matches counts (the k=2 runs came later), and the data set is found by any path to it
    back = cli("eval", "--pool", str(pool), "--data", os.path.relpath(data), "--resume", "--json")
    assert json.loads(back.stdout)["reused"] == 3 and len(server.requests) == sent
    moved = tmp_path / "same-pool.yaml"
    moved.write_text(pool.read_text())
    elsewhere = cli("eval", "--pool", str(moved), "--data", str(data), "--resume", "--json")
    assert json.loads(elsewhere.stdout)["reused"] == 0  # another pool file: its models may differ
    pool.write_text("# the same pool, reformatted\n" + pool.read_text().replace("\n", "\n\n"))
    reformatted = cli("eval", "--pool", str(pool), "--data", str(data), "--resume", "--json")
    assert json.loads(reformatted.stdout)["reused"] == 3  # what answers did not change
    pool.write_text(pool.read_text().replace("model: beta\n", "model: beta-2\n", 1))  # another model behind beta
    sent = len(server.requests)
    edited = cli("eval", "--pool", str(pool), "--data", str(data), "--resume", "--json")
    assert edited.returncode == 0, edited.stderr
    assert json.loads(edited.stdout)["reused"] == 0 and len(server.requests) > sent  # its answers are not reused
    typo = cli("eval", "--pool", str(pool), "--data", str(data), "--resume", "--store", str(tmp_path / "nope.db"))
    assert typo.returncode == 2 and "no run store at" in typo.stderr


def test_eval_resume_reuses_runs_stored_before_pools_were_fingerprinted(loopback, tmp_path: Path,
                                                                          orchestra_home: Path) -> None:
    import sqlite3

    server = loopback(ScriptedLLM().handler())
    pool = write_pool(tmp_path, server.url)
    data = tmp_path / "val.jsonl"
    data.write_text("".join(f'{{"id": "q{i}", "question": "The question q{i}", "answer": "42"}}\n' for i in range(2)))
    assert cli("eval", "--pool", str(pool), "--data", str(data)).returncode == 0
    with sqlite3.connect(orchestra_home / "runs.db") as db:  # as an older Orchestra stored them
        db.execute("UPDATE runs SET config = json_remove(config, '$.spec.meta.pool_fingerprint')")
    sent = len(server.requests)
    back = cli("eval", "--pool", str(pool), "--data", str(data), "--resume", "--json")
    assert json.loads(back.stdout)["reused"] == 2 and len(server.requests) == sent


def test_show_of_a_data_set_item_names_the_item_and_its_inputs(loopback, tmp_path: Path) -> None:
    server = loopback(ScriptedLLM().handler())
    write_pool(tmp_path, server.url)
    (tmp_path / "quiz.jsonl").write_text("".join(
        f'{{"id": "q{i}", "question": "What is {i} + {i}? [bold]", "answer": "{2 * i}"}}\n' for i in range(3)))
    (tmp_path / "wf.yaml").write_text(
        "name: quiz-eval\npool: pool.yaml\ninputs:\n  question: {type: string, required: true}\n"
        "dataset: {path: quiz.jsonl}\nsteps:\n  - id: answer\n    prompt: '{{ inputs.question }}'\n"
        "budget: {max_calls: 10}\n")
    done = cli("run", str(tmp_path / "wf.yaml"))
    assert done.returncode == 3, done.stderr  # the budget stopped it before the last item's first call
    runs = {run["item"]: run for run in json.loads(cli("runs", "--json").stdout)}
    never = runs["q2"]
    assert never["calls"] == 0
    shown = cli("show", never["id"])
    text = " ".join(shown.stdout.split())
    # which item, and the inputs its step's prompt ("{{ inputs.question }}", as written until it runs) reads
    assert "item q2 · quiz-eval" in text and "inputs.question: What is 2 + 2? [bold]" in text, shown.stdout
    assert json.loads(cli("show", never["id"], "--json").stdout)["run"]["item"] == "q2"


@pytest.mark.parametrize("limit", [("--max-calls", "10"), ("--set", "budget.max_calls=10")])
def test_eval_budget_flags_bound_the_whole_evaluation(llm, tmp_path: Path, limit: tuple[str, str]) -> None:
    """--max-calls bounds the whole evaluation, and so does --set budget.max_calls, the same setting
    (it bounded each item: 72 requests under 20)."""
    pool = write_pool(tmp_path, llm.server.url)
    data = tmp_path / "val.jsonl"
    data.write_text("".join(f'{{"id": "q{i}", "question": "What is {i} + {i}?", "answer": "{2 * i}"}}\n'
                            for i in range(4)))
    done = cli("eval", "--pool", str(pool), "--data", str(data), *limit, "--json")
    assert done.returncode == 3, done.stderr
    report = json.loads(done.stdout)
    # 10 calls for the four items together (the flags used to cap each item alone): the first item
    # takes 9, and a second, which could not finish in the 1 left, is not started (no call spent on it)
    assert report["calls"] == 9 == len(llm.server.requests)
    spent = ("the data set's budget max_calls=10 has no room for another run (9 calls so far, and a run takes up to 9 calls, "
             "so it was not started)")
    assert report["budget_exceeded"] == spent
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {spent} ({report['failed']} of 4 items unfinished); raise it with --max-calls and run the "
        "evaluation again with --resume (finished items are kept)")
    listed = json.loads(cli("runs", "--json").stdout)  # each run says which item it answered
    assert sorted(run["item"] for run in listed) == ["q0", "q1", "q2", "q3"]
    # the flags raise what one item's run may spend too: a pool's own per-run limit of 5 calls (an item
    # takes 9) stopped every item, whatever the flag said
    small = write_pool(tmp_path, llm.server.url, extra="settings: {budget: {max_calls: 5}}\n")
    assert cli("eval", "--pool", str(small), "--data", str(data), "--json").returncode == 3
    raised = cli("eval", "--pool", str(small), "--data", str(data), "--max-calls", "100", "--json")
    assert raised.returncode == 0, raised.stderr
    assert json.loads(raised.stdout)["failed"] == 0


def test_exit_codes_budget_and_resume_hint(llm, tmp_path: Path) -> None:
    pool = write_pool(tmp_path, llm.server.url)
    done = cli("ask", "Write a short report, then check it", "--pool", str(pool), "--max-calls", "3", "--json")
    assert done.returncode == 3
    data = json.loads(done.stdout)
    assert data["status"] == "budget_exceeded"
    assert "--max-calls" in done.stderr and f"orchestra resume {data['run_id']}" in done.stderr
    before = sum(llm.kinds.values())
    resumed = cli("resume", data["run_id"], "--max-calls", "100", "--json")
    assert resumed.returncode == 0, resumed.stderr
    again = json.loads(resumed.stdout)
    assert again["status"] == "done" and again["usage"]["replayed_calls"] == 3
    assert sum(llm.kinds.values()) - before == 13 - 3  # the three recorded calls were not sent again


def test_a_resume_says_its_plan_is_replayed_rather_than_planning(llm, tmp_path: Path) -> None:
    """A resume printed `planning…` while its planner's recorded answer was replayed and no planner was asked."""
    pool = write_pool(tmp_path, llm.server.url)
    stopped = cli("ask", "Write a short report, then check it", "--pool", str(pool), "--max-calls", "3")
    assert stopped.returncode == 3 and "] planning…\n" in stopped.stderr and "] plan: 3 node(s)" in stopped.stderr
    run_id = json.loads(cli("runs", "--json").stdout)[0]["id"]
    resumed = cli("resume", run_id, "--max-calls", "100")
    assert resumed.returncode == 0 and llm.kinds["plan"] == 1, resumed.stderr
    assert "planning" not in resumed.stderr
    assert ("] plan (replayed from the run's record: the planner is not asked again): 3 node(s): facts, numbers, "
            "report\n") in resumed.stderr


def test_advice_given_with_store_names_that_store_and_works_as_printed(llm, tmp_path: Path) -> None:
    """The resume a message named looked in the default store: `no run 'ID' in ~/.orchestra/runs.db`
    (found by a trial, with ask, run, Ctrl-C and serve)."""
    import shlex

    pool = write_pool(tmp_path, llm.server.url)
    other = tmp_path / "my folder" / "other.db"  # (a space: the path is quoted to be copied)
    other.parent.mkdir()  # (a --store's folder is not made: see the test below)
    done = cli("ask", "Write a short report, then check it", "--pool", str(pool), "--max-calls", "3",
               "--store", str(other))
    assert done.returncode == 3
    run_id = json.loads(cli("runs", "--store", str(other), "--json").stdout)[0]["run_id"]
    advice = f"`orchestra resume {run_id} --store {shlex.quote(str(other))} --max-calls N`, N above it"
    assert advice in done.stderr, done.stderr
    copied = shlex.split(advice.split("`")[1].replace(" N", " 100"))[1:]
    resumed = cli(*copied)
    assert resumed.returncode == 0 and "The answer is 42" in resumed.stdout, resumed.stderr
    missing = cli("show", "nosuchrun", "--store", str(other))
    assert missing.stderr.endswith(f"`orchestra runs --store {shlex.quote(str(other))}` lists them\n"), missing.stderr
    default = cli("ask", "Write a short report, then check it", "--pool", str(pool), "--max-calls", "3")
    assert "--store" not in default.stderr and "`orchestra resume " in default.stderr  # (the default store: as it was)


def test_a_budget_stop_without_a_store_does_not_offer_a_resume(llm, tmp_path: Path) -> None:
    pool = write_pool(tmp_path, llm.server.url)
    for json_flag in ([], ["--json"]):
        done = cli("ask", "Write a short report, then check it", "--pool", str(pool), "--max-calls", "3",
                   "--no-store", *json_flag)
        assert done.returncode == 3
        assert "orchestra resume" not in done.stderr, done.stderr
        assert "raise it with --max-calls (or budget.max_calls in the workflow) and run it again (nothing was kept: " \
               "--no-store)" in done.stderr


@pytest.mark.parametrize("args, message", [
    (("ask", "x", "--bogus"), "error: No such option '--bogus'. Did you mean '--verbose'? (see orchestra ask --help)"),
    (("ask", "x", "--max-calls", "abc"), "error: Invalid value for '--max-calls': 'abc' is not a valid integer range. "
                                         "(see orchestra ask --help)"),
    (("ask", "x", "--k", "65"), "error: Invalid value for '--k': 65 is not in the range 1<=x<=64. "
                                "(see orchestra ask --help)"),
    (("eval",), "error: Missing option '--data'. (see orchestra eval --help)"),
    (("ask",), "error: Missing argument 'TASK'. (see orchestra ask --help)"),
])
def test_a_usage_error_is_one_line(args: tuple[str, ...], message: str) -> None:
    """click printed four lines (its usage block, a hint, a blank line and the error), --json or not."""
    done = cli(*args)  # (run as python -m orchestra, which click names it)
    assert (done.returncode, done.stderr.strip(), done.stdout) == (2, message.replace("see orchestra",
                                                                                      "see python -m orchestra"), "")


def test_number_flags_show_their_type_and_bounds() -> None:
    """Settings that refuse true/false are Annotated types: the flags showed ANNOTATED and parsed with int()."""
    shown = " ".join(cli("ask", "--help").stdout.split())
    assert "ANNOTATED" not in shown
    for flag, kind in (("--max-calls", "INTEGER RANGE"), ("--max-cost", "FLOAT RANGE"), ("--seed", "INTEGER"),
                       ("--memory-budget-gb", "FLOAT RANGE"), ("--cost-lambda", "FLOAT RANGE")):
        assert f"{flag} {kind} " in shown, flag
    assert "Experts per subtask. [1<=x<=64]" in shown


def test_profile_help_says_its_budget_flags_bound_nothing_unless_given() -> None:
    """profile's --help said "Call budget for the run (of a data set, eval's or a workflow's...) (default 500)",
    the run commands' words: a profile has no default limit (a trial sent 840 calls, exit 0)."""
    profile = " ".join(cli("profile", "--help").stdout.split())
    for flag, what in (("--max-calls", "Call"), ("--max-cost", "USD"), ("--max-tokens", "Token")):
        assert f"{flag} " in profile and f"{what} budget for the whole profile (default: no limit)" in profile, flag
    assert "default 500" not in profile and "default $1" not in profile and "eval's" not in profile
    assert "Call budget for the run (of a data set" in " ".join(cli("eval", "--help").stdout.split())


def test_a_cost_budget_names_the_models_it_cannot_bound(llm, tmp_path: Path) -> None:
    """--max-cost on models with no price did nothing and said nothing (their calls cost $0 here)."""
    pool = write_pool(tmp_path, llm.server.url, models=("alpha", "beta"))
    pool.write_text(pool.read_text().replace("    max_attempts: 2\n", "    max_attempts: 2\n    prices: [1, 2]\n", 1))
    done = cli("ask", "What is 2 + 2?", "--pool", str(pool), "--no-plan", "--no-store", "--max-cost", "0.5")
    assert done.returncode == 0, done.stderr
    assert ("warning: the cost budget counts no dollars for beta: it has no price (give prices: [input, output] per "
            "million tokens in the pool, or prices= in Python)") in done.stderr
    plain = cli("ask", "What is 2 + 2?", "--pool", str(pool), "--no-plan")
    assert plain.returncode == 0 and "no price" not in plain.stderr
    run_id = cli("runs", "--json").stdout and json.loads(cli("runs", "--json").stdout)[0]["id"]
    again = cli("resume", run_id)  # its record holds the default budget, every field of it: no word either
    assert again.returncode == 0 and "no price" not in again.stderr, again.stderr
    # a price given as 0 is a price (it was warned about as none)
    text = pool.read_text()
    beta = text.rindex("    max_attempts: 2\n") + len("    max_attempts: 2\n")
    pool.write_text(text[:beta] + "    prices: [0, 0]\n" + text[beta:])
    free = cli("ask", "What is 2 + 2?", "--pool", str(pool), "--no-plan", "--no-store", "--max-cost", "0.5")
    assert free.returncode == 0 and "no price" not in free.stderr, free.stderr


def test_server_errors_surface_as_failed_nodes(loopback, tmp_path: Path) -> None:
    server = loopback(lambda request: error_reply(400, "model is not loaded"))
    pool = write_pool(tmp_path, server.url)
    done = cli("ask", "x", "--pool", str(pool), "--no-plan", "--k", "1", "--json")
    assert done.returncode == 1
    data = json.loads(done.stdout)
    assert data["status"] == "failed" and "model is not loaded" in data["error"]


def test_runs_lists_a_data_set_items_id_before_its_task_so_a_narrow_terminal_keeps_it(tmp_path: Path) -> None:
    from orchestra.store import RunStore

    store = RunStore(tmp_path / "runs.db")
    store.begin_run("20261203-000000-abcdef", "quiz-eval: Answer the question below with one number. " * 3,
                    {"spec": {"meta": {"item": "q6"}}})
    store.begin_run("20261203-000000-fedcba", "quiz-eval: another", {"spec": {"meta": {"item": "q\n7"}}})
    store.close()
    done = cli("runs", "--store", str(tmp_path / "runs.db"), env={"COLUMNS": "130"})
    assert done.returncode == 0, done.stderr
    assert "item q6 · quiz-eval" in done.stdout, done.stdout
    assert "item q\\n7 · quiz-eval" in done.stdout, done.stdout  # an id's line break does not split its row
    narrow = cli("runs", "--store", str(tmp_path / "runs.db"), env={"COLUMNS": "30"})
    # no room for a task: the run id and status stay whole, without an empty task column beside them
    assert narrow.stdout.splitlines()[1].split() == ["┃", "run", "┃", "status", "┃"], narrow.stdout
    assert "20261203-000000-abcdef" in narrow.stdout and "running" in narrow.stdout


def test_a_sweep_a_budget_cut_short_says_so_and_leaves_the_method_off_the_frontier(loopback, tmp_path: Path) -> None:
    """Each method's evaluation under --max-calls: one the budget stopped was on the frontier by its
    few finished items' accuracy, and the command said only "6 run(s) of symbolic-moe did not finish" (exit 1)."""
    server = loopback(ScriptedLLM().handler())
    pool = write_pool(tmp_path, server.url)
    data = tmp_path / "val.jsonl"
    data.write_text("".join(f'{{"id": "q{i}", "question": "The question q{i}", "answer": "42"}}\n' for i in range(3)))
    swept = cli("eval", "--pool", str(pool), "--data", str(data), "--sweep", "--lambdas", "0", "--max-calls", "12",
                "--no-store", "--json")
    assert swept.returncode == 3, swept.stderr
    points = {p["method"]: p for p in json.loads(swept.stdout)["points"]}
    cut = [p for p in points.values() if p["failed"]]
    assert len(cut) > 1 and not any(p["on_frontier"] for p in cut) and any(p["on_frontier"] for p in points.values())
    first = cut[0]
    left_off = (f"items of {', '.join(p['method'] for p in cut)} unfinished ({first['failed']} of 3 of "  # (each named:
                f"{first['method']}): they are left off the frontier")  # only the first was)
    assert swept.stderr.strip().splitlines()[-1] == (
        f"error: {first['budget_exceeded']} ({left_off}); raise it with --max-calls and sweep again")


def test_a_resume_says_what_it_sent_beside_what_the_run_spent_in_all(loopback, tmp_path: Path) -> None:
    """A resume's last line gave the run's totals alone, as if charged anew; one of a done run, which
    sends nothing, read `9 calls · 9 requests · $0.0016`."""
    from orchestra.money import usd, usd_alike, usd_exact

    server = loopback(ScriptedLLM().handler())
    pool = write_pool(tmp_path, server.url)
    pool.write_text(pool.read_text().replace("    max_attempts: 2", "    max_attempts: 2\n"
                                             "    prices: {input: 1.5, output: 4}"))
    first = cli("ask", "Quick question", "--pool", str(pool), "--no-plan", "--max-calls", "3")
    assert first.returncode == 3, first.stderr
    run_id = re.search(r"run (\S+) · budget_exceeded", first.stderr)[1]  # type: ignore[index]
    before, sent = json.loads(cli("runs", "--json").stdout)[0], len(server.requests)
    resumed = cli("resume", run_id, "--max-calls", "50")
    assert resumed.returncode == 0, resumed.stderr
    run = json.loads(cli("runs", "--json").stdout)[0]
    whole, now = usd_alike(run["cost_usd"], run["cost_usd"] - before["cost_usd"])  # (to the same decimals)
    in_all = (f"{run['calls']} calls · {run['requests']} requests · "
              f"{run['prompt_tokens'] + run['completion_tokens']:,} tokens · {whole}")
    this = f"this resume sent {len(server.requests) - sent} requests ({now})"
    assert run["requests"] - before["requests"] == len(server.requests) - sent > 0
    assert re.fullmatch(rf"run {run_id} · done · {re.escape(in_all)} in all; {re.escape(this)} · \d+\.\d s",
                        resumed.stderr.splitlines()[-1]), resumed.stderr
    sent = len(server.requests)
    again = cli("resume", run_id)  # done: its answer, and nothing sent
    assert again.returncode == 0 and again.stdout == resumed.stdout and len(server.requests) == sent, again.stderr
    # (the run's cost alone, to the millionth, as `show` and the run's last line give it: `$0.0001` here and
    # `$0.00014` in `runs` and the resume's last line read as two amounts)
    assert usd(run["cost_usd"]) != usd_exact(run["cost_usd"])  # (an amount the two would print apart)
    spent = in_all.removesuffix(whole) + usd_exact(run["cost_usd"])
    assert again.stderr.splitlines() == [f"nothing to resume: run {run_id} is done ({spent} spent in all)"]
    shown = cli("show", run_id).stdout
    assert f"· {usd_exact(run['cost_usd'])}\n" in shown and usd(run["cost_usd"]) + "\n" not in shown, shown


def test_a_resume_of_a_run_with_a_token_limit_alone_says_nothing_of_a_cost_budget(loopback, tmp_path: Path) -> None:
    """A record holds every limit, so a resume took the default's $1 for one chosen (the token limit capped
    answers) and warned that the cost budget counts no dollars for the pool's unpriced models."""
    server = loopback(ScriptedLLM().handler())
    pool = write_pool(tmp_path, server.url)
    first = cli("ask", "Quick question", "--pool", str(pool), "--no-plan", "--max-tokens", "50000", "--max-calls", "3")
    assert first.returncode == 3 and "counts no dollars" not in first.stderr, first.stderr
    run_id = re.search(r"run (\S+) · budget_exceeded", first.stderr)[1]  # type: ignore[index]
    resumed = cli("resume", run_id, "--max-calls", "50")
    assert resumed.returncode == 0 and "counts no dollars" not in resumed.stderr, resumed.stderr


def test_a_run_the_cache_answered_says_so_on_its_last_line(loopback, tmp_path: Path) -> None:
    """Asked again with the cache on, a run read `0 calls · 0 requests · 0 tokens · $0.0000`, as if it
    had done nothing; only --json's cache_hits said the cache had answered it."""
    server = loopback(ScriptedLLM().handler())
    pool = write_pool(tmp_path, server.url)
    argv = ("ask", "What is the boiling point of water?", "--pool", str(pool), "--no-plan", "--set", "cache=true")
    first = cli(*argv)
    assert first.returncode == 0 and "answered from the cache" not in first.stderr, first.stderr
    asked = len(server.requests)
    again = cli(*argv)
    assert again.returncode == 0 and len(server.requests) == asked, again.stderr
    hits = json.loads(cli(*argv, "--json").stdout)["usage"]["cache_hits"]
    assert hits == asked > 0
    assert re.search(rf"run \S+ · done · 0 calls · {hits} answered from the cache · 0 requests · 0 tokens · \$0\.0000 · ",
                     again.stderr.splitlines()[-1]), again.stderr


def test_a_pool_model_whose_gguf_file_is_missing_is_named_with_its_place_in_the_file(tmp_path: Path) -> None:
    """It said `GGUF file not found: PATH` alone: no file, line or model entry (the README's pool example,
    its path a placeholder, failed so from `agents` and `ask`)."""
    pool = tmp_path / "pool.yaml"
    pool.write_text("name: g\nmodels:\n  fast: {type: openai, model: m, base_url: 'http://127.0.0.1:9/v1', "
                    "api_key_env: null}\n  local: {type: llamacpp, path: nowhere/qwen.gguf}\n"
                    "agents:\n  - name: a\n    model: fast\n")
    for command in (("agents", "--pool", str(pool)), ("ask", "What is 1 + 1?", "--pool", str(pool))):
        refused = cli(*command)
        assert refused.returncode == 2 and refused.stderr.strip() == (
            f"error: {pool}:4:10: models.local: GGUF file not found: {tmp_path / 'nowhere' / 'qwen.gguf'}"), \
            refused.stderr
