"""Start-up time of the command line: ``orchestra --help`` and ``orchestra runs``, next to the floor.

Each command runs in a fresh subprocess, ``--repeats`` times, the commands taking turns so that
load on the machine falls on all of them alike; min and median wall time are printed. The floor
is what any Python command line pays: ``python -c pass`` (the interpreter) and ``python -c "import
click"`` (the argument parser). ``orchestra runs`` lists an empty store in a temporary
``$ORCHESTRA_HOME``, so it opens (and the first time creates) a real SQLite file.

The children may write bytecode (``PYTHONDONTWRITEBYTECODE`` is dropped for them) and each
command runs once before timing, so the numbers are those of an installed package, not of a
first start compiling its sources. ``PYTHONPATH`` passes through: point it at another checkout
to measure that one.

Target (issue 14, part 6): ``--help`` and ``runs`` <= 0.2 s.

    python bench/startup.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 0.2


def commands() -> dict[str, list[str]]:
    """Label -> argv, floor first."""
    python = sys.executable
    script = shutil.which("orchestra", path=str(Path(python).parent))
    runs = [script, "runs"] if script else [python, "-m", "orchestra", "runs"]
    return {
        "python -c pass": [python, "-c", "pass"],
        'python -c "import click"': [python, "-c", "import click"],
        "python -m orchestra --help": [python, "-m", "orchestra", "--help"],
        "orchestra runs (empty store)": runs,
    }


def wall(argv: list[str], env: dict[str, str], cwd: str) -> float:
    """Seconds one run of ``argv`` takes, start to exit; a failing command stops the benchmark."""
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr.decode(errors='replace')}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="Runs of each command (min and median shown).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="orchestra-startup-") as home:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["ORCHESTRA_HOME"] = home  # `runs` lists (and creates) an empty store here
        argvs = commands()
        times: dict[str, list[float]] = {label: [] for label in argvs}
        for argv in argvs.values():  # bytecode written, the store created
            wall(argv, env, home)
        for _ in range(args.repeats):
            for label, argv in argvs.items():
                times[label].append(wall(argv, env, home))
    print(f"{args.repeats} runs of each command, each in a fresh process; {os.cpu_count()} CPUs; "
          f"Python {sys.version.split()[0]}")
    print(f"{'command':<30} {'min s':>7} {'median s':>9}")
    for label, seconds in times.items():
        print(f"{label:<30} {min(seconds):>7.3f} {statistics.median(seconds):>9.3f}")
    slowest = max(statistics.median(times[label]) for label in list(argvs)[2:])
    print(f"slowest orchestra command, median: {slowest:.3f} s (target <= {TARGET_S} s): "
          f"{'met' if slowest <= TARGET_S else 'NOT met'}")


if __name__ == "__main__":
    main()
