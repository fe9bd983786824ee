"""A simulated heavy engine: loading and generating take set times (sleeps), answers are fixed.

Benchmarks of the executor (``bench/batching.py``, ``bench/ray_scale.py``) use it, so schedules
can be compared with a computed bound; it pickles, so it runs inside a Ray actor as it does here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import ClassVar

from orchestra.models.base import ModelBase, Outcome
from orchestra.models.placement import EngineResources
from orchestra.models.types import ChatRequest, ChatResult, Usage

_ONE_GENERATION = Usage(requests=1)


class SimulatedEngine(ModelBase):
    """A heavy engine: loading costs ``load_s``; a batch of n requests ``per_batch + n * per_request``.

    Args:
        name: the model's name (its answers are ``"NAME: The answer is 1"``).
        load_s, per_request, per_batch: the simulated times, in seconds.
        resources: what its Ray actor asks the cluster for.
    """

    heavy: ClassVar[bool] = True
    is_test_double: ClassVar[bool] = True

    def __init__(self, name: str, *, load_s: float, per_request: float, per_batch: float,
                 resources: EngineResources | None = None) -> None:
        self.name, self.load_s, self.per_request, self.per_batch = name, load_s, per_request, per_batch
        self.resources = resources
        self.memory_bytes = 1
        self._loaded = False

    @property
    def loaded(self) -> bool:
        """Whether it is loaded."""
        return self._loaded

    async def load(self) -> float:
        """Sleep ``load_s``."""
        await asyncio.sleep(self.load_s)
        self._loaded = True
        return self.load_s

    async def unload(self) -> None:
        """Forget the load."""
        self._loaded = False

    async def complete_each(self, requests: Sequence[ChatRequest]) -> AsyncIterator[Outcome]:
        """Sleep for the whole batch, then answer every request."""
        if not self._loaded:
            raise RuntimeError(f"{self.name} asked to generate while not loaded")
        await asyncio.sleep(self.per_batch + len(requests) * self.per_request)
        for index in range(len(requests)):  # (one generation each: a request, as ``Usage.requests`` counts them)
            yield index, ChatResult(text=f"{self.name}: The answer is 1", model=self.name, usage=_ONE_GENERATION)

    async def _generate(self, request: ChatRequest) -> ChatResult:  # pragma: no cover - whole batches only
        raise AssertionError("SimulatedEngine generates whole batches")
