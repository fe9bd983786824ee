"""``orchestra serve``: the whole orchestra as an OpenAI-compatible model.

One ``Orchestra`` (one executor, one store) answers every request, so the expert calls of
concurrent clients go to each model together, while each request is a run of its own: seeded by
itself (its routing never depends on other requests), recorded in the store, resumable. The app
is a Starlette application; ``app()`` builds it for ``uvicorn`` or for mounting in another app.

Model ids: ``orchestra`` (the pool's settings), each preset (a named settings layer from the pool's
``presets:`` or the server's), and each agent of the pool (that agent answers alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import re
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from orchestra.agents import Pool
from orchestra.budget import Budget, BudgetTracker, RunAdmission
from orchestra.collector import paced_for_streams
from orchestra.core import Orchestra, check_task, new_run_id
from orchestra.errors import ConfigError
from orchestra.events import UNSYNTHESIZED, VOTED_INSTEAD, Event
from orchestra.hints import BUDGET_FLAGS, command
from orchestra.models.types import estimate_tokens
from orchestra.openai_wire import (
    ChunkWriter,
    Completion,
    WireError,
    bad_request,
    completion_body,
    for_clients,
    parse_completion,
    sse,
    stopped,
)
from orchestra.pipeline.scheduler import NodeSettings
from orchestra.prompts import MAX_TASK_CHARS
from orchestra.result import RunResult
from orchestra.settings import ORCHESTRA_LEVEL, AnswerOptions, Settings
from orchestra.store import RunStore
from orchestra.terminal_text import counted

#: the model id of the pool's own settings
ORCHESTRA_MODEL = "orchestra"

#: the largest request body accepted by default (bytes)
MAX_REQUEST_BYTES = 1 << 20

#: the most experts per subtask a request may ask for
MAX_K = 16

#: the header that carries the run id of a completion
RUN_HEADER = "x-orchestra-run-id"

#: events offered as progress chunks (``"progress": true``)
PROGRESS_EVENTS = frozenset({"plan_ready", "experts_recruited", "node_aggregating", "aggregation_fell_back",
                             "node_done", "node_failed", "node_skipped"})


#: how a stop by the budget all requests share begins (``--total-max-calls``...)
SERVER_BUDGET = "the server's budget"

@dataclass(frozen=True)
class ServedModel:
    """One model id the server answers to: the settings layer it runs with, or the agent it calls."""

    id: str
    kind: str  # "orchestra", "preset" or "agent"
    settings: Settings
    agent: str | None = None
    description: str = ""

    def card(self, created: int) -> dict[str, Any]:
        """The ``/v1/models`` entry (no endpoint, key or model behind it: nothing a client could misuse)."""
        return {"id": self.id, "object": "model", "created": created, "owned_by": "orchestra",
                "orchestra": {"kind": self.kind, "description": self.description,
                              **({"settings": self.settings.changes()} if self.kind == "preset" else {})}}


class Server:
    """Answers chat completions with one ``Orchestra``.

    Args:
        orchestra: the orchestra every request runs on (its store records each request as a run).
        presets: named settings layers served as model ids, on top of the pool's own presets.
        api_key: the bearer token clients must send (None: no check).
        budget: limits on all requests together (None: none beyond each run's own budget).
        max_request_bytes: the largest request body accepted.
    """

    def __init__(self, orchestra: Orchestra, *, presets: Mapping[str, Settings | Mapping[str, Any]] | None = None,
                 api_key: str | None = None, budget: Budget | None = None,
                 max_request_bytes: int = MAX_REQUEST_BYTES) -> None:
        self.orchestra = orchestra
        self.models = served_models(orchestra.pool, presets or {})
        for served in self.models.values():  # a preset that changes the server's own settings: refused now
            if served.kind == "preset":
                fixed = [name for name in ORCHESTRA_LEVEL if name in served.settings.changes()]
                if fixed:
                    verb = "belongs" if len(fixed) == 1 else "belong"
                    raise ConfigError(f"preset {served.id!r}: {', '.join(fixed)} {verb} to the server, whose one "
                                      "executor serves every request: set it in the pool's settings or with --set, "
                                      "not in a preset")
                try:
                    orchestra.run_settings(served.settings.changes())
                except ConfigError as error:
                    raise ConfigError(f"preset {served.id!r}: {error}") from None
        self._api_key = api_key.encode() if api_key else None
        own = orchestra.settings.budget
        if budget is not None and "cap_answers" in own.model_fields_set:  # the server's choice, for its budget too
            budget = budget.model_copy(update={"cap_answers": own.cap_answers})
        self.shared = BudgetTracker(budget, None, name=SERVER_BUDGET) if budget is not None else None
        #: under a limited server budget, a request's run starts only while the budget can be expected
        #: to finish it (a burst would otherwise spend it on keyword samples and finish nothing)
        limited = budget is not None and budget.limited
        self.admission = RunAdmission(self.shared) if self.shared is not None and limited else None
        self.live: Counter[str] = Counter()  # runs in flight, by kind (see ``_measured_kind``)
        self._sizes: dict[str, set[int]] = {}  # the sizes runs of each like were measured at (see ``_kind``)
        self.waiting = 0  # requests waiting for the server's budget to admit their runs
        self.stored = orchestra.store is not None  # whether a failed request's run can be resumed
        self.changed = asyncio.Event()  # a run ended
        self.max_request_bytes = max_request_bytes
        self.created = int(time.time())
        self.closing = False
        #: served models whose answers begin with reasoning ended by a bare ``</think>`` (their chat template
        #: opens the ``<think>``): their streams wait for it, as their stored answers leave out what comes before it,
        #: until one of their answers comes without it
        self.reasoners: set[str] = set()
        self.runs: set[asyncio.Task[RunResult]] = set()
        self._feeds: dict[str, Feed] = {}
        orchestra.events.subscribe(self._on_event)

    # --- routes ----------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        """``POST /v1/chat/completions``."""
        try:
            self._authorize(request)
            completion = parse_completion(await self._body(request))
            served = self.models.get(completion.model)
            if served is None:
                raise WireError(404, f"the model {completion.model!r} does not exist; GET /v1/models lists them",
                                param="model", code="model_not_found")
            if self.closing:
                raise WireError(503, "the server is shutting down; retry on another instance")
            spent = self.shared.reached() if self.shared is not None else None
            if spent is not None:
                raise WireError(429, str(spent), code="insufficient_quota")  # (it names the server's budget)
            kind = self._measured_kind(*_kind(completion))
            if self.admission is not None and not await self._admitted(request, kind):
                return Response(status_code=499)  # the client went away while its request waited
            feed = (Feed(completion.progress, completion.stop, reasons=completion.model in self.reasoners)
                    if completion.stream else None)
            run = self._start(completion, served, feed, kind)
        except WireError as error:
            return _error(error)
        if feed is not None and feed.progress:  # progress starts at once: a failure is the stream's last event
            return self._stream(completion, run, feed, served)
        try:  # the status line waits for the answer's first text (or the whole run), so a failure has its status
            gone = await _client_left(request, run, feed.first if feed is not None else None)
        except asyncio.CancelledError:  # the server stops: the run is recorded as cancelled
            await _stop(run, SHUTTING_DOWN)
            raise
        if gone:  # the client went away: nobody reads the answer
            await _stop(run, CLIENT_GONE)
            return Response(status_code=499)
        if run.done():
            if run.cancelled():
                return _error(await self._shutdown_error(run), run.run_id)  # type: ignore[attr-defined]
            result = run.result()
            failure = _failure(result, self.stored, served, completion)
            if failure is not None:
                return _error(failure.of_run(result), result.run_id)
            if feed is None:
                return JSONResponse(completion_body(_stopped(result, completion), completion.model, completion.created),
                                    headers={RUN_HEADER: result.run_id})
        assert feed is not None
        return self._stream(completion, run, feed, served)

    async def list_models(self, request: Request) -> Response:
        """``GET /v1/models``."""
        try:
            self._authorize(request)
        except WireError as error:
            return _error(error)
        return JSONResponse({"object": "list", "data": [m.card(self.created) for m in self.models.values()]})

    async def get_model(self, request: Request) -> Response:
        """``GET /v1/models/{id}``."""
        try:
            self._authorize(request)
            model_id = request.path_params["model"].removesuffix("/")  # (each path with a trailing slash too)
            served = self.models.get(model_id)
            if served is None:
                raise WireError(404, f"the model {model_id!r} does not exist; GET /v1/models lists them",
                                param="model", code="model_not_found")
        except WireError as error:
            return _error(error)
        return JSONResponse(served.card(self.created))

    async def health(self, request: Request) -> Response:
        """``GET /health``: 200 while serving; 503 once the server's budget is spent (every request
        is refused: a load balancer should send them elsewhere) or it is shutting down (no
        authentication, no details beyond the runs in flight and the requests waiting for the
        server's budget to admit theirs)."""
        if self.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        spent = self.shared is not None and self.shared.reached() is not None
        return JSONResponse({"status": "budget spent" if spent else "ok", "runs_in_flight": len(self.runs),
                             "requests_waiting": self.waiting}, status_code=503 if spent else 200)

    # --- requests --------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self._api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise WireError(401, "missing bearer token: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), self._api_key):
            raise WireError(401, "incorrect API key", code="invalid_api_key")

    async def _body(self, request: Request) -> Any:
        """The JSON body, read up to ``max_request_bytes``."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_request_bytes:
            raise WireError(413, f"the request body is over {self.max_request_bytes} bytes")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.max_request_bytes:
                raise WireError(413, f"the request body is over {self.max_request_bytes} bytes")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise bad_request(f"the request body is not valid JSON ({error})") from None
        except ValueError:  # (an integer of over 4,300 digits: Python's limit on reading one; its message
            # advised a setting of the server's Python, which a client cannot change)
            raise bad_request(f"the request body holds a number too long to read (over "
                              f"{sys.get_int_max_str_digits():,} digits)") from None
        except RecursionError:
            raise bad_request("the request body is JSON nested too deeply to read") from None

    async def _admitted(self, request: Request, kind: str) -> bool:
        """Wait until the server's budget can be expected to finish one more request's run besides
        those in flight (see ``RunAdmission``: until one of its ``kind`` has ended, runs go one at a
        time); a request it cannot be expected to finish is refused (429) before any call. False: the
        client went away while it waited."""
        assert self.admission is not None
        while not self.closing and not self.admission.admits(self.live, kind):
            self.changed.clear()
            self.waiting += 1
            try:
                if await _client_left(request, None, self.changed):
                    return False
            finally:
                self.waiting -= 1
        if self.closing:  # (stopping: ``drain`` woke it)
            raise WireError(503, "the server is shutting down; retry on another instance")
        refused = self.admission.refusal(self.live, kind)
        if refused is not None:
            raise WireError(429, str(refused), code="insufficient_quota")
        return True

    def _measured_kind(self, like: str, size: int) -> str:
        """The kind a request's run is admitted as (see ``_kind``: what it is ``like`` and its
        ``size``): the smallest size at least its own that a run of its like has been measured at
        (what that took bounds what this takes); a larger size than any is expected to cost what
        the largest measured did, times how much longer it may be (unknown, each ran alone). Under a
        budget of calls alone, the size is no measure: every size is one kind."""
        if self.shared is None or (self.shared.budget.max_tokens is None and self.shared.budget.max_cost_usd is None):
            return f"{like} ~0"
        known = self._sizes.get(like)
        if not known:
            return f"{like} ~{size}"
        measured = min((s for s in known if s >= size), default=None)
        if measured is not None:
            return f"{like} ~{measured}"
        largest = max(known)
        if self.admission is not None:  # (each call reads the messages: the most they may have grown, in tokens)
            grown = SIZE_STEP ** (size + 1) - SIZE_STEP ** largest  # (characters; 4 a token, as estimate_tokens)
            self.admission.expect(f"{like} ~{size}", f"{like} ~{largest}", grown / 4)
        return f"{like} ~{size}"

    def _run_ended(self, kind: str, run: asyncio.Task[RunResult]) -> None:
        """Count a request's run of ``kind`` that ended for ``RunAdmission``: what it spent, and (if it
        ended on its own, not cut short by a budget or a cancellation) what a run of its kind takes."""
        assert self.admission is not None
        self.live[kind] -= 1
        if not self.live[kind]:
            del self.live[kind]
        self.changed.set()
        if run.cancelled() or run.exception() is not None:  # what it spent is in the budget's own count
            self.admission.count((0, 0, 0.0), None, kind=kind)
            return
        result = run.result()
        usage = result.usage
        spent = (usage.calls, usage.prompt_tokens + usage.completion_tokens, usage.cost_usd)
        whole = result.status not in ("budget_exceeded", "cancelled")
        self.admission.count(spent, spent if whole else None, kind=kind)
        if whole:
            like, _, size = kind.rpartition(" ~")
            self._sizes.setdefault(like, set()).add(int(size))

    def _check_fits(self, completion: Completion, own: int | None) -> None:
        """Refuse (400) a request that could never be served within the server's token budget or
        its own run's (``own``: that budget's ``max_tokens``): the call that writes the answer
        carries the messages and may take ``max_tokens`` more, so that much is a lower bound of
        what the request needs (what is left of the budget is the run's concern: a 429 when it
        runs out)."""
        limits = [("the server's whole budget", "--total-max-tokens",
                   self.shared.budget.max_tokens if self.shared is not None else None),
                  ("a request's own budget", "budget.max_tokens", own)]
        prompt, answer = estimate_tokens(f"{completion.context}\n{completion.task}"), completion.max_tokens or 0
        for whose, setting, limit in limits:
            if limit is not None and prompt + answer > limit:
                parts = f"about {prompt} of messages" + (f" and up to {answer} of answer" if answer else "")
                name = completion.max_tokens_name
                fix = f"a smaller {name} or a shorter conversation" if answer else "a shorter conversation"
                raise WireError(400, f"this request needs more tokens than {whose} allows ({setting}={limit}): "
                                f"{parts}; send {fix}", param=name if answer > limit else "messages",
                                code="invalid_value")

    def _start(self, completion: Completion, served: ServedModel, feed: Feed | None,
               kind: str) -> asyncio.Task[RunResult]:
        """Begin the request's run of ``kind`` (settings checked first: a bad one is a 400 before any
        call); a streaming request's ``feed`` gets its progress and its answer's text as they come."""
        options: dict[str, Any] = {}
        team = sorted(set(completion.settings) - {"seed"})
        if served.agent is not None and team:  # (they were accepted, and changed nothing)
            raise bad_request(f"{team[0]!r} does not apply to the model {completion.model!r}: that agent answers "
                              "alone, in one call; ask the model 'orchestra' (or a preset) for a team", team[0])
        if served.agent is not None:  # that agent answers alone; pinned, so a resume keeps it
            options = {"experts": {"answer": [served.agent]},
                       "node_settings": {"answer": NodeSettings(agent=served.agent)}}
        if completion.settings.get("k", 0) > MAX_K:
            raise bad_request(f"'k' must be at most {MAX_K}", "k")
        if len(completion.task) > MAX_TASK_CHARS:  # (check_task's words name the planner, which an agent lacks)
            raise WireError(400, f"the last message (the task) is {len(completion.task):,} characters; a request's "
                            f"run takes at most {MAX_TASK_CHARS:,}: shorten it", param="messages",
                            code="context_length_exceeded")
        try:
            check_task(completion.task)
            overrides = served.settings.layered(completion.settings).changes()
            plan = overrides.pop("plan", None)
            settings = self.orchestra.run_settings({**overrides, **({"plan": plan} if plan is not None else {})})
            answer = AnswerOptions(output=completion.output, max_tokens=completion.max_tokens,
                                   temperature=completion.temperature)
        except (ConfigError, ValueError) as error:
            message = str(error).splitlines()[0]
            named = re.search(r"setting ([\w.]+):", message)  # the parameter it is about, as param
            raise bad_request(message, named.group(1) if named else None) from None
        self._check_fits(completion, settings.budget.max_tokens)
        run_id = new_run_id()
        if feed is not None and feed.progress:
            self._feeds[run_id] = feed
        work = self.orchestra.arun(completion.task, run_id=run_id, plan=plan, context=completion.context,
                                   answer=answer, shared_budget=self.shared, **options,
                                   on_answer_text=feed.text if feed is not None else None,
                                   meta={"kind": "serve", "model": completion.model}, **overrides)
        task = asyncio.ensure_future(work)
        self.runs.add(task)
        task.add_done_callback(self.runs.discard)
        task.add_done_callback(lambda _: self._feeds.pop(run_id, None))
        task.run_id = run_id  # type: ignore[attr-defined]
        if self.admission is not None:
            self.live[kind] += 1
            task.add_done_callback(partial(self._run_ended, kind))
        return task

    def _on_event(self, event: Event) -> None:
        if event.kind in PROGRESS_EVENTS:
            feed = self._feeds.get(getattr(event, "run_id", ""))
            if feed is not None:
                said = event.to_dict()
                for field in ("error", "reason"):  # (a failed node's error may name an endpoint)
                    if isinstance(said.get(field), str):
                        said[field] = for_clients(said[field])
                feed.items.put_nowait(("progress", said))

    def _stream(self, completion: Completion, run: asyncio.Task[RunResult], feed: Feed,
                served: ServedModel) -> Response:
        """The answer as server-sent chunks: progress events (when asked for) and the answer's text
        as they come, then whatever of the answer was not streamed, the finish and usage chunks."""
        run_id: str = run.run_id  # type: ignore[attr-defined]
        writer = ChunkWriter(run_id, completion.model, completion.created, include_usage=completion.include_usage)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                yield writer.role()
                async for kind, item in _feed_until(run, feed):
                    yield writer.progress(item) if kind == "progress" else writer.chunk({"content": item})
                await asyncio.wait({run})
                failure = (await self._shutdown_error(run) if run.cancelled()
                           else _failure(run.result(), self.stored, served, completion))
                if failure is not None and not run.cancelled():
                    failure.of_run(run.result())
                if failure is not None:  # the status line is sent already: the error is the last event
                    yield sse(failure.body())
                    return
                result = _stopped(run.result(), completion)
                if feed.rewritten(result.answer or ""):  # what was streamed is not its beginning: say so, not "stop"
                    if feed.reasoned:
                        self.reasoners.add(completion.model)
                    yield sse(_diverged(result, self.stored, feed))
                    return
                if feed.reasons and "</think>" not in feed.said.lower():  # (its answers no longer reason so)
                    self.reasoners.discard(completion.model)
                for chunk in writer.content(feed.rest(result.answer or "")):
                    yield chunk
                for chunk in writer.end(result):
                    yield chunk
            finally:
                if not run.done():  # the client went away mid-stream
                    await _stop(run, CLIENT_GONE)

        return StreamingResponse(chunks(), media_type="text/event-stream",
                                 headers={RUN_HEADER: run_id, "cache-control": "no-cache"})

    async def _shutdown_error(self, run: asyncio.Task[RunResult]) -> WireError:
        """The error of a run the server cancelled, saying what its calls spent, as recorded once its
        requests still in flight are cut off (the server is stopping: they were billed, and the body
        said 5 requests where the endpoint had 7)."""
        await self.orchestra.executor.stop_in_flight()
        error = _cancelled(run, self.stored)
        stopped = self.orchestra.ended(run.run_id)  # type: ignore[attr-defined]
        return error.of_run(stopped) if stopped is not None else error

    def drain(self) -> None:
        """Refuse new requests, and those still waiting for the server's budget to admit their runs,
        with a 503 (they started paid runs during the grace); the runs in flight go on."""
        self.closing = True
        self.changed.set()

    def cancel_runs(self) -> None:
        """Cancel every run in flight (each is recorded as cancelled and stays resumable); their
        clients get a 503 naming the run."""
        self.closing = True
        for run in list(self.runs):
            run.cancel(SHUTTING_DOWN)

    async def shutdown(self) -> None:
        """Refuse new requests, cancel the runs still in flight (each is recorded as cancelled, so
        it stays resumable), and close the orchestra's models and connections."""
        self.closing = True
        for run in list(self.runs):
            await _stop(run, SHUTTING_DOWN)
        await self.orchestra.aclose()


class Feed:
    """What a streaming response relays while its run works: the plan's progress (when asked for)
    and the answer's text as the call that writes it streams.

    Only text that the finished answer will begin with is relayed: leading and trailing
    whitespace and a leading ``<think>`` section wait (the answer is stored without them), and
    once the text so far stops extending what was sent (a retried request that wrote otherwise, or
    a bare ``</think>`` ending reasoning that had been relayed as text), relaying stops. A retry's
    text that is still a beginning of what was sent is waited on: relaying goes on once it extends
    what was sent (a seeded retry writes the same text again). With ``reasons`` (a model known to
    end its reasoning with a bare ``</think>``), nothing is relayed before one.
    """

    def __init__(self, progress: bool, stop: tuple[str, ...] = (), *, reasons: bool = False) -> None:
        self.progress = progress
        self.stop = stop
        #: the text held back at the end: it may begin a stop sequence
        self.held = max(map(len, stop), default=1) - 1
        self.items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.first = asyncio.Event()
        self.sent = ""
        self.diverged = False
        self.reasons = reasons
        self.said = ""  # the text so far as last given
        self.retried = False  # whether the text so far once started again (a retried request)
        self.reasoned = False  # whether relaying stopped at a bare ``</think>``: what was sent was reasoning

    def text(self, so_far: str) -> None:
        """The answer-writing call's text so far."""
        self.retried = self.retried or not so_far.startswith(self.said)
        self.said = so_far
        visible = _visible(so_far, self.reasons)
        if self.stop:  # up to a stop sequence, or short of the end where one may be starting
            cut = stopped(visible, self.stop)
            visible = cut if cut is not None else visible[:max(0, len(visible) - self.held)]
        if self.diverged or self.sent.startswith(visible):
            return
        if not visible.startswith(self.sent):
            self.diverged = True
            self.reasoned = not self.retried and "</think>" in so_far.lower()
            return
        self.items.put_nowait(("text", visible[len(self.sent):]))
        self.sent = visible
        self.first.set()

    def rewritten(self, answer: str) -> bool:
        """Whether what was sent is not the finished answer's beginning (the stream cannot take it back)."""
        return self.diverged or not answer.startswith(self.sent)

    def rest(self, answer: str) -> str:
        """What of the finished answer is still to send (see ``rewritten``)."""
        return answer[len(self.sent):]


def _visible(text: str, reasons: bool = False) -> str:
    """The part of a streaming answer the finished one will begin with (see ``strip_reasoning``);
    with ``reasons``, nothing before a ``</think>``."""
    text = text.lstrip()
    lowered = text.lower()
    if "</think>" in lowered:
        text = text[lowered.rindex("</think>") + len("</think>"):].lstrip()
    elif reasons or lowered.startswith("<think>") or "<think>".startswith(lowered):
        return ""
    return text.rstrip()


async def _client_left(request: Request, run: asyncio.Task[RunResult] | None, event: asyncio.Event | None) -> bool:
    """Wait until ``run`` ends or ``event`` is set (whichever is given); True when the client
    disconnects before either."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    ours: set[asyncio.Future[Any]] = {watcher}
    if event is not None:
        ours.add(asyncio.ensure_future(event.wait()))
    try:
        await asyncio.wait(ours | ({run} if run is not None else set()), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in ours:
            waiter.cancel()
    return (watcher.done() and not watcher.cancelled() and not (run is not None and run.done())
            and not (event is not None and event.is_set()))


async def _feed_until(run: asyncio.Task[RunResult], feed: Feed) -> AsyncIterator[tuple[str, Any]]:
    """The feed's items as they come, until the run finishes (those already queued included)."""
    while not run.done():
        getter = asyncio.ensure_future(feed.items.get())
        done, _ = await asyncio.wait({getter, run}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            yield getter.result()
        else:
            getter.cancel()
    while not feed.items.empty():
        yield feed.items.get_nowait()


#: why ``serve`` cancels a run (recorded as its error, and its nodes')
CLIENT_GONE = "cancelled: the client disconnected"
SHUTTING_DOWN = "cancelled: the server is shutting down"


async def _stop(run: asyncio.Task[RunResult], reason: str) -> None:
    """Cancel a run and wait until it has recorded itself as cancelled, with ``reason``."""
    run.cancel(reason)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await run


def base_url(host: str, port: int) -> str:
    """The base URL clients give an OpenAI SDK for a server listening on ``host`` (an IPv6 address
    bracketed, as a URL writes it) and ``port``."""
    return f"http://[{host}]:{port}/v1" if ":" in host else f"http://{host}:{port}/v1"


def _kept(run_id: str, stored: bool) -> str:
    """How to finish a request's run that did not: resume it, or (with no store) nothing to resume."""
    if stored:
        return f"run {run_id} is saved: `{command('resume', run_id)}` finishes it"
    return f"run {run_id} was not saved (the server runs with --no-store)"


def _cancelled(run: asyncio.Task[RunResult], stored: bool) -> WireError:
    """The error of a run the server cancelled (a second Ctrl-C, or its shutdown)."""
    run_id = run.run_id  # type: ignore[attr-defined]
    then = (f"`{command('resume', run_id)}` finishes it" if stored
            else "it was not saved (the server runs with --no-store)")
    return WireError(503, f"the server is shutting down and cancelled run {run_id}; {then}")


def _diverged(result: RunResult, stored: bool, feed: Feed) -> dict[str, Any]:
    """The last event of a stream whose text the answer does not begin with (the call writing it
    broke off mid-stream and its retry wrote otherwise, or its model's reasoning ended in a bare
    ``</think>``): an error naming the run, the whole answer beside it (``answer``), since a stream
    cannot take back the text it sent."""
    stored_too = f" and in run {result.run_id} ({command('show', result.run_id)})" if stored else ""
    voted = any(line.endswith(VOTED_INSTEAD) for node in result.plan.nodes if node.recruitment
                for line in node.recruitment.get("explanation", ()))  # (its aggregator failed as it streamed)
    if voted:
        why = "the aggregator writing the answer failed mid-stream and a vote of the experts answered instead"
    elif UNSYNTHESIZED in (result.error or ""):
        why = f"the final synthesis failed mid-stream and {UNSYNTHESIZED}"
    elif feed.reasoned:
        why = ("the model writing the answer ended its reasoning with a </think> after that reasoning had streamed "
               "(the answer leaves it out; this model's later streams here wait for the </think>)")
    elif feed.retried:
        why = "the call writing the answer broke off mid-stream and its retry wrote another answer"
    else:
        why = "the answer was finished otherwise than its call streamed it"
    body = WireError(502, f"{why}, so the text streamed is not the answer; the answer is under 'answer' "
                          f"here{stored_too}", code="answer_rewritten").body()
    body["error"]["answer"] = result.answer
    return body


#: an address in an error's text (an endpoint's URL)
def _stopped(result: RunResult, completion: Completion) -> RunResult:
    """The run's result as the client gets it: its answer before the first of the request's stop
    sequences in it (the run keeps it whole), finished by that stop."""
    cut = stopped(result.answer, completion.stop) if completion.stop and result.answer else None
    return result if cut is None else result.model_copy(update={"answer": cut, "answer_cut": False})


def _kind(completion: Completion) -> tuple[str, int]:
    """What a request's run costs like, for the server budget's admission: the model it names (an
    agent answers in one call, a team in many, a preset as it sets), the settings it sends (but its
    seed, which changes no cost), and the size of its messages, in steps of ``SIZE_STEP`` (every
    expert and the aggregator read them: a run measured on "hi" was taken for what a run of 1,600
    characters takes, and a burst of those started at once and spent the budget with no answer)."""
    settings = {name: value for name, value in completion.settings.items() if name != "seed"}
    size = len(completion.context) + len(completion.task)
    return f"{completion.model} {json.dumps(settings, sort_keys=True, default=str)}", int(math.log(size + 1, SIZE_STEP))


#: how much longer one request's messages are than another's before a server budget's admission
#: no longer takes what a run of the one cost for what a run of the other may cost
SIZE_STEP = 1.25


#: how servers say a prompt is longer than the model's context (vLLM, llama.cpp, LiteLLM, OpenAI)
_CONTEXT_EXCEEDED = re.compile(r"maximum context length|context_length_exceeded|exceeds? the (?:model's )?context"
                               r"|context window|requested \d+ tokens", re.IGNORECASE)


def _failure(result: RunResult, stored: bool, served: ServedModel, completion: Completion) -> WireError | None:
    """The error a finished run answers with, if any: 429 for a budget, 503 for endpoints that
    cannot be used (a key, an address), 400 for a structured answer the request's ``max_tokens``
    cut (a resume keeps that limit), 502 when the run failed otherwise (``stored``: whether it can
    be resumed; ``served``: the model id the request named, whose preset may set its budget;
    ``completion``: the request)."""
    if result.status == "done" or (result.status == "partial" and result.answer):
        return None
    reason = for_clients(result.error or "no answer")
    max_tokens, name = completion.max_tokens, completion.max_tokens_name
    if max_tokens is not None and f"reached max_tokens={max_tokens} before it was complete" in reason:
        # (it advised `orchestra resume`, which sent the same capped calls and failed the same way)
        return WireError(400, f"the answer's JSON needs more than {name}={max_tokens}: {reason}; send the "
                         f"request again with a larger {name} (a resume would keep this one)", param=name)
    if _CONTEXT_EXCEEDED.search(reason):  # (it advised a resume, which sent the same prompts and failed alike)
        return WireError(400, f"the messages do not fit the experts' context: {reason}; send shorter messages (a "
                         "resume would send the same prompts)", param="messages", code="context_length_exceeded")
    kept = _kept(result.run_id, stored)
    if result.status == "budget_exceeded":
        # the run's own budget stays its own on resume: the advice says what to raise
        # (a resume is not under the server's budget, so one that stopped it needs nothing raised)
        limit = None if reason.startswith(SERVER_BUDGET) else next(
            (name for name in BUDGET_FLAGS if f"budget {name}=" in reason), None)
        if limit is not None:
            flag = BUDGET_FLAGS[limit]
            preset = served.kind == "preset" and limit in served.settings.changes().get("budget", {})
            bound = (f"model {served.id!r} is a preset that sets budget.{limit}" if preset
                     else f"each request's run has the server's {flag} (budget.{limit} in its settings)")
            resume = command("resume", result.run_id, flag, "N")
            kept = (f"run {result.run_id} is saved and keeps its budget: `{resume}`, N above it, goes on with it "
                    f"({bound})") if stored else f"{bound}; {kept}"
        return WireError(429, f"budget exhausted: {reason}; {kept}", code="insufficient_quota")
    if result.status == "cancelled":
        return WireError(503, f"the run was cancelled: {reason}; {kept}")
    if result.user_error:
        return WireError(503, f"the experts' endpoints cannot be used: {reason}; {kept}")
    return WireError(502, f"the run failed: {reason}; {kept}")


def _error(error: WireError, run_id: str | None = None) -> JSONResponse:
    headers = {RUN_HEADER: run_id} if run_id else {}
    if error.status == 401:
        headers["www-authenticate"] = "Bearer"
    # a spent budget stays spent, and a request whose run ended without an answer (after Orchestra's
    # own retries) would start another run, paid again: SDKs that retry a 429 or a 5xx need not
    if error.code == "insufficient_quota" or run_id:
        headers["x-should-retry"] = "false"
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def served_models(pool: Pool, presets: Mapping[str, Settings | Mapping[str, Any]]) -> dict[str, ServedModel]:
    """Every model id the server answers to; a preset named like an agent (or ``orchestra``), and an
    agent named ``orchestra``, are refused."""
    models = {ORCHESTRA_MODEL: ServedModel(ORCHESTRA_MODEL, "orchestra", Settings(),
                                           description=f"pool {pool.name}: plan, recruit, aggregate")}
    for name, layer in {**pool.presets, **presets}.items():
        if not name or not name.isprintable() or any(character.isspace() for character in name):
            raise ConfigError(f"preset {name!r} is no model id a client can send (it was listed, and every request "
                              "naming it refused); name it without spaces, e.g. 'fast'")
        if name == ORCHESTRA_MODEL or name in pool:
            taken = "the orchestra" if name == ORCHESTRA_MODEL else "an agent"
            raise ConfigError(f"preset {name!r} has the name of {taken}; rename the preset")
        settings = Settings.layer(layer, where=f"preset {name}")
        models[name] = ServedModel(name, "preset", settings, description="the orchestra with "
                                   + (", ".join(f"{k}={v}" for k, v in settings.changes().items()) or "no changes"))
    for agent in pool.agents:
        if agent.name == ORCHESTRA_MODEL:  # (it hid the team: no request could reach it)
            raise ConfigError(f"agent {ORCHESTRA_MODEL!r} has the name serve gives the team; rename the agent in "
                              "the pool")
        models[agent.name] = ServedModel(agent.name, "agent", Settings.layer({"plan": False, "k": 1}), agent=agent.name,
                                         description=agent.description or f"agent {agent.name} alone")
    return models


def read_presets(path: Path) -> dict[str, Settings]:
    """A presets file: a YAML mapping of model ids to settings layers; an error names the line."""
    from orchestra.yamlfile import read_yaml

    document = read_yaml(path)
    if not isinstance(document.data, dict):
        raise document.error("a presets file maps model ids to settings, e.g. 'vote: {aggregate: vote}'")
    return {str(name): document.validate(Settings, (name,)) for name in document.data}


def run(application: Starlette, *, host: str = "127.0.0.1", port: int = 8000, grace: float = 30.0) -> None:
    """Serve ``application`` with uvicorn until Ctrl-C, SIGTERM or SIGHUP; runs in flight get ``grace``
    seconds to finish, then are cancelled (and stay resumable)."""
    import uvicorn

    class Uvicorn(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # ours below: a stop is a clean exit, not a re-raised signal
            yield

    # the grace is kept here: runs still going when it ends are cancelled, so their clients get a
    # 503 naming the run; uvicorn's own limit only catches connections that do not close after that
    server = Uvicorn(uvicorn.Config(application, host=host, port=port, log_level="warning",
                                    timeout_graceful_shutdown=math.ceil(grace) + 30))
    served: Server = application.state.server

    def cancel() -> None:  # (the operator was told nothing of the runs cut off: only their clients were)
        cut = sorted(getattr(run, "run_id", "") for run in served.runs if not run.done())
        if cut:
            print(f"orchestra serve: cancelled {counted(len(cut), 'run')} still in flight, each resumable "
                  f"(`{command('resume', cut[0])}`): {', '.join(cut)}", file=sys.stderr, flush=True)
        served.cancel_runs()

    def stop() -> None:  # the first signal drains; a second one (or the grace's end) cancels the runs in flight
        if server.should_exit:
            cancel()
            return
        server.should_exit = True
        served.drain()
        print("orchestra serve: stopping; " + (f"{len(served.runs)} run(s) in flight get {grace:g} s to finish "
                                                "(Ctrl-C again cancels them, resumable)" if served.runs
                                                else "no run in flight"), file=sys.stderr, flush=True)
        asyncio.get_running_loop().call_later(grace, cancel)

    try:  # bound here, so an address in use is one line rather than uvicorn's exit
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
    except OSError as error:
        raise ConfigError(f"cannot listen on {host}:{port} ({error.strerror or error}); choose another --port "
                          "or --host") from None

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):  # (a closed terminal ended it, with no grace)
            sig = getattr(signal, name, None)  # (Windows has no SIGHUP)
            if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:  # (nohup's SIGHUP left ignored)
                loop.add_signal_handler(sig, stop)
        serving = asyncio.ensure_future(server.serve(sockets=[listener]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.02)
        await asyncio.sleep(0) if server.started else await serving
        bound = server.servers[0].sockets[0].getsockname()
        models = ", ".join(served.models)
        print(f"orchestra serve: {base_url(bound[0], bound[1])} · models: {models} · Ctrl-C stops", flush=True)
        await serving

    asyncio.run(main())


#: a browser's ``Origin``: a scheme, a host and maybe a port, nothing after them
_ORIGIN = re.compile(r"(https?)://([a-z0-9.-]+|\[[0-9a-f:.]+\])(:[0-9]{1,5})?")


def check_origins(origins: Sequence[str], name: str = "CORS origin") -> list[str]:
    """The origins browser pages may call the server from (``*``: any), as browsers write them
    (scheme and host in lower case); one that no browser would send (a path, a trailing slash, no
    scheme) is refused: it would match nothing, and every call from that page would fail. ``name``:
    what the error calls an origin (the command line's option)."""
    checked = []
    for origin in origins:
        if not isinstance(origin, str):
            raise ConfigError(f"{name} {origin!r}: write it as text, e.g. http://localhost:3000")
        written = origin.strip().lower()
        if written != "*" and not _ORIGIN.fullmatch(written):
            bare = re.match(r"(https?://[^/?#\s]+)", written)
            hint = f" (here: {bare.group(1)})" if bare else ""
            raise ConfigError(f"{name} {origin!r}: an origin is scheme://host[:port] with nothing after it, as a "
                              f"browser sends it{hint}; or * for any")
        checked.append(written)
    return checked


def app(pool: Pool | str | Path | None = None, settings: Settings | Mapping[str, Any] | None = None, *,
        store: RunStore | str | Path | bool | None = None, presets: Mapping[str, Any] | None = None,
        api_key: str | None = None, budget: Budget | None = None,
        max_request_bytes: int = MAX_REQUEST_BYTES, cors_origins: Sequence[str] = ()) -> Starlette:
    """The OpenAI-compatible ASGI app for ``pool`` (see ``Server`` for the arguments); its
    ``state.server`` is the ``Server``. Shutting the app down cancels the runs still in flight.
    ``cors_origins``: the origins browser pages may call it from (``["*"]``: any; none by default):
    their preflight requests are answered, any request header allowed (the ``openai`` JavaScript
    SDK sends its own), and ``x-orchestra-run-id`` readable; no cookies are involved."""
    origins = check_origins(cors_origins)
    server = Server(Orchestra(pool, settings, store=store), presets=presets, api_key=api_key, budget=budget,
                    max_request_bytes=max_request_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        try:
            with paced_for_streams():  # (requests in flight are runs in flight, as in a data set)
                yield
        finally:
            await server.shutdown()

    async def not_routed(request: Request, error: Exception) -> Response:
        status = getattr(error, "status_code", 404)
        message = (f"no route {request.method} {request.url.path}; the API is POST /v1/chat/completions, "
                   "GET /v1/models, GET /v1/models/{id}, GET /health")
        answer = _error(WireError(status, message, code="not_found" if status == 404 else "method_not_allowed"))
        answer.headers.update(getattr(error, "headers", None) or {})  # (a 405's Allow: HTTP requires it)
        return answer

    # each path with a trailing slash too: Starlette redirected one (a POST's 307 to a URL made from
    # the Host header), and `GET /v1/models/` asked for the model '' (a 404)
    routes = [(path, endpoint, method) for bare, endpoint, method in (
        ("/v1/chat/completions", server.completions, "POST"), ("/v1/models", server.list_models, "GET"),
        ("/health", server.health, "GET")) for path in (bare, f"{bare}/")]
    application = Starlette(exception_handlers={404: not_routed, 405: not_routed}, routes=[
        *(Route(path, endpoint, methods=[method]) for path, endpoint, method in routes),
        Route("/v1/models/{model:path}", server.get_model, methods=["GET"]),
    ], lifespan=lifespan, middleware=[
        Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"], allow_headers=["*"],
                   expose_headers=[RUN_HEADER], max_age=600)] if origins else None)
    application.router.redirect_slashes = False
    application.state.server = server
    return application

