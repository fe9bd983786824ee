"""Cost per instance as data sets grow: ms/instance and peak RSS at 1,000, 10,000 and 100,000 instances.

The workload is a data-set run with zero-latency models (``FunctionModel`` doubles that answer at
once), so what is measured is Orchestra itself: per instance, 5 keyword samples, k = 3 experts drawn
by Symbolic-MoE recruiting (with the rare-expert filter), one synthesis, no planning; 4 experts on
4 models plus a keyword model. Instances stream through ``Orchestra.arun_iter`` with the default
window; the caller keeps only a count of the results (a ``run_many`` caller keeps every result, so
its memory grows with N by the size of the results themselves: ``--api run_many`` measures that).

Each N runs in a fresh subprocess, so peak RSS (``ru_maxrss``) belongs to that N alone; ``base``
is the RSS after imports and set-up, before the first instance. The doubles record every request
for tests to read; the child clears those logs as it goes, so they do not count as Orchestra's.

Targets: ms/instance at 100,000 within 1.10x of 1,000; peak RSS independent of N beyond the
window. Store on vs off is printed too (issue 14, part 5: store-on <= 1.25x store-off): the two
alternate, run by run, and the ratio of each side-by-side pair is reported with the ratios of the
minimums and medians.

    python bench/scale.py [--max-n 10000] [--repeats 3] [--store off|on|both] [--window 1000] [--api iter|run_many]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIZES = (1_000, 10_000, 100_000)


def rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(n: int, store: bool, window: int, api: str) -> dict[str, Any]:
    """Run ``n`` instances in this process and measure them."""
    from orchestra import Agent, Orchestra, Pool
    from orchestra.models import ChatRequest, FunctionModel

    def keywords(request: ChatRequest) -> Any:
        if "school subjects or skills" in request.prompt_text():
            return {"keywords": ["general"]}
        return "The answer is 1"

    experts = [FunctionModel(lambda request, i=i: f"expert {i}: The answer is 1", name=f"m{i}") for i in range(4)]
    planner = FunctionModel(keywords, name="keywords")
    models = [*experts, planner]
    pool = Pool(agents=[Agent(name=f"agent{i}", model=m) for i, m in enumerate(experts)], planner=planner)
    folder = tempfile.TemporaryDirectory(prefix="orchestra-scale-")  # (a store of 100,000 runs is 1.7 GB)
    orc = Orchestra(pool, store=Path(folder.name) / "runs.db" if store else False)
    tasks = (f"What is {i} plus {i}?" for i in range(n))

    def forget_requests() -> None:
        for model in models:
            model.requests.clear()
            model.batches.clear()

    gc_seconds = [0.0, 0.0]

    def gc_timer(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_seconds[1] = time.perf_counter()
        else:
            gc_seconds[0] += time.perf_counter() - gc_seconds[1]

    async def stream() -> int:
        done = 0
        async for _, result in orc.arun_iter(tasks, window=window):
            done += result.status == "done"
            if done % 1000 == 0:
                forget_requests()
        return done

    async def many() -> int:
        results = await orc.arun_many(list(tasks), window=window)
        return sum(r.status == "done" for r in results)

    gc.collect()
    base = rss_mib()
    gc.callbacks.append(gc_timer)
    started, cpu = time.perf_counter(), time.process_time()
    done = asyncio.run(stream() if api == "iter" else many())
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    gc.callbacks.remove(gc_timer)
    orc.close()
    folder.cleanup()
    if done != n:
        raise SystemExit(f"only {done} of {n} instances finished")
    return {"n": n, "store": store, "seconds": seconds, "ms": seconds / n * 1000, "cpu_ms": cpu / n * 1000,
            "peak_mib": rss_mib(), "base_mib": base, "gc_share": gc_seconds[0] / seconds,
            "waves": orc.executor.stats.waves}


def measure(n: int, store: bool, window: int, api: str) -> dict[str, Any]:
    """One N in a fresh subprocess."""
    done = subprocess.run([sys.executable, __file__, "--child", str(n), "--store", "on" if store else "off",
                           "--window", str(window), "--api", api], capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"N={n} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-n", type=int, default=SIZES[-1], help="Leave out the sizes above this.")
    parser.add_argument("--repeats", type=int, default=3, help="Subprocesses per size (min and median shown).")
    parser.add_argument("--store", choices=["off", "on", "both"], default="both")
    parser.add_argument("--window", type=int, default=None, help="Runs in flight (default: Orchestra's).")
    parser.add_argument("--api", choices=["iter", "run_many"], default="iter")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.window is None:
        from orchestra.core import DEFAULT_WINDOW

        args.window = DEFAULT_WINDOW
    if args.child is not None:
        print(json.dumps(child(args.child, args.store == "on", args.window, args.api)))
        return
    sizes = [n for n in SIZES if n <= args.max_n]
    stores = {"off": [False], "on": [True], "both": [False, True]}[args.store]
    print(f"{args.api}, window {args.window}, {args.repeats} run(s) per size, each in a fresh process; "
          f"{os.cpu_count()} CPUs")
    print(f"{'store':>5} {'N':>8} {'ms/inst min':>12} {'median':>7} {'peak MiB':>9} {'base':>5} "
          f"{'peak-base':>9} {'GC':>4} {'waves':>6}")
    table: dict[tuple[bool, int], list[dict[str, Any]]] = {(store, n): [] for store in stores for n in sizes}
    for n in sizes:
        # store on and off alternate (and swap which goes first), so a machine that slows down or
        # speeds up during the script weighs on both alike
        for repeat in range(args.repeats):
            for store in stores if repeat % 2 == 0 else stores[::-1]:
                table[(store, n)].append(measure(n, store, args.window, args.api))
        for store in stores:
            rows = table[(store, n)]
            ms = [r["ms"] for r in rows]
            peak = max(r["peak_mib"] for r in rows)
            base = min(r["base_mib"] for r in rows)
            share = statistics.median(r["gc_share"] for r in rows)
            print(f"{'on' if store else 'off':>5} {n:>8,} {min(ms):>12.3f} {statistics.median(ms):>7.3f} "
                  f"{peak:>9.0f} {base:>5.0f} {peak - base:>9.0f} {share:>4.0%} {rows[0]['waves']:>6}", flush=True)
    big, small = sizes[-1], sizes[0]
    if big != small:
        for store in stores:
            a, b = table[(store, big)], table[(store, small)]
            grow_a = max(r["peak_mib"] - r["base_mib"] for r in a)
            grow_b = max(r["peak_mib"] - r["base_mib"] for r in b)
            print(f"store {'on' if store else 'off'}: ms/instance {big:,} vs {small:,}: "
                  f"min {min(r['ms'] for r in a) / min(r['ms'] for r in b):.2f}x, "
                  f"median {statistics.median(r['ms'] for r in a) / statistics.median(r['ms'] for r in b):.2f}x "
                  f"(target <= 1.10x); RSS growth over base {grow_a:.0f} vs {grow_b:.0f} MiB")
    if len(stores) == 2:
        for n in sizes:
            for what in ("ms", "cpu_ms"):
                on, off = [r[what] for r in table[(True, n)]], [r[what] for r in table[(False, n)]]
                paired = [a / b for a, b in zip(on, off)]
                medians = statistics.median(on) / statistics.median(off)
                added = statistics.median(a - b for a, b in zip(on, off))
                print(f"N={n:,}: store on vs off, {'wall' if what == 'ms' else 'CPU (both threads)'}: "
                      f"min {min(on) / min(off):.2f}x, median {medians:.2f}x, median of {len(paired)} "
                      f"side-by-side pairs {statistics.median(paired):.2f}x (target <= 1.25x); "
                      f"the store adds {added:.3f} ms per instance (median of the pairs)")

if __name__ == "__main__":
    main()
