"""A llama.cpp build this machine cannot run is found in a child process, before it kills ours:
one line saying how to rebuild, instead of a silent segmentation fault at the first prompt."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from orchestra.errors import MissingDependency
from orchestra.models import llama_check
from orchestra.models.llamacpp import default_gguf_path


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """A home with no verdict kept, no build checked in this process, and every child counted."""
    monkeypatch.setenv("ORCHESTRA_HOME", str(tmp_path))
    monkeypatch.setattr(llama_check, "_checked", set())
    started: list[list[str]] = []
    real_run = subprocess.run

    def counted(args: list[str], **options: Any) -> subprocess.CompletedProcess[bytes]:
        started.append(args)
        return real_run(args, **options)

    monkeypatch.setattr(llama_check.subprocess, "run", counted)
    return started


def test_a_build_whose_first_prompt_dies_of_a_signal_is_refused_with_the_rebuild(
        fresh: list[list[str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # what a build for CPU features the machine does not run does (a general protection fault)
    monkeypatch.setattr(llama_check, "PROBE", "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    for _ in range(2):  # a crash is not remembered as a verdict: asked again, it is checked again
        with pytest.raises(MissingDependency) as refused:
            llama_check.check_llama_runs(tmp_path / "small.gguf")
        message = str(refused.value)
        assert message.startswith("llama-cpp-python crashes on this machine (a first prompt in a child process died "
                                  "of SIGSEGV)") and "\n" not in message
        assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --force-reinstall' in message
    assert len(fresh) == 2 and not (tmp_path / "llama-cpp-check.json").exists()


@pytest.mark.parametrize("probe", ["import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
                                   "raise KeyboardInterrupt\n"], ids=["killed", "interrupted"])
def test_a_child_stopped_from_outside_says_nothing_of_the_cpu(fresh: list[list[str]], monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path, probe: str) -> None:
    monkeypatch.setattr(llama_check, "PROBE", probe)  # (the OOM killer; Ctrl-C during the check)
    llama_check.check_llama_runs(tmp_path / "small.gguf")  # no verdict either way: the load goes on
    assert len(fresh) == 1 and not (tmp_path / "llama-cpp-check.json").exists()


def test_a_build_that_runs_is_checked_once_per_install(fresh: list[list[str]], monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    monkeypatch.setattr(llama_check, "PROBE", "pass\n")
    llama_check.check_llama_runs(tmp_path / "small.gguf")
    llama_check.check_llama_runs(tmp_path / "small.gguf")  # this process knows
    assert len(fresh) == 1
    monkeypatch.setattr(llama_check, "_checked", set())  # a new process: the verdict kept in the home
    llama_check.check_llama_runs(tmp_path / "small.gguf")
    assert len(fresh) == 1 and (tmp_path / "llama-cpp-check.json").exists()


def test_a_child_that_fails_without_a_crash_leaves_the_error_to_the_load(
        fresh: list[list[str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(llama_check, "PROBE", "raise SystemExit(1)\n")
    llama_check.check_llama_runs(tmp_path / "missing.gguf")  # no verdict: the load says what is wrong itself
    assert len(fresh) == 1 and not (tmp_path / "llama-cpp-check.json").exists()
    llama_check.check_llama_runs(None)  # nothing small to try it with: no check
    assert len(fresh) == 1


@pytest.mark.llama
def test_the_installed_build_runs_the_embedded_model_in_a_child(fresh: list[list[str]], tmp_path: Path) -> None:
    llama_check.check_llama_runs(default_gguf_path())
    assert len(fresh) == 1 and (tmp_path / "llama-cpp-check.json").exists()
