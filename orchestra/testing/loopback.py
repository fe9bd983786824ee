"""A real HTTP server on 127.0.0.1 that speaks the OpenAI, Anthropic and embeddings APIs.

Answers come from a Python function, so tests, benchmarks and demos exercise the whole HTTP path
(connection pool, limits, retries, parsing) without an LLM or a network. It counts requests and
records the peak number in flight.

    with LoopbackServer(chat_handler(lambda req: "42")) as server:
        model = OpenAICompatible(model="m", base_url=server.url + "/v1")

Run ``python -m orchestra.testing --delay 0.02`` to serve a fixed answer from another process.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import math
import threading
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestra.models.types import estimate_tokens


@dataclass
class LoopbackRequest:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON (``None`` when empty)."""
        return json.loads(self.body) if self.body else None

    @property
    def prompt(self) -> str:
        """The text of every message (and the system prompt) in a chat request."""
        payload = self.json() or {}
        parts = [str(payload.get("system", ""))] if payload.get("system") else []
        for message in payload.get("messages", []):
            content = message.get("content", "")
            parts.append(content if isinstance(content, str) else json.dumps(content))
        return "\n".join(parts)


@dataclass
class Reply:
    """What the server answers: status, JSON (or text) body, headers; optionally after a delay, or never."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    hang: bool = False
    drip: float = 0.0
    """Send the answer 16 bytes at a time, this many seconds apart (a server that trickles)."""
    cut: int | None = None
    """Send only this many bytes of the body, then close the connection (a body cut short)."""
    reset: bool = False
    """Close the connection without answering."""
    parts: Callable[[], AsyncIterator[bytes]] | None = None
    """Send the body as these parts, each as it is produced (chunked transfer encoding), instead
    of ``body``; ``body``'s content type is replaced by ``text/event-stream``."""


Handler = Callable[[LoopbackRequest], Reply | Awaitable[Reply]]


class LoopbackServer:
    """An asyncio HTTP/1.1 server with keep-alive, run on its own thread and event loop."""

    def __init__(self, handler: Handler, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.handler = handler
        self.host, self.port = host, port
        self.requests: list[LoopbackRequest] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        """The server's root URL, e.g. ``http://127.0.0.1:43121``."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> LoopbackServer:
        """Start serving; returns once the port is bound (``OSError`` if it cannot be, e.g. taken)."""
        failed: list[OSError] = []

        def serve() -> None:
            try:
                asyncio.run(self._main())
            except OSError as error:  # (binding failed: told to the caller, not printed by the thread)
                failed.append(error)
                self._ready.set()

        self._thread = threading.Thread(target=serve, daemon=True, name="loopback-server")
        self._thread.start()
        self._ready.wait()
        if failed:
            self._thread.join()
            raise failed[0]
        return self

    def stop(self) -> None:
        """Stop serving and close every connection (hung requests included)."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        connections: set[asyncio.Task[None]] = set()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            connections.add(task)
            try:
                await self._serve(reader, writer)
            except asyncio.CancelledError:
                pass  # the server is stopping
            finally:
                connections.discard(task)

        server = await asyncio.start_server(on_connect, self.host, self.port, backlog=1024)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()
        for task in list(connections):
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    break
                self.requests.append(request)
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                try:
                    reply = await self._answer(request)
                finally:
                    self.in_flight -= 1
                if reply.reset:
                    break
                if reply.parts is not None:
                    await _send_parts(writer, reply)
                    continue
                data = _encode(reply)
                if reply.cut is not None:
                    writer.write(data[: data.index(b"\r\n\r\n") + 4 + reply.cut])
                    await writer.drain()
                    break
                step = 16 if reply.drip else len(data)
                for start in range(0, len(data), step):
                    writer.write(data[start:start + step])
                    await writer.drain()
                    if reply.drip:
                        await asyncio.sleep(reply.drip)
                if request.headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _answer(self, request: LoopbackRequest) -> Reply:
        try:
            reply: Any = self.handler(request)
            if inspect.isawaitable(reply):
                reply = await reply
        except Exception as error:
            reply = Reply(status=500, body={"error": {"message": f"handler failed: {error}"}})
        if reply.hang:
            await asyncio.Event().wait()
        if reply.delay:
            await asyncio.sleep(reply.delay)
        return reply


async def _read_request(reader: asyncio.StreamReader) -> LoopbackRequest | None:
    line = await reader.readline()
    if not line.strip():
        return None
    method, path, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while True:
        header = await reader.readline()
        if header in (b"\r\n", b"\n", b""):
            break
        name, _, value = header.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await reader.readexactly(length) if length else b""
    return LoopbackRequest(method=method, path=path, headers=headers, body=body)


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            408: "Request Timeout", 422: "Unprocessable Entity", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


async def _send_parts(writer: asyncio.StreamWriter, reply: Reply) -> None:
    """A reply whose body is sent part by part, as each is produced (HTTP/1.1 chunked encoding)."""
    assert reply.parts is not None
    head = [f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Status')}", "Content-Type: text/event-stream",
            "Transfer-Encoding: chunked", "Connection: keep-alive"]
    head += [f"{name}: {value}" for name, value in reply.headers.items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    await writer.drain()
    async for part in reply.parts():
        if part:
            writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()


def _encode(reply: Reply) -> bytes:
    if isinstance(reply.body, (dict, list)):
        payload, content_type = json.dumps(reply.body).encode(), "application/json"
    else:
        payload, content_type = str(reply.body or "").encode(), "text/plain"
    head = [f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Status')}",
            f"Content-Type: {content_type}", f"Content-Length: {len(payload)}", "Connection: keep-alive"]
    head += [f"{name}: {value}" for name, value in reply.headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload


# --- API-shaped replies ------------------------------------------------------------------------


def openai_reply(text: str, *, prompt_tokens: int = 10, completion_tokens: int | None = None,
                 model: str = "loopback", finish_reason: str = "stop") -> Reply:
    """A Chat Completions answer."""
    completion = estimate_tokens(text) if completion_tokens is None else completion_tokens
    return Reply(body={
        "id": "chatcmpl-loopback", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                  "total_tokens": prompt_tokens + completion},
    })


def openai_stream_reply(pieces: Sequence[str], *, prompt_tokens: int = 10, model: str = "loopback",
                        usage: bool = True, between: Callable[[int], Awaitable[None]] | None = None,
                        finish_reason: str = "stop") -> Reply:
    """A streamed Chat Completions answer: a ``chat.completion.chunk`` event per piece of text, the
    finish chunk, the usage chunk (``usage``), ``[DONE]``; its JSON is UTF-8 unescaped, as servers
    write it. ``between(i)`` is awaited after piece
    ``i`` is sent (a test can hold the rest of the answer until something happened)."""
    text = "".join(pieces)

    def event(body: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps({"id": "chatcmpl-loopback", "object": "chat.completion.chunk",
                                       "model": model, **body}, ensure_ascii=False).encode() + b"\n\n"

    async def parts() -> AsyncIterator[bytes]:
        yield event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        for index, piece in enumerate(pieces):
            yield event({"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
            if between is not None:
                await between(index)
        yield event({"choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}]})
        if usage:
            completion = estimate_tokens(text)
            yield event({"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                                  "total_tokens": prompt_tokens + completion}})
        yield b"data: [DONE]\n\n"

    return Reply(parts=parts)


def anthropic_reply(text: str | None = None, *, tool_input: Any = None, input_tokens: int = 10,
                    output_tokens: int | None = None, model: str = "loopback", stop_reason: str = "end_turn") -> Reply:
    """A Messages API answer: text, or a forced tool call carrying ``tool_input``."""
    content: list[dict[str, Any]]
    if tool_input is not None:
        content = [{"type": "tool_use", "id": "toolu_loopback", "name": "respond", "input": tool_input}]
        out = estimate_tokens(json.dumps(tool_input))
    else:
        content = [{"type": "text", "text": text or ""}]
        out = estimate_tokens(text or "")
    return Reply(body={"id": "msg_loopback", "type": "message", "role": "assistant", "model": model,
                       "content": content, "stop_reason": "tool_use" if tool_input is not None else stop_reason,
                       "usage": {"input_tokens": input_tokens,
                                 "output_tokens": out if output_tokens is None else output_tokens}})


#: dimensions of ``embeddings_reply``'s vectors
EMBEDDING_DIMENSIONS = 64


def embeddings_reply(inputs: Sequence[str], *, model: str = "loopback") -> Reply:
    """An embeddings answer for ``inputs``: each text's character trigrams hashed into
    ``EMBEDDING_DIMENSIONS`` counts, normalised, so texts that share spelling are near (``algebra``
    and ``algebraic``) and the same text always gets the same vector."""
    data = []
    for index, text in enumerate(inputs):
        padded = f"  {text.lower()} "
        vector = [0.0] * EMBEDDING_DIMENSIONS
        for start in range(len(padded) - 2):
            vector[zlib.crc32(padded[start:start + 3].encode()) % EMBEDDING_DIMENSIONS] += 1.0
        norm = math.sqrt(sum(value * value for value in vector)) or 1.0
        data.append({"object": "embedding", "index": index, "embedding": [value / norm for value in vector]})
    tokens = sum(estimate_tokens(text) for text in inputs)
    return Reply(body={"object": "list", "data": data, "model": model,
                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def error_reply(status: int, message: str = "error", *, retry_after: str | None = None) -> Reply:
    """An error answer in the shape both APIs use."""
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return Reply(status=status, body={"error": {"message": message, "type": "loopback_error"}}, headers=headers)


TextFunction = Callable[[LoopbackRequest], str | Reply | Awaitable[str | Reply]]


def chat_handler(fn: TextFunction, *, delay: float = 0.0) -> Handler:
    """A handler that answers chat requests on either API with the text ``fn(request)`` returns,
    embeddings requests (``/embeddings``) with ``embeddings_reply``'s vectors, and ``GET /models``
    with one model, ``loopback``.

    ``fn`` may return a ``Reply`` to answer otherwise (an error, a hang). On the Anthropic path a
    request with tools gets the text back as the forced tool call's input (it must be JSON). As a
    real server does, a text longer than the request's ``max_tokens`` (``max_completion_tokens``)
    is cut there, with ``finish_reason`` ``length`` (``stop_reason`` ``max_tokens``).
    """

    async def handle(request: LoopbackRequest) -> Reply:
        if request.method == "GET" and request.path.rstrip("/").endswith("/models"):  # (it was a chat answer)
            return Reply(200, {"object": "list", "data": [{"id": "loopback", "object": "model", "created": 0,
                                                           "owned_by": "orchestra"}]})
        if request.path.endswith("/embeddings"):
            texts = (request.json() or {}).get("input")
            texts = [texts] if isinstance(texts, str) or not isinstance(texts, list) or (
                texts and isinstance(texts[0], int)) else texts  # (one text, or one text as token ids)
            reply = embeddings_reply([text if isinstance(text, str) else json.dumps(text) for text in texts])
            reply.delay = delay
            return reply
        result: Any = fn(request)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, Reply):
            return result
        body = request.json() or {}
        if request.path.endswith("/messages"):
            if body.get("tools"):
                try:
                    tool_input = json.loads(result)
                except ValueError:
                    raise ValueError(f"the function answered {result[:40]!r} to a request with tools (Anthropic "
                                     "structured output): return the JSON of the tool's input") from None
                reply = anthropic_reply(tool_input=tool_input)
            else:
                text, cut = _cut(result, body.get("max_tokens"))
                reply = anthropic_reply(text, stop_reason="max_tokens" if cut else "end_turn")
        else:
            text, cut = _cut(result, body.get("max_completion_tokens", body.get("max_tokens")))
            reply = openai_reply(text, prompt_tokens=estimate_tokens(request.prompt),
                                 finish_reason="length" if cut else "stop")
        reply.delay = delay
        return reply

    return handle


def _cut(text: str, max_tokens: Any) -> tuple[str, bool]:
    """The text a server with this token limit sends (tokens counted as ``estimate_tokens`` does:
    4 characters each), and whether the limit cut it."""
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or estimate_tokens(text) <= max_tokens:
        return text, False
    return text[:max(max_tokens, 1) * 4], True


def main() -> None:
    """Serve a fixed answer (and embeddings) until killed; print the URL first."""
    parser = argparse.ArgumentParser(prog="python -m orchestra.testing", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--text", default="ok")
    args = parser.parse_args()
    try:
        server = LoopbackServer(chat_handler(lambda _: args.text, delay=args.delay), port=args.port).start()
    except OSError as error:
        parser.exit(2, f"error: cannot listen on port {args.port}: {error.strerror or error}\n")
    print(server.url, flush=True)
    threading.Event().wait()
