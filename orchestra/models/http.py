"""HTTP endpoints: one server's shared connections and limits, given to its models; retries with backoff."""

from __future__ import annotations

import abc
import asyncio
import copy
import email.utils
import html
import json
import math
import numbers
import os
import re
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic_core import to_json

from orchestra.errors import (
    AuthenticationError,
    BadResponse,
    ConfigError,
    ConnectionBroke,
    EndpointNotFound,
    EndpointUnreachable,
    FeatureRefused,
    ModelError,
    RateLimited,
    RequestRejected,
    RequestTimeout,
)
from orchestra.models.base import ModelBase, check_wanted, check_whole, notify_downgrade, notify_retry
from orchestra.models.deadlines import Deadlines
from orchestra.models.metering import charge, count_request, take_back_request
from orchestra.models.negotiation import Capabilities, refused_feature
from orchestra.models.transport import (
    CONNECTED,
    AiohttpTransport,
    Answer,
    Chunks,
    Headers,
    Transport,
    TransportFactory,
    connect_failure,
    is_event_stream,
)
from orchestra.models.types import ChatRequest, Usage
from orchestra.terminal_text import counted

DEFAULT_MAX_CONCURRENCY = 16


#: statuses a request is sent again after: a timeout, a conflict, a rate limit and every 5xx but 501
#: and 505 (what the server does not implement: asking again changes nothing); a proxy's 520-524 too
RETRY_STATUSES = frozenset({408, 409, 429, *range(500, 600)}) - {501, 505}
#: how long a key the server refused (401) is refused again without a request (a key changed in the
#: environment is tried at once; a long-lived process tries the same key again after this)
REFUSED_KEY_SECONDS = 10.0
#: how long requests wait for the one probing an untried feature: a server refuses a field as it reads
#: the request, so a probe still unanswered by then is being answered, and they go ahead carrying it too
#: (a long first answer held every other request to its endpoint until it ended)
PROBE_WAIT_SECONDS = 3.0
#: how long a model the endpoint has no API for (a 404, a redirect: a base_url without its /v1, a model id
#: it does not serve) fails again without a request (an evaluation sent every item's requests into 404s);
#: a model pulled meanwhile is asked again after this
NOT_FOUND_SECONDS = 10.0


class _Retryable(Exception):
    """A failure worth another attempt; carries the final error to raise when attempts run out."""

    def __init__(self, final: ModelError, retry_after: float | None = None, now: str | None = None) -> None:
        super().__init__(now or str(final))  # what this attempt met (the retry notice says it), else the final error
        self.final = final
        self.retry_after = retry_after


#: a 400 that says the model named is none the server serves (LiteLLM's "Invalid model name passed in
#: model=x": every call was sent, 7 of them, and the run ended 1 rather than as the 404 it is)
_UNKNOWN_MODEL = re.compile(r"invalid model name|model_not_found", re.IGNORECASE)


def _cut_by_deadline(failure: _Retryable, delay: float, policy: CallPolicy) -> ModelError:
    """The final error of a call whose next attempt would begin past its deadline, saying so (a 429
    whose Retry-After outlasts the deadline advised lowering the concurrency, after 1 of 3 attempts)."""
    final = failure.final
    if "deadline" not in str(final):
        asked = " as Retry-After asked" if failure.retry_after is not None else ""
        final.args = (f"{final} (the next attempt, {delay:g} s later{asked}, would begin past the call's "
                      f"deadline of {policy.deadline:g} s: raise deadline on the model to wait for it)",)
    return final


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class RateLimiter:
    """Spaces request starts so no more than ``rpm`` begin in any minute, over every event loop
    and thread that uses it (a slot is booked under a thread lock, then awaited)."""

    def __init__(self, rpm: float) -> None:
        self.interval = 60.0 / rpm
        self._next = 0.0
        self._lock = threading.Lock()

    async def acquire(self) -> None:
        """Wait for the next free slot."""
        with self._lock:
            now = time.monotonic()
            wait = self._next - now
            self._next = max(now, self._next) + self.interval
        if wait > 0:
            await asyncio.sleep(wait)


@dataclass
class _LoopState:
    """An endpoint's transport (its connections) and concurrency semaphore in one event loop."""

    transport: Transport
    semaphore: asyncio.Semaphore
    closer: AsyncGenerator[None, None]
    probe: asyncio.Lock  # held by the one request that finds out whether the server takes a feature
    deadlines: Deadlines  # each attempt's time limit
    #: probes that failed other than by a refused feature (unreachable, a refused key, timeouts, 5xx,
    #: 429...), and the last one's error while no request has succeeded since: the requests that waited
    #: for them do not each probe in turn, nor do later ones wait for a probe (see ``post_negotiated``)
    probes_failed: int = 0
    failing: Exception | None = None
    #: the last key the server refused (HTTP 401), when, and its error: requests with that key in the
    #: next ``REFUSED_KEY_SECONDS`` fail with it unsent (calls queued behind the refusal, by a budget's
    #: reservation or the concurrency and rate limits, would each be refused alike)
    refused: tuple[str | None, float, str] | None = None
    #: per (URL, model) the endpoint has no API for, when and the error: requests for it in the next
    #: ``NOT_FOUND_SECONDS`` fail with it unsent
    not_found: dict[tuple[str, str], tuple[float, EndpointNotFound]] = field(default_factory=dict)


@dataclass(frozen=True)
class CallPolicy:
    """How long and how often one model's calls may try (each model has its own; the endpoint's
    connection and rate limits are shared).

    Attributes:
        timeout: seconds one attempt may take (the whole answer, not each read).
        deadline: seconds one call may take from its first attempt, every attempt and retry wait included
            (not its wait for a concurrency slot or the rate limit before that).
        max_attempts: attempts per call, retries included.
        max_wait: the longest wait between attempts (a longer ``Retry-After`` fails at once).
    """

    timeout: float = 120.0
    deadline: float = 300.0
    max_attempts: int = 4
    max_wait: float = 60.0

    @classmethod
    def of(cls, *, timeout: float | None = None, deadline: float | None = None,
           max_attempts: int | None = None) -> CallPolicy:
        """A policy with the given values, the defaults for the rest; one that cannot be a time or a
        count is a ``ConfigError`` (``timeout=0`` failed every call blaming a deadline that had not
        run out, and ``max_attempts=0`` meant one), as a pool file's is."""
        for name, value in (("timeout", timeout), ("deadline", deadline)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value < math.inf):
                raise ConfigError(f"{name} must be a number of seconds above 0, not {type(value).__name__} {value!r}")
        if max_attempts is not None:
            check_whole("max_attempts", max_attempts, 1)
        default = cls()
        return cls(timeout=default.timeout if timeout is None else timeout,
                   deadline=default.deadline if deadline is None else deadline,
                   max_attempts=default.max_attempts if max_attempts is None else max_attempts)


class Endpoint:
    """One server (base URL and API key variable) with the limits every model on it shares.

    Made once and given to each model that talks to the server (a pool file makes one per
    server): its limits are fixed when it is made (read-only afterwards), so they hold whatever
    the order in which models are made or event loops started. Async resources belong to an event
    loop, so the connections and the concurrency semaphore are made per running loop (a sync
    wrapper that runs ``asyncio.run`` twice gets fresh ones), always from the same limits:
    ``max_concurrency`` holds within each loop (loops running at once in several threads get it
    each), ``rpm`` over all of them. A loop's connections are closed by ``aclose()`` in that loop,
    or when the loop shuts down (``asyncio.run`` does). ``async with endpoint:`` closes them too.

    Args:
        base_url: the API root (``http(s)://host.../v1``).
        api_key_env: the environment variable holding the key; None sends no key.
        max_concurrency: requests in flight at once, over every model on this endpoint.
        rpm: requests started per minute, over every model on this endpoint.
        transport: makes the transport for each event loop from the connection limit (default:
            ``AiohttpTransport``; ``lambda n: HttpxTransport(any httpx transport)`` works too).
    """

    def __init__(self, base_url: str, *, api_key_env: str | None = None,
                 max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
                 rpm: float | None = None, transport: TransportFactory = AiohttpTransport) -> None:
        try:
            check_base_url(base_url)
            check_key_env(api_key_env)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        whole = isinstance(max_concurrency, numbers.Integral) and not isinstance(max_concurrency, bool)
        if not whole or max_concurrency < 1:  # (2.5 failed at the first batch with a TypeError, True read as 1)
            raise ConfigError(f"{display_url(base_url)}: max_concurrency must be a whole number >= 1, "
                              f"not {max_concurrency!r}")
        if rpm is not None and (isinstance(rpm, bool) or not isinstance(rpm, numbers.Real)
                                or not math.isfinite(rpm) or rpm <= 0):  # (nan meant no limit; "60" a TypeError)
            raise ConfigError(f"{display_url(base_url)}: rpm must be a finite number > 0 (or None: no limit), "
                              f"not {rpm!r}")
        self._base_url = base_url.rstrip("/")
        self._api_key_env = api_key_env
        self._max_concurrency = int(max_concurrency)
        self._rpm = rpm
        self._limiter = RateLimiter(rpm) if rpm else None
        self._transport = transport
        self._shown_urls: dict[str, str] = {}
        self.capabilities = Capabilities()
        self._states: dict[int, tuple[asyncio.AbstractEventLoop, _LoopState]] = {}

    base_url = property(lambda self: self._base_url, doc="The API root, without a trailing slash.")
    api_key_env = property(lambda self: self._api_key_env, doc="The variable holding the key (None: no key).")
    max_concurrency = property(lambda self: self._max_concurrency, doc="Requests in flight at once.")
    rpm = property(lambda self: self._rpm, doc="Requests started per minute (None: unlimited).")

    def __repr__(self) -> str:
        return f"Endpoint({display_url(self._base_url)!r}, max_concurrency={self._max_concurrency}, rpm={self._rpm})"

    async def _state(self) -> _LoopState:
        """The running loop's connections and semaphore, made from the fixed limits on first use."""
        loop = asyncio.get_running_loop()
        entry = self._states.get(id(loop))
        if entry is not None and entry[0] is loop:
            return entry[1]
        for key in [k for k, (other, _) in self._states.items() if other.is_closed()]:
            del self._states[key]
        transport = self._transport(self._max_concurrency)
        state = _LoopState(transport=transport, semaphore=asyncio.Semaphore(self._max_concurrency),
                           closer=_closes_with_loop(transport), probe=asyncio.Lock(), deadlines=Deadlines())
        self._states[id(loop)] = (loop, state)
        await state.closer.__anext__()  # started in this loop, so the loop closes it when it shuts down
        return state

    async def aclose(self) -> None:
        """Close the connections opened in the running loop (the next request opens new ones).
        Those of another loop close when it shuts down; those of closed loops are dropped."""
        loop = asyncio.get_running_loop()
        for key, (owner, state) in list(self._states.items()):
            if owner is loop or owner.is_closed():
                del self._states[key]
            if owner is loop:
                await state.closer.aclose()

    async def __aenter__(self) -> Endpoint:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def api_key(self) -> str | None:
        """The key from the environment, without the whitespace around it (a copy from a ``.env`` file
        may end in a newline); a variable not set, empty, or holding a control character is an
        ``AuthenticationError`` (the last was the HTTP client's error, naming no variable)."""
        if not self._api_key_env:
            return None
        variable, url = self._api_key_env, display_url(self._base_url)
        key = os.environ.get(variable)
        if key is None:
            raise AuthenticationError(f"environment variable {variable} is not set; export it to use {url}")
        key = key.strip()
        if not key:
            raise AuthenticationError(f"environment variable {variable} is set but empty; put the key in it to use "
                                      f"{url}")
        if any(ord(c) < 32 or ord(c) == 127 for c in key):
            raise AuthenticationError(f"environment variable {variable} holds a control character (a newline?); "
                                      "set it to the key alone")
        return key

    async def post_negotiated(self, path: str, build: Callable[[Capabilities], dict[str, Any]], *, model: str,
                              headers: Callable[[str | None], dict[str, str]], policy: CallPolicy,
                              stream: Callable[[], Chunks] | None = None,
                              complete: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, Any]:
        """POST the request ``build`` makes for what this server is known to accept.

        When the server refuses an optional feature (``FeatureRefused``), the refusal is
        remembered for every model on the endpoint and the request rebuilt without it; it is never
        retried as it was. While a feature is untried, one request at a time (per event loop)
        carries it and the others wait for its answer, so a refusal costs one request; they wait
        ``PROBE_WAIT_SECONDS`` at most (a refusal comes at once, an answer may take minutes).
        ``stream``, ``complete``: see ``post_json``.
        """
        while True:
            known = len(self.capabilities.refused)
            refused_before = set(self.capabilities.refused)
            payload = build(self.capabilities)
            probe = state = None
            if self.capabilities.unknown(payload):
                state = await self._state()
                if state.failing is None or isinstance(state.failing, AuthenticationError):
                    probe, failed = state.probe, state.probes_failed
                    if not await _acquired(probe, PROBE_WAIT_SECONDS):
                        probe = None  # the probe is being answered: this one goes ahead beside it
                    elif state.probes_failed != failed and state.failing is not None:
                        # the probe it waited for failed: a refused key would be refused again; an endpoint
                        # that is down, slow or erroring is tried by all the waiters at once (it may be
                        # back), each with its own retries, not one after another
                        probe.release()
                        if isinstance(state.failing, AuthenticationError):
                            raise AuthenticationError(str(state.failing))
                        probe = None
                    elif len(self.capabilities.refused) != known or not self.capabilities.unknown(payload):
                        probe.release()  # another request found out meanwhile: build again from what it learnt
                        continue
                # else the last probe failed at the endpoint and nothing has succeeded since: no request
                # waits for another (a refused feature may then cost one request each)
            try:
                body = await self.post_json(path, payload, model=model, headers=headers, policy=policy, stream=stream,
                                            complete=complete)
            except FeatureRefused as refusal:
                if refusal.feature in refused_before:  # sent although known refused (extra_body): nothing to drop
                    raise
                if refusal.feature not in self.capabilities.refused:  # (else one sent beside the probe learnt it)
                    self.capabilities.refuse(refusal.feature, str(refusal))
                    notify_downgrade(model, refusal.feature, str(refusal))
                continue
            except Exception as failure:
                # a request the server rejected for itself (too long, an unknown model) says nothing of
                # the endpoint: the next request probes as before
                if probe is not None and state is not None and not isinstance(failure, RequestRejected):
                    state.probes_failed += 1
                    state.failing = failure
                raise
            finally:
                if probe is not None:
                    probe.release()
            self.capabilities.accept(payload)
            return body

    async def post_json(self, path: str, payload: dict[str, Any], *, model: str,
                        headers: Callable[[str | None], dict[str, str]], policy: CallPolicy,
                        stream: Callable[[], Chunks] | None = None,
                        complete: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, Any]:
        """POST ``payload`` and return the JSON body, retrying what is worth retrying.

        Each attempt is bounded by ``policy.timeout`` (the whole answer, not each read), and the
        call by ``policy.deadline`` (every attempt and wait together). ``headers`` builds the
        backend's headers from the key. ``stream`` makes each attempt's handler of the body's
        pieces as they arrive; an answer of server-sent events comes back as ``{"events": [...]}``,
        each event's JSON data in order. ``complete`` makes each attempt's body the answer (a
        stream's events into one body); a ``ConnectionBroke`` it raises (a stream the server ended
        before the answer was whole) is retried as a connection that broke is.
        """
        secret = self.api_key()
        sent_headers = [("Content-Type", "application/json"), *headers(secret).items()]
        url = self._base_url + path
        began: list[float] = []  # when the first attempt got its turn (``_post_once`` sets it)
        attempt = 0
        while True:
            attempt += 1
            try:
                body = await self._post_once(url, payload, sent_headers, model, secret, began, policy, attempt,
                                             stream() if stream is not None else None)
                if complete is None:
                    return body
                try:
                    return complete(body)
                except ConnectionBroke as cut:
                    raise _Retryable(cut) from None
            except _Retryable as failure:
                backoff = min(policy.max_wait, 0.5 * 2 ** (attempt - 1))
                delay = backoff if failure.retry_after is None else min(policy.max_wait, failure.retry_after)
                # out of attempts, or the next one would start past the deadline
                now = time.monotonic()
                if attempt >= policy.max_attempts:
                    raise failure.final from None
                if now - (began[0] if began else now) + delay >= policy.deadline:
                    raise _cut_by_deadline(failure, delay, policy) from None
                charge(getattr(failure.final, "usage", None))  # a billed attempt (a stream cut short) counts
                notify_retry(model, attempt, delay, str(failure))
            await asyncio.sleep(delay)

    def _shown(self, url: str) -> str:
        """``display_url(url)``, worked out once per URL."""
        shown = self._shown_urls.get(url)
        if shown is None:
            shown = self._shown_urls[url] = display_url(url)
        return shown

    async def _post_once(self, url: str, payload: dict[str, Any], headers: Headers, model: str, secret: str | None,
                         began: list[float], policy: CallPolicy, attempt: int, on_chunk: Chunks = None
                         ) -> dict[str, Any]:
        """One attempt (the ``attempt``-th); a failure worth another is raised as ``_Retryable``, with
        the error that ends the call if it is the last. The call's deadline counts from when its first
        attempt got its turn (``began``, set here): the time it waited for a ``max_concurrency`` slot
        or the ``rpm`` limit is Orchestra's own queue, not the endpoint's answering, so it does not
        count (a deadline that did cut calls merely queued behind others). Each attempt takes at most
        ``policy.timeout`` and what is left of the deadline when its turn comes."""
        shown = self._shown(url)
        state = await self._state()
        body = to_json(payload)  # (compact UTF-8, as json.dumps(ensure_ascii=False) writes it, in a sixth of the time)
        if state.refused is not None:  # (before the concurrency and rate limits: it would not use their slots)
            _refuse_known(state, secret)
        if state.not_found:
            _not_found_known(state, url, model)
        async with state.semaphore:
            if self._limiter is not None:
                await self._limiter.acquire()
            if state.refused is not None:  # (refused while this one waited)
                _refuse_known(state, secret)
            check_wanted(model)  # (its call may have been cancelled while it waited for the slot)
            now = time.monotonic()
            if not began:
                began.append(now)
            limit = min(policy.timeout, policy.deadline - (now - began[0]))
            if limit <= 0:  # (a retry whose turn came after the deadline: not sent)
                raise _Retryable(RequestTimeout(_past_deadline(shown, policy, attempt - 1, unsent=True)))
            count_request()
            connected: list[int] = [False] if getattr(state.transport, "tells_connected", False) else [True]
            token = CONNECTED.set(connected)
            try:  # the whole answer within the limit: a server that trickles bytes is cut off too
                response = await state.deadlines.within(limit, state.transport.post(url, headers, body, on_chunk))
            except asyncio.CancelledError:
                if not connected[0]:  # (stopped while a busy server had not accepted it: it never saw it)
                    take_back_request()
                raise
            except (asyncio.TimeoutError, httpx.TimeoutException) as error:
                unseen = isinstance(error, httpx.ConnectTimeout) or not connected[0]
                if unseen:  # no connection: the server never saw it
                    take_back_request()
                if limit < policy.timeout:  # the call's deadline, not the attempt's timeout, cut it
                    raise _Retryable(RequestTimeout(_past_deadline(shown, policy, attempt, unseen=unseen))) from None
                if unseen:
                    raise _Retryable(EndpointUnreachable(
                        f"cannot reach {shown} (no connection within {limit:g} s); is the server running?")) from None
                what = (f"sent only {connected[2]} of the {connected[1]} bytes its answer's Content-Length promised"
                        if len(connected) == 3 else "did not finish answering")
                raise _Retryable(RequestTimeout(
                    f"{shown} {what} within {limit:g} s (timeout={policy.timeout:g} s per attempt, "
                    f"deadline={policy.deadline:g} s per call; raise them on the model)")) from None
            except httpx.ConnectError as error:  # no connection: the server never saw it
                take_back_request()
                failure = connect_failure(error, tls=url.startswith("https:"))
                if failure is None:
                    raise _Retryable(EndpointUnreachable(
                        f"cannot reach {shown} ({type(error).__name__}); is the server running?")) from None
                unreachable = EndpointUnreachable(f"cannot reach {shown}: {failure.why}")
                raise (_Retryable(unreachable) if failure.transient else unreachable) from None
            except httpx.TransportError as error:  # reset, body cut short, protocol error: it was reached
                raise _Retryable(ConnectionBroke(
                    f"the connection to {shown} broke ({type(error).__name__}: {error or 'no detail'})")) from None
            finally:
                CONNECTED.reset(token)
        try:
            answer = self._check(response, shown, model, secret, policy, payload, attempt)
        except AuthenticationError as rejected:
            if response.status == 401:  # (a 403 may be about this request or model, not the key)
                state.refused = (secret, time.monotonic(), str(rejected))
            raise
        except EndpointNotFound as missing:
            state.not_found[(url, model)] = (time.monotonic(), missing)
            raise
        state.failing = state.refused = None  # it answers: requests wait for a probe again
        return answer

    def _check(self, response: Answer, url: str, model: str, secret: str | None,
               policy: CallPolicy, payload: dict[str, Any], attempt: int) -> dict[str, Any]:
        status = response.status
        if status >= 400:
            feature = refused_feature(status, _error_body(response), payload)
            if feature is not None:
                raise FeatureRefused(f"{url} does not accept {feature} (HTTP {status}): "
                                     f"{_error_text(response, secret)}", feature)
        if status in (401, 403):
            variable = self._api_key_env or "an API key variable (api_key_env)"
            raise AuthenticationError(
                f"{url} rejected the credentials (HTTP {status}); check {variable}")
        if status in RETRY_STATUSES:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if retry_after is not None and retry_after > policy.max_wait:  # no point in waiting a fraction of it
                raise RateLimited(f"{url} asked to wait {retry_after:g} s before another request (HTTP {status}, "
                                  f"Retry-After), longer than Orchestra waits ({policy.max_wait:g} s); try again later")
            if status == 429:
                final: ModelError = RateLimited(
                    f"{url} is still rate limiting (HTTP 429) after {counted(attempt, 'attempt')}; "
                    "lower max_concurrency or rpm on the model")
            else:
                final = BadResponse(f"{url} failed with HTTP {status} after {counted(attempt, 'attempt')}: "
                                    f"{_error_text(response, secret)}")
            raise _Retryable(final, retry_after, f"{url} answered HTTP {status}: {_error_text(response, secret)}")
        if 300 <= status < 400:  # (an empty one was retried as an answer cut short, naming no redirect)
            where = response.headers.get("location")
            raise EndpointNotFound(f"{url} answered HTTP {status}, a redirect{f' to {where}' if where else ''}, "
                                   "which Orchestra does not follow (a POST would become a GET there); is base_url "
                                   "the API's address (often ending in /v1)?")
        if status == 400 and _UNKNOWN_MODEL.search(_error_text(response, secret)):  # (LiteLLM's: as a 404 is)
            raise EndpointNotFound(f"{url} does not serve model {model} (HTTP 400): {_error_text(response, secret)}; "
                                   "check the model's id")
        if status == 404:  # (every request failed alike, 96 in one evaluation, with no word of the URL)
            where = ("base_url ends in /v1 and the API's path begins with it again: give the API's root (Anthropic's "
                     "is https://api.anthropic.com)" if "/v1/v1/" in url else "check base_url (an OpenAI-compatible "
                     "API's usually ends in /v1) and the model's id")
            raise EndpointNotFound(f"{url} answered HTTP 404 (not found) for model {model}: "
                                   f"{_error_text(response, secret)}; {where}")
        if status in (405, 501):  # (a web server, not the API: it takes no POST there)
            meaning = "method not allowed" if status == 405 else "not implemented"
            raise EndpointNotFound(f"{url} answered HTTP {status} ({meaning}) to a POST: "
                                   f"{_error_text(response, secret)}; is base_url the API's address (often ending in "
                                   "/v1)?")
        if status >= 400:
            raise RequestRejected(f"{url} refused the request for model {model} (HTTP {status}): "
                                  f"{_error_text(response, secret)}")
        try:
            streamed = is_event_stream(response.headers)
            body = {"events": server_sent_events(response.body)} if streamed else response.json()
        except ValueError:
            raise _not_json(response, url, status) from None
        except RecursionError:
            raise BadResponse(f"{url} answered with JSON nested too deeply to read") from None
        if not isinstance(body, dict):
            raise BadResponse(f"{url} answered with JSON that is not an object")
        return body


def _not_json(response: Answer, url: str, status: int) -> BadResponse | _Retryable:
    """The error of a success whose body is not JSON: retried when it is empty or JSON broken off (a
    proxy that cut the answer and its length alike), else at once, saying what came (a web page:
    base_url is not the API's)."""
    if is_event_stream(response.headers):
        if not response.body.endswith((b"\n", b"\r")):  # (cut inside its last event, as a body cut short)
            return _Retryable(ConnectionBroke(f"{url} ended its stream inside an event (HTTP {status})"))
        return BadResponse(f"{url} answered HTTP {status} with a server-sent event that is not JSON")
    text = response.text.strip()
    kind = response.headers.get("content-type", "").split(";")[0].strip() or "no content type"
    if not text or _breaks_off(text):
        what = "an empty body" if not text else "JSON that breaks off"
        return _Retryable(BadResponse(f"{url} answered HTTP {status} with {what} (not JSON)"))
    start = " ".join(text[:60].split())
    return BadResponse(f"{url} answered HTTP {status} with a body that is not JSON ({kind}: {start!r}); is base_url "
                       "the API's address (often ending in /v1)?")


def _breaks_off(text: str) -> bool:
    """Whether ``text`` is JSON that ran out before its end (a whole text that is not JSON, such as
    JSON Lines or ``[ERROR] ...``, is not: asked again, it would answer the same)."""
    try:
        json.loads(text)
    except json.JSONDecodeError as error:
        return text[0] in "{[" and (error.pos >= len(text) or error.msg.startswith("Unterminated string"))
    return False


def _not_found_known(state: _LoopState, url: str, model: str) -> None:
    """Raise the 404 (or redirect) ``model`` met at ``url`` less than ``NOT_FOUND_SECONDS`` ago, unsent."""
    known = state.not_found.get((url, model))
    if known is not None:
        if time.monotonic() - known[0] < NOT_FOUND_SECONDS:
            raise copy.copy(known[1])
        del state.not_found[(url, model)]


def _past_deadline(shown: str, policy: CallPolicy, attempts: int, *, unseen: bool = False, unsent: bool = False) -> str:
    """Why a call ended at its deadline (not an attempt's timeout: "within 0.495386 s" told nothing, and a
    connection still waited for read as a server that was not running); ``unsent``: a retry's turn came
    after it."""
    what = (f"a call to {shown} was still waiting for its turn to try again" if unsent else
            f"{shown} had not accepted the connection" if unseen else f"{shown} had not finished answering")
    return (f"{what} when the call's deadline ran out (deadline={policy.deadline:g} s per call, counted from "
            f"its first attempt; {counted(attempts, 'attempt')}, timeout={policy.timeout:g} s per attempt; raise them "
            "on the model)")


def _refuse_known(state: _LoopState, secret: str | None) -> None:
    """Raise the 401 ``secret`` met less than ``REFUSED_KEY_SECONDS`` ago, unsent."""
    refused = state.refused
    if refused is not None and refused[0] == secret and time.monotonic() - refused[1] < REFUSED_KEY_SECONDS:
        raise AuthenticationError(refused[2])


async def _closes_with_loop(transport: Transport) -> AsyncGenerator[None, None]:
    """Waits at its ``yield`` until closed, then closes the transport: by ``Endpoint.aclose``, by the
    loop's shutdown (``asyncio.run`` closes every async generator started in it), or when dropped."""
    try:
        yield
    finally:
        await transport.aclose()


def server_sent_events(body: bytes) -> list[Any]:
    """The JSON data of each server-sent event in ``body``, in order, and the string ``"[DONE]"``
    where the stream said it was done (comments left out); ``ValueError`` when one is not JSON."""
    events: list[Any] = []
    # (lines end at CR LF, LF or CR only: ``splitlines`` also cut at U+2028, which JSON holds unescaped)
    for line in re.split(r"\r\n|\r|\n", body.decode("utf-8", errors="replace")):
        if line.startswith("data:"):
            data = line[5:].strip()
            if data:
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _error_body(response: Answer) -> Any:
    """The decoded error body, or its text when it is not JSON."""
    try:
        return response.json()
    except (ValueError, RecursionError):  # (JSON nested too deeply to read is text too)
        return response.text


def _error_text(response: Answer, secret: str | None) -> str:
    """The server's error message, short, on one line, with the API key blanked if a gateway echoed it."""
    body = _error_body(response)
    if isinstance(body, str):
        text = _page_text(body) if _HTML.match(body) else body
    else:
        error = body.get("error", body.get("detail", body)) if isinstance(body, dict) else body  # (detail: FastAPI's)
        text = str(error.get("message", error) if isinstance(error, dict) else error)
    if secret:
        text = text.replace(secret, "[redacted]")
    text = " ".join(text.split())
    return (text if len(text) <= 200 else text[:199] + "…") or "(empty body)"  # (cut where it is: say so)


#: the start of a web page (a server or proxy's error page, not an API's error)
_HTML = re.compile(r"\s*<(!doctype html|html)\b", re.IGNORECASE)
#: what a page shows no reader: its scripts, styles, comments and tags
_UNSHOWN = re.compile(r"<(script|style)\b.*?</\1\s*>|<!--.*?-->|<[^>]*>", re.IGNORECASE | re.DOTALL)


def _page_text(page: str) -> str:
    """A web page's words, without its markup (``405 Not Allowed nginx``)."""
    return html.unescape(_UNSHOWN.sub(" ", page))


def check_model_id(model: object) -> None:
    """Refuse a model id that is not text (None was an AttributeError when the model was made)."""
    if not isinstance(model, str) or not model.strip():
        raise ConfigError(f"model must be the model name its server expects (text), not {type(model).__name__} "
                          f"{model!r:.40}")


#: what an environment variable's name is made of
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_key_env(name: str | None) -> None:
    """Refuse an ``api_key_env`` that cannot name an environment variable (None or "": no key), without
    repeating it: it is likely the key itself (one given there was echoed in the run's error and
    written to the store)."""
    if name is not None and not isinstance(name, str):  # (a number failed the run: "str expected, not int")
        raise ValueError(f"api_key_env must be the name of an environment variable (text such as MY_KEY) or None, "
                         f"not {type(name).__name__}")
    if name and not _ENV_NAME.fullmatch(name):  # ("" sends no key, as None does)
        raise ValueError("api_key_env must be the NAME of an environment variable (e.g. MY_KEY: letters, digits "
                         "and _), not the key itself")


def check_base_url(url: str) -> None:
    """Refuse a base URL that is not ``http(s)://host...``, before anything is sent to it."""
    if not isinstance(url, str):  # (a number was an AttributeError)
        raise ValueError(f"base_url must be text such as http://localhost:8000/v1, not {type(url).__name__} {url!r}")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base_url {url!r} is not an http(s) URL such as http://localhost:8000/v1")


def no_text(url: str, model: str, reason: str | None, usage: Usage) -> BadResponse:
    """The error of an answer without text (content null, empty or blank): a run must not finish
    on it as if answered. ``usage``: what it cost all the same."""
    hint = ("; it reached max_tokens first (a reasoning model's thinking counts): raise max_tokens"
            if reason == "length" else "")
    error = BadResponse(f"{display_url(url)} answered with no text for {model} (finish_reason "
                        f"{reason or 'none'}){hint}")
    error.usage = usage
    return error


def display_url(url: str) -> str:
    """``url`` without user:password or query string, fit for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _same_url(one: str, other: str) -> bool:
    """Whether two base URLs name one API root: scheme and host in any case, a trailing slash or none."""
    def root(url: str) -> tuple[str, ...]:
        parts = urlsplit(url.rstrip("/"))
        return parts.scheme.lower(), parts.netloc.lower(), parts.path, parts.query

    return root(one) == root(other)


def endpoint_for(endpoint: Endpoint | None, base_url: str, api_key_env: str | None, *,
                 max_concurrency: int | None, rpm: float | None, default_url: str | None = None) -> Endpoint:
    """The endpoint a model is given, or (without one) a private endpoint for ``base_url`` with
    these limits. Limits belong to the shared endpoint: given with one, they are refused, and so is
    a ``base_url`` other than its own and the model's default (``default_url``): it was dropped."""
    if endpoint is None:
        return Endpoint(base_url, api_key_env=api_key_env, rpm=rpm,
                        max_concurrency=DEFAULT_MAX_CONCURRENCY if max_concurrency is None else max_concurrency)
    if max_concurrency is not None or rpm is not None:
        raise ConfigError(f"max_concurrency and rpm are limits of the shared endpoint {endpoint!r}; set them there")
    given = str(base_url).rstrip("/")
    if default_url is not None and not any(_same_url(given, url) for url in (default_url, endpoint.base_url)):
        raise ConfigError(f"base_url {display_url(given)!r} is not the URL of the shared endpoint {endpoint!r}, which "
                          "the model sends to: leave base_url out, or give the model an endpoint of that URL")
    return endpoint


class EndpointModel(ModelBase):
    """A model behind an HTTP endpoint: the endpoint's connection and rate limits (shared with the
    other models on it), and this model's own policy for how long and how often a call may try."""

    counts_requests = True  # the endpoint counts every attempt it sends
    endpoint: Endpoint
    policy: CallPolicy

    def _connect(self, endpoint: Endpoint | None, base_url: str, api_key_env: str | None, *,
                 max_concurrency: int | None, rpm: float | None, timeout: float | None, deadline: float | None,
                 max_attempts: int | None, default_url: str) -> None:
        """Take the shared ``endpoint`` (or make a private one for ``base_url``) and set the policy
        (``default_url``: the ``base_url`` the model takes when none is given)."""
        self.endpoint = endpoint_for(endpoint, base_url, api_key_env, max_concurrency=max_concurrency, rpm=rpm,
                                     default_url=default_url)
        self.policy = CallPolicy.of(timeout=timeout, deadline=deadline, max_attempts=max_attempts)

    async def aclose(self) -> None:
        """Close the endpoint's connections in this event loop."""
        await self.endpoint.aclose()

    def replayed(self, request: ChatRequest) -> None:
        """The server answered ``request`` before (a resumed run's recorded call): the optional features
        it carried need no probe now (a resume's first wave went out one request alone, the others when
        it was answered, where a fresh run's planner call had found them out unseen)."""
        self.endpoint.capabilities.answered(self._payload(request, self.endpoint.capabilities))

    @abc.abstractmethod
    def _payload(self, request: ChatRequest, capabilities: Capabilities) -> dict[str, Any]:
        """The request body, using only the features the server has not refused."""

    @property
    def fan_out(self) -> int:
        """The endpoint's concurrency limit: more requests at once would only wait for it."""
        return self.endpoint.max_concurrency


async def _acquired(lock: asyncio.Lock, seconds: float) -> bool:
    """Acquire ``lock`` if it comes free within ``seconds``; False (not holding it) if not."""
    try:
        await asyncio.wait_for(lock.acquire(), seconds)
    except asyncio.TimeoutError:  # (not the built-in TimeoutError before Python 3.11)
        return False
    return True
