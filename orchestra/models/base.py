"""The model protocol, the shared base class, and the switch that forbids real requests in tests."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import importlib.util
import inspect
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from functools import partial
from typing import Any, ClassVar, Protocol, TypeAlias, TypeGuard, TypeVar, runtime_checkable

from orchestra.errors import BadResponse, CallCancelled, ConfigError, InvalidOutput, ModelRequestsForbidden
from orchestra.models.metering import charge, count_request, metering
from orchestra.models.pricing import MAX_TOKEN_COUNT
from orchestra.models.structured import StructuredOutputError, extract_json, parse_output, repair_request
from orchestra.models.types import ChatRequest, ChatResult, Usage

#: False makes every real (non-test-double) model request raise ``ModelRequestsForbidden``.
#: The test suite turns it off; a test opts back in with ``allow_model_requests()``.
#: Subprocesses read it from ``ORCHESTRA_ALLOW_MODEL_REQUESTS`` (``0`` forbids).
ALLOW_MODEL_REQUESTS: bool = os.environ.get("ORCHESTRA_ALLOW_MODEL_REQUESTS", "1") != "0"


@contextlib.contextmanager
def allow_model_requests(allow: bool = True) -> Iterator[None]:
    """Temporarily allow (or forbid) real model requests."""
    global ALLOW_MODEL_REQUESTS
    previous, ALLOW_MODEL_REQUESTS = ALLOW_MODEL_REQUESTS, allow
    try:
        yield
    finally:
        ALLOW_MODEL_REQUESTS = previous


RetryListener = Callable[[str, int, float, str], None]
#: Set by the executor around a batch: called as (model, attempt, wait seconds, reason) before a retry.
retry_listener: ContextVar[RetryListener | None] = ContextVar("retry_listener", default=None)


def notify_retry(model: str, attempt: int, wait_s: float, reason: str) -> None:
    """Tell whoever dispatched the current batch that a call is being retried."""
    listener = retry_listener.get()
    if listener is not None:
        listener(model, attempt, wait_s, reason)


DowngradeListener = Callable[[str, str, str], None]
#: Set by the executor around a batch: called as (model, feature, reason) when a server refuses an
#: optional feature and requests go on without it.
downgrade_listener: ContextVar[DowngradeListener | None] = ContextVar("downgrade_listener", default=None)


def notify_downgrade(model: str, feature: str, reason: str) -> None:
    """Tell whoever dispatched the current batch that a server refused an optional feature."""
    listener = downgrade_listener.get()
    if listener is not None:
        listener(model, feature, reason)


CancelListener = Callable[[ChatRequest, Usage], None]
def importable(package: str) -> bool:
    """Whether ``package`` can be imported in this process (one put in ``sys.modules`` by hand, a
    test's stand-in, counts; ``find_spec`` raised ``ValueError`` for one without a spec)."""
    if package in sys.modules:
        return sys.modules[package] is not None
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


#: Set by the executor around a batch: called as (request, usage) when a call is cancelled after
#: requests went out, so what the endpoint received is still counted.
cancel_listener: ContextVar[CancelListener | None] = ContextVar("cancel_listener", default=None)


RepairAdmission = Callable[[ChatRequest, ChatRequest, Usage], None]
#: Set by the executor around a batch: called as (request, repair, spent) before a structured
#: answer's repair is sent, ``spent`` being what the call's first request cost, to reserve the
#: repair against the call's budget; raises ``BudgetExceeded`` where it has no room.
repair_admission: ContextVar[RepairAdmission | None] = ContextVar("repair_admission", default=None)


def admit_repair(request: ChatRequest, repair: ChatRequest, spent: Usage) -> None:
    """Have whoever dispatched the current batch reserve ``repair``, a further request of
    ``request``'s call, whose first request cost ``spent``."""
    admission = repair_admission.get()
    if admission is not None:
        admission(request, repair, spent)


#: Set by the executor around a batch: whether the batch's request at an index is still wanted (its
#: caller may have stopped since the batch began, a run cancelled or a loop left early); one that is
#: not is never sent, and comes back as ``CallCancelled``.
still_wanted: ContextVar[Callable[[int], bool] | None] = ContextVar("still_wanted", default=None)


#: Set by ``complete_each`` around each request of a batch the executor sent: whether that request's
#: call is still wanted, asked again just before each of its requests goes out (``check_wanted``):
#: one that waited for an endpoint's free slot, a retry, or a repair is not sent for a call cancelled
#: meanwhile (a cancelled run's queued requests and repairs went out, paid for nothing).
request_wanted: ContextVar[Callable[[], bool] | None] = ContextVar("request_wanted", default=None)


def check_wanted(model: str) -> None:
    """Raise ``CallCancelled`` if the call of the request about to go out was cancelled since its
    batch began (the requests it sent before, if any, are counted by the call as usual)."""
    wanted = request_wanted.get()
    if wanted is not None and not wanted():
        raise _unsent(model)


#: Set by the executor around a batch of an engine that generates one request at a time: the
#: generation running for a batch index, so that a call whose caller stops meanwhile (a run
#: cancelled, a client gone) has it cancelled, and the engine goes on with the next request.
generations: ContextVar[dict[int, asyncio.Task[ChatResult | Exception]] | None] = ContextVar(
    "generations", default=None)


#: what one request settles as: its answer, or the error it ended with
Settled: TypeAlias = "ChatResult | Exception"


def _unsent(model: str) -> CallCancelled:
    return CallCancelled(f"{model}: cancelled before its request was sent")


Outcome = tuple[int, "ChatResult | Exception"]


@runtime_checkable
class Model(Protocol):
    """Anything that completes a batch of chat requests; results come back in request order."""

    name: str

    async def complete(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Complete every request; raise the first error."""

    def complete_each(self, requests: Sequence[ChatRequest]) -> AsyncIterator[Outcome]:
        """Yield ``(index, result or error)`` as each request finishes."""


@runtime_checkable
class HeavyModel(Model, Protocol):
    """An in-process engine that holds weights: it must be loaded before it generates."""

    heavy: bool
    memory_bytes: int

    @property
    def loaded(self) -> bool:
        """Whether the weights are in memory."""

    async def load(self) -> float:
        """Load the weights; return the seconds it took."""

    async def unload(self) -> None:
        """Free the weights."""


def check_whole(name: str, value: object, least: int) -> None:
    """Refuse a model's setting that is not a whole number of at least ``least``, in one line (a pool
    file refuses it; in Python it was taken and failed the first call, or was sent)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{name} must be a whole number of at least {least}, not {type(value).__name__} {value!r}")


def model_identity(model: Any) -> str:
    """What a model really is (backend, endpoint, model id, and the ``extra_body`` its requests carry),
    not its alias in a pool: part of its calls' keys (the response cache's, a resume's). Two models on
    one endpoint apart only in ``extra_body`` (thinking on and off, another token limit) shared their
    cached answers."""
    identity = getattr(model, "identity", None) or f"{type(model).__name__}:{model.name}"
    extra = getattr(model, "extra_body", None)
    if extra:
        identity += " " + json.dumps(extra, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return identity


def with_settings(identity: str, settings: Mapping[str, tuple[Any, Any]]) -> str:
    """``identity`` with the settings that change a model's answers (``name: (value, default)``) where
    they are not their defaults: a model's answer limit raised after its answers were cut off kept
    their keys, and a resume or the response cache gave the cut answers back. Defaults add nothing,
    so the keys of calls recorded before stay theirs."""
    changed = [f"{name}={json.dumps(value, sort_keys=True, default=str)}"
               for name, (value, default) in settings.items() if value != default]
    return " ".join([identity, *changed])


def is_heavy(model: object) -> TypeGuard[HeavyModel]:
    """Whether the executor must manage this model's residency (an in-process engine)."""
    return bool(getattr(model, "heavy", False))


_M = TypeVar("_M", bound="ModelBase")


class ModelBase(abc.ABC):
    """Shared behaviour: batch fan-out, structured-output parsing with one repair, the test switch.

    Subclasses implement ``_generate`` for one request. ``concurrent`` says whether a batch is
    fanned out at once (remote endpoints) or generated one after another (in-process engines).
    ``async with model:`` calls ``aclose()`` on the way out.
    """

    name: str
    concurrent: ClassVar[bool] = True
    is_test_double: ClassVar[bool] = False
    #: True when the transport counts every request it sends (HTTP endpoints count each attempt);
    #: otherwise each generation counts as one request.
    counts_requests: ClassVar[bool] = False

    def __init_subclass__(cls, **options: Any) -> None:
        """Refuse a ``_generate`` that is not an ``async def`` as the class is made (each of its calls
        failed with "object ChatResult can't be used in 'await' expression", naming no model)."""
        super().__init_subclass__(**options)
        generate = cls.__dict__.get("_generate")
        if generate is not None and not inspect.iscoroutinefunction(generate):
            raise TypeError(f"{cls.__name__}._generate must be an async def (a coroutine function) returning a "
                            "ChatResult")

    async def aclose(self) -> None:
        """Release what the model holds open (an endpoint's connections); nothing by default."""

    def replayed(self, request: ChatRequest) -> None:
        """A run's recorded answer to ``request`` was replayed instead of sent; nothing by default."""

    async def __aenter__(self: _M) -> _M:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @abc.abstractmethod
    async def _generate(self, request: ChatRequest) -> ChatResult:
        """One raw completion. Structured requests may come back unparsed; the base parses them."""

    async def complete(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Complete every request, results in request order; raise the first error."""
        requests = checked_batch(requests)
        return await in_order(self.complete_each(requests), len(requests))

    async def complete_each(self, requests: Sequence[ChatRequest]) -> AsyncIterator[Outcome]:
        """Yield ``(index, result or error)`` as each request finishes."""
        wanted = still_wanted.get()
        if not self.concurrent:
            running = generations.get()
            for index, request in enumerate(requests):
                if wanted is not None and not wanted(index):
                    yield index, _unsent(self.name)
                    continue
                if wanted is not None:
                    request_wanted.set(partial(wanted, index))
                if running is None:
                    yield index, await self._settle(request)
                else:
                    outcome, cancelled = await self._stoppable(request, index, running)
                    yield index, outcome
                    if cancelled:  # (the batch was cancelled as this answer ended: it had the answer first)
                        raise asyncio.CancelledError
            return
        finished: asyncio.Queue[Outcome] = asyncio.Queue()
        waiting = iter(enumerate(requests))

        async def worker() -> None:  # takes the next request as soon as its last one is answered
            for index, request in waiting:
                if wanted is not None and not wanted(index):
                    finished.put_nowait((index, _unsent(self.name)))
                    continue
                if wanted is not None:  # (this worker's own context: its request's alone)
                    request_wanted.set(partial(wanted, index))
                finished.put_nowait((index, await self._settle(request)))

        width = min(len(requests), self.fan_out or len(requests))
        workers = [asyncio.ensure_future(worker()) for _ in range(width)]
        try:
            for _ in requests:
                try:
                    answered = await finished.get()
                except asyncio.CancelledError:
                    # the batch was cancelled with answers queued that it had not taken yet: their
                    # requests were answered (and billed), so they are delivered before it stops
                    while not finished.empty():
                        yield finished.get_nowait()
                    raise
                yield answered
        finally:
            for task in workers:
                task.cancel()
            # their requests unwind before the batch ends: one cut off in flight is counted by its call, which
            # still holds its reservation (a transport whose cancellation awaits, httpx's own, lost the count)
            await asyncio.gather(*workers, return_exceptions=True)

    @property
    def fan_out(self) -> int | None:
        """How many of a batch's requests are worth having in flight at once (None: all of them).
        A remote model says its endpoint's limit, so a batch of thousands is not thousands of tasks
        queued on the endpoint's semaphore."""
        return None

    async def _stoppable(self, request: ChatRequest, index: int,
                         running: dict[int, asyncio.Task[Settled]]) -> tuple[Settled, bool]:
        """``_settle(request)`` as a task listed in ``running`` under ``index`` while it runs (stopped
        there, its outcome is ``CallCancelled``), and whether the batch was cancelled as it ended
        (a generation that ended first keeps its answer; one still going is stopped and waited for)."""
        generation = asyncio.ensure_future(self._settle(request))
        running[index] = generation
        cancelled = False
        try:
            await asyncio.wait((generation,))
        except asyncio.CancelledError:
            if not generation.done() or generation.cancelled():
                generation.cancel()
                await asyncio.wait((generation,))
                raise
            cancelled = True
        finally:
            running.pop(index, None)
        if generation.cancelled():
            return CallCancelled(f"{self.name}: its generation was stopped: its call was cancelled"), cancelled
        return generation.result(), cancelled

    async def _settle(self, request: ChatRequest) -> ChatResult | Exception:
        try:
            return await self.complete_one(request)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            return error

    def check_allowed(self) -> None:
        """Raise ``ModelRequestsForbidden`` if the test switch forbids this (real) model's requests."""
        if not ALLOW_MODEL_REQUESTS and not self.is_test_double:
            raise ModelRequestsForbidden(
                f"real model requests are switched off (request to {self.name}); "
                "wrap the test in orchestra.models.allow_model_requests()")

    async def complete_one(self, request: ChatRequest) -> ChatResult:
        """One request, parsed if structured; an invalid structured answer gets one repair attempt.

        The result's (or the error's) ``usage`` counts every request the call took and every
        billed token, the repair's included.
        """
        self.check_allowed()
        started = time.perf_counter()
        with metering() as meter:
            try:
                step = self.parse_or_repair(request, await self._metered(request))
                if isinstance(step, InvalidOutput):
                    raise step
                if isinstance(step, ChatRequest):
                    check_wanted(self.name)
                    admit_repair(request, step, meter.usage)
                    step = self.parse_repaired(request, await self._metered(step))
            except asyncio.CancelledError:
                listener = cancel_listener.get()
                if meter.requests and listener is not None:
                    listener(request, meter.usage)
                raise
            except Exception as error:
                with_usage(error, meter.usage)
                error.latency_s = time.perf_counter() - started  # type: ignore[attr-defined]  # (its attempts')
                raise
        # the result is this call's own (a backend makes a fresh one per generation): filled in place
        step.usage, step.latency_s = meter.usage, time.perf_counter() - started
        return step

    async def _metered(self, request: ChatRequest) -> ChatResult:
        """One generation, counted as a request (unless the transport counts its own) and charged."""
        if not self.counts_requests:
            count_request()
        try:
            result = await self._generate(request)
        except Exception as error:
            charge(getattr(error, "usage", None))  # a billed failure (e.g. a body without choices)
            raise
        if not isinstance(result, ChatResult):  # (it was "'str' object has no attribute 'usage'", naming no model)
            raise TypeError(f"model {self.name}: _generate returned {type(result).__name__}, expected a ChatResult")
        usage = result.usage
        if not (0 <= usage.prompt_tokens <= MAX_TOKEN_COUNT and 0 <= usage.completion_tokens <= MAX_TOKEN_COUNT
                and 0.0 <= usage.cost_usd < math.inf and usage.requests >= 0):  # (NaN fails too)
            raise BadResponse(_usage_problem(self.name, usage))
        charge(usage)
        empty = self.without_text(result)
        if empty is not None:
            raise empty
        return result

    def without_text(self, result: ChatResult) -> BadResponse | None:
        """The error of an answer without text (empty or blank), which fails its call as an endpoint's
        does (a model's own, an engine's: its run ended ``done`` with the answer ""); None where it has text."""
        text = result.text
        if text and not text.isspace():
            return None
        hint = ("; it reached max_tokens first (a reasoning model's thinking counts): raise max_tokens"
                if result.finish_reason == "length" else "")
        return BadResponse(f"model {self.name} replied with no text (finish_reason {result.finish_reason or 'none'})"
                           f"{hint}")

    def parse_or_repair(self, request: ChatRequest, result: ChatResult) -> ChatResult | ChatRequest | InvalidOutput:
        """``result`` with its parsed value, or the repair request to send when its JSON is invalid;
        an answer that was all JSON until ``max_tokens`` cut it before its JSON was whole is a
        failure (a repair under the same limit would be cut as well; one with words before its JSON
        may fit once they go, and whole JSON that breaks the schema gets its repair)."""
        if not request.wants_json or result.parsed is not None:
            return result
        try:
            return result.model_copy(update={"parsed": parse_output(result.text, request)})
        except StructuredOutputError as error:
            if result.finish_reason != "length" or not result.text.lstrip().startswith(("{", "[", "```")) \
                    or _holds_json(result.text):
                return repair_request(request, result.text, error)
            limit = f"max_tokens={request.max_tokens}" if request.max_tokens else "its max_tokens"
            failure = InvalidOutput(f"{self.name} returned invalid JSON for {request.schema_name}: {error}; the "
                                    f"answer reached {limit} before it was complete: raise max_tokens")
            failure.text = result.text
            return failure

    def parse_repaired(self, request: ChatRequest, repaired: ChatResult) -> ChatResult:
        """The repaired answer parsed; still invalid is an ``InvalidOutput`` carrying the answer's text."""
        try:
            return repaired.model_copy(update={"parsed": parse_output(repaired.text, request)})
        except StructuredOutputError as error:
            failure = InvalidOutput(f"{self.name} returned invalid JSON for {request.schema_name} "
                                  f"even after one repair attempt: {error}")
            failure.text = repaired.text
            raise failure from None


def _holds_json(text: str) -> bool:
    """Whether ``text`` holds a whole JSON value (one that may break its schema)."""
    try:
        extract_json(text)
    except StructuredOutputError:
        return False
    return True


def with_usage(outcome: ChatResult | Exception, usage: Usage) -> ChatResult | Exception:
    """``outcome`` carrying ``usage``: a result's copy, or the error itself with a ``usage`` attribute."""
    if isinstance(outcome, Exception):
        outcome.usage = usage  # type: ignore[attr-defined]
        return outcome
    return outcome.model_copy(update={"usage": usage})


def checked_batch(requests: object) -> Sequence[ChatRequest]:
    """``complete``'s argument, refused in one line unless it is a list of ``ChatRequest`` (text,
    or a lone request, was met later as an attribute error)."""
    if isinstance(requests, (str, bytes, ChatRequest)) or not isinstance(requests, Sequence):
        wrong = type(requests).__name__
    else:
        item = next((item for item in requests if not isinstance(item, ChatRequest)), requests)
        if item is requests:
            return requests
        wrong = f"a list holding {type(item).__name__}"
    raise TypeError(f"complete() takes a list of ChatRequest, not {wrong}: ChatRequest.user('...') makes one "
                    "request, and complete_one() sends one")


async def in_order(outcomes: AsyncIterator[Outcome], count: int) -> list[ChatResult]:
    """``complete_each``'s ``(index, outcome)`` pairs as results in request order; the first error is raised."""
    results: list[ChatResult | None] = [None] * count
    async for index, outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome
        results[index] = outcome
    return [r for r in results if r is not None]


def _usage_problem(model: str, usage: Usage) -> str:
    """The one-line error of a usage a model's ``_generate`` returned that cannot be counted (a NaN
    cost turned a cost budget off; 2**63 tokens failed the paid call with SQLite's overflow)."""
    tokens = "a token count is a whole number from 0 to 1,000,000,000"
    checks = (("prompt_tokens", 0 <= usage.prompt_tokens <= MAX_TOKEN_COUNT, tokens),
              ("completion_tokens", 0 <= usage.completion_tokens <= MAX_TOKEN_COUNT, tokens),
              ("requests", usage.requests >= 0, "a count of requests is 0 or more"),
              ("cost_usd", 0.0 <= usage.cost_usd < math.inf, "a cost is a finite number of dollars, 0 or more"))
    name, what = next((name, what) for name, holds, what in checks if not holds)
    return f"model {model}: _generate returned usage {name}={getattr(usage, name)!r}; {what} (fix its _generate)"
