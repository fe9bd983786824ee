"""Budgets: per-run limits on calls, tokens and cost, checked before every dispatch."""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestra.errors import BudgetExceeded
from orchestra.models import ChatRequest, Usage
from orchestra.models.pricing import Price
from orchestra.models.prompt_gauge import PromptGauge
from orchestra.money import dollars, usd_alike, usd_exact
from orchestra.numbers import Amount, Count


class Budget(BaseModel):
    """Per-run limits; ``None`` lifts one. On by default so a runaway plan cannot burn money."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_calls: Count | None = Field(default=500, ge=1)
    max_cost_usd: Amount | None = Field(default=1.0, gt=0)
    max_tokens: Count | None = Field(default=1_000_000, ge=1)
    cap_answers: bool | None = Field(default=None, description=(
        "Send an endpoint request that sets no max_tokens with the tokens the budget reserved for its answer "
        "(ANSWER_ALLOWANCE), so one long answer cannot overshoot a token or cost limit. None: resolved to whether "
        "a token or cost limit was set (in any layer: a pool, a workflow, the command line), whatever its value; "
        "under the default limits alone an answer is not cut for a limit nobody set."))

    @model_validator(mode="after")
    def _resolve_cap(self) -> Budget:
        if self.cap_answers is None:  # (resolved, not set: layering recomputes it from the limits set)
            chosen = self.model_fields_set
            limited = any(name in chosen and getattr(self, name) is not None for name in ("max_tokens", "max_cost_usd"))
            object.__setattr__(self, "cap_answers", limited)  # (a frozen model)
        return self

    @property
    def cost_limit_set(self) -> bool:
        """Whether a cost limit is one someone chose, whatever its value: set in some layer (a record,
        where every field is, by another value than the default's or by capping answers for it)."""
        cost = self.max_cost_usd
        return cost is not None and "max_cost_usd" in self.model_fields_set and (
            cost != Budget.model_fields["max_cost_usd"].default or bool(self.cap_answers))

    @property
    def limited(self) -> bool:
        """Whether any limit is in force (calls, cost or tokens)."""
        return any(limit is not None for limit in (self.max_calls, self.max_cost_usd, self.max_tokens))

    def merged(self, **overrides: float | int | None) -> Budget:
        """A validated copy with the given limits changed; ``None`` lifts a limit."""
        return Budget.model_validate({**self.model_dump(exclude_unset=True), **overrides})


_DEFAULT = Budget()


class Spent(BaseModel):
    """What a task spent under its budget before its run began (chat plans, and replans, first):
    recorded with the run, so that its resume counts it against the run's limits too."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    calls: Count = 0
    usage: Usage = Usage()

    @classmethod
    def of(cls, tracker: BudgetTracker) -> Spent:
        """What ``tracker`` has counted so far."""
        return cls(calls=tracker.calls, usage=tracker.usage)


#: the name of a task's own budget in its errors (``task_budget``)
TASK_BUDGET = "this task's budget"


def task_budget(budget: Budget, spent: Spent | None = None, *, parent: BudgetTracker | None = None) -> BudgetTracker:
    """A task's own budget, above its run's: what the task ``spent`` before the run (its planning)
    and everything the run spends, before a resume too, count against ``budget`` together (and
    against ``parent``, a budget shared with other tasks, what they spend from now)."""
    tracker = BudgetTracker(budget, None, parent=parent, name=TASK_BUDGET, whole=True)
    if spent is not None:
        tracker.count(spent.usage, calls=spent.calls)
    return tracker


def legacy_budget(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """A budget recorded before ``cap_answers`` was, with it resolved as then: by a token or cost limit
    other than the default values in force (its run's resume caps its answers as the run did)."""
    if "cap_answers" in recorded:
        return dict(recorded)
    capped = any(recorded.get(name, getattr(_DEFAULT, name)) not in (None, getattr(_DEFAULT, name))
                 for name in ("max_tokens", "max_cost_usd"))
    return {**recorded, "cap_answers": capped}


class Reservation(NamedTuple):
    """A call's worst case, held against the budget while it is in flight."""

    tokens: Count
    cost_usd: Amount


NOTHING = Reservation(0, 0.0)
"""The reservation of a call that no token or cost limit bounds."""

#: the answer a call is reserved for when neither its request nor its model sets a limit; under a
#: token or cost limit of the user's, an endpoint's request without one is sent with this one
ANSWER_ALLOWANCE = 1024

#: how a prompt is reserved for a model that learns nothing of its server's billing
_UNKNOWN = PromptGauge()


def _calls_made(calls: int) -> str:
    return f"{calls} call made" if calls == 1 else f"{calls} calls made"


class BudgetTracker:
    """Counts one run's spending and admits or refuses each call before it is sent.

    A call's worst case (its prompt plus ``max_tokens`` at its model's price) is reserved while
    it is in flight, so concurrent calls cannot overshoot ``max_tokens`` or ``max_cost_usd``
    together. Totals are kept as plain numbers: this runs for every call.

    ``parent`` is a budget shared by many runs (a data-set workflow's, a server's): a call must fit
    both, and everything counted here is counted there too. A shared budget has no ``run_id``;
    ``name`` says whose it is in its error. A ``whole`` one bounds one task, all of it (``task_budget``):
    it counts what its run spent before a resume too, which a budget shared by many runs does not.
    """

    def __init__(self, budget: Budget, run_id: str | None, *, parent: BudgetTracker | None = None,
                 name: str = "the data set's budget", whole: bool = False) -> None:
        self.budget = budget
        self.name = name  # a shared budget's, in its error
        self.whole = whole
        #: a token or cost limit of the user's applies (``Budget.cap_answers``), here or in the shared
        #: budget above: an endpoint's answer is then bounded by what it was reserved for (``ANSWER_ALLOWANCE``)
        self.bounds_answers: bool = bool(budget.cap_answers) or (parent is not None and parent.bounds_answers)
        self.run_id = run_id
        self.parent = parent
        #: runs' budgets are inside this one: it reserves each call's worst case, which they settle
        self.shared = False
        if parent is not None:
            parent.shared = True
        self.calls = 0
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cost_usd = 0.0
        self._reserved_calls = 0
        self._reserved_tokens = 0
        self._reserved_cost = 0.0
        #: what ``count`` added (a resumed run's earlier spending), which no shared budget saw
        self._counted = (0, 0, 0.0)
        #: the largest worst case (tokens, cost) one call has reserved: a run's last call needs that much left
        self.largest = NOTHING
        #: the most a call held beyond what it spent (tokens, cost): what a run's last call needs left
        #: besides what it spends
        self.slack = NOTHING
        self.closed: BudgetExceeded | None = None  # see ``close``
        self.exceeded: BudgetExceeded | None = None
        #: the worst case of the call a refusal stopped: a run cut short needed that much more
        self.wanted = NOTHING
        #: called once when a reservation is next released here (calls that wait for room; see ``on_release``)
        self._on_release: list[Callable[[], None]] = []

    @property
    def usage(self) -> Usage:
        """Requests, tokens and cost spent so far."""
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     cost_usd=dollars(self.cost_usd), requests=self.requests)

    def reached(self) -> BudgetExceeded | None:
        """The limit that what was spent has reached, as its error (not raised); None while every
        limit has room. (``exceeded`` is the last refusal: a call that did not fit may leave room
        for smaller ones.)"""
        budget, tokens = self.budget, self.prompt_tokens + self.completion_tokens
        limits = (("max_calls", budget.max_calls, self.calls, _calls_made(self.calls)),
                  ("max_tokens", budget.max_tokens, tokens, f"{tokens} tokens used"),
                  ("max_cost_usd", budget.max_cost_usd, dollars(self.cost_usd), f"{usd_exact(self.cost_usd)} spent"))
        for limit, value, spent, words in limits:
            if value is not None and spent >= value:
                return BudgetExceeded(limit=limit, value=value, spent=words, run_id=self.run_id, shared=self.name)
        return None

    def admit(self, request: ChatRequest, price: Price, gauge: PromptGauge | None = None, *,
              within: bool = False, answer_limit: int | None = None, counted: bool = False) -> Reservation:
        """Reserve one call's worst case and return the reservation; raise ``BudgetExceeded`` if it
        does not fit this budget or the shared one (``held`` on it: it would fit once the calls in
        flight end, so the caller may wait for them and ask again). ``within``: a further request of
        a call in flight (a structured answer's repair), reserved on top of the call's own and
        refused outright (it cannot wait). ``answer_limit``: the model's own limit on an answer whose
        request sets none (an engine's ``default_max_tokens``). ``counted``: a call that failed before
        its run was resumed, counted as it resumed (``count``), sent again: it takes no call of the
        limit again here (a shared budget, which bounds what runs spend now, counts it)."""
        budget = self.budget
        if self.closed is not None:
            self.exceeded = self.closed
            raise copy.copy(self.closed) if within else self.closed  # (a call's error gets its usage written on)
        new_call = not within and not counted
        if new_call and budget.max_calls is not None and self.calls + self._reserved_calls + 1 > budget.max_calls:
            in_flight = f", {self._reserved_calls} in flight" if self._reserved_calls else ""
            self._refuse("max_calls", budget.max_calls, f"{_calls_made(self.calls)}{in_flight}",
                         held=bool(in_flight) and self.calls + 1 <= budget.max_calls)  # (one that fails unsent is free)
        if budget.max_tokens is None and budget.max_cost_usd is None and self.parent is None and not self.shared:
            self._reserved_calls += new_call  # no limit reads the worst case: not estimated (this runs per call)
            return NOTHING
        prompt, answer = (gauge or _UNKNOWN).worst(request), request.max_tokens or answer_limit or ANSWER_ALLOWANCE
        worst = Reservation(prompt + answer, price.cost(prompt, answer))
        spent = self.prompt_tokens + self.completion_tokens
        what = "its invalid JSON's repair" if within else "the next call"
        if budget.max_tokens is not None and spent + self._reserved_tokens + worst.tokens > budget.max_tokens:
            held = f", {self._reserved_tokens} held for {self._in_flight()}" \
                if self._reserved_calls else ""
            self._refuse("max_tokens", budget.max_tokens,
                         f"{spent} tokens used{held}, {what} may take {worst.tokens}: {prompt} of prompt and "
                         f"up to {answer} of answer",
                         held=not within and bool(held) and spent + worst.tokens <= budget.max_tokens,
                         hopeless=not within and worst.tokens > budget.max_tokens, wanted=NOTHING if within else worst)
        cost = dollars(self.cost_usd + self._reserved_cost + worst.cost_usd)  # (0.1 + 0.2 is over 0.3 in floats)
        if budget.max_cost_usd is not None and cost > budget.max_cost_usd:
            spent_usd, held_usd, worst_usd = usd_alike(self.cost_usd, self._reserved_cost, worst.cost_usd)
            held = f", {held_usd} held for {self._in_flight()}" if self._reserved_calls else ""
            self._refuse("max_cost_usd", budget.max_cost_usd,
                         f"{spent_usd} spent{held}, {what} may cost "
                         f"{worst_usd}: {prompt} tokens of prompt and up to {answer} of answer",
                         held=not within and bool(held)
                         and dollars(self.cost_usd + worst.cost_usd) <= budget.max_cost_usd,
                         hopeless=not within and worst.cost_usd > budget.max_cost_usd,
                         wanted=NOTHING if within else worst)
        if self.parent is not None:
            try:
                self.parent.admit(request, price, gauge, within=within, answer_limit=answer_limit,
                                  counted=counted and self.parent.whole)
            except BudgetExceeded as exceeded:
                if not exceeded.held:  # (a call that waits for the calls in flight did not stop anything)
                    self.exceeded, self.wanted = exceeded, NOTHING if within else worst
                raise
        self._reserved_calls += new_call
        self._reserved_tokens += worst.tokens
        self._reserved_cost += worst.cost_usd
        if worst.tokens > self.largest.tokens or worst.cost_usd > self.largest.cost_usd:
            self.largest = Reservation(max(worst.tokens, self.largest.tokens),
                                       max(worst.cost_usd, self.largest.cost_usd))
        return worst

    def hold(self, reserved: Reservation, instead: Reservation) -> Reservation:
        """Hold ``instead`` of ``reserved`` for a call in flight (what its first request cost, once
        known, rather than that request's worst case); returns it."""
        self._reserved_tokens += instead.tokens - reserved.tokens
        self._reserved_cost += instead.cost_usd - reserved.cost_usd
        if self.parent is not None:
            self.parent.hold(reserved, instead)
        return instead

    def on_release(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, when a reservation is next released here or in the shared budget
        above: a call held for room (``BudgetExceeded.held``) may fit then, whoever held the room (a
        shared budget's reservation may be another executor's)."""
        tracker: BudgetTracker | None = self
        while tracker is not None:
            if callback not in tracker._on_release:
                tracker._on_release.append(callback)
            tracker = tracker.parent

    def _in_flight(self) -> str:
        calls = self._reserved_calls
        return f"{calls} call{'' if calls == 1 else 's'} in flight"

    def settle(self, reserved: Reservation, usage: Usage | None, *, counted: bool = False) -> None:
        """Release a reservation and count what the call really spent (None: it was not made);
        ``counted``: as ``admit``'s, the call is not counted again here."""
        self._reserved_calls -= not counted
        self._reserved_tokens -= reserved.tokens
        self._reserved_cost -= reserved.cost_usd
        if usage is not None:
            self._add(usage, calls=not counted)
            if reserved is not NOTHING:  # (no limit reads it otherwise: this runs for every call)
                tokens = reserved.tokens - usage.prompt_tokens - usage.completion_tokens
                cost = reserved.cost_usd - usage.cost_usd
                if tokens > self.slack.tokens or cost > self.slack.cost_usd:
                    self.slack = Reservation(max(tokens, self.slack.tokens), max(cost, self.slack.cost_usd))
        if self.parent is not None:
            self.parent.settle(reserved, usage, counted=counted and self.parent.whole)
        if self._on_release:
            waiting, self._on_release = self._on_release, []
            for callback in waiting:
                callback()

    def count(self, usage: Usage, *, calls: int = 1) -> None:
        """Count what a resumed run paid before, and its calls (``RunStore.earlier_usage``). Its run
        counts it, and so does its task's own budget (``whole``), but a shared budget (a data set's, a
        server's) bounds what its runs spend now and does not."""
        self._add(usage, calls=calls)
        calls_before, tokens_before, cost_before = self._counted
        self._counted = (calls_before + calls, tokens_before + usage.prompt_tokens + usage.completion_tokens,
                         cost_before + usage.cost_usd)
        if self.parent is not None and self.parent.whole:
            self.parent.count(usage, calls=calls)

    def committed(self) -> tuple[float, float, float]:
        """Calls, tokens and cost spent now (a resumed run's earlier spending left out) or held for
        the calls in flight."""
        calls, tokens, cost = self._counted
        return (self.calls - calls + self._reserved_calls,
                self.prompt_tokens + self.completion_tokens - tokens + self._reserved_tokens,
                self.cost_usd - cost + self._reserved_cost)

    def tally(self, usage: Usage) -> None:
        """Count a call that ended before it was admitted (it failed answering from the store or the
        cache): a call of the run, as its record counts it, with what it spent."""
        self._add(usage, calls=1)
        if self.parent is not None:
            self.parent.tally(usage)

    def spend(self, usage: Usage) -> None:
        """Count requests, tokens and cost that belong to no call (e.g. the embedding matcher's)."""
        self._add(usage, calls=0)
        if self.parent is not None:
            self.parent.spend(usage)

    def _add(self, usage: Usage, *, calls: int) -> None:
        self.calls += calls
        self.requests += usage.requests
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.cost_usd += usage.cost_usd

    def stop(self, refused: BudgetExceeded) -> None:
        """Make ``refused``, a refusal to wait for room (``held``), the one that stops this run: its
        call could not wait (its run ends ``budget_exceeded``, not ``failed``)."""
        refused.held = False
        if self.exceeded is None:
            self.exceeded = refused

    def close(self, reason: BudgetExceeded) -> None:
        """Refuse every call from now on with ``reason`` (a run a shared budget cannot be expected to finish)."""
        self.closed = reason

    def _refuse(self, limit: str, value: float, spent: str, *, held: bool = False, hopeless: bool = False,
                wanted: Reservation = NOTHING) -> None:
        refused = BudgetExceeded(limit=limit, value=value, spent=spent, run_id=self.run_id, shared=self.name, held=held,
                                 hopeless=hopeless)
        if not held:  # ``exceeded`` is the refusal that stopped something (``wanted``: the call's worst case)
            self.exceeded, self.wanted = refused, wanted
        raise refused


#: runs stopped by a call over a limit on its own, none having fitted, after which no more are started
#: (one may be a data set's one long item; two with none done say the limit, not the items, is at fault)
FUTILE_AFTER = 2


class RunAdmission:
    """Which of a data set's runs (or a server's requests) may start while they share a budget.

    Started all at once, the runs' first calls (every run's keyword samples) would spend a budget
    smaller than the data set (or a burst of requests), and no run would finish. So a run starts
    only while the budget can be expected to finish it after the runs in flight: each is expected
    to spend as much as the costliest run that ended on its own, all it cost (a resumed run's calls
    paid before included; runs a budget or a cancellation cut short do not show what a run costs;
    the average would start runs that cost more than it, to be cut off with their calls spent), and
    a run in flight at least what it has committed; the last call of all needs its worst case left
    beyond what it spends (the most a call of those runs held beyond what it spent; before any ended,
    the largest worst case a call has reserved, or a data set's run was refused), which is what the
    budget admits it by. Until one has ended so, runs start one at a time: nothing is known of what a run
    spends (a workflow's steps, a plan's nodes, the models' prices), but a call a data set's run was
    refused (``ended(..., cut=True)``) is one its runs make: with no room for it, no run is started
    (it would send its first calls and be cut there). With no run in flight one starts unless that
    is known (a run that does not fit stops at the budget, as any run).

    Runs of different *kinds* (a server's requests for one agent, for a team, for a preset) cost
    apart: what a run takes is learned per kind, and runs in flight are counted at their own kind's
    cost. A run of a kind not learned yet, or beside one in flight, waits until nothing is in flight.
    ``live`` is the number of runs in flight (all of ``kind``) or their count by kind.
    """

    def __init__(self, shared: BudgetTracker) -> None:
        self.shared = shared
        #: what the budget had committed before these runs (other runs may share it)
        self._base = shared.committed()
        self._ended = (0.0, 0.0, 0.0)  # committed by the runs that ended
        #: by kind, the full cost of the costliest runs that ended on their own
        self._largest: dict[Hashable, tuple[float, float, float]] = {}
        #: the most a call of those runs held beyond what it spent (None: a run ended without saying)
        self._slack: Reservation | None = NOTHING
        #: the largest worst case of a call a run was refused (it reserved nothing, so the shared
        #: budget's ``largest`` does not know it): the last call of a run may need that much
        self._refused = NOTHING
        self._futile: BudgetExceeded | None = None  # a call of every run seems over a limit on its own
        #: the kinds in ``_largest`` only expected, not measured (``expect``): the first run that ends
        #: on its own replaces the expectation
        self._estimated: dict[Hashable, bool] = {}
        #: runs stopped by a call over a limit on its own, while none has ended on its own
        self._hopeless = 0
        self._fitted = False  # a run ended on its own: the limit holds a whole run

    def admits(self, live: int | Mapping[Any, int], kind: Hashable = None) -> bool:
        """Whether one more run of ``kind`` may start beside ``live`` runs in flight."""
        flying = _by_kind(live, kind)
        if not any(flying.values()):
            return True
        known = kind in self._largest and all(k in self._largest for k, n in flying.items() if n)
        return known and self.refusal(flying, kind) is None

    def refusal(self, live: int | Mapping[Any, int], kind: Hashable = None) -> BudgetExceeded | None:
        """Why one more run of ``kind`` cannot be expected to finish beside ``live`` runs in flight,
        or None (None too while nothing is known): a run whose call was over a limit on its own, or the
        budget's room against what a run costs and what its last call may need."""
        if self._futile is not None:
            return self._futile
        learned = kind in self._largest
        if not learned and self._refused is NOTHING:
            return None
        flying = _by_kind(live, kind)
        budget, refused = self.shared.budget, self._refused
        # a run's last call needs its worst case left, beyond what the run spends: what calls held
        # beyond what they spent, once runs have shown it (else the largest worst case of a call)
        beyond = bool(self._largest) and self._slack is not None
        largest = self._slack if beyond and self._slack is not None else self.shared.largest
        committed = self.shared.committed()
        limits = (("max_calls", budget.max_calls, 0.0),
                  ("max_tokens", budget.max_tokens, max(largest.tokens, refused.tokens)),
                  ("max_cost_usd", budget.max_cost_usd, max(largest.cost_usd, refused.cost_usd)))
        for dimension, (name, limit, last_call) in enumerate(limits):
            if limit is None:
                continue
            per_run = self._largest.get(kind, _NONE_KNOWN)[dimension]
            in_flight = sum(n * self._largest.get(k, _NONE_KNOWN)[dimension] for k, n in flying.items())
            expected = self._base[dimension] + self._ended[dimension] + in_flight
            needed = max(expected, committed[dimension]) + per_run + last_call
            if (dollars(needed) if name == "max_cost_usd" else needed) > limit:
                def amount(value: float, name: str = name) -> str:
                    return (f"{value:,.0f} call{'s' if value != 1 else ''}" if name == "max_calls"
                            else f"{value:,.0f} tokens"
                            if name == "max_tokens" else usd_exact(value))  # (amounts set against a limit)

                # (a call is admitted by its worst case, so the last one needs that much left)
                takes = f", and a run takes up to {amount(per_run)}" if learned else ""
                reserve = "" if not last_call else (
                    f", and a call may hold {amount(last_call)} more than it spends" if beyond
                    else f", and a call may need {amount(last_call)} at worst")
                return BudgetExceeded(limit=name, value=limit, run_id=None, shared=self.shared.name, no_room=True,
                                      spent=f"{amount(committed[dimension])} so far{takes}{reserve}, "
                                            "so it was not started")
        return None

    def ended(self, run: BudgetTracker, *, on_its_own: bool, cut: bool = False) -> None:
        """Count a run that ended (``on_its_own``: not cut short by a budget or a cancellation, so
        it shows what a run costs; ``cut``: a budget cut it short, so the call it was refused is one
        a run may need room for). Runs stopped by a call over a limit on its own (with the budget
        empty it would not fit either), ``FUTILE_AFTER`` of them while none ended on its own, stop
        the runs not started: they would send their first calls and stop there too. One alone does
        not (a data set's one long item stopped every item after it), nor do any once a run fitted."""
        if on_its_own:
            self._fitted, self._futile = True, None
        elif run.exceeded is not None and run.exceeded.hopeless and not self._fitted:
            self._hopeless += 1
            if self._hopeless >= FUTILE_AFTER and self._futile is None:
                refused = run.exceeded
                # (the run's own budget, not the shared one, where the run's refused it: it read "the data
                # set's budget max_cost_usd=1" under a data-set budget of tokens only)
                whose = self.shared.name if refused.run_id is None else "each run's budget"
                self._futile = BudgetExceeded(limit=refused.limit, value=refused.value, run_id=None,
                                              shared=whose, hopeless=True,
                                              spent=f"one call of a run needs more than all of it: {refused.spent}")
        wanted = run.wanted
        if cut and (wanted.tokens > self._refused.tokens or wanted.cost_usd > self._refused.cost_usd):
            self._refused = Reservation(max(wanted.tokens, self._refused.tokens),
                                        max(wanted.cost_usd, self._refused.cost_usd))
        whole = (run.calls, run.prompt_tokens + run.completion_tokens, run.cost_usd)
        self.count(run.committed(), whole if on_its_own else None, run.slack)

    def count(self, spent: tuple[float, float, float], whole: tuple[float, float, float] | None,
              slack: Reservation | None = None, *, kind: Hashable = None) -> None:
        """Count a run of ``kind`` that ended, by what it had committed to the shared budget (calls,
        tokens, dollars) and, if it ended on its own, all it cost (``whole``: what a run of its kind
        takes) and the most a call of it held beyond what it spent (``slack``; None: not known)."""
        self._ended = (self._ended[0] + spent[0], self._ended[1] + spent[1], self._ended[2] + spent[2])
        if whole is not None:
            if slack is None or self._slack is None:
                self._slack = None
            elif slack.tokens > self._slack.tokens or slack.cost_usd > self._slack.cost_usd:
                self._slack = Reservation(max(slack.tokens, self._slack.tokens),
                                          max(slack.cost_usd, self._slack.cost_usd))
            largest = _NONE_KNOWN if self._estimated.pop(kind, None) else self._largest.get(kind, _NONE_KNOWN)
            self._largest[kind] = (max(largest[0], whole[0]), max(largest[1], whole[1]), max(largest[2], whole[2]))

    def expect(self, kind: Hashable, like: Hashable, tokens_per_call: float) -> None:
        """Until a run of ``kind`` ends on its own, expect one to take what the costliest run of
        ``like`` took and ``tokens_per_call`` more in each of its calls, at that run's price per
        token (a longer request's run, from runs of shorter ones: unknown, it ran alone, and every
        request beside it waited). Nothing is expected where ``like`` is not known, or ``kind`` is."""
        known = self._largest.get(like)
        if known is None or kind in self._largest:
            return
        calls, tokens, cost = known
        more = calls * tokens_per_call
        self._largest[kind] = (calls, tokens + more, cost * (tokens + more) / tokens if tokens else cost)
        self._estimated[kind] = True


#: what a run of a kind not learned yet is counted at (it waits for nothing to be in flight)
_NONE_KNOWN = (0.0, 0.0, 0.0)


def _by_kind(live: int | Mapping[Any, int], kind: Hashable) -> Mapping[Any, int]:
    """Runs in flight by kind: a bare count is of runs of ``kind``."""
    return {kind: live} if isinstance(live, int) else live
