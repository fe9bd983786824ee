"""Per-attempt time limits for many requests in one event loop, with one timer.

``asyncio.timeout`` schedules a timer handle per request; with thousands of requests in flight the
loop's timer heap (and the cancelled handles it keeps) costs more than the rest of a request's
bookkeeping. Requests with the same limit expire in the order they started, so each limit's
entries form a queue already sorted by deadline, and one timer, at the earliest head, serves them
all. An expired request's task is cancelled and the cancellation turned into ``TimeoutError``, as
``asyncio.timeout`` does; a cancellation from elsewhere passes through unchanged.

A limit counts the time the loop could serve its request. A stall of the loop (a blocking call on
its thread: a run store's write waiting out another process's lock) is not the endpoint's: answers
that arrived meanwhile wait unread in their sockets, and when the loop runs again the timer, overdue,
came before the tasks that read them. Cut off there, each was sent again, and paid twice. So a timer
that runs ``STALL_S`` or more late moves every limit on by its lateness, and gives a request the stall
left at its limit at least ``STALL_S`` more, to read what came: once per request, so one that never
answers is cut off all the same, however often the loop stalls.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

#: how late (seconds) the timer must run to count as a stall of the loop, and what a request the stall
#: left at its limit gets at least, to read an answer that came meanwhile
STALL_S = 1.0


class _Entry:
    __slots__ = ("deadline", "done", "expired", "stalled", "task")

    def __init__(self, deadline: float, task: asyncio.Task[object]) -> None:
        self.deadline = deadline
        self.task = task
        self.done = False
        self.expired = False
        self.stalled = False  # its limit moved on once for a stall of the loop (never twice)


class Deadlines:
    """Time limits for the requests of one event loop (make one per loop)."""

    def __init__(self) -> None:
        self._queues: dict[float, deque[_Entry]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0  # when the timer was set to run

    async def within(self, seconds: float, awaitable: Awaitable[T]) -> T:
        """``awaitable``'s result, or ``asyncio.TimeoutError`` once ``seconds`` have passed."""
        task = asyncio.current_task()
        if task is None or sys.version_info < (3, 11):  # no Task.uncancel before 3.11
            return await asyncio.wait_for(awaitable, seconds)
        loop = asyncio.get_running_loop()
        entry = _Entry(loop.time() + seconds, task)
        queue = self._queues.get(seconds)
        if queue is None:
            queue = self._queues[seconds] = deque()
        queue.append(entry)
        if self._timer is None or entry.deadline < self._timer.when():
            self._arm(loop, entry.deadline)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if entry.expired and task.uncancel() == 0:  # this limit's cancellation, and no other
                raise asyncio.TimeoutError from None
            raise
        finally:
            entry.done = True
            while queue and queue[0].done:  # requests mostly end in the order they started
                queue.popleft()

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._due = when
        self._timer = loop.call_at(when, self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """Cancel the requests past their deadline; set the timer for the next one. After a stall
        (the timer ran ``STALL_S`` or more late) the limits move on by it first (see the module)."""
        self._timer = None
        now = loop.time()
        stall = now - self._due
        if stall >= STALL_S:
            # once per request: a loop that stalls again and again (each stall longer than the time the
            # last one gave) kept moving a hung request's limit, so it was never cut off. (A queue stays
            # in order but where a limit is under STALL_S: a request behind one the stall moved then
            # expires with it, at most STALL_S late.)
            for queue in self._queues.values():
                for entry in queue:
                    if not entry.stalled:
                        entry.deadline, entry.stalled = max(entry.deadline + stall, now + STALL_S), True
        earliest: float | None = None
        for seconds in list(self._queues):
            queue = self._queues[seconds]
            while queue and (queue[0].done or queue[0].deadline <= now):
                entry = queue.popleft()
                if not entry.done:
                    entry.expired = True
                    entry.task.cancel()
            if queue:
                earliest = queue[0].deadline if earliest is None else min(earliest, queue[0].deadline)
            else:
                del self._queues[seconds]
        if earliest is not None:
            self._arm(loop, earliest)
