"""Whether this machine runs the installed llama.cpp build, found out in a child process first.

A llama.cpp built for the CPU it was compiled on (llama-cpp-python's default) may use instructions
the CPU advertises but does not run: in some virtual machines AVX-512 or AMX. The process then
dies of a segmentation fault at its first prompt, with nothing printed: ``orchestra ask`` on the
embedded model just ends. So before the first in-process load, a child process loads the small
embedded model and generates two tokens; if it dies of a signal, the load stops with one line
saying how to rebuild. The verdict is kept in ``$ORCHESTRA_HOME`` per build and machine, so the
check runs once per install (about a second).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from orchestra.errors import MissingDependency
from orchestra.resources import orchestra_home

#: what the child process runs: the embedded model's first prompt (argv[1]: the GGUF file)
PROBE = ("import sys\nfrom llama_cpp import Llama\n"
         "Llama(model_path=sys.argv[1], n_ctx=256, n_threads=1, verbose=False)('The sky is', max_tokens=2)\n")
REBUILD = ('pip cache remove llama_cpp_python; CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --force-reinstall '
           '--no-deps --no-cache-dir llama-cpp-python')
#: how a process dies of an instruction its CPU will not run (or of what such a build leads to)
_CPU_FAULTS = frozenset(int(s) for s in (signal.SIGSEGV, signal.SIGILL, signal.SIGBUS, signal.SIGABRT))
_checked: set[str] = set()  # builds found to run, in this process
_lock = threading.Lock()


def check_llama_runs(probe_model: Path | None) -> None:
    """Raise ``MissingDependency`` (naming the rebuild) if llama.cpp's build crashes on this machine;
    ``probe_model``: a small GGUF to try it with (None: nothing small to try, so no check)."""
    if probe_model is None:
        return
    build = _build_key()
    if build is None:
        return
    with _lock:  # (engines load from worker threads: one check at a time)
        if build in _checked:
            return
        verdicts = orchestra_home() / "llama-cpp-check.json"
        if _recorded(verdicts) == build:
            _checked.add(build)
            return
        try:
            done = subprocess.run([sys.executable, "-c", PROBE, str(probe_model)], capture_output=True, timeout=600,
                                  check=False)
        except subprocess.TimeoutExpired:  # no verdict: the load goes on
            return
        if -done.returncode in _CPU_FAULTS:  # (a child stopped by Ctrl-C or the OOM killer says nothing of the CPU)
            name = signal.Signals(-done.returncode).name
            raise MissingDependency(
                f"llama-cpp-python crashes on this machine (a first prompt in a child process died of {name}): "
                f"it was built for CPU features this machine does not run; rebuild it: {REBUILD}")
        if done.returncode == 0:  # (another failure is the load's own to report, with its message)
            _checked.add(build)
            _record(verdicts, build)


def _build_key() -> str | None:
    """The installed llama.cpp build on this machine: its libraries (names, sizes, times) and the host."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent
    libraries = sorted(p for p in folder.rglob("*") if p.suffix in (".so", ".dylib", ".dll") or ".so." in p.name)
    facts = [socket.gethostname(), *(f"{p.relative_to(folder)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                     for p in libraries)]
    return hashlib.sha256("\n".join(facts).encode()).hexdigest()


def _recorded(path: Path) -> str | None:
    try:
        return str(json.loads(path.read_text())["runs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _record(path: Path, build: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"runs": build}))
    except OSError:  # nowhere to keep it: the check runs again next time
        pass
