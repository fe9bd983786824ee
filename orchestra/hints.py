"""Command-line wording for errors: the flags and commands that fix them.

The library's messages say what went wrong in library terms; the command line prints them with
the advice a shell user can act on (``--max-calls``, ``--store``, ``orchestra resume RUN_ID``).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestra.errors import BudgetExceeded, OrchestraError, RunHeld, RunNotFound, StoreUnusable, running_advice
from orchestra.terminal_text import counted

if TYPE_CHECKING:
    from orchestra.result import RunResult

#: The command-line flag that sets each ``Budget`` limit.
BUDGET_FLAGS = {"max_calls": "--max-calls", "max_cost_usd": "--max-cost", "max_tokens": "--max-tokens"}


#: `` --store PATH`` when this command reads a store other than the default one (see ``advise_store``)
_store_flag = ""


def advise_store(path: Path | str | None) -> None:
    """Have the commands the advice names read the store at ``path`` (a ``--store`` given): a resume
    copied from a message looked in the default store and found no such run."""
    global _store_flag
    from orchestra.store import default_store_path

    given = Path(path).resolve() if path is not None else None
    default = given is None or given == default_store_path().resolve()
    _store_flag = "" if default else f" --store {shlex.quote(str(given))}"


def command(verb: str, run_id: str = "", *flags: str) -> str:
    """``orchestra VERB RUN_ID [--store PATH] FLAGS``: a command to copy from a message."""
    return " ".join(word for word in (f"orchestra {verb}", run_id) if word) + _store_flag + "".join(
        f" {flag}" for flag in flags)


def _raise_budget(limit: str, run_id: str | None, stored: bool = True, evaluation: bool = False) -> str:
    if evaluation:  # the budget of an `orchestra eval`: its flags are the only place it is set
        return (f"raise it with {BUDGET_FLAGS[limit]} and run the evaluation again"
                + (" with --resume (finished items are kept)" if stored else ""))
    if not stored:  # nothing to resume
        return (f"raise it with {BUDGET_FLAGS[limit]} (or budget.{limit} in the workflow) and run it again "
                "(nothing was kept: --no-store)")
    if run_id is None:  # a data-set workflow's
        return (f"raise budget.{limit} in the workflow (or {BUDGET_FLAGS[limit]}) and run it again with --resume "
                "(finished items are kept)")
    # (a resume keeps the run's recorded budget: the workflow file's is not read again, even with --reload)
    return (f"`{command('resume', run_id, BUDGET_FLAGS[limit], 'N')}`, N above it, goes on with it "
            "(a resume keeps its budget)")


def budget_hint(message: str, run_id: str | None, *, stored: bool = True, evaluation: bool = False) -> str | None:
    """The advice for the budget stop ``message`` describes (it starts with a ``BudgetExceeded``'s
    text): the flag that raises the limit it names, and how to finish the stopped run ``run_id`` or,
    when None, a data set's unfinished items (``stored``: whether the runs were kept to resume;
    ``evaluation``: the data set of an ``orchestra eval``, not a workflow's). None when it names no limit."""
    limit = next((limit for limit in BUDGET_FLAGS if f"budget {limit}=" in message), None)
    return _raise_budget(limit, run_id, stored, evaluation) if limit is not None else None


def _budget_message(error: BudgetExceeded) -> str:
    if not error.resumable:  # the planner's calls alone: no run to resume
        return f"{error} while planning; raise it with {BUDGET_FLAGS[error.limit]} and ask again"
    return f"{error}; {_raise_budget(error.limit, error.run_id)}"


def _other_store(path: object) -> str:
    """How to pick another store file on the command line: the default one is ORCHESTRA_HOME's."""
    from orchestra.store import default_store_path

    if Path(str(path)) != default_store_path():
        return "choose another file with --store"
    home = os.environ.get("ORCHESTRA_HOME")
    return (f"set ORCHESTRA_HOME (now {home}) to a folder you can write, or choose a file with --store" if home
            else "choose another file with --store, or a folder with ORCHESTRA_HOME")


_MESSAGES: dict[type[OrchestraError], Callable[[Any], str]] = {
    BudgetExceeded: _budget_message,
    StoreUnusable: lambda error: f"{error.problem}; {error.remedy(_other_store(error.path))}",
    RunHeld: lambda error: (str(error) if error.draining else
                            f"{error.problem}; {running_advice(error.pid, '--force')}" if error.running else
                            f"{error.problem}; wait for it to end, or if that process is gone, "
                            f"`{command('resume', error.run_id, '--force')}`"),
    RunNotFound: lambda error: f"{error.problem}; `{command('runs')}` lists them",
}


def cli_message(error: OrchestraError) -> str:
    """``error`` as the command line prints it, on one line: what went wrong, then what to do in flags
    and commands."""
    for kind in type(error).__mro__:
        message = _MESSAGES.get(kind)
        if message is not None:
            return " ".join(message(error).split())
    return str(error)


def run_hint(result: RunResult, *, stored: bool = True) -> str | None:
    """For a run its budget stopped: the flag that raises the limit and the command that finishes
    the run; for one a workflow's template failed: the command that finishes it once the file is
    fixed; for one stopped by another thing to fix (an endpoint, a key) after some of its calls were
    answered: that those are kept, and the command that finishes it (``stored``: whether it was
    kept to resume). None for any other run."""
    from orchestra.prompts import RENDER_FAILED

    if result.status == "budget_exceeded":
        return budget_hint(result.error or "", result.run_id, stored=stored)
    if not (stored and result.user_error) or "resume" in (result.error or ""):  # (a store's error says its own)
        return None
    if RENDER_FAILED in (result.error or ""):
        return f"fix the workflow, then `{command('resume', result.run_id, '--reload')}` (its answers are kept)"
    answered = result.usage.calls - result.usage.failed_calls
    if result.status == "failed" and answered > 0:  # (none answered: running it again is the same)
        return (f"its {counted(answered, 'answered call')} {'is' if answered == 1 else 'are'} kept: once that is "
                f"fixed, `{command('resume', result.run_id)}` finishes it")
    return None


def run_error(result: RunResult, *, stored: bool = True) -> str:
    """Why a run did not finish, as the command line prints it: ``run ID STATUS: error; advice``
    (``stored``: whether the run was kept to resume)."""
    line = f"run {result.run_id} {result.status}: {result.error or ''}".rstrip()
    hint = run_hint(result, stored=stored)
    return f"{line}; {hint}" if hint else line
