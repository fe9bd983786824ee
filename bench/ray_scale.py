"""Engines as Ray actors: the batching workload on a local Ray instance with 1 and with 4 slots.

The workload is ``bench/batching.py``'s (its pool builder and its per-model work, reused): 16
simulated heavy engines, 100 instances, k = 3 experts each (Symbolic-MoE recruiting from skill
profiles), then an aggregator whose model also serves expert calls. Each engine runs in a Ray
actor asking for one ``slot`` (a custom resource; a local instance is started with 1, then with
4) and no CPU; loading sleeps L seconds and a batch of n requests ``per_batch + n * per_request``
inside the actor, so 4 slots really overlap on this 2-core machine.

The bound, for s slots: max(W / s, max_m w_m), where w_m is the least time model m must hold a
slot (one load, one batch per phase it serves, ``per_request`` per call: ``batching.model_work``)
and W their sum. It is a true lower bound for any schedule: an engine holds its slot while it
loads and generates, and a slot holds one engine at a time, so the slots together are busy at
least W seconds and the s of them need at least W / s; and one model's load and batches happen one
after another in its own actor, so no schedule ends before the longest w_m. Creating actors,
killing them and Orchestra's own CPU time are not in it; the aggregation batch waiting for the
last expert batch is not either (it could only raise the bound).

Targets: loads = distinct heavy models used; wall <= 1.2x the bound; the speed-up from the fewer
slots to the more at least 0.75x what the bounds allow (1 -> 4 slots, with 16 models: >= 3x).

    python bench/ray_scale.py [--slots 1 4] [--load 15] [--per-request 0.004] [--per-batch 0.02] [--repeat 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import ray
from batching import make_pool, model_work

from orchestra import Budget, Orchestra
from orchestra.models.placement import EngineResources


def run(slots: int, args: argparse.Namespace) -> tuple[list[float], int, float, int]:
    """Walls of ``args.repeat`` runs on a fresh local instance with ``slots`` slots, the loads of
    each run, the bound, and the distinct heavy models used."""
    ray.init(num_cpus=2, resources={"slot": slots}, include_dashboard=False, logging_level=logging.WARNING)
    try:
        options = {"load_s": args.load, "per_request": args.per_request, "per_batch": args.per_batch}
        pool = make_pool(args.models, options, args.seed, resources=EngineResources(num_cpus=0, custom={"slot": 1}))
        questions = [f"question {i}" for i in range(args.instances)]
        walls: list[float] = []
        loads: set[int] = set()
        for _ in range(args.repeat):  # a fresh Orchestra each time: no actor alive
            orc = Orchestra(pool, k=args.k, mode="symbolic-moe", store=False, seed=args.seed, executor="ray",
                            budget=Budget(max_calls=None, max_cost_usd=None, max_tokens=None))
            started = time.perf_counter()
            results = orc.run_many(questions)
            walls.append(time.perf_counter() - started)
            assert all(r.status == "done" for r in results), results[0].error
            loads.add(sum(orc.executor.stats.loads.values()))
            orc.close()
        assert len(loads) == 1, f"loads differ between runs: {loads}"
        experts = [list(r.node("answer").experts) for r in results]
        aggregator = orc.stages.staffing.aggregator.name
        work = model_work(experts, pool, aggregator, args.load, args.per_request, args.per_batch)
        return walls, loads.pop(), max(sum(work.values()) / slots, max(work.values())), len(work)
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, nargs=2, default=[1, 4], help="the two slot counts compared")
    parser.add_argument("--models", type=int, default=16)
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--load", type=float, default=15.0, help="seconds per model load")
    parser.add_argument("--per-request", type=float, default=0.004)
    parser.add_argument("--per-batch", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="runs per slot count (min and median reported)")
    args = parser.parse_args()
    if not 1 <= args.slots[0] < args.slots[1]:
        parser.error("--slots takes two counts of at least 1, the smaller first (1 4)")

    print(f"{args.models} models, {args.instances} instances, k={args.k}; load {args.load:g} s, "
          f"{args.per_request * 1000:g} ms/request + {args.per_batch * 1000:g} ms/batch; "
          f"each engine a Ray actor holding one slot; {args.repeat} runs per slot count")
    print(f"{'slots':>5}{'loads':>7}{'used':>6}{'min (s)':>10}{'median (s)':>12}{'bound (s)':>11}"
          f"{'min/bound':>11}{'median/bound':>14}")
    medians: dict[int, float] = {}
    mins: dict[int, float] = {}
    bounds: dict[int, float] = {}
    ok = True
    for slots in args.slots:
        walls, loads, bound, used = run(slots, args)
        mins[slots], medians[slots], bounds[slots] = min(walls), statistics.median(walls), bound
        print(f"{slots:>5}{loads:>7}{used:>6}{mins[slots]:>10.2f}{medians[slots]:>12.2f}{bound:>11.2f}"
              f"{mins[slots] / bound:>11.3f}{medians[slots] / bound:>14.3f}")
        ok &= loads == used and medians[slots] <= 1.2 * bound
    few, many = args.slots
    speedup_min, speedup_median = mins[few] / mins[many], medians[few] / medians[many]
    wanted = 0.75 * bounds[few] / bounds[many]  # (the bounds' ratio is the most more slots can give)
    ok &= speedup_median >= wanted
    print(f"speed-up {few} -> {many} slots: {speedup_min:.2f}x (min), {speedup_median:.2f}x (median); the bounds "
          f"allow {bounds[few] / bounds[many]:.2f}x")
    print(f"targets (loads = models used, median <= 1.2x bound, speed-up >= {wanted:.2f}x): "
          f"{'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
