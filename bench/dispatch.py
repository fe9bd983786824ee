"""Remote dispatch: Orchestra's ``arun_many`` vs a per-question asyncio pipeline, on loopback endpoints.

The workload of issue 14: 300 questions, k = 3 experts recruited per question (Symbolic-MoE, from
skill profiles), ``synthesize`` aggregation; 6 expert models and a keyword model, each on its own
HTTP endpoint (``OpenAICompatible``, ``max_concurrency`` 16). Per question: 5 keyword calls, then
3 expert calls, then 1 aggregation: 2,700 calls.

    (a) pipeline: what a skilled user writes by hand, one coroutine per question
        (keywords -> its k experts -> the aggregator), all questions gathered, through the same
        model objects (so the same endpoints, limits and HTTP client) making the identical calls:
        the requests Orchestra made for that question (captured from its ``CallDone`` events)
    (b) orchestra: ``arun_many`` on one executor
    (c) bound: max over endpoints of (sum of the latencies it served / max_concurrency): no
        schedule can finish before its busiest endpoint has served its calls

Scenarios: constant latency; lognormal latency (median = the constant) with 5% of requests at
2-3 s; the constant one again with the keyword endpoint at concurrency 80. The servers run in a
child process (so they do not share this process's CPU) and pick each request's latency from a
hash of its body, so both sides see the same latency for the same call; the calls each side made
are counted at the server and must be equal per endpoint. The rare-expert filter is off
(``rare_filter=False``): it recruits a data set's questions together before any expert runs, a
barrier a per-question pipeline cannot have, so with it on the two would not make the same calls.

Latencies are scaled by ``--scale`` (default 0.25: 300 ms -> 75 ms, the tail's 2-3 s -> 0.5-0.75 s)
to keep the run short; at much lower latencies this 2-core machine's CPU, not the endpoints, becomes
the bottleneck of both sides. Each side runs ``--repeat`` times, alternating; min and median reported.
Targets: orchestra <= 1.05x the pipeline and <= 1.15x the bound.

    python bench/dispatch.py [--questions 300] [--scale 0.25] [--repeat 3] [--scenarios constant,tail,keywords80]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import subprocess
import sys
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field

import httpx

from orchestra import Agent, Budget, Orchestra, Pool
from orchestra.events import CallDone, Event
from orchestra.models import ChatRequest, OpenAICompatible
from orchestra.profile import Provenance, SkillProfile

SKILLS = [f"skill{i}" for i in range(8)]
EXPERTS = [f"expert{i}" for i in range(6)]
KEYWORDS = "keywords"
ENDPOINTS = [KEYWORDS, *EXPERTS]
LATENCY = 0.3  # seconds, before scaling
TAIL_SHARE, TAIL = 0.05, (2.0, 3.0)


def latency(body: bytes, mode: str, scale: float) -> float:
    """The seconds a request waits at the server: a function of its body, so replays wait the same."""
    if mode == "constant":
        return LATENCY * scale
    rng = random.Random(zlib.crc32(body))
    if rng.random() < TAIL_SHARE:
        return rng.uniform(*TAIL) * scale
    return rng.lognormvariate(math.log(LATENCY), 0.35) * scale


# --- the servers (child process) -----------------------------------------------------------------


def serve(mode: str, scale: float) -> None:
    """Serve every endpoint until stdin closes; print their URLs as one JSON line first."""
    from orchestra.testing import LoopbackRequest, LoopbackServer, Reply, openai_reply

    servers: dict[str, LoopbackServer] = {}

    def handler(name: str):  # type: ignore[no-untyped-def]
        stats = {"requests": 0, "latency_s": 0.0}

        def handle(request: LoopbackRequest) -> Reply:
            server = servers[name]
            if request.path == "/stats":
                server.requests.clear()
                return Reply(body={**stats, "peak_in_flight": server.peak_in_flight})
            if request.path == "/reset":
                stats.update(requests=0, latency_s=0.0)
                server.requests.clear()
                server.peak_in_flight = 0
                return Reply(body={})
            delay = latency(request.body, mode, scale)
            stats["requests"] += 1
            stats["latency_s"] += delay
            if name == KEYWORDS:
                question = request.prompt.rsplit("Question:", 1)[-1].strip()
                text = json.dumps({"keywords": [SKILLS[zlib.crc32(question.encode()) % len(SKILLS)]]})
            else:
                text = f"{name}: reasoning... The answer is 1"
            reply = openai_reply(text, prompt_tokens=100)
            reply.delay = delay
            return reply

        return handle

    for name in ENDPOINTS:
        servers[name] = LoopbackServer(handler(name)).start()
    print(json.dumps({name: server.url for name, server in servers.items()}), flush=True)
    sys.stdin.read()
    for server in servers.values():
        server.stop()


@dataclass
class Servers:
    """The child process serving every endpoint."""

    mode: str
    scale: float
    urls: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[str] | None = None

    def __enter__(self) -> Servers:
        self.process = subprocess.Popen([sys.executable, __file__, "--serve", self.mode, "--scale", str(self.scale)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.urls = json.loads(self.process.stdout.readline())  # type: ignore[union-attr]
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.stdin.close()  # type: ignore[union-attr]
        self.process.wait(timeout=30)

    def stats(self) -> dict[str, dict[str, float]]:
        """Per endpoint: requests served, their summed latency, the most in flight at once; then reset."""
        with httpx.Client() as client:
            stats = {name: client.get(url + "/stats").json() for name, url in self.urls.items()}
            for url in self.urls.values():
                client.get(url + "/reset")
        return stats


# --- the pool ------------------------------------------------------------------------------------


def make_pool(urls: dict[str, str], keyword_concurrency: int, seed: int) -> Pool:
    """6 experts with skill profiles (each its own random order of the skills; expert0 aggregates
    best) and the keyword model."""
    rng = random.Random(seed)
    ranks = {name: rng.sample(range(len(SKILLS)), len(SKILLS)) for name in EXPERTS}  # a different forte each
    models = {name: OpenAICompatible(model=name, base_url=urls[name] + "/v1",
                                     max_concurrency=keyword_concurrency if name == KEYWORDS else 16)
              for name in ENDPOINTS}
    agents = [Agent(name=name, model=models[name]) for name in EXPERTS]
    provenance = Provenance(dataset="simulated", dataset_sha256="0" * 64, items=100, model="simulated")
    profiles = {a.name: SkillProfile(agent=a.name, skills={s: 10 - 2 * ranks[a.name][j] for j, s in enumerate(SKILLS)},
                                     accuracy=0.5,
                                     aggregation_score=0.9 if i == 0 else 0.5, provenance=provenance)
                for i, a in enumerate(agents)}
    return Pool(agents=agents, profiles=profiles, planner=models[KEYWORDS])


# --- the two sides -------------------------------------------------------------------------------


@dataclass
class Question:
    """The calls Orchestra made for one question, by phase: (model, request) pairs."""

    keywords: list[tuple[OpenAICompatible, ChatRequest]] = field(default_factory=list)
    experts: list[tuple[OpenAICompatible, ChatRequest]] = field(default_factory=list)
    aggregate: list[tuple[OpenAICompatible, ChatRequest]] = field(default_factory=list)


async def orchestra(orc: Orchestra, questions: list[str]) -> float:
    started = time.perf_counter()
    results = await orc.arun_many(questions, rare_filter=False)
    elapsed = time.perf_counter() - started
    assert all(r.status == "done" for r in results), next(r.error for r in results if r.status != "done")
    return elapsed


async def pipeline(calls: list[Question]) -> float:
    """Per question: its keyword calls, then its experts, then its aggregation; all questions at once."""

    async def one(question: Question) -> str:
        await asyncio.gather(*(model.complete_one(request) for model, request in question.keywords))
        await asyncio.gather(*(model.complete_one(request) for model, request in question.experts))
        [(model, request)] = question.aggregate
        return (await model.complete_one(request)).text

    started = time.perf_counter()
    await asyncio.gather(*(one(question) for question in calls))
    return time.perf_counter() - started


async def capture(orc: Orchestra, pool: Pool, questions: list[str]) -> list[Question]:
    """Run Orchestra once (a warm-up too) and keep the calls it made, per question and phase."""
    by_name = {m.name: m for m in pool.models}
    seen: dict[str, Question] = defaultdict(Question)

    def record(event: Event) -> None:
        if isinstance(event, CallDone):
            phase = {"keywords": "keywords", "expert": "experts", "aggregate": "aggregate"}[event.purpose]
            getattr(seen[event.run_id], phase).append((by_name[event.model], event.request))

    unsubscribe = orc.events.subscribe(record)
    try:
        results = await orc.arun_many(questions, rare_filter=False)
    finally:
        unsubscribe()
    calls = [seen[r.run_id] for r in results]
    assert all(len(q.keywords) == 5 and len(q.experts) == 3 and len(q.aggregate) == 1 for q in calls)
    return calls


def scenario(name: str, mode: str, keyword_concurrency: int, args: argparse.Namespace) -> None:
    questions = [f"Question {i}: what follows from fact {i * 7 % 97}?" for i in range(args.questions)]
    with Servers(mode, args.scale) as servers:
        pool = make_pool(servers.urls, keyword_concurrency, args.seed)
        orc = Orchestra(pool, k=3, mode="symbolic-moe", aggregate="synthesize", store=False, seed=args.seed,
                        budget=Budget(max_calls=None, max_cost_usd=None, max_tokens=None))

        async def main() -> tuple[list[float], list[float], dict[str, dict[str, float]]]:
            calls = await capture(orc, pool, questions)
            servers.stats()
            times: dict[str, list[float]] = {"pipeline": [], "orchestra": []}
            counted: dict[str, dict[str, float]] = {}
            for _ in range(args.repeat):
                for side in ("pipeline", "orchestra"):
                    elapsed = await (pipeline(calls) if side == "pipeline" else orchestra(orc, questions))
                    times[side].append(elapsed)
                    stats = servers.stats()
                    counted.setdefault(side, stats)
                    assert {n: s["requests"] for n, s in stats.items()} == \
                           {n: s["requests"] for n, s in counted[side].items()}, "a side's calls changed"
            assert {n: s["requests"] for n, s in counted["pipeline"].items()} == \
                   {n: s["requests"] for n, s in counted["orchestra"].items()}, "the sides made different calls"
            await orc.aclose()
            return times["pipeline"], times["orchestra"], counted["orchestra"]

        ours_pipeline, ours, stats = asyncio.run(main())
    limits = {name: keyword_concurrency if name == KEYWORDS else 16 for name in ENDPOINTS}
    bound = max(s["latency_s"] / limits[name] for name, s in stats.items())
    busiest = max(stats, key=lambda name: stats[name]["latency_s"] / limits[name])
    calls = {name: int(s["requests"]) for name, s in stats.items()}
    print(f"\n== {name}: {mode} latency, keyword endpoint at concurrency {keyword_concurrency}")
    print("calls per endpoint (equal on both sides, counted at the server): "
          + ", ".join(f"{n} {c}" for n, c in calls.items()) + f"; total {sum(calls.values())}")
    print("peak in flight: " + ", ".join(f"{n} {int(s['peak_in_flight'])}" for n, s in stats.items()))
    print(f"{'':22}{'min (s)':>10}{'median (s)':>12}")
    for label, times in (("(a) pipeline", ours_pipeline), ("(b) orchestra", ours)):
        print(f"{label:22}{min(times):>10.3f}{statistics.median(times):>12.3f}")
    print(f"{'(c) bound':22}{bound:>10.3f}{'':>12}   (busiest endpoint: {busiest})")
    for stat, pick in (("min", min), ("median", statistics.median)):
        vs_pipeline, vs_bound = pick(ours) / pick(ours_pipeline), pick(ours) / bound
        print(f"{stat:>6}: orchestra / pipeline {vs_pipeline:.3f} (target <= 1.05: "
              f"{'met' if vs_pipeline <= 1.05 else 'NOT met'});  orchestra / bound {vs_bound:.3f} "
              f"(target <= 1.15: {'met' if vs_bound <= 1.15 else 'NOT met'});  pipeline / bound "
              f"{pick(ours_pipeline) / bound:.3f}")


SCENARIOS = {"constant": ("constant", 16), "tail": ("tail", 16), "keywords80": ("constant", 80)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--scale", type=float, default=0.25, help="latency scale (1: 300 ms, the tail 2-3 s)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenarios", default="constant,tail,keywords80")
    parser.add_argument("--serve", choices=["constant", "tail"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.scale)
        return
    print(f"{args.questions} questions, k=3, synthesize; 6 experts + a keyword model, each its own loopback "
          f"endpoint; latency x{args.scale} (constant {LATENCY * args.scale * 1000:.0f} ms; tail: lognormal "
          f"median {LATENCY * args.scale * 1000:.0f} ms, {TAIL_SHARE:.0%} at {TAIL[0] * args.scale:.2f}-"
          f"{TAIL[1] * args.scale:.2f} s); {args.repeat} runs per side, alternating")
    for name in args.scenarios.split(","):
        scenario(name, *SCENARIOS[name], args)


if __name__ == "__main__":
    main()
