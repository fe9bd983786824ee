"""Answers the evaluations of one sweep share: each item's keyword samples are asked once.

A sweep evaluates every method on the same items with the same Orchestra, and the methods that
recruit by skills send the same keyword samples (the same requests, the same seeds, to the same
model) for each item: in a sweep of eight cost preferences, most of its requests. The first point
to ask a sample keeps its answer; the later points take it without asking. A run that takes one
counts it apart (``RunUsage.reused_calls`` and ``reused_usd``, what it cost where it was asked),
not among what it sent: the runs, the run store and the endpoints agree (a run records it as an
answer that cost it nothing, source ``shared``). Its budgets count it as if it were sent, so a
point stops where its method alone would, and a point's cost adds it back: what the method costs
on its own.
"""

from __future__ import annotations

from contextvars import ContextVar

from orchestra.execute import KEYWORDS
from orchestra.models.types import ChatResult

#: the purposes of the calls whose answers are shared (keyword samples: the same for every method)
SHARED_PURPOSES = frozenset({KEYWORDS})


class SharedAnswers:
    """Successful answers by call key (a hash of the model and its request), for a sweep's points."""

    def __init__(self) -> None:
        self._answers: dict[str, ChatResult] = {}

    def view(self) -> SharedView:
        """A point's way in (what the executor consults, for ``SHARED_PURPOSES``)."""
        return SharedView(self._answers)


class SharedView:
    """One evaluation's way into ``SharedAnswers``."""

    purposes = SHARED_PURPOSES

    def __init__(self, answers: dict[str, ChatResult]) -> None:
        self._answers = answers

    def get(self, key: str) -> ChatResult | None:
        """The answer an earlier call with this key got; None if none did."""
        return self._answers.get(key)

    def put(self, key: str, result: ChatResult) -> None:
        """Keep a call's successful answer for the points after this one."""
        self._answers.setdefault(key, result)


#: the view the runs begun in this context share answers through (set by ``frontier.asweep`` per point)
sharing: ContextVar[SharedView | None] = ContextVar("sharing", default=None)
