"""Misbehaving endpoints: bounded calls, and errors that say what really happened."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import AGGREGATE_MARK, KEYWORDS_MARK, PLANNER_MARK, kind_of, scripted_pool
from loopback_llm import ScriptedLLM, write_pool
from test_cli import cli

from orchestra import Orchestra
from orchestra.errors import (
    BadResponse,
    ConnectionBroke,
    EndpointUnreachable,
    RateLimited,
    RequestTimeout,
    RunHeld,
    StoreError,
    StoreUnusable,
)
from orchestra.hints import cli_message
from orchestra.models import ChatRequest, ChatResult, OpenAICompatible, Usage, allow_model_requests
from orchestra.models.base import ModelBase
from orchestra.models.http import Endpoint
from orchestra.store import APPLICATION_ID, LEASE_SECONDS, PAGE_SIZE, SCHEMA_VERSION, RunStore
from orchestra.testing import Reply, chat_handler, error_reply, openai_reply


def _ask(server, **options) -> Exception | str:
    return _ask_model(OpenAICompatible(model="m", base_url=f"{server.url}/v1", **options))


def _ask_model(model: OpenAICompatible) -> Exception | str:
    try:
        return asyncio.run(model.complete_one(ChatRequest.user("hi"))).text
    except Exception as error:
        return error


def test_a_server_that_trickles_is_cut_off_at_the_timeout(loopback) -> None:
    reply = openai_reply("a long answer " * 40)
    reply.drip = 0.5  # 16 bytes every half second: every read is quick, the answer never is
    server = loopback(lambda request: reply)
    error = _ask(server, timeout=1, max_attempts=1)
    assert isinstance(error, RequestTimeout) and "did not finish answering within 1 s" in str(error)
    assert len(server.requests) == 1


def test_the_deadline_bounds_a_call_over_all_its_attempts(loopback) -> None:
    server = loopback(lambda request: Reply(hang=True))
    error = _ask(server, timeout=0.3, max_attempts=10, deadline=1)
    assert isinstance(error, RequestTimeout) and "deadline=1 s per call" in str(error)
    assert 1 <= len(server.requests) < 10  # the deadline stopped the retries, not the attempt count


def test_an_attempt_ends_at_the_call_s_deadline_when_that_comes_before_its_timeout(loopback) -> None:
    """With a deadline shorter than the timeout, an attempt at a hanging server is cut at the deadline
    (it was held for the whole timeout: the deadline overrun by up to one attempt)."""
    server = loopback(lambda request: Reply(hang=True))
    error = _ask(server, timeout=30, max_attempts=1, deadline=0.5)
    assert isinstance(error, RequestTimeout) and "deadline=0.5 s per call" in str(error), error
    assert "had not finished answering when the call's deadline ran out" in str(error), error  # (not "within 30 s")
    assert "1 attempt, timeout=30 s per attempt" in str(error), error


def test_a_call_s_deadline_counts_from_its_first_attempt_not_from_its_wait_for_a_slot(loopback) -> None:
    """The deadline bounds the endpoint's answering, not Orchestra's own queue: a call that waited for
    its ``max_concurrency`` slot for most of its deadline is sent, and retried after a 503 (0.5 s
    later). (The wait was counted for retries alone: this call failed at its first 503, 0.8 + 0.5 s
    past the start of its 1 s deadline, while a first attempt was never cut for it.)"""
    failed_once: list[str] = []

    def answer(request: Any) -> Reply:
        if "first" in request.prompt:
            return dataclasses.replace(openai_reply("first done"), delay=0.8)  # holds the only slot
        if not failed_once:
            failed_once.append("503")
            return error_reply(503, "busy")
        return openai_reply("second done")

    server = loopback(answer)
    model = OpenAICompatible(model="m", base_url=f"{server.url}/v1", max_concurrency=1, deadline=1.0)

    async def both() -> list[ChatResult]:  # (two calls of their own, as two runs make them)
        first = asyncio.ensure_future(model.complete_one(ChatRequest.user("first")))
        while not server.requests:  # (the first has the slot)
            await asyncio.sleep(0.01)
        return list(await asyncio.gather(first, model.complete_one(ChatRequest.user("second"))))

    assert [o.text for o in asyncio.run(both())] == ["first done", "second done"]
    assert [r.prompt.count("second") for r in server.requests] == [0, 1, 1]


def test_a_retry_whose_turn_comes_after_the_call_s_deadline_is_not_sent_and_says_so(loopback) -> None:
    """A retry still waiting for its endpoint's only slot when its call's deadline runs out is not sent with
    no time left; its error says it waited, not that the server was slow."""
    def answer(request: Any) -> Reply:
        if "long" in request.prompt:
            return dataclasses.replace(openai_reply("long done"), delay=1.5)  # holds the slot past the deadline
        return error_reply(503, "busy")

    server = loopback(answer)
    shared = Endpoint(f"{server.url}/v1", max_concurrency=1)
    patient = OpenAICompatible(model="m", endpoint=shared, deadline=10)
    hurried = OpenAICompatible(model="m", endpoint=shared, deadline=0.8)  # retries 0.5 s after its 503

    async def both() -> list[Any]:
        short = asyncio.ensure_future(hurried.complete_one(ChatRequest.user("short")))
        while not server.requests:  # (its 503 came: the long one takes the slot while it waits to retry)
            await asyncio.sleep(0.01)
        return list(await asyncio.gather(short, patient.complete_one(ChatRequest.user("long")),
                                         return_exceptions=True))

    short, long = asyncio.run(both())
    assert isinstance(short, RequestTimeout) and long.text == "long done"
    assert "was still waiting for its turn to try again when the call's deadline ran out (deadline=0.8 s" in str(short)
    assert "1 attempt" in str(short) and len(server.requests) == 2  # (its retry was never sent)


def test_a_retry_after_of_exactly_the_longest_wait_is_waited_out(loopback) -> None:
    answers = iter([error_reply(429, "slow down", retry_after="1"), openai_reply("done")])
    server = loopback(lambda request: next(answers))
    model = OpenAICompatible(model="m", base_url=f"{server.url}/v1")
    model.policy = dataclasses.replace(model.policy, max_wait=1.0)
    assert asyncio.run(model.complete_one(ChatRequest.user("hi"))).text == "done" and len(server.requests) == 2


@pytest.mark.parametrize("retry_after", ["120", "Wed, 21 Oct 2099 07:28:00 GMT"])
def test_a_retry_after_beyond_the_cap_fails_at_once(loopback, retry_after: str) -> None:
    server = loopback(lambda request: error_reply(429, "slow down", retry_after=retry_after))
    error = _ask(server, max_attempts=4)
    assert isinstance(error, RateLimited) and "asked to wait" in str(error) and "Retry-After" in str(error)
    assert len(server.requests) == 1


@pytest.mark.parametrize("fault", [Reply(reset=True), Reply(body={"choices": []}, cut=5)])
def test_a_broken_connection_is_not_an_unreachable_server(loopback, fault: Reply) -> None:
    server = loopback(lambda request: fault)
    error = _ask(server, max_attempts=2)
    assert isinstance(error, ConnectionBroke) and str(error).startswith(f"the connection to {server.url}/v1")
    assert "is the server running" not in str(error) and len(server.requests) == 2


class RawServer:
    """A listening socket on 127.0.0.1 whose connections ``answer`` handles (one thread each); counts them."""

    def __init__(self, answer: Any) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, args=(answer,), daemon=True).start()

    def _accept(self, answer: Any) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=answer, args=(connection,), daemon=True).start()

    def close(self) -> None:
        self.listener.close()


def _plain_http(connection: socket.socket) -> None:
    """As a server without TLS (uvicorn, llama.cpp's) answers a TLS hello: a 400, then it closes."""
    with connection:
        connection.recv(65536)
        connection.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")


def _chat_over_tls(context: Any) -> Any:
    """A TLS server answering one chat completion per connection."""
    body = json.dumps({"id": "c", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "over TLS"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}).encode()

    def answer(connection: socket.socket) -> None:
        try:
            with context.wrap_socket(connection, server_side=True) as tls:
                received = b""
                while b"\r\n\r\n" not in received:
                    received += tls.recv(65536)
                head, _, rest = received.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                while len(rest) < length:
                    rest += tls.recv(65536)
                tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                            + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
        except (OSError, ValueError):  # (a client that refused the certificate hangs up)
            pass
    return answer


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_https_to_a_server_without_tls_says_so_at_once_not_is_the_server_running(transport: str) -> None:
    """It read "cannot reach URL (ConnectError); is the server running?" after 12 s of retries, the
    server up and the cause (a server that does not speak TLS) dropped."""
    import httpx

    from orchestra.models.transport import HttpxTransport

    server = RawServer(_plain_http)
    options: dict[str, Any] = {} if transport == "aiohttp" else {
        "transport": lambda limit: HttpxTransport(httpx.AsyncHTTPTransport())}
    model = OpenAICompatible(model="m", endpoint=Endpoint(f"https://127.0.0.1:{server.port}/v1", **options),
                             max_attempts=4)
    try:
        with allow_model_requests(), pytest.raises(EndpointUnreachable) as error:
            asyncio.run(model.complete_one(ChatRequest.user("hi")))
    finally:
        server.close()
    assert str(error.value) == (f"cannot reach https://127.0.0.1:{server.port}/v1/chat/completions: the TLS handshake "
                                "failed (WRONG_VERSION_NUMBER); a server without TLS is http://, not https://")
    assert server.connections == 1  # (it will not speak TLS on a second try either)


def test_a_certificate_not_trusted_names_ssl_cert_file_which_then_works(tmp_path: Path) -> None:
    import shutil
    import ssl

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem"), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = RawServer(_chat_over_tls(context))
    model = OpenAICompatible(model="m", base_url=f"https://127.0.0.1:{server.port}/v1", max_attempts=4)
    with allow_model_requests():  # (this process trusts the machine's authorities only)
        refused = _ask_model(model)
    assert isinstance(refused, EndpointUnreachable) and "certificate is not trusted" in str(refused)
    assert server.connections == 1  # (not tried again: the certificate will not change)
    pool = tmp_path / "pool.yaml"
    pool.write_text(f"""name: tls
models:
  m: {{type: openai, model: m, base_url: "https://127.0.0.1:{server.port}/v1", api_key_env: null, max_attempts: 4}}
agents: [{{name: a, model: m}}]
""")
    try:
        untrusted = cli("ask", "hi", "--pool", str(pool), "--no-plan", "--no-store", env={"SSL_CERT_FILE": ""})
        trusted = cli("ask", "hi", "--pool", str(pool), "--no-plan", "--no-store",
                      env={"SSL_CERT_FILE": str(tmp_path / "cert.pem")})
    finally:
        server.close()
    assert untrusted.returncode == 2 and (
        f"cannot reach https://127.0.0.1:{server.port}/v1/chat/completions: its TLS certificate is not trusted "
        "(self-signed certificate): give the file of the certificate (or of the authority that signed it) in "
        "SSL_CERT_FILE") in untrusted.stderr, untrusted.stderr
    assert trusted.returncode == 0 and "over TLS" in trusted.stdout, trusted.stderr


def test_a_host_name_that_does_not_resolve_is_named_and_tried_again_only_where_the_lookup_may_answer_later() -> None:
    import aiohttp
    import httpx

    from orchestra.models.transport import ConnectFailure, connect_failure

    def failed(lookup: socket.gaierror) -> BaseException:  # as the aiohttp transport raises it
        try:
            try:
                raise aiohttp.ClientConnectorDNSError(aiohttp.client_reqrep.ConnectionKey(
                    "api.exmaple.com", 443, True, True, None, None, None), lookup) from lookup
            except aiohttp.ClientConnectorError as error:
                raise httpx.ConnectError(str(error)) from error
        except httpx.ConnectError as error:
            return error

    unknown = connect_failure(failed(socket.gaierror(socket.EAI_NONAME, "Name or service not known")))
    assert unknown == ConnectFailure("its host name does not resolve (Name or service not known); "
                                     "check base_url's host", transient=False)
    later = connect_failure(failed(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")))
    assert later is not None and later.transient
    assert connect_failure(httpx.ConnectError("refused")) is None  # (a server not running: as before)
    try:  # a server that reads a TLS hello and says nothing (not a web server's 400): asyncio gives up at 60 s
        try:
            raise ConnectionAbortedError("SSL handshake is taking longer than 60.0 seconds: aborting the connection")
        except ConnectionAbortedError as aborted:
            raise httpx.ConnectError(str(aborted)) from aborted
    except httpx.ConnectError as silent:
        assert connect_failure(silent) == ConnectFailure(
            "the TLS handshake got no answer within 60 s; a server without TLS is http://, not https://",
            transient=False)
    reset = httpx.ConnectError("Cannot connect to host h:443 ssl:default [None]")
    reset.__cause__ = ConnectionResetError()  # (a server that read the hello and hung up)
    assert connect_failure(reset) is None  # (over plain HTTP a cut connection is no TLS matter)
    assert connect_failure(reset, tls=True) == ConnectFailure(
        "the connection was cut during the TLS handshake (ConnectionResetError); a server without TLS is http://, "
        "not https://", transient=True)
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError:
            raise httpx.ConnectError("All connection attempts failed") from None  # (a refusal: no TLS, no lookup)
    except httpx.ConnectError as refused:
        assert connect_failure(refused) is None


def test_a_plain_web_server_at_base_url_is_named_as_such_with_its_page_in_words(tmp_path: Path) -> None:
    """Python's own file server answers a POST with 501 and an HTML page: the run's error was that
    page's markup, and every call was still sent (7 requests) as if the API had refused a request."""
    import http.server

    from orchestra.errors import EndpointNotFound

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    model = OpenAICompatible(model="m", base_url=f"http://127.0.0.1:{web.server_address[1]}/v1")
    try:
        with allow_model_requests():
            error = _ask_model(model)
    finally:
        web.shutdown()
    assert isinstance(error, EndpointNotFound)
    assert str(error).startswith(f"http://127.0.0.1:{web.server_address[1]}/v1/chat/completions answered HTTP 501 "
                                 "(not implemented) to a POST: Error response Error response Error code: 501 Message: "
                                 "Unsupported method ('POST').")
    assert str(error).endswith("; is base_url the API's address (often ending in /v1)?") and "<" not in str(error)


def test_a_405_page_is_a_wrong_base_url_and_any_error_page_is_given_in_words(loopback) -> None:
    page = ("<html>\r\n<head><title>405 Not Allowed</title><style>body { color: red }</style></head>\r\n<body>"
            "<center><h1>405 Not Allowed</h1></center><hr><center>nginx &amp; co</center><!-- a comment --></body></html>")
    pages = iter([Reply(status=405, body=page), Reply(status=413, body=page.replace("405 Not Allowed", "413 Too Large"))])
    server = loopback(lambda request: next(pages))
    error = _ask(server)
    assert str(error) == (f"{server.url}/v1/chat/completions answered HTTP 405 (method not allowed) to a POST: 405 Not "
                          "Allowed 405 Not Allowed nginx & co; is base_url the API's address (often ending in /v1)?")
    assert len(server.requests) == 1  # (not tried again: a web server will not become the API)
    too_large = _ask(server)
    assert str(too_large) == (f"{server.url}/v1/chat/completions refused the request for model m (HTTP 413): 413 Too "
                              "Large 413 Too Large nginx & co")


def test_deeply_nested_json_is_a_bad_response(loopback) -> None:
    server = loopback(lambda request: Reply(body="[" * 200_000 + "]" * 200_000))
    error = _ask(server, max_attempts=1)
    assert isinstance(error, BadResponse) and "nested too deeply" in str(error)


def test_a_server_error_storm_while_planning_is_not_a_plan_to_repair(loopback, tmp_path: Path) -> None:
    server = loopback(chat_handler(lambda request: error_reply(503, "overloaded")
                                   if PLANNER_MARK in request.prompt else "The answer is 1"))
    pool = write_pool(tmp_path, server.url)  # max_attempts: 2
    done = cli("ask", "Write a short report on tides, then check it", "--pool", str(pool), "--json")
    assert done.returncode == 1
    error = json.loads(done.stdout)["error"]
    assert "HTTP 503" in error and "repair" not in error
    assert len(server.requests) == 2  # one planner call, tried twice by the HTTP layer, never "repaired"


def test_a_huge_answer_is_capped_before_aggregation() -> None:
    pool, models = scripted_pool(3, expert=lambda name, request: "x" * 300_000 + " The answer is 1")
    orc = Orchestra(pool, store=False, plan=False, max_response_chars=1000, k=2, mode="topk",
                    settings={"keywords": {"samples": 1, "min_count": 1}})
    result = orc.run("What is 1?")
    assert result.status == "done", result.error
    [aggregation] = [r for m in models.values() for r in m.requests if AGGREGATE_MARK in r.prompt_text()]
    assert len(aggregation.prompt_text()) < 10_000 and "cut at max_response_chars=1000" in aggregation.prompt_text()
    assert kind_of(aggregation) == "aggregate"


# --- templates with limits ----------------------------------------------------------------------

BOMBS = {
    "huge string": "{{ ('a' * 10**10) | length }}",
    "huge power": "{{ 9 ** (9 ** 9) }}",
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "huge width": "{{ 'a' | center(10000000000) }}",
    "huge format": "{{ '%01000000000d' % 1 }}",
    "huge output": "{% for i in range(100000) %}{{ inputs.question * 100 }}{% endfor %}",
}


@pytest.mark.parametrize("bomb", list(BOMBS), ids=list(BOMBS))
def test_template_bombs_are_checked_without_running_and_refused_in_one_line(loopback, tmp_path: Path,
                                                                            bomb: str) -> None:
    server = loopback(chat_handler(lambda request: "The answer is 1"))
    write_pool(tmp_path, server.url)
    flow = tmp_path / "flow.yaml"
    flow.write_text("pool: pool.yaml\ninputs:\n  question: {type: string, default: 'why?'}\n"
                    f"steps:\n  - id: s\n    agent: alpha-expert\n    prompt: \"{BOMBS[bomb]}\"\n")
    checked = cli("validate", str(flow), timeout=60)
    assert checked.returncode == 0, checked.stderr  # checking never evaluates the expressions
    done = cli("run", str(flow), timeout=60)
    assert done.returncode == 2  # the workflow file must be fixed
    [line] = done.stderr.strip().splitlines()
    assert "cannot render" in line and "template" in line and "Traceback" not in done.stderr
    assert not server.requests  # the step failed before any call


# --- the run store --------------------------------------------------------------------------------


def _stored_run(path: Path) -> str:
    pool, _ = scripted_pool(2)
    orc = Orchestra(pool, store=path, plan=False, k=1)
    run_id = orc.run("What is 1?").run_id
    orc.store.close()  # type: ignore[union-attr]
    return run_id


def test_many_processes_creating_one_new_store_all_succeed(tmp_path: Path) -> None:
    script = "import sys\nfrom orchestra.store import RunStore\nRunStore(sys.argv[1]).runs()\nprint('ok')\n"
    for round_ in range(3):
        store = tmp_path / f"new{round_}.db"
        processes = [subprocess.Popen([sys.executable, "-c", script, str(store)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for _ in range(8)]
        outputs = [p.communicate(timeout=120) for p in processes]
        assert all(p.returncode == 0 for p in processes), [err for _, err in outputs if err]
        with sqlite3.connect(store) as db:  # made once, with the store's pages (fewer WAL frames per commit)
            assert db.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE
            assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_store_of_a_newer_orchestra_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA application_id={APPLICATION_ID}")
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
        db.execute("CREATE TABLE runs (id TEXT)")
    before = path.read_bytes()
    with pytest.raises(StoreUnusable) as refused:  # (a StoreError, as a file that is no database is: it was a bare one)
        RunStore(path)
    assert str(refused.value) == (f"{path} was written by a newer Orchestra (schema {SCHEMA_VERSION + 1}); upgrade "
                                  "Orchestra or use another store file")
    shown = cli("runs", "--store", str(path))
    assert shown.returncode == 2 and shown.stderr.strip() == (
        f"error: {path} was written by a newer Orchestra (schema {SCHEMA_VERSION + 1}); upgrade Orchestra or choose "
        "another file with --store")
    assert path.read_bytes() == before  # not even switched to WAL
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_a_store_of_schema_3_is_upgraded_and_its_nodes_still_read(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    run_id = _stored_run(path)
    nodes = RunStore(path).nodes(run_id)
    with sqlite3.connect(path) as db:  # as Orchestra's schema 3 left a store: a nodes table and a second index
        db.execute("CREATE TABLE nodes (run_id TEXT NOT NULL, node_id TEXT NOT NULL, instruction TEXT, "
                   "depends_on TEXT, status TEXT, skills TEXT, experts TEXT, aggregator TEXT, explanation TEXT, "
                   "output TEXT, error TEXT, updated REAL, PRIMARY KEY (run_id, node_id))")
        db.execute("CREATE INDEX calls_by_run ON calls (run_id, id)")
        db.execute("PRAGMA user_version=3")
    store = RunStore(path)
    assert store.nodes(run_id) == nodes and nodes[0]["status"] == "done" and nodes[0]["experts"]
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert not db.execute("SELECT name FROM sqlite_master WHERE name = 'calls_by_run'").fetchall()
    shown = cli("show", run_id, "--store", str(path), "--json")
    assert shown.returncode == 0 and [n["status"] for n in json.loads(shown.stdout)["nodes"]] == ["done"]


def test_a_read_only_store_can_be_listed_and_shown(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    run_id = _stored_run(path)
    path.chmod(0o444)
    try:
        listed = cli("runs", "--store", str(path), "--json")
        assert listed.returncode == 0, listed.stderr
        assert [r["id"] for r in json.loads(listed.stdout)] == [run_id]
        shown = cli("show", run_id, "--store", str(path), "--json")
        assert shown.returncode == 0 and json.loads(shown.stdout)["run"]["status"] == "done"
    finally:
        path.chmod(0o644)


def test_a_damaged_store_is_detected_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    _stored_run(path)
    data = bytearray(path.read_bytes())
    page = 4096
    for offset in range(2 * page, len(data) - 64, page):  # scramble every page but the header's
        data[offset + 8:offset + 64] = bytes(range(56))
    path.write_bytes(bytes(data))
    done = cli("runs", "--store", str(path))
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {path} ") and len(done.stderr.strip().splitlines()) == 1
    assert "damaged" in done.stderr or "not a usable" in done.stderr


def test_one_bad_row_does_not_hide_the_other_runs(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    good = _stored_run(path)
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO runs (id, task, status, created, updated, config) "
                   "VALUES ('bad', 'x', 'done', 1.0, 1.0, '{not json')")
    listed = cli("runs", "--store", str(path), "--json")
    assert listed.returncode == 0, listed.stderr
    assert {r["id"] for r in json.loads(listed.stdout)} == {good, "bad"}


# --- one process per running run ------------------------------------------------------------------


def test_resume_refuses_a_run_that_another_process_is_running(loopback, tmp_path: Path) -> None:
    release = threading.Event()

    async def answer(request: Any) -> str:
        if KEYWORDS_MARK in request.prompt:
            return json.dumps({"keywords": ["history"]})
        await asyncio.to_thread(release.wait, 60)  # the expert call hangs until the test lets it go
        return "The answer is 1"

    server = loopback(chat_handler(answer))
    # a timeout far past the hang, so a slow machine cannot turn the held call into a retry
    pool = write_pool(tmp_path, server.url, models=("alpha",), timeout=600)
    first = subprocess.Popen([sys.executable, "-m", "orchestra", "ask", "Who built Rome?", "--pool", str(pool),
                              "--no-plan", "--k", "1", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "ORCHESTRA_ALLOW_MODEL_REQUESTS": "1"})
    try:
        for _ in range(600):  # wait (bounded) until the first process is inside its expert call
            if any(KEYWORDS_MARK not in r.prompt for r in server.requests):
                break
            time.sleep(0.05)
        [held] = json.loads(cli("runs", "--json").stdout)
        sent = len(server.requests)
        second = cli("resume", held["id"])
        assert second.returncode == 2
        assert f"run {held['id']} is still running in another process" in second.stderr and "--force" in second.stderr
        assert len(server.requests) == sent  # nothing was sent twice
    finally:
        release.set()
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert json.loads(out)["status"] == "done"


def test_a_held_run_can_be_forced_and_an_expired_lease_is_free(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    holder, other = RunStore(path), RunStore(path)
    holder.begin_run("r1", "task", {"options": {}})
    with pytest.raises(StoreError, match="still running in this process, in another Orchestra on the same store"):
        other.begin_run("r1", "task", {"options": {}})
    other.begin_run("r1", "task", {"options": {}}, force=True)  # the user says the holder is gone
    with pytest.raises(StoreError):
        holder.begin_run("r1", "task", {"options": {}})  # now the other one holds it
    with sqlite3.connect(path) as db:  # the holder died LEASE_SECONDS ago: no heartbeat since
        db.execute("UPDATE runs SET updated = updated - ? WHERE id = 'r1'", (LEASE_SECONDS + 1,))
    holder.begin_run("r1", "task", {"options": {}})
    holder.heartbeat()
    with pytest.raises(StoreError):
        other.begin_run("r1", "task", {"options": {}})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("heavy", [False, True], ids=["endpoint", "engine"])
def test_a_batch_that_breaks_before_its_model_answers_fails_its_calls_instead_of_hanging(
        heavy: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # a bug in a batch's bookkeeping (before any answer) used to leave its calls waiting for ever,
    # and the run with them
    from orchestra import Agent, Pool, execute
    from orchestra.testing import FunctionModel
    from orchestra.testing.engines import SimulatedEngine

    def broken(**fields: Any) -> None:
        raise RuntimeError("the batch's record broke")

    monkeypatch.setattr(execute, "BatchRecord", broken)
    model = (SimulatedEngine("x", load_s=0, per_request=0, per_batch=0) if heavy
             else FunctionModel(lambda request: "4", name="x"))
    result = Orchestra(Pool(agents=[Agent(name="a", model=model)], planner=model), store=False).run(
        "What is 2 + 2?", plan=False)
    assert result.status == "failed" and "the batch's record broke" in (result.error or ""), result.error


def test_a_store_that_cannot_be_created_is_one_line_naming_what_is_in_the_way(tmp_path: Path) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    pool = write_pool(tmp_path, "http://127.0.0.1:9/v1")  # (never called: the store is opened first)
    done = cli("ask", "What is 2 + 2?", "--pool", str(pool), "--store", str(blocker / "runs.db"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == (f"error: cannot create the run store {blocker / 'runs.db'} ({blocker} is a "
                                   "file, not a folder); choose another file with --store")
    with pytest.raises(StoreError, match=f"[(]{blocker} is a file, not a folder[)]"):  # the file, not the folder
        Orchestra(scripted_pool(1)[0], store=blocker / "deeper" / "still" / "runs.db")


def test_a_store_that_is_a_directory_says_so(tmp_path: Path) -> None:
    """In Python it was `cannot create the run store adir (unable to open database file)`, SQLite's
    words (the command line's --store says `File 'adir' is a directory`)."""
    folder = tmp_path / "adir"
    folder.mkdir()
    with pytest.raises(StoreError) as refused:
        RunStore(folder)
    assert str(refused.value) == f"cannot use {folder} as the run store: it is a directory; use another store file"
    home = tmp_path / "home"
    (home / "runs.db").mkdir(parents=True)
    listed = subprocess.run([sys.executable, "-m", "orchestra", "runs"], capture_output=True, text=True,
                            env={**os.environ, "ORCHESTRA_HOME": str(home)})
    assert listed.returncode == 2 and listed.stderr.strip() == (
        f"error: cannot use {home / 'runs.db'} as the run store: it is a directory; set ORCHESTRA_HOME (now {home}) "
        "to a folder you can write, or choose a file with --store")


def test_a_store_whose_folder_does_not_exist_is_refused_not_made(tmp_path: Path) -> None:
    """`ask --store /nonexistent/dir/x.db` made /nonexistent/dir (a typo's folders); the default
    store's folder is still made."""
    pool = write_pool(tmp_path, "http://127.0.0.1:9")  # (never called: the store is opened first)
    data = tmp_path / "val.jsonl"
    data.write_text('{"id": "q1", "question": "What is 2 + 2?", "answer": "4"}\n')
    missing = tmp_path / "no" / "such" / "x.db"
    for args in (["ask", "What is 2 + 2?", "--pool", str(pool)], ["eval", "--pool", str(pool), "--data", str(data)],
                 ["profile", "--pool", str(pool), "--data", str(data), "--out", str(tmp_path / "profiles")]):
        done = cli(*args, "--store", str(missing))
        assert done.returncode == 2 and done.stderr.strip() == (
            f"error: the folder {missing.parent} does not exist; create it or choose another --store"), done.stderr
    assert not (tmp_path / "no").exists()
    home = tmp_path / "new" / "home"
    listed = subprocess.run([sys.executable, "-m", "orchestra", "runs"], capture_output=True, text=True,
                            env={**os.environ, "ORCHESTRA_HOME": str(home)})
    assert listed.returncode == 0 and (home / "runs.db").is_file(), listed.stderr


def test_a_store_written_as_a_folder_is_refused_not_made_a_file(tmp_path: Path) -> None:
    """`ask --store newdir/` exited 0 having made a SQLite file named newdir (the user meant a folder)."""
    pool = write_pool(tmp_path, "http://127.0.0.1:9")  # (never called: the flag is refused first)
    folder = f"{tmp_path / 'newdir'}/"
    for args in (["ask", "What is 2 + 2?", "--pool", str(pool), "--store", folder], ["runs", f"--store={folder}"]):
        done = cli(*args)
        assert done.returncode == 2 and (f"Invalid value for '--store': {folder} names a folder; give the store's "
                                         f"file, e.g. {tmp_path / 'newdir' / 'runs.db'}") in done.stderr, done.stderr
    assert not (tmp_path / "newdir").exists()


def test_a_default_store_that_cannot_be_made_names_orchestra_home_and_resume_offers_no_no_store(
        tmp_path: Path) -> None:
    """The store ORCHESTRA_HOME places is its fault, not a --store the user never gave; resume's help
    offered --no-store, which it always refused."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    home = blocker / "home"
    done = subprocess.run([sys.executable, "-m", "orchestra", "runs"], capture_output=True, text=True,
                          env={**os.environ, "ORCHESTRA_HOME": str(home)})
    assert done.returncode == 2 and done.stderr.strip() == (
        f"error: cannot create the run store {home / 'runs.db'} ({blocker} is a file, not a folder); set "
        f"ORCHESTRA_HOME (now {home}) to a folder you can write, or choose a file with --store")
    helped = cli("resume", "--help")
    assert "--store FILE" in helped.stdout and "--no-store" not in helped.stdout
    assert "$ORCHESTRA_HOME/runs.db, else ~/.orchestra/runs.db" in " ".join(helped.stdout.split())


def test_reading_a_store_that_does_not_exist_is_refused_not_made_empty(tmp_path: Path) -> None:
    # a typo in --store used to make a new, empty store and list nothing
    missing = tmp_path / "typo.db"
    for args in (["runs"], ["show", "abc"], ["resume", "abc"]):
        done = cli(*args, "--store", str(missing))
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == (f"error: no run store at {missing}: nothing was recorded there; check the "
                                       "path given to --store")
    assert not missing.exists()


def test_reading_an_empty_file_as_a_store_is_refused_and_leaves_it_empty(tmp_path: Path) -> None:
    """`runs --store empty.db` (a 0-byte file) made it a 147 KB store, though `runs` only reads."""
    empty = tmp_path / "empty.db"
    empty.touch()
    for args in (["runs"], ["show", "abc"], ["resume", "abc"]):
        done = cli(*args, "--store", str(empty))
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == (f"error: {empty} is not a run store (an empty file): nothing was recorded "
                                       "there; check the path given to --store")
    assert [(p.name, p.stat().st_size) for p in tmp_path.iterdir()] == [("empty.db", 0)]


def test_a_store_on_a_read_only_disk_is_read_as_immutable_unless_its_wal_holds_commits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # on a read-only disk SQLite cannot make the shared-memory file its WAL needs, so a plain
    # read-only open failed ("unable to open database file") and the store could not be listed;
    # nobody can write there, so a store whose commits are all in the file is opened as immutable
    import shutil

    from orchestra import store as store_module

    path = tmp_path / "runs.db"
    store = RunStore(path)
    store.begin_run("r1", "a task", {})
    store.close()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: mode != os.W_OK and real_access(p, mode))
    monkeypatch.setattr(store_module, "_read_only_disk", lambda p: True)
    opened: list[str] = []
    real_connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda target, **kw: opened.append(str(target)) or real_connect(target, **kw))
    reader = RunStore(path)
    assert reader.read_only and [run.task for run in reader.runs()] == ["a task"]
    assert opened[0] == f"file:{path}?mode=ro&immutable=1"
    # a copy taken while a writer had commits only in its WAL: immutable would not see them
    monkeypatch.setattr(os, "access", real_access)
    live = RunStore(tmp_path / "live" / "runs.db")
    live.begin_run("r2", "in the WAL", {})
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("runs.db", "runs.db-wal"):
        shutil.copy(tmp_path / "live" / name, copy / name)
    live.close()
    monkeypatch.setattr(os, "access", lambda p, mode: mode != os.W_OK and real_access(p, mode))
    with pytest.raises(StoreError, match="on a read-only disk with commits still in runs.db-wal, which SQLite "
                                         "cannot read there; copy both files"):
        RunStore(copy / "runs.db")


def test_a_store_in_a_folder_that_cannot_be_written_is_read_and_writes_say_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite makes its WAL's files beside the store: in a folder this process cannot write, with none
    there, a good store could be neither listed nor shown, and every command said it was `not a usable
    Orchestra run store (attempt to write a readonly database); move it away`."""
    path = tmp_path / "runs.db"
    store = RunStore(path)
    store.begin_run("r1", "a task", {})
    store.close()
    assert not path.with_name("runs.db-shm").exists()
    real_access = os.access
    folder = str(tmp_path)
    monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and not (mode == os.W_OK
                                                                                  and str(p) == folder))
    reader = RunStore(path)  # (the file itself can be written: only its folder cannot)
    assert reader.read_only and [run.task for run in reader.runs()] == ["a task"]
    with pytest.raises(StoreError) as refused:
        reader.begin_run("r2", "another task", {})
    assert str(refused.value) == (f"cannot write the run store {path}: its folder {tmp_path} cannot be written "
                                  "(SQLite keeps its -wal and -shm files beside it); choose a file you can write "
                                  "with --store (or store= in Python), or record nothing with --no-store")
    reader.close()


@pytest.mark.timeout(60)
def test_a_wave_that_breaks_fails_the_groups_it_was_running_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # groups run side by side (a placement); a bug in the wave's own loop used to fail only the
    # groups not started, and cancel the running ones, whose calls then waited for ever
    from collections.abc import AsyncIterator, Sequence

    from orchestra.execute import Executor, RunLedger
    from orchestra.models.base import Outcome
    from orchestra.testing.engines import SimulatedEngine

    class Gated(SimulatedEngine):
        async def complete_each(self, requests: Sequence[ChatRequest]) -> AsyncIterator[Outcome]:
            await asyncio.Event().wait()  # answers only when the wave is done with it
            yield 0, RuntimeError("unreachable")

    class TwoSlots:
        def engine(self, model: Any) -> Any:
            return model

        def fits(self, resident: Any, engine: Any) -> bool:
            return len(resident) < 2

    async def broken(self: Executor) -> None:
        raise RuntimeError("the wave's bookkeeping broke")

    monkeypatch.setattr(Executor, "_until_settled", broken)
    executor = Executor(placement=TwoSlots())  # type: ignore[arg-type]
    models = [Gated("gated", load_s=0, per_request=0, per_batch=0),
              *(SimulatedEngine(name, load_s=0, per_request=0, per_batch=0) for name in ("a", "b"))]

    async def main() -> dict[str, Any]:
        ledger = RunLedger.create("r")
        asks = {m.name: executor.run_task(executor.call(ledger, [(m, ChatRequest.user(m.name))], purpose="expert"))
                for m in models}
        outcomes = await asyncio.gather(*asks.values())
        return {name: outcome[0] for name, outcome in zip(asks, outcomes)}

    outcomes = asyncio.run(main())
    assert isinstance(outcomes["gated"], RuntimeError) and str(outcomes["gated"]) == "the wave's bookkeeping broke"
    assert sum(isinstance(o, RuntimeError) for o in outcomes.values()) == 2  # one group finished before it broke


@pytest.mark.timeout(60)  # (it spun: only the timeout's signal ended it)
def test_an_engine_with_no_room_beside_nothing_running_fails_its_calls_not_the_event_loop() -> None:
    """A placement whose ``fits`` says no with none of the executor's engines busy (room taken by another
    job): the wave looped without ever awaiting, the event loop spun for ever and nothing else ran."""
    from orchestra.errors import ResourceUnavailable
    from orchestra.execute import Executor, RunLedger
    from orchestra.testing.engines import SimulatedEngine

    class Full:
        def engine(self, model: Any) -> Any:
            return model

        def fits(self, resident: Any, engine: Any) -> bool:
            return engine.name != "big"

    executor = Executor(placement=Full())  # type: ignore[arg-type]
    models = [SimulatedEngine(name, load_s=0, per_request=0, per_batch=0) for name in ("big", "small")]

    async def main() -> list[Any]:
        ledger = RunLedger.create("r")
        asks = [executor.run_task(executor.call(ledger, [(m, ChatRequest.user(m.name))], purpose="expert"))
                for m in models]
        return [outcome[0] for outcome in await asyncio.wait_for(asyncio.gather(*asks), 60)]

    big, small = asyncio.run(main())
    assert isinstance(big, ResourceUnavailable) and str(big).startswith("model big does not fit where its engines")
    assert getattr(small, "text", None)


def test_force_does_not_take_a_run_from_a_process_of_this_machine_that_still_runs(tmp_path: Path) -> None:
    """``--force`` is for a holder that is gone: taking a run from one that is certainly alive (its pid
    and start time match) made two processes send its calls, and the record kept one side's count."""
    path = tmp_path / "runs.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from orchestra.store import RunStore; "
         "RunStore(sys.argv[1]).begin_run('r1', 't', {}); print('held', flush=True); time.sleep(120)", str(path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(RunHeld) as refused:
            RunStore(path).begin_run("r1", "t", {}, force=True)
        said = cli_message(refused.value)
        assert refused.value.running and said.startswith(f"run r1 is running in process {holder.pid} of this machine")
        assert said.endswith(f"which is still alive; stop it first (kill {holder.pid}): --force takes over only a run "
                             "whose process is gone, since both would send its calls")
        holder.kill()  # killed, not yet reaped by its parent (a zombie): gone for force
        for _ in range(600):
            with open(f"/proc/{holder.pid}/stat") as stat:
                if stat.read().rpartition(")")[2].split()[0] == "Z":
                    break
            time.sleep(0.05)
        assert RunStore(path).run("r1").status == "failed"  # listed as gone at once, not after its lease
        RunStore(path).begin_run("r1", "t", {})
    finally:
        holder.kill()
        holder.wait(timeout=60)


def test_a_pid_another_process_has_taken_since_does_not_hold_a_run() -> None:
    """The owner tag records its process's start time: a live process with that pid but another
    start time is not the holder (it held the run until its lease ran out, and --force was refused)."""
    from orchestra.store import _alive, _surely_running

    host, pid = socket.gethostname(), os.getpid()
    with open(f"/proc/{pid}/stat") as stat:
        started = stat.read().rpartition(")")[2].split()[19]
    assert _alive(f"{host} pid {pid}:tag@{started}") and _alive(f"{host} pid {pid}:tag")  # (no start time: as before)
    assert not _alive(f"{host} pid {pid}:tag@{int(started) + 1}")
    parent = os.getppid()
    with open(f"/proc/{parent}/stat") as stat:
        its = stat.read().rpartition(")")[2].split()[19]
    assert _surely_running(f"{host} pid {parent}:tag@{its}") and not _surely_running(f"{host} pid {parent}:tag@1")
    assert not _surely_running(f"{host} pid {parent}:tag") and not _surely_running(f"elsewhere pid {parent}:tag@{its}")


def test_an_on_answer_text_that_raises_is_warned_about_and_the_run_answers(loopback, tmp_path: Path) -> None:
    """It raised inside the call that writes the answer: that call failed, paid for, and the run
    with it (a resume paid for the call again). Like a listener that raises, it is warned about."""
    from orchestra.agents import Pool

    server = loopback(ScriptedLLM().handler())
    pool = Pool.load(write_pool(tmp_path, server.url))

    def fails(text: str) -> None:
        raise RuntimeError("text boom")

    with pytest.warns(RuntimeWarning, match=r"on_answer_text failed \(RuntimeError: text boom\); the run goes on"):
        result = Orchestra(pool, store=False).run("Why is the sky blue?", plan=False, on_answer_text=fails)
    assert result.status == "done" and result.answer and result.usage.requests == len(server.requests)



class EndlessEngine(ModelBase):
    """An in-process engine (one generation at a time): an expert's generation for a task saying
    "endless" never ends until it is stopped; the others answer at once."""

    heavy = True
    is_test_double = True
    concurrent = False

    def __init__(self, name: str) -> None:
        self.name, self.memory_bytes, self._loaded = name, 1, False
        self.generating: asyncio.Event | None = None
        self.stopped = 0

    @property
    def loaded(self) -> bool:
        return self._loaded

    async def load(self) -> float:
        self._loaded = True
        return 0.0

    async def unload(self) -> None:
        self._loaded = False

    async def _generate(self, request: ChatRequest) -> ChatResult:
        prompt = request.prompt_text()
        if "endless" in prompt and KEYWORDS_MARK not in prompt:
            assert self.generating is not None
            self.generating.set()
            try:
                await asyncio.Event().wait()  # (a long answer: it ends only when stopped)
            except asyncio.CancelledError:
                self.stopped += 1
                raise
        return ChatResult(text="The answer is 4", model=self.name, usage=Usage(requests=1))


@pytest.mark.timeout(60)
def test_a_run_cancelled_while_an_engine_generates_its_call_stops_that_generation(tmp_path: Path) -> None:
    """The generation went on to its end (600 tokens, minutes on the embedded model), and the next
    run's calls waited behind it: the engine's batch was cancelled only when the Orchestra closed
    (found by a trial, with `orchestra serve` and a client that gave up)."""
    from orchestra import Agent, Pool

    engine = EndlessEngine("engine")
    orc = Orchestra(Pool(agents=[Agent(name="a", model=engine)], planner=engine), store=tmp_path / "runs.db", k=1)

    async def main() -> str:
        engine.generating = asyncio.Event()
        endless = asyncio.ensure_future(orc.arun("An endless question?", plan=False, run_id="endless"))
        await engine.generating.wait()
        endless.cancel()
        with pytest.raises(asyncio.CancelledError):
            await endless
        # the engine is free at once: the next run is answered (it waited for ever behind the first)
        after = await asyncio.wait_for(orc.arun("What is 2 + 2?", plan=False), 30)
        return after.status

    assert asyncio.run(main()) == "done"
    assert engine.stopped == 1
    assert orc.store is not None
    [cut] = [call for call in orc.store.calls("endless") if call["purpose"] == "expert"]
    assert (cut["status"], cut["requests"]) == ("error", 1)  # (the engine got it: counted, to send again on resume)
    assert "cancelled while its request was in flight" in cut["error"]
