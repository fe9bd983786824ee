"""Load-aware batching: naive per-instance loading vs Orchestra's executor vs the ideal bound.

Simulated heavy engines: loading costs L seconds (a sleep, scaled down from real model loads),
and a batch of n requests takes ``per_batch + n * per_request``. The work: 16 models, 100
instances, k = 3 experts each (Symbolic-MoE recruiting from skill profiles), then an aggregator.

    (a) naive: per instance, load each expert's model, generate, unload; then the aggregator's
    (b) Orchestra: ``run_many`` on one executor, one model resident at a time
    (c) ideal: each model used loaded once for its batch, plus the aggregator's batch

Targets: loads = distinct models used + 1; wall <= 1.15 x ideal; >= 7x faster than naive
(the paper measured 196.92 s naive vs 25.76 s for Symbolic-MoE on one GPU).

    python bench/batching.py [--models 16] [--instances 100] [--load 0.05] [--per-request 0.002] [--per-batch 0.01]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import ClassVar

from orchestra import Agent, Budget, Orchestra, Pool
from orchestra.models import ChatRequest, ChatResult, FunctionModel
from orchestra.models.base import ModelBase, Outcome
from orchestra.profile import Provenance, SkillProfile

SKILLS = [f"skill{i}" for i in range(8)]


class SimulatedEngine(ModelBase):
    """A heavy in-process engine: loading costs ``load_s``; a batch ``per_batch + n * per_request``."""

    heavy: ClassVar[bool] = True
    is_test_double: ClassVar[bool] = True

    def __init__(self, name: str, *, load_s: float, per_request: float, per_batch: float) -> None:
        self.name, self.load_s, self.per_request, self.per_batch = name, load_s, per_request, per_batch
        self.memory_bytes = 1
        self.loads = 0
        self._loaded = False

    @property
    def loaded(self) -> bool:
        return self._loaded

    async def load(self) -> float:
        await asyncio.sleep(self.load_s)
        self.loads += 1
        self._loaded = True
        return self.load_s

    async def unload(self) -> None:
        self._loaded = False

    async def complete_each(self, requests: Sequence[ChatRequest]) -> AsyncIterator[Outcome]:
        assert self._loaded, f"{self.name} generating while not loaded"
        await asyncio.sleep(self.per_batch + len(requests) * self.per_request)
        for index in range(len(requests)):
            yield index, ChatResult(text=f"{self.name}: The answer is 1", model=self.name)

    async def _generate(self, request: ChatRequest) -> ChatResult:  # pragma: no cover - batches only
        raise AssertionError("SimulatedEngine generates whole batches")


def make_pool(n_models: int, engine_options: dict[str, float], seed: int) -> Pool:
    """Agents with random skill profiles, one engine each; a light keyword model."""
    rng = random.Random(seed)
    engines = [SimulatedEngine(f"model{i:02d}", **engine_options) for i in range(n_models)]
    agents = [Agent(name=f"agent{i:02d}", model=engine) for i, engine in enumerate(engines)]
    provenance = Provenance(dataset="simulated", dataset_sha256="0" * 64, items=100, model="simulated")
    profiles = {a.name: SkillProfile(agent=a.name, skills={s: rng.randint(-5, 10) for s in SKILLS},
                                     accuracy=0.5, aggregation_score=0.9 if i == 0 else 0.5, provenance=provenance)
                for i, a in enumerate(agents)}

    def keyword_llm(request: ChatRequest) -> dict[str, list[str]]:
        return {"keywords": [SKILLS[zlib.crc32(request.prompt_text().encode()) % len(SKILLS)]]}

    return Pool(agents=agents, profiles=profiles, planner=FunctionModel(keyword_llm, name="keyword-llm"))


async def naive(pool: Pool, experts: list[list[str]], aggregator: str) -> tuple[float, int]:
    """Per instance: load each expert's model, generate one answer, unload; then the aggregator."""
    started, loads = time.perf_counter(), 0
    for instance, names in enumerate(experts):
        for name in [*names, aggregator]:
            engine = pool[name].model
            await engine.load()  # type: ignore[attr-defined]
            loads += 1
            await engine.complete([ChatRequest.user(f"question {instance}")])
            await engine.unload()  # type: ignore[attr-defined]
    return time.perf_counter() - started, loads


def ideal(experts: list[list[str]], pool: Pool, load_s: float, per_request: float,
          per_batch: float) -> tuple[float, int]:
    """Each model used loaded once with all its requests in one batch, then the aggregator's batch."""
    per_model = Counter(pool[name].model.name for names in experts for name in names)
    expert_time = sum(load_s + per_batch + n * per_request for n in per_model.values())
    aggregator_time = load_s + per_batch + len(experts) * per_request
    return expert_time + aggregator_time, len(per_model) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=16)
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--load", type=float, default=0.05, help="seconds per model load")
    parser.add_argument("--per-request", type=float, default=0.002)
    parser.add_argument("--per-batch", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    options = {"load_s": args.load, "per_request": args.per_request, "per_batch": args.per_batch}

    pool = make_pool(args.models, options, args.seed)
    orc = Orchestra(pool, k=args.k, store=False, seed=args.seed,
                    budget=Budget(max_calls=None, max_cost_usd=None, max_tokens=None))
    questions = [f"question {i}" for i in range(args.instances)]
    started = time.perf_counter()
    results = orc.run_many(questions)
    ours_wall = time.perf_counter() - started
    assert all(r.status == "done" for r in results), results[0].error
    ours_loads = sum(orc.executor.stats.loads.values())
    experts = [list(r.node("answer").experts) for r in results]
    aggregator = orc.stages.staffing.aggregator.name
    distinct = len({pool[name].model.name for names in experts for name in names})

    ideal_wall, ideal_loads = ideal(experts, pool, **{"load_s": args.load, "per_request": args.per_request,
                                                      "per_batch": args.per_batch})
    for agent in pool.agents:  # start the naive run from a clean slate
        asyncio.run(agent.model.unload())  # type: ignore[attr-defined]
    naive_wall, naive_loads = asyncio.run(naive(pool, experts, aggregator))

    print(f"{args.models} models, {args.instances} instances, k={args.k}; load {args.load * 1000:.0f} ms, "
          f"{args.per_request * 1000:.1f} ms/request + {args.per_batch * 1000:.0f} ms/batch")
    print(f"distinct expert models used: {distinct} (after the rare-expert filter); aggregator: {aggregator}")
    print(f"{'':24}{'loads':>8}{'wall (s)':>12}")
    print(f"{'(a) naive per instance':24}{naive_loads:>8}{naive_wall:>12.3f}")
    print(f"{'(b) orchestra':24}{ours_loads:>8}{ours_wall:>12.3f}")
    print(f"{'(c) ideal bound':24}{ideal_loads:>8}{ideal_wall:>12.3f}")
    speedup, over_ideal = naive_wall / ours_wall, ours_wall / ideal_wall
    print(f"loads: {ours_loads} vs distinct models used + 1 = {distinct + 1}   "
          f"({'met' if ours_loads <= distinct + 1 else 'NOT met'})")
    print(f"wall / ideal: {over_ideal:.3f}   (target <= 1.15: {'met' if over_ideal <= 1.15 else 'NOT met'})")
    print(f"speed-up over naive: {speedup:.1f}x   (target >= 7x: {'met' if speedup >= 7 else 'NOT met'})")


if __name__ == "__main__":
    main()
