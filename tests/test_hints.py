"""Errors carry facts in library words; the command line adds the flags and commands that fix them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from orchestra.budget import Budget, BudgetTracker
from orchestra.errors import BudgetExceeded, ConfigError, OrchestraError, RunHeld, RunNotFound, StoreUnusable
from orchestra.hints import budget_hint, cli_message, run_error, run_hint
from orchestra.models import ChatRequest
from orchestra.models.pricing import Price
from orchestra.result import RunResult, RunUsage
from orchestra.store import RunStore

CLI_WORDS = ("--", "orchestra ")


def refused(budget: Budget, run_id: str | None) -> BudgetExceeded:
    """The error of the first call ``budget`` refuses (calls are held in flight, a dollar per token)."""
    tracker = BudgetTracker(budget, run_id)
    with pytest.raises(BudgetExceeded) as error:
        for _ in range(3):
            tracker.admit(ChatRequest.user("hello", max_tokens=10), Price(input=1e6, output=1e6))
    return error.value


@pytest.mark.parametrize(("budget", "limit", "flag"), [
    (Budget(max_calls=1, max_cost_usd=None, max_tokens=None), "max_calls", "--max-calls"),
    (Budget(max_calls=None, max_cost_usd=None, max_tokens=5), "max_tokens", "--max-tokens"),
    (Budget(max_calls=None, max_cost_usd=1, max_tokens=None), "max_cost_usd", "--max-cost"),
])
def test_a_budget_stop_names_its_limit_and_the_cli_adds_the_flag_and_the_resume_command(
        budget: Budget, limit: str, flag: str) -> None:
    error = refused(budget, "run-1")
    assert (error.limit, error.run_id, error.exit_code) == (limit, "run-1", 3)
    assert str(error).startswith(f"budget {limit}=") and not any(word in str(error) for word in CLI_WORDS)
    assert cli_message(error) == (f"{error}; `orchestra resume run-1 {flag} N`, N above it, goes on with it (a resume "
                                  "keeps its budget)")
    stopped = RunResult(run_id="run-1", task="t", status="budget_exceeded", error=f"{error} (b: refused)")
    assert run_error(stopped) == f"run run-1 budget_exceeded: {error} (b: refused); {run_hint(stopped)}"
    assert run_hint(stopped) == cli_message(error).split("; ", 1)[1]


def test_a_spent_shared_budget_tells_the_cli_how_to_finish_every_item() -> None:
    error = refused(Budget(max_tokens=5), None)
    spent = "0 tokens used, the next call may take 44: 34 of prompt and up to 10 of answer"
    assert str(error) == f"the data set's budget max_tokens=5 is less than the next call alone may need ({spent})" and error.run_id is None
    assert (error.value, error.spent) == (5, spent)
    assert str(BudgetExceeded(limit="max_tokens", value=1e6, spent=spent, run_id="r")).startswith(
        "budget max_tokens=1000000 reached")  # not 1e+06
    advice = "raise budget.max_tokens in the workflow (or --max-tokens) and run it again with --resume (finished items are kept)"
    assert cli_message(error) == f"{error}; {advice}"
    assert budget_hint(f"{error} (3 of 5 items unfinished)", None) == advice


@pytest.mark.parametrize("status", ["done", "partial", "failed", "cancelled"])
def test_only_a_budget_stop_gets_a_hint(status: str) -> None:
    result = RunResult(run_id="r", task="t", status=status, error="budget max_calls=3 in a node's error")
    assert run_hint(result) is None
    assert run_error(result) == f"run r {status}: budget max_calls=3 in a node's error"
    assert run_error(RunResult(run_id="r", task="t", status=status)) == f"run r {status}:"


def test_a_run_stopped_by_something_to_fix_after_answers_came_says_they_are_kept_only_where_they_are() -> None:
    error = "cannot reach http://h/v1/chat/completions (ConnectError); is the server running?"

    def result(calls: int, failed: int, **fields: object) -> RunResult:
        given = {"status": "failed", "error": error, "user_error": True, **fields}
        return RunResult(run_id="r", task="t", usage=RunUsage(calls=calls, failed_calls=failed), **given)

    assert run_hint(result(8, 3)) == "its 5 answered calls are kept: once that is fixed, `orchestra resume r` finishes it"
    assert run_hint(result(2, 1)) == "its 1 answered call is kept: once that is fixed, `orchestra resume r` finishes it"
    assert run_hint(result(3, 3)) is None  # (nothing answered: running it again is the same)
    assert run_hint(result(8, 3), stored=False) is None  # (--no-store: nothing was kept)
    assert run_hint(result(8, 3, user_error=False)) is None  # (a model's failure: resuming asks it again)
    assert run_hint(result(8, 3, error="cannot write the run store s: ...; nothing can resume it: run it again")) is None
    assert run_hint(result(8, 3, status="cancelled")) is None


def test_store_errors_say_what_is_wrong_and_the_cli_says_which_flag_or_command(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"not a database" * 100)
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE invoices (id INTEGER)")
    errors = {}
    for path in (corrupt, foreign):
        with pytest.raises(StoreUnusable) as caught:
            RunStore(path)
        errors[path] = caught.value
    assert str(errors[corrupt]) == (f"{corrupt} is not a usable Orchestra run store (file is not a database); "
                                    "move it away or use another store file")
    assert cli_message(errors[corrupt]) == (f"{corrupt} is not a usable Orchestra run store (file is not a "
                                            "database); move it away or choose another file with --store")
    assert str(errors[foreign]).endswith("not an Orchestra run store; use another store file")
    assert cli_message(errors[foreign]).endswith("not an Orchestra run store; choose another file with --store")
    store = RunStore(tmp_path / "runs.db")
    with pytest.raises(RunNotFound) as missing:
        store.run("nope")
    assert (missing.value.run_id, str(missing.value)) == ("nope", f"no run 'nope' in {tmp_path / 'runs.db'}")
    assert cli_message(missing.value) == f"{missing.value}; `orchestra runs` lists them"
    store.close()


def test_a_held_run_says_how_to_take_it_over_in_python_and_on_the_command_line() -> None:
    error = RunHeld("r7", "host pid 12", 4.2)
    assert str(error) == ("run r7 is still running in another process (host pid 12, active 4 s ago); wait for it "
                          "to end, or if that process is gone, resume it with force=True")
    assert cli_message(error) == ("run r7 is still running in another process (host pid 12, active 4 s ago); wait "
                                  "for it to end, or if that process is gone, `orchestra resume r7 --force`")


@pytest.mark.parametrize("error", [OrchestraError("plain\n  trouble"), ConfigError("bad value", path="f.yaml", line=3)])
def test_errors_without_cli_advice_print_as_they_are(error: OrchestraError) -> None:
    assert cli_message(error) == str(error)


def test_the_cli_message_is_one_line() -> None:
    error = StoreUnusable("x.db", "x.db is damaged (*** in database main ***\nPage 3: bad)",
                          move_away="move it away (keep it for recovery)")
    assert cli_message(error) == ("x.db is damaged (*** in database main *** Page 3: bad); move it away (keep it for "
                                  "recovery) or choose another file with --store")
