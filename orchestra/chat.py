"""``orchestra chat``: an interactive session. Every task's plan is shown before anything runs."""

from __future__ import annotations

import contextlib
import select
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from orchestra.budget import BudgetTracker, Spent, task_budget
from orchestra.core import (
    Orchestra,
    Terminated,
    check_context,
    check_task,
    interrupts_as_usual,
    new_run_id,
    run_interruptibly,
)
from orchestra.errors import ConfigError, OrchestraError
from orchestra.events import Event, UsageUpdated
from orchestra.hints import cli_message, command
from orchestra.money import usd_exact
from orchestra.pipeline.planning import with_replan_hint
from orchestra.plan import Plan, PlanInvalid, validate_plan
from orchestra.prompts import MAX_CONTEXT_CHARS
from orchestra.result import RunResult
from orchestra.settings import MAX_K
from orchestra.terminal_text import counted
from orchestra.view import LiveView, LogView, literal, print_result, skills_cell, summary_line

HELP = """Type a task to plan it. Before it runs you can:
  a / accept        run the plan
  e / edit          change it: `drop N`, `reword N new instruction`, `done`
  r / replan [hint] ask the planner again (optionally with a hint)
  c / cancel        drop the task
Commands:
  /pool   the agents and their profiles      /k N    experts per subtask
  /trace  the last run's plan and experts    /help   this text
  /quit   leave (Ctrl-D too). Ctrl-C stops a running task, not the session.
A task that starts with / is written with one more: //usr/bin/env: what does it do?"""


class _Leave(Exception):
    """/quit at a task's plan prompt: the task is dropped and the session ends."""


def _pending_input() -> bool:
    """Whether the terminal has more input waiting: the rest of a paste (what a user types comes
    after the line is read)."""
    try:
        return bool(select.select([sys.stdin], [], [], 0)[0])
    except (OSError, ValueError):  # (no selectable standard input)
        return False


@dataclass
class Turn:
    """One finished task of the session."""

    task: str
    result: RunResult


@dataclass
class ChatSession:
    """A read-plan-confirm-run loop over one ``Orchestra``; history lasts for the session."""

    orchestra: Orchestra
    console: Console
    interactive: bool = False
    read: Callable[[str], str | None] | None = None
    history: list[Turn] = field(default_factory=list)
    history_chars: int = 1500
    last: RunResult | None = None
    _piped_lines: int = field(default=0, init=False)

    def ask(self, prompt: str) -> str | None:
        """One line from the user, or None at end of input."""
        if self.read is not None:
            return self.read(prompt)
        if self.interactive:
            try:
                line = input(prompt)
                while _pending_input():  # (pasted lines are in the terminal already: one answer, one task)
                    line += "\n" + input("")
            except EOFError:
                return None
            return line
        self.console.print(prompt, end="")
        line = sys.stdin.readline()
        if not self._piped_lines:  # (a byte-order mark an editor put first is not part of the first task)
            line = line.removeprefix("\ufeff")
        self._piped_lines += 1
        return None if not line else line.rstrip("\n")

    def loop(self) -> None:
        """Run until /quit or end of input."""
        if self.interactive:
            import readline  # noqa: F401 - line editing and arrow-key history for input()
        pool = self.orchestra.pool
        self.console.print(f"Orchestra chat · pool {pool.name} ({counted(len(pool.agents), 'agent')}) · "
                           f"k={self.orchestra.settings.k} · /help for commands")
        while True:
            try:
                line = self.ask("> ")
            except KeyboardInterrupt:  # (at the prompt, as in Python's: the session goes on)
                self.console.print("\n(Ctrl-C stops a running task; /quit or Ctrl-D leaves)")
                continue
            if line is None:
                self.console.print("bye")
                return
            line = line.strip()
            if not line:
                continue
            if line.startswith("/") and not line.startswith("//"):
                try:
                    if not self.command(line):
                        return
                except KeyboardInterrupt:  # (while a command printed: it left the session, exit 130)
                    self.console.print(f"\n({line.split()[0]} interrupted; /quit or Ctrl-D leaves)", markup=False)
                continue
            try:
                self.task(line[1:] if line.startswith("//") else line)  # (// writes a task that starts with /)
            except _Leave:
                self.console.print("bye")
                return
            except KeyboardInterrupt as stop:
                if isinstance(stop, Terminated):  # (SIGTERM, SIGHUP: the session ends, exit 130, as a command does)
                    raise
                self.console.print("cancelled")
            except OrchestraError as error:
                self.console.print(f"error: {cli_message(error)}", markup=False)

    def command(self, line: str) -> bool:
        """Handle a /command; False means leave."""
        name, _, argument = line.partition(" ")
        if name in ("/quit", "/exit"):
            self.console.print("bye")
            return False
        if name == "/help":
            self.console.print(HELP, markup=False)
        elif name == "/pool":
            self.show_pool()
        elif name == "/k":
            if self.orchestra.settings.mode == "adaptive":  # (it said "k = 2" and asked as many as before)
                self.console.print("/k is not used by adaptive recruiting, which adds experts until their weights "
                                   "reach recruit.p, at most recruit.k_max (set those in the pool's settings)")
            elif not argument.strip().isdecimal() or not 1 <= int(argument) <= MAX_K:  # ("²": a digit int() refuses)
                self.console.print(f"usage: /k N (1 <= N <= {MAX_K})")
            else:
                self.orchestra.settings = self.orchestra.settings.layered({"k": int(argument)})
                self.console.print(f"k = {int(argument)}")
        elif name == "/trace":
            self.show_trace()
        else:
            self.console.print(f"unknown command {name}; /help lists them (a task that starts with / is written "
                               "with one more, //...)", markup=False)
        return True

    def context(self) -> str:
        """Earlier turns, most recent last, trimmed to ``history_chars``."""
        text = "\n".join(f"Q: {t.task}\nA: {t.result.answer or '(not answered)'}" for t in self.history)
        return text[-self.history_chars:]

    def task(self, text: str) -> None:
        """Plan, confirm (or edit / re-plan), run, show the answer.

        Earlier turns are context for the planner and the experts; they never become part of the
        task or of a subtask's instruction.
        """
        context = self.context()
        seed = self.orchestra.settings.seed
        # (one budget for the task: its planning, every replan and its run spend it together)
        spending = task_budget(self.orchestra.settings.budget)
        plan, note = self.plan(text, context=context, seed=seed, spending=spending)
        while True:
            self.show_plan(plan, note)
            answer = self.ask("[a]ccept · [e]dit · [r]eplan · [c]ancel > ")  # (Enter accepts; end of input cancels)
            choice = "c" if answer is None else answer.strip()
            verb, _, rest = choice.partition(" ")
            if verb in ("a", "accept", "y", "yes", ""):
                break
            if verb in ("c", "cancel", "n", "no"):
                self.console.print("cancelled")
                return
            if verb in ("/quit", "/exit"):  # (it read as a wrong answer: the session went on)
                self.console.print("cancelled")
                raise _Leave
            if verb in ("e", "edit"):
                plan = self.edit(plan)
            elif verb in ("r", "replan"):
                hint = with_replan_hint(context, rest) if rest else context
                try:  # (refused here, the task and its plan kept: a hint of 2 million characters was a traceback)
                    check_context(rest, "the hint", limit=MAX_CONTEXT_CHARS - (len(hint) - len(rest)))
                except ConfigError as error:
                    self.console.print(f"error: {error}; the plan is as it was", markup=False)
                    continue
                seed += 1
                plan, note = self.plan(text, context=hint, seed=seed, spending=spending, replan=True)
            else:
                self.console.print("answer a, e, r or c")
        result = self.run(text, plan, context, spending)
        if result is not None:
            self.history.append(Turn(text, result))

    def plan(self, text: str, *, context: str, seed: int, spending: BudgetTracker | None = None,
             replan: bool = False) -> tuple[Plan, str]:
        """Ask for a plan, with a progress line while the planner works, then what the planner's
        calls cost (they are not part of the run that follows, nor of its usage; ``spending``, the
        task's budget, counts them, and the run records that for its resume). A ``replan`` asks the
        planner even for a task simple enough for one step (the user asked for another plan)."""
        spent: list[UsageUpdated] = []

        def listen(event: Event) -> None:
            if isinstance(event, UsageUpdated):
                spent.append(event)

        remove = self.orchestra.events.subscribe(listen)
        try:
            with self.console.status("planning…", spinner="dots") if self.interactive else contextlib.nullcontext():
                if not self.interactive:
                    self.console.print("planning…")
                return run_interruptibly(self.orchestra.aplan(text, context=context, seed=seed, shared_budget=spending,
                                                              **({"fast_path": False} if replan else {})),
                                         stopping=self._stopping)
        finally:  # (a planning that failed cost its requests too)
            interrupts_as_usual()  # (a Ctrl-C at the next prompt is the user's, whether one stopped it or came late)
            remove()
            if spent:
                last = spent[-1]
                self.console.print(f"planning: {last.calls} call{'s' * (last.calls != 1)} · "
                                   f"{last.requests} request{'s' * (last.requests != 1)} · "
                                   f"{last.prompt_tokens + last.completion_tokens:,} tokens · "
                                   f"{usd_exact(last.cost_usd)}",
                                   style="dim", markup=False)

    def _stopping(self, again: bool) -> None:
        """Say that a Ctrl-C is stopping the task (a model's load or generation under way ends its step
        first: seconds on the embedded model, with no word), and what a third press does."""
        self.console.print("(still stopping; Ctrl-C once more leaves the chat at once)" if again
                           else "(stopping the task…)")

    def edit(self, plan: Plan) -> Plan:
        """Edit commands until `done`; the plan stays valid after each one."""
        while True:
            line = (self.ask("edit (drop N · reword N text · done) > ") or "done").strip()
            verb, _, rest = line.partition(" ")
            if verb in ("done", "d", ""):
                return plan
            if verb in ("/quit", "/exit"):  # (as at the plan's prompt: the task is dropped, the session ends)
                self.console.print("cancelled")
                raise _Leave
            if verb not in ("drop", "reword"):
                self.console.print(f"unknown edit command {verb!r}; use: drop N · reword N new instruction · done")
                continue
            number, _, words = rest.partition(" ")
            if not number.isdecimal() or not 1 <= int(number) <= len(plan.subtasks):
                self.console.print(f"no step {number!r}; steps are 1 to {len(plan.subtasks)}", markup=False)
                continue
            target = plan.subtasks[int(number) - 1]
            if verb == "drop":
                if len(plan.subtasks) == 1:
                    self.console.print("cannot drop the only step")
                    continue
                kept = [s.model_copy(update={"depends_on": [d for d in s.depends_on if d != target.id]})
                        for s in plan.subtasks if s.id != target.id]
                candidate = Plan(subtasks=kept)
            elif verb == "reword" and words.strip():
                try:  # (as a run checks a given plan's steps: refused only there, at accept, the task was lost)
                    check_task(words.strip())
                except ConfigError as error:
                    self.console.print(f"that edit would break the plan: the new instruction "
                                       f"{str(error).removeprefix('the task ')}", markup=False)
                    continue
                # the planner's skills described the old words: the step is recruited on its new ones
                reworded = target.model_copy(update={"instruction": words.strip(), "skills": []})
                candidate = Plan(subtasks=[reworded if s.id == target.id else s for s in plan.subtasks])
            else:
                self.console.print("use: drop N · reword N new instruction · done")
                continue
            try:
                validate_plan(candidate, max_nodes=len(candidate.subtasks))
            except PlanInvalid as problem:
                self.console.print(f"that edit would break the plan: {problem}", markup=False)
                continue
            plan = candidate
            self.show_plan(plan, "")

    def run(self, task: str, plan: Plan, context: str = "", spending: BudgetTracker | None = None) -> RunResult | None:
        """Run an accepted plan with the live view; Ctrl-C stops it and keeps the session.
        ``spending``: the task's budget, which its planning spent from: the run counts what it spent
        against its limits, and records it, so that a resume does too."""
        orchestra = self.orchestra
        view = LiveView(self.console) if self.interactive else LogView(self.console.file)
        remove = orchestra.events.subscribe(view.listen)
        run_id = new_run_id()
        work = lambda: orchestra.arun(task, plan=plan, context=context, run_id=run_id,  # noqa: E731
                                      meta={"kind": "chat"},
                                      spent_before=Spent.of(spending) if spending is not None else None)
        try:
            if isinstance(view, LiveView):
                with view:
                    result = run_interruptibly(work(), stopping=self._stopping)
            else:
                result = run_interruptibly(work(), stopping=self._stopping)
        except KeyboardInterrupt as stop:
            self.last = orchestra.ended(run_id)  # (for /trace: from the store, or as it ended with none)
            if orchestra.store is None:
                self.console.print("task cancelled (no run store: nothing was kept)")
            elif self.last is not None:
                self.console.print(f"task cancelled; its finished calls are saved: `{command('resume', run_id)}` "
                                   "finishes it", markup=False)
            else:
                self.console.print("task cancelled before it started")
            if isinstance(stop, Terminated):  # (said what was kept; then the session ends: see ``loop``)
                raise
            return None
        finally:
            interrupts_as_usual()  # (a Ctrl-C at the next prompt is the user's, whether one stopped it or came late)
            remove()
        print_result(self.console, result, rich_output=self.interactive, stored=orchestra.store is not None)
        self.console.print(summary_line(result), style="dim")
        self.last = result
        return result

    def show_plan(self, plan: Plan, note: str) -> None:
        """The plan as a numbered table."""
        table = Table(title="plan", title_justify="left")
        for column in ("#", "step", "instruction", "needs"):
            table.add_column(column)
        for number, subtask in enumerate(plan.subtasks, start=1):
            table.add_row(str(number), literal(subtask.id), literal(subtask.instruction),
                          literal(", ".join(subtask.depends_on) or "-"))
        self.console.print(table)
        if note:
            self.console.print(literal(f"({note})", style="dim"))

    def show_pool(self) -> None:
        """The agents and their measured skills."""
        pool = self.orchestra.pool
        table = Table(title=f"pool {pool.name}")
        for column in ("agent", "model", "γ", "skills"):
            table.add_column(column)
        competence = self.orchestra.stages.staffing.table.competence
        for agent in pool.agents:
            skills = skills_cell(agent.skills, pool.profiles.get(agent.name))  # (as `orchestra agents` shows them)
            table.add_row(agent.name, agent.model.name, f"{competence[agent.name]:.3f}", literal(skills))
        self.console.print(table)

    def show_trace(self) -> None:
        """The last run: plan, experts, explanations."""
        result = self.last
        if result is None:
            self.console.print("no run yet")
            return
        for node in result.plan.nodes:
            self.console.print(f"[{node.status}] {node.id}: {node.instruction}", markup=False)
            self.console.print(f"    experts {', '.join(node.experts) or '-'}; aggregator {node.aggregator or '-'}",
                               markup=False)
            for line in (node.recruitment or {}).get("explanation", []):
                self.console.print(f"    {line}", markup=False)
        self.console.print(summary_line(result), markup=False)
