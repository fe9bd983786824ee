"""Answers the evaluations of one sweep share: no request is asked twice in a sweep.

A sweep evaluates every method on the same items with the same Orchestra, and its points send many
of the same requests (the same prompts, the same seeds, to the same models): each item's keyword
samples, in every method that recruits by skills, and the expert and aggregator calls of points that
chose the same team (a sweep's cost preferences often do). The first point to ask one keeps its
answer; the later points take it without asking (the n-th identical request of a run takes the n-th
answer, so an agent drawn twice still gets two). A run that takes one counts it apart
(``RunUsage.reused_calls`` and ``reused_usd``, what it cost where it was asked), not among what it
sent: the runs, the run store and the endpoints agree (a run records it as an answer that cost it
nothing, source ``shared``). Its budgets count it as if it were sent, so a point stops where its
method alone would, and a point's cost adds it back: what the method costs on its own.
"""

from __future__ import annotations

from contextvars import ContextVar

from orchestra.models.types import ChatResult


class SharedAnswers:
    """Successful answers by call key (a hash of the model and its request) and seq, for a sweep's points."""

    def __init__(self) -> None:
        self._answers: dict[tuple[str, int], ChatResult] = {}

    def view(self) -> SharedView:
        """A point's way in (what the executor consults)."""
        return SharedView(self._answers)


class SharedView:
    """One evaluation's way into ``SharedAnswers``."""

    def __init__(self, answers: dict[tuple[str, int], ChatResult]) -> None:
        self._answers = answers

    def get(self, key: str, seq: int) -> ChatResult | None:
        """The answer an earlier point's call with this key and seq got; None if none did."""
        return self._answers.get((key, seq))

    def put(self, key: str, seq: int, result: ChatResult) -> None:
        """Keep a call's successful answer for the points after this one."""
        self._answers.setdefault((key, seq), result)


#: the view the runs begun in this context share answers through (set by ``frontier.asweep`` per point)
sharing: ContextVar[SharedView | None] = ContextVar("sharing", default=None)
