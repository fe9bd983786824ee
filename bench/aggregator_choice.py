"""Choosing the aggregator on evidence, on simulated pools with known aggregation skill.

Two measurements, nothing calls an LLM:

1. Does profiling find the truly best aggregator? Six simulated experts whose aggregation skill
   (the chance to pick the right answer out of three disagreeing ones) is 0.45, 0.52, ... 0.80,
   0.07 apart, in a seeded order. Each pool is profiled with a 30-item aggregation benchmark (the
   old default) and with every usable item (the new one); the table counts how often the chosen
   aggregator is the truly best, its mean rank, and the aggregation skill lost against the best.
   Two rules: the best score alone, and the best score with near-ties (within one standard
   error) broken by global competence (Orchestra's rule). Two kinds of pool: global competence
   unrelated to aggregation skill (all experts equally accurate on average: γ is noise, the worst
   case for the tie-break), and γ that tracks it (the better an aggregator, the more accurate the
   expert: +0.02 on every skill per rank).

2. Global best aggregator vs per-node aggregator recruiting, on held-out items: the same pools,
   with aggregation skill on each topic ``(1 - w) · level + w · accuracy on the topic`` (w = 0:
   aggregation does not depend on the topic; w > 0: an aggregator that knows the topic does
   better). Accuracy of ``aggregator_choice="best"`` vs ``"per-node"``, and how often each node's
   aggregator is the truly best one on that node's topic.

    python bench/aggregator_choice.py [--seeds 100] [--per-skill 25] [--accuracy-seeds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

from orchestra import Orchestra
from orchestra.datasets import Dataset
from orchestra.grading import AutoGrader
from orchestra.profile import SkillProfile
from orchestra.profiling import build_profiles
from orchestra.recruit import choose_aggregator
from orchestra.result import RunResult
from orchestra.testing.simulation import SimulatedPool, simulated_pool

LEVELS = [round(0.45 + 0.07 * i, 2) for i in range(6)]


def pick(profiles: dict[str, SkillProfile], margin: float | None) -> str:
    competence = {name: p.competence for name, p in profiles.items()}
    return choose_aggregator(profiles, competence, list(profiles), margin=margin)


def competence_tracks_aggregation(sim: SimulatedPool, step: float = 0.02) -> SimulatedPool:
    """The same pool with each expert ``step`` more accurate on every skill per aggregation rank."""
    order = sorted(sim.agents, key=lambda a: sim.aggregation[a])
    accuracy = {a: {s: min(0.95, v + step * order.index(a)) for s, v in table.items()}
                for a, table in sim.accuracy.items()}
    return dataclasses.replace(sim, accuracy=accuracy)


def selection(seeds: int, per_skill: int) -> None:
    rules = {"best score only": 0.0, "near-ties (1 s.e.) by γ": None}
    rows: dict[tuple[str, str, str], list[tuple[bool, int, float]]] = {}
    usable: list[int] = []
    for seed in range(seeds):
        base = simulated_pool(seed=seed, aggregation_levels=LEVELS)
        for kind, sim in (("γ unrelated", base), ("γ tracks it", competence_tracks_aggregation(base))):
            ranking = sorted(sim.agents, key=lambda a: -sim.aggregation[a])
            pool = sim.pool()
            for label, limit in (("30", 30), ("all", None)):
                report = build_profiles(pool, sim.items(per_skill), seed=seed, aggregation_items=limit)
                if limit is None:
                    usable.append(report.aggregation_items)
                for rule, margin in rules.items():
                    chosen = pick(report.profiles, margin)
                    lost = sim.aggregation[ranking[0]] - sim.aggregation[chosen]
                    rows.setdefault((kind, label, rule), []).append(
                        (chosen == ranking[0], ranking.index(chosen) + 1, lost))
    print(f"1. profiled aggregator vs the truly best: {seeds} pools of each kind, aggregation skill "
          f"{LEVELS[0]}..{LEVELS[-1]} 0.07 apart, {per_skill} items per skill "
          f"(usable aggregation items: {min(usable)}-{max(usable)})")
    print(f"{'pool':<13}{'benchmark items':<17}{'rule':<26}{'picks the best':>15}{'mean rank':>11}{'skill lost':>12}")
    for (kind, label, rule), values in rows.items():
        hits = sum(v[0] for v in values)
        print(f"{kind:<13}{label:<17}{rule:<26}{f'{hits}/{len(values)}':>15}"
              f"{statistics.mean(v[1] for v in values):>11.2f}{statistics.mean(v[2] for v in values):>12.3f}")


def graded(results: list[RunResult], items: Dataset) -> float:
    grader = AutoGrader()
    return sum(grader.grade(r.answer or "", item) for r, item in zip(results, items)) / len(items)


def node_hits(sim: SimulatedPool, results: list[RunResult], items: Dataset) -> tuple[int, int]:
    """(nodes whose aggregator is the truly best on the node's topic, nodes with an aggregator)."""
    hits = total = 0
    for result, item in zip(results, items):
        for node in result.plan.nodes:
            if node.aggregator:
                total += 1
                hits += node.aggregator == sim.best_aggregator(item.category)
    return hits, total


def accuracy(seeds: int, per_skill: int, k: int) -> None:
    print()
    print(f"2. accuracy on held-out items ({per_skill} per skill), global best vs per-node aggregator, "
          f"aggregate=synthesize, k={k}, {seeds} pools")
    print(f"{'topical w':<11}{'recruiting':<15}{'aggregator':<11}{'accuracy':>10}{'node agg. = truly best':>24}"
          f"{'per seed':>40}")
    for w in (0.0, 0.5, 1.0):
        table: dict[tuple[str, str], list[float]] = {}
        hits: dict[tuple[str, str], list[int]] = {}
        for seed in range(seeds):
            sim = simulated_pool(seed=seed, aggregation_levels=LEVELS, topical_aggregation=w)
            pool = sim.pool()
            pool.profiles = build_profiles(pool, sim.items(per_skill), seed=seed).profiles
            held_out = sim.items(per_skill, offset=1000)
            for mode in ("symbolic-moe", "topk"):
                for choice in ("best", "per-node"):
                    orc = Orchestra(pool, k=k, mode=mode, aggregate="synthesize", plan=False, store=False,
                                    seed=seed, aggregator_choice=choice)
                    results = orc.run_many([item.prompt() for item in held_out])
                    table.setdefault((mode, choice), []).append(graded(results, held_out))
                    h, t = node_hits(sim, results, held_out)
                    hits.setdefault((mode, choice), []).extend((h, t))
        for (mode, choice), values in table.items():
            counts = hits[(mode, choice)]
            h, t = sum(counts[0::2]), sum(counts[1::2])
            share = f"{h / t:.3f} ({t} nodes)" if t else "-"
            per_seed = " ".join(f"{v:.3f}" for v in values)
            print(f"{w:<11g}{mode:<15}{choice:<11}{statistics.mean(values):>10.3f}{share:>24}{per_seed:>40}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=100, help="pools of each kind for the selection table")
    parser.add_argument("--accuracy-seeds", type=int, default=5, help="pools for the accuracy table")
    parser.add_argument("--per-skill", type=int, default=25)
    parser.add_argument("--k", type=int, default=3)
    args = parser.parse_args()
    selection(args.seeds, args.per_skill)
    accuracy(args.accuracy_seeds, args.per_skill, args.k)


if __name__ == "__main__":
    main()
