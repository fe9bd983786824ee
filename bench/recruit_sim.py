"""Recruiting quality on a simulated pool with known per-skill accuracy, as one table.

Six simulated experts, eight skills: each expert is strong (0.9) on its own skill(s) and mediocre
elsewhere, all equally good on average. Profiles are measured on a validation set, then every
method answers a held-out set; accuracies are averaged over seeds. Nothing here calls an LLM.

    python bench/recruit_sim.py [--seeds 3] [--per-skill 25] [--k 3]
"""

from __future__ import annotations

import argparse
import statistics

from orchestra import Orchestra, RecruitConfig
from orchestra.datasets import Dataset
from orchestra.grading import AutoGrader
from orchestra.profiling import build_profiles
from orchestra.testing.simulation import SimulatedPool, simulated_pool


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--per-skill", type=int, default=25)
    parser.add_argument("--k", type=int, default=3)
    args = parser.parse_args()

    rows: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        sim = simulated_pool(seed=seed)
        pool = sim.pool()
        pool.profiles = build_profiles(pool, sim.items(args.per_skill), seed=seed).profiles
        held_out = sim.items(args.per_skill, offset=1000)
        skills_only = RecruitConfig(competence_weight=0)
        methods = {
            f"symbolic-moe k={args.k} + majority vote (exact, s·γ)":
                Orchestra(pool, k=args.k, aggregate="vote", plan=False, store=False, seed=seed),
            f"symbolic-moe k={args.k} + majority vote (skills only, β=0)":
                Orchestra(pool, k=args.k, aggregate="vote", plan=False, store=False, seed=seed, recruit=skills_only),
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
