"""Throughput of OpenAICompatible vs bare httpx against one loopback server, side by side.

2,000 chat requests at concurrency 64 to a server (another process) that answers after 20 ms.
Target: ours / bare >= 0.9.

    python bench/http_overhead.py [--requests 2000] [--concurrency 64] [--delay 0.02]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

import httpx

from orchestra.models import ChatRequest, OpenAICompatible


async def bare(url: str, n: int, concurrency: int) -> float:
    """The naive way: one AsyncClient, a semaphore, asyncio.gather."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        semaphore = asyncio.Semaphore(concurrency)

        async def one(i: int) -> str:
            async with semaphore:
                response = await client.post(url + "/v1/chat/completions", json={
                    "model": "bench", "messages": [{"role": "user", "content": f"question {i}"}]})
                response.raise_for_status()
                return response.json()["choices"][0]["message"]["content"]

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - started)


async def ours(url: str, n: int, concurrency: int) -> float:
    """Orchestra's model layer: one batch through OpenAICompatible."""
    model = OpenAICompatible(model="bench", base_url=url + "/v1", max_concurrency=concurrency)
    requests = [ChatRequest.user(f"question {i}") for i in range(n)]
    started = time.perf_counter()
    results = await model.complete(requests)
    elapsed = time.perf_counter() - started
    assert len(results) == n
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each is kept")
    args = parser.parse_args()

    server = subprocess.Popen([sys.executable, "-m", "orchestra.testing", "--delay", str(args.delay)],
                              stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()  # type: ignore[union-attr]
        asyncio.run(bare(url, 200, args.concurrency))  # warm-up
        best_bare = best_ours = 0.0
        for _ in range(args.rounds):
            best_bare = max(best_bare, asyncio.run(bare(url, args.requests, args.concurrency)))
            best_ours = max(best_ours, asyncio.run(ours(url, args.requests, args.concurrency)))
    finally:
        server.terminate()
        server.wait()

    ideal = args.concurrency / args.delay
    print(f"{args.requests} requests, concurrency {args.concurrency}, server delay {args.delay * 1000:.0f} ms "
          f"(ceiling {ideal:.0f} req/s)")
    print(f"bare httpx + gather + semaphore : {best_bare:8.1f} req/s")
    print(f"orchestra OpenAICompatible      : {best_ours:8.1f} req/s")
    ratio = best_ours / best_bare
    print(f"ratio ours / bare               : {ratio:8.3f}   (target >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'})")


if __name__ == "__main__":
    main()
