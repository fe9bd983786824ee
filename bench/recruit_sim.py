"""Recruiting quality on simulated pools with known per-skill accuracy, as two tables.

1. The market (issue 18): 10 cheap specialists (0.9 on their topics) and 6 generalists (0.55-0.70,
   10-50x the price), a keyword LLM that names each topic by one of three variants and sometimes
   only a distractor (``orchestra.testing.simulation.specialist_pool``). Profiles from 15
   validation items per topic; then each method answers a held-out set: accuracy, cost (and as a
   share of Mixture-of-Agents'), cost per correct answer, calls, the specialists' share of the
   expert calls, and the calls confident teams saved. "best routing" sends each item to its
   topic's two truly best experts and truly best aggregator (the same simulated answers decide).
2. Six equally good experts over eight skills (each strong on its own): routing by skill vs γ.

Averaged over seeds. Nothing here calls an LLM.

    python bench/recruit_sim.py [--seeds 3] [--per-skill 25] [--k 3]
"""

from __future__ import annotations

import argparse
import statistics

from orchestra import Orchestra, RecruitConfig
from orchestra.datasets import Dataset
from orchestra.grading import AutoGrader
from orchestra.profiling import build_profiles
from orchestra.result import RunResult
from orchestra.testing.simulation import SimulatedPool, simulated_pool, specialist_pool


def accuracy(orc: Orchestra, items: Dataset) -> float:
    results = orc.run_many([item.prompt() for item in items])
    grader = AutoGrader()
    return sum(grader.grade(r.answer or "", item) for r, item in zip(results, items)) / len(items)


def oracle_routed(sim: SimulatedPool, items: Dataset) -> float:
    """Route each item to the agent truly best at its skill; the same simulated answers decide."""
    grader = AutoGrader()
    hits = 0
    for item in items:
        best = max(sim.agents, key=lambda a: sim.accuracy[a][item.category or ""])
        hits += grader.grade(sim.answer(best, item.prompt()), item)
    return hits / len(items)


def market_row(results: list[RunResult], items: Dataset) -> dict[str, float]:
    grader = AutoGrader()
    correct = sum(grader.grade(r.answer or "", item) for r, item in zip(results, items))
    called = [o.agent for r in results for node in r.plan.nodes for o in node.expert_outputs]
    cost = sum(r.usage.cost_usd for r in results)
    return {"accuracy": correct / len(items), "cost": cost, "per correct": cost / correct if correct else 0.0,
            "calls": sum(r.usage.calls for r in results),
            "specialists": sum(a.startswith("spec") for a in called) / len(called) if called else 0.0,
            "saved": sum(node.saved_calls for r in results for node in r.plan.nodes)}


def market(seeds: int, per_skill: int, k: int) -> None:
    methods = {"calibrated (default, λ=0.05)": {}, "calibrated λ=0.2": {"recruit": {"cost_lambda": 0.2}},
               "calibrated λ=0": {"recruit": {"cost_lambda": 0.0}}, "symbolic-moe (exact)": {"mode": "symbolic-moe"},
               "moa (top-k by γ + synthesize)": {"mode": "global"}}
    rows: dict[str, list[dict[str, float]]] = {}
    for seed in range(seeds):
        sim = specialist_pool(seed=seed)
        pool = sim.pool()
        pool.profiles = build_profiles(pool, sim.items(15), seed=seed).profiles
        held_out = sim.items(per_skill, offset=1000)
        orc = Orchestra(pool, k=k, plan=False, store=False, seed=seed)
        for name, overrides in methods.items():
            rows.setdefault(name, []).append(market_row(orc.run_many([i.prompt() for i in held_out], **overrides),
                                                        held_out))
        rows.setdefault("best routing (topic's 2 best + best aggregator)", []).append(
            {"accuracy": sim.best_routing_accuracy(held_out)})
    moa = statistics.mean(r["cost"] for r in rows["moa (top-k by γ + synthesize)"])
    width = max(len(name) for name in rows) + 2
    print(f"market: 10 specialists + 6 generalists x 8 topics, {per_skill} held-out items per topic, "
          f"{seeds} seed(s), k={k}")
    print(f"{'method':<{width}}{'accuracy':>9}{'cost':>10}{'vs MoA':>8}{'per correct':>13}{'calls':>7}"
          f"{'specialist calls':>18}{'saved':>7}")
    for name, values in rows.items():
        mean = {key: statistics.mean(v[key] for v in values) for key in values[0]}
        if "cost" not in mean:
            print(f"{name:<{width}}{mean['accuracy']:>9.3f}")
            continue
        print(f"{name:<{width}}{mean['accuracy']:>9.3f}{mean['cost']:>10.4f}{mean['cost'] / moa:>7.2f}x"
              f"{mean['per correct']:>13.6f}{mean['calls']:>7.0f}{mean['specialists']:>17.0%}{mean['saved']:>7.0f}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--per-skill", type=int, default=25)
    parser.add_argument("--k", type=int, default=3)
    args = parser.parse_args()
    market(args.seeds, args.per_skill, args.k)

    rows: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        sim = simulated_pool(seed=seed)
        pool = sim.pool()
        pool.profiles = build_profiles(pool, sim.items(args.per_skill), seed=seed).profiles
        held_out = sim.items(args.per_skill, offset=1000)
        skills_only = RecruitConfig(competence_weight=0)
        methods = {
            f"calibrated k={args.k} + majority vote":
                Orchestra(pool, k=args.k, aggregate="vote", plan=False, store=False, seed=seed),
            f"symbolic-moe k={args.k} + majority vote (exact, s·γ)":
                Orchestra(pool, k=args.k, mode="symbolic-moe", aggregate="vote", plan=False, store=False, seed=seed),
            f"symbolic-moe k={args.k} + majority vote (skills only, β=0)":
                Orchestra(pool, k=args.k, mode="symbolic-moe", aggregate="vote", plan=False, store=False, seed=seed,
                          recruit=skills_only),
            "top-1 skill recruiting (β=0)":
                Orchestra(pool, k=1, mode="topk", aggregate="none", plan=False, store=False, recruit=skills_only),
            f"random-{args.k} + majority vote":
                Orchestra(pool, k=args.k, mode="random", aggregate="vote", plan=False, store=False, seed=seed),
            "best single agent (by measured γ)":
                Orchestra(pool, k=1, mode="global", aggregate="none", plan=False, store=False),
        }
        for name, orc in methods.items():
            rows.setdefault(name, []).append(accuracy(orc, held_out))
        rows.setdefault("per-skill oracle (routes by true accuracy)", []).append(oracle_routed(sim, held_out))
        rows.setdefault("expected: best single agent", []).append(
            max(sim.expected_accuracy(a, held_out) for a in sim.agents))
        rows.setdefault("expected: per-skill oracle", []).append(sim.oracle_accuracy(held_out))

    width = max(len(name) for name in rows) + 2
    print(f"simulated pool: 6 experts x 8 skills, {args.per_skill} items per skill, {args.seeds} seed(s)")
    print(f"{'method':<{width}}{'accuracy':>10}{'per seed':>30}")
    for name, values in rows.items():
        per_seed = " ".join(f"{v:.3f}" for v in values)
        print(f"{name:<{width}}{statistics.mean(values):>10.3f}{per_seed:>30}")


if __name__ == "__main__":
    main()
