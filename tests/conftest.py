"""Suite-wide switches: no real model requests unless a test opts in, and a private Orchestra home."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ["ORCHESTRA_ALLOW_MODEL_REQUESTS"] = "0"

from orchestra.models import base
from orchestra.testing import Handler, LoopbackServer

base.ALLOW_MODEL_REQUESTS = False


@pytest.fixture(autouse=True)
def orchestra_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own ~/.orchestra, so run stores never touch the real one."""
    home = tmp_path_factory.mktemp("orchestra-home")
    monkeypatch.setenv("ORCHESTRA_HOME", str(home))
    return home


@pytest.fixture
def loopback() -> Iterator[Callable[[Handler], LoopbackServer]]:
    """Start loopback servers for a test; real model requests are allowed while it runs."""
    servers: list[LoopbackServer] = []

    def start(handler: Handler) -> LoopbackServer:
        server = LoopbackServer(handler).start()
        servers.append(server)
        return server

    with base.allow_model_requests():
        yield start
    for server in servers:
        server.stop()
