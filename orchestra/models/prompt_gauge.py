"""How many tokens a model's server bills for a prompt, learned from the prompts it billed.

A remote server's tokenizer and chat template are unknown here. A prompt is first measured in
*units*, a count that common tokenizers do not exceed on most text (a token per 4 letters or
spaces, per digit or ASCII sign, per UTF-8 byte of other characters: Chinese text, emoji); what
the server then bills teaches how many tokens a unit is for that model, and how many it adds to
every prompt (its chat template, a system prompt of its own). Budgets reserve the worst case; a
record of a stream that carried no usage (llama-cpp-python's) takes the estimate.
"""

from __future__ import annotations

import math
import string
from collections import deque
from collections.abc import Callable

from orchestra.models.structured import json_instructions
from orchestra.models.types import ChatRequest

#: tokens a chat template adds to a prompt (role markers, a default system prompt), at the least
TEMPLATE_TOKENS = 32
#: the bills learned from every response at first, then from one in ``SAMPLED`` (learning costs a
#: pass over the prompt; a model's rates settle within its first answers)
FIRST_BILLS, SAMPLED = 32, 16
#: the bills kept to learn from (the latest), and the fewest units a prompt has for its bill to
#: teach a rate per unit (a short prompt's bill is mostly the template)
KEPT_BILLS, RATE_UNITS = 64, 128
#: the most tokens a unit is taken for (units are meant to bound tokens; what is above is a template)
MAX_RATE = 2.0
_WORDLIKE = (string.ascii_letters + " \t\n\r").encode()


def text_units(text: str) -> int:
    """``text`` in units: a unit per 4 letters or spaces, per digit or other ASCII sign, and per
    UTF-8 byte of any other character."""
    if text.isascii():
        raw = text.encode()
        signs = len(raw.translate(None, _WORDLIKE))
        return (len(raw) - signs + 3) // 4 + signs
    ascii_part = text.encode("ascii", "ignore")
    signs = len(ascii_part.translate(None, _WORDLIKE))
    return (len(ascii_part) - signs + 3) // 4 + signs + len(text.encode()) - len(ascii_part)


def prompt_units(request: ChatRequest, *, instructions: bool) -> int:
    """``request``'s prompt in units; ``instructions``: with the JSON instructions appended (a
    server that cannot enforce a schema gets them)."""
    units = sum(text_units(message.content) for message in request.messages)
    return units + _instruction_units(request) if instructions and request.wants_json else units


#: the JSON instructions' units by the identity of the output asked for: the output itself (so its
#: id is not reused) and the units (a pydantic class's schema takes 150 µs to write)
_instructions: dict[int, tuple[object, int]] = {}


def _instruction_units(request: ChatRequest) -> int:
    known = _instructions.get(id(request.output))
    if known is not None and known[0] is request.output:
        return known[1]
    if len(_instructions) >= 256:
        _instructions.clear()
    units = text_units(json_instructions(request)) + 1  # (after two newlines)
    _instructions[id(request.output)] = (request.output, units)
    return units


class PromptGauge:
    """One model's prompt tokens: ``worst`` for budgets, ``estimate`` for records.

    A bill is taken as a fixed part (the template) plus a rate per unit. ``worst`` takes the rate
    as the highest any long prompt was billed at beyond ``TEMPLATE_TOKENS`` (from one token a unit,
    at most ``MAX_RATE``), and the fixed part as the most any bill left beyond that rate (from
    ``TEMPLATE_TOKENS``). ``estimate`` fits the bills by least squares; before any bill it is the
    units themselves. ``instructions(request)`` says whether the model's server gets the JSON
    instructions appended (None: it may)."""

    __slots__ = ("_bills", "_fixed", "_kept", "_rate", "instructions")

    def __init__(self, instructions: Callable[[ChatRequest], bool] | None = None) -> None:
        self.instructions = instructions
        self._bills = 0
        self._kept: deque[tuple[int, int]] = deque(maxlen=KEPT_BILLS)  # (units, tokens)
        self._rate, self._fixed = 1.0, TEMPLATE_TOKENS

    def units(self, request: ChatRequest) -> int:
        """``request``'s prompt in units, as this model's server gets it."""
        appended = request.wants_json and (self.instructions is None or self.instructions(request))
        return prompt_units(request, instructions=appended)

    def billed(self, request: ChatRequest, tokens: int) -> None:
        """The server billed ``tokens`` prompt tokens for ``request``."""
        self._bills += 1
        if tokens <= 0 or (self._bills > FIRST_BILLS and self._bills % SAMPLED):
            return
        units = self.units(request)
        if units <= 0:
            return
        self._kept.append((units, tokens))
        long = [(tokens - TEMPLATE_TOKENS) / units for units, tokens in self._kept if units >= RATE_UNITS]
        self._rate = min(MAX_RATE, max([1.0, *long]))
        self._fixed = max([TEMPLATE_TOKENS, *(math.ceil(tokens - self._rate * units) for units, tokens in self._kept)])

    def worst(self, request: ChatRequest) -> int:
        """The most prompt tokens ``request`` is expected to be billed for."""
        return math.ceil(self.units(request) * self._rate) + self._fixed

    def estimate(self, request: ChatRequest) -> int:
        """The prompt tokens ``request`` was likely billed for, where the server did not say."""
        units = self.units(request)
        kept = self._kept
        if not kept:
            return max(1, units)
        n = len(kept)
        x = sum(u for u, _ in kept)
        y = sum(t for _, t in kept)
        spread = n * sum(u * u for u, _ in kept) - x * x
        if spread > 0:  # bills of prompts of several lengths: a fixed part and a rate
            rate = (n * sum(u * t for u, t in kept) - x * y) / spread
            fixed = (y - rate * x) / n
            if rate > 0 and fixed >= 0:
                return max(1, round(fixed + rate * units))
        fixed = min(TEMPLATE_TOKENS // 2, y // (2 * n))  # (one length only: some of each bill is the template)
        return max(1, round(fixed + units * (y - fixed * n) / x))
