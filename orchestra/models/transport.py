"""How an endpoint's requests travel: aiohttp's connection pool by default, or any httpx transport.

Measured side by side (``bench/http_overhead.py``), httpx's own pool (httpcore) spends most of a
request's client time managing connections, ``httpx.AsyncClient`` adds auth, redirect and cookie
handling an API call does not need, and building ``httpx.Request``/``httpx.Response`` objects
costs more than the rest of Orchestra's layer. An endpoint therefore asks a ``Transport`` for one
thing, a POST of JSON bytes answered whole (its body also handed over piece by piece as it
arrives, when the caller streams; a body without a length, to the end of the JSON object it holds,
``body_without_length``), and gets an ``Answer`` back:

- ``AiohttpTransport`` (the default) sends it over one ``aiohttp`` session per event loop;
- ``HttpxTransport`` wraps any ``httpx.AsyncBaseTransport`` (``httpx.AsyncHTTPTransport``,
  ``httpx.MockTransport``, a user's own), so httpx's transport API still plugs in.

Either way a failure surfaces as httpx's exception types (``ConnectError``, ``ReadTimeout``,
``RemoteProtocolError``...), which the endpoint turns into Orchestra's errors.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import httpx
import yarl
from pydantic_core import from_json

Headers = Sequence[tuple[str, str]]

#: Set by an endpoint around ``post`` to ``[False]``; a transport that can tell (``AiohttpTransport``)
#: makes it ``[True]`` once it holds a connection to the server, so a request stopped before that (a
#: Ctrl-C, a time limit, while a busy server has not accepted it) is known never to have reached it.
#: A transport stopped (a time limit) while reading a body of a length the server gave appends the
#: bytes promised and those received, so the error can say the server sent less than it promised.
#: (A list, so what is set inside a task ``wait_for`` makes is seen outside it.)
CONNECTED: ContextVar[list[int] | None] = ContextVar("orchestra_connected", default=None)

#: Seconds the end of a body without a length (chunked) is waited for once its bytes so far are a
#: whole JSON object, which nothing after it can belong to: a server that never ended it (no last
#: chunk) kept the call until its timeout. (A server ends it at once: the wait is mostly none.)
JSON_END_GRACE = 1.0
_OBJECT_ENDS = (b"}", b"}\n", b"}\r\n")


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, raising ``CONNECTED`` once a request has its connection."""

    async def connect(self, req: Any, traces: Any, timeout: Any) -> aiohttp.connector.Connection:
        connection = await super().connect(req, traces, timeout)
        connected = CONNECTED.get()
        if connected is not None:
            connected[0] = True
        return connection


@dataclass(frozen=True, slots=True)
class Answer:
    """A server's whole answer: status, headers (looked up case-insensitively) and body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body decoded as JSON (``ValueError`` when it is not JSON)."""
        try:
            return from_json(self.body)  # (pydantic-core's reader: 1.6 µs for a chat answer, json's 4.3)
        except ValueError:  # what it refuses, json reads its own way: lone surrogate escapes, UTF-16, deep nesting
            return json.loads(self.body)

    @property
    def text(self) -> str:
        """The body as text."""
        return self.body.decode("utf-8", errors="replace")


class Transport(Protocol):
    """Sends an endpoint's requests in one event loop."""

    async def post(self, url: str, headers: Headers, body: bytes, on_chunk: Chunks = None) -> Answer:
        """POST ``body`` to ``url`` and return the whole answer; ``on_chunk`` gets each piece of
        an event stream's body as it arrives."""

    async def aclose(self) -> None:
        """Close the connections."""


Chunks = Callable[[bytes], bool | None] | None
"""Given each piece of an event stream's body as it arrives (a streamed answer; any other body is
read whole, ``body_without_length``), or None; it returns True once the answer is whole (the rest
of the body is not waited for: a server may hold a stream open after its end)."""


def is_event_stream(headers: Mapping[str, str]) -> bool:
    """Whether an answer is server-sent events (``text/event-stream``)."""
    return headers.get("content-type", "").startswith("text/event-stream")


def whole_json(body: bytes) -> bool:
    """Whether ``body`` is a whole JSON object (a prefix of one never is)."""
    try:
        from_json(body)
    except ValueError:  # (one pydantic-core refuses and json would read is waited for to its end)
        return False
    return True


async def body_without_length(pieces: AsyncIterator[bytes], at_end: Callable[[], bool]) -> bytes:
    """A body whose length the server did not give, read to its end, or to the end of the JSON
    object it holds where the rest does not come within ``JSON_END_GRACE`` seconds (or the connection
    breaks after it). ``at_end`` tells whether the end has arrived (then no JSON is read here)."""
    received: list[bytes] = []
    async for piece in pieces:
        received.append(piece)
        if piece.endswith(_OBJECT_ENDS) and not at_end() and whole_json(body := b"".join(received)):
            try:
                return body + await asyncio.wait_for(_rest(pieces), JSON_END_GRACE)
            except (asyncio.TimeoutError, aiohttp.ClientError, httpx.TransportError):
                return body  # (the connection, left unfinished, is closed rather than reused)
    return b"".join(received)


async def _rest(pieces: AsyncIterator[bytes]) -> bytes:
    return b"".join([piece async for piece in pieces])


@dataclass(frozen=True)
class ConnectFailure:
    """Why a connection could not be made, where it was not for want of a listening server."""

    why: str
    #: whether trying again can help (a name server that did not answer may next time; a certificate will not)
    transient: bool


def connect_failure(error: BaseException, *, tls: bool = False) -> ConnectFailure | None:
    """What stopped a connection (an ``httpx.ConnectError`` from either transport): a
    certificate not trusted, another TLS failure (a server without TLS asked for it; ``tls``: whether
    the URL asked for TLS, where a connection cut before any request can only be its handshake's), or a
    host name that does not resolve; None for anything else (a refused connection: is the server running?)."""
    seen: list[BaseException] = []
    pending: list[BaseException | None] = [error]
    while pending:  # (the chain: raised from, during, and aiohttp's ``os_error``)
        cause = pending.pop()
        if cause is None or any(cause is known for known in seen):
            continue
        seen.append(cause)
        pending += [cause.__cause__, cause.__context__, getattr(cause, "os_error", None),
                    getattr(cause, "certificate_error", None)]
    said = [getattr(c, "verify_message", None) for c in seen if isinstance(c, ssl.SSLCertVerificationError)]
    if said:  # (aiohttp's own certificate error is one too, without the message)
        why = next((message for message in said if message), "certificate verify failed")
        return ConnectFailure(f"its TLS certificate is not trusted ({why}): give the file of the certificate (or of "
                              "the authority that signed it) in SSL_CERT_FILE", transient=False)
    if any(isinstance(c, ConnectionAbortedError) and "SSL handshake" in str(c) for c in seen):  # (asyncio's, at 60 s)
        return ConnectFailure("the TLS handshake got no answer within 60 s; a server without TLS is http://, not "
                              "https://", transient=False)
    reasons = [getattr(c, "reason", None) for c in seen if isinstance(c, ssl.SSLError)]
    if reasons:
        why = next((reason for reason in reasons if reason), "no detail")
        return ConnectFailure(f"the TLS handshake failed ({why}); a server without TLS is http://, not https://",
                              transient=False)
    cut = next((c for c in seen if isinstance(c, (ConnectionResetError, ConnectionAbortedError))), None)
    if tls and cut is not None:  # (a server without TLS that waits for a request, as a handshake it never answers)
        return ConnectFailure(f"the connection was cut during the TLS handshake ({type(cut).__name__}); a server "
                              "without TLS is http://, not https://", transient=True)
    for cause in seen:
        if isinstance(cause, socket.gaierror):
            return ConnectFailure(f"its host name does not resolve ({cause.strerror or cause}); check "
                                  "base_url's host", transient=cause.errno == socket.EAI_AGAIN)
    return None


def stopped_short(length: str, received: int) -> None:
    """Tell ``CONNECTED`` that a body whose Content-Length was ``length`` had ``received`` bytes when
    it was stopped."""
    progress = CONNECTED.get()
    if progress is not None and length.strip().isdigit() and received < int(length):
        progress[1:] = [int(length), received]


#: Makes an endpoint's transport for one event loop, given its connection limit.
TransportFactory = Callable[[int], Transport]


class AiohttpTransport:
    """Requests over one ``aiohttp.ClientSession`` of at most ``max_connections`` connections,
    made on first use in the running event loop and closed by ``aclose``; it tells ``CONNECTED``."""

    tells_connected = True

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, yarl.URL] = {}

    def _url(self, url: str) -> yarl.URL:
        """aiohttp's form of ``url``, parsed once per distinct URL (an endpoint posts to a few)."""
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = self._urls[url] = yarl.URL(url)
        return parsed

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = _Connector(limit=self.max_connections, limit_per_host=0, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False,
                                                  timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def post(self, url: str, headers: Headers, body: bytes, on_chunk: Chunks = None) -> Answer:
        """POST ``body`` and read the whole answer; aiohttp's failures become httpx's exception types."""
        try:
            async with self._open().post(self._url(url), headers=headers, data=body,
                                         allow_redirects=False) as answer:
                if on_chunk is None or not is_event_stream(answer.headers):
                    if answer.content_length is None:
                        content = answer.content
                        return Answer(answer.status, answer.headers,
                                      await body_without_length(content.iter_any(), content.at_eof))
                    try:
                        return Answer(answer.status, answer.headers, await answer.read())
                    except asyncio.CancelledError:  # (a time limit; decompressed bytes are not the ones promised)
                        if "content-encoding" not in answer.headers:
                            stopped_short(answer.headers["content-length"], answer.content.total_bytes)
                        raise
                pieces = []
                async for piece in answer.content.iter_any():
                    pieces.append(piece)
                    if on_chunk(piece):  # the answer is whole: a server that then holds the stream open is left
                        break
                return Answer(answer.status, answer.headers, b"".join(pieces))
        except asyncio.TimeoutError as error:  # a socket timeout; the endpoint bounds each attempt itself
            raise httpx.ReadTimeout(str(error) or "timed out") from error
        except aiohttp.ClientConnectorError as error:  # no connection was made: refused, unknown host
            raise httpx.ConnectError(str(error)) from error
        except aiohttp.ClientPayloadError as error:  # the body was cut short
            raise httpx.RemoteProtocolError(str(error) or "the answer's body was cut short") from error
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as error:  # reset after connecting
            raise httpx.ReadError(str(error) or type(error).__name__) from error
        except aiohttp.ClientResponseError as error:  # a malformed status line or headers
            raise httpx.RemoteProtocolError(error.message or type(error).__name__) from error
        except aiohttp.ClientError as error:
            raise httpx.TransportError(str(error) or type(error).__name__) from error

    async def aclose(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


class HttpxTransport:
    """Requests through any ``httpx.AsyncBaseTransport``, e.g.
    ``Endpoint(url, transport=lambda n: HttpxTransport(httpx.AsyncHTTPTransport(limits=...)))``."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self.transport = transport

    async def post(self, url: str, headers: Headers, body: bytes, on_chunk: Chunks = None) -> Answer:
        """POST ``body`` through the httpx transport and read the whole answer."""
        response = await self.transport.handle_async_request(
            httpx.Request("POST", url, headers=list(headers), content=body))
        try:
            if on_chunk is not None and is_event_stream(response.headers):
                pieces = []
                async for piece in response.aiter_bytes():
                    pieces.append(piece)
                    if on_chunk(piece):  # the answer is whole
                        break
                content = b"".join(pieces)
            elif "content-length" not in response.headers:
                content = await body_without_length(response.aiter_bytes(), lambda: False)
            else:
                try:
                    content = await response.aread()
                except asyncio.CancelledError:  # (a time limit)
                    stopped_short(response.headers["content-length"], response.num_bytes_downloaded)
                    raise
        finally:
            await response.aclose()
        return Answer(response.status_code, response.headers, content)

    async def aclose(self) -> None:
        """Close the httpx transport."""
        await self.transport.aclose()
