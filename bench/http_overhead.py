"""HTTP throughput of OpenAICompatible vs the fastest Python clients, side by side, one loopback server.

N chat requests at concurrency C to a server in another process that answers each after D ms.
Each client is what a skilled user would write for this job:

    aiohttp     one ClientSession, a TCPConnector limited to C, a semaphore, asyncio.gather
    openai SDK  AsyncOpenAI (its own httpx client, max_retries=0), a semaphore, asyncio.gather
    httpx       one AsyncClient limited to C, a semaphore, asyncio.gather
    orchestra   OpenAICompatible(max_concurrency=C).complete(all requests)

Rounds alternate between clients (the machine is shared and noisy); each prints min, median and
max req/s. The ceiling C / D is what a client with no overhead would reach; the server's own
capacity is measured by aiohttp with C connections and no delay, so a rate near it says the server,
not the client, is the limit. Client and server share this machine's cores: a client that needs
more CPU per request also leaves the server less, so each client's CPU time per request (this
process's, the server being in another; Orchestra's includes making its ChatRequests) is printed
too: where the server is near its capacity,
the ratio of rates follows the ratio of those. Target: orchestra / aiohttp >= 0.9 at C = 64 and 256.

    python bench/http_overhead.py [--requests 3000] [--concurrency 64 256] [--delay 0.02] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx
import openai

from orchestra.models import ChatRequest, OpenAICompatible

Client = Callable[[str, int, int], Awaitable[float]]


def body(i: int) -> dict[str, object]:
    return {"model": "bench", "messages": [{"role": "user", "content": f"question {i}"}]}


async def timed(n: int, concurrency: int, one: Callable[[int], Awaitable[str]]) -> float:
    semaphore = asyncio.Semaphore(concurrency)

    async def limited(i: int) -> str:
        async with semaphore:
            return await one(i)

    started = time.perf_counter()
    answers = await asyncio.gather(*(limited(i) for i in range(n)))
    elapsed = time.perf_counter() - started
    assert len(answers) == n and all(answers)
    return n / elapsed


async def with_aiohttp(url: str, n: int, concurrency: int) -> float:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(i: int) -> str:
            async with session.post(url + "/v1/chat/completions", json=body(i)) as response:
                response.raise_for_status()
                return str((await response.json())["choices"][0]["message"]["content"])

        return await timed(n, concurrency, one)


async def with_openai_sdk(url: str, n: int, concurrency: int) -> float:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
        async def one(i: int) -> str:
            completion = await client.chat.completions.create(model="bench", messages=[  # type: ignore[list-item]
                {"role": "user", "content": f"question {i}"}])
            return completion.choices[0].message.content or ""

        return await timed(n, concurrency, one)


async def with_httpx(url: str, n: int, concurrency: int) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        async def one(i: int) -> str:
            response = await client.post(url + "/v1/chat/completions", json=body(i))
            response.raise_for_status()
            return str(response.json()["choices"][0]["message"]["content"])

        return await timed(n, concurrency, one)


async def with_orchestra(url: str, n: int, concurrency: int) -> float:
    async with OpenAICompatible(model="bench", base_url=url + "/v1", max_concurrency=concurrency) as model:
        requests = [ChatRequest.user(f"question {i}") for i in range(n)]
        started = time.perf_counter()
        results = await model.complete(requests)
        elapsed = time.perf_counter() - started
    assert len(results) == n and all(r.text for r in results)
    return n / elapsed


CLIENTS: dict[str, Client] = {"aiohttp": with_aiohttp, "openai SDK": with_openai_sdk, "httpx": with_httpx,
                              "orchestra": with_orchestra}


def serve(delay: float) -> tuple[subprocess.Popen[str], str]:
    server = subprocess.Popen([sys.executable, "-m", "orchestra.testing", "--delay", str(delay)],
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    return server, server.stdout.readline().strip()


def measure(args: argparse.Namespace, concurrency: int,
            cpu_per_request: dict[str, list[float]]) -> dict[str, list[float]]:
    """Each client's req/s, round by round; ``cpu_per_request`` gets its CPU µs per request (this
    process's: the client's, the server's being in another)."""
    server, url = serve(args.delay)
    try:
        for client in CLIENTS.values():  # warm-up: imports, connection set-up paths
            asyncio.run(client(url, 200, concurrency))
        rates: dict[str, list[float]] = {name: [] for name in CLIENTS}
        for _ in range(args.rounds):
            for name, client in CLIENTS.items():
                cpu = time.process_time()
                rates[name].append(asyncio.run(client(url, args.requests, concurrency)))
                cpu_per_request[name].append((time.process_time() - cpu) / args.requests * 1e6)
        return rates
    finally:
        server.terminate()
        server.wait()


def server_capacity(args: argparse.Namespace, concurrency: int) -> float:
    """What the server answers at most with this many connections: aiohttp with no server delay."""
    server, url = serve(0.0)
    try:
        return max(asyncio.run(with_aiohttp(url, args.requests, concurrency)) for _ in range(2))
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for concurrency in args.concurrency:
        cpu: dict[str, list[float]] = {name: [] for name in CLIENTS}
        rates = measure(args, concurrency, cpu)
        capacity = server_capacity(args, concurrency)
        print(f"\n{args.requests} requests, concurrency {concurrency}, server delay {args.delay * 1000:.0f} ms: "
              f"ceiling {concurrency / args.delay:.0f} req/s, server capacity {capacity:.0f} req/s")
        print(f"  {'client':<11} {'min':>8} {'median':>8} {'max':>8}  req/s   client CPU µs/request (min, median)")
        for name, values in rates.items():
            print(f"  {name:<11} {min(values):8.0f} {statistics.median(values):8.0f} {max(values):8.0f}"
                  f"        {min(cpu[name]):6.0f} {statistics.median(cpu[name]):6.0f}")
        ratio = statistics.median(rates["orchestra"]) / statistics.median(rates["aiohttp"])
        best = max(statistics.median(v) for v in rates.values())
        bound = "  (the server is near its limit: a higher ratio could not show)" if best > 0.9 * capacity else ""
        print(f"  orchestra / aiohttp (medians): {ratio:.2f}   target >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'}"
              f"{bound}")


if __name__ == "__main__":
    main()
