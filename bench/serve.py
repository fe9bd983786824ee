"""``orchestra serve`` under 64 concurrent clients vs the same work through ``arun_many`` in process.

The workload of ``bench/dispatch.py`` (6 expert endpoints at concurrency 16 and a keyword endpoint
at 80, in a child process, each answering after a fixed latency; per question 5 keyword calls,
3 experts, 1 aggregation), asked two ways:

    (a) in process: ``Orchestra.arun_many(questions, window=64)``, the runs recorded in a store:
        what a Python user with the same concurrency writes
    (b) served: ``orchestra serve`` in its own process (the same pool and settings, its own store),
        64 clients in this process, each a coroutine asking its share of the questions one after
        the other (``plan: false``, as ``arun_many`` does not plan) over one aiohttp session, the
        fastest Python client we measured (``bench/http_overhead.py``): the official ``openai``
        SDK spends about 4 ms of CPU per request parsing, which on 2 cores would be measured
        instead of the server

Both sides make the identical calls (counted at the endpoints, equal per endpoint). Wall time is
from the first question to the last answer; per-request latency is what each client waited (a) or
each run took (b). Each side runs ``--repeat`` times, alternating; min and median reported.
Target: served <= 1.15x in process.

    python bench/serve.py [--questions 512] [--clients 64] [--scale 0.25] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from dispatch import LATENCY, Servers, make_pool

from orchestra import Budget, Orchestra

#: the keyword endpoint's limit: 5 keyword calls per question would make it the bottleneck at 16
KEYWORD_CONCURRENCY = 80

SETTINGS = {"k": 3, "mode": "symbolic-moe", "aggregate": "synthesize",
            "budget": {"max_calls": None, "max_cost_usd": None, "max_tokens": None}}


def run_server(urls: str, seed: int, store: str) -> None:
    """The served side's process: the bench's pool behind ``orchestra serve`` on a free port."""
    from orchestra.serve import app, run

    pool = make_pool(json.loads(urls), KEYWORD_CONCURRENCY, seed)
    run(app(pool, {**SETTINGS, "seed": seed}, store=store), port=0, grace=5)


def percentiles(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return f"p50 {pick(0.5) * 1000:.0f} ms, p90 {pick(0.9) * 1000:.0f} ms, p99 {pick(0.99) * 1000:.0f} ms"


async def served(url: str, questions: list[str], clients: int) -> tuple[float, list[float]]:
    """``clients`` coroutines, each asking its share of the questions in turn."""
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:

        async def one_client(mine: list[str]) -> None:
            for question in mine:
                started = time.perf_counter()
                body = {"model": "orchestra", "messages": [{"role": "user", "content": question}], "plan": False}
                async with session.post(url + "/v1/chat/completions", json=body) as response:
                    answer = await response.json()
                latencies.append(time.perf_counter() - started)
                assert response.status == 200 and answer["choices"][0]["message"]["content"], answer

        started = time.perf_counter()
        await asyncio.gather(*(one_client(questions[i::clients]) for i in range(clients)))
        elapsed = time.perf_counter() - started
    return elapsed, latencies


async def in_process(orc: Orchestra, questions: list[str], clients: int) -> tuple[float, list[float]]:
    started = time.perf_counter()
    results = await orc.arun_many(questions, window=clients, rare_filter=False)
    elapsed = time.perf_counter() - started
    assert all(r.status == "done" for r in results), next(r.error for r in results if r.status != "done")
    return elapsed, [r.elapsed_s for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=512)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--scale", type=float, default=0.25, help="latency scale (1: 300 ms per call)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.server:
        run_server(args.server, args.seed, args.store)
        return
    questions = [f"Question {i}: what follows from fact {i * 7 % 97}?" for i in range(args.questions)]
    print(f"{args.questions} questions from {args.clients} concurrent clients; k=3, synthesize; 6 experts + a "
          f"keyword model on loopback endpoints at {LATENCY * args.scale * 1000:.0f} ms; {args.repeat} runs per side")
    with Servers("constant", args.scale) as endpoints, tempfile.TemporaryDirectory() as home:
        process = subprocess.Popen([sys.executable, __file__, "--server", json.dumps(endpoints.urls),
                                    "--seed", str(args.seed), "--store", str(Path(home) / "served.db")],
                                   stdout=subprocess.PIPE, text=True)
        banner = process.stdout.readline()  # type: ignore[union-attr]
        url = banner.split(" ")[2].removesuffix("/v1")
        pool = make_pool(endpoints.urls, KEYWORD_CONCURRENCY, args.seed)
        orc = Orchestra(pool, {**SETTINGS, "budget": Budget(max_calls=None, max_cost_usd=None, max_tokens=None)},
                        seed=args.seed, store=Path(home) / "in-process.db")

        async def measure() -> dict[str, list[tuple[float, list[float]]]]:
            await served(url, questions[:args.clients], args.clients)  # warm both up
            await in_process(orc, questions[:args.clients], args.clients)
            endpoints.stats()
            runs: dict[str, list[tuple[float, list[float]]]] = {"in process": [], "served": []}
            counted: dict[str, dict[str, float]] = {}
            for _ in range(args.repeat):
                for side in runs:
                    run = served(url, questions, args.clients) if side == "served" else in_process(
                        orc, questions, args.clients)
                    runs[side].append(await run)
                    counts = {name: s["requests"] for name, s in endpoints.stats().items()}
                    assert counted.setdefault(side, counts) == counts, "a side's calls changed"
            assert counted["served"] == counted["in process"], "the sides made different calls"
            print("calls per endpoint (equal on both sides, counted at the endpoints): "
                  + ", ".join(f"{n} {int(c)}" for n, c in counted["served"].items()))
            await orc.aclose()
            return runs

        try:
            runs = asyncio.run(measure())
        finally:
            process.terminate()
            process.wait(timeout=30)
    print(f"{'':14}{'min (s)':>9}{'median (s)':>12}   per request (all runs)")
    for side, measured in runs.items():
        walls = [wall for wall, _ in measured]
        latencies = [latency for _, each in measured for latency in each]
        print(f"{side:14}{min(walls):>9.3f}{statistics.median(walls):>12.3f}   {percentiles(latencies)}")
    for stat, pick in (("min", min), ("median", statistics.median)):
        ratio = pick([w for w, _ in runs["served"]]) / pick([w for w, _ in runs["in process"]])
        print(f"{stat:>6}: served / in process {ratio:.3f} (target <= 1.15: {'met' if ratio <= 1.15 else 'NOT met'})")


if __name__ == "__main__":
    main()
