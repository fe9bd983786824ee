"""Answers the evaluations of one sweep share: each item's keyword samples are asked once.

A sweep evaluates every method on the same items with the same Orchestra, and the methods that
recruit by skills send the same keyword samples (the same requests, the same seeds, to the same
model) for each item: in a sweep of eight cost preferences, most of its requests. The first point
to ask a sample keeps its answer; the later points take it without asking. Each point still counts
what those samples cost where they were asked (``SharedView.reused_usd``), so its cost is what the
method costs on its own; the runs, the run store and the endpoints count them where they were sent
(a run records a shared answer as one that cost it nothing, source ``shared``).
"""

from __future__ import annotations

from contextvars import ContextVar

from orchestra.execute import KEYWORDS
from orchestra.models.types import ChatResult
from orchestra.money import dollars

#: the purposes of the calls whose answers are shared (keyword samples: the same for every method)
SHARED_PURPOSES = frozenset({KEYWORDS})


class SharedAnswers:
    """Successful answers by call key (a hash of the model and its request), for a sweep's points."""

    def __init__(self) -> None:
        self._answers: dict[str, ChatResult] = {}

    def view(self) -> SharedView:
        """A point's way in: it counts what that point reused."""
        return SharedView(self._answers)


class SharedView:
    """One evaluation's use of ``SharedAnswers``: what it took from them, and what that cost where it
    was asked."""

    purposes = SHARED_PURPOSES

    def __init__(self, answers: dict[str, ChatResult]) -> None:
        self._answers = answers
        self.reused_calls = 0
        self.reused_usd = 0.0

    def get(self, key: str) -> ChatResult | None:
        """The answer an earlier call with this key got, counted as reused; None if none did."""
        found = self._answers.get(key)
        if found is not None:
            self.reused_calls += 1
            self.reused_usd = dollars(self.reused_usd + found.usage.cost_usd)
        return found

    def put(self, key: str, result: ChatResult) -> None:
        """Keep a call's successful answer for the points after this one."""
        self._answers.setdefault(key, result)


#: the view the runs begun in this context share answers through (set by ``frontier.asweep`` per point)
sharing: ContextVar[SharedView | None] = ContextVar("sharing", default=None)
