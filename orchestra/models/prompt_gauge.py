"""How many tokens a model's server bills for a prompt, learned from the prompts it billed.

A remote server's tokenizer and chat template are unknown here: its prompt tokens are counted as 4
characters a token until it bills some, and then at the rates it billed. Budgets reserve the
worst case; a record of a stream that carried no usage (llama-cpp-python's) takes the estimate.
"""

from __future__ import annotations

import math

from orchestra.models.structured import json_instructions
from orchestra.models.types import ChatRequest

#: tokens a chat template adds to a prompt (role markers, a default system prompt), reserved on top
TEMPLATE_TOKENS = 32
#: the fewest tokens a character is reserved at (the rate of English text on common tokenizers)
FLOOR_RATE = 0.25


def prompt_chars(request: ChatRequest) -> int:
    """The characters of ``request``'s prompt as it may be sent: the JSON instructions a server
    that cannot enforce a schema gets appended included."""
    chars = sum(len(message.content) for message in request.messages)
    return chars + _instruction_chars(request) if request.wants_json else chars


#: the JSON instructions' length by the identity of the output asked for: the output itself (so its
#: id is not reused) and the length (a pydantic class's schema takes 150 µs to write)
_instructions: dict[int, tuple[object, int]] = {}


def _instruction_chars(request: ChatRequest) -> int:
    known = _instructions.get(id(request.output))
    if known is not None and known[0] is request.output:
        return known[1]
    if len(_instructions) >= 256:
        _instructions.clear()
    chars = len(json_instructions(request)) + 2  # (after two newlines)
    _instructions[id(request.output)] = (request.output, chars)
    return chars


class PromptGauge:
    """One model's prompt tokens by characters: ``worst`` for budgets, ``estimate`` for records.

    ``worst`` is the characters at the highest rate billed so far (beyond ``TEMPLATE_TOKENS``; at
    least ``FLOOR_RATE``) plus ``TEMPLATE_TOKENS``; ``estimate`` is the overall rate billed (4
    characters a token before any bill)."""

    __slots__ = ("_chars", "_rate", "_tokens")

    def __init__(self) -> None:
        self._chars = self._tokens = 0
        self._rate = FLOOR_RATE

    def billed(self, request: ChatRequest, tokens: int) -> None:
        """The server billed ``tokens`` prompt tokens for ``request``."""
        chars = prompt_chars(request)
        if chars <= 0 or tokens <= 0:
            return
        self._chars += chars
        self._tokens += tokens
        self._rate = max(self._rate, (tokens - TEMPLATE_TOKENS) / chars)

    def worst(self, request: ChatRequest) -> int:
        """The most prompt tokens ``request`` is expected to be billed for."""
        return math.ceil(prompt_chars(request) * self._rate) + TEMPLATE_TOKENS

    def estimate(self, request: ChatRequest) -> int:
        """The prompt tokens ``request`` was likely billed for, where the server did not say."""
        chars = prompt_chars(request)
        return max(1, round(chars * self._tokens / self._chars) if self._chars else chars // 4)
