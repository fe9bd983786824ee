"""The window a SIGKILL can hit: from a server sending an answer to the store committing it.

A call's answer is committed to the run store at the end of the event-loop turn it is read in
(the executor commits the answers of a turn together, one transaction, before anything uses
them), so a kill can only cost the calls whose answers are in flight or in that window. This measures the
window under load: a data set of questions (5 keyword samples and k = 3 experts each, all
concurrent) against a loopback server that stamps each answer with the time it was sent; the
store's ``created`` column is the commit time. The server shares this process (and its GIL), so
the numbers are an upper bound of what a separate server would show.

    python bench/commit_window.py [--questions 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from orchestra import Orchestra, Pool
from orchestra.models import allow_model_requests
from orchestra.store import RunStore
from orchestra.testing import LoopbackRequest, LoopbackServer, chat_handler

POOL = """name: window
models:
{models}
agents:
{agents}
"""


TOKEN = re.compile(r"\bt\d+\b")


class StampingServer:
    """Answers every request with a unique token and remembers when each answer was sent."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def answer(self, request: LoopbackRequest) -> str:
        with self._lock:
            token = f"t{next(self._ids)}"
        text = json.dumps({"keywords": ["arithmetic", token]}) if "keyword" in request.prompt.lower() else (
            f"{token}: The answer is 42")
        self.sent[token] = time.time()
        return text


def windows(db: Path, sent: dict[str, float]) -> list[float]:
    """Milliseconds from each answer's sending to its committed row."""
    rows = sqlite3.connect(db).execute("SELECT response, created FROM calls WHERE status='ok'").fetchall()
    found = []
    for response, created in rows:
        token = TOKEN.search(json.loads(response)["text"])
        if token is not None and token.group(0) in sent:
            found.append((created - sent[token.group(0)]) * 1000)
    return found


def timed_commits(durations: list[tuple[float, int]]) -> None:
    """Make ``RunStore.record_all`` (one commit of the answers of a turn: what the executor calls)
    note how long it takes, in milliseconds, and how many answers it held."""
    record_all = RunStore.record_all

    def timed(self: RunStore, entries: Any) -> None:
        entries = list(entries)
        started = time.perf_counter()
        try:
            record_all(self, entries)
        finally:
            durations.append(((time.perf_counter() - started) * 1000, len(entries)))

    RunStore.record_all = timed  # type: ignore[method-assign]


def one(questions: int) -> list[float]:
    stamps = StampingServer()
    with LoopbackServer(chat_handler(stamps.answer)) as server, tempfile.TemporaryDirectory() as tmp:
        names = [f"m{i}" for i in range(4)]
        models = "\n".join(f"  {n}: {{type: openai, model: {n}, base_url: '{server.url}/v1', api_key_env: null, "
                           "max_concurrency: 64}" for n in names)
        agents = "\n".join(f"  - {{name: a{i}, model: {n}}}" for i, n in enumerate(names))
        pool_file = Path(tmp) / "pool.yaml"
        pool_file.write_text(POOL.format(models=models, agents=agents))
        db = Path(tmp) / "runs.db"
        orc = Orchestra(Pool.load(pool_file), store=db, k=3, budget={"max_calls": None, "max_cost_usd": None})
        with allow_model_requests():
            orc.run_many([f"What is {i} + {i}?" for i in range(questions)], plan=False)
        return windows(db, stamps.sent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    p90s, maxima, counts = [], [], []
    commits: list[tuple[float, int]] = []
    timed_commits(commits)
    for _ in range(args.repeat):
        found = sorted(one(args.questions))
        counts.append(len(found))
        p90s.append(found[int(0.9 * (len(found) - 1))])
        maxima.append(found[-1])
    print(f"answers matched per run: {counts}")
    print(f"answer sent -> row committed, p90: min {min(p90s):.1f} ms, median {statistics.median(p90s):.1f} ms")
    print(f"answer sent -> row committed, max: min {min(maxima):.1f} ms, median {statistics.median(maxima):.1f} ms")
    if not commits:
        raise SystemExit("no commit was timed: the executor no longer commits through RunStore.record_all")
    times = sorted(ms for ms, _ in commits)
    print(f"the commits themselves (RunStore.record_all, {len(commits)} over all runs, "
          f"{statistics.mean(n for _, n in commits):.1f} answers each on average): median "
          f"{statistics.median(times):.2f} ms, p90 {times[int(0.9 * (len(times) - 1))]:.2f} ms, max {times[-1]:.2f} ms")


if __name__ == "__main__":
    main()
