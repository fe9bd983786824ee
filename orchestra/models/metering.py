"""Metering: what one call really cost, counted where the requests are sent.

A logical *call* (one expert answer, one keyword extraction...) may take several *requests*:
retries after a 5xx or 429, a structured-output repair, a fallback to a simpler JSON mode. The
model layer opens a ``Meter`` around each call; the HTTP endpoint counts every attempt it sends,
engines count every generation, and every billed response adds its tokens. Code outside a call
(the embedding matcher) opens its own meter to count its requests.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from orchestra.models.types import Usage


@dataclass
class Meter:
    """Requests and billed usage accumulated by one call (or one piece of work outside a call).

    Kept as plain numbers (a ``Usage`` is made only when asked for): this runs on every request.
    """

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def charge(self, usage: Usage | None) -> None:
        """Add the tokens and cost of one billed response."""
        if usage is not None:
            self.prompt_tokens += usage.prompt_tokens
            self.completion_tokens += usage.completion_tokens
            self.cost_usd += usage.cost_usd

    @property
    def usage(self) -> Usage:
        """Everything counted so far, ``requests`` included."""
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     cost_usd=self.cost_usd, requests=self.requests)


_current: ContextVar[Meter | None] = ContextVar("orchestra_meter", default=None)


class metering:  # lower case: used like a function, ``with metering() as meter``
    """Count the requests sent (and usage charged) by the code inside, in this task.

    A class rather than a generator-based context manager: it wraps every request.
    """

    __slots__ = ("meter", "token")

    def __init__(self, meter: Meter | None = None) -> None:
        self.meter = meter or Meter()

    def __enter__(self) -> Meter:
        self.token = _current.set(self.meter)
        return self.meter

    def __exit__(self, *_: object) -> None:
        _current.reset(self.token)


def count_request() -> None:
    """Count one request sent on the wire (or one engine generation) against the open meter."""
    meter = _current.get()
    if meter is not None:
        meter.requests += 1


def take_back_request() -> None:
    """Uncount a request ``count_request`` counted that never reached the server (no connection was
    made), so the requests reported are the ones the server saw."""
    meter = _current.get()
    if meter is not None:
        meter.requests -= 1


def charge(usage: Usage | None) -> None:
    """Charge a billed response's tokens to the open meter."""
    meter = _current.get()
    if meter is not None:
        meter.charge(usage)
